"""The query, key and value projections and their LoRAs with one base GEMM forward and one backward
(and the output projection with its LoRA, alone, the same way).

The reference is `gptoss_tune.model.gpt_oss.separate_projections`: one nn.Linear (or `LoraLinear`)
call per projection, each `x W^T + b + s (x A^T) B^T`. Separately, q/k/v are three base GEMMs (the
key and value ones thin), three x A^T GEMMs and three adds of the LoRA term over the output; in
backward, three input-gradient GEMMs and as many low-rank ones, whose [N, in] results autograd
adds up one by one. Here, with A_all the adapters' A stacked (R rows):

- forward: x [W_q; W_k; W_v; A_all]^T + [b; 0] is one GEMM that also yields x A_all^T (its last
  R columns); each adapter's s (x A^T) B^T is then added in place to its outputs, as one GEMM
  against the block-diagonal [s B].
- backward: dL/dx = g W + (g [s B]) A_all: one GEMM, a thin one, and one accumulating GEMM into the
  same [N, in] buffer; the adapters' gradients from the thin products.

The stacked weights are rebuilt each way (a ~30 MB copy for gpt-oss-20b) rather than kept, and the
base weights must be frozen (their gradient is never computed); otherwise the separate calls run.
When the input is a norm's output (a `NormSource` is given), the norm's input is kept instead of x
and x is normalized again in backward (see `NormSource`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from gptoss_tune.model.gpt_oss import NormSource, separate_projections
from gptoss_tune.model.lora import LoraLinear

RANK_MULTIPLE = 8  # R padded with zero rows of A so that the [N, out + R] rows stay 16-byte aligned


@dataclass(frozen=True)
class _Stack:
    """Where each projection's outputs and adapter rank sit in the stacked tensors."""

    out_features: tuple[int, ...]
    ranks: tuple[int, ...]  # 0: no adapter
    scalings: tuple[float, ...]

    @property
    def total_out(self) -> int:
        return sum(self.out_features)

    @property
    def padded_rank(self) -> int:
        return -(-sum(self.ranks) // RANK_MULTIPLE) * RANK_MULTIPLE

    def row_slices(self) -> list[slice]:
        return _slices(self.out_features)

    def rank_slices(self) -> list[slice]:
        return _slices(self.ranks)

    def low_rank_input_rows(self, lora_as: Sequence[Tensor], dtype: torch.dtype) -> list[Tensor]:
        """The rows of A_all [R', in]: each adapter's A, then zero rows up to the padded rank."""
        rows = [a.to(dtype) for a in lora_as]
        padding = self.padded_rank - sum(self.ranks)
        return rows + [rows[0].new_zeros(padding, rows[0].shape[1])] if padding else rows

    def low_rank_outputs(self, lora_bs: Sequence[Tensor], dtype: torch.dtype) -> Tensor:
        """The block-diagonal [s_1 B_1, ..., s_n B_n] [sum out, R'] (zero blocks without adapter)."""
        device, factors = lora_bs[0].device, iter(lora_bs)
        blocks = [
            (next(factors).float() * scaling).to(dtype)
            if rank
            else torch.zeros(out, 0, dtype=dtype, device=device)
            for out, rank, scaling in zip(self.out_features, self.ranks, self.scalings, strict=True)
        ]
        diagonal = torch.block_diag(*blocks)
        padding = self.padded_rank - diagonal.shape[1]
        return (
            torch.cat([diagonal, diagonal.new_zeros(diagonal.shape[0], padding)], dim=1)
            if padding
            else diagonal
        )


def _slices(sizes: Sequence[int]) -> list[slice]:
    starts = [0]
    for size in sizes:
        starts.append(starts[-1] + size)
    return [slice(start, stop) for start, stop in zip(starts, starts[1:], strict=False)]


class _StackedLinear(torch.autograd.Function):
    """x [N, in] -> [N, sum out]. With a `norm_source` (x = its norm's output, reshaped and cast),
    its hidden is kept for backward instead of x. After `stack` and the projection count come the
    base weights, the biases (or None), then each adapter's A and B (in the order of the projections
    that have one)."""

    @staticmethod
    def forward(ctx, x, norm_source: NormSource | None, stack: _Stack, count: int, *tensors):
        weights, biases = tensors[:count], tensors[count : 2 * count]
        lora_as, lora_bs = tensors[2 * count :: 2], tensors[2 * count + 1 :: 2]
        dtype, total = x.dtype, stack.total_out
        # [W_1; ...; W_n; A_all]: one GEMM gives the base outputs and x A_all^T side by side
        rows = [w.to(dtype) for w in weights] + (stack.low_rank_input_rows(lora_as, dtype) if lora_as else [])
        weight = torch.cat(rows) if len(rows) > 1 else rows[0]
        if biases[0] is not None:
            bias = [b.to(dtype) for b in biases] + [x.new_zeros(stack.padded_rank)]
            out = torch.addmm(torch.cat(bias), x, weight.t())
        else:
            out = x @ weight.t()
        low_rank = None
        if lora_as:
            low_rank = out[:, total:].contiguous()  # x A_all^T [N, R'], rounded like F.linear's
            out[:, :total].addmm_(low_rank, stack.low_rank_outputs(lora_bs, dtype).t())
        ctx.stack, ctx.count, ctx.dtype = stack, count, dtype
        kept, ctx.norm = NormSource.keep(x, norm_source) if lora_as else (None, None)  # x: LoRA grads only
        ctx.save_for_backward(kept, low_rank, *weights, *lora_as, *lora_bs)
        return out[:, :total]  # without adapters, the whole output

    @staticmethod
    def backward(ctx, grad_out):
        stack, count, dtype = ctx.stack, ctx.count, ctx.dtype
        kept, low_rank, *rest = ctx.saved_tensors
        x = NormSource.rows_again(kept, ctx.norm, dtype)
        weights, factors = rest[:count], rest[count:]
        lora_as, lora_bs = factors[: len(factors) // 2], factors[len(factors) // 2 :]
        grad_out = grad_out.contiguous()
        base = torch.cat([w.to(dtype) for w in weights]) if count > 1 else weights[0].to(dtype)
        grad_x = grad_out @ base
        no_grads = [None] * (2 * count)
        if not lora_as:
            return grad_x, None, None, None, *no_grads
        grad_low_rank = grad_out @ stack.low_rank_outputs(lora_bs, dtype)  # [N, R']: s_i g_i B_i
        grad_x.addmm_(grad_low_rank, torch.cat(stack.low_rank_input_rows(lora_as, dtype)))
        grad_lora_a_all = grad_low_rank.t() @ x  # [R', in]
        lora_grads = []
        for rows, columns, rank, scaling in zip(
            stack.row_slices(), stack.rank_slices(), stack.ranks, stack.scalings, strict=True
        ):
            if not rank:
                continue
            index = len(lora_grads) // 2
            grad_b = (grad_out[:, rows].t() @ low_rank[:, columns]) * scaling
            lora_grads += [grad_lora_a_all[columns].to(lora_as[index].dtype), grad_b.to(lora_bs[index].dtype)]
        return grad_x, None, None, None, *no_grads, *lora_grads


class StackedProjections:
    """A `ProjectionsFn` (see `gptoss_tune.model.gpt_oss`): the projections with one base GEMM each
    way.

    Runs when every projection is an nn.Linear or a `LoraLinear` without dropout, on one input
    size, with frozen base weights and biases (all with a bias or none); otherwise the separate
    calls run. Computes in the autocast dtype when autocast is on, as nn.Linear would.
    Given a `NormSource`, keeps its hidden instead of the input (see the module).
    """

    takes_norm_source = True  # see `gptoss_tune.model.gpt_oss.NormSource`

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

    def __call__(
        self, projections: Sequence[nn.Linear], hidden: Tensor, norm_source: NormSource | None = None
    ) -> list[Tensor]:
        if not self.can_run(projections):
            return separate_projections(projections, hidden)
        device = hidden.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
        adapted = [p for p in projections if isinstance(p, LoraLinear)]
        stack = _Stack(
            tuple(p.out_features for p in projections),
            tuple(p.lora_A.shape[0] if isinstance(p, LoraLinear) else 0 for p in projections),
            tuple(p.scaling if isinstance(p, LoraLinear) else 0.0 for p in projections),
        )
        with torch.autocast(device, enabled=False):
            out = _StackedLinear.apply(
                hidden.reshape(-1, hidden.shape[-1]).to(dtype),
                norm_source,
                stack,
                len(projections),
                *(p.weight for p in projections),
                *(p.bias for p in projections),
                *(t for p in adapted for t in (p.lora_A, p.lora_B)),
            )
        parts = out.view(*hidden.shape[:-1], out.shape[-1]).split(stack.out_features, dim=-1)
        # The narrow parts (key, value) are copied: attention keeps the value for backward, and a
        # view of it would keep the whole [N, sum out + R] output alive with it.
        widest = max(stack.out_features)
        return [part if part.shape[-1] == widest else part.contiguous() for part in parts]
