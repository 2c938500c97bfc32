"""Grouped-GEMM experts with the LoRA computed on the low-rank side.

The eager reference is `gptoss_tune.model.gpt_oss.eager_experts` (a loop over experts). Here the
N * k (token, expert) assignments are sorted by expert once, and each base projection of every
expert runs as one grouped GEMM over the sorted rows (`grouped_gemm.ExpertGemm`: quack's, which
gathers token rows as it loads them, where installed on an H100/H200; torch's grouped_mm elsewhere),
as do the thin GEMMs of the LoRA factors and their gradients:

    gate_up = x W_e + b_e + s * (x A_e) B_e
    act     = clamped SwiGLU(gate_up)
    y       = act V_e + c_e + s * (act A'_e) B'_e
    out[t]  = sum over t's k experts of weight * y

W + BA is never formed. The low-rank factors take whichever GEMM shape is cheaper:
  - x A_e for every expert at once is one dense GEMM over the N tokens ([N, H] x [H, E*r]), before
    the rows are gathered; each assignment then picks its expert's r columns;
  - (x A_e) B_e is per assignment (the SwiGLU follows): an r-term sum the gate_up epilogue adds
    in registers (`LowRank`; the references run it as a thin grouped GEMM, and so does the fused
    quack path, whose gate_up GEMM takes the product as its addend);
  - act A'_e is a thin grouped GEMM; the routing-weighted sum over a token's experts of
    (act A'_e) B'_e is one dense GEMM of a per-token [E*r] grid (zeros except the token's k
    experts) with all of B' ([E*r, H]).
Moving rows between token order and sorted order never uses atomics: tokens are gathered with
index_select (or inside quack's GEMM), and a token's k rows are summed by gathering them into
(token, slot) order and reducing over the slots (`sum_over_slots`); every LoRA grid is written with
index_copy into distinct (token, expert) slots.

Backward is written by hand (`_LoraExperts`) because it can keep much less than autograd would:
only the token rows, the pre-activation gate_up and two thin low-rank inputs. The SwiGLU is
recomputed in backward inside the one fused kernel that backpropagates through it, and the routing
weights' gradient comes from the down projection's input gradient (<dL/dy, act V> = <(dL/dy) V^T,
act>), so neither the activation, nor the down output, nor the gathered rows are saved: about 1 GiB
less per layer of gpt-oss-20b at 16k tokens, which the memory planner turns into fewer recomputed
layers. Where the planner asks for it (`Experts.recompute_gate_up`), the pre-activation is not kept
either (at 16k tokens of gpt-oss-20b, 0.75 GB of the ~1.3 GB a layer keeps): backward runs the
gate_up forward again, one grouped GEMM and its epilogue instead of the whole layer. When the token
rows are a norm's output (a `NormSource`), the norm's input, which the norm keeps anyway, is kept
in their place and normalized again in backward. The base weights and biases must be frozen (LoRA
training); otherwise the eager loop runs.

The bias, the LoRA sum, the SwiGLU, its backward and the routing weights are memory-bound
"epilogues": Triton kernels on CUDA (`moe_triton`), torch.compile of the references elsewhere.
Where quack has its epilogue frontend (`--expert-gemm auto` or `quack-fused`), the gate_up
forward's epilogue is inside quack's GEMM instead (`quack_moe`; `ExpertGemm.fuses`). No host
synchronization: expert offsets come from a searchsorted on the sorted ids.

Weights are read only through `Experts.gate_up_weight()` / `Experts.down_weight()`, so storage
(plain bf16, MXFP4 dequantized on the fly) is the `Experts` module's business. Backward fetches
them again instead of saving them, so a layer's dense experts live only while that layer computes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from gptoss_tune.kernels import moe_triton
from gptoss_tune.kernels.grouped_gemm import (
    ExpertGemm,
    grouped_mm,
    grouped_mm_available,
    quack_config,
    quack_moe,
)
from gptoss_tune.model.gpt_oss import Experts, NormSource, clamped_swiglu, eager_experts
from gptoss_tune.model.lora import ExpertLora

SlotSum = Callable[..., Tensor]  # (rows, inverse, top_k, addend=None, out_dtype=None) -> [N, D]

GROUPED_MM_ALIGNMENT_BYTES = 16  # grouped_mm wants every row stride a multiple of 16 bytes


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
    def cu_seqlens(self) -> Tensor:
        """[E + 1] int32: 0, then each expert's row end (variable-length GEMMs' form of offsets)."""
        return F.pad(self.offsets, (1, 0))

    @cached_property
    def tokens_int32(self) -> Tensor:
        return self.tokens.to(torch.int32)

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


def sum_over_slots(rows: Tensor, routing: SortedAssignments) -> Tensor:
    """Sorted rows [S, D] -> each token's sum of its k rows [N, D], in fp32 at least. A gather and
    a reduction over the k slots: no scatter-add (index_add serializes on atomics)."""
    return sum_slots(rows, routing.inverse, routing.top_k)


def sum_slots(
    rows: Tensor,
    inverse: Tensor,
    top_k: int,
    addend: Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    """Each token's sum of its k rows [N, D] (+ `addend` [N, D]), accumulated in fp32 at least and
    rounded once to `out_dtype` (default: the accumulation dtype)."""
    per_slot = rows.index_select(0, inverse)  # (token, slot) order
    accumulate = torch.promote_types(rows.dtype, torch.float32)
    total = per_slot.view(-1, top_k, rows.shape[-1]).sum(dim=1, dtype=accumulate)
    if addend is not None:
        total = total + addend.to(accumulate)
    return total.to(out_dtype or accumulate)


def pick_slots(per_token: Tensor, routing: SortedAssignments) -> Tensor:
    """[N, E * D] per-token values for every expert -> [S, D] each sorted assignment's expert's D."""
    return per_token.reshape(routing.num_tokens * routing.num_experts, -1).index_select(0, routing.slots)


def place_in_slots(rows: Tensor, routing: SortedAssignments) -> Tensor:
    """The adjoint of `pick_slots`: sorted rows [S, D] -> [N, E * D], zeros for unused experts."""
    width = rows.shape[-1]
    grid = rows.new_zeros(routing.num_tokens * routing.num_experts, width).index_copy(0, routing.slots, rows)
    return grid.view(routing.num_tokens, routing.num_experts * width)


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


def per_expert(side_by_side: Tensor, experts: int) -> Tensor:
    """The inverse of `all_experts`: [D, E * r] -> [E, D, r]."""
    dim = side_by_side.shape[0]
    return side_by_side.view(dim, experts, -1).permute(1, 0, 2)


def low_rank_inputs(tokens: Tensor, lora_a: Tensor, routing: SortedAssignments) -> Tensor:
    """x A_e for each sorted assignment [S, r]: the token rows [N, H] times all experts' A at once
    (one dense GEMM, before any gathering), then each assignment's expert's r columns."""
    return pick_slots(tokens @ all_experts(lora_a), routing)


def sum_low_rank_outputs(inputs: Tensor, lora_b: Tensor, routing: SortedAssignments) -> Tensor:
    """sum over each token's assignments of inputs_s B_e [N, out]: the sorted low-rank rows [S, r]
    placed in a per-token [E * r] grid (zeros for the experts a token does not use), times all
    experts' B at once (one dense GEMM)."""
    experts, rank, width = lora_b.shape
    return place_in_slots(inputs, routing) @ lora_b.reshape(experts * rank, width)


