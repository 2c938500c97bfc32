"""Grouped-GEMM experts with the LoRA computed on the low-rank side.

The eager reference is `gptoss_tune.model.gpt_oss.eager_experts` (a loop over experts). Here the
N * k (token, expert) assignments are sorted by expert once, and each projection of every expert
runs as one grouped GEMM over the sorted rows:

    gate_up = x W_e + b_e + s * (x A_e) B_e        (grouped_mm of x with W, then A, then B)
    act     = clamped SwiGLU(gate_up)
    y       = act V_e + c_e + s * (act A'_e) B'_e
    out[t]  = sum over t's k experts of weight * y

W + BA is never formed: the adapters cost two thin grouped GEMMs per projection. The bias, the
LoRA sum, the SwiGLU and (for down) the routing weights and the return to token order are
elementwise "epilogues", compiled with torch.compile so each is one fused kernel forward and
backward. No host synchronization: expert offsets come from a searchsorted on the sorted ids.

Weights are read only through `Experts.gate_up_weight()` / `Experts.down_weight()`, so storage
(plain bf16, MXFP4 dequantized on the fly) is the `Experts` module's business, and the base GEMMs
go through `frozen_weight_op`: autograd keeps no reference to the (possibly dequantized) weight and
backward fetches it again, so a layer's dense experts live only while that layer computes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

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


def sort_by_expert(expert_indices: Tensor, num_experts: int) -> SortedAssignments:
    flat = expert_indices.reshape(-1)
    order = torch.argsort(flat, stable=True)
    experts = flat.index_select(0, order)
    bounds = torch.arange(num_experts, device=flat.device, dtype=experts.dtype)
    offsets = torch.searchsorted(experts, bounds, right=True).to(torch.int32)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    return SortedAssignments(order, order // expert_indices.shape[1], experts, offsets, inverse)


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


def low_rank_update(rows: Tensor, lora: ExpertLora | None, offsets: Tensor) -> Tensor | None:
    """(x A_e) B_e for the sorted rows, unscaled; None without an adapter."""
    if lora is None:
        return None
    lora_a, lora_b = aligned_lora_factors(lora, rows.dtype)
    return grouped_mm(grouped_mm(rows, lora_a, offsets), lora_b, offsets)


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


def down_epilogue(
    base: Tensor,
    bias: Tensor,
    experts: Tensor,
    update: Tensor | None,
    scaling: float,
    weights: Tensor,
    inverse: Tensor,
    top_k: int,
) -> Tensor:
    """Per token, the routing-weighted sum over its k experts of (act V_e + c_e + s * update)."""
    out = base + bias.index_select(0, experts).to(base.dtype)
    if update is not None:
        out = out + update * scaling
    out = out * weights.unsqueeze(-1)
    per_assignment = out.index_select(0, inverse)  # back to (token, slot) order
    return per_assignment.view(-1, top_k, out.shape[-1]).sum(dim=1, dtype=torch.float32)


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
        rows = hidden.index_select(0, routing.tokens).to(dtype)
        weights = expert_weights.reshape(-1).index_select(0, routing.order).to(dtype)
        activated = self.gate_up(experts, rows, routing)
        return self.down(experts, activated, routing, weights, expert_indices.shape[1]).to(hidden.dtype)

    def gate_up(self, experts: Experts, rows: Tensor, routing: SortedAssignments) -> Tensor:
        """Sorted rows [S, H] -> activated [S, I]."""
        lora = _adapter(experts.gate_up_lora)
        base = frozen_weight_op(
            grouped_mm, rows, experts.gate_up_weight(), experts.gate_up_weight, routing.offsets
        )
        update = low_rank_update(rows, lora, routing.offsets)
        bias = experts.gate_up_proj_bias
        return self._gate_up_epilogue(
            base, bias, routing.experts, update, _scaling(lora), experts.alpha, experts.limit
        )

    def down(
        self, experts: Experts, activated: Tensor, routing: SortedAssignments, weights: Tensor, top_k: int
    ) -> Tensor:
        """Activated sorted rows [S, I] -> per-token routing-weighted sums [N, H] (fp32)."""
        lora = _adapter(experts.down_lora)
        base = frozen_weight_op(
            grouped_mm, activated, experts.down_weight(), experts.down_weight, routing.offsets
        )
        update = low_rank_update(activated, lora, routing.offsets)
        bias = experts.down_proj_bias
        return self._down_epilogue(
            base, bias, routing.experts, update, _scaling(lora), weights, routing.inverse, top_k
        )
