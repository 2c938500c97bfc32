"""The query, key and value projections and their LoRAs as one GEMM forward and one backward (and
the output projection with its LoRA, alone, the same way).

The reference is `gptoss_tune.model.gpt_oss.separate_projections`: three nn.Linear (or
`LoraLinear`) calls, each `x W^T + b + s (x A^T) B^T`. Separately that is three base GEMMs (the
key and value ones thin and slow), three low-rank ones, three accumulating adds of the LoRA term
over the whole output, and in backward three input-gradient GEMMs whose results autograd adds up
([N, in] each) before the norm sees them. Here, with R the adapters' ranks together:

    [x, x A_all^T] @ [[W_q, s_q B_q, 0, 0], [W_k, 0, s_k B_k, 0], [W_v, 0, 0, s_v B_v]]^T + b

is one GEMM with K = in + R (the LoRA terms are added in its fp32 accumulator, rounded once), and
backward is one GEMM for dL/d[x, x A_all^T], plus thin ones for the adapters. The stacked weight is
rebuilt each way (a ~30 MB copy for gpt-oss-20b) rather than kept, and the base weights must be
frozen (their gradient is never computed); otherwise the separate calls run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from gptoss_tune.model.gpt_oss import separate_projections
from gptoss_tune.model.lora import LoraLinear

RANK_MULTIPLE = 8  # R padded with zero rows of A so that [x, x A^T] rows stay 16-byte aligned


@dataclass(frozen=True)
class _Stack:
    """Where each projection's rows (outputs) and adapter columns sit in the stacked weight."""

    in_features: int
    out_features: tuple[int, ...]
    ranks: tuple[int, ...]  # 0: no adapter
    scalings: tuple[float, ...]

    @property
    def padded_rank(self) -> int:
        return -(-sum(self.ranks) // RANK_MULTIPLE) * RANK_MULTIPLE

    def row_slices(self) -> list[slice]:
        return _slices(self.out_features)

    def rank_slices(self) -> list[slice]:
        return _slices(self.ranks)

    def low_rank_factor(self, lora_as: Sequence[Tensor], dtype: torch.dtype) -> Tensor:
        """A_all [R', in]: every adapter's A stacked, zero rows up to the padded rank."""
        stacked = torch.cat([a.to(dtype) for a in lora_as])
        padding = self.padded_rank - stacked.shape[0]
        return torch.cat([stacked, stacked.new_zeros(padding, self.in_features)]) if padding else stacked

    def weight(self, weights: Sequence[Tensor], lora_bs: Sequence[Tensor], dtype: torch.dtype) -> Tensor:
        """The stacked [sum out, in + R'] weight: base rows, each adapter's s B on its own columns
        (block-diagonal). Two concatenations: element-wise slice copies cost ~10x more here."""
        base = torch.cat([w.to(dtype) for w in weights]) if len(weights) > 1 else weights[0].to(dtype)
        if not self.padded_rank:
            return base
        lora_bs = iter(lora_bs)
        blocks = [
            (next(lora_bs).to(torch.float32) * scaling).to(dtype) if rank else base.new_zeros(out, 0)
            for out, rank, scaling in zip(self.out_features, self.ranks, self.scalings, strict=True)
        ]
        low_rank = torch.block_diag(*blocks)  # [sum out, R]
        padding = base.new_zeros(base.shape[0], self.padded_rank - low_rank.shape[1])
        return torch.cat([base, low_rank, padding], dim=1)


def _slices(sizes: Sequence[int]) -> list[slice]:
    starts = [0]
    for size in sizes:
        starts.append(starts[-1] + size)
    return [slice(start, stop) for start, stop in zip(starts, starts[1:], strict=False)]


class _StackedLinear(torch.autograd.Function):
    """x [N, in] -> [N, sum out]; after `stack` and the projection count come the base weights,
    the biases (or None), then each adapter's A and B (in the order of the projections that have one)."""

    @staticmethod
    def forward(ctx, x, stack: _Stack, count: int, *tensors):
        weights, biases = tensors[:count], tensors[count : 2 * count]
        lora_as, lora_bs = tensors[2 * count :: 2], tensors[2 * count + 1 :: 2]
        dtype = x.dtype
        bias = torch.cat([b.to(dtype) for b in biases]) if biases[0] is not None else None
        if lora_as:
            lora_a = stack.low_rank_factor(lora_as, dtype)
            low_rank = x @ lora_a.t()  # [N, R']
            x_and_low_rank = torch.cat([x, low_rank], dim=1)
        else:
            low_rank = x_and_low_rank = x
        weight = stack.weight([w.to(dtype) for w in weights], lora_bs, dtype)
        out = (
            torch.addmm(bias, x_and_low_rank, weight.t()) if bias is not None else x_and_low_rank @ weight.t()
        )
        ctx.stack, ctx.count, ctx.has_lora = stack, count, bool(lora_as)
        ctx.save_for_backward(x, low_rank, *weights, *lora_as, *lora_bs)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        stack, count = ctx.stack, ctx.count
        x, low_rank, *rest = ctx.saved_tensors
        weights, factors = rest[:count], rest[count:]
        lora_as, lora_bs = factors[: len(factors) // 2], factors[len(factors) // 2 :]
        dtype, grad_out = x.dtype, grad_out.contiguous()
        weight = stack.weight([w.to(dtype) for w in weights], lora_bs, dtype)
        grad_stacked = grad_out @ weight  # dL/d[x, x A_all^T]
        no_grads = [None] * (2 * count)
        if not ctx.has_lora:
            return grad_stacked, None, None, *no_grads
        grad_low_rank = grad_stacked[:, stack.in_features :]  # [N, R']: s_i (dL/d out_i) B_i
        grad_x = torch.addmm(
            grad_stacked[:, : stack.in_features], grad_low_rank, stack.low_rank_factor(lora_as, dtype)
        )
        grad_lora_a_all = grad_low_rank.t() @ x  # [R', in]
        lora_grads = []
        for rows, columns, rank, scaling in zip(
            stack.row_slices(), stack.rank_slices(), stack.ranks, stack.scalings, strict=True
        ):
            if not rank:
                continue
            lora_a, lora_b = lora_as[len(lora_grads) // 2], lora_bs[len(lora_grads) // 2]
            grad_a = grad_lora_a_all[columns]
            grad_b = (grad_out[:, rows].t() @ low_rank[:, columns]) * scaling
            lora_grads += [grad_a.to(lora_a.dtype), grad_b.to(lora_b.dtype)]
        return grad_x, None, None, *no_grads, *lora_grads


class StackedProjections:
    """A `ProjectionsFn` (see `gptoss_tune.model.gpt_oss`): the projections as one GEMM each way.

    Runs when every projection is an nn.Linear or a `LoraLinear` without dropout, on one input
    size, with frozen base weights and biases (all with a bias or none); otherwise the separate
    calls run. Computes in the autocast dtype when autocast is on, as nn.Linear would.
    """

    @staticmethod
    def can_run(projections: Sequence[nn.Linear]) -> bool:
        first = projections[0]
        for projection in projections:
            if type(projection) not in (nn.Linear, LoraLinear):
                return False
            if isinstance(projection, LoraLinear) and not isinstance(projection.lora_dropout, nn.Identity):
                return False
            if projection.in_features != first.in_features or (projection.bias is None) != (
                first.bias is None
            ):
                return False
            base = [projection.weight] + ([projection.bias] if projection.bias is not None else [])
            if any(param.requires_grad for param in base):
                return False
        return True

    def __call__(self, projections: Sequence[nn.Linear], hidden: Tensor) -> list[Tensor]:
        if not self.can_run(projections):
            return separate_projections(projections, hidden)
        device = hidden.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
        adapted = [p for p in projections if isinstance(p, LoraLinear)]
        stack = _Stack(
            projections[0].in_features,
            tuple(p.out_features for p in projections),
            tuple(p.lora_A.shape[0] if isinstance(p, LoraLinear) else 0 for p in projections),
            tuple(p.scaling if isinstance(p, LoraLinear) else 0.0 for p in projections),
        )
        with torch.autocast(device, enabled=False):
            out = _StackedLinear.apply(
                hidden.reshape(-1, hidden.shape[-1]).to(dtype),
                stack,
                len(projections),
                *(p.weight for p in projections),
                *(p.bias for p in projections),
                *(t for p in adapted for t in (p.lora_A, p.lora_B)),
            )
        out = out.view(*hidden.shape[:-1], out.shape[-1])
        parts = out.split(stack.out_features, dim=-1)
        # The narrow parts (key, value) are copied: attention keeps the value for backward, and a
        # view of it would keep the whole [N, sum out] output alive with it.
        widest = max(stack.out_features)
        return [part if part.shape[-1] == widest else part.contiguous() for part in parts]
