#!/usr/bin/env bash
# One x4 call, four single-GPU jobs side by side (each on its own GPU), about LIMIT seconds:
#   GPU 0: tests/gpu, then the long-context curve (20b, one sequence of 16k .. 128k tokens)
#   GPU 1: full-depth 20b, ours vs stock vs cookbook, 16k tokens per micro-batch (60 GiB budget)
#   GPU 2: full-depth 20b ours with room for every activation (no recompute) + per-component profile,
#          then the kernel table of whole 2-layer training steps (scripts/gpu/profile_step.py)
#   GPU 3: a 20b MXFP4 checkpoint written by init-model, its load time (tests/gpu), then 20b at 8k, no recompute
# Results: $OUT/results.tgz (logs and bench records); a summary is printed last.
source scripts/gpu/env.sh
LIMIT=${LIMIT:-450}
deadline=$(( $(date +%s) + LIMIT ))
left() { echo $(( deadline - $(date +%s) )); }

(
  CUDA_VISIBLE_DEVICES=0 timeout 240 python3 -m pytest tests/gpu -q -rfE --durations=6 -p no:cacheprovider \
    > "$W/gpu-tests.log" 2>&1
  echo "tests rc=$?" >> "$W/gpu-tests.log"
  CUDA_VISIBLE_DEVICES=0 timeout "$(left)" bash -c "python3 -m gptoss_tune bench --preset 20b \
    --long-context 16384,32768,65536,131072 --steps 2 --warmup 1 --output $W/long --record \
    --record-file $W/rec-long.md" > "$W/long.log" 2>&1
) &
CUDA_VISIBLE_DEVICES=1 timeout "$LIMIT" python3 -m gptoss_tune bench --preset 20b --tokens-per-batch 16384 \
  --steps 3 --warmup 2 --output "$W/side" --record --record-file "$W/rec-side.md" > "$W/side.log" 2>&1 &
(
  export CUDA_VISIBLE_DEVICES=2
  timeout "$(left)" python3 -m gptoss_tune bench --preset 20b --recipes ours --tokens-per-batch 16384 \
    --memory-budget-gib 130 --steps 4 --warmup 2 --components --profile --output "$W/roomy" \
    --record --record-file "$W/rec-roomy.md" > "$W/roomy.log" 2>&1
  timeout "$(left)" python3 scripts/gpu/profile_step.py 2 16384 "$W/profile-step.txt" > "$W/step.log" 2>&1
) &
(
  export CUDA_VISIBLE_DEVICES=3
  start=$(date +%s)
  timeout 200 python3 -m gptoss_tune init-model --preset 20b --mxfp4 -o /tmp/m20 > "$W/load.log" 2>&1
  echo "init-model --preset 20b --mxfp4: rc=$? in $(( $(date +%s) - start )) s, $(du -sh /tmp/m20 | cut -f1)" >> "$W/load.log"
  sync; (echo 3 > /proc/sys/vm/drop_caches) 2>/dev/null && echo "page cache dropped" >> "$W/load.log"
  GPTOSS_TUNE_20B_MXFP4=/tmp/m20 timeout 120 python3 -m pytest -s -q -p no:cacheprovider \
    tests/gpu/test_mxfp4_gpu.py -k loads_to_the_gpu >> "$W/load.log" 2>&1
  timeout "$(left)" python3 -m gptoss_tune bench --preset 20b --recipes ours \
    --tokens-per-batch 8192 --memory-budget-gib 130 --steps 4 --warmup 2 --output "$W/roomy8k" --record \
    --record-file "$W/rec-roomy8k.md" > "$W/roomy8k.log" 2>&1
) &
wait

echo "== tests/gpu";  tail -n 12 "$W/gpu-tests.log"
echo "== load";       grep -E "rc=|load:|passed|failed|dropped" "$W/load.log"
echo "== step profile"; grep "per forward" "$W/step.log"; head -n 30 "$W/profile-step.txt" | cut -c1-72,170-215
for run in side roomy roomy8k long; do
  echo "== $run"; grep -E "^\| |OOM|Error" "$W/$run.log" | head -n 30
done
finish
