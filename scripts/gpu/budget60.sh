#!/usr/bin/env bash
# One x2 call: full-depth 20b ours at 16k tokens per micro-batch within a 60 GiB budget, with the
# experts stored dense bf16 (GPU 0) and MXFP4-resident (GPU 1). Results: $OUT/results.tgz.
source scripts/gpu/env.sh
gpu=0
for storage in bf16 mxfp4; do
  CUDA_VISIBLE_DEVICES=$gpu timeout "${LIMIT:-200}" python3 -m gptoss_tune bench --preset 20b --recipes ours \
    --expert-storage "$storage" --tokens-per-batch 16384 --memory-budget-gib 60 --steps 4 --warmup 2 \
    --output "$W/b60-$storage" --record --record-file "$W/rec-b60-$storage.md" > "$W/b60-$storage.log" 2>&1 &
  gpu=$((gpu + 1))
done
wait
for storage in bf16 mxfp4; do echo "== $storage"; grep -E "^\| |OOM|Error|checkpoint" "$W/b60-$storage.log" | head -n 12; done
finish
