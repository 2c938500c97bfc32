#!/usr/bin/env bash
# One x4 call after a change to our fast paths, about 5 minutes; ours only (side by side with the
# stock recipes: single_gpu.sh and verify.sh):
#   GPU 0: tests/gpu, then per-component timings of one 20b layer at 16k tokens with the experts'
#          kernel table (bench --components --profile)
#   GPU 1: full-depth 20b at 16k tokens per micro-batch within a 60 GiB budget, bf16 experts
#   GPU 2: the same with MXFP4-resident experts
#   GPU 3: the same with room for every activation (no recompute)
# Results: $OUT/results.tgz; a summary is printed last.
source scripts/gpu/env.sh
LIMIT=${LIMIT:-300}
(
  export CUDA_VISIBLE_DEVICES=0
  timeout 240 python3 -m pytest tests/gpu -q -rfE --durations=4 -p no:cacheprovider > "$W/gpu-tests.log" 2>&1
  echo "tests rc=$?" >> "$W/gpu-tests.log"
  timeout 200 python3 -m gptoss_tune bench --preset 20b --layers 2 --recipes ours --tokens-per-batch 16384 \
    --steps 2 --warmup 1 --components --profile --output "$W/comp" --record --record-file "$W/rec-comp.md" > "$W/comp.log" 2>&1
) &
run_ours() {  # gpu name storage budget
  CUDA_VISIBLE_DEVICES=$1 timeout "$LIMIT" python3 -m gptoss_tune bench --preset 20b --recipes ours \
    --expert-storage "$3" --tokens-per-batch 16384 --memory-budget-gib "$4" --steps 4 --warmup 2 \
    --output "$W/$2" --record --record-file "$W/rec-$2.md" > "$W/$2.log" 2>&1
}
run_ours 1 b60-bf16 bf16 60 &
run_ours 2 b60-mxfp4 mxfp4 60 &
run_ours 3 roomy bf16 130 &
wait
echo "== tests/gpu"; tail -n 8 "$W/gpu-tests.log"
for run in comp b60-bf16 b60-mxfp4 roomy; do
  echo "== $run"; grep -E "^\| |OOM|Error|checkpoint" "$W/$run.log" | head -n 30
done
finish
