"""One gpt-oss-20b expert layer at 16k tokens (top-4 of 32, skewed routing), LoRA r=8, forward +
backward on quack's GEMMs: the gate_up epilogue (bias, LoRA term, SwiGLU) as a Triton pass
(`--expert-gemm quack`) vs inside the gate_up GEMM (`kernels.quack_moe`, `--expert-gemm quack-fused`).
Prints each path's time, and how far the fused path's output and gradients are from the Triton
path's (relative to their largest value); then the fused GEMM alone under a few quack
configurations, beside what it replaces.

A design measurement: `python3 scripts/gpu/fused_epilogues.py`.
"""

import time

import torch
from expert_gemms import TOKENS
from fused_accuracy import layer
from step_model import cuda_milliseconds

from gptoss_tune.kernels import ExpertGemm, GroupedExperts
from gptoss_tune.kernels.grouped_gemm import quack, quack_moe
from gptoss_tune.kernels.moe import LowRank, sort_by_expert
from gptoss_tune.model.gpt_oss import Experts


def inputs(hidden_size: int):
    """(hidden [N, H], expert indices [N, 4] skewed like a trained router, routing weights, dL/d out)."""
    generator = torch.Generator("cuda").manual_seed(1)
    popularity = torch.rand(32, generator=generator, device="cuda") * 2
    logits = torch.randn(TOKENS, 32, generator=generator, device="cuda") + popularity
    indices = logits.topk(4, dim=-1).indices
    weights = torch.softmax(torch.randn(TOKENS, 4, generator=generator, device="cuda"), -1).bfloat16()
    hidden = torch.randn(TOKENS, hidden_size, generator=generator, device="cuda").bfloat16()
    grad = torch.randn(TOKENS, hidden_size, generator=generator, device="cuda").bfloat16()
    return hidden, indices, weights, grad


def sweep_configs(experts: Experts, hidden: torch.Tensor, indices: torch.Tensor) -> None:
    """The fused gate_up GEMM alone under a few configurations (each one a JIT compile), beside what
    it replaces (quack's plain GEMM + the Triton epilogue) and the thin grouped GEMM of its addend."""
    from gptoss_tune.kernels import moe_triton
    from gptoss_tune.kernels.grouped_gemm import grouped_mm

    fused, config_type = quack_moe(), quack().GemmConfig
    routing = sort_by_expert(indices, 32)
    rows = routing.tokens.numel()
    generator = torch.Generator("cuda").manual_seed(2)
    gate_up_w, bias = experts.gate_up_weight(), experts.gate_up_proj_bias
    low_rank_in = torch.randn(rows, 8, generator=generator, device="cuda").bfloat16()
    factor_b = (torch.randn(32, 8, gate_up_w.shape[-1], generator=generator, device="cuda") * 0.02).bfloat16()
    gemm = ExpertGemm("quack")
    low_rank = LowRank(low_rank_in, factor_b, routing.experts, routing.offsets)
    addend = grouped_mm(low_rank_in, factor_b, routing.offsets)

    def before_gate_up():
        base = gemm(hidden, gate_up_w, routing.offsets, routing.cu_seqlens, routing.tokens_int32)
        return moe_triton.gate_up_epilogue(
            base, bias, routing.experts, low_rank, 2.0, experts.alpha, experts.limit
        )

    for label, call in (
        ("before: gate_up GEMM + Triton epilogue (LoRA in registers)", before_gate_up),
        (
            "addend: thin grouped GEMM [S, 8] x [E, 8, 2I]",
            lambda: grouped_mm(low_rank_in, factor_b, routing.offsets),
        ),
    ):
        print(f"{label}: {cuda_milliseconds(call, warmup=2, repeats=20):.3f} ms", flush=True)
    configs = {
        "128x192 pingpong": dict(tile_m=128, tile_n=192, pingpong=True),
        "128x128 pingpong": dict(tile_m=128, tile_n=128, pingpong=True),
    }
    for name, options in configs.items():
        config = config_type(**options, cluster_m=2, cluster_n=1, is_dynamic_persistent=False)
        cases = [
            ("gate_up forward + addend", lambda c=config: fused.gate_up_swiglu(
                hidden, routing.tokens_int32, gate_up_w, bias, routing.cu_seqlens, addend,
                experts.alpha, experts.limit, c)),
        ]  # fmt: skip
        if name.startswith("128x192"):
            cases.append(("gate_up forward, no addend", lambda c=config: fused.gate_up_swiglu(
                hidden, routing.tokens_int32, gate_up_w, bias, routing.cu_seqlens, None,
                experts.alpha, experts.limit, c)))  # fmt: skip
        for label, call in cases:
            try:
                print(f"{label}, {name}: {cuda_milliseconds(call, warmup=2, repeats=20):.3f} ms", flush=True)
            except Exception as error:  # noqa: BLE001 - a configuration quack rejects
                print(f"{label}, {name}: failed: {type(error).__name__}: {str(error)[:300]}", flush=True)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()


def main() -> None:
    assert quack() is not None and quack_moe() is not None, "needs quack-kernels with the epilogue frontend"
    experts = layer(0)  # random bf16 weights, LoRA r=8 with non-zero B
    hidden, indices, weights, grad = inputs(experts.down_proj_bias.shape[-1])
    results = {}
    for name, fuse in (("triton epilogues", False), ("fused", True)):
        fn = GroupedExperts(compile=True, gemm=ExpertGemm("quack-fused" if fuse else "quack"))
        leaves = [hidden.clone().requires_grad_(True), weights.clone().requires_grad_(True)]
        adapters = [experts.gate_up_lora.lora_A, experts.gate_up_lora.lora_B]
        adapters += [experts.down_lora.lora_A, experts.down_lora.lora_B]

        def step(fn=fn, leaves=leaves, adapters=adapters):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = fn(experts, leaves[0], indices, leaves[1])
            return out, torch.autograd.grad(out, [*leaves, *adapters], grad)

        start = time.time()
        results[name] = step()
        torch.cuda.synchronize()
        print(f"{name}: first call {time.time() - start:.1f} s", flush=True)
        print(
            f"{name}: forward + backward {cuda_milliseconds(step, warmup=3, repeats=20):.3f} ms", flush=True
        )
    (want, want_grads), (got, got_grads) = results["triton epilogues"], results["fused"]
    print(f"output: {relative(got, want):.2e}")
    names = ("hidden", "routing weights", "gate_up A", "gate_up B", "down A", "down B")
    for name, g, w in zip(names, got_grads, want_grads, strict=True):
        print(f"{name}: {relative(g, w):.2e}")
    sweep_configs(experts, hidden, indices)


if __name__ == "__main__":
    main()
