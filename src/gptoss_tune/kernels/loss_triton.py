"""Triton version of the loss chunk's softmax / gradient epilogue (CUDA only).

Reference: `cross_entropy_sum_and_grad` in `gptoss_tune.kernels.loss`, compared with this on random
inputs in tests/gpu. torch.compile of the reference takes ~4x the memory-traffic floor on a
[2048, 201088] chunk. Here one program owns one row: a first pass keeps a running max and sum of
exponentials per lane (an online logsumexp), a second pass writes softmax - one_hot over the logits
in place. The logits are read twice and written once, and never exist in fp32.
"""

from __future__ import annotations

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the compiled reference is used instead
    triton = None

BLOCK = 4096
# A finite start for the running max: lanes that only ever see masked (-inf) values keep a zero sum
# instead of exp(-inf - -inf) = nan. Real logits are far above it.
VERY_NEGATIVE = -1e30


def available(device: torch.device) -> bool:
    return triton is not None and device.type == "cuda"


if triton is not None:

    @triton.jit
    def _cross_entropy_kernel(
        logits_ptr, targets_ptr, losses_ptr, vocab, row_stride,
        VERY_NEGATIVE_VALUE: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    ):  # fmt: skip
        row = tl.program_id(0)
        row_ptr = logits_ptr + row.to(tl.int64) * row_stride
        running_max = tl.full([BLOCK_SIZE], VERY_NEGATIVE_VALUE, dtype=tl.float32)
        running_sum = tl.zeros([BLOCK_SIZE], dtype=tl.float32)
        for start in range(0, vocab, BLOCK_SIZE):
            cols = start + tl.arange(0, BLOCK_SIZE)
            logits = tl.load(row_ptr + cols, mask=cols < vocab, other=float("-inf")).to(tl.float32)
            new_max = tl.maximum(running_max, logits)
            running_sum = running_sum * tl.exp(running_max - new_max) + tl.exp(logits - new_max)
            running_max = new_max
        row_max = tl.max(running_max, axis=0)
        log_normalizer = row_max + tl.log(tl.sum(running_sum * tl.exp(running_max - row_max), axis=0))
        target = tl.load(targets_ptr + row).to(tl.int64)
        target_logit = tl.load(row_ptr + target).to(tl.float32)
        tl.store(losses_ptr + row, log_normalizer - target_logit)
        for start in range(0, vocab, BLOCK_SIZE):
            cols = start + tl.arange(0, BLOCK_SIZE)
            mask = cols < vocab
            probs = tl.exp(tl.load(row_ptr + cols, mask=mask, other=0.0).to(tl.float32) - log_normalizer)
            probs = tl.where(cols == target, probs - 1.0, probs)
            tl.store(row_ptr + cols, probs.to(logits_ptr.dtype.element_ty), mask=mask)


def cross_entropy_sum_and_grad(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """Same contract as `gptoss_tune.kernels.loss.cross_entropy_sum_and_grad`, except that the
    gradient is written over `logits` (which the caller no longer needs) and returned."""
    rows, vocab = logits.shape
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    losses = torch.empty(rows, device=logits.device, dtype=torch.float32)
    if rows:
        _cross_entropy_kernel[(rows,)](
            logits, targets.contiguous(), losses, vocab, logits.stride(0),
            VERY_NEGATIVE_VALUE=VERY_NEGATIVE, BLOCK_SIZE=BLOCK, num_warps=8,
        )  # fmt: skip
    return losses.sum(), logits
