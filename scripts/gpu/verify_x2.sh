#!/usr/bin/env bash
# One nvidia-h200-x2 call, about LIMIT seconds (default 560), for what issue 5 still needs measured
# (verify.sh does more on an x4); after fa4_stage.sh, carrying .whl, .vocab and .fa4b:
#   GPU 0: full-depth 20b, ours vs stock vs cookbook at 16k tokens per micro-batch within 60 GiB
#          (the default plan), then ours alone within 60 GiB with --recompute auto
#   GPU 1: the GPU tests of the recomputations (gate_up, norms, plans), then ours and stock with room
#          for every activation (130 GiB), then the 200-step loss curves, fast paths vs eager
#          reference, both on that GPU (scripts/gpu/loss_curve.sh)
# Results: $OUT/results.tgz plus the loss-curve files in $OUT; a summary is printed last.
source scripts/gpu/env.sh
LIMIT=${LIMIT:-560}
deadline=$(( $(date +%s) + LIMIT ))
left() { echo $(( deadline - $(date +%s) )); }
record_bench() {  # gpu name [bench arguments...]
  local gpu=$1 name=$2
  shift 2
  CUDA_VISIBLE_DEVICES=$gpu timeout "$(left)" python3 -m gptoss_tune bench --preset 20b --tokens-per-batch 16384 \
    "$@" --output "$W/$name" --record --record-file "$W/rec-$name.md" > "$W/$name.log" 2>&1
}
(
  record_bench 0 side --steps 3 --warmup 2
  record_bench 0 auto60 --recipes ours --recompute auto --steps 4 --warmup 2
) &
(
  CUDA_VISIBLE_DEVICES=1 timeout 200 python3 -m pytest tests/gpu -q -rfE -p no:cacheprovider \
    -k "recompute or recomputation or recomputing or checkpointing_plan or normaliz" > "$W/gpu-tests.log" 2>&1
  echo "tests rc=$?" >> "$W/gpu-tests.log"
  record_bench 1 roomy --recipes ours,stock --memory-budget-gib 130 --steps 6 --warmup 2
  curve_limit=$(( $(left) - 15 ))
  [ "$curve_limit" -gt 30 ] && FIRST_GPU=1 SAME_GPU=1 LIMIT=$curve_limit bash scripts/gpu/loss_curve.sh \
    > "$W/loss-curve.log" 2>&1
) &
wait
echo "== tests/gpu (recomputation)"; grep -E "passed|failed|rror|rc=" "$W/gpu-tests.log" | tail -n 12
for run in side auto60 roomy; do
  echo "== $run"; grep -E "^\| |OOM|Error|Memory plan" "$W/$run.log" | head -n 30
done
echo "== loss curve"; tail -n 12 "$W/loss-curve.log"
finish
