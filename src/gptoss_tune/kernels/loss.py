"""Fused linear cross-entropy over the 201,088-token vocabulary.

The reference is `gptoss_tune.model.gpt_oss.chunked_causal_lm_loss`, which checkpoints each chunk of
logits and therefore runs the lm_head GEMM three times per trained token (forward, recompute,
backward). lm_head is frozen in LoRA training, so the gradient of the loss with respect to the
hidden states is all backward needs: this version computes it in forward, chunk by chunk, while
the chunk's logits are at hand (softmax - one_hot, times lm_head), and keeps only that [N, H]
gradient. Two GEMMs per trained token instead of three, and the peak is one chunk of logits.

Only trained positions are computed (labels after the shift, and never across a packed document
boundary). With `compile=True` the per-chunk softmax / gradient epilogue is one kernel that reads
the low-precision logits twice and never materializes them in fp32 (`loss_triton` on CUDA,
torch.compile of `cross_entropy_sum_and_grad` elsewhere).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from gptoss_tune.kernels import loss_triton
from gptoss_tune.model.gpt_oss import IGNORE_INDEX, chunked_causal_lm_loss, shift_labels

DEFAULT_CHUNK_TOKENS = 2048

ChunkFn = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]


def cross_entropy_sum_and_grad(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """(sum of cross-entropies in fp32, d(sum)/d(logits) in the logits' dtype) for one chunk."""
    logits_fp32 = logits.float()
    log_normalizer = torch.logsumexp(logits_fp32, dim=-1, keepdim=True)
    target_logits = logits_fp32.gather(1, targets.unsqueeze(1))
    loss_sum = (log_normalizer - target_logits).sum()
    probs = logits_fp32.sub_(log_normalizer).exp_()  # in place: one fp32 chunk at a time
    probs.scatter_add_(1, targets.unsqueeze(1), torch.full_like(target_logits, -1.0))
    return loss_sum, probs.to(logits.dtype)


class _LinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(hidden_i W^T, target_i) with W frozen; the hidden gradient is computed in forward."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, chunk_tokens: int, chunk_fn: ChunkFn):
        wants_grad = ctx.needs_input_grad[0]
        dtype = weight.dtype
        grad_hidden = torch.empty(hidden.shape, dtype=dtype, device=hidden.device) if wants_grad else None
        loss_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, targets.numel(), chunk_tokens):
                piece = slice(start, start + chunk_tokens)
                logits = hidden[piece].to(dtype) @ weight.t()
                chunk_loss, grad_logits = chunk_fn(logits, targets[piece])
                loss_sum += chunk_loss
                if grad_hidden is not None:
                    torch.matmul(grad_logits, weight, out=grad_hidden[piece])
        ctx.save_for_backward(grad_hidden)
        return loss_sum

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        (grad_hidden,) = ctx.saved_tensors
        if grad_hidden is None:
            return None, None, None, None, None
        return grad_hidden * grad_loss.to(grad_hidden.dtype), None, None, None, None


def linear_cross_entropy_sum(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    chunk_fn: ChunkFn = cross_entropy_sum_and_grad,
) -> Tensor:
    """Sum of CE(hidden W^T, targets) over rows of hidden [N, H]; W [V, H] must be frozen."""
    if weight.requires_grad:
        raise ValueError("linear_cross_entropy_sum keeps no gradient for the lm_head weight")
    return _LinearCrossEntropy.apply(hidden, weight, targets, chunk_tokens, chunk_fn)


class FusedLinearCrossEntropy:
    """A `LossFn` (see `gptoss_tune.model.gpt_oss`): (sum of next-token losses, number of targets).

    Falls back to the checkpointed reference when the lm_head weight is trainable.
    """

    def __init__(self, chunk_tokens: int = DEFAULT_CHUNK_TOKENS, compile: bool = True) -> None:
        self.chunk_tokens = chunk_tokens
        self.compiled = compile
        self._compiled_chunk_fn: ChunkFn | None = None

    def chunk_fn(self, device: torch.device) -> ChunkFn:
        """The Triton kernel on CUDA, torch.compile of the reference elsewhere (when compiling)."""
        if not self.compiled:
            return cross_entropy_sum_and_grad
        if loss_triton.available(device):
            return loss_triton.cross_entropy_sum_and_grad
        if self._compiled_chunk_fn is None:
            self._compiled_chunk_fn = torch.compile(cross_entropy_sum_and_grad, dynamic=True)
        return self._compiled_chunk_fn

    def __call__(
        self, hidden: Tensor, lm_head_weight: Tensor, labels: Tensor, position_ids: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        if lm_head_weight.requires_grad:
            return chunked_causal_lm_loss(hidden, lm_head_weight, labels, position_ids, self.chunk_tokens)
        targets = shift_labels(labels, position_ids).reshape(-1)
        trained = (targets != IGNORE_INDEX).nonzero().squeeze(-1)
        selected = hidden.reshape(-1, hidden.shape[-1]).index_select(0, trained)
        targets = targets.index_select(0, trained)
        count = torch.tensor(targets.numel(), device=targets.device)
        # Starts from the (possibly empty) selection so that a micro-batch without trained tokens
        # still has a graph to run backward through.
        loss_sum = selected.sum(dtype=torch.float32) * 0.0
        if targets.numel():
            loss_sum = loss_sum + linear_cross_entropy_sum(
                selected, lm_head_weight, targets, self.chunk_tokens, self.chunk_fn(hidden.device)
            )
        return loss_sum, count
