"""The fast paths (gptoss_tune.kernels) against the eager references of the model, on the CPU.

What runs on a CPU here: FlexAttention forward (its unfused reference implementation; FlexAttention
has no CPU backward, so attention gradients are checked in tests/gpu), grouped_mm forward and
backward, the fused loss, selective checkpointing. tests/gpu repeats these on CUDA with the
compiled kernels.
"""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention.flex_attention import create_block_mask

from gptoss_tune.config import ATTENTIONS, EXPERT_GEMMS
from gptoss_tune.errors import GptossTuneError
from gptoss_tune.kernels import (
    ATTENTION_BACKENDS,
    FusedLinearCrossEntropy,
    GroupedExperts,
    enable_fast_paths,
    make_attention,
)
from gptoss_tune.kernels import (
    EXPERT_GEMMS as KERNEL_EXPERT_GEMMS,
)
from gptoss_tune.kernels.attention import (
    FlexAttention,
    build_block_mask,
    kernel_options_for,
    mask_mod_for,
    tile_table,
    tiles_to_kv_blocks,
)
from gptoss_tune.kernels.flash_attention import FlashAttention, document_sequences, flash_window
from gptoss_tune.kernels.grouped_gemm import ExpertGemm, quack
from gptoss_tune.kernels.loss import linear_cross_entropy_sum
from gptoss_tune.kernels.memory import LayerMemory, RecomputePlan, choose_recompute_plan, plan_peak_bytes
from gptoss_tune.kernels.moe import (
    aligned_lora_factors,
    clamped_swiglu,
    clamped_swiglu_backward,
    low_rank_inputs,
    pick_slots,
    place_in_slots,
    sort_by_expert,
    sum_low_rank_outputs,
    sum_over_slots,
)
from gptoss_tune.model.gpt_oss import (
    IGNORE_INDEX,
    Experts,
    GptOss,
    NormSource,
    RMSNorm,
    attention_mask,
    chunked_causal_lm_loss,
    document_ids,
    eager_attention,
    eager_experts,
    rms_norm,
    rotate_query_key,
)
from gptoss_tune.model.lora import ExpertLora, LoraOptions, apply_lora
from gptoss_tune.model.presets import preset_config

FP32_TOLERANCE = 1e-5
BF16_TOLERANCE = 3e-2


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.float(), expected.float()
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


def packed_positions(lengths: list[int]) -> torch.Tensor:
    return torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)


def random_packing(length: int, generator: torch.Generator) -> list[int]:
    """Document lengths (1..300) summing to `length`."""
    lengths, left = [], length
    while left:
        n = min(left, int(torch.randint(1, 300, (1,), generator=generator)))
        lengths.append(n)
        left -= n
    return lengths


# ---------------------------------------------------------------------------------------------------
# Attention: block masks
# ---------------------------------------------------------------------------------------------------


