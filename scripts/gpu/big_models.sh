#!/usr/bin/env bash
# One x4 call, two 2-GPU jobs side by side:
#   GPUs 0,1: gpt-oss-120b with bf16 experts (234 GB: no single GPU holds it), FSDP2 over 2 GPUs
#   GPUs 2,3: gpt-oss-120b with MXFP4-resident experts, DDP over 2 GPUs
# Both train the real trainer on random-on-load weights. Results: $OUT/results.tgz.
source scripts/gpu/env.sh
LIMIT=${LIMIT:-400}
CUDA_VISIBLE_DEVICES=0,1 timeout "$LIMIT" python3 -m gptoss_tune bench --preset 120b --tokens-per-batch 8192 \
  --steps 3 --gpus 2 --sharding fsdp --expert-storage bf16 --output "$W/fsdp120b" --record \
  --record-file "$W/rec-fsdp120b.md" > "$W/fsdp120b.log" 2>&1 &
CUDA_VISIBLE_DEVICES=2,3 timeout "$LIMIT" python3 -m gptoss_tune bench --preset 120b --tokens-per-batch 8192 \
  --steps 3 --gpus 2 --expert-storage mxfp4 --memory-budget-gib 76 --output "$W/ddp120b" --record \
  --record-file "$W/rec-ddp120b.md" > "$W/ddp120b.log" 2>&1 &
wait
for run in fsdp120b ddp120b; do
  echo "== $run"; grep -E "^\||error|Error" "$W/$run.log" | tail -n 12
  tail -n 25 "$W/$run/run-2gpu-accum1.log" 2>/dev/null | grep -vE "^\s*$" | tail -n 8
done
finish