# ---------------------------------------------------------------------------------------------------
# Epilogues: the memory-bound steps between the GEMMs. These are the references (Triton kernels in
# `moe_triton` on CUDA, torch.compile of these elsewhere). They compute in fp32 and return the rows'
# dtype, so the reference rounds like the fast versions.
# ---------------------------------------------------------------------------------------------------


def clamped_swiglu_backward(gate_up: Tensor, grad: Tensor, alpha: float, limit: float) -> Tensor:
    """d clamped_swiglu / d gate_up, given the gradient of its output [..., I] -> [..., 2I]
    (interleaved like gate_up). A clamp passes the gradient where its input is within the bounds,
    ends included, as torch.clamp's backward does."""
    gate, up = gate_up[..., ::2], gate_up[..., 1::2]
    clamped_gate = gate.clamp(max=limit)
    sigmoid = torch.sigmoid(clamped_gate * alpha)
    glu = clamped_gate * sigmoid
    d_glu = grad * (up.clamp(min=-limit, max=limit) + 1)
    d_gate = d_glu * sigmoid * (1 + clamped_gate * alpha * (1 - sigmoid)) * (gate <= limit)
    d_up = grad * glu * ((up >= -limit) & (up <= limit))
    return torch.stack([d_gate, d_up], dim=-1).flatten(-2)