def tile_reductions(
    documents: torch.Tensor, window: int | None, block: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(any visible, all visible) per tile from the dense reference mask."""
    batch, length = documents.shape
    tiles = length // block
    dense = attention_mask(documents, window).view(batch, tiles, block, tiles, block).transpose(2, 3)
    return dense.any(-1).any(-1), dense.all(-1).all(-1)


@pytest.mark.parametrize("window", [None, 3, 16, 40, 128])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tile_table_is_exact_for_full_tiles_and_never_misses_a_visible_pair(window, seed) -> None:
    generator = torch.Generator().manual_seed(seed)
    block, length = 16, 512
    rows = [packed_positions(random_packing(length, generator)) for _ in range(2)]
    documents = document_ids(torch.cat(rows))
    partial, full = tile_table(documents, window, block)
    any_visible, all_visible = tile_reductions(documents, window, block)
    assert torch.equal(full[:, 0], all_visible)
    assert not (partial & full).any()
    assert torch.equal((partial | full)[:, 0] | ~any_visible, torch.ones_like(any_visible))
    if window is None:  # without a window the table is exact
        assert torch.equal((partial | full)[:, 0], any_visible)


@pytest.mark.parametrize("window", [None, 1, 5, 128])
@pytest.mark.parametrize("seed", [0, 1])
def test_mask_mod_matches_the_eager_mask_on_every_pair(window, seed) -> None:
    generator = torch.Generator().manual_seed(seed)
    rows = [packed_positions(random_packing(400, generator)) for _ in range(2)]
    documents = document_ids(torch.cat(rows))
    length = documents.shape[1]
    mask_mod = mask_mod_for(documents, window)
    batch = torch.arange(2).view(2, 1, 1)
    visible = mask_mod(batch, None, torch.arange(length).view(1, -1, 1), torch.arange(length).view(1, 1, -1))
    assert torch.equal(visible, attention_mask(documents, window).view(2, length, length))


def test_tiles_to_kv_blocks_lists_selected_tiles_first_in_order() -> None:
    tiles = torch.tensor([[[[True, False, True, False], [False, False, False, False]]]])
    counts, indices = tiles_to_kv_blocks(tiles)
    assert counts.tolist() == [[[2, 0]]]
    assert indices[0, 0, 0, :2].tolist() == [0, 2]
    assert indices.dtype == counts.dtype == torch.int32


@pytest.mark.parametrize("window", [None, 128])
def test_block_mask_covers_the_same_tiles_as_create_block_mask(window) -> None:
    documents = document_ids(packed_positions([100, 300, 240, 128, 256]))
    length = documents.shape[1]
    ours = build_block_mask(documents, window)
    reference = create_block_mask(mask_mod_for(documents, window), 1, None, length, length, device="cpu")
    ours_tiles, reference_tiles = ours.to_dense().bool(), reference.to_dense().bool()
    assert torch.equal(ours_tiles | reference_tiles, ours_tiles)  # never misses a tile
    if window is None:
        assert torch.equal(ours_tiles, reference_tiles)
    assert ours.full_kv_num_blocks.sum() == reference.full_kv_num_blocks.sum()


# ---------------------------------------------------------------------------------------------------
# Attention: FlexAttention with sinks against the eager reference
# ---------------------------------------------------------------------------------------------------


def attention_inputs(
    length: int, seed: int, batch: int = 2, heads: int = 8, kv_heads: int = 2, dim: int = 16
):
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator)

    positions = torch.cat([packed_positions(random_packing(length, generator)) for _ in range(batch)])
    return (
        randn(batch, heads, length, dim),
        randn(batch, kv_heads, length, dim),
        randn(batch, kv_heads, length, dim),
        2 * randn(heads),  # sinks from strongly negative to strongly positive
        document_ids(positions),
    )


@pytest.mark.parametrize("window", [None, 128, 5])
@pytest.mark.parametrize("length", [256, 384, 300])  # 300: padded to 384 inside
def test_flex_attention_forward_matches_eager(window, length) -> None:
    query, key, value, sinks, documents = attention_inputs(length, seed=length + (window or 0))
    kwargs = {"scaling": 0.25, "sliding_window": window, "documents": documents}
    flex = FlexAttention(compile=False)
    with torch.no_grad():
        assert flex.can_run(query, key, value, sinks)
        actual = flex(query, key, value, sinks, **kwargs)
        expected = eager_attention(query, key, value, sinks, **kwargs)
    assert relative_error(actual, expected) <= FP32_TOLERANCE
    if length % 128 == 0:  # token-major: the output projection reads it without a copy
        assert actual.transpose(1, 2).is_contiguous()


def test_tuned_attention_tiles_only_where_they_were_measured() -> None:
    query = torch.zeros(1, 4, 256, 64, dtype=torch.bfloat16)
    assert kernel_options_for(query) is None  # CPU: FlexAttention's defaults (sm90 is tested in tests/gpu)


def test_flex_attention_falls_back_to_eager_for_shapes_it_cannot_take() -> None:
    flex = FlexAttention(compile=False)
    query, key, value, sinks, documents = attention_inputs(200, seed=5)  # shorter than MIN_FLEX_LENGTH
    kwargs = {"scaling": 0.25, "sliding_window": 128, "documents": documents}
    with torch.no_grad():
        assert torch.equal(
            flex(query, key, value, sinks, **kwargs), eager_attention(query, key, value, sinks, **kwargs)
        )
    query, key, value, sinks, documents = attention_inputs(256, seed=6)
    query.requires_grad_(True)  # FlexAttention has no CPU backward: eager, with gradients
    out = flex(query, key, value, sinks, scaling=0.25, sliding_window=None, documents=documents)
    (grad,) = torch.autograd.grad(out.sum(), query)
    assert flex.masks_built == 0 and grad.abs().sum() > 0


def test_block_masks_are_built_once_per_micro_batch_and_window() -> None:
    flex = FlexAttention(compile=False)
    query, key, value, sinks, documents = attention_inputs(256, seed=7)
    with torch.no_grad():
        for window in (128, None, 128, None):  # four layers of one micro-batch
            flex(query, key, value, sinks, scaling=0.25, sliding_window=window, documents=documents)
        assert flex.masks_built == 2
        flex(query, key, value, sinks, scaling=0.25, sliding_window=128, documents=documents.clone())
    assert flex.masks_built == 3


def flash_attention_mask(
    cu_seqlens: torch.Tensor, window: tuple[int | None, int | None], total: int
) -> torch.Tensor:
    """[total, total] what FlashAttention's variable-length causal kernel lets query i see: key j of
    the same sequence with j <= i, and with a window (left, right) also i - left <= j <= i + right."""
    sequence = torch.bucketize(torch.arange(total), cu_seqlens[1:].long(), right=True)
    index = torch.arange(total)
    query, key = index[:, None], index[None, :]
    allowed = (sequence[:, None] == sequence[None, :]) & (key <= query)
    left, right = window
    if left is not None:
        allowed &= (key >= query - left) & (key <= query + right)
    return allowed


@pytest.mark.parametrize("window", [None, 128, 5], ids=str)
@pytest.mark.parametrize("seed", range(3))
def test_flash_attention_sequences_and_window_give_the_eager_mask(window, seed) -> None:
    """The rows flattened into one stream, cut at document starts and row starts, with our window as
    FlashAttention's (left, right), allow exactly the pairs of the eager mask (and none across rows)."""
    generator = torch.Generator().manual_seed(seed)
    rows, length = 3, 384
    positions = []
    for _ in range(rows):
        lengths, left = [], length
        while left:
            lengths.append(min(left, int(torch.randint(1, 200, (1,), generator=generator))))
            left -= lengths[-1]
        positions.append(torch.cat([torch.arange(n) for n in lengths]))
    documents = document_ids(torch.stack(positions))
    cu_seqlens, longest = document_sequences(documents)
    assert cu_seqlens.dtype == torch.int32 and longest == int(cu_seqlens.diff().max())
    allowed = flash_attention_mask(cu_seqlens, flash_window(window), rows * length)
    eager = torch.block_diag(*attention_mask(documents, window).unbind(0)).bool()
    assert torch.equal(allowed, eager)


def test_make_attention_picks_flash_attention_4_only_where_it_is_installed() -> None:
    assert ATTENTIONS == ATTENTION_BACKENDS and EXPERT_GEMMS == KERNEL_EXPERT_GEMMS  # the config's copies
    assert isinstance(make_attention("flex", compile=False), FlexAttention)
    with pytest.raises(GptossTuneError, match="Unknown attention backend"):
        make_attention("sdpa")
    if FlashAttention.available():
        assert isinstance(make_attention("auto", compile=False), FlashAttention)
    else:
        assert isinstance(make_attention("auto", compile=False), FlexAttention)
        with pytest.raises(GptossTuneError, match="flash-attn-4"):
            make_attention("flash")


def test_flash_attention_hands_cpu_calls_to_its_fallback() -> None:
    flash = FlashAttention(fallback=eager_attention)
    query, key, value, sinks, documents = attention_inputs(256, seed=8)
    kwargs = {"scaling": 0.25, "sliding_window": 128, "documents": documents}
    assert not flash.can_run(query, key, value, sinks)
    assert torch.equal(
        flash(query, key, value, sinks, **kwargs), eager_attention(query, key, value, sinks, **kwargs)
    )


# ---------------------------------------------------------------------------------------------------
# Experts
# ---------------------------------------------------------------------------------------------------


def test_sort_by_expert_groups_assignments_and_inverts() -> None:
    indices = torch.tensor([[3, 0], [0, 2], [3, 2], [1, 0]])
    routing = sort_by_expert(indices, num_experts=5)
    flat = indices.reshape(-1)
    assert routing.experts.tolist() == sorted(flat.tolist())
    assert torch.equal(flat[routing.order], routing.experts)
    assert torch.equal(routing.tokens, routing.order // 2)
    assert routing.offsets.tolist() == [3, 4, 6, 8, 8]
    assert torch.equal(routing.order[routing.inverse], torch.arange(8))


def test_expert_gemms_gather_rows_per_expert_and_fall_back_to_grouped_mm_on_a_cpu() -> None:
    generator = torch.Generator().manual_seed(4)
    routing = sort_by_expert(torch.randint(0, 5, (40, 2), generator=generator), 6)  # expert 5: no rows
    assert torch.equal(routing.cu_seqlens, torch.cat([torch.zeros(1, dtype=torch.int32), routing.offsets]))
    assert routing.tokens_int32.dtype == torch.int32 and torch.equal(
        routing.tokens_int32.long(), routing.tokens
    )
    tokens = torch.randn(40, 16, generator=generator)
    weights = torch.randn(6, 16, 24, generator=generator)
    want = torch.empty(80, 24)
    for row, (token, expert) in enumerate(zip(routing.tokens, routing.experts, strict=True)):
        want[row] = tokens[token] @ weights[expert]
    for backend in ("auto", "torch"):  # auto: quack cannot run on a CPU
        gemm = ExpertGemm(backend)
        got = gemm(tokens, weights, routing.offsets, routing.cu_seqlens, routing.tokens_int32)
        assert torch.allclose(got, want, atol=1e-5)
        rows = tokens.index_select(0, routing.tokens)
        assert torch.allclose(gemm(rows, weights, routing.offsets, routing.cu_seqlens, None), want, atol=1e-5)
        assert not gemm.fuses(tokens.bfloat16())  # the fused gate_up epilogue is quack's, on a GPU
    with pytest.raises(GptossTuneError, match="Unknown expert GEMM"):
        ExpertGemm("cublas")
    if quack() is None:
        for backend in ("quack", "quack-fused"):
            with pytest.raises(GptossTuneError, match="quack-kernels"):
                ExpertGemm(backend)


def test_token_sums_and_slot_grids_match_scatter_adds_and_are_adjoint() -> None:
    indices = torch.tensor([[3, 0], [0, 2], [3, 2], [1, 0], [2, 1]])
    routing = sort_by_expert(indices, num_experts=4)
    rows = torch.randn(10, 3, dtype=torch.float64)
    expected_sums = torch.zeros(5, 3, dtype=torch.float64).index_add(0, routing.tokens, rows)
    torch.testing.assert_close(sum_over_slots(rows, routing), expected_sums)
    grid = place_in_slots(rows, routing)  # [N, E * 3]
    for row, (token, expert) in enumerate(
        zip(routing.tokens.tolist(), routing.experts.tolist(), strict=True)
    ):
        assert torch.equal(grid[token, 3 * expert : 3 * expert + 3], rows[row])
    assert grid.count_nonzero() == rows.count_nonzero()  # zeros elsewhere
    per_token = torch.randn(5, 12, dtype=torch.float64)
    # <place(rows), per_token> == <rows, pick(per_token)>: pick_slots is place_in_slots' adjoint
    torch.testing.assert_close((grid * per_token).sum(), (rows * pick_slots(per_token, routing)).sum())


def test_expert_weight_grad_is_the_per_group_product() -> None:
    offsets = torch.tensor([3, 3, 7], dtype=torch.int32)  # the middle group is empty
    cu_seqlens = torch.cat([torch.zeros(1, dtype=torch.int32), offsets])
    inputs, grads = torch.randn(7, 4), torch.randn(7, 8)
    expected = torch.stack([inputs[:3].t() @ grads[:3], torch.zeros(4, 8), inputs[3:].t() @ grads[3:]])
    for backend in ("auto", "torch"):  # auto: quack cannot run on a CPU
        got = ExpertGemm(backend).weight_grad(inputs, grads, offsets, cu_seqlens)
        torch.testing.assert_close(got, expected)


def test_swiglu_backward_matches_autograd_including_the_clamp_ends() -> None:
    limit, alpha = 7.0, 1.702
    gate_up = 4 * torch.randn(6, 16, dtype=torch.float64)
    gate_up[0, :4] = torch.tensor([limit, limit, -limit, -limit], dtype=torch.float64)  # on the bounds
    gate_up.requires_grad_(True)
    grad = torch.randn(6, 8, dtype=torch.float64)
    (expected,) = torch.autograd.grad(clamped_swiglu(gate_up, alpha, limit), gate_up, grad)
    torch.testing.assert_close(clamped_swiglu_backward(gate_up.detach(), grad, alpha, limit), expected)


def test_low_rank_helpers_match_per_expert_products() -> None:
    indices = torch.tensor([[3, 0], [0, 2], [3, 2], [1, 0], [2, 1]])
    routing = sort_by_expert(indices, num_experts=4)
    tokens, lora_a = torch.randn(5, 6), torch.randn(4, 6, 2)
    picked = low_rank_inputs(tokens, lora_a, routing)
    for row, (token, expert) in enumerate(
        zip(routing.tokens.tolist(), routing.experts.tolist(), strict=True)
    ):
        torch.testing.assert_close(picked[row], tokens[token] @ lora_a[expert])
    inputs, lora_b = torch.randn(10, 2), torch.randn(4, 2, 7)
    expected = torch.zeros(5, 7)
    for row, (token, expert) in enumerate(
        zip(routing.tokens.tolist(), routing.experts.tolist(), strict=True)
    ):
        expected[token] += inputs[row] @ lora_b[expert]
    torch.testing.assert_close(sum_low_rank_outputs(inputs, lora_b, routing), expected)


def experts_with_adapters(
    hidden: int = 32,
    inner: int = 24,
    num_experts: int = 6,
    rank: int = 8,
    targets: tuple[str, ...] = ("experts",),
    cls: type[Experts] = Experts,
) -> Experts:
    """Random experts (same values for the same arguments) with random adapters on `targets`."""
    config = preset_config("tiny")
    config.hidden_size, config.intermediate_size, config.num_local_experts = hidden, inner, num_experts
    experts = cls(config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in experts.parameters():
            param.copy_(0.3 * torch.randn(param.shape, generator=generator))
    if "gate_up_proj" in targets or "experts" in targets:
        experts.gate_up_lora = ExpertLora(experts.weight_shape("gate_up_proj"), rank, 2.0, generator)
    if "down_proj" in targets or "experts" in targets:
        experts.down_lora = ExpertLora(experts.weight_shape("down_proj"), rank, 0.5, generator)
    with torch.no_grad():  # B starts at zero; make the adapters matter
        for module in (experts.gate_up_lora, experts.down_lora):
            if module is not None:
                module.lora_B.copy_(0.3 * torch.randn(module.lora_B.shape, generator=generator))
    experts.requires_grad_(False)
    for module in (experts.gate_up_lora, experts.down_lora):
        if module is not None:
            module.requires_grad_(True)
    return experts


def routing_inputs(tokens: int, num_experts: int, top_k: int, hidden: int, used_experts: int | None = None):
    generator = torch.Generator().manual_seed(1)
    pool = used_experts or num_experts  # route to the first `pool` experts only: the rest get no token
    indices = torch.stack([torch.randperm(pool, generator=generator)[:top_k] for _ in range(tokens)])
    weights = torch.softmax(torch.randn(tokens, top_k, generator=generator), dim=-1)
    hidden_states = torch.randn(tokens, hidden, generator=generator)
    return hidden_states.requires_grad_(True), indices, weights.requires_grad_(True)


def experts_outputs_and_grads(experts_fn, experts: Experts, hidden, indices, weights, dtype: torch.dtype):
    trainable = [p for p in experts.parameters() if p.requires_grad]
    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        out = experts_fn(experts, hidden, indices, weights)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(9)).to(out.dtype)
    grads = torch.autograd.grad(out, [hidden, weights, *trainable], grad)
    return out, grads


@pytest.mark.parametrize("compile", [False, True])
@pytest.mark.parametrize(
    "targets,rank,used_experts",
    [
        (("experts",), 8, None),
        (("experts",), 3, 4),
        (("gate_up_proj",), 8, None),
        (("down_proj",), 8, None),
        ((), 8, 2),
    ],
)
def test_grouped_experts_match_the_eager_loop_with_gradients(compile, targets, rank, used_experts) -> None:
    experts = experts_with_adapters(rank=rank, targets=targets)
    hidden, indices, weights = routing_inputs(40, experts.num_experts, 2, 32, used_experts)
    grouped = GroupedExperts(compile=compile)
    assert grouped.can_run(experts, torch.float32)
    actual, actual_grads = experts_outputs_and_grads(
        grouped, experts, hidden, indices, weights, torch.float32
    )
    expected, expected_grads = experts_outputs_and_grads(
        eager_experts, experts, hidden, indices, weights, torch.float32
    )
    assert relative_error(actual, expected) <= FP32_TOLERANCE
    assert len(actual_grads) == 2 + 2 * len([m for m in (experts.gate_up_lora, experts.down_lora) if m])
    for got, want in zip(actual_grads, expected_grads, strict=True):
        assert relative_error(got, want) <= FP32_TOLERANCE


def test_grouped_experts_in_bf16_stay_within_bf16_error() -> None:
    experts = experts_with_adapters()
    experts.to(torch.bfloat16)
    for module in (experts.gate_up_lora, experts.down_lora):
        module.float()  # adapters in fp32, as the trainer keeps them
    hidden, indices, weights = routing_inputs(64, experts.num_experts, 2, 32)
    hidden = hidden.detach().bfloat16().requires_grad_(True)
    weights = weights.detach().bfloat16().requires_grad_(True)
    actual, actual_grads = experts_outputs_and_grads(
        GroupedExperts(compile=False), experts, hidden, indices, weights, torch.bfloat16
    )
    expected, expected_grads = experts_outputs_and_grads(
        eager_experts, experts, hidden, indices, weights, torch.bfloat16
    )
    assert actual.dtype == torch.bfloat16
    assert relative_error(actual, expected) <= BF16_TOLERANCE
    for got, want in zip(actual_grads, expected_grads, strict=True):
        assert relative_error(got, want) <= BF16_TOLERANCE


def saved_bytes(run) -> int:
    """Bytes of the distinct storages autograd keeps for backward while `run()` builds its graph."""
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        run()
    return sum(storages.values())


def test_grouped_experts_keep_only_tokens_pre_activation_and_low_rank_inputs_for_backward() -> None:
    hidden_size, inner, tokens, top_k, rank = 64, 96, 50, 2, 8
    experts = experts_with_adapters(hidden=hidden_size, inner=inner, rank=rank)
    hidden, indices, weights = routing_inputs(tokens, experts.num_experts, top_k, hidden_size)
    rows = tokens * top_k
    budget = 4 * (tokens * hidden_size + rows * 2 * inner + 2 * rows * rank + rows)  # fp32
    assert saved_bytes(lambda: GroupedExperts(compile=False)(experts, hidden, indices, weights)) <= budget
    # autograd through the eager loop keeps several [S, I] and [S, H] tensors more
    assert saved_bytes(lambda: eager_experts(experts, hidden, indices, weights)) > 1.5 * budget


@pytest.mark.parametrize("compile", [False, True])
@pytest.mark.parametrize("targets", [("experts",), ("gate_up_proj",), ("down_proj",), ()])
def test_grouped_experts_recomputing_gate_up_keep_less_for_the_same_gradients(compile, targets) -> None:
    hidden_size, inner, tokens, top_k = 64, 96, 50, 2
    experts = experts_with_adapters(hidden=hidden_size, inner=inner, targets=targets)
    hidden, indices, weights = routing_inputs(tokens, experts.num_experts, top_k, hidden_size)
    grouped = GroupedExperts(compile=compile)
    kept, kept_grads = experts_outputs_and_grads(grouped, experts, hidden, indices, weights, torch.float32)
    kept_bytes = saved_bytes(lambda: grouped(experts, hidden, indices, weights))
    experts.recompute_gate_up = True
    again, again_grads = experts_outputs_and_grads(grouped, experts, hidden, indices, weights, torch.float32)
    again_bytes = saved_bytes(lambda: grouped(experts, hidden, indices, weights))
    assert torch.equal(again, kept)
    for got, want in zip(again_grads, kept_grads, strict=True):
        assert torch.equal(got, want)
    # the fp32 pre-activation, less the token rows where only the recomputation reads them
    reads_tokens_anyway = experts.gate_up_lora is not None
    pre_activation, token_rows = 4 * tokens * top_k * 2 * inner, 4 * tokens * hidden_size
    assert kept_bytes - again_bytes >= pre_activation - (0 if reads_tokens_anyway else token_rows)
    with torch.no_grad():  # nothing is kept without autograd: the flag changes nothing
        assert torch.equal(grouped(experts, hidden, indices, weights), kept)


@pytest.mark.parametrize("recompute_gate_up", [False, True])
@pytest.mark.parametrize("targets", [("experts",), ("down_proj",), ()])
def test_grouped_experts_of_a_norms_output_keep_its_input_instead_for_the_same_gradients(
    recompute_gate_up, targets
) -> None:
    hidden_size, tokens = 32, 40
    experts = experts_with_adapters(hidden=hidden_size, targets=targets)
    experts.recompute_gate_up = recompute_gate_up
    pre_norm, indices, weights = routing_inputs(tokens, experts.num_experts, 2, hidden_size)
    norm = RMSNorm(hidden_size, 1e-5)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * torch.randn(hidden_size, generator=torch.Generator().manual_seed(5)))
    norm.requires_grad_(False)

    def run(recompute_norm: bool) -> torch.Tensor:
        source = NormSource(pre_norm, norm) if recompute_norm else None
        return GroupedExperts(compile=False)(experts, norm(pre_norm), indices, weights, norm_source=source)

    def outputs_and_grads(recompute_norm: bool):
        out = run(recompute_norm)
        grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(9))
        trainable = [p for p in experts.parameters() if p.requires_grad]
        return out.detach(), torch.autograd.grad(out, [pre_norm, weights, *trainable], grad)

    kept, kept_grads = outputs_and_grads(recompute_norm=False)
    again, again_grads = outputs_and_grads(recompute_norm=True)
    assert torch.equal(again, kept)
    for got, want in zip(again_grads, kept_grads, strict=True):
        assert torch.equal(got, want)
    token_rows = 4 * tokens * hidden_size
    reads_tokens = experts.gate_up_lora is not None or recompute_gate_up
    saved = {flag: saved_bytes(lambda flag=flag: run(flag)) for flag in (False, True)}
    assert saved[False] - saved[True] == (token_rows if reads_tokens else 0)


