"""What one experts forward keeps for backward, per GEMM backend, with and without the gate_up
recomputation: every tensor autograd saves (shape, dtype, bytes) and the allocator's count.
Run on an H100/H200: python3 scripts/gpu/saved_bytes.py"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests" / "gpu"))
from test_fast_paths import experts_on_cuda  # noqa: E402

from gptoss_tune.kernels.moe import ExpertGemm, GroupedExperts  # noqa: E402

experts = experts_on_cuda(torch.bfloat16, 2880, 2880, 32, 8)
tokens = 2000
generator = torch.Generator(device="cuda").manual_seed(6)
indices = torch.randint(0, 30, (tokens, 4), generator=generator, device="cuda")
weights = torch.softmax(torch.randn(tokens, 4, generator=generator, device="cuda"), -1).bfloat16()
hidden = torch.randn(tokens, 2880, generator=generator, device="cuda").bfloat16()
for backend in ("torch", "quack", "quack-fused"):
    grouped = GroupedExperts(compile=True, gemm=ExpertGemm(backend))
    for recompute in (False, True):
        experts.recompute_gate_up = recompute
        leaves = [hidden.clone().requires_grad_(True), weights.clone().requires_grad_(True)]
        grouped(experts, *leaves[:1], indices, leaves[1]).sum().backward()  # warm-up
        saved = []

        def pack(t, saved=saved):
            saved.append((tuple(t.shape), str(t.dtype), t.numel() * t.element_size(), t.data_ptr()))
            return t

        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = grouped(experts, leaves[0], indices, leaves[1])
        torch.cuda.synchronize()
        kept = torch.cuda.memory_allocated() - before - out.numel() * out.element_size()
        print(f"{backend} recompute={recompute}: allocator {kept / 1e6:.2f} MB; saved:")
        for shape, dtype, size, ptr in saved:
            print(f"   {shape} {dtype} {size / 1e6:.3f} MB ptr {ptr % 10**7}")
        del out
