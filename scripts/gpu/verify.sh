#!/usr/bin/env bash
# One x4 call after a speed change, everything the benchmarks page reports for one H200, about
# 8 minutes:
#   GPU 0: tests/gpu; per-component timings of one 20b layer at 16k tokens with the experts' kernel
#          table (bench --components --profile); the kernel table of a whole 24-layer step (also by
#          input shape); the 24-layer step with and without the optimizer (scripts/gpu/depth.py)
#   GPU 1: full-depth ours vs stock vs cookbook at 16k tokens per micro-batch within a 60 GiB budget
#   GPU 2, 3: the 200-step loss curves, fast paths vs eager reference (scripts/gpu/loss_curve.sh);
#          then the 4-layer ours vs stock vs cookbook (GPU 2; the padded recipes compile once per
#          shape: give it 300 s) and full-depth ours with room for every activation, then with
#          MXFP4-resident experts within 60 GiB (GPU 3)
# Results: $OUT/results.tgz plus the loss-curve files in $OUT; a summary is printed last.
source scripts/gpu/env.sh
LIMIT=${LIMIT:-540}
deadline=$(( $(date +%s) + LIMIT ))
left() { echo $(( deadline - $(date +%s) )); }
(
  export CUDA_VISIBLE_DEVICES=0
  timeout 200 python3 -m pytest tests/gpu -q -rfE --durations=4 -p no:cacheprovider > "$W/gpu-tests.log" 2>&1
  echo "tests rc=$?" >> "$W/gpu-tests.log"
  timeout 200 python3 -m gptoss_tune bench --preset 20b --layers 2 --recipes ours --tokens-per-batch 16384 \
    --steps 2 --warmup 1 --components --profile --output "$W/comp" --record --record-file "$W/rec-comp.md" > "$W/comp.log" 2>&1
  timeout "$(left)" python3 scripts/gpu/profile_step.py 24 16384 "$W/profile-step.txt" > "$W/step.log" 2>&1
  cp "$W/profile-step.txt.shapes" "$W/profile-step-shapes.txt"
  timeout "$(left)" python3 scripts/gpu/depth.py 24 16384 mt > "$W/depth.log" 2>&1
) &
CUDA_VISIBLE_DEVICES=1 timeout "$(left)" python3 -m gptoss_tune bench --preset 20b --tokens-per-batch 16384 \
  --steps 3 --warmup 2 --output "$W/side" --record --record-file "$W/rec-side.md" > "$W/side.log" 2>&1 &
(
  FIRST_GPU=2 bash scripts/gpu/loss_curve.sh > "$W/loss-curve.log" 2>&1
  CUDA_VISIBLE_DEVICES=2 timeout "$(left)" python3 -m gptoss_tune bench --preset 20b --layers 4 \
    --tokens-per-batch 16384 --steps 6 --warmup 2 --output "$W/four" --record --record-file "$W/rec-four.md" \
    > "$W/four.log" 2>&1 &
  run_ours() {  # name storage budget
    CUDA_VISIBLE_DEVICES=3 timeout "$(left)" python3 -m gptoss_tune bench --preset 20b --recipes ours \
      --expert-storage "$2" --tokens-per-batch 16384 --memory-budget-gib "$3" --steps 4 --warmup 2 \
      --output "$W/$1" --record --record-file "$W/rec-$1.md" > "$W/$1.log" 2>&1
  }
  run_ours roomy bf16 130
  run_ours b60-mxfp4 mxfp4 60
  wait
) &
wait
echo "== tests/gpu"; tail -n 6 "$W/gpu-tests.log"
echo "== step profile"; grep "per forward" "$W/step.log"; grep -E "per (step|forward)|peak" "$W/depth.log"
for run in comp four side roomy b60-mxfp4; do echo "== $run"; grep -E "^\| |OOM|Error" "$W/$run.log" | head -n 30; done
echo "== loss curve"; tail -n 12 "$W/loss-curve.log"
finish
