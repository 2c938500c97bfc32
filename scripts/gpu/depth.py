"""Why a 24-layer step costs more per layer than a 2-layer one: per-layer forward GPU time and the
routing balance of each layer (largest expert's rows over the mean), for whole forward + backward
steps of a gpt-oss-20b-shaped model with random bf16 weights, LoRA r=8, our fast paths.
A design measurement: `python3 scripts/gpu/depth.py [layers] [tokens] [1024|mt]`."""

import itertools
import sys

import torch

from gptoss_tune.bench.data import bench_data
from gptoss_tune.bench.run import bench_config
from gptoss_tune.bench.weights import random_model
from gptoss_tune.kernels import enable_fast_paths
from gptoss_tune.model.lora import LoraOptions, adapters_to_fp32, apply_lora

layers = int(sys.argv[1]) if len(sys.argv) > 1 else 24
tokens = int(sys.argv[2]) if len(sys.argv) > 2 else 16384
config = bench_config("20b", layers)
model = random_model(config, "cuda", storage="bf16")
adapters_to_fp32(apply_lora(model, LoraOptions.from_strings(rank=8, alpha=16, targets="attn,experts")))
enable_fast_paths(model)
input_ids = torch.randint(0, config.vocab_size, (1, tokens), device="cuda")
position_ids = torch.arange(tokens, device="cuda").remainder(1024).unsqueeze(0)
if len(sys.argv) > 3 and sys.argv[3] == "mt":  # the bench's Multilingual-Thinking-shaped documents
    batch = next(itertools.islice(bench_data(tokens, 4).packed(), 1, None)).to("cuda")
    input_ids, position_ids = batch.input_ids, batch.position_ids
    starts = (position_ids[0] == 0).nonzero().flatten().tolist() + [position_ids.shape[1]]
    lengths = [b - a for a, b in zip(starts, starts[1:], strict=False)]
    print(
        f"MT-shaped documents: {len(lengths)}, mean {sum(lengths) / len(lengths):.0f}, "
        f"attention pairs / 1024-token documents' {sum(n * n for n in lengths) / (1024 * position_ids.shape[1]):.2f}"
    )

balance: dict[int, float] = {}
starts: dict[int, torch.cuda.Event] = {}
forward_ms: dict[int, list[float]] = {}
pending: list[tuple[int, torch.cuda.Event, torch.cuda.Event]] = []


def watch(index: int, layer: torch.nn.Module) -> None:
    def on_route(module, inputs, output):
        counts = torch.bincount(output[0].flatten(), minlength=config.num_local_experts).float()
        balance[index] = (counts.max() / counts.mean()).item()

    def before(module, inputs):
        starts[index] = torch.cuda.Event(enable_timing=True)
        starts[index].record()

    def after(module, inputs, output):
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        pending.append((index, starts[index], end))

    layer.mlp.router.register_forward_hook(on_route)
    layer.register_forward_pre_hook(before)
    layer.register_forward_hook(after)


def step() -> None:
    with torch.autocast("cuda", dtype=torch.bfloat16):
        total, count = model.loss(input_ids, input_ids, position_ids)
    (total / count).backward()


for _ in range(3):
    step()
torch.cuda.synchronize()
start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
start.record()
for _ in range(3):
    step()
end.record()
torch.cuda.synchronize()
print(f"{layers} layers, {tokens} tokens: {start.elapsed_time(end) / 3:.1f} ms per forward + backward")
params = [p for p in model.parameters() if p.requires_grad]
optimizer = torch.optim.AdamW(params, lr=1e-4, fused=True)


def train_step() -> float:  # as the bench's recipes: clip at 1.0, fused AdamW, the loss read back
    with torch.autocast("cuda", dtype=torch.bfloat16):
        total, count = model.loss(input_ids, input_ids, position_ids)
    loss = total / count
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss)


for _ in range(2):
    train_step()
torch.cuda.synchronize()
start.record()
for _ in range(3):
    train_step()
end.record()
torch.cuda.synchronize()
print(f"with clip + fused AdamW + loss read back: {start.elapsed_time(end) / 3:.1f} ms per step")
for i, layer in enumerate(model.model.layers):
    watch(i, layer)
for _ in range(3):
    step()
torch.cuda.synchronize()
for index, a, b in pending:
    forward_ms.setdefault(index, []).append(a.elapsed_time(b))
print("layer type ms(fwd, incl. hook sync) max/mean expert rows")
for index in sorted(forward_ms):
    ms = sorted(forward_ms[index])[len(forward_ms[index]) // 2]
    print(f"{index:3d} {config.layer_types[index][:7]:7s} {ms:7.2f} {balance[index]:5.2f}")
print(
    f"peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB, reserved {torch.cuda.max_memory_reserved() / 2**30:.1f}"
)
