"""The fast paths on CUDA, compiled, against the eager references (bf16 and fp32).

Run on the GPU machine: `python3 -m pytest tests/gpu -q`. Shapes are gpt-oss's attention shape
(64 query heads, 8 key/value heads, head_dim 64) at 1,024 tokens throughout, so the compiled
FlexAttention kernels are built once per dtype and mask type and shared by the tests.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import triton_cases
from gptoss_tune.kernels import (
    ExpertGemm,
    FlashAttention,
    FlexAttention,
    FusedLinearCrossEntropy,
    GroupedExperts,
    enable_fast_paths,
    make_attention,
)
from gptoss_tune.kernels.attention import kernel_options_for
from gptoss_tune.kernels.grouped_gemm import quack, quack_moe
from gptoss_tune.kernels.memory import (
    RecomputePlan,
    auto_budget_bytes,
    measure_layer_memory,
    measure_loss_memory,
    plan_activation_checkpointing,
)
from gptoss_tune.kernels.moe import sort_by_expert
from gptoss_tune.kernels.projections import StackedProjections
from gptoss_tune.model.gpt_oss import (
    IGNORE_INDEX,
    Experts,
    GptOss,
    NormSource,
    RMSNorm,
    chunked_causal_lm_loss,
    document_ids,
    eager_attention,
    eager_experts,
    rms_norm,
    rotate_query_key,
    separate_projections,
)
from gptoss_tune.model.lora import ExpertLora, LoraLinear, LoraOptions, apply_lora
from gptoss_tune.model.presets import preset_config
from triton_cases import relative_error

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

DEVICE = torch.device("cuda")
LENGTH = 1024
FP32_TOLERANCE = 2e-3  # relative to the largest value
BF16_SLACK = 1e-2


def assert_as_accurate(
    name: str, actual: torch.Tensor, eager: torch.Tensor, truth: torch.Tensor, compute_dtype: torch.dtype
) -> None:
    """The fast path is within fp32 round-off of the fp32 truth, or, when it computed in bf16, about as
    close to it as the eager reference in bf16 (bf16 alone moves results by a few percent of their
    largest value). fp32 adapters trained under bf16 autocast have fp32 gradients computed in bf16."""
    error = relative_error(actual, truth)
    assert torch.isfinite(actual).all(), name
    if compute_dtype == torch.float32:
        assert error <= FP32_TOLERANCE, (name, error)
    else:
        baseline = relative_error(eager, truth)
        assert error <= 1.5 * baseline + BF16_SLACK, (name, error, baseline)


def as_fp32_leaves(tensors, differentiable: int) -> list:
    """fp32 copies of the same (rounded) values; the first `differentiable` ones require grad."""
    copies = []
    for index, tensor in enumerate(tensors):
        if tensor.is_floating_point():
            tensor = tensor.detach().float().requires_grad_(index < differentiable)
        copies.append(tensor)
    return copies


def packed_positions(lengths: list[int]) -> torch.Tensor:
    return torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0).to(DEVICE)


@pytest.fixture(scope="module")
def flex() -> FlexAttention:
    return FlexAttention(compile=True)


@pytest.fixture(scope="module")
def grouped() -> GroupedExperts:
    return GroupedExperts(compile=True)


# ---------------------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------------------


def attention_inputs(dtype: torch.dtype, seed: int = 0):
    generator = torch.Generator(device=DEVICE).manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, device=DEVICE).to(dtype).requires_grad_(True)

    # Frozen sinks in the model's dtype, as in LoRA training (the compiled kernels are then shared
    # with the whole-model tests); the lse gradient still reaches query and key through them.
    sinks = (2 * torch.randn(64, generator=generator, device=DEVICE)).to(dtype)
    documents = document_ids(packed_positions([300, 37, 463, 224]))  # a boundary inside a tile
    return randn(1, 64, LENGTH, 64), randn(1, 8, LENGTH, 64), randn(1, 8, LENGTH, 64), sinks, documents


def attention_and_grads(attention_fn, inputs, window: int | None):
    query, key, value, sinks, documents = inputs
    out = attention_fn(query, key, value, sinks, scaling=0.125, sliding_window=window, documents=documents)
    grad = torch.randn(out.shape, generator=torch.Generator(device=DEVICE).manual_seed(9), device=DEVICE)
    grads = torch.autograd.grad(out, (query, key, value), grad.to(out.dtype))
    return out, grads


@pytest.mark.parametrize(
    "dtype,window", [(torch.bfloat16, None), (torch.bfloat16, 128), (torch.float32, 128)], ids=str
)
def test_flex_attention_matches_eager_forward_and_backward(flex, dtype, window) -> None:
    inputs = attention_inputs(dtype)
    assert flex.can_run(*inputs[:4])
    if dtype == torch.bfloat16 and torch.cuda.get_device_capability() == (9, 0):
        assert kernel_options_for(inputs[0], window) is not None  # the tuned tiles are the ones tested here
    actual, actual_grads = attention_and_grads(flex, inputs, window)
    eager, eager_grads = attention_and_grads(eager_attention, inputs, window)
    truth, truth_grads = attention_and_grads(eager_attention, as_fp32_leaves(inputs, 3), window)
    assert actual.dtype == dtype
    assert actual.transpose(1, 2).is_contiguous()  # token-major: o_proj reads it without a copy
    assert_as_accurate("output", actual, eager, truth, dtype)
    for name, got, baseline, want in zip(
        ("query", "key", "value"), actual_grads, eager_grads, truth_grads, strict=True
    ):
        assert_as_accurate(name, got, baseline, want, dtype)


needs_flash_attention_4 = pytest.mark.skipif(
    not FlashAttention.available(), reason="needs flash-attn-4 (pip install 'gptoss-tune[fa4]')"
)


def two_row_attention_inputs(seed: int = 1):
    """Two packed rows (the second's documents restart at 0), token-major views as the model passes
    them, and sinks that take gradient."""
    generator = torch.Generator(device=DEVICE).manual_seed(seed)

    def token_major(heads: int) -> torch.Tensor:
        tensor = torch.randn(2, LENGTH, heads, 64, generator=generator, device=DEVICE).bfloat16()
        return tensor.requires_grad_(True).transpose(1, 2)

    sinks = (2 * torch.randn(64, generator=generator, device=DEVICE)).requires_grad_(True)
    positions = torch.cat([packed_positions([300, 37, 463, 224]), packed_positions([1000, 24])])
    return token_major(64), token_major(8), token_major(8), sinks, document_ids(positions)


@needs_flash_attention_4
@pytest.mark.parametrize("window", [None, 128], ids=str)
@pytest.mark.parametrize("rows", [1, 2])
def test_flash_attention_4_matches_eager_forward_and_backward(window, rows) -> None:
    flash = FlashAttention(fallback=None)  # a call it cannot take would fail here, not fall back
    inputs = attention_inputs(torch.bfloat16) if rows == 1 else two_row_attention_inputs()
    differentiable = 3 if rows == 1 else 4  # with two rows the sinks take gradient too
    assert flash.can_run(*inputs[:4])

    def run(attention_fn, tensors):
        query, key, value, sinks, documents = tensors
        out = attention_fn(
            query, key, value, sinks, scaling=0.125, sliding_window=window, documents=documents
        )
        grad = torch.randn(out.shape, generator=torch.Generator(device=DEVICE).manual_seed(9), device=DEVICE)
        return out, torch.autograd.grad(out, tensors[:differentiable], grad.to(out.dtype))

    actual, actual_grads = run(flash, inputs)
    eager, eager_grads = run(eager_attention, inputs)
    truth, truth_grads = run(eager_attention, as_fp32_leaves(inputs, differentiable))
    assert actual.transpose(1, 2).is_contiguous()  # token-major: o_proj reads it without a copy
    assert_as_accurate("output", actual, eager, truth, torch.bfloat16)
    names = ("query", "key", "value", "sinks")[:differentiable]
    for name, got, baseline, want in zip(names, actual_grads, eager_grads, truth_grads, strict=True):
        assert_as_accurate(name, got, baseline, want, torch.bfloat16)


@needs_flash_attention_4
def test_flash_attention_4_hands_what_it_cannot_take_to_flex_attention() -> None:
    attention = make_attention("auto")
    assert isinstance(attention, FlashAttention)
    query, key, value, sinks, documents = attention_inputs(torch.float32)
    assert not attention.can_run(query, key, value, sinks)  # fp32: FlexAttention's
    out = attention(query, key, value, sinks, scaling=0.125, sliding_window=128, documents=documents)
    want = eager_attention(query, key, value, sinks, scaling=0.125, sliding_window=128, documents=documents)
    assert relative_error(out, want) <= FP32_TOLERANCE


# ---------------------------------------------------------------------------------------------------
# Stacked q/k/v projections
# ---------------------------------------------------------------------------------------------------


def qkv_projections(dtype: torch.dtype) -> list[nn.Linear]:
    """gpt-oss-20b's query, key and value projections (bf16 base, fp32 LoRA r=8, B non-zero)."""
    config = preset_config("20b")
    generator = torch.Generator(device=DEVICE).manual_seed(0)
    heads = (config.num_attention_heads, config.num_key_value_heads, config.num_key_value_heads)
    layers = []
    for count in heads:
        base = nn.Linear(config.hidden_size, count * config.head_dim, device=DEVICE)
        with torch.no_grad():
            base.weight.copy_(0.02 * torch.randn(base.weight.shape, generator=generator, device=DEVICE))
            base.bias.copy_(0.1 * torch.randn(base.bias.shape, generator=generator, device=DEVICE))
        layer = LoraLinear(base.to(dtype).requires_grad_(False), 8, 2.0, 0.0)
        layer.lora_A.data, layer.lora_B.data = layer.lora_A.data.float(), layer.lora_B.data.float()
        with torch.no_grad():
            layer.lora_B.copy_(0.02 * torch.randn(layer.lora_B.shape, generator=generator, device=DEVICE))
        layers.append(layer)
    return layers


def projections_and_grads(fn, layers, hidden, dtype: torch.dtype):
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        outs = fn(layers, hidden)
    probes = [
        torch.randn(o.shape, generator=torch.Generator(device=DEVICE).manual_seed(i), device=DEVICE)
        for i, o in enumerate(outs)
    ]
    trained = [hidden] + [p for layer in layers for p in (layer.lora_A, layer.lora_B)]
    grads = torch.autograd.grad(
        sum((o.float() * p).sum() for o, p in zip(outs, probes, strict=True)), trained
    )
    return [o.detach() for o in outs] + list(grads)


def test_stacked_projections_at_20b_shapes_are_as_accurate_as_the_separate_calls() -> None:
    layers = qkv_projections(torch.bfloat16)
    hidden = torch.randn(
        1, LENGTH, 2880, generator=torch.Generator(device=DEVICE).manual_seed(1), device=DEVICE
    )
    hidden = hidden.bfloat16().requires_grad_(True)
    assert StackedProjections.can_run(layers)
    truth_layers = [copy.deepcopy(layer).float() for layer in layers]
    truth = projections_and_grads(
        separate_projections, truth_layers, hidden.detach().float().requires_grad_(True), torch.float32
    )
    eager = projections_and_grads(separate_projections, layers, hidden, torch.bfloat16)
    actual = projections_and_grads(StackedProjections(), layers, hidden, torch.bfloat16)
    names = ["query", "key", "value", "hidden"] + [f"{p}.{f}" for p in "qkv" for f in ("A", "B")]
    for name, got, baseline, want in zip(names, actual, eager, truth, strict=True):
        assert_as_accurate(name, got, baseline, want, torch.bfloat16)


# ---------------------------------------------------------------------------------------------------
# Experts
# ---------------------------------------------------------------------------------------------------


def experts_on_cuda(dtype: torch.dtype, hidden: int, inner: int, num_experts: int, rank: int) -> Experts:
    config = preset_config("tiny")
    config.hidden_size, config.intermediate_size, config.num_local_experts = hidden, inner, num_experts
    generator = torch.Generator(device=DEVICE).manual_seed(0)
    with torch.device(DEVICE):
        experts = Experts(config)
        with torch.no_grad():
            for param in experts.parameters():
                param.copy_(0.05 * torch.randn(param.shape, generator=generator, device=DEVICE))
        experts.to(dtype).requires_grad_(False)
    seeded = torch.Generator().manual_seed(1)  # not torch's global generator: the same A in any test order
    experts.gate_up_lora = ExpertLora(experts.weight_shape("gate_up_proj"), rank, 2.0, generator=seeded).to(
        DEVICE
    )
    experts.down_lora = ExpertLora(experts.weight_shape("down_proj"), rank, 2.0, generator=seeded).to(DEVICE)
    with torch.no_grad():  # fp32 adapters, B non-zero so the adapters matter
        for module in (experts.gate_up_lora, experts.down_lora):
            module.lora_B.copy_(0.05 * torch.randn(module.lora_B.shape, generator=generator, device=DEVICE))
    return experts


def experts_and_grads(experts_fn, experts: Experts, hidden, indices, weights, dtype: torch.dtype):
    adapters = [experts.gate_up_lora.lora_A, experts.gate_up_lora.lora_B]
    adapters += [experts.down_lora.lora_A, experts.down_lora.lora_B]
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        out = experts_fn(experts, hidden, indices, weights)
    grad = torch.randn(out.shape, generator=torch.Generator(device=DEVICE).manual_seed(5), device=DEVICE)
    return out, torch.autograd.grad(out, [hidden, weights, *adapters], grad.to(out.dtype))


@pytest.mark.parametrize(
    "dtype,hidden,inner,num_experts,rank,tokens",
    [
        (torch.float32, 256, 128, 8, 8, 600),
        (torch.bfloat16, 256, 128, 8, 4, 600),  # rank padded to 8 for grouped_mm
        (torch.bfloat16, 2880, 2880, 32, 8, 4096),  # gpt-oss-20b's expert shape
    ],
    ids=str,
)
def test_grouped_experts_match_the_eager_loop(
    grouped, dtype, hidden, inner, num_experts, rank, tokens
) -> None:
    experts = experts_on_cuda(dtype, hidden, inner, num_experts, rank)
    generator = torch.Generator(device=DEVICE).manual_seed(1)
    used = num_experts - 2  # the last two experts receive no token
    indices = torch.stack(
        [torch.randperm(used, generator=generator, device=DEVICE)[:4] for _ in range(tokens)]
    )
    weights = torch.softmax(torch.randn(tokens, 4, generator=generator, device=DEVICE), -1).to(dtype)
    hidden_states = torch.randn(tokens, hidden, generator=generator, device=DEVICE).to(dtype)
    hidden_states.requires_grad_(True)
    weights.requires_grad_(True)
    assert grouped.can_run(experts, dtype)
    actual, actual_grads = experts_and_grads(grouped, experts, hidden_states, indices, weights, dtype)
    eager, eager_grads = experts_and_grads(eager_experts, experts, hidden_states, indices, weights, dtype)
    truth_experts = copy.deepcopy(experts).float()
    truth_hidden, truth_weights = as_fp32_leaves([hidden_states, weights], 2)
    truth, truth_grads = experts_and_grads(
        eager_experts, truth_experts, truth_hidden, indices, truth_weights, torch.float32
    )
    assert_as_accurate("output", actual, eager, truth, dtype)
    names = ("hidden", "routing weights", "gate_up A", "gate_up B", "down A", "down B")
    for name, got, baseline, want in zip(names, actual_grads, eager_grads, truth_grads, strict=True):
        assert_as_accurate(name, got, baseline, want, dtype)
    for got in actual_grads[2:]:  # experts without tokens get exactly zero adapter gradient
        assert got[used:].abs().max().item() == 0.0


needs_quack = pytest.mark.skipif(
    not torch.cuda.is_available() or quack() is None or torch.cuda.get_device_capability() != (9, 0),
    reason="needs quack-kernels (pip install 'gptoss-tune[fa4]') on an H100/H200",
)


@needs_quack
@pytest.mark.parametrize(
    "inner,width,gather",
    [(2880, 5760, True), (2880, 2880, False), (2880, 2880, True), (5760, 2880, False)],
    ids=["gate_up forward", "down forward", "down backward", "gate_up backward"],
)
@pytest.mark.parametrize("transposed", [False, True], ids=["weights", "transposed weights"])
def test_quack_expert_gemms_match_grouped_mm(inner, width, gather, transposed) -> None:
    """The four base GEMMs at gpt-oss-20b's shapes, with experts that get no row and a gather that
    reads some tokens twice; the backward ones read the weights transposed."""
    generator = torch.Generator(device=DEVICE).manual_seed(3)
    tokens, experts = 3000, 32
    routing = sort_by_expert(
        torch.randint(0, experts - 3, (tokens, 4), generator=generator, device=DEVICE), experts
    )
    source = torch.randn(tokens if gather else 4 * tokens, inner, generator=generator, device=DEVICE)
    weights = torch.randn(experts, width, inner, generator=generator, device=DEVICE).transpose(-2, -1)
    if not transposed:
        weights = weights.contiguous()
    source, weights = source.bfloat16(), (weights / inner**0.5).bfloat16()
    index = routing.tokens_int32 if gather else None
    want = ExpertGemm("torch")(source, weights, routing.offsets, routing.cu_seqlens, index)
    got = ExpertGemm("quack")(source, weights, routing.offsets, routing.cu_seqlens, index)
    assert got.shape == want.shape == (4 * tokens, width)
    assert relative_error(got.float(), want.float()) <= 1e-2


EXPERT_GRAD_NAMES = ("hidden", "routing weights", "gate_up A", "gate_up B", "down A", "down B")


def assert_backend_as_accurate(
    experts: Experts, tokens: int, used_experts: int, seed: int, baseline: str, candidate: str
) -> tuple:
    """The experts (with adapters) on two `ExpertGemm` backends, bf16, each against the fp32 eager
    loop over the same random routing: the candidate must be about as close as the baseline. Returns
    the candidate's gradients (EXPERT_GRAD_NAMES)."""
    generator = torch.Generator(device=DEVICE).manual_seed(seed)
    indices = torch.randint(0, used_experts, (tokens, 4), generator=generator, device=DEVICE)
    weights = torch.softmax(torch.randn(tokens, 4, generator=generator, device=DEVICE), -1).bfloat16()
    hidden = torch.randn(tokens, 2880, generator=generator, device=DEVICE).bfloat16()
    runs = []
    for backend in (baseline, candidate):
        leaves = [hidden.clone().requires_grad_(True), weights.clone().requires_grad_(True)]
        grouped = GroupedExperts(compile=True, gemm=ExpertGemm(backend))
        runs.append(experts_and_grads(grouped, experts, leaves[0], indices, leaves[1], torch.bfloat16))
    return assert_second_run_as_accurate(experts, hidden, indices, weights, runs)


def assert_second_run_as_accurate(experts: Experts, hidden, indices, weights, runs: list) -> tuple:
    """Two bf16 runs' (output, gradients) of the experts, each against the fp32 eager loop on the
    same inputs: the second must be about as close as the first. Returns its gradients."""
    truth_hidden, truth_weights = as_fp32_leaves([hidden, weights], 2)
    truth = experts_and_grads(
        eager_experts, copy.deepcopy(experts).float(), truth_hidden, indices, truth_weights, torch.float32
    )
    (base_out, base_grads), (out, grads) = runs
    assert_as_accurate("output", out, base_out, truth[0], torch.bfloat16)
    for name, got, baseline_grad, want in zip(EXPERT_GRAD_NAMES, grads, base_grads, truth[1], strict=True):
        assert_as_accurate(name, got, baseline_grad, want, torch.bfloat16)
    return grads


@needs_quack
def test_grouped_experts_on_quack_gemms_are_as_accurate_as_on_grouped_mm() -> None:
    """Both bf16 paths against the fp32 eager loop: quack's must be about as close as grouped_mm's."""
    experts = experts_on_cuda(torch.bfloat16, 2880, 2880, 32, 8)
    assert_backend_as_accurate(experts, 2048, 30, seed=2, baseline="torch", candidate="quack")


needs_quack_moe = pytest.mark.skipif(
    not torch.cuda.is_available() or quack_moe() is None or torch.cuda.get_device_capability() != (9, 0),
    reason="needs quack-kernels with its epilogue frontend on an H100/H200",
)


@needs_quack_moe
@pytest.mark.parametrize("rank", [8, 3])
def test_fused_gate_up_epilogue_is_as_accurate_as_the_triton_one(rank) -> None:
    """quack's gate_up GEMM with the bias, LoRA addend and SwiGLU in its epilogue vs the Triton
    epilogue, both against the fp32 eager loop, at gpt-oss-20b's expert shape; some experts get no
    row (rank 3 is padded to 8)."""
    rows = torch.zeros(8, 2880, dtype=torch.bfloat16, device=DEVICE)
    assert ExpertGemm("quack-fused").fuses(rows) and not ExpertGemm("quack").fuses(rows)
    experts = experts_on_cuda(torch.bfloat16, 2880, 2880, 32, rank)
    fused_grads = assert_backend_as_accurate(
        experts, 3000, 29, seed=4, baseline="quack", candidate="quack-fused"
    )
    for got in fused_grads[2:]:  # experts without rows get exactly zero adapter gradient
        assert got[29:].abs().max().item() == 0.0


@needs_quack_moe
def test_fused_gate_up_epilogue_without_adapters() -> None:
    experts = experts_on_cuda(torch.bfloat16, 2880, 2880, 32, 8)
    experts.gate_up_lora = experts.down_lora = None
    generator = torch.Generator(device=DEVICE).manual_seed(5)
    indices = torch.randint(0, 32, (2000, 4), generator=generator, device=DEVICE)
    weights = torch.softmax(torch.randn(2000, 4, generator=generator, device=DEVICE), -1).bfloat16()
    hidden = torch.randn(2000, 2880, generator=generator, device=DEVICE).bfloat16()
    grad = torch.randn(2000, 2880, generator=generator, device=DEVICE).bfloat16()
    runs = []
    for fuse in (False, True):
        leaves = [hidden.clone().requires_grad_(True), weights.clone().requires_grad_(True)]
        out = GroupedExperts(compile=True, gemm=ExpertGemm("quack-fused" if fuse else "quack"))(
            experts, leaves[0], indices, leaves[1]
        )
        runs.append((out, *torch.autograd.grad(out, leaves, grad)))
    truth_leaves = as_fp32_leaves([hidden, weights], 2)
    truth_out = eager_experts(copy.deepcopy(experts).float(), truth_leaves[0], indices, truth_leaves[1])
    truth = (truth_out, *torch.autograd.grad(truth_out, truth_leaves, grad.float()))
    for name, got, baseline, want in zip(
        ("output", "hidden", "routing weights"), runs[1], runs[0], truth, strict=True
    ):
        assert_as_accurate(name, got, baseline, want, torch.bfloat16)


@pytest.mark.parametrize("backend", ["torch", "quack", "quack-fused"])
def test_recomputing_the_gate_up_in_backward_is_as_accurate_as_keeping_it(backend) -> None:
    """At gpt-oss-20b's expert shape, each GEMM backend: backward that runs the gate_up forward
    again gives gradients as close to the fp32 eager loop's as backward from the kept pre-activation,
    and the forward keeps at least the bf16 pre-activation [S, 2I] less."""
    if backend != "torch" and (quack() is None or torch.cuda.get_device_capability() != (9, 0)):
        pytest.skip("needs quack-kernels on an H100/H200")
    if backend == "quack-fused" and quack_moe() is None:
        pytest.skip("needs quack-kernels with its epilogue frontend")
    experts = experts_on_cuda(torch.bfloat16, 2880, 2880, 32, 8)
    tokens = 2000
    generator = torch.Generator(device=DEVICE).manual_seed(6)
    indices = torch.randint(0, 30, (tokens, 4), generator=generator, device=DEVICE)
    weights = torch.softmax(torch.randn(tokens, 4, generator=generator, device=DEVICE), -1).bfloat16()
    hidden = torch.randn(tokens, 2880, generator=generator, device=DEVICE).bfloat16()
    grouped = GroupedExperts(compile=True, gemm=ExpertGemm(backend))
    runs, kept = [], []
    for recompute in (False, True):
        experts.recompute_gate_up = recompute
        leaves = [hidden.clone().requires_grad_(True), weights.clone().requires_grad_(True)]
        runs.append(experts_and_grads(grouped, experts, leaves[0], indices, leaves[1], torch.bfloat16))
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        out = grouped(experts, leaves[0], indices, leaves[1])
        kept.append(torch.cuda.memory_allocated() - before - out.numel() * out.element_size())
        del out
    assert_second_run_as_accurate(experts, hidden, indices, weights, runs)
    assert kept[0] - kept[1] >= 4 * tokens * 2 * 2880 * 2


def test_fused_gate_up_epilogue_only_where_quack_runs() -> None:
    if quack_moe() is None:
        pytest.skip("needs quack-kernels with its epilogue frontend")
    rows = torch.zeros(8, 2880, dtype=torch.bfloat16, device=DEVICE)
    assert ExpertGemm("quack-fused").fuses(rows) == (torch.cuda.get_device_capability() == (9, 0))
    assert not ExpertGemm("quack-fused").fuses(rows.float())
    assert not ExpertGemm("quack").fuses(rows)
    assert ExpertGemm("auto").fuses(rows) == ExpertGemm("quack-fused").fuses(rows)
    assert not ExpertGemm("torch").fuses(rows)


@pytest.mark.parametrize("with_low_rank", [True, False])
@pytest.mark.parametrize("rows,inner", [(4099, 2880), (37, 72), (0, 72)])
def test_triton_expert_epilogues_match_their_references(rows, inner, with_low_rank) -> None:
    triton_cases.check_expert_epilogues(DEVICE, rows, inner, with_low_rank)


@pytest.mark.parametrize("tokens,top_k,width", [(1000, 4, 2880), (3, 2, 64), (0, 4, 64)])
def test_triton_token_sums_match_their_references(tokens, top_k, width) -> None:
    triton_cases.check_token_sums(DEVICE, tokens, top_k, width)


# ---------------------------------------------------------------------------------------------------
# Loss
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fused_loss_matches_the_chunked_reference(dtype) -> None:
    generator = torch.Generator(device=DEVICE).manual_seed(2)
    tokens, hidden_size, vocab = 3000, 2880, 201088  # gpt-oss's lm_head
    hidden = torch.randn(1, tokens, hidden_size, generator=generator, device=DEVICE).to(dtype)
    hidden.requires_grad_(True)
    weight = (torch.randn(vocab, hidden_size, generator=generator, device=DEVICE) * hidden_size**-0.5).to(
        dtype
    )
    labels = torch.randint(0, vocab, (1, tokens), generator=generator, device=DEVICE)
    labels[0, :500] = IGNORE_INDEX
    positions = packed_positions([1200, 1000, 800])
    actual, count = FusedLinearCrossEntropy(2048, compile=True)(hidden, weight, labels, positions)
    (actual_grad,) = torch.autograd.grad(actual / count, hidden)
    expected, expected_count = chunked_causal_lm_loss(hidden, weight, labels, positions)
    (expected_grad,) = torch.autograd.grad(expected / expected_count, hidden)
    assert count.item() == expected_count.item()
    assert abs(actual.item() - expected.item()) <= 1e-4 * abs(expected.item())
    # Both compute the same bf16 logits and round the logit gradient to bf16 once.
    assert relative_error(actual_grad, expected_grad) <= (FP32_TOLERANCE if dtype == torch.float32 else 2e-2)


@pytest.mark.parametrize("rows,vocab", [(37, 201088), (5, 1000), (0, 1000)])
def test_triton_loss_chunk_matches_its_reference(rows, vocab) -> None:
    triton_cases.check_loss_chunk(DEVICE, rows, vocab)


# ---------------------------------------------------------------------------------------------------
# The whole model, and the checkpointing plan
# ---------------------------------------------------------------------------------------------------


def small_model(seed: int = 0) -> GptOss:
    """Two layers with gpt-oss's attention shape (sliding + full), 8 experts, a small vocabulary."""
    config = preset_config("tiny")
    config.update(
        {
            "vocab_size": 1000,
            "pad_token_id": None,
            "eos_token_id": None,
            "hidden_size": 512,
            "intermediate_size": 256,
            "num_attention_heads": 64,
            "num_key_value_heads": 8,
            "head_dim": 64,
            "num_local_experts": 8,
            "num_experts_per_tok": 4,
            "experts_per_token": 4,
            "sliding_window": 128,
        }
    )
    torch.manual_seed(seed)
    with torch.device(DEVICE):
        model = GptOss(config)
        with torch.no_grad():
            for name, param in model.named_parameters():
                noise = torch.randn_like(param)
                param.copy_(1 + 0.1 * noise if "norm" in name else 0.05 * noise)
    model.to(torch.bfloat16)
    generator = torch.Generator().manual_seed(seed)
    params = apply_lora(model, LoraOptions(rank=8, alpha=16.0), generator=generator)
    with torch.no_grad():
        for name, param in params.items():
            param.data = param.data.float()
            if "lora_B" in name:
                param.copy_(0.05 * torch.randn(param.shape, generator=generator).to(DEVICE))
    return model


def loss_and_lora_grads(model: GptOss, autocast: bool = True) -> tuple[float, dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(4)
    input_ids = torch.randint(0, 1000, (1, LENGTH), generator=generator).to(DEVICE)
    labels = input_ids.clone()
    labels[0, :100] = IGNORE_INDEX
    positions = packed_positions([400, 300, 200, LENGTH - 900])  # the last one stands for padding
    model.zero_grad()
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        total, count = model.loss(input_ids, labels, positions)
    (total / count).backward()
    return (total / count).item(), {n: p.grad.float() for n, p in model.named_parameters() if p.requires_grad}


def test_fast_model_in_bf16_is_as_accurate_as_the_eager_model(flex, grouped) -> None:
    """bf16 alone moves LoRA gradients by several percent, so both bf16 runs are measured against
    the fp32 eager model (same weights): the fast path must be about as close as the eager one."""
    truth_model = small_model()
    truth_model.float()
    truth_loss, truth = loss_and_lora_grads(truth_model, autocast=False)
    eager_loss, eager = loss_and_lora_grads(small_model())
    fast = small_model()
    fast.set_kernels(
        attention=flex,
        experts=grouped,
        loss=FusedLinearCrossEntropy(compile=True),
        norm=torch.compile(rms_norm, dynamic=True),
        rotary=torch.compile(rotate_query_key, dynamic=True),
    )
    fast_loss, actual = loss_and_lora_grads(fast)
    assert abs(fast_loss - truth_loss) <= 2 * abs(eager_loss - truth_loss) + 1e-3
    for name, grad in truth.items():
        assert torch.isfinite(actual[name]).all(), name
        fast_error, eager_error = relative_error(actual[name], grad), relative_error(eager[name], grad)
        assert fast_error <= 1.5 * eager_error + 0.02, (name, fast_error, eager_error)


def test_enable_fast_paths_installs_every_kernel() -> None:
    model = small_model()
    installed = enable_fast_paths(model)
    layer = model.model.layers[0]
    assert layer.self_attn.attention_fn is installed.attention
    assert layer.mlp.experts_fn is installed.experts
    assert model.loss_fn is installed.loss
    assert layer.self_attn.rotary_fn is installed.rotary and installed.rotary is not None
    assert layer.input_layernorm.norm_fn is installed.norm and model.model.norm.norm_fn is installed.norm


def test_checkpointing_plan_follows_the_budget(flex, grouped) -> None:
    model = small_model()
    model.set_kernels(attention=flex, experts=grouped)
    layer = measure_layer_memory(model, LENGTH)
    assert layer.saved > layer.checkpointed > 0 and layer.transient > 0
    assert all(p.grad is None for p in model.parameters())
    model.loss_fn = FusedLinearCrossEntropy(256, compile=True)
    hidden_grad_bytes = LENGTH * model.config.hidden_size * 2
    chunk_logits_bytes = 256 * model.config.vocab_size * 2
    loss_peak = measure_loss_memory(model, LENGTH)
    assert hidden_grad_bytes < loss_peak <= 2 * hidden_grad_bytes + 3 * chunk_logits_bytes
    roomy = torch.cuda.memory_allocated() + 10 * 1024**3
    assert plan_activation_checkpointing(model, LENGTH, roomy) == RecomputePlan(norms_kept=True)
    assert not model.norms_recomputed
    assert plan_activation_checkpointing(model, LENGTH, torch.cuda.memory_allocated()) == RecomputePlan(
        (0, 1)
    )
    assert model.model.checkpointed_layers == frozenset({0, 1})
    assert model.gate_up_recomputed_layers == frozenset()


def test_gate_up_recomputation_is_measured_and_trains_like_keeping_all(flex, grouped) -> None:
    """The measured layer keeps less when its experts recompute their gate_up (the layer's setting
    is left as it was), and a model whose layers all do so gives the loss and the LoRA gradients of
    one that keeps everything, within bf16 noise (the GPU's GEMMs are not bit-repeatable)."""
    model = small_model()
    model.set_kernels(attention=flex, experts=grouped)
    layer = measure_layer_memory(model, LENGTH)
    assert layer.gate_up_saved is not None and layer.gate_up_saved < layer.saved
    assert layer.forward_seconds > 0 and layer.gate_up_seconds >= 0
    assert not model.model.layers[0].mlp.experts.recompute_gate_up
    kept_loss, kept = loss_and_lora_grads(model)
    RecomputePlan(gate_up=(0, 1)).apply(model)
    again_loss, again = loss_and_lora_grads(model)
    model.set_gradient_checkpointing(False)
    assert abs(again_loss - kept_loss) <= 1e-3 * abs(kept_loss)
    for name, grad in kept.items():
        assert relative_error(again[name], grad) <= BF16_SLACK, name


@pytest.mark.parametrize("weight_dtype", [torch.bfloat16, torch.float32])
def test_compiled_norm_normalizes_again_to_the_same_bits_without_autograd(weight_dtype) -> None:
    """What `NormSource` relies on: in backward, the installed (compiled) norm runs again without
    autograd on the kept input and must give exactly the rows the projections and experts read in
    forward (at gpt-oss-20b's hidden size, two lengths: the second compiles with dynamic shapes)."""
    norm = RMSNorm(2880, 1e-5).to(DEVICE, weight_dtype).requires_grad_(False)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * torch.randn(2880, device=DEVICE))
    norm.norm_fn = torch.compile(rms_norm)
    for tokens in (4096, 3000):
        hidden = torch.randn(1, tokens, 2880, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            normed = norm(hidden)
        kept, kept_norm = NormSource.keep(normed.reshape(-1, 2880), NormSource(hidden, norm))
        again = NormSource.rows_again(kept, kept_norm, torch.bfloat16)
        assert torch.equal(again, normed.reshape(-1, 2880)), tokens


def test_layers_normalizing_again_in_backward_keep_two_rows_fewer_and_train_alike(flex, grouped) -> None:
    """The projections and the experts keep the norms' inputs (kept by the norms anyway) instead of
    their outputs: the measured layer keeps two [N, H] bf16 tensors fewer than when it keeps the
    norms' outputs, and the model's loss and LoRA gradients are those of keeping them, within bf16
    noise."""
    model = small_model()
    model.set_kernels(
        attention=flex, experts=grouped, projections=StackedProjections(), norm=torch.compile(rms_norm)
    )
    layer = measure_layer_memory(model, LENGTH)
    rows = LENGTH * model.config.hidden_size * 2
    assert abs(layer.norms_saved - layer.saved - 2 * rows) <= rows // 4, (layer.norms_saved, layer.saved)
    assert model.norms_recomputed  # the measurement leaves the setting as it was
    again_loss, again_grads = loss_and_lora_grads(model)
    RecomputePlan(norms_kept=True).apply(model)
    kept_loss, kept_grads = loss_and_lora_grads(model)
    assert abs(again_loss - kept_loss) <= 1e-3 * abs(kept_loss)
    for name, grad in kept_grads.items():
        assert relative_error(again_grads[name], grad) <= BF16_SLACK, name


def test_auto_memory_budget_counts_our_memory_and_leaves_headroom() -> None:
    device = torch.device("cuda")
    free, total = torch.cuda.mem_get_info(device)
    before = auto_budget_bytes(device)
    held = torch.empty(
        256 * 2**20, dtype=torch.uint8, device=device
    )  # our own allocation stays in the budget
    after = auto_budget_bytes(device)
    assert abs(after - before) < 64 * 2**20
    assert torch.cuda.memory_allocated(device) < before < torch.cuda.memory_reserved(device) + free
    assert before <= 0.93 * total
    del held
