"""Triton versions of the experts' memory-bound epilogues (CUDA, bf16 rows).

References, compared with these on random inputs in tests/gpu: `gate_up_epilogue`,
`activation_backward_epilogue`, `down_epilogue` and `sum_slots` in `gptoss_tune.kernels.moe`.

torch.compile of the references runs at 3 to 6x their memory-traffic floor: gate_up interleaves
[gate, up] columns, so the [S, 2I] and [S, I] tensors have different iteration spaces and end up
in separate, strided kernels; the token sums are reductions over only k = 4 gathered rows. Here:
- a bf16 (gate, up) pair is one 32-bit word, so gate_up is read and written as an int32 [S, I]
  matrix, contiguous and in the activation's own iteration space; gate is the low half (the
  first element, little-endian), and a bf16 is the top half of the fp32 with the same value;
- the per-row LoRA products that meet these epilogues, (x A_e) B_e in gate_up and the down LoRA's
  input gradient (du A'_e^T), are r-term sums done in registers: the [S, 2I] and [S, I] products
  a thin grouped GEMM would write (and the epilogue read back) never exist;
- each token's sum over its k rows is a loop over k in registers, the gathered rows read once; the
  per-token LoRA term is added there too, and the sum is rounded once to the caller's dtype.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the compiled references are used instead
    triton = None

# Block sizes measured on an H200 at 16k tokens (scripts/gpu/tune_kernels.py epilogues)
PAIR_BLOCK = (16, 64)  # rows, (gate, up) pairs per program of the gate_up forward
ROW_BLOCK = (8, 128)  # rows per program of the activation backward, which loops over the row; pairs per step
TOKEN_SUM_BLOCK = (16, 256)  # tokens, columns


class LowRankTerm(Protocol):
    """`gptoss_tune.kernels.moe.LowRank`: the per-row product inputs_s factor_e (not imported:
    moe imports this module)."""

    inputs: Tensor  # [S, r]
    factor: Tensor  # [E, r, D]
    experts: Tensor  # [S]


def available(device: torch.device) -> bool:
    return triton is not None and device.type == "cuda"


if triton is not None:

    @triton.jit
    def _unpack_pairs(words):
        """int32 words of (gate, up) bf16 pairs -> (gate, up) in fp32."""
        gate = (words << 16).to(tl.float32, bitcast=True)
        up = (words & -65536).to(tl.float32, bitcast=True)  # -65536 == 0xFFFF0000
        return gate, up

    @triton.jit
    def _pack_pairs(gate, up):
        """(gate, up) -> int32 words of the pair rounded to bf16."""
        gate_bits = gate.to(tl.bfloat16).to(tl.int16, bitcast=True).to(tl.int32) & 65535
        up_bits = up.to(tl.bfloat16).to(tl.int16, bitcast=True).to(tl.int32) << 16
        return gate_bits | up_bits

    @triton.jit
    def _clamped_swiglu_parts(gate, up, alpha, limit):
        clamped_gate = tl.minimum(gate, limit)
        clamped_up = tl.minimum(tl.maximum(up, -limit), limit)
        sigmoid = tl.sigmoid(clamped_gate * alpha)
        return clamped_gate, clamped_up, sigmoid, clamped_gate * sigmoid

    @triton.jit
    def _gate_up_forward_kernel(
        base_ptr, inputs_ptr, factor_ptr, bias_ptr, experts_ptr, gate_up_ptr, act_ptr,
        rows, inner, scaling, alpha, limit,
        RANK: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_PAIRS: tl.constexpr,
    ):  # fmt: skip
        row_ids = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        pair_ids = tl.program_id(1) * BLOCK_PAIRS + tl.arange(0, BLOCK_PAIRS)
        mask = (row_ids[:, None] < rows) & (pair_ids[None, :] < inner)
        offsets = row_ids[:, None].to(tl.int64) * inner + pair_ids[None, :]
        experts = tl.load(experts_ptr + row_ids, mask=row_ids < rows, other=0).to(tl.int64)
        gate, up = _unpack_pairs(tl.load(base_ptr + offsets, mask=mask, other=0))
        bias_gate, bias_up = _unpack_pairs(
            tl.load(bias_ptr + experts[:, None] * inner + pair_ids[None, :], mask=mask, other=0)
        )
        gate += bias_gate
        up += bias_up
        if RANK > 0:  # + s * (x A_e) B_e, the r-term product done here in fp32
            update_gate = tl.zeros([BLOCK_ROWS, BLOCK_PAIRS], dtype=tl.float32)
            update_up = tl.zeros([BLOCK_ROWS, BLOCK_PAIRS], dtype=tl.float32)
            for rank in tl.static_range(RANK):
                inputs = tl.load(
                    inputs_ptr + row_ids.to(tl.int64) * RANK + rank, mask=row_ids < rows, other=0.0
                )
                factor_offsets = (experts[:, None] * RANK + rank) * inner + pair_ids[None, :]
                factor_gate, factor_up = _unpack_pairs(
                    tl.load(factor_ptr + factor_offsets, mask=mask, other=0)
                )
                update_gate += inputs.to(tl.float32)[:, None] * factor_gate
                update_up += inputs.to(tl.float32)[:, None] * factor_up
            gate += scaling * update_gate
            up += scaling * update_up
        words = _pack_pairs(gate, up)
        tl.store(gate_up_ptr + offsets, words, mask=mask)
        gate, up = _unpack_pairs(words)  # the activation of the stored (rounded) values
        _, clamped_up, _, glu = _clamped_swiglu_parts(gate, up, alpha, limit)
        tl.store(act_ptr + offsets, ((clamped_up + 1) * glu).to(tl.bfloat16), mask=mask)

    @triton.jit
    def _activation_backward_kernel(
        gate_up_ptr, grad_base_ptr, inputs_ptr, factor_ptr, experts_ptr, weights_ptr,
        grad_gate_up_ptr, base_dot_ptr, act_ptr,
        rows, inner, alpha, limit,
        RANK: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_PAIRS: tl.constexpr,
    ):  # fmt: skip
        row_ids = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        row_mask = row_ids < rows
        weights = tl.load(weights_ptr + row_ids, mask=row_mask, other=0.0).to(tl.float32)
        experts = tl.load(experts_ptr + row_ids, mask=row_mask, other=0).to(tl.int64)
        base_dot = tl.zeros([BLOCK_ROWS], dtype=tl.float32)
        for start in range(0, inner, BLOCK_PAIRS):
            pair_ids = start + tl.arange(0, BLOCK_PAIRS)
            mask = row_mask[:, None] & (pair_ids[None, :] < inner)
            offsets = row_ids[:, None].to(tl.int64) * inner + pair_ids[None, :]
            gate, up = _unpack_pairs(tl.load(gate_up_ptr + offsets, mask=mask, other=0))
            clamped_gate, clamped_up, sigmoid, glu = _clamped_swiglu_parts(gate, up, alpha, limit)
            act = (clamped_up + 1) * glu
            grad_base = tl.load(grad_base_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
            base_dot += tl.sum(grad_base * act, axis=1)
            grad_act = grad_base * weights[:, None]
            for rank in tl.static_range(RANK):  # + the down LoRA's (du_s A'_e^T), in fp32
                inputs = tl.load(inputs_ptr + row_ids.to(tl.int64) * RANK + rank, mask=row_mask, other=0.0)
                factor_offsets = (experts[:, None] * RANK + rank) * inner + pair_ids[None, :]
                factor = tl.load(factor_ptr + factor_offsets, mask=mask, other=0.0)
                grad_act += inputs.to(tl.float32)[:, None] * factor.to(tl.float32)
            d_gate = grad_act * (clamped_up + 1) * sigmoid * (1 + clamped_gate * alpha * (1 - sigmoid))
            d_gate = tl.where(gate <= limit, d_gate, 0.0)
            d_up = tl.where((up >= -limit) & (up <= limit), grad_act * glu, 0.0)
            tl.store(grad_gate_up_ptr + offsets, _pack_pairs(d_gate, d_up), mask=mask)
            tl.store(act_ptr + offsets, act.to(tl.bfloat16), mask=mask)
        tl.store(base_dot_ptr + row_ids, base_dot, mask=row_mask)

    @triton.jit
    def _token_sum_kernel(
        rows_ptr, inverse_ptr, bias_ptr, experts_ptr, weights_ptr, addend_ptr, out_ptr,
        tokens, width,
        TOP_K: tl.constexpr, WEIGHTED: tl.constexpr, ADDEND: tl.constexpr,
        BLOCK_TOKENS: tl.constexpr, BLOCK_COLS: tl.constexpr,
    ):  # fmt: skip
        token_ids = tl.program_id(0) * BLOCK_TOKENS + tl.arange(0, BLOCK_TOKENS)
        cols = tl.program_id(1) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
        token_mask = token_ids < tokens
        mask = token_mask[:, None] & (cols[None, :] < width)
        total = tl.zeros([BLOCK_TOKENS, BLOCK_COLS], dtype=tl.float32)
        for slot in tl.static_range(TOP_K):
            source = tl.load(inverse_ptr + token_ids * TOP_K + slot, mask=token_mask, other=0).to(tl.int64)
            row = tl.load(rows_ptr + source[:, None] * width + cols[None, :], mask=mask, other=0.0).to(
                tl.float32
            )
            if WEIGHTED:
                expert = tl.load(experts_ptr + source, mask=token_mask, other=0).to(tl.int64)
                weight = tl.load(weights_ptr + source, mask=token_mask, other=0.0).to(tl.float32)
                bias = tl.load(bias_ptr + expert[:, None] * width + cols[None, :], mask=mask, other=0.0)
                row = (row + bias.to(tl.float32)) * weight[:, None]
            total += row
        offsets = token_ids[:, None].to(tl.int64) * width + cols[None, :]
        if ADDEND:
            total += tl.load(addend_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + offsets, total.to(out_ptr.dtype.element_ty), mask=mask)


def _pairs(tensor: Tensor) -> Tensor:
    """A contiguous bf16 [..., 2I] tensor as int32 [..., I]: one word per (gate, up) pair."""
    return tensor.contiguous().view(torch.int32)


def _low_rank_args(term: LowRankTerm | None, dtype: torch.dtype, like: Tensor) -> tuple[Tensor, Tensor, int]:
    """(inputs [S, r], factor [E, r, D], r) contiguous in `dtype`; placeholders and r = 0 without."""
    if term is None:
        return like, like, 0
    inputs, factor = term.inputs.to(dtype).contiguous(), term.factor.to(dtype).contiguous()
    return inputs, factor, inputs.shape[-1]


def gate_up_epilogue(
    base: Tensor,
    bias: Tensor,
    experts: Tensor,
    update: LowRankTerm | None,
    scaling: float,
    alpha: float,
    limit: float,
) -> tuple[Tensor, Tensor]:
    """Same contract as `gptoss_tune.kernels.moe.gate_up_epilogue`, for bf16 `base`."""
    rows, inner = base.shape[0], base.shape[1] // 2
    gate_up = torch.empty_like(base)
    act = base.new_empty(rows, inner)
    if rows == 0:
        return gate_up, act
    words = _pairs(base)
    inputs, factor, rank = _low_rank_args(update, base.dtype, words)
    block_rows, block_pairs = PAIR_BLOCK
    _gate_up_forward_kernel[(triton.cdiv(rows, block_rows), triton.cdiv(inner, block_pairs))](
        words, inputs, _pairs(factor) if rank else words, _pairs(bias.to(base.dtype)),
        experts.contiguous(), gate_up.view(torch.int32), act,
        rows, inner, float(scaling), float(alpha), float(limit),
        RANK=rank, BLOCK_ROWS=block_rows, BLOCK_PAIRS=block_pairs,
    )  # fmt: skip
    return gate_up, act


def activation_backward_epilogue(
    gate_up: Tensor,
    grad_base: Tensor,
    grad_low_rank: LowRankTerm | None,
    weights: Tensor,
    alpha: float,
    limit: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Same contract as `gptoss_tune.kernels.moe.activation_backward_epilogue`, for bf16 rows."""
    rows, inner = gate_up.shape[0], gate_up.shape[1] // 2
    grad_gate_up = torch.empty_like(gate_up)
    base_dot = torch.empty(rows, device=gate_up.device, dtype=torch.float32)
    act = gate_up.new_empty(rows, inner)
    if rows == 0:
        return grad_gate_up, base_dot, act
    grad_base = grad_base.to(torch.bfloat16).contiguous()
    inputs, factor, rank = _low_rank_args(grad_low_rank, torch.bfloat16, grad_base)
    experts = grad_low_rank.experts.contiguous() if grad_low_rank is not None else weights
    _activation_backward_kernel[(triton.cdiv(rows, ROW_BLOCK[0]),)](
        _pairs(gate_up), grad_base, inputs, factor, experts, weights.contiguous(),
        grad_gate_up.view(torch.int32), base_dot, act,
        rows, inner, float(alpha), float(limit),
        RANK=rank, BLOCK_ROWS=ROW_BLOCK[0], BLOCK_PAIRS=ROW_BLOCK[1],
    )  # fmt: skip
    return grad_gate_up, base_dot, act


