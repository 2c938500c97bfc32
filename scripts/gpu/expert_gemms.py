"""The four base expert GEMMs of a gpt-oss-20b layer at 16k tokens (top-4 of 32 experts: 65,536
sorted rows) with torch's grouped_mm (CUTLASS) against quack's variable-length GEMM (CuTe DSL, the
`quack-kernels` package that flash-attn-4 brings), which can also gather the token rows as it
loads them (`A_idx`) instead of a separate index_select:

    gate_up forward   tokens[rows] @ W_gate_up        [S, 2880] x [E, 2880, 5760]
    down forward      act @ W_down                     [S, 2880] x [E, 2880, 2880]
    down backward     grad_out[rows] @ W_down^T        [S, 2880] x [E, 2880, 2880]^T
    gate_up backward  grad_gate_up @ W_gate_up^T       [S, 5760] x [E, 2880, 5760]^T

For each, the time of torch's path (gather included where there is one) and of a few explicit
quack configurations (no autotuning: every configuration is a JIT compile), and each one's largest
difference from torch's result relative to its largest value.
A design measurement: `python3 scripts/gpu/expert_gemms.py [seconds]` (stops trying configurations
after that many seconds).
"""

import sys
import time

import torch
import torch.nn.functional as F
from step_model import cuda_milliseconds

TOKENS, HIDDEN, INTERMEDIATE, EXPERTS, TOP_K = 16384, 2880, 2880, 32, 4


def routing(generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(token of each sorted row [S] int64, cu_seqlens [E + 1] int32), skewed like a trained router."""
    popularity = torch.rand(EXPERTS, generator=generator, device="cuda") * 2
    logits = torch.randn(TOKENS, EXPERTS, generator=generator, device="cuda") + popularity
    experts = logits.topk(TOP_K, dim=-1).indices.flatten()
    order = torch.argsort(experts, stable=True)
    counts = torch.bincount(experts, minlength=EXPERTS)
    cu_seqlens = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(torch.int32)
    return order // TOP_K, cu_seqlens


def main() -> None:
    budget = float(sys.argv[1]) if len(sys.argv) > 1 else 240.0
    start = time.time()
    from quack.gemm_config import GemmConfig
    from quack.gemm_interface import gemm_tuned

    generator = torch.Generator("cuda").manual_seed(0)

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=generator, device="cuda") * scale).bfloat16()

    tokens_of_rows, cu_seqlens = routing(generator)
    rows = tokens_of_rows.numel()
    offsets = cu_seqlens[1:].contiguous()
    index = tokens_of_rows.to(torch.int32)
    tokens, grad_out = randn(TOKENS, HIDDEN), randn(TOKENS, HIDDEN)
    act, grad_gate_up = randn(rows, INTERMEDIATE), randn(rows, 2 * INTERMEDIATE)
    w_gate_up = randn(EXPERTS, HIDDEN, 2 * INTERMEDIATE, scale=HIDDEN**-0.5)
    w_down = randn(EXPERTS, INTERMEDIATE, HIDDEN, scale=INTERMEDIATE**-0.5)
    cases = {  # name: (A, A_idx or None, B (E, K, N), flops)
        "gate_up forward": (tokens, index, w_gate_up),
        "down forward": (act, None, w_down),
        "down backward": (grad_out, index, w_down.transpose(-2, -1)),
        "gate_up backward": (grad_gate_up, None, w_gate_up.transpose(-2, -1)),
    }
    configs = {
        "coop 256x128 c2x1": GemmConfig(tile_m=256, tile_n=128, pingpong=False, cluster_m=2, cluster_n=1,
                                        is_dynamic_persistent=False),
        "pingpong 128x192 c2x1": GemmConfig(tile_m=128, tile_n=192, pingpong=True, cluster_m=2, cluster_n=1,
                                            is_dynamic_persistent=False),
        "coop 256x192 c2x1": GemmConfig(tile_m=256, tile_n=192, pingpong=False, cluster_m=2, cluster_n=1,
                                        is_dynamic_persistent=False),
        "coop 128x256 c2x1": GemmConfig(tile_m=128, tile_n=256, pingpong=False, cluster_m=2, cluster_n=1,
                                        is_dynamic_persistent=False),
    }  # fmt: skip
    print("GEMM, implementation: ms, TFLOP/s, max |diff| / max |torch|", flush=True)
    for name, (a, a_idx, b) in cases.items():
        flops = 2 * rows * b.shape[1] * b.shape[2]

        def torch_path(a=a, a_idx=a_idx, b=b):
            rows_a = a.index_select(0, a_idx) if a_idx is not None else a
            return F.grouped_mm(rows_a, b, offs=offsets)

        want = torch_path()
        ms = cuda_milliseconds(torch_path)
        print(f"{name}, torch index_select + grouped_mm: {ms:.3f}, {flops / ms / 1e9:.0f}", flush=True)
        for config_name, config in configs.items():
            if time.time() - start > budget:
                print(f"{name}, {config_name}: skipped (time budget)", flush=True)
                continue
            out = torch.empty(rows, b.shape[2], dtype=torch.bfloat16, device="cuda")

            def quack_path(a=a, a_idx=a_idx, b=b, out=out, config=config):
                gemm_tuned.fn(a, b, out, cu_seqlens_m=cu_seqlens, A_idx=a_idx, config=config)
                return out

            try:
                compile_start = time.time()
                got = quack_path()
                torch.cuda.synchronize()
                compiled_in = time.time() - compile_start
                ms = cuda_milliseconds(quack_path)
                error = ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()
                print(
                    f"{name}, quack {config_name}: {ms:.3f}, {flops / ms / 1e9:.0f}, {error:.2e} "
                    f"(first call {compiled_in:.1f} s)",
                    flush=True,
                )
            except Exception as exc:  # noqa: BLE001 - a configuration the kernel rejects: report it
                print(
                    f"{name}, quack {config_name}: failed: {type(exc).__name__}: {str(exc)[:200]}", flush=True
                )


if __name__ == "__main__":
    main()