def test_grouped_experts_leave_trainable_base_weights_to_the_eager_loop() -> None:
    experts = experts_with_adapters()
    assert GroupedExperts.can_run(experts, torch.float32)
    experts.down_proj_bias.requires_grad_(True)
    assert not GroupedExperts.can_run(experts, torch.float32)


def test_grouped_experts_fall_back_when_sizes_break_grouped_mm_alignment() -> None:
    experts = experts_with_adapters(hidden=30, inner=30)  # 30 fp32 values: rows of 120 bytes
    hidden, indices, weights = routing_inputs(10, experts.num_experts, 2, 30)
    grouped = GroupedExperts(compile=False)
    assert not grouped.can_run(experts, torch.float32)
    assert torch.equal(
        grouped(experts, hidden, indices, weights), eager_experts(experts, hidden, indices, weights)
    )


class DoubledStorageExperts(Experts):
    """Stands in for other storage (e.g. MXFP4): the dense weights come from the accessors only."""

    def gate_up_weight(self) -> torch.Tensor:
        return 2 * self.gate_up_proj

    def down_weight(self) -> torch.Tensor:
        return 2 * self.down_proj


def test_grouped_experts_read_weights_only_through_the_accessors() -> None:
    doubled = experts_with_adapters(cls=DoubledStorageExperts)
    expected_experts = experts_with_adapters()
    with torch.no_grad():
        expected_experts.gate_up_proj.mul_(2)
        expected_experts.down_proj.mul_(2)
    hidden, indices, weights = routing_inputs(20, doubled.num_experts, 2, 32)
    grouped = GroupedExperts(compile=False)
    actual, actual_grads = experts_outputs_and_grads(
        grouped, doubled, hidden, indices, weights, torch.float32
    )
    expected, expected_grads = experts_outputs_and_grads(
        eager_experts, expected_experts, hidden, indices, weights, torch.float32
    )
    assert relative_error(actual, expected) <= FP32_TOLERANCE
    for got, want in zip(actual_grads, expected_grads, strict=True):  # backward fetches them again
        assert relative_error(got, want) <= FP32_TOLERANCE


