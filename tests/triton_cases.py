"""The Triton kernels (gptoss_tune.kernels.moe_triton, loss_triton) against their references, on
random inputs. Run on CUDA by tests/gpu, and on the CPU by tests/test_triton_interpreted.py under
Triton's interpreter (TRITON_INTERPRET=1, in a subprocess: the variable must be set before the
kernels are defined): `python tests/triton_cases.py` runs every case on the CPU, small sizes."""

from __future__ import annotations

import torch

from gptoss_tune.kernels import loss, loss_triton, moe, moe_triton
from test_kernels import BF16_TOLERANCE, relative_error


def assert_close_to_reference(actual, expected) -> None:
    """Both compute in fp32 and round once (the references also round the low-rank product to bf16
    first): within 1% of the largest value."""
    for got, want in zip(actual, expected, strict=True):
        assert got.dtype == want.dtype and got.shape == want.shape
        if want.numel():
            assert relative_error(got, want) <= 1e-2


def epilogue_inputs(device: torch.device, rows: int, inner: int, num_experts: int = 5, rank: int = 8):
    """Sorted rows' base gate_up (some on the clamp bounds), biases, the rows' experts, a gate_up and
    a down low-rank term, the activation's gradient and the routing weights."""
    generator = torch.Generator(device=device).manual_seed(3)

    def randn(*shape: int, scale: float = 4.0) -> torch.Tensor:
        return (scale * torch.randn(*shape, generator=generator, device=device)).bfloat16()

    gate_up = randn(rows, 2 * inner)
    if rows:
        gate_up[0, :6] = torch.tensor([7.0, 7.0, -7.0, -7.0, 7.0, -7.0])
    experts = torch.randint(0, num_experts, (rows,), generator=generator, device=device).sort().values
    bounds = torch.arange(num_experts, device=device)
    offsets = torch.searchsorted(experts, bounds, right=True).to(torch.int32)
    update = moe.LowRank(
        randn(rows, rank, scale=1), randn(num_experts, rank, 2 * inner, scale=0.3), experts, offsets
    )
    down_a = randn(num_experts, inner, rank, scale=0.3)  # the down LoRA's A', used transposed
    grad_low_rank = moe.LowRank(randn(rows, rank, scale=1), down_a.transpose(-2, -1), experts, offsets)
    bias, grad, weights = randn(num_experts, 2 * inner), randn(rows, inner), randn(rows)
    return gate_up, bias, experts, update, grad_low_rank, grad, weights


def check_expert_epilogues(device: torch.device, rows: int, inner: int, with_low_rank: bool) -> None:
    base, bias, experts, update, grad_low_rank, grad, weights = epilogue_inputs(device, rows, inner)
    update = update if with_low_rank else None
    grad_low_rank = grad_low_rank if with_low_rank else None
    gate_up, act = moe_triton.gate_up_epilogue(base, bias, experts, update, 2.0, 1.702, 7.0)
    expected = moe.gate_up_epilogue(base, bias, experts, update, 2.0, 1.702, 7.0)
    assert_close_to_reference([gate_up], expected[:1])
    # the activation is that of the stored gate_up (which backward recomputes), to a bf16 ulp or two
    own_activation = moe.clamped_swiglu(gate_up.float(), 1.702, 7.0).bfloat16()
    torch.testing.assert_close(act, own_activation, rtol=1.6e-2, atol=1e-5)
    assert_close_to_reference(
        moe_triton.activation_backward_epilogue(gate_up, grad, grad_low_rank, weights, 1.702, 7.0),
        moe.activation_backward_epilogue(gate_up, grad, grad_low_rank, weights, 1.702, 7.0),
    )


