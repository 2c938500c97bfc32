"""Grouped-GEMM experts with the LoRA computed on the low-rank side.

The eager reference is `gptoss_tune.model.gpt_oss.eager_experts` (a loop over experts). Here the
N * k (token, expert) assignments are sorted by expert once, and each base projection of every
expert runs as one grouped GEMM over the sorted rows:

    gate_up = x W_e + b_e + s * (x A_e) B_e
    act     = clamped SwiGLU(gate_up)
    y       = act V_e + c_e + s * (act A'_e) B'_e
    out[t]  = sum over t's k experts of weight * y

W + BA is never formed. The low-rank factors take whichever GEMM shape is cheaper:
  - x A_e for every expert at once is one dense GEMM over the N tokens ([N, H] x [H, E*r]), before
    the rows are gathered; each assignment then picks its expert's r columns;
  - (x A_e) B_e is a thin grouped GEMM over the sorted rows (it must be per assignment: the SwiGLU
    follows);
  - act A'_e is a thin grouped GEMM; the routing-weighted sum over a token's experts of
    (act A'_e) B'_e is one dense GEMM of a per-token [E*r] grid (zeros except the token's k
    experts) with all of B' ([E*r, H]).
Moving rows between token order and sorted order never uses atomics: gathering is an index_select
whose backward sums each token's k rows, and summing a token's k rows is an index_select whose
backward gathers (`gather_rows` / `sum_token_rows`, each the other's adjoint).

The bias, the LoRA sum, the SwiGLU and the routing weights are elementwise "epilogues", compiled
with torch.compile so each is one fused kernel forward and backward. No host synchronization:
expert offsets come from a searchsorted on the sorted ids.

Weights are read only through `Experts.gate_up_weight()` / `Experts.down_weight()`, so storage
(plain bf16, MXFP4 dequantized on the fly) is the `Experts` module's business, and the base GEMMs
go through `frozen_weight_op`: autograd keeps no reference to the (possibly dequantized) weight and
backward fetches it again, so a layer's dense experts live only while that layer computes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F
from torch import Tensor

from gptoss_tune.model.gpt_oss import Experts, eager_experts
from gptoss_tune.model.lora import ExpertLora
from gptoss_tune.model.mxfp4 import frozen_weight_op

GROUPED_MM_ALIGNMENT_BYTES = 16  # grouped_mm wants every row stride a multiple of 16 bytes


def grouped_mm(rows: Tensor, weights: Tensor, offsets: Tensor) -> Tensor:
    """rows [S, K] sorted by group, weights [G, K, N], offsets [G] int32 group ends -> [S, N]."""
    if hasattr(F, "grouped_mm"):  # torch >= 2.10
        return F.grouped_mm(rows, weights, offs=offsets)
    return torch._grouped_mm(rows, weights, offs=offsets)


def grouped_mm_available() -> bool:
    return hasattr(F, "grouped_mm") or hasattr(torch, "_grouped_mm")


def _aligned(size: int, dtype: torch.dtype) -> bool:
    return (size * dtype.itemsize) % GROUPED_MM_ALIGNMENT_BYTES == 0


# ---------------------------------------------------------------------------------------------------
# Routing
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SortedAssignments:
    """The N * k (token, expert) assignments sorted by expert (stable)."""

    order: Tensor  # [S] index into the flattened [N * k] routing tensors
    tokens: Tensor  # [S] the token of each sorted assignment
    experts: Tensor  # [S] the expert of each sorted assignment (non-decreasing)
    offsets: Tensor  # [E] int32, end of each expert's rows
    inverse: Tensor  # [S] the sorted position of each flattened assignment
    top_k: int

    @property
    def num_tokens(self) -> int:
        return self.order.numel() // self.top_k

    @property
    def num_experts(self) -> int:
        return self.offsets.numel()

    @cached_property
    def slots(self) -> Tensor:
        """[S] each assignment's row in a [N * E] (token, expert) grid."""
        return self.tokens * self.num_experts + self.experts


