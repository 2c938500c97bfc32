#!/usr/bin/env bash
# One x2 call: a 200-step run with the fast paths and one with the eager reference kernels, side by
# side (one GPU each, from FIRST_GPU, default 0; SAME_GPU=1: both on that one, for a single-H200 call), same
# 2-layer 20b-shaped random model and data; the curves must track.
# Writes $OUT/metrics-fast.jsonl, $OUT/metrics-eager.jsonl and prints the comparison.
source scripts/gpu/env.sh
LIMIT=${LIMIT:-170}
python3 -c "
from pathlib import Path
from gptoss_tune.bench.run import bench_config
from gptoss_tune.bench.scaling import write_bench_checkpoint
write_bench_checkpoint(bench_config('20b', 2), Path('/tmp/m2'), 0)" || exit 1
python3 -m gptoss_tune make-data --rows 2000 --seed 1 -o /tmp/d.jsonl --overwrite > /dev/null || exit 1
gpu=${FIRST_GPU:-0}  # this GPU and the next
for kernels in fast eager; do
  CUDA_VISIBLE_DEVICES=$gpu timeout "$LIMIT" python3 -m gptoss_tune train --model /tmp/m2 --data /tmp/d.jsonl \
    --output "/tmp/run-$kernels" --kernels "$kernels" --expert-storage bf16 --max-steps 200 \
    --tokens-per-batch 4096 --lr 1e-3 --warmup-ratio 0 --log-every 1 > "$OUT/train-$kernels.log" 2>&1 &
  [ "${SAME_GPU:-0}" = 1 ] || gpu=$((gpu + 1))
done
wait
for kernels in fast eager; do cp "/tmp/run-$kernels/metrics.jsonl" "$OUT/metrics-$kernels.jsonl" 2>/dev/null; done
python3 - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
def losses(kind):
    path = out / f"metrics-{kind}.jsonl"
    if not path.is_file():
        return []
    return [json.loads(l)["loss"] for l in path.read_text().splitlines() if '"train"' in l]
fast, eager = losses("fast"), losses("eager")
n = min(len(fast), len(eager))
print(f"steps: fast {len(fast)}, eager {len(eager)}")
if n:
    diffs = [abs(a - b) for a, b in zip(fast, eager)]
    for i in (0, 9, 49, 99, 149, 199):
        if i < n:
            print(f"step {i + 1}: fast {fast[i]:.4f} eager {eager[i]:.4f} diff {diffs[i]:.2e}")
    print(f"max |diff| {max(diffs[:n]):.3e}, mean |diff| {sum(diffs[:n]) / n:.3e}")
    tail = min(20, n)
    print(f"mean of the last {tail}: fast {sum(fast[n - tail:n]) / tail:.4f}, eager {sum(eager[n - tail:n]) / tail:.4f}")
PY