def test_aligned_lora_factors_pad_the_rank_without_changing_the_product() -> None:
    experts = experts_with_adapters(rank=3)
    lora_a, lora_b = aligned_lora_factors(experts.gate_up_lora, torch.bfloat16)
    assert lora_a.shape[-1] == lora_b.shape[-2] == 8
    expected = torch.bmm(experts.gate_up_lora.lora_A, experts.gate_up_lora.lora_B)
    assert relative_error(torch.bmm(lora_a.float(), lora_b.float()), expected) <= BF16_TOLERANCE
    lora_a, lora_b = aligned_lora_factors(experts.gate_up_lora, torch.float32)
    assert lora_a.shape[-1] == 4


# ---------------------------------------------------------------------------------------------------
# Loss
# ---------------------------------------------------------------------------------------------------


def loss_inputs(dtype: torch.dtype = torch.float32):
    generator = torch.Generator().manual_seed(3)
    length, hidden_size, vocab = 150, 16, 500
    hidden = torch.randn(1, length, hidden_size, generator=generator).to(dtype).requires_grad_(True)
    weight = (0.5 * torch.randn(vocab, hidden_size, generator=generator)).to(dtype)
    labels = torch.randint(0, vocab, (1, length), generator=generator)
    labels[0, :30] = IGNORE_INDEX
    positions = packed_positions([60, 50, 40])
    return hidden, weight, labels, positions


