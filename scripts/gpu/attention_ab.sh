#!/usr/bin/env bash
# FlashAttention-4 against FlexAttention on one H200, in one call (after fa4_stage.sh, carrying
# .whl, .vocab and .fa4b): the attention tests of tests/gpu, one layer of each type timed
# (attention_backends.py), then the full-depth bench of ours at 16k tokens with room for every
# activation, once per backend on the same seeded weights, then ours with FlashAttention-4 within
# 60 GiB while time is left. Results: $OUT/results.tgz; a summary is printed last.
source scripts/gpu/env.sh
LIMIT=${LIMIT:-570}
deadline=$(( $(date +%s) + LIMIT ))
left() { echo $(( deadline - $(date +%s) )); }
python3 -c "import flash_attn.cute as f; print('flash-attn-4', f.__version__)" > "$W/fa4-import.log" 2>&1
timeout 150 python3 -m pytest tests/gpu -q -rfE -p no:cacheprovider -k "attention" > "$W/gpu-tests.log" 2>&1
echo "tests rc=$?" >> "$W/gpu-tests.log"
(cd scripts/gpu && timeout 120 python3 attention_backends.py) > "$W/backends.log" 2>&1
for backend in flash flex; do
  timeout "$(left)" python3 -m gptoss_tune bench --preset 20b --recipes ours --tokens-per-batch 16384 \
    --memory-budget-gib 130 --steps 4 --warmup 2 --attention "$backend" --output "$W/roomy-$backend" \
    --record --record-file "$W/rec-roomy-$backend.md" > "$W/roomy-$backend.log" 2>&1
done
if [ "$(left)" -gt 150 ]; then
  timeout "$(left)" python3 -m gptoss_tune bench --preset 20b --recipes ours --tokens-per-batch 16384 \
    --steps 4 --warmup 2 --attention flash --output "$W/budget-flash" \
    --record --record-file "$W/rec-budget-flash.md" > "$W/budget-flash.log" 2>&1
fi
echo "== import"; cat "$W/fa4-import.log" | tail -n 3
echo "== tests/gpu -k attention"; tail -n 12 "$W/gpu-tests.log"
echo "== one layer"; cat "$W/backends.log" | tail -n 12
for run in roomy-flash roomy-flex budget-flash; do
  [ -f "$W/$run.log" ] && { echo "== $run"; grep -E "^\| |OOM|Error|rror:" "$W/$run.log" | head -n 12; }
done
finish