def sort_by_expert(expert_indices: Tensor, num_experts: int) -> SortedAssignments:
    flat = expert_indices.reshape(-1)
    top_k = expert_indices.shape[1]
    order = torch.argsort(flat, stable=True)
    experts = flat.index_select(0, order)
    bounds = torch.arange(num_experts, device=flat.device, dtype=experts.dtype)
    offsets = torch.searchsorted(experts, bounds, right=True).to(torch.int32)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    return SortedAssignments(order, order // top_k, experts, offsets, inverse, top_k)


def _sum_over_slots(rows: Tensor, routing: SortedAssignments) -> Tensor:
    """Sorted rows [S, D] -> each token's sum of its k rows [N, D], in fp32 at least."""
    per_slot = rows.index_select(0, routing.inverse)  # (token, slot) order
    accumulate = torch.promote_types(rows.dtype, torch.float32)
    return per_slot.view(routing.num_tokens, routing.top_k, -1).sum(dim=1, dtype=accumulate)


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, source: Tensor, routing: SortedAssignments) -> Tensor:
        ctx.routing, ctx.dtype = routing, source.dtype
        return source.index_select(0, routing.tokens)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return _sum_over_slots(grad, ctx.routing).to(ctx.dtype), None


class _SumTokenRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows: Tensor, routing: SortedAssignments) -> Tensor:
        ctx.routing, ctx.dtype = routing, rows.dtype
        return _sum_over_slots(rows, routing)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad.to(ctx.dtype).index_select(0, ctx.routing.tokens), None


def gather_rows(source: Tensor, routing: SortedAssignments) -> Tensor:
    """Token rows [N, D] -> one row per sorted assignment [S, D]. The backward sums each token's k
    rows (a gather and a reduction) instead of index_select's scatter-add, which serializes on
    atomics."""
    return _GatherRows.apply(source, routing)


def sum_token_rows(rows: Tensor, routing: SortedAssignments) -> Tensor:
    """Sorted rows [S, D] -> each token's sum over its k assignments [N, D], fp32 (the adjoint of
    `gather_rows`: its backward gathers)."""
    return _SumTokenRows.apply(rows, routing)


# ---------------------------------------------------------------------------------------------------
# Low-rank side
# ---------------------------------------------------------------------------------------------------


