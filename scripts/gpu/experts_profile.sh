#!/usr/bin/env bash
# One x2 call: on GPU 0, per-component timings of one 20b layer at 16k tokens with torch.profiler's
# kernel table of the experts (bench --components --profile), then the kernel table of whole
# 2-layer training steps (scripts/gpu/profile_step.py); on GPU 1, tests/gpu.
# Results: $OUT/results.tgz; the tables are printed too.
source scripts/gpu/env.sh
(
  export CUDA_VISIBLE_DEVICES=0
  timeout 200 python3 -m gptoss_tune bench --preset 20b --layers 2 --recipes ours --tokens-per-batch 16384 \
    --steps 2 --warmup 1 --components --profile --output "$W/comp" > "$W/comp.log" 2>&1
  echo "components rc=$?" >> "$W/comp.log"
  timeout 150 python3 scripts/gpu/profile_step.py 2 16384 "$W/profile-step.txt" > "$W/step.log" 2>&1
  echo "profile_step rc=$?" >> "$W/step.log"
) &
CUDA_VISIBLE_DEVICES=1 timeout 280 python3 -m pytest tests/gpu -q -rfE --durations=6 -p no:cacheprovider \
  > "$W/gpu-tests.log" 2>&1 &
wait
grep -E "^\| |rc=" "$W/comp.log" | head -n 40
head -n 40 "$W/comp/profile-experts.txt"
grep -E "rc=|per forward" "$W/step.log"; head -n 52 "$W/profile-step.txt"
tail -n 12 "$W/gpu-tests.log"
finish
