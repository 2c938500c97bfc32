#!/usr/bin/env bash
# One x4 call, two 2-GPU jobs side by side:
#   GPUs 0,1: 2 GPUs vs 1 GPU x 2 accumulation, same global batch (4-layer 20b): losses and adapters
#   GPUs 2,3: gpt-oss-120b, MXFP4-resident experts, DDP over 2 GPUs (trainer with compiled dequantization)
source scripts/gpu/env.sh
LIMIT=${LIMIT:-300}
CUDA_VISIBLE_DEVICES=0,1 timeout "$LIMIT" python3 -m gptoss_tune bench --preset 20b --layers 4 \
  --tokens-per-batch 16384 --steps 5 --gpus 2 --equivalence --output "$W/equiv" --record \
  --record-file "$W/rec-equiv.md" > "$W/equiv.log" 2>&1 &
CUDA_VISIBLE_DEVICES=2,3 timeout "$LIMIT" python3 -m gptoss_tune bench --preset 120b --tokens-per-batch 8192 \
  --steps 3 --gpus 2 --expert-storage mxfp4 --memory-budget-gib 76 --output "$W/ddp120b" --record \
  --record-file "$W/rec-ddp120b.md" > "$W/ddp120b.log" 2>&1 &
wait
for run in equiv ddp120b; do
  echo "== $run"; grep -E "^\||Final adapters|error|Error" "$W/$run.log" | tail -n 16
done
finish