def aligned_lora_factors(lora: ExpertLora, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(A [E, in, r'], B [E, r', out]) in `dtype`, the rank zero-padded to r' so that grouped_mm's
    16-byte stride rule holds (zero columns of A meet zero rows of B: the product is unchanged)."""
    lora_a, lora_b = lora.lora_A.to(dtype), lora.lora_B.to(dtype)
    rank = lora_a.shape[-1]
    multiple = max(1, GROUPED_MM_ALIGNMENT_BYTES // dtype.itemsize)
    padding = -rank % multiple
    if padding:
        lora_a = F.pad(lora_a, (0, padding))
        lora_b = F.pad(lora_b, (0, 0, 0, padding))
    return lora_a, lora_b


def all_experts(factor: Tensor) -> Tensor:
    """[E, D, r] -> [D, E * r]: every expert's factor side by side, for one dense GEMM."""
    experts, dim, rank = factor.shape
    return factor.permute(1, 0, 2).reshape(dim, experts * rank)


def low_rank_inputs(tokens: Tensor, lora_a: Tensor, routing: SortedAssignments) -> Tensor:
    """x A_e for each sorted assignment [S, r]: the token rows [N, H] times all experts' A at once
    (one dense GEMM, before any gathering), then each assignment's expert's r columns."""
    rank = lora_a.shape[-1]
    per_slot = (tokens @ all_experts(lora_a)).view(-1, rank)  # [N * E, r]
    return per_slot.index_select(0, routing.slots)


def sum_low_rank_outputs(inputs: Tensor, lora_b: Tensor, routing: SortedAssignments) -> Tensor:
    """sum over each token's assignments of inputs_s B_e [N, out]: the sorted low-rank rows [S, r]
    placed in a per-token [E * r] grid (zeros for the experts a token does not use), times all
    experts' B at once (one dense GEMM)."""
    experts, rank, width = lora_b.shape
    grid = inputs.new_zeros(routing.num_tokens * experts, rank).index_copy(0, routing.slots, inputs)
    return grid.view(routing.num_tokens, experts * rank) @ lora_b.reshape(experts * rank, width)


# ---------------------------------------------------------------------------------------------------
# Epilogues (elementwise; compiled into one kernel each when compile=True)
# ---------------------------------------------------------------------------------------------------


def clamped_swiglu(gate_up: Tensor, alpha: float, limit: float) -> Tensor:
    """gpt-oss's activation on interleaved [gate, up] columns (see `Experts.activation`)."""
    gate, up = gate_up[..., ::2], gate_up[..., 1::2]
    gate = gate.clamp(max=limit)
    up = up.clamp(min=-limit, max=limit)
    return (up + 1) * (gate * torch.sigmoid(gate * alpha))


def gate_up_epilogue(
    base: Tensor,
    bias: Tensor,
    experts: Tensor,
    update: Tensor | None,
    scaling: float,
    alpha: float,
    limit: float,
) -> Tensor:
    """SwiGLU(x W_e + b_e + s * update) for the sorted rows."""
    gate_up = base + bias.index_select(0, experts).to(base.dtype)
    if update is not None:
        gate_up = gate_up + update * scaling
    return clamped_swiglu(gate_up, alpha, limit)


def down_epilogue(base: Tensor, bias: Tensor, experts: Tensor, weights: Tensor) -> Tensor:
    """weight * (act V_e + c_e) for the sorted rows (the LoRA term is added per token)."""
    return (base + bias.index_select(0, experts).to(base.dtype)) * weights.unsqueeze(-1)


# ---------------------------------------------------------------------------------------------------
# The ExpertsFn
# ---------------------------------------------------------------------------------------------------


def _adapter(module: object) -> ExpertLora | None:
    return module if isinstance(module, ExpertLora) else None


def _scaling(lora: ExpertLora | None) -> float:
    return lora.scaling if lora is not None else 0.0


class GroupedExperts:
    """An `ExpertsFn` (see `gptoss_tune.model.gpt_oss`) on grouped GEMMs.

    Falls back to the eager loop when grouped_mm is missing, when a size breaks grouped_mm's
    16-byte stride rule, or when an expert adapter is not an `ExpertLora`.
    """

    def __init__(self, compile: bool = True) -> None:
        self.compiled = compile
        self._gate_up_epilogue: Callable[..., Tensor] = gate_up_epilogue
        self._down_epilogue: Callable[..., Tensor] = down_epilogue
        if compile:
            self._gate_up_epilogue = torch.compile(gate_up_epilogue, dynamic=True)
            self._down_epilogue = torch.compile(down_epilogue, dynamic=True)

    @staticmethod
    def can_run(experts: Experts, dtype: torch.dtype) -> bool:
        if not grouped_mm_available():
            return False
        for slot in (experts.gate_up_lora, experts.down_lora):
            if slot is not None and not isinstance(slot, ExpertLora):
                return False
        double_inner, hidden = experts.gate_up_proj_bias.shape[-1], experts.down_proj_bias.shape[-1]
        return _aligned(hidden, dtype) and _aligned(double_inner // 2, dtype)

    def __call__(
        self, experts: Experts, hidden: Tensor, expert_indices: Tensor, expert_weights: Tensor
    ) -> Tensor:
        dtype = experts.gate_up_proj_bias.dtype  # the dtype the weight accessors return
        if not self.can_run(experts, dtype):
            return eager_experts(experts, hidden, expert_indices, expert_weights)
        routing = sort_by_expert(expert_indices, experts.num_experts)
        tokens = hidden.to(dtype)
        weights = expert_weights.reshape(-1).index_select(0, routing.order).to(dtype)
        activated = self.gate_up(experts, tokens, routing)
        return self.down(experts, activated, routing, weights).to(hidden.dtype)

    def gate_up(self, experts: Experts, tokens: Tensor, routing: SortedAssignments) -> Tensor:
        """Token rows [N, H] -> activated sorted rows [S, I]."""
        rows = gather_rows(tokens, routing)
        base = frozen_weight_op(
            grouped_mm, rows, experts.gate_up_weight(), experts.gate_up_weight, routing.offsets
        )
        lora, update = _adapter(experts.gate_up_lora), None
        if lora is not None:
            lora_a, lora_b = aligned_lora_factors(lora, rows.dtype)
            update = grouped_mm(low_rank_inputs(tokens, lora_a, routing), lora_b, routing.offsets)
        bias = experts.gate_up_proj_bias
        return self._gate_up_epilogue(
            base, bias, routing.experts, update, _scaling(lora), experts.alpha, experts.limit
        )

    def down(
        self, experts: Experts, activated: Tensor, routing: SortedAssignments, weights: Tensor
    ) -> Tensor:
        """Activated sorted rows [S, I] -> per-token routing-weighted sums [N, H] (fp32)."""
        base = frozen_weight_op(
            grouped_mm, activated, experts.down_weight(), experts.down_weight, routing.offsets
        )
        weighted = self._down_epilogue(base, experts.down_proj_bias, routing.experts, weights)
        out = sum_token_rows(weighted, routing)
        lora = _adapter(experts.down_lora)
        if lora is not None:
            lora_a, lora_b = aligned_lora_factors(lora, activated.dtype)
            inputs = grouped_mm(activated, lora_a, routing.offsets) * (weights.unsqueeze(-1) * lora.scaling)
            out = out + sum_low_rank_outputs(inputs, lora_b, routing)
        return out
