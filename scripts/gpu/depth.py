"""Where a 24-layer step's time goes beyond the sum of its parts: forward + backward alone, then with
the optimizer (clip, fused AdamW, the loss read back as the bench does), the stacked q/k/v/o
projections against the separate calls on the same batch, then per-layer forward GPU time and each layer's routing balance (largest expert's rows over the mean).
A design measurement: `python3 scripts/gpu/depth.py [layers] [tokens] [1024|mt]` (mt: one of the
bench's Multilingual-Thinking-shaped micro-batches instead of 1024-token documents)."""

import itertools
import sys

import torch
from step_model import StepModel

from gptoss_tune.bench.data import bench_data
from gptoss_tune.kernels import StackedProjections
from gptoss_tune.model.gpt_oss import separate_projections

layers = int(sys.argv[1]) if len(sys.argv) > 1 else 24
tokens = int(sys.argv[2]) if len(sys.argv) > 2 else 16384
run = StepModel(layers, tokens)
if len(sys.argv) > 3 and sys.argv[3] == "mt":
    batch = next(itertools.islice(bench_data(tokens, 4).packed(), 1, None)).to("cuda")
    run.input_ids, run.position_ids = batch.input_ids, batch.position_ids
    starts = (batch.position_ids[0] == 0).nonzero().flatten().tolist() + [tokens]
    lengths = [b - a for a, b in zip(starts, starts[1:], strict=False)]
    pairs = sum(n * n for n in lengths) / (1024 * tokens)
    print(
        f"MT-shaped documents: {len(lengths)}, mean {tokens / len(lengths):.0f}, attention pairs x{pairs:.2f}"
    )
print(f"{layers} layers, {tokens} tokens: {run.milliseconds():.1f} ms per forward + backward")


print(
    f"with clip + fused AdamW + loss read back: {run.milliseconds(run.train_step, warmup=2):.1f} ms per step"
)
run.model.set_kernels(projections=separate_projections)  # the reference, for the same batch
print(f"separate projection calls: {run.milliseconds():.1f} ms per forward + backward")
run.model.set_kernels(projections=StackedProjections())
print(f"stacked projections again: {run.milliseconds():.1f} ms per forward + backward")

balance: dict[int, float] = {}
forward_ms: dict[int, list[float]] = {}


def watch(index: int, layer: torch.nn.Module) -> None:
    events: list[torch.cuda.Event] = []

    def on_route(module, inputs, output):
        counts = torch.bincount(output[0].flatten(), minlength=run.config.num_local_experts).float()
        balance[index] = (counts.max() / counts.mean()).item()

    def before(module, inputs):
        events[:] = [torch.cuda.Event(enable_timing=True)]
        events[0].record()

    def after(module, inputs, output):
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        end.synchronize()
        forward_ms.setdefault(index, []).append(events[0].elapsed_time(end))

    layer.mlp.router.register_forward_hook(on_route)
    layer.register_forward_pre_hook(before)
    layer.register_forward_hook(after)


for i, layer in enumerate(run.model.model.layers):
    watch(i, layer)
for _ in range(3):
    run.step()
print("layer type    ms (fwd, hooks syncing)  max/mean expert rows")
for index in sorted(forward_ms):
    ms = sorted(forward_ms[index])[len(forward_ms[index]) // 2]
    print(f"{index:3d} {run.config.layer_types[index][:7]:7s} {ms:7.2f} {balance[index]:5.2f}")
print(f"peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
