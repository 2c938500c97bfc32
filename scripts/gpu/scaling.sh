#!/usr/bin/env bash
# One x4 call: data-parallel scaling of the real trainer (torchrun + DDP) on the full-depth 20b,
# 1, 2 and 4 GPUs, plus 1 GPU x 4 accumulation (same global batch as 4 GPUs: equivalence).
# SCALING_ARGS overrides the bench options. Results: $OUT/results.tgz; the tables are printed last.
source scripts/gpu/env.sh
LIMIT=${LIMIT:-450}
SCALING_ARGS=${SCALING_ARGS:---preset 20b --tokens-per-batch 16384 --memory-budget-gib 100 --steps 5}
# shellcheck disable=SC2086
timeout "$LIMIT" python3 -m gptoss_tune bench $SCALING_ARGS --gpus 1,2,4 --equivalence --output "$W/scaling" \
  --record --record-file "$W/rec-scaling.md" > "$W/scaling.log" 2>&1
echo "rc=$?"
grep -E "^\||Final adapters|error" "$W/scaling.log" | tail -n 30
finish
