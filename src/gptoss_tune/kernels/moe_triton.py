"""Triton versions of the experts' two big elementwise epilogues (CUDA only).

References: `gate_up_epilogue` and `activation_backward_epilogue` in `gptoss_tune.kernels.moe`,
compared with these on random inputs in tests/gpu. torch.compile of those references splits each
into several kernels (the interleaved [gate, up] columns of gate_up give the [S, 2I] and [S, I]
tensors different iteration spaces) and runs at 3 to 5x the memory-traffic floor. Here each is one
pass: a tile of rows x column pairs is loaded contiguously, split into gate and up in registers,
and written back interleaved (`tl.split` / `tl.join`). The backward also reduces each row's
<grad_base, act> for the routing weights' gradient in the same pass.
"""

from __future__ import annotations

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the compiled references are used instead
    triton = None

FORWARD_BLOCK = (16, 128)  # rows, column pairs
BACKWARD_BLOCK = (8, 128)


def available(device: torch.device) -> bool:
    return triton is not None and device.type == "cuda"


if triton is not None:

    @triton.jit
    def _clamped_swiglu_parts(gate, up, alpha, limit):
        clamped_gate = tl.minimum(gate, limit)
        clamped_up = tl.minimum(tl.maximum(up, -limit), limit)
        sigmoid = tl.sigmoid(clamped_gate * alpha)
        glu = clamped_gate * sigmoid
        return clamped_gate, clamped_up, sigmoid, glu

    @triton.jit
    def _gate_up_forward_kernel(
        base_ptr, update_ptr, bias_ptr, experts_ptr, gate_up_ptr, act_ptr,
        rows, inner, scaling, alpha, limit,
        HAS_UPDATE: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr,
    ):  # fmt: skip
        row_ids = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        col_ids = tl.program_id(1) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
        pair_cols = 2 * col_ids[None, :, None] + tl.arange(0, 2)[None, None, :]
        pair_mask = (row_ids[:, None, None] < rows) & (pair_cols < 2 * inner)
        pair_offsets = row_ids[:, None, None].to(tl.int64) * (2 * inner) + pair_cols
        experts = tl.load(experts_ptr + row_ids, mask=row_ids < rows, other=0).to(tl.int64)
        gate_up = tl.load(base_ptr + pair_offsets, mask=pair_mask, other=0.0).to(tl.float32)
        bias_offsets = experts[:, None, None] * (2 * inner) + pair_cols
        gate_up += tl.load(bias_ptr + bias_offsets, mask=pair_mask, other=0.0).to(tl.float32)
        if HAS_UPDATE:
            update = tl.load(update_ptr + pair_offsets, mask=pair_mask, other=0.0).to(tl.float32)
            gate_up += scaling * update
        stored = gate_up.to(gate_up_ptr.dtype.element_ty)
        tl.store(gate_up_ptr + pair_offsets, stored, mask=pair_mask)
        gate, up = tl.split(stored.to(tl.float32))  # the activation of the stored (rounded) value
        _, clamped_up, _, glu = _clamped_swiglu_parts(gate, up, alpha, limit)
        mask = (row_ids[:, None] < rows) & (col_ids[None, :] < inner)
        offsets = row_ids[:, None].to(tl.int64) * inner + col_ids[None, :]
        tl.store(act_ptr + offsets, ((clamped_up + 1) * glu).to(act_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _activation_backward_kernel(
        gate_up_ptr, grad_base_ptr, grad_low_rank_ptr, weights_ptr,
        grad_gate_up_ptr, base_dot_ptr, act_ptr,
        rows, inner, alpha, limit,
        HAS_LOW_RANK: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr,
    ):  # fmt: skip
        row_ids = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        row_mask = row_ids < rows
        weights = tl.load(weights_ptr + row_ids, mask=row_mask, other=0.0).to(tl.float32)
        base_dot = tl.zeros([BLOCK_ROWS], dtype=tl.float32)
        for start in range(0, inner, BLOCK_COLS):
            col_ids = start + tl.arange(0, BLOCK_COLS)
            mask = row_mask[:, None] & (col_ids[None, :] < inner)
            offsets = row_ids[:, None].to(tl.int64) * inner + col_ids[None, :]
            pair_cols = 2 * col_ids[None, :, None] + tl.arange(0, 2)[None, None, :]
            pair_mask = (row_ids[:, None, None] < rows) & (pair_cols < 2 * inner)
            pair_offsets = row_ids[:, None, None].to(tl.int64) * (2 * inner) + pair_cols
            gate, up = tl.split(tl.load(gate_up_ptr + pair_offsets, mask=pair_mask, other=0.0).to(tl.float32))
            clamped_gate, clamped_up, sigmoid, glu = _clamped_swiglu_parts(gate, up, alpha, limit)
            act = (clamped_up + 1) * glu
            grad_base = tl.load(grad_base_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
            base_dot += tl.sum(grad_base * act, axis=1)
            grad_act = grad_base * weights[:, None]
            if HAS_LOW_RANK:
                grad_act += tl.load(grad_low_rank_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
            d_gate = grad_act * (clamped_up + 1) * sigmoid * (1 + clamped_gate * alpha * (1 - sigmoid))
            d_gate = tl.where(gate <= limit, d_gate, 0.0)
            d_up = tl.where((up >= -limit) & (up <= limit), grad_act * glu, 0.0)
            grad_gate_up = tl.join(d_gate, d_up).to(grad_gate_up_ptr.dtype.element_ty)
            tl.store(grad_gate_up_ptr + pair_offsets, grad_gate_up, mask=pair_mask)
            tl.store(act_ptr + offsets, act.to(act_ptr.dtype.element_ty), mask=mask)
        tl.store(base_dot_ptr + row_ids, base_dot, mask=row_mask)


def gate_up_epilogue(
    base: Tensor,
    bias: Tensor,
    experts: Tensor,
    update: Tensor | None,
    scaling: float,
    alpha: float,
    limit: float,
) -> tuple[Tensor, Tensor]:
    """Same contract as `gptoss_tune.kernels.moe.gate_up_epilogue`."""
    rows, double_inner = base.shape
    inner = double_inner // 2
    base, bias = base.contiguous(), bias.contiguous()
    gate_up = torch.empty_like(base)
    act = base.new_empty(rows, inner)
    if rows == 0:
        return gate_up, act
    block_rows, block_cols = FORWARD_BLOCK
    grid = (triton.cdiv(rows, block_rows), triton.cdiv(inner, block_cols))
    _gate_up_forward_kernel[grid](
        base, update.contiguous() if update is not None else base, bias, experts.contiguous(), gate_up, act,
        rows, inner, float(scaling), float(alpha), float(limit),
        HAS_UPDATE=update is not None, BLOCK_ROWS=block_rows, BLOCK_COLS=block_cols,
    )  # fmt: skip
    return gate_up, act


def activation_backward_epilogue(
    gate_up: Tensor,
    grad_base: Tensor,
    grad_low_rank: Tensor | None,
    weights: Tensor,
    alpha: float,
    limit: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Same contract as `gptoss_tune.kernels.moe.activation_backward_epilogue`."""
    rows, double_inner = gate_up.shape
    inner = double_inner // 2
    gate_up, grad_base = gate_up.contiguous(), grad_base.contiguous()
    grad_gate_up = torch.empty_like(gate_up)
    base_dot = torch.empty(rows, device=gate_up.device, dtype=torch.float32)
    act = gate_up.new_empty(rows, inner)
    if rows == 0:
        return grad_gate_up, base_dot, act
    block_rows, block_cols = BACKWARD_BLOCK
    _activation_backward_kernel[(triton.cdiv(rows, block_rows),)](
        gate_up, grad_base, grad_low_rank.contiguous() if grad_low_rank is not None else grad_base,
        weights.contiguous(), grad_gate_up, base_dot, act,
        rows, inner, float(alpha), float(limit),
        HAS_LOW_RANK=grad_low_rank is not None, BLOCK_ROWS=block_rows, BLOCK_COLS=block_cols,
    )  # fmt: skip
    return grad_gate_up, base_dot, act
