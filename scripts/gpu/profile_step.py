"""torch.profiler's kernel table of whole training steps (forward + backward, no optimizer) of a
gpt-oss-20b-shaped model cut to a few layers, random bf16 weights, LoRA r=8 on attention and
experts, our fast paths, one packed micro-batch of 1024-token documents. Where "the rest" of a step
goes (projections, norms, router, residuals) next to the experts, attention and loss.
A design measurement: `python3 scripts/gpu/profile_step.py [layers] [tokens] [output.txt]`."""

import sys

import torch
from step_model import StepModel
from torch.profiler import ProfilerActivity, profile

layers = int(sys.argv[1]) if len(sys.argv) > 1 else 2
tokens = int(sys.argv[2]) if len(sys.argv) > 2 else 16384
run = StepModel(layers, tokens)
print(f"{layers} layers, {tokens} tokens: {run.milliseconds():.1f} ms per forward + backward")
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as profiler:
    run.step()
    torch.cuda.synchronize()
table = profiler.key_averages().table(sort_by="self_cuda_time_total", row_limit=70, max_name_column_width=70)
by_shape = profiler.key_averages(group_by_input_shape=True).table(
    sort_by="self_cuda_time_total", row_limit=80, max_name_column_width=40, max_shapes_column_width=90
)
if len(sys.argv) > 3:
    with open(sys.argv[3], "w") as file:
        file.write(table)
    with open(sys.argv[3] + ".shapes", "w") as file:
        file.write(by_shape)
print(table)