def _token_sum(
    rows: Tensor,
    inverse: Tensor,
    top_k: int,
    weighted: tuple[Tensor, Tensor, Tensor] | None,
    addend: Tensor | None,
    out_dtype: torch.dtype | None,
) -> Tensor:
    rows = rows.contiguous()
    width = rows.shape[-1]
    tokens = inverse.numel() // top_k
    out_dtype = out_dtype or torch.promote_types(rows.dtype, torch.float32)
    out = torch.empty(tokens, width, device=rows.device, dtype=out_dtype)
    if tokens == 0:
        return out
    bias, experts, weights = weighted if weighted is not None else (rows, inverse, rows)
    has_addend = addend is not None
    addend = addend.contiguous() if has_addend else rows  # (a placeholder pointer without)
    block_tokens, block_cols = TOKEN_SUM_BLOCK
    _token_sum_kernel[(triton.cdiv(tokens, block_tokens), triton.cdiv(width, block_cols))](
        rows, inverse.contiguous(), bias.contiguous(), experts.contiguous(), weights.contiguous(), addend, out,
        tokens, width,
        TOP_K=top_k, WEIGHTED=weighted is not None, ADDEND=has_addend,
        BLOCK_TOKENS=block_tokens, BLOCK_COLS=block_cols,
    )  # fmt: skip
    return out


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
    """Same contract as `gptoss_tune.kernels.moe.down_epilogue`."""
    return _token_sum(base, inverse, top_k, (bias, experts, weights), addend, out_dtype)


def sum_slots(
    rows: Tensor,
    inverse: Tensor,
    top_k: int,
    addend: Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    """Same contract as `gptoss_tune.kernels.moe.sum_slots`."""
    return _token_sum(rows, inverse, top_k, None, addend, out_dtype)
