#!/usr/bin/env bash
# One fast path's backends against each other on one H200, in one call (after fa4_stage.sh, carrying
# .whl, .vocab and .fa4b): the matching tests of tests/gpu, for --attention also one layer of each
# type timed (attention_backends.py), then the full-depth bench of ours at 16k tokens with room for
# every activation, once per value on the same seeded weights, then ours with the defaults within
# 60 GiB while time is left (STEPS timed steps each, default 4; TESTS="" runs all of tests/gpu).
# Results: $OUT/results.tgz; a summary is printed last.
#   OPTION=--attention VALUES="flash flex" TESTS="attention" bash scripts/gpu/backend_ab.sh
#   OPTION=--expert-gemm VALUES="quack torch" TESTS="quack or experts" bash scripts/gpu/backend_ab.sh
#   OPTION=--expert-gemm VALUES="quack-fused quack" TESTS="fused or quack or experts" bash scripts/gpu/backend_ab.sh
source scripts/gpu/env.sh
LIMIT=${LIMIT:-560}
STEPS=${STEPS:-4}
deadline=$(( $(date +%s) + LIMIT ))
left() { echo $(( deadline - $(date +%s) )); }
timeout 200 python3 -m pytest tests/gpu -q -rfE -p no:cacheprovider -k "$TESTS" > "$W/gpu-tests.log" 2>&1
echo "tests rc=$?" >> "$W/gpu-tests.log"
if [ "$OPTION" = --attention ]; then
  (cd scripts/gpu && timeout 120 python3 attention_backends.py) > "$W/backends.log" 2>&1
fi
for value in $VALUES; do
  timeout "$(left)" python3 -m gptoss_tune bench --preset 20b --recipes ours --tokens-per-batch 16384 \
    --memory-budget-gib 130 --steps "$STEPS" --warmup 2 "$OPTION" "$value" --output "$W/roomy-$value" \
    --record --record-file "$W/rec-roomy-$value.md" > "$W/roomy-$value.log" 2>&1
done
if [ "$(left)" -gt 150 ]; then
  timeout "$(left)" python3 -m gptoss_tune bench --preset 20b --recipes ours --tokens-per-batch 16384 \
    --steps "$STEPS" --warmup 2 --output "$W/budget" --record --record-file "$W/rec-budget.md" > "$W/budget.log" 2>&1
fi
echo "== tests/gpu -k '$TESTS'"; grep -E "passed|failed|rror|rc=" "$W/gpu-tests.log" | tail -n 12
[ -f "$W/backends.log" ] && { echo "== one layer"; grep -E "^(1024|mixed)" "$W/backends.log"; }
for value in $VALUES budget; do
  run=roomy-$value; [ "$value" = budget ] && run=budget
  [ -f "$W/$run.log" ] && { echo "== $run"; grep -E "^\| ours|OOM|Error|rror:|^Kernels|\(timed\)" "$W/$run.log" | head -n 30; }
done
finish