def check_token_sums(device: torch.device, tokens: int, top_k: int, width: int) -> None:
    generator = torch.Generator(device=device).manual_seed(6)
    indices = torch.rand(tokens, 8, generator=generator, device=device).argsort(-1)[:, :top_k]
    routing = moe.sort_by_expert(indices, 8)
    rows = torch.randn(tokens * top_k, width, generator=generator, device=device).bfloat16()
    bias = torch.randn(8, width, generator=generator, device=device).bfloat16()
    weights = torch.rand(tokens * top_k, generator=generator, device=device).bfloat16()
    args = (rows, bias, routing.experts, weights, routing.inverse, top_k)
    torch.testing.assert_close(
        moe_triton.down_epilogue(*args), moe.down_epilogue(*args), rtol=1e-5, atol=1e-5
    )
    torch.testing.assert_close(
        moe_triton.sum_slots(rows, routing.inverse, top_k), moe.sum_slots(rows, routing.inverse, top_k)
    )
    # The per-token addend (the LoRA term) and the rounding to the caller's dtype, done once.
    addend = torch.randn(tokens, width, generator=generator, device=device).bfloat16()
    for out_dtype in (torch.bfloat16, torch.float32):
        for_down = (*args, addend, out_dtype)
        actual, expected = moe_triton.down_epilogue(*for_down), moe.down_epilogue(*for_down)
        assert actual.dtype == expected.dtype == out_dtype
        tolerance = {"rtol": 1e-5, "atol": 1e-5} if out_dtype == torch.float32 else {}
        torch.testing.assert_close(actual, expected, **tolerance)
        for_sum = (rows, routing.inverse, top_k, addend, out_dtype)
        actual, expected = moe_triton.sum_slots(*for_sum), moe.sum_slots(*for_sum)
        assert actual.dtype == expected.dtype == out_dtype
        torch.testing.assert_close(actual, expected)


def check_loss_chunk(device: torch.device, rows: int, vocab: int) -> None:
    generator = torch.Generator(device=device).manual_seed(4)
    logits = (8 * torch.randn(rows, vocab, generator=generator, device=device)).bfloat16()
    targets = torch.randint(0, vocab, (rows,), generator=generator, device=device)
    if rows:
        targets[:2] = torch.tensor([0, vocab - 1])  # the first and last columns
    expected_loss, expected_grad = loss.cross_entropy_sum_and_grad(logits.clone(), targets)
    actual_loss, actual_grad = loss_triton.cross_entropy_sum_and_grad(logits.clone(), targets)
    assert actual_grad.dtype == torch.bfloat16 and actual_grad.shape == expected_grad.shape
    torch.testing.assert_close(actual_loss, expected_loss, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(actual_grad, expected_grad, rtol=1e-2, atol=1e-6)


def check_grouped_experts_on_cpu(tokens: int, hidden: int, inner: int) -> None:
    """The whole experts function with the Triton epilogues (interpreted) against the eager loop,
    bf16, with the gradients of the tokens, the routing weights and all four adapter factors. On
    CUDA, tests/gpu checks the same through `GroupedExperts(compile=True)`."""
    from gptoss_tune.model.gpt_oss import eager_experts
    from test_kernels import experts_outputs_and_grads, experts_with_adapters, routing_inputs

    experts = experts_with_adapters(hidden=hidden, inner=inner)
    experts.to(torch.bfloat16)
    for adapter in (experts.gate_up_lora, experts.down_lora):
        adapter.float()  # fp32 adapters, as the trainer keeps them
    states, indices, weights = routing_inputs(tokens, experts.num_experts, 2, hidden)
    states = states.detach().bfloat16().requires_grad_(True)
    weights = weights.detach().bfloat16().requires_grad_(True)
    grouped = moe.GroupedExperts(epilogues=moe.Epilogues.triton(moe.Epilogues()))
    actual, actual_grads = experts_outputs_and_grads(
        grouped, experts, states, indices, weights, torch.bfloat16
    )
    expected, expected_grads = experts_outputs_and_grads(
        eager_experts, experts, states, indices, weights, torch.bfloat16
    )
    assert relative_error(actual, expected) <= BF16_TOLERANCE
    for got, want in zip(actual_grads, expected_grads, strict=True):
        assert relative_error(got, want) <= BF16_TOLERANCE
    experts.recompute_gate_up = True  # backward runs the gate_up forward again: the same numbers
    again, again_grads = experts_outputs_and_grads(grouped, experts, states, indices, weights, torch.bfloat16)
    assert torch.equal(again, actual)
    for got, want in zip(again_grads, actual_grads, strict=True):
        assert torch.equal(got, want)


def run_all_on_cpu() -> None:
    cpu = torch.device("cpu")
    for with_low_rank in (True, False):
        for rows, inner in ((37, 72), (130, 200), (0, 72)):
            check_expert_epilogues(cpu, rows, inner, with_low_rank)
    for tokens, top_k, width in ((100, 4, 300), (3, 2, 64), (0, 4, 64)):
        check_token_sums(cpu, tokens, top_k, width)
    for rows, vocab in ((5, 5000), (0, 1000)):  # 5000: two column blocks, the second partial
        check_loss_chunk(cpu, rows, vocab)
    check_grouped_experts_on_cpu(tokens=50, hidden=64, inner=72)
    print("all Triton kernels match their references")


if __name__ == "__main__":
    run_all_on_cpu()