@pytest.mark.parametrize("compile", [False, True])
@pytest.mark.parametrize("chunk", [1, 7, 64, 4096])
def test_fused_loss_matches_the_chunked_reference_with_gradients(compile, chunk) -> None:
    hidden, weight, labels, positions = loss_inputs()
    actual, actual_count = FusedLinearCrossEntropy(chunk, compile=compile)(hidden, weight, labels, positions)
    (actual_grad,) = torch.autograd.grad(actual / actual_count, hidden)
    expected, expected_count = chunked_causal_lm_loss(hidden, weight, labels, positions)
    (expected_grad,) = torch.autograd.grad(expected / expected_count, hidden)
    assert actual_count.item() == expected_count.item() == 149 - 29 - 2
    assert relative_error(actual, expected) <= FP32_TOLERANCE
    assert relative_error(actual_grad, expected_grad) <= FP32_TOLERANCE


def test_fused_loss_in_bf16_stays_within_bf16_error() -> None:
    hidden, weight, labels, positions = loss_inputs(torch.bfloat16)
    actual, _ = FusedLinearCrossEntropy(32, compile=False)(hidden, weight, labels, positions)
    (actual_grad,) = torch.autograd.grad(actual, hidden)
    expected, _ = chunked_causal_lm_loss(hidden, weight, labels, positions)
    (expected_grad,) = torch.autograd.grad(expected, hidden)
    assert actual.dtype == torch.float32
    assert relative_error(actual, expected) <= 1e-3
    assert relative_error(actual_grad, expected_grad) <= BF16_TOLERANCE


