"""The fused gate_up epilogue's accuracy over several random adapters: for each seed, the expert
layer's output and gradients by grouped_mm, by quack with the Triton epilogue and by quack with the
fused one, each one's largest error relative to the fp32 eager loop's largest value (gpt-oss-20b's
expert shape, 2,048 tokens, 30 of 32 experts used, LoRA r=8), and whether a second run of each on
the same inputs is bit-identical (a race would show there). A design measurement:
`python3 scripts/gpu/fused_accuracy.py [seeds]`."""

import copy
import sys

import torch

from gptoss_tune.kernels import ExpertGemm, GroupedExperts
from gptoss_tune.model.gpt_oss import Experts, eager_experts
from gptoss_tune.model.lora import ExpertLora
from gptoss_tune.model.presets import preset_config

NAMES = ("output", "hidden", "routing weights", "gate_up A", "gate_up B", "down A", "down B")


def layer(seed: int) -> Experts:
    config = preset_config("20b")
    generator = torch.Generator("cuda").manual_seed(seed)
    with torch.device("cuda"):
        experts = Experts(config)
        with torch.no_grad():
            for param in experts.parameters():
                param.copy_(0.05 * torch.randn(param.shape, generator=generator, device="cuda"))
        experts.bfloat16().requires_grad_(False)
    cpu = torch.Generator().manual_seed(seed)  # adapters drawn on the CPU, then moved
    experts.gate_up_lora = ExpertLora(experts.weight_shape("gate_up_proj"), 8, 2.0, generator=cpu).cuda()
    experts.down_lora = ExpertLora(experts.weight_shape("down_proj"), 8, 2.0, generator=cpu).cuda()
    with torch.no_grad():
        for module in (experts.gate_up_lora, experts.down_lora):
            module.lora_B.copy_(0.05 * torch.randn(module.lora_B.shape, generator=generator, device="cuda"))
    return experts


def run(fn, experts, hidden, indices, weights, grad, dtype):
    leaves = [hidden.detach().to(dtype).requires_grad_(True), weights.detach().to(dtype).requires_grad_(True)]
    adapters = [experts.gate_up_lora.lora_A, experts.gate_up_lora.lora_B]
    adapters += [experts.down_lora.lora_A, experts.down_lora.lora_B]
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        out = fn(experts, leaves[0], indices, leaves[1])
    return [out, *torch.autograd.grad(out, [*leaves, *adapters], grad.to(out.dtype))]


def error(got, want) -> float:
    return ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()


def main() -> None:
    seeds = int(sys.argv[1]) if len(sys.argv) > 1 else 4
    for seed in range(seeds):
        experts = layer(seed)
        generator = torch.Generator("cuda").manual_seed(100 + seed)
        indices = torch.randint(0, 30, (2048, 4), generator=generator, device="cuda")
        weights = torch.softmax(torch.randn(2048, 4, generator=generator, device="cuda"), -1).bfloat16()
        hidden = torch.randn(2048, 2880, generator=generator, device="cuda").bfloat16()
        grad = torch.randn(2048, 2880, generator=generator, device="cuda")
        truth = run(
            eager_experts, copy.deepcopy(experts).float(), hidden, indices, weights, grad, torch.float32
        )
        for backend in ("torch", "quack", "quack-fused"):
            fn = GroupedExperts(compile=True, gemm=ExpertGemm(backend))
            got = run(fn, experts, hidden, indices, weights, grad, torch.bfloat16)
            again = run(fn, experts, hidden, indices, weights, grad, torch.bfloat16)
            same = all(torch.equal(a, b) for a, b in zip(got, again, strict=True))
            errors = ", ".join(f"{n} {error(g, t):.2e}" for n, g, t in zip(NAMES, got, truth, strict=True))
            print(f"seed {seed} {backend:11s} repeatable {same}: {errors}", flush=True)


if __name__ == "__main__":
    main()
