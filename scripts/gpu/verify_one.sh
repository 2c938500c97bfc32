#!/usr/bin/env bash
# One single-H200 call after a speed change (when only nvidia-h200 is lent), about 8 minutes, run in
# sequence: tests/gpu; full-depth ours at 16k tokens with room for every activation (ROOMY=0 leaves
# it out); the kernel table of a whole 24-layer step (also by input shape). SIDE=1 adds ours vs stock
# vs cookbook at full depth within 60 GiB (about 4 more minutes: leave out the profile then, PROFILE=0).
# Results: $OUT/results.tgz; a summary is printed last.
source scripts/gpu/env.sh
LIMIT=${LIMIT:-560}
deadline=$(( $(date +%s) + LIMIT ))
left() { echo $(( deadline - $(date +%s) )); }
timeout 230 python3 -m pytest tests/gpu -q -rfE --durations=6 -p no:cacheprovider > "$W/gpu-tests.log" 2>&1
echo "tests rc=$?" >> "$W/gpu-tests.log"
if [ "${ROOMY:-1}" = 1 ]; then
  timeout "$(left)" python3 -m gptoss_tune bench --preset 20b --recipes ours --tokens-per-batch 16384 \
    --memory-budget-gib 130 --steps 4 --warmup 2 --output "$W/roomy" --record --record-file "$W/rec-roomy.md" \
    > "$W/roomy.log" 2>&1
fi
if [ "${PROFILE:-1}" = 1 ]; then
  timeout "$(left)" python3 scripts/gpu/profile_step.py 24 16384 "$W/profile-step.txt" > "$W/step.log" 2>&1
  cp "$W/profile-step.txt.shapes" "$W/profile-step-shapes.txt"
fi
if [ "${SIDE:-0}" = 1 ]; then
  timeout "$(left)" python3 -m gptoss_tune bench --preset 20b --tokens-per-batch 16384 --steps 3 --warmup 2 \
    --output "$W/side" --record --record-file "$W/rec-side.md" > "$W/side.log" 2>&1
fi
echo "== tests/gpu"; tail -n 8 "$W/gpu-tests.log"
echo "== step profile"; grep "per forward" "$W/step.log" 2>/dev/null
for run in roomy side; do [ -f "$W/$run.log" ] && { echo "== $run"; grep -E "^\| |OOM|Error" "$W/$run.log" | head -n 30; }; done
finish