def test_fused_loss_without_trained_tokens_is_zero_and_differentiable() -> None:
    hidden, weight, labels, positions = loss_inputs()
    total, count = FusedLinearCrossEntropy()(hidden, weight, torch.full_like(labels, IGNORE_INDEX), positions)
    (grad,) = torch.autograd.grad(total, hidden)
    assert total.item() == 0.0 and count.item() == 0 and grad.abs().sum() == 0


def test_fused_loss_falls_back_when_lm_head_is_trainable() -> None:
    hidden, weight, labels, positions = loss_inputs()
    weight.requires_grad_(True)
    with pytest.raises(ValueError, match="lm_head"):
        linear_cross_entropy_sum(hidden[0], weight, labels[0])
    total, _ = FusedLinearCrossEntropy()(hidden, weight, labels, positions)
    total.backward()
    assert weight.grad is not None and weight.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------------
# Checkpointing policy
# ---------------------------------------------------------------------------------------------------


def gradients_under_plan(model: GptOss, batch, plan: RecomputePlan):
    """(loss, LoRA gradients, how often each layer's forward ran) for one step under `plan`; the
    model recomputes nothing afterwards."""
    calls = [0] * len(model.model.layers)
    hooks = [
        layer.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
        for i, layer in enumerate(model.model.layers)
    ]
    plan.apply(model)
    try:
        loss, grads = lora_gradients(model, *batch)
    finally:
        for hook in hooks:
            hook.remove()
        model.set_gradient_checkpointing(False)
    return loss, grads, calls


def test_fast_layers_keep_neither_norms_output_for_the_same_gradients() -> None:
    model = small_model()
    assert not model.norms_recomputed  # the eager references keep what autograd keeps
    assert RecomputePlan.of(model).describe(2) == "0 of 2 layers recomputed"
    enable_fast_paths(model, compile=False)
    batch = packed_batch(length=64)
    assert model.norms_recomputed  # the default with the fast paths
    assert RecomputePlan.of(model).describe(2) == "0 of 2 layers recomputed; norm outputs recomputed"
    expected_loss, expected = lora_gradients(model, *batch)
    expected_bytes = saved_bytes(lambda: model.loss(*batch))
    RecomputePlan(norms_kept=True).apply(model)
    assert not model.norms_recomputed and RecomputePlan.of(model) == RecomputePlan(norms_kept=True)
    kept_loss, kept = lora_gradients(model, *batch)
    kept_bytes = saved_bytes(lambda: model.loss(*batch))
    assert kept_loss == expected_loss
    for name, grad in expected.items():
        assert torch.equal(kept[name], grad), name
    # two fp32 [N, H] tensors per layer, the attention's and the experts' input, but the first
    # layer's attention input: it comes from the frozen embedding, whose norm keeps nothing
    config = model.config
    assert kept_bytes - expected_bytes == (2 * config.num_hidden_layers - 1) * 64 * config.hidden_size * 4


