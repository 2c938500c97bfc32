"""FlashAttention-4 (the `flash-attn-4` package, `flash_attn.cute`) for gpt-oss, where installed.

FlashAttention-4 has what gpt-oss needs natively: a learnable sink logit per head (forward and
backward on sm90 and sm100), sliding windows, grouped-query heads and variable-length documents
(`cu_seqlens`), so a packed micro-batch is one call with no mask function at all:

- the rows [B, T] are flattened to one stream of B * T tokens and every document (a row start
  always starts one) becomes one sequence of `cu_seqlens`;
- a window of w keys including the query itself is FlashAttention's `window_size=(w - 1, 0)`;
- the sink is FlashAttention's `learnable_sink`: the same natural-log logit, unscaled.

The output is token-major ([B, T, H, D] in memory), which the output projection reads as a view.
Calls it cannot take (CPU tensors, other dtypes, head sizes or GPUs, or the package missing) go to
`fallback` (FlexAttention by default in `enable_fast_paths`). The eager reference is
`gptoss_tune.model.gpt_oss.eager_attention`; tests/gpu compares the two.
"""

from __future__ import annotations

import functools
from types import ModuleType

import torch
from torch import Tensor

from gptoss_tune.kernels.attention import document_starts
from gptoss_tune.model.gpt_oss import AttentionFn, eager_attention

SUPPORTED_DTYPES = (torch.bfloat16, torch.float16)
SUPPORTED_HEAD_DIMS = (64, 96, 128)
SUPPORTED_CAPABILITIES = ((9, 0), (10, 0), (10, 3))  # H100/H200, B200/GB200, B300


@functools.cache
def flash_attention_4() -> ModuleType | None:
    """`flash_attn.cute` when flash-attn-4 and its CuTe DSL import, else None."""
    try:
        import flash_attn.cute as module
    except Exception:  # noqa: BLE001 - missing, or a CUDA/DSL mismatch: either way not usable
        return None
    return module if hasattr(module, "flash_attn_varlen_func") else None


def document_sequences(documents: Tensor) -> tuple[Tensor, int]:
    """Per-token document ids [B, T] -> (cu_seqlens [n + 1] int32 over the flattened B * T tokens,
    the longest document's length). Documents are contiguous; each row starts a new one."""
    boundaries = torch.cat(
        [
            document_starts(documents).flatten().nonzero().flatten(),
            torch.tensor([documents.numel()], device=documents.device),
        ]
    )
    longest = int(boundaries.diff().max())
    return boundaries.to(torch.int32), longest


def flash_window(sliding_window: int | None) -> tuple[int | None, int | None]:
    """Our window (the last `sliding_window` keys, the query included) as FlashAttention's
    (left, right); (None, None) is plain causal."""
    return (sliding_window - 1, 0) if sliding_window is not None else (None, None)


class FlashAttention:
    """An `AttentionFn` on FlashAttention-4's variable-length kernel with sinks.

    The document boundaries of a micro-batch are computed once (one host sync for the longest
    document) the first time a layer calls with its `documents` tensor, and reused by the other
    layers and by recomputation in backward, like FlexAttention's block masks.
    """

    def __init__(self, fallback: AttentionFn = eager_attention) -> None:
        self.fallback = fallback
        self._documents: Tensor | None = None
        self._sequences: tuple[Tensor, int] | None = None

    @staticmethod
    def available() -> bool:
        return flash_attention_4() is not None

    def can_run(self, query: Tensor, key: Tensor, value: Tensor, sinks: Tensor) -> bool:
        if not query.is_cuda or flash_attention_4() is None:
            return False
        same_dtype = query.dtype == key.dtype == value.dtype and query.dtype in SUPPORTED_DTYPES
        head_dim = query.shape[-1]
        return (
            same_dtype
            and head_dim == value.shape[-1]
            and head_dim in SUPPORTED_HEAD_DIMS
            and torch.cuda.get_device_capability(query.device) in SUPPORTED_CAPABILITIES
        )

    def sequences(self, documents: Tensor) -> tuple[Tensor, int]:
        if documents is not self._documents:
            self._documents, self._sequences = documents, document_sequences(documents)
        return self._sequences

    def __call__(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        sinks: Tensor,
        *,
        scaling: float,
        sliding_window: int | None,
        documents: Tensor,
    ) -> Tensor:
        if not self.can_run(query, key, value, sinks):
            return self.fallback(
                query, key, value, sinks, scaling=scaling, sliding_window=sliding_window, documents=documents
            )
        batch, heads, length, head_dim = query.shape
        cu_seqlens, longest = self.sequences(documents)
        q, k, v = (
            t.transpose(1, 2).reshape(batch * length, t.shape[1], head_dim) for t in (query, key, value)
        )
        out, _ = flash_attention_4().flash_attn_varlen_func(
            q,
            k,
            v,
            cu_seqlens_q=cu_seqlens,
            cu_seqlens_k=cu_seqlens,
            max_seqlen_q=longest,
            max_seqlen_k=longest,
            softmax_scale=scaling,
            causal=True,
            window_size=flash_window(sliding_window),
            learnable_sink=sinks,
        )
        return out.view(batch, length, heads, head_dim).transpose(1, 2)