class LowRank(NamedTuple):
    """The per-row low-rank product inputs_s factor_e for sorted rows, which the epilogues add
    (the Triton ones in registers, never writing the [S, D] product out)."""

    inputs: Tensor  # [S, r]
    factor: Tensor  # [E, r, D]
    experts: Tensor  # [S] each row's expert
    offsets: Tensor  # [E] int32 group ends

    def product(self) -> Tensor:
        return grouped_mm(self.inputs, self.factor, self.offsets)


def materialized(term: LowRank | Tensor | None) -> Tensor | None:
    """A low-rank term as its [S, D] product (torch.compile cannot trace grouped_mm on every
    device, so the compiled epilogues get it computed)."""
    return term.product() if isinstance(term, LowRank) else term


def gate_up_epilogue(
    base: Tensor,
    bias: Tensor,
    experts: Tensor,
    update: LowRank | Tensor | None,
    scaling: float,
    alpha: float,
    limit: float,
) -> tuple[Tensor, Tensor]:
    """(gate_up, SwiGLU(gate_up)) with gate_up = x W_e + b_e + s * (x A_e) B_e, for the sorted
    rows. The activation is that of the returned (rounded) gate_up: backward recomputes exactly it."""
    gate_up = base.float() + bias.index_select(0, experts).float()
    if update is not None:
        gate_up = gate_up + materialized(update).float() * scaling
    gate_up = gate_up.to(base.dtype)
    return gate_up, clamped_swiglu(gate_up.float(), alpha, limit).to(base.dtype)


