"""FlexAttention for gpt-oss: attention sinks, sliding windows and packed documents.

The eager reference is `gptoss_tune.model.gpt_oss.eager_attention`. Here:

- The sink is applied after FlexAttention from its log-sum-exp: with a sink logit s per head, the
  softmax over (keys + sink) is the softmax over the keys scaled by exp(lse) / (exp(lse) + exp(s)),
  so out = flex_out * sigmoid(lse - s). This is exact, and the lse carries gradient.
- The block masks (which 128 x 128 tiles are empty, partial or full) are derived directly from the
  per-token document ids: documents are contiguous and numbered in order, so the first and last
  document of each tile decide. Nothing of size T x T is ever built, so 128k-token sequences cost
  a (T / 128)^2 tile table and no more. Inside a partial tile the kernel evaluates the mask
  function on every pair; it compares the key with one precomputed bound per query (the first key
  the query may see: its document's start, or the window's), which is cheaper than looking up both
  tokens' documents.
- `FlexAttention` builds the masks of a micro-batch the first time a layer calls it with that
  micro-batch's `documents` tensor (the decoder computes it once per forward and hands the same
  tensor to every layer, also when a checkpointed layer is recomputed in backward) and reuses
  them: one mask for the sliding layers, one for the full layers.
- A length that is not a multiple of the tile size is padded up to one inside (the padding is an
  extra document no real token can see, cut off the output again).
- Shapes FlexAttention cannot (or should not) take fall back to the eager reference: sequences
  shorter than `MIN_FLEX_LENGTH` (very short ones failed to compile on torch 2.11; the eager path
  is cheap there), and CPU tensors that need gradients (FlexAttention has no CPU backward).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from gptoss_tune.model.gpt_oss import eager_attention

try:  # torch >= 2.9 asks for the log-sum-exp through an AuxRequest
    from torch.nn.attention.flex_attention import AuxRequest
except ImportError:  # pragma: no cover - older torch
    AuxRequest = None

BLOCK_SIZE = 128
MIN_FLEX_LENGTH = 256

# FlexAttention's tile sizes for gpt-oss's 64-wide bf16 heads on sm90 (H100 / H200), measured at
# 16k tokens (scripts/gpu/tune_kernels.py attention, then scripts/gpu/attention_masks.py): a full-
# attention layer on 1024-token documents went 2.87 -> ~2.34 ms forward + backward against torch
# 2.11's defaults. The sliding-window layers meet only partial tiles, two per query tile, and do
# better with one pipeline stage fewer in backward (1.64 -> ~1.55 ms). Other GPUs, head sizes and
# dtypes keep the defaults. (Tiles of 64 would skip more of a 128-token window, but torch 2.11 then
# finds no backward configuration on sm90: its default one has 128-wide blocks.)
SM90_HEAD_DIM_64_OPTIONS = {
    "fwd_BLOCK_M": 64, "fwd_BLOCK_N": 64, "fwd_num_stages": 3, "fwd_num_warps": 4,
    "bwd_BLOCK_M1": 64, "bwd_BLOCK_N1": 64, "bwd_BLOCK_M2": 64, "bwd_BLOCK_N2": 64,
    "bwd_num_stages": 3, "bwd_num_warps": 4,
}  # fmt: skip
SM90_HEAD_DIM_64_SLIDING_OPTIONS = {**SM90_HEAD_DIM_64_OPTIONS, "bwd_num_stages": 2}

MaskMod = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]


# ---------------------------------------------------------------------------------------------------
# Masks
# ---------------------------------------------------------------------------------------------------


def document_starts(documents: Tensor) -> Tensor:
    """[B, T] bool: the token starts a document (every row's first token does)."""
    starts = torch.ones_like(documents, dtype=torch.bool)
    starts[:, 1:] = documents[:, 1:] != documents[:, :-1]
    return starts


def first_visible_keys(documents: Tensor, sliding_window: int | None) -> Tensor:
    """[B, T] the lowest key index each query may see: its document's first token, or with a window
    the later of that and the window's first key. Documents are contiguous, so with causality this
    bound alone decides visibility (`lower_bound_mask_mod`)."""
    length = documents.shape[1]
    positions = torch.arange(length, device=documents.device)
    first = torch.where(document_starts(documents), positions, 0).cummax(dim=1).values
    if sliding_window is not None:
        first = torch.maximum(first, positions - (sliding_window - 1))
    return first


def lower_bound_mask_mod(first_visible: Tensor) -> MaskMod:
    """Query q sees key k when first_visible[q] <= k <= q: one load per query row and two
    comparisons per pair (the kernel evaluates this on every pair of a partial tile)."""

    def mask_mod(batch: Tensor, head: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return (kv_idx <= q_idx) & (kv_idx >= first_visible[batch, q_idx])

    return mask_mod


def mask_mod_for(documents: Tensor, sliding_window: int | None) -> MaskMod:
    """Same document, causal, and within the last `sliding_window` keys (the query itself
    included) when a window is given."""
    return lower_bound_mask_mod(first_visible_keys(documents, sliding_window))


def tile_table(
    documents: Tensor, sliding_window: int | None, block_size: int = BLOCK_SIZE
) -> tuple[Tensor, Tensor]:
    """(partial, full) booleans [B, 1, n, n] over (query tile, key tile), n = T / block_size.

    Full tiles are exact: every query may see every key of the tile. Partial tiles are the other
    tiles that may hold a visible pair; they may include a tile with none (the kernel then applies
    the mask and skips nothing wrongly), but never miss a visible pair.
    """
    batch, length = documents.shape
    if length % block_size:
        raise ValueError(f"length {length} is not a multiple of the tile size {block_size}")
    tiles = length // block_size
    by_tile = documents.view(batch, tiles, block_size)
    first, last = by_tile[..., 0], by_tile[..., -1]  # documents are non-decreasing along a row
    index = torch.arange(tiles, device=documents.device)
    q_tile, kv_tile = index[:, None], index[None, :]
    # Document ids are consecutive, so tiles share a document iff their id ranges overlap; a key
    # tile at or before the query tile overlaps when its last id reaches the query tile's first.
    shares_document = last[:, None, :] >= first[:, :, None]
    single_document = first[:, None, :] == last[:, :, None]
    any_visible = (kv_tile <= q_tile) & shares_document
    all_visible = (kv_tile < q_tile) & single_document
    if sliding_window is not None:
        nearest = (q_tile - kv_tile) * block_size - (block_size - 1)  # first query, last key
        farthest = (q_tile - kv_tile) * block_size + (block_size - 1)  # last query, first key
        any_visible = any_visible & (nearest < sliding_window)
        all_visible = all_visible & (farthest < sliding_window)
    partial = any_visible & ~all_visible
    return partial.unsqueeze(1), all_visible.unsqueeze(1)


def tiles_to_kv_blocks(tiles: Tensor) -> tuple[Tensor, Tensor]:
    """Boolean [B, H, n, n] -> (count per query tile [B, H, n], key-tile indices [B, H, n, n]),
    the selected key tiles first, in increasing order (FlexAttention's kv_num_blocks / kv_indices)."""
    counts = tiles.sum(dim=-1, dtype=torch.int32)
    indices = torch.argsort(tiles.to(torch.int8), dim=-1, descending=True, stable=True)
    return counts, indices.to(torch.int32)


def pad_documents(documents: Tensor, multiple: int) -> Tensor:
    """[B, T] -> [B, T'] with T' the next multiple of `multiple`: the padding is one more document,
    so no real token sees it (and it sees only itself)."""
    padding = -documents.shape[1] % multiple
    if not padding:
        return documents
    return torch.cat([documents, (documents[:, -1:] + 1).expand(-1, padding)], dim=1)


def build_block_mask(
    documents: Tensor, sliding_window: int | None, block_size: int = BLOCK_SIZE
) -> BlockMask:
    """The BlockMask of one layer type for a batch whose token documents are `documents` [B, T]."""
    length = documents.shape[1]
    partial, full = tile_table(documents, sliding_window, block_size)
    kv_num_blocks, kv_indices = tiles_to_kv_blocks(partial)
    full_kv_num_blocks, full_kv_indices = tiles_to_kv_blocks(full)
    return BlockMask.from_kv_blocks(
        kv_num_blocks,
        kv_indices,
        full_kv_num_blocks,
        full_kv_indices,
        BLOCK_SIZE=block_size,
        mask_mod=mask_mod_for(documents, sliding_window),
        seq_lengths=(length, length),
    )


# ---------------------------------------------------------------------------------------------------
# Attention with sinks
# ---------------------------------------------------------------------------------------------------


def kernel_options_for(query: Tensor, sliding_window: int | None = None) -> dict | None:
    """Tuned tile sizes where they were measured (sm90, 64-wide bf16 heads, torch >= 2.11, whose
    FlexAttention takes fwd_ / bwd_ options), per layer type; None (the defaults) elsewhere."""
    if not query.is_cuda or query.dtype != torch.bfloat16 or query.shape[-1] != 64:
        return None
    if torch.cuda.get_device_capability(query.device) != (9, 0) or torch.__version__ < "2.11":
        return None
    return SM90_HEAD_DIM_64_OPTIONS if sliding_window is None else SM90_HEAD_DIM_64_SLIDING_OPTIONS


def _flex_with_lse(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    block_mask: BlockMask,
    scaling: float,
    kernel_options: dict | None = None,
) -> tuple[Tensor, Tensor]:
    """FlexAttention output and its log-sum-exp (natural log, fp32), on any torch >= 2.5."""
    if AuxRequest is not None:
        out, aux = flex_attention(
            query,
            key,
            value,
            block_mask=block_mask,
            scale=scaling,
            enable_gqa=True,
            return_aux=AuxRequest(lse=True),
            kernel_options=kernel_options,
        )
        return out, aux.lse
    return flex_attention(  # pragma: no cover - older torch
        query, key, value, block_mask=block_mask, scale=scaling, enable_gqa=True, return_lse=True
    )


def attend_with_sinks(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    sinks: Tensor,
    block_mask: BlockMask,
    scaling: float,
    kernel_options: dict | None = None,
) -> Tensor:
    """query [B, Hq, T, D], key/value [B, Hkv, T, D], sinks [Hq] -> [B, Hq, T, D]."""
    out, lse = _flex_with_lse(query, key, value, block_mask, scaling, kernel_options)
    keep = torch.sigmoid(lse - sinks.float().view(1, -1, 1))  # share of the mass left to the keys
    scaled = (out.float() * keep.unsqueeze(-1)).to(value.dtype)
    # Written token-major ([B, T, H, D] in memory; compiled, the scaling kernel writes it so): the
    # output projection then reads [B, T, H * D] as a view instead of a transposing copy.
    return scaled.transpose(1, 2).contiguous().transpose(1, 2)


class FlexAttention:
    """An `AttentionFn` (see `gptoss_tune.model.gpt_oss`) on FlexAttention, compiled on CUDA.

    Block masks are cached per micro-batch (keyed on the identity of its `documents` tensor, which
    the cache holds, so the identity cannot be reused by another tensor while cached).
    """

    def __init__(
        self,
        compile: bool = True,
        block_size: int = BLOCK_SIZE,
        min_length: int = MIN_FLEX_LENGTH,
    ) -> None:
        self.block_size = block_size
        self.min_length = min_length
        self.compiled = compile
        self._compiled = torch.compile(attend_with_sinks) if compile else None
        self._documents: Tensor | None = None
        self._padded_documents: Tensor | None = None
        self._masks: dict[int | None, BlockMask] = {}
        self.masks_built = 0  # for tests and logs: block masks built so far

    def can_run(self, query: Tensor, key: Tensor, value: Tensor, sinks: Tensor) -> bool:
        if query.shape[-2] < self.min_length:
            return False
        wants_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value, sinks))
        return query.is_cuda or not wants_grad

    def block_mask(self, documents: Tensor, sliding_window: int | None) -> BlockMask:
        """The mask of this micro-batch and layer type, over the tile-padded length."""
        if documents is not self._documents:
            self._documents, self._masks = documents, {}
            self._padded_documents = pad_documents(documents, self.block_size)
        if sliding_window not in self._masks:
            self._masks[sliding_window] = build_block_mask(
                self._padded_documents, sliding_window, self.block_size
            )
            self.masks_built += 1
        return self._masks[sliding_window]

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
            return eager_attention(
                query, key, value, sinks, scaling=scaling, sliding_window=sliding_window, documents=documents
            )
        block_mask = self.block_mask(documents, sliding_window)
        length = query.shape[-2]
        padding = -length % self.block_size
        dtype = value.dtype
        query, key, value = (
            F.pad(t.to(dtype), (0, 0, 0, padding)) if padding else t.to(dtype) for t in (query, key, value)
        )
        attend = self._compiled if self._compiled is not None and query.is_cuda else attend_with_sinks
        out = attend(query, key, value, sinks, block_mask, scaling, kernel_options_for(query, sliding_window))
        return out[:, :, :length] if padding else out
