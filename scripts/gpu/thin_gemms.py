"""The experts' thin LoRA GEMMs of one gpt-oss-20b layer at 16k tokens (65,536 sorted rows, top-4
of 32 experts, rank 8) with torch's grouped_mm (CUTLASS) against quack's variable-length GEMM:

    gate_up addend      s (x A_e) [S, 8] x B_e [E, 8, 5760]                      varlen M, K = 8
    down low-rank in    act [S, 2880] x A'_e [E, 2880, 8]                        varlen M, N = 8
    gate_up grad in     dG [S, 5760] x B_e^T [E, 5760, 8]                        varlen M, N = 8
    gate_up grad B      (x A_e)^T [8, S] x dG [S, 5760] -> [E, 8, 5760]          varlen K
    down grad A'        act^T [2880, S] x d(act A') [S, 8] -> [E, 2880, 8]       varlen K

For each, torch's time, then quack's with a few explicit configurations (each a JIT compile), and
each one's largest difference from torch's result relative to its largest value.
A design measurement: `python3 scripts/gpu/thin_gemms.py [seconds]`."""

import sys
import time

import torch
import torch.nn.functional as F
from expert_gemms import routing
from step_model import cuda_milliseconds

TOKENS, HIDDEN, INTERMEDIATE, EXPERTS, RANK = 16384, 2880, 2880, 32, 8


def main() -> None:
    budget = float(sys.argv[1]) if len(sys.argv) > 1 else 150.0
    start = time.time()
    from quack.gemm_config import GemmConfig
    from quack.gemm_interface import gemm_tuned

    generator = torch.Generator("cuda").manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, device="cuda").bfloat16()

    _, cu_seqlens = routing(generator)
    offsets = cu_seqlens[1:].contiguous()
    rows = int(cu_seqlens[-1])
    low_rank, act, grad_gate_up = randn(rows, RANK), randn(rows, INTERMEDIATE), randn(rows, 2 * INTERMEDIATE)
    lora_b, lora_a = randn(EXPERTS, RANK, 2 * INTERMEDIATE), randn(EXPERTS, INTERMEDIATE, RANK)
    grad_low_rank = randn(rows, RANK)
    # name: (A, B, output shape, varlen: "m" or "k")
    cases = {
        "gate_up addend": (low_rank, lora_b, (rows, 2 * INTERMEDIATE), "m"),
        "down low-rank in": (act, lora_a, (rows, RANK), "m"),
        "gate_up grad in": (grad_gate_up, lora_b.transpose(-2, -1), (rows, RANK), "m"),
        "gate_up grad B": (low_rank.t(), grad_gate_up, (EXPERTS, RANK, 2 * INTERMEDIATE), "k"),
        "down grad A'": (act.t(), grad_low_rank, (EXPERTS, INTERMEDIATE, RANK), "k"),
    }

    def config(m: int, n: int, pingpong: bool, cluster_m: int = 1, swap: bool = False) -> GemmConfig:
        return GemmConfig(tile_m=m, tile_n=n, pingpong=pingpong, cluster_m=cluster_m, cluster_n=1,
                          swap_ab=swap, is_dynamic_persistent=False)  # fmt: skip

    configs = {
        "pingpong 128x64": config(128, 64, True),
        "coop 256x64": config(256, 64, False),
        "pingpong 128x128": config(128, 128, True),
        "coop 128x128 swap": config(128, 128, False, swap=True),
        "pingpong 128x192 c2": config(128, 192, True, 2),
    }
    print("GEMM, implementation: ms, GB/s of its operands, max |diff| / max |torch|", flush=True)
    for name, (a, b, shape, varlen) in cases.items():
        moved = sum(t.numel() * t.element_size() for t in (a, b)) + 2 * torch.Size(shape).numel()

        def torch_path(a=a, b=b):
            return F.grouped_mm(a, b, offs=offsets)

        want = torch_path()
        ms = cuda_milliseconds(torch_path)
        print(f"{name}, torch grouped_mm: {ms:.3f}, {moved / ms / 1e6:.0f}", flush=True)
        for config_name, chosen in configs.items():
            if time.time() - start > budget:
                print(f"{name}, {config_name}: skipped (time budget)", flush=True)
                continue
            out = torch.empty(shape, dtype=torch.bfloat16, device="cuda")
            lengths = {"cu_seqlens_m": cu_seqlens} if varlen == "m" else {"cu_seqlens_k": cu_seqlens}

            def quack_path(a=a, b=b, out=out, chosen=chosen, lengths=lengths):
                gemm_tuned.fn(a, b, out, config=chosen, **lengths)
                return out

            try:
                compile_start = time.time()
                got = quack_path()
                torch.cuda.synchronize()
                compiled_in = time.time() - compile_start
                ms = cuda_milliseconds(quack_path)
                error = ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()
                print(
                    f"{name}, quack {config_name}: {ms:.3f}, {moved / ms / 1e6:.0f}, {error:.2e} "
                    f"(first call {compiled_in:.1f} s)",
                    flush=True,
                )
            except Exception as exc:  # noqa: BLE001 - a configuration the kernel rejects: report it
                print(
                    f"{name}, quack {config_name}: failed: {type(exc).__name__}: {str(exc)[:160]}", flush=True
                )


if __name__ == "__main__":
    main()