@pytest.mark.slow
def test_compiled_fast_layers_normalize_again_to_the_same_gradients_under_autocast() -> None:
    """The compiled norm runs again in backward without autograd (another compiled graph than the
    forward's): on the CPU it gives the same bits, so the same LoRA gradients (tests/gpu: CUDA)."""
    model = small_model()
    enable_fast_paths(model, compile=True)
    batch = packed_batch(length=256)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        again_loss, again = lora_gradients(model, *batch)
        RecomputePlan(norms_kept=True).apply(model)
        kept_loss, kept = lora_gradients(model, *batch)
    assert again_loss == kept_loss
    for name, grad in kept.items():
        assert torch.equal(again[name], grad), name


def test_checkpointed_fast_layers_train_the_same() -> None:
    """Checkpointing a layer whose projections and experts normalize again in backward: the
    recomputed forward hands them new norm inputs, and the gradients stay those of keeping all."""
    model = small_model()
    enable_fast_paths(model, compile=False)
    batch = packed_batch(length=64)
    expected_loss, expected = lora_gradients(model, *batch)
    actual_loss, actual, calls = gradients_under_plan(model, batch, RecomputePlan((0, 1)))
    assert calls == [2, 2]
    assert actual_loss == expected_loss
    for name, grad in expected.items():
        assert torch.equal(actual[name], grad), name


def test_gate_up_recomputation_trains_the_same_and_runs_no_layer_again() -> None:
    model = small_model()
    enable_fast_paths(model, compile=False)
    batch = packed_batch(length=64)
    expected_loss, expected = lora_gradients(model, *batch)
    RecomputePlan(gate_up=(0, 1)).apply(model)
    assert model.gate_up_recomputed_layers == frozenset({0, 1})
    actual_loss, actual, calls = gradients_under_plan(model, batch, RecomputePlan(gate_up=(0, 1)))
    assert model.gate_up_recomputed_layers == frozenset()
    assert calls == [1, 1]
    assert actual_loss == expected_loss
    for name, grad in expected.items():
        assert torch.equal(actual[name], grad), name


def test_a_layer_is_either_checkpointed_or_recomputes_its_gate_up() -> None:
    model = small_model()
    with pytest.raises(ValueError, match=r"layers \[1\] are both checkpointed"):
        model.set_gradient_checkpointing([1], recompute_gate_up=[1])
    model.set_gradient_checkpointing([0], recompute_gate_up=[1])
    assert model.model.checkpointed_layers == frozenset({0})
    assert model.gate_up_recomputed_layers == frozenset({1})
    assert RecomputePlan((0,), (1,)).describe(2) == (
        "1 of 2 layers recomputed, the experts' gate_up in 1 more; norm outputs recomputed"
    )
    assert RecomputePlan(norms_kept=True).describe(2) == "0 of 2 layers recomputed"
    measured = LayerMemory(
        3 << 29,
        1 << 27,
        0,
        gate_up_saved=1 << 29,
        forward_seconds=0.009,
        gate_up_seconds=0.0034,
        norms_saved=13 << 27,
        norms_seconds=0.00012,
    )
    assert measured.describe() == (
        "a layer keeps 1.50 GiB (checkpointed 0.12; keeping its norms' outputs 1.62), 0.50 with its "
        "gate_up recomputed; recomputing it costs 9.0 ms, its gate_up 3.4 ms, its norms' outputs 0.12 ms"
    )


def test_recompute_plan_keeps_the_norms_outputs_only_if_nothing_needs_recomputing() -> None:
    layer = LayerMemory(saved=10, checkpointed=1, transient=2, norms_saved=12)
    assert choose_recompute_plan(4, layer, available=50) == RecomputePlan(norms_kept=True)  # 3 * 12 + 12 + 2
    assert choose_recompute_plan(4, layer, available=49) == RecomputePlan()  # 3 * 10 + 10 + 2
    assert choose_recompute_plan(4, layer, available=41) == RecomputePlan((0,))
    # unmeasured (None): the norms' outputs are not kept
    assert choose_recompute_plan(4, LayerMemory(10, 1, 2), available=100) == RecomputePlan()


def test_recompute_plan_checkpoints_as_few_layers_as_fit() -> None:
    layer = LayerMemory(saved=10, checkpointed=1, transient=0)
    assert choose_recompute_plan(4, layer, available=40) == RecomputePlan()  # 4 * 10 fits
    assert choose_recompute_plan(4, layer, available=22) == RecomputePlan((0, 1))  # 2 * 1 + 2 * 10
    assert choose_recompute_plan(4, layer, available=21) == RecomputePlan((0, 1, 2))
    # Nothing fits: the plan that keeps least, every layer checkpointed. (Checkpointing the last one
    # does not lower the backward peak, its backward starts by recomputing it, but it keeps less
    # while the loss runs.)
    assert choose_recompute_plan(4, layer, available=3) == RecomputePlan((0, 1, 2, 3))
    assert plan_peak_bytes(4, layer, RecomputePlan((0, 1, 2))) == 3 * 1 + 10
    assert plan_peak_bytes(4, layer, RecomputePlan((0, 1, 2, 3))) == 3 * 1 + 1 + 10
    # checkpointing that gains nothing is never chosen
    assert choose_recompute_plan(4, LayerMemory(1, 1, 0), available=0) == RecomputePlan()


def test_recompute_plan_counts_each_layers_transient_when_its_backward_runs() -> None:
    layer = LayerMemory(saved=10, checkpointed=1, transient=5, gate_up_saved=4, gate_up_transient=12)
    # backward of the last layer (keeps all) peaks at 3 * 4 + 10 + 5; of layer 2 at 2 * 4 + 4 + 12
    assert plan_peak_bytes(4, layer, RecomputePlan((), (0, 1, 2))) == 27
    assert plan_peak_bytes(4, layer, RecomputePlan((), (0, 1, 2, 3))) == 3 * 4 + 16