def down_epilogue(
    base: Tensor,
    bias: Tensor,
    experts: Tensor,
    weights: Tensor,
    inverse: Tensor,
    top_k: int,
    addend: Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    """Each token's routing-weighted sum of (act V_e + c_e) over its k sorted rows, + `addend` (the
    LoRA term, per token) [N, H]: accumulated in fp32, rounded once to `out_dtype` (default fp32)."""
    weighted = (base.float() + bias.index_select(0, experts).float()) * weights.float().unsqueeze(-1)
    return sum_slots(weighted, inverse, top_k, addend, out_dtype)


def activation_backward_epilogue(
    gate_up: Tensor,
    grad_base: Tensor,
    grad_low_rank: LowRank | Tensor | None,
    weights: Tensor,
    alpha: float,
    limit: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Backward through weight * (act V_e + ...) and act = SwiGLU(gate_up), with the activation
    recomputed from the saved gate_up. grad_base [S, I] = (dL/dy) V_e^T, the gradient of the base
    projection's input before the routing weight; grad_low_rank the down LoRA's part of dL/d act
    (routing weight and scaling already in its inputs). Returns (dL/d gate_up [S, 2I],
    <grad_base, act> per row [S] fp32, act [S, I])."""
    gate_up_fp32 = gate_up.float()
    act = clamped_swiglu(gate_up_fp32, alpha, limit)
    grad_base_fp32 = grad_base.float()
    base_dot = (grad_base_fp32 * act).sum(dim=-1)
    grad_act = grad_base_fp32 * weights.float().unsqueeze(-1)
    if grad_low_rank is not None:
        grad_act = grad_act + materialized(grad_low_rank).float()
    grad_gate_up = clamped_swiglu_backward(gate_up_fp32, grad_act, alpha, limit)
    return grad_gate_up.to(gate_up.dtype), base_dot, act.to(gate_up.dtype)


@dataclass
class Epilogues:
    """The experts' memory-bound steps between the GEMMs; the eager references by default."""

    gate_up: Callable[..., tuple[Tensor, Tensor]] = gate_up_epilogue
    down: Callable[..., Tensor] = down_epilogue
    activation_backward: Callable[..., tuple[Tensor, Tensor, Tensor]] = activation_backward_epilogue
    slot_sum: SlotSum = sum_slots

    @classmethod
    def compiled(cls, device: torch.device) -> Epilogues:
        """The fastest for `device`: the Triton kernels on CUDA, torch.compile of the references
        elsewhere."""
        references = cls.compiled_references()
        return cls.triton(references) if moe_triton.available(device) else references

    @classmethod
    def compiled_references(cls) -> Epilogues:
        return cls(
            _low_rank_materialized(torch.compile(gate_up_epilogue, dynamic=True), 3),
            torch.compile(down_epilogue, dynamic=True),
            _low_rank_materialized(torch.compile(activation_backward_epilogue, dynamic=True), 2),
            torch.compile(sum_slots, dynamic=True),
        )

    @classmethod
    def triton(cls, fallback: Epilogues) -> Epilogues:
        """The Triton kernels (`moe_triton`); rows they do not take (not bf16) go to `fallback`."""
        return cls(
            _bf16_or(moe_triton.gate_up_epilogue, fallback.gate_up),
            moe_triton.down_epilogue,
            _bf16_or(moe_triton.activation_backward_epilogue, fallback.activation_backward),
            moe_triton.sum_slots,
        )


def _low_rank_materialized(epilogue: Callable[..., Any], position: int) -> Callable[..., Any]:
    """Calls `epilogue` with its low-rank argument (at `position`) as a computed tensor."""

    def run(*args: Any) -> Any:
        args = list(args)
        args[position] = materialized(args[position])
        return epilogue(*args)

    return run


def _bf16_or(bf16_fn: Callable[..., Any], other_fn: Callable[..., Any]) -> Callable[..., Any]:
    """Calls bf16_fn when the first argument is bf16, other_fn otherwise."""

    def run(rows: Tensor, *args: Any) -> Any:
        return (bf16_fn if rows.dtype == torch.bfloat16 else other_fn)(rows, *args)

    return run


# ---------------------------------------------------------------------------------------------------
# Forward and hand-written backward
# ---------------------------------------------------------------------------------------------------


@dataclass
class _Adapter:
    """One projection's LoRA in the compute dtype, rank padded for grouped_mm (see
    `aligned_lora_factors`)."""

    lora_a: Tensor  # [E, in, r']
    lora_b: Tensor  # [E, r', out]
    scaling: float
    rank: int  # the unpadded rank

    @classmethod
    def of(cls, lora: ExpertLora | None, dtype: torch.dtype) -> _Adapter | None:
        if lora is None:
            return None
        with torch.no_grad():  # copies for compute: the gradients go to the parameters by hand
            lora_a, lora_b = aligned_lora_factors(lora, dtype)
        return cls(lora_a, lora_b, lora.scaling, lora.lora_A.shape[-1])

    def grads(self, grad_a: Tensor, grad_b: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        """Padded [E, in, r'] and [E, r', out] gradients -> the parameters' shapes and dtype."""
        return grad_a[..., : self.rank].to(like.dtype), grad_b[:, : self.rank].to(like.dtype)


@dataclass
class _Layer:
    """What the experts' forward and backward steps share: the frozen experts, the routing, the
    adapters in the compute dtype and the epilogue kernels."""

    experts: Experts
    routing: SortedAssignments
    gate_up: _Adapter | None
    down: _Adapter | None
    epilogues: Epilogues
    gemm: ExpertGemm
    fused: bool  # the gate_up forward with bias, LoRA term and SwiGLU in quack's GEMM (`quack_moe`)
    recompute_gate_up: bool = False  # keep no pre-activation: backward runs the gate_up forward again

    @property
    def offsets(self) -> Tensor:
        return self.routing.offsets

    def expert_gemm(self, source: Tensor, weights: Tensor, gather: bool = False) -> Tensor:
        """Every sorted row times its expert's weights [E, K, N] (a base projection or a LoRA
        factor): source is already in sorted order, or with `gather` in token order (each sorted
        row reads its token's row)."""
        routing = self.routing
        index = routing.tokens_int32 if gather else None
        return self.gemm(source, weights, routing.offsets, routing.cu_seqlens, index)

    def weight_grad(self, inputs: Tensor, grads: Tensor) -> Tensor:
        """The gradient [E, K, N] of the weights of `expert_gemm(inputs, weights)` (sorted rows)."""
        return self.gemm.weight_grad(inputs, grads, self.routing.offsets, self.routing.cu_seqlens)


def _gate_up_forward(layer: _Layer, tokens: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
    """Token rows [N, H] -> (pre-activation [S, 2I], activation [S, I], the LoRA's x A_e [S, r'])."""
    experts, routing, adapter = layer.experts, layer.routing, layer.gate_up
    weights = experts.gate_up_weight().to(tokens.dtype)
    inputs = low_rank_inputs(tokens, adapter.lora_a, routing) if adapter is not None else None
    if layer.fused:  # the LoRA term as the GEMM's addend: s (x A_e) B_e from a thin grouped GEMM
        addend = layer.expert_gemm(inputs * adapter.scaling, adapter.lora_b) if adapter is not None else None
        pre_activation, activated = quack_moe().gate_up_swiglu(
            tokens, routing.tokens_int32, weights, experts.gate_up_proj_bias, routing.cu_seqlens, addend,
            experts.alpha, experts.limit, quack_config(*weights.shape[-2:]),
        )  # fmt: skip
        return pre_activation, activated, inputs
    base = layer.expert_gemm(tokens, weights, gather=True)
    del weights
    update = (
        LowRank(inputs, adapter.lora_b, routing.experts, routing.offsets) if adapter is not None else None
    )
    pre_activation, activated = layer.epilogues.gate_up(
        base, experts.gate_up_proj_bias, routing.experts, update,
        adapter.scaling if adapter else 0.0, experts.alpha, experts.limit,
    )  # fmt: skip
    return pre_activation, activated, inputs


def _down_forward(
    layer: _Layer, activated: Tensor, weights: Tensor, out_dtype: torch.dtype
) -> tuple[Tensor, Tensor | None]:
    """Activated rows [S, I] -> (each token's routing-weighted sum [N, H] in `out_dtype`, act A'_e
    [S, r']). The LoRA term is summed per token first and added inside the epilogue."""
    experts, routing, adapter = layer.experts, layer.routing, layer.down
    inputs = low_rank = None
    if adapter is not None:
        inputs = layer.expert_gemm(activated, adapter.lora_a)
        low_rank = sum_low_rank_outputs(
            inputs * (weights.unsqueeze(-1) * adapter.scaling), adapter.lora_b, routing
        )
    projected = layer.expert_gemm(activated, experts.down_weight().to(activated.dtype))
    out = layer.epilogues.down(
        projected, experts.down_proj_bias, routing.experts, weights, routing.inverse, routing.top_k,
        low_rank, out_dtype,
    )  # fmt: skip
    return out, inputs


def _down_backward(
    layer: _Layer, grad_out: Tensor, pre_activation: Tensor, weights: Tensor, down_inputs: Tensor | None
) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor] | None]:
    """dL/d out [N, H] -> (dL/d pre-activation [S, 2I], dL/d routing weight [S] fp32, the down
    LoRA's (dA', dB')). The activation is recomputed inside the epilogue; the routing weights'
    gradient is <dL/dy, y> with y = act V_e + c_e + s (act A'_e) B'_e, each term taken from a
    gradient that backward computes anyway."""
    experts, routing, adapter, offsets = layer.experts, layer.routing, layer.down, layer.offsets
    dtype = grad_out.dtype
    down_weight = experts.down_weight().to(dtype)
    # (dL/dy) V_e^T per sorted row (dL/dy before the routing weight)
    grad_base = layer.expert_gemm(grad_out, down_weight.transpose(-2, -1), gather=True)
    del down_weight
    # <dL/dy, c_e> for every (token, expert) in one GEMM; each row keeps its expert's.
    grad_weights = pick_slots(grad_out @ experts.down_proj_bias.to(dtype).t(), routing).squeeze(-1).float()
    grad_low_rank = grad_down_inputs = weight_scale = None
    if adapter is not None:
        weight_scale = weights.unsqueeze(-1) * adapter.scaling  # s * w per row
        # (dL/dy) B'_e^T for every expert in one dense GEMM; dL/d(act A'_e) is it times s * w.
        grad_b_side = pick_slots(grad_out @ all_experts(adapter.lora_b.transpose(-2, -1)), routing)
        grad_weights = grad_weights + adapter.scaling * (grad_b_side.float() * down_inputs.float()).sum(-1)
        grad_down_inputs = grad_b_side * weight_scale
        grad_low_rank = LowRank(grad_down_inputs, adapter.lora_a.transpose(-2, -1), routing.experts, offsets)
    grad_pre_activation, base_dot, activated = layer.epilogues.activation_backward(
        pre_activation, grad_base, grad_low_rank, weights, experts.alpha, experts.limit
    )
    grad_weights = grad_weights + base_dot  # + <(dL/dy) V_e^T, act>
    lora_grads = None
    if adapter is not None:
        grad_lora_b = (place_in_slots(down_inputs * weight_scale, routing).t() @ grad_out).view_as(
            adapter.lora_b
        )
        grad_lora_a = layer.weight_grad(activated, grad_down_inputs)
        lora_grads = adapter.grads(grad_lora_a, grad_lora_b, experts.down_lora.lora_A)
    return grad_pre_activation, grad_weights, lora_grads


def _gate_up_backward(
    layer: _Layer,
    grad_pre_activation: Tensor,
    tokens: Tensor | None,
    gate_up_inputs: Tensor | None,
    dtype: torch.dtype,
) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
    """dL/d pre-activation [S, 2I] -> (dL/d tokens [N, H] in the tokens' `dtype`, the gate_up
    LoRA's (dA, dB)). The token rows are read only with a gate_up LoRA."""
    experts, routing, adapter = layer.experts, layer.routing, layer.gate_up
    grad_low_rank = lora_grads = None
    if adapter is not None:
        # dL/d update = s * dL/d pre-activation: the scaling goes on the thin results, not on [S, 2I]
        grad_lora_b = layer.weight_grad(gate_up_inputs, grad_pre_activation) * adapter.scaling
        grad_inputs = layer.expert_gemm(grad_pre_activation, adapter.lora_b.transpose(-2, -1))
        grad_inputs = place_in_slots(grad_inputs * adapter.scaling, routing)  # [N, E * r']
        grad_lora_a = per_expert(tokens.t() @ grad_inputs, experts.num_experts)
        grad_low_rank = grad_inputs @ all_experts(adapter.lora_a).t()  # added inside the slot sum
        lora_grads = adapter.grads(grad_lora_a, grad_lora_b, experts.gate_up_lora.lora_A)
    gate_up_weight = experts.gate_up_weight().to(dtype)
    grad_rows = layer.expert_gemm(grad_pre_activation, gate_up_weight.transpose(-2, -1))
    del gate_up_weight
    grad_tokens = layer.epilogues.slot_sum(grad_rows, routing.inverse, routing.top_k, grad_low_rank, dtype)
    return grad_tokens, lora_grads


class _LoraExperts(torch.autograd.Function):
    """The experts' output [N, H] (in `out_dtype`) from the token rows [N, H] and routing weights
    [N, k]; the adapters' factors are inputs so that autograd routes their gradients.

    Saves only the token rows (only if the gate_up LoRA or its recomputation reads them; with a
    `norm_source`, its hidden instead), the pre-activation gate_up [S, 2I] and two [S, r] low-rank
    inputs; backward recomputes the SwiGLU and gets the routing weights' gradient from the down
    projection's input gradient, so neither the activation nor the down output is kept. With
    `layer.recompute_gate_up` the pre-activation and the gate_up LoRA's inputs are not kept either:
    backward computes them again from the token rows. The base weights are frozen and fetched again
    in backward.
    """

    @staticmethod
    def forward(
        ctx, tokens, expert_weights, gate_up_a, gate_up_b, down_a, down_b, layer, out_dtype, norm_source
    ):
        weights = expert_weights.reshape(-1).index_select(0, layer.routing.order).to(tokens.dtype)
        with torch.autocast(tokens.device.type, enabled=False):
            pre_activation, activated, gate_up_inputs = _gate_up_forward(layer, tokens)
            # rounded to out_dtype inside the epilogue: the gradient then arrives in out_dtype too
            out, down_inputs = _down_forward(layer, activated, weights, out_dtype)
        if layer.recompute_gate_up:
            pre_activation = gate_up_inputs = None
        reads_tokens = layer.gate_up is not None or layer.recompute_gate_up
        kept, ctx.norm = NormSource.keep(tokens, norm_source) if reads_tokens else (None, None)
        ctx.save_for_backward(kept, pre_activation, weights, gate_up_inputs, down_inputs)
        ctx.layer, ctx.weights_dtype, ctx.tokens_dtype = layer, expert_weights.dtype, tokens.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        kept, pre_activation, weights, gate_up_inputs, down_inputs = ctx.saved_tensors
        layer: _Layer = ctx.layer
        dtype = ctx.tokens_dtype
        tokens = NormSource.rows_again(kept, ctx.norm, dtype)
        with torch.autocast(grad_out.device.type, enabled=False):
            if layer.recompute_gate_up:
                pre_activation, activated, gate_up_inputs = _gate_up_forward(layer, tokens)
                del activated  # the activation backward recomputes it, as when the pre-activation is kept
            grad_pre_activation, grad_weights, down_grads = _down_backward(
                layer, grad_out.to(dtype), pre_activation, weights, down_inputs
            )
            grad_tokens, gate_up_grads = _gate_up_backward(
                layer, grad_pre_activation, tokens, gate_up_inputs, dtype
            )
        routing = layer.routing
        grad_expert_weights = grad_weights.index_select(0, routing.inverse).view(
            routing.num_tokens, routing.top_k
        )
        return (
            grad_tokens,
            grad_expert_weights.to(ctx.weights_dtype),
            *(gate_up_grads or (None, None)),
            *(down_grads or (None, None)),
            None,
            None,
            None,
        )


# ---------------------------------------------------------------------------------------------------
# The ExpertsFn
# ---------------------------------------------------------------------------------------------------


def _adapter(module: object) -> ExpertLora | None:
    return module if isinstance(module, ExpertLora) else None


def _factors(lora: ExpertLora | None) -> tuple[Tensor | None, Tensor | None]:
    return (lora.lora_A, lora.lora_B) if lora is not None else (None, None)


class GroupedExperts:
    """An `ExpertsFn` (see `gptoss_tune.model.gpt_oss`) on grouped GEMMs, for frozen experts.

    Falls back to the eager loop when grouped_mm is missing, when a size breaks grouped_mm's
    16-byte stride rule, when an expert adapter is not an `ExpertLora`, or when a base expert
    weight or bias is trainable (the hand-written backward keeps no gradient for them).
    """

    takes_norm_source = True  # see `gptoss_tune.model.gpt_oss.NormSource`

    def __init__(
        self, compile: bool = True, epilogues: Epilogues | None = None, gemm: ExpertGemm | None = None
    ) -> None:
        """`epilogues`: use these on every device instead of choosing (tests run the Triton ones on
        the CPU under Triton's interpreter). `gemm`: the base GEMMs (default: quack where it can
        run, torch's grouped_mm elsewhere; see `grouped_gemm`)."""
        self.compiled = compile
        self.fixed_epilogues = epilogues
        self.gemm = gemm or ExpertGemm()
        self._epilogues: dict[torch.device, Epilogues] = {}

    def epilogues(self, device: torch.device) -> Epilogues:
        if self.fixed_epilogues is not None:
            return self.fixed_epilogues
        if not self.compiled:
            return Epilogues()
        if device not in self._epilogues:
            self._epilogues[device] = Epilogues.compiled(device)
        return self._epilogues[device]

    @staticmethod
    def can_run(experts: Experts, dtype: torch.dtype) -> bool:
        if not grouped_mm_available():
            return False
        for slot in (experts.gate_up_lora, experts.down_lora):
            if slot is not None and not isinstance(slot, ExpertLora):
                return False
        if any(param.requires_grad for param in experts.parameters(recurse=False)):
            return False
        double_inner, hidden = experts.gate_up_proj_bias.shape[-1], experts.down_proj_bias.shape[-1]
        return _aligned(hidden, dtype) and _aligned(double_inner // 2, dtype)

    def __call__(
        self,
        experts: Experts,
        hidden: Tensor,
        expert_indices: Tensor,
        expert_weights: Tensor,
        norm_source: NormSource | None = None,
    ) -> Tensor:
        dtype = experts.gate_up_proj_bias.dtype  # the dtype the weight accessors return
        if not self.can_run(experts, dtype):
            return eager_experts(experts, hidden, expert_indices, expert_weights)
        routing = sort_by_expert(expert_indices, experts.num_experts)
        gate_up, down = _adapter(experts.gate_up_lora), _adapter(experts.down_lora)
        adapters = _Adapter.of(gate_up, dtype), _Adapter.of(down, dtype)
        tokens = hidden.to(dtype)
        fused = self.gemm.fuses(tokens)
        layer = _Layer(
            experts, routing, *adapters, self.epilogues(hidden.device), self.gemm, fused,
            recompute_gate_up=experts.recompute_gate_up and torch.is_grad_enabled(),
        )  # fmt: skip
        return _LoraExperts.apply(
            tokens, expert_weights, *_factors(gate_up), *_factors(down), layer, hidden.dtype,
            norm_source,
        )  # fmt: skip
