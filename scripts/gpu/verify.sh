#!/usr/bin/env bash
# One x4 call after a speed change, about 6 minutes:
#   GPU 0: tests/gpu, then per-component timings of one 20b layer at 16k tokens with the experts'
#          kernel table (bench --components --profile)
#   GPU 1: 4-layer 20b, ours vs stock vs cookbook, 16k tokens per micro-batch, 6 timed steps
#   GPU 2, 3: the 200-step loss curves, fast paths vs eager reference (scripts/gpu/loss_curve.sh)
# Results: $OUT/results.tgz plus the loss-curve files in $OUT; a summary is printed last.
source scripts/gpu/env.sh
(
  export CUDA_VISIBLE_DEVICES=0
  timeout 240 python3 -m pytest tests/gpu -q -rfE --durations=4 -p no:cacheprovider > "$W/gpu-tests.log" 2>&1
  echo "tests rc=$?" >> "$W/gpu-tests.log"
  timeout 200 python3 -m gptoss_tune bench --preset 20b --layers 2 --recipes ours --tokens-per-batch 16384 \
    --steps 2 --warmup 1 --components --profile --output "$W/comp" --record --record-file "$W/rec-comp.md" > "$W/comp.log" 2>&1
) &
CUDA_VISIBLE_DEVICES=1 timeout 420 python3 -m gptoss_tune bench --preset 20b --layers 4 --tokens-per-batch 16384 \
  --steps 6 --warmup 2 --output "$W/four" --record --record-file "$W/rec-four.md" > "$W/four.log" 2>&1 &
FIRST_GPU=2 bash scripts/gpu/loss_curve.sh > "$W/loss-curve.log" 2>&1 &
wait
echo "== tests/gpu"; tail -n 6 "$W/gpu-tests.log"
for run in comp four; do echo "== $run"; grep -E "^\| |OOM|Error" "$W/$run.log" | head -n 30; done
echo "== loss curve"; tail -n 12 "$W/loss-curve.log"
finish