def test_recompute_plan_takes_the_cheaper_way_per_byte() -> None:
    # gate_up saves 6 for 1 s, a checkpoint 9 for 3 s
    layer = LayerMemory(10, 1, 0, gate_up_saved=4, forward_seconds=3.0, gate_up_seconds=1.0)
    assert choose_recompute_plan(4, layer, available=34) == RecomputePlan((), (0,))
    assert choose_recompute_plan(4, layer, available=22) == RecomputePlan((), (0, 1, 2))
    assert choose_recompute_plan(4, layer, available=22, policy="layers") == RecomputePlan((0, 1))
    assert choose_recompute_plan(4, layer, available=16) == RecomputePlan((), (0, 1, 2, 3))  # 3 * 4 + 4
    # 15 needs a checkpoint: one layer, and gate_up in the other three (3 s + 3 s)
    assert choose_recompute_plan(4, layer, available=15) == RecomputePlan((0,), (1, 2, 3))
    pricier = LayerMemory(10, 1, 0, gate_up_saved=4, forward_seconds=3.0, gate_up_seconds=2.5)
    assert choose_recompute_plan(4, pricier, available=22) == RecomputePlan((0, 1))
    # unmeasured or useless gate_up recomputation is never chosen
    assert choose_recompute_plan(4, LayerMemory(10, 1, 0), available=22) == RecomputePlan((0, 1))
    useless = LayerMemory(10, 1, 0, gate_up_saved=10, gate_up_seconds=0.0)
    assert choose_recompute_plan(4, useless, available=22) == RecomputePlan((0, 1))


# ---------------------------------------------------------------------------------------------------
# The whole model
# ---------------------------------------------------------------------------------------------------


def small_model(seed: int = 0) -> GptOss:
    config = preset_config("tiny")
    config.vocab_size = 1000
    config.pad_token_id = config.eos_token_id = None
    config.sliding_window = 128  # a window the block masks can take
    model = GptOss(config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            param.copy_(1 + 0.1 * noise if "norm" in name else 0.2 * noise)
    params = apply_lora(model, LoraOptions(rank=8, alpha=16.0), generator=generator)
    with torch.no_grad():
        for name, param in params.items():
            if "lora_B" in name:
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))
    return model


def packed_batch(length: int = 384, seed: int = 4):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, 1000, (1, length), generator=generator)
    labels = input_ids.clone()
    labels[0, : length // 10] = IGNORE_INDEX
    first, second, third = length * 2 // 5, length // 4, length // 4  # and a short last document
    return input_ids, labels, packed_positions([first, second, third, length - first - second - third])


def lora_gradients(model: GptOss, input_ids, labels, positions) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad()
    total, count = model.loss(input_ids, labels, positions)
    (total / count).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    return (total / count).item(), grads


def test_enable_fast_paths_trains_the_same_as_the_eager_model() -> None:
    reference, fast = small_model(), small_model()
    installed = enable_fast_paths(fast, compile=False)
    assert "grouped experts" in installed.describe()
    batch = packed_batch()
    expected_loss, expected = lora_gradients(reference, *batch)
    actual_loss, actual = lora_gradients(fast, *batch)
    assert abs(actual_loss - expected_loss) <= FP32_TOLERANCE * expected_loss
    for name, grad in expected.items():
        assert relative_error(actual[name], grad) <= 1e-4, name


def test_compiled_norm_and_rotary_match_the_eager_functions_with_gradients() -> None:
    generator = torch.Generator().manual_seed(3)
    hidden = torch.randn(2, 5, 16, generator=generator, requires_grad=True)
    weight = torch.randn(16, generator=generator, requires_grad=True)
    query = torch.randn(2, 5, 4, 8, generator=generator, requires_grad=True)  # [B, T, H, D]
    key = torch.randn(2, 5, 2, 8, generator=generator, requires_grad=True)
    angles = torch.randn(2, 5, 4, generator=generator)
    cos, sin = angles.cos(), angles.sin()
    installed = enable_fast_paths(small_model(), compile=True)
    cases = [
        (rms_norm, installed.norm, (hidden, weight, 1e-5), (hidden, weight)),
        (rotate_query_key, installed.rotary, (query, key, cos, sin), (query, key)),
    ]
    for eager, compiled, args, inputs in cases:
        expected, got = eager(*args), compiled(*args)
        expected, got = (
            torch.cat([t.flatten() for t in out]) if isinstance(out, tuple) else out
            for out in (expected, got)
        )
        probe = torch.randn(expected.shape, generator=generator)
        want = torch.autograd.grad(expected, inputs, probe)
        have = torch.autograd.grad(got, inputs, probe)
        assert relative_error(got, expected) <= FP32_TOLERANCE
        for g, w in zip(have, want, strict=True):
            assert relative_error(g, w) <= FP32_TOLERANCE


def test_fast_model_forward_with_flex_attention_matches_eager() -> None:
    reference, fast = small_model(), small_model()
    enable_fast_paths(fast, compile=False)
    input_ids, _, positions = packed_batch()
    with torch.no_grad():  # FlexAttention runs forward-only on a CPU
        expected = reference(input_ids, positions)
        actual = fast(input_ids, positions)
    assert fast.model.layers[0].self_attn.attention_fn.masks_built == 2
    assert relative_error(actual, expected) <= 1e-4


def test_selective_checkpointing_recomputes_only_the_chosen_layers() -> None:
    model = small_model()
    batch = packed_batch(length=64)
    _, expected = lora_gradients(model, *batch)
    _, actual, calls = gradients_under_plan(model, batch, RecomputePlan((1,)))
    assert calls == [1, 2]  # layer 1 ran again in backward
    for name, grad in expected.items():
        assert relative_error(actual[name], grad) <= FP32_TOLERANCE, name
