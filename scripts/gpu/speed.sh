#!/usr/bin/env bash
# One x4 call for issue 5 (speed), four single-GPU jobs side by side, about LIMIT seconds:
#   GPU 0: tests/gpu, then the kernel table of 2-layer training steps (scripts/gpu/profile_step.py)
#   GPU 1: full-depth 20b, ours vs stock vs cookbook, 16k tokens per micro-batch (60 GiB budget)
#   GPU 2: full-depth 20b ours with room for every activation (130 GiB budget), 16k and 8k
#   GPU 3: the long-context curve (20b, one sequence of 16k .. 128k tokens, 60 GiB budget)
# Results: $OUT/results.tgz (logs and bench records); a summary is printed last.
source scripts/gpu/env.sh
LIMIT=${LIMIT:-480}
deadline=$(( $(date +%s) + LIMIT ))
left() { echo $(( deadline - $(date +%s) )); }

(
  export CUDA_VISIBLE_DEVICES=0
  timeout 240 python3 -m pytest tests/gpu -q -rfE --durations=4 -p no:cacheprovider > "$W/gpu-tests.log" 2>&1
  echo "tests rc=$?" >> "$W/gpu-tests.log"
  timeout "$(left)" python3 scripts/gpu/profile_step.py 2 16384 "$W/profile-step.txt" > "$W/step.log" 2>&1
) &
CUDA_VISIBLE_DEVICES=1 timeout "$LIMIT" python3 -m gptoss_tune bench --preset 20b --tokens-per-batch 16384 \
  --steps 3 --warmup 2 --output "$W/side" --record --record-file "$W/rec-side.md" > "$W/side.log" 2>&1 &
(
  export CUDA_VISIBLE_DEVICES=2
  timeout "$(left)" python3 -m gptoss_tune bench --preset 20b --recipes ours --tokens-per-batch 16384 \
    --memory-budget-gib 130 --steps 4 --warmup 2 --output "$W/roomy" --record --record-file "$W/rec-roomy.md" \
    > "$W/roomy.log" 2>&1
  timeout "$(left)" python3 -m gptoss_tune bench --preset 20b --recipes ours --tokens-per-batch 8192 \
    --memory-budget-gib 130 --steps 4 --warmup 2 --output "$W/roomy8k" --record --record-file "$W/rec-roomy8k.md" \
    > "$W/roomy8k.log" 2>&1
) &
CUDA_VISIBLE_DEVICES=3 timeout "$LIMIT" python3 -m gptoss_tune bench --preset 20b \
  --long-context 16384,32768,65536,131072 --steps 2 --warmup 1 --output "$W/long" --record \
  --record-file "$W/rec-long.md" > "$W/long.log" 2>&1 &
wait

echo "== tests/gpu"; tail -n 6 "$W/gpu-tests.log"
echo "== step profile"; grep "per forward" "$W/step.log"; head -n 30 "$W/profile-step.txt" | cut -c1-72,170-215
for run in side roomy roomy8k long; do
  echo "== $run"; grep -E "^\| |OOM|Error" "$W/$run.log" | head -n 20
done
finish
