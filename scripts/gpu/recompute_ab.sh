#!/usr/bin/env bash
# The recomputation policies against each other within a memory budget, on one H200, in one call
# (after fa4_stage.sh, carrying .whl, .vocab and .fa4b): the recomputation tests of tests/gpu (the
# norms' outputs normalized again in backward included), then
# the full-depth bench of ours at 16k tokens within BUDGET GiB (default 60) once per --recompute
# policy on the same seeded weights (STEPS timed steps each, default 6). Each log holds the plan
# ("checkpointed layers" column: whole layers + gate_up-only layers) and the measured peak.
# Results: $OUT/results.tgz; a summary is printed last.
#   bash scripts/gpu/recompute_ab.sh
#   BUDGET=50 POLICIES="auto" bash scripts/gpu/recompute_ab.sh
source scripts/gpu/env.sh
LIMIT=${LIMIT:-560}
STEPS=${STEPS:-6}
BUDGET=${BUDGET:-60}
POLICIES=${POLICIES:-"layers auto"}
deadline=$(( $(date +%s) + LIMIT ))
left() { echo $(( deadline - $(date +%s) )); }
timeout 240 python3 -m pytest tests/gpu -q -rfE -p no:cacheprovider \
  -k "recompute or recomputation or recomputing or checkpointing_plan or normaliz" > "$W/gpu-tests.log" 2>&1
echo "tests rc=$?" >> "$W/gpu-tests.log"
for policy in $POLICIES; do
  timeout "$(left)" python3 -m gptoss_tune bench --preset 20b --recipes ours --tokens-per-batch 16384 \
    --memory-budget-gib "$BUDGET" --recompute "$policy" --steps "$STEPS" --warmup 2 \
    --output "$W/budget-$policy" --record --record-file "$W/rec-$policy.md" > "$W/budget-$policy.log" 2>&1
done
echo "== tests/gpu (recomputation)"; grep -E "passed|failed|rror|rc=" "$W/gpu-tests.log" | tail -n 12
for policy in $POLICIES; do
  [ -f "$W/budget-$policy.log" ] && { echo "== --recompute $policy within $BUDGET GiB"; \
    grep -E "^\| ours|OOM|Error|rror:|checkpointing|\(timed\)" "$W/budget-$policy.log" | head -n 30; }
done
finish
