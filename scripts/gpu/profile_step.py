"""torch.profiler's kernel table of whole training steps (forward + backward, no optimizer) of a
gpt-oss-20b-shaped model cut to a few layers, random bf16 weights, LoRA r=8 on attention and
experts, our fast paths, one packed micro-batch of 1024-token documents. Where "the rest" of a step
goes (projections, norms, router, residuals) next to the experts, attention and loss.
A design measurement: `python3 scripts/gpu/profile_step.py [layers] [tokens] [output.txt]`."""

import sys

import torch
from torch.profiler import ProfilerActivity, profile

from gptoss_tune.bench.run import bench_config
from gptoss_tune.bench.weights import random_model
from gptoss_tune.kernels import enable_fast_paths
from gptoss_tune.model.lora import LoraOptions, adapters_to_fp32, apply_lora

layers = int(sys.argv[1]) if len(sys.argv) > 1 else 2
tokens = int(sys.argv[2]) if len(sys.argv) > 2 else 16384
config = bench_config("20b", layers)
model = random_model(config, "cuda", storage="bf16")
adapters_to_fp32(apply_lora(model, LoraOptions.from_strings(rank=8, alpha=16, targets="attn,experts")))
enable_fast_paths(model)
input_ids = torch.randint(0, config.vocab_size, (1, tokens), device="cuda")
position_ids = torch.arange(tokens, device="cuda").remainder(1024).unsqueeze(0)


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
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as profiler:
    step()
    torch.cuda.synchronize()
table = profiler.key_averages().table(sort_by="self_cuda_time_total", row_limit=45, max_name_column_width=70)
by_shape = profiler.key_averages(group_by_input_shape=True).table(
    sort_by="self_cuda_time_total", row_limit=80, max_name_column_width=40, max_shapes_column_width=90
)
if len(sys.argv) > 3:
    with open(sys.argv[3], "w") as file:
        file.write(table)
    with open(sys.argv[3] + ".shapes", "w") as file:
        file.write(by_shape)
print(table)
