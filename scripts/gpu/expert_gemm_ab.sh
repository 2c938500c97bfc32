#!/usr/bin/env bash
# quack's expert GEMMs against torch's grouped_mm on one H200, in one call (after fa4_stage.sh,
# carrying .whl, .vocab and .fa4b): the expert and attention tests of tests/gpu, then the full-depth
# bench of ours at 16k tokens with room for every activation, once per backend on the same seeded
# weights (FlashAttention-4 in both), then ours within 60 GiB while time is left.
# Results: $OUT/results.tgz; a summary is printed last.
source scripts/gpu/env.sh
LIMIT=${LIMIT:-560}
deadline=$(( $(date +%s) + LIMIT ))
left() { echo $(( deadline - $(date +%s) )); }
timeout 200 python3 -m pytest tests/gpu -q -rfE -p no:cacheprovider -k "quack or experts or flash" \
  > "$W/gpu-tests.log" 2>&1
echo "tests rc=$?" >> "$W/gpu-tests.log"
for gemm in quack torch; do
  timeout "$(left)" python3 -m gptoss_tune bench --preset 20b --recipes ours --tokens-per-batch 16384 \
    --memory-budget-gib 130 --steps 4 --warmup 2 --expert-gemm "$gemm" --output "$W/roomy-$gemm" \
    --record --record-file "$W/rec-roomy-$gemm.md" > "$W/roomy-$gemm.log" 2>&1
done
if [ "$(left)" -gt 150 ]; then
  timeout "$(left)" python3 -m gptoss_tune bench --preset 20b --recipes ours --tokens-per-batch 16384 \
    --steps 4 --warmup 2 --output "$W/budget" --record --record-file "$W/rec-budget.md" > "$W/budget.log" 2>&1
fi
echo "== tests/gpu -k 'quack or experts or flash'"; grep -E "passed|failed|rror|rc=" "$W/gpu-tests.log" | tail -n 12
for run in roomy-quack roomy-torch budget; do
  [ -f "$W/$run.log" ] && { echo "== $run"; grep -E "^\| ours|OOM|Error|rror:|kernels" "$W/$run.log" | head -n 6; }
done
finish
