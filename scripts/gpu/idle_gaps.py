"""Where the GPU waits during a whole training step (24-layer 20b shape, 16k tokens of one of the
bench's Multilingual-Thinking-shaped micro-batches, forward + backward + clip + fused AdamW + the
loss read back, as the bench's step): torch.profiler's trace of two steps, then every gap between
consecutive GPU kernels, summed, and the largest ones with the host op that launched the kernel
after the gap and how late that launch was (launched after the GPU went idle: the host was behind;
before: a dependency such as a copy or an event).
A design measurement: `python3 scripts/gpu/idle_gaps.py [layers] [tokens] [trace.json]`."""

import bisect
import itertools
import json
import sys
import tempfile
from collections import Counter
from pathlib import Path

import torch
from step_model import StepModel
from torch.profiler import ProfilerActivity, profile

from gptoss_tune.bench.data import bench_data

layers = int(sys.argv[1]) if len(sys.argv) > 1 else 24
tokens = int(sys.argv[2]) if len(sys.argv) > 2 else 16384
trace_path = sys.argv[3] if len(sys.argv) > 3 else str(Path(tempfile.gettempdir()) / "idle_gaps_trace.json")
run = StepModel(layers, tokens)
batch = next(itertools.islice(bench_data(tokens, 4).packed(), 1, None))


def train_step() -> None:
    micro = batch.to("cuda")  # the host-to-device copy of each step, as the bench makes it
    run.input_ids, run.position_ids, run.labels = micro.input_ids, micro.position_ids, micro.labels
    run.train_step()


for _ in range(3):
    train_step()
torch.cuda.synchronize()
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as profiler:
    for _ in range(2):
        train_step()
    torch.cuda.synchronize()
profiler.export_chrome_trace(trace_path)

with open(trace_path) as file:
    events = json.load(file)["traceEvents"]
kernels = sorted(
    (e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")), key=lambda e: e["ts"]
)
launches = {e["args"].get("correlation"): e for e in events if e.get("cat") == "cuda_runtime"}
host_ops = sorted((e for e in events if e.get("cat") == "cpu_op"), key=lambda e: e["ts"])
starts = [e["ts"] for e in host_ops]


def innermost_host_op(at: float) -> str:
    """The shortest host op that encloses time `at` (looks back over the last 200 starts)."""
    best = None
    for e in host_ops[max(0, bisect.bisect_right(starts, at) - 200) : bisect.bisect_right(starts, at)]:
        if e["ts"] <= at <= e["ts"] + e.get("dur", 0) and (best is None or e["dur"] < best["dur"]):
            best = e
    return best["name"] if best else "?"


span = kernels[-1]["ts"] + kernels[-1]["dur"] - kernels[0]["ts"]
busy = sum(k["dur"] for k in kernels)
gaps = []
for before, after in itertools.pairwise(kernels):
    gap = after["ts"] - (before["ts"] + before["dur"])
    if gap > 5:
        launch = launches.get(after["args"].get("correlation"))
        late = launch["ts"] - (before["ts"] + before["dur"]) if launch else float("nan")
        gaps.append((gap, late, after["name"][:60], innermost_host_op(launch["ts"]) if launch else "?"))
print(f"{layers} layers, {tokens} tokens, 2 steps: {span / 1e3:.1f} ms from first to last kernel, "
      f"{busy / 1e3:.1f} ms of kernels, {len(kernels)} kernels")  # fmt: skip
total_gap = sum(g for g, *_ in gaps)
host_behind = sum(g for g, late, *_ in gaps if late > 0)
print(f"idle in gaps > 5 us: {total_gap / 1e3:.1f} ms ({len(gaps)} gaps), of which {host_behind / 1e3:.1f} ms "
      "after a kernel the host launched only once the GPU was idle")  # fmt: skip
by_op = Counter()
for gap, _, _, op in gaps:
    by_op[op] += gap
print("idle time by the host op that launched the kernel after the gap (ms):")
for op, gap in by_op.most_common(25):
    print(f"  {gap / 1e3:7.2f}  {op}")
print("largest gaps: us, launch late by us, next kernel, host op")
for gap, late, name, op in sorted(gaps, reverse=True)[:25]:
    print(f"  {gap:8.0f} {late:8.0f}  {name:60s} {op}")
