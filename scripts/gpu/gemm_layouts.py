"""The experts' four base grouped GEMMs of one 20b layer at 16k tokens (65,536 sorted rows), with
the weights stored [E, in, out] (our layout, transformers') or [E, out, in], balanced and skewed
routing: which layout each GEMM wants. A design measurement: `python3 scripts/gpu/gemm_layouts.py`."""

import torch
from step_model import cuda_milliseconds

from gptoss_tune.kernels.moe import grouped_mm

E, H, INNER, ROWS = 32, 2880, 2880, 65536
torch.manual_seed(0)


def offsets_for(weights: torch.Tensor) -> torch.Tensor:
    counts = torch.distributions.Multinomial(ROWS, weights).sample().long()
    counts = (counts // 8) * 8  # grouped_mm wants no alignment here, but keep sizes comparable
    counts[-1] += ROWS - counts.sum()
    return torch.cumsum(counts, 0).to(torch.int32).cuda()


routings = {
    "balanced": offsets_for(torch.ones(E)),
    "skewed": offsets_for(torch.distributions.Dirichlet(torch.full((E,), 2.0)).sample()),
}
for name, offsets in routings.items():
    counts = torch.diff(offsets, prepend=offsets.new_zeros(1)).float()
    print(f"routing {name}: max/mean rows {(counts.max() / counts.mean()).item():.2f}")
cases = {  # name: (rows' width, weight [E, K, N] shape)
    "gate_up forward": (H, (E, H, 2 * INNER)),
    "gate_up dgrad": (2 * INNER, (E, 2 * INNER, H)),
    "down forward": (INNER, (E, INNER, H)),
    "down dgrad": (H, (E, H, INNER)),
}
print(
    f"{'GEMM':16s} {'routing':9s} {'[E,K,N] ms':>10s} {'TFLOP/s':>8s} {'[E,N,K].mT ms':>13s} {'TFLOP/s':>8s}"
)
for case, (width, shape) in cases.items():
    rows = torch.randn(ROWS, width, device="cuda", dtype=torch.bfloat16)
    kn = torch.randn(shape, device="cuda", dtype=torch.bfloat16) * 0.02
    nk = kn.transpose(-2, -1).contiguous().transpose(-2, -1)
    flop = 2 * ROWS * shape[1] * shape[2]
    for routing, offsets in routings.items():
        a = cuda_milliseconds(grouped_mm, rows, kn, offsets)
        b = cuda_milliseconds(grouped_mm, rows, nk, offsets)
        print(f"{case:16s} {routing:9s} {a:10.3f} {flop / a / 1e9:8.0f} {b:13.3f} {flop / b / 1e9:8.0f}")
    dense = torch.randn(shape[1], shape[2], device="cuda", dtype=torch.bfloat16)
    d = cuda_milliseconds(torch.matmul, rows, dense)
    print(f"{case:16s} {'dense mm':9s} {d:10.3f} {flop / d / 1e9:8.0f}")
