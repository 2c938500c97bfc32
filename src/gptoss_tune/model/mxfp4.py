"""MXFP4 expert weights kept quantized in memory (`--expert-storage mxfp4`).

The experts are ~90% of gpt-oss's weights. Kept as MXFP4 (4.25 bits per value) instead of bf16, the
20b model takes 13.7 GB (12.8 GiB) instead of 42 GB. The frozen base stays quantized for the whole run; a layer's
dense weights exist only while that layer computes:

- forward: `Experts.gate_up_weight()` / `down_weight()` dequantize the whole layer once
  (`dequantize_experts`), into a fresh tensor that nothing keeps after the layer's forward;
- backward: `frozen_weight_op` saves no weight for backward; it calls a `rebuild` function that
  dequantizes again (for the eager expert loop, only the one expert whose gradient it computes).

Dequantization is exact (every e2m1 value times a power of two is representable in bf16 and fp32),
so training with MXFP4 storage gives bit-identical results to dequantizing the checkpoint at load.

Layout, as stored by the published checkpoints (see `gptoss_tune.model.checkpoint`): per stacked
expert weight, `_blocks` u8 [E, out, in / 32, 16] holds two FP4 (e2m1) codes per byte, low nibble
first, along `in`; `_scales` u8 [E, out, in / 32] is a power-of-two exponent with bias 127. Our
dense layout is [E, in, out].

This module imports only torch: the model and the checkpoint code both build on it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
MXFP4_BLOCK_SIZE = 32
MXFP4_SCALE_BIAS = 127

# `--expert-storage`: auto picks mxfp4 when the checkpoint is MXFP4 and the model goes to a GPU.
# "bf16" means dense experts in the training dtype (fp32 when training in fp32).
EXPERT_STORAGES = ("auto", "mxfp4", "bf16")

# Temporaries of the eager dequantization (int32 index + gathered values) stay below this.
DEFAULT_CHUNK_BYTES = 256 * 1024**2

DequantizeFn = Callable[[Tensor, Tensor, torch.dtype], Tensor]


# ---------------------------------------------------------------------------------------------------
# Dequantization
# ---------------------------------------------------------------------------------------------------


def scaled_pair_table(dtype: torch.dtype, device: torch.device) -> Tensor:
    """[65536, 2] lookup table: row (scale << 8) | byte holds the byte's two values (low nibble
    first) times 2^(scale - 127), in `dtype`. One gather per byte dequantizes, with no arithmetic on
    the device, so the result is the same on every device and backend."""
    return _scaled_pair_table(dtype, torch.device(device))


@functools.cache
def _scaled_pair_table(dtype: torch.dtype, device: torch.device) -> Tensor:
    codes = torch.arange(256)
    fp4 = torch.tensor(FP4_VALUES, dtype=torch.float32)
    pairs = torch.stack([fp4[codes & 0x0F], fp4[codes >> 4]], dim=-1)  # [byte, 2], low nibble first
    exponents = torch.arange(256, dtype=torch.int32) - MXFP4_SCALE_BIAS
    # ldexp in fp32 on the CPU, then a cast: what `checkpoint.dequantize_mxfp4` and transformers compute.
    table = torch.ldexp(pairs.expand(256, 256, 2), exponents.view(256, 1, 1).expand(256, 256, 2))
    return table.reshape(256 * 256, 2).to(dtype).to(device)


def check_mxfp4(blocks: Tensor, scales: Tensor) -> None:
    """Raise ValueError unless blocks u8 [E, out, G, 16] and scales u8 [E, out, G] belong together."""
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise ValueError(f"MXFP4 blocks and scales must be uint8, got {blocks.dtype} and {scales.dtype}")
    if blocks.dim() != 4 or blocks.shape[-1] != MXFP4_BLOCK_SIZE // 2 or blocks.shape[:-1] != scales.shape:
        raise ValueError(
            f"MXFP4 blocks {tuple(blocks.shape)} and scales {tuple(scales.shape)} are not "
            "[E, out, G, 16] and [E, out, G]"
        )


def _dequantize_transposed(blocks: Tensor, scales: Tensor, table: Tensor) -> Tensor:
    """[e, out, G, 16] + [e, out, G] -> a transposed view [e, in, out] of freshly gathered values."""
    experts, rows, groups, half_block = blocks.shape
    index = (scales.to(torch.int32) << 8).unsqueeze(-1) | blocks  # int32 [e, out, G, 16]
    values = table.index_select(0, index.reshape(-1))  # [e * out * G * 16, 2]
    return values.view(experts, rows, groups * 2 * half_block).transpose(1, 2)


def _experts_per_chunk(blocks: Tensor, dtype: torch.dtype, chunk_bytes: int) -> int:
    bytes_per_expert = blocks[0].numel() * (4 + 2 * dtype.itemsize)  # int32 index + two values per byte
    return max(1, chunk_bytes // max(bytes_per_expert, 1))


def dequantize_experts(
    blocks: Tensor, scales: Tensor, dtype: torch.dtype, chunk_bytes: int = DEFAULT_CHUNK_BYTES
) -> Tensor:
    """Stored MXFP4 blocks u8 [E, out, G, 16] and scales u8 [E, out, G] -> dense [E, in, out]
    (in = 32 G), contiguous, in `dtype`. Exact; the temporaries stay below `chunk_bytes`."""
    check_mxfp4(blocks, scales)
    experts, rows, groups, half_block = blocks.shape
    table = scaled_pair_table(dtype, blocks.device)
    out = torch.empty(experts, groups * 2 * half_block, rows, dtype=dtype, device=blocks.device)
    step = _experts_per_chunk(blocks, dtype, chunk_bytes)
    for start in range(0, experts, step):
        chunk = slice(start, start + step)
        out[chunk] = _dequantize_transposed(blocks[chunk], scales[chunk], table)
    return out


def _dequantize_contiguous(blocks: Tensor, scales: Tensor, table: Tensor) -> Tensor:
    return _dequantize_transposed(blocks, scales, table).contiguous()


@functools.cache
def _compiled_dequantize() -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    return torch.compile(_dequantize_contiguous, dynamic=False, fullgraph=True)


def compiled_dequantize_experts(blocks: Tensor, scales: Tensor, dtype: torch.dtype) -> Tensor:
    """`dequantize_experts` through torch.compile, so that the index, the gather and the transposed
    write fuse into one kernel without temporaries (speed: tests/gpu). Bit-identical to the eager
    function (a table lookup, no arithmetic); compiles once per shape. Install it with
    `experts.dequantize_fn = compiled_dequantize_experts`."""
    check_mxfp4(blocks, scales)
    return _compiled_dequantize()(blocks, scales, scaled_pair_table(dtype, blocks.device))


def empty_mxfp4(shape: torch.Size | tuple[int, int, int], device: torch.device | str) -> Mxfp4Weight:
    """Uninitialized MXFP4 storage of an expert weight whose dense shape is [E, in, out]."""
    count, in_features, out_features = shape
    blocks_shape = (count, out_features, in_features // MXFP4_BLOCK_SIZE, MXFP4_BLOCK_SIZE // 2)
    blocks = torch.empty(blocks_shape, dtype=torch.uint8, device=device)
    return Mxfp4Weight(blocks, torch.empty(blocks_shape[:-1], dtype=torch.uint8, device=device))


def dense_shape(blocks: Tensor) -> torch.Size:
    """Our [E, in, out] shape of a stored [E, out, G, 16] MXFP4 weight."""
    experts, rows, groups, half_block = blocks.shape
    return torch.Size((experts, groups * 2 * half_block, rows))


@dataclass(frozen=True)
class Mxfp4Weight:
    """A stacked expert weight as MXFP4 checkpoints store it: blocks u8 [E, out, in / 32, 16] and
    scales u8 [E, out, in / 32]."""

    blocks: Tensor
    scales: Tensor

    def __post_init__(self) -> None:
        check_mxfp4(self.blocks, self.scales)

    @property
    def shape(self) -> torch.Size:
        """The dense weight's shape in our layout, [E, in, out]."""
        return dense_shape(self.blocks)

    def dequantize(self, dtype: torch.dtype) -> Tensor:
        return dequantize_experts(self.blocks, self.scales, dtype)


# ---------------------------------------------------------------------------------------------------
# Autograd without keeping the frozen weight
# ---------------------------------------------------------------------------------------------------


class _FrozenWeightOp(torch.autograd.Function):
    """out = op(x, weight, *args) for an op linear in x whose input gradient is
    op(grad, weight^T, *args) (matmul; grouped_mm with the same offsets). Saves nothing: backward
    gets the weight again from `rebuild()`."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, rebuild: Callable[[], Tensor], op: Callable, *args: Any):
        out = op(x, weight, *args)
        ctx.rebuild, ctx.op, ctx.args = rebuild, op, args
        ctx.input_dtype, ctx.compute_dtype = x.dtype, out.dtype
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor):
        nones = (None,) * (3 + len(ctx.args))
        if not ctx.needs_input_grad[0]:
            return None, *nones
        # Under autocast the forward ran in compute_dtype; so does the gradient, as plain autograd would.
        weight = ctx.rebuild().to(ctx.compute_dtype)
        grad_x = ctx.op(grad.to(ctx.compute_dtype), weight.transpose(-2, -1), *ctx.args)
        return grad_x.to(ctx.input_dtype), *nones


def frozen_weight_op(
    op: Callable[..., Tensor], x: Tensor, weight: Tensor, rebuild: Callable[[], Tensor], *args: Any
) -> Tensor:
    """op(x, weight, *args), where autograd keeps no reference to `weight`.

    Plain autograd saves the weight of a matmul to compute the input's gradient, which would keep
    every layer's dequantized experts alive until backward. Here backward calls `rebuild()` (which
    must return the same values, e.g. by dequantizing again) instead. `op` must be linear in x with
    input gradient op(grad, weight^T, *args): torch.matmul, or grouped_mm with its offsets.
    A weight that requires grad takes the plain path.
    """
    if weight.requires_grad or not torch.is_grad_enabled():
        return op(x, weight, *args)
    return _FrozenWeightOp.apply(x, weight, rebuild, op, *args)


# ---------------------------------------------------------------------------------------------------
# Storage choice and state dicts
# ---------------------------------------------------------------------------------------------------


def resolve_expert_storage(choice: str, checkpoint_is_mxfp4: bool, device: str | torch.device) -> str:
    """The storage for `--expert-storage` `choice`: "mxfp4", or "bf16" (dense in the training dtype).

    auto: mxfp4 when the checkpoint stores MXFP4 experts and the model goes to a GPU. Raises
    ValueError for an unknown choice, or mxfp4 with a checkpoint that has no MXFP4 experts.
    """
    if choice not in EXPERT_STORAGES:
        raise ValueError(f"Unknown expert storage '{choice}': use one of {', '.join(EXPERT_STORAGES)}.")
    if choice == "auto":
        return "mxfp4" if checkpoint_is_mxfp4 and torch.device(device).type == "cuda" else "bf16"
    if choice == "mxfp4" and not checkpoint_is_mxfp4:
        raise ValueError(
            "expert storage mxfp4 needs a checkpoint with MXFP4 experts (`*_blocks` / `*_scales`, "
            "like openai/gpt-oss-20b); this one stores them dense. Use bf16 or auto."
        )
    return choice


def densify_tensors(
    tensors: Iterable[tuple[str, Tensor]], dtype: torch.dtype
) -> Iterator[tuple[str, Tensor]]:
    """Stream (name, tensor) pairs with every `X_blocks` / `X_scales` pair replaced by the dense
    weight `X` [E, in, out] in `dtype`, e.g. the state dict of a model with MXFP4 expert storage."""
    pending: dict[str, dict[str, Tensor]] = {}
    for name, tensor in tensors:
        base, _, part = name.rpartition("_")
        if part not in ("blocks", "scales") or not base:
            yield name, tensor
            continue
        halves = pending.setdefault(base, {})
        halves[part] = tensor
        if len(halves) == 2:
            del pending[base]
            yield base, dequantize_experts(halves["blocks"], halves["scales"], dtype)
    if pending:
        raise ValueError(f"MXFP4 tensors without their other half: {sorted(pending)[:3]}")


# --- quantization ------------------------------------------------------------------------------------
# Each block of 32 tries two scales: the smallest power of two that fits its largest magnitude (nothing
# saturates) and the one below it (the largest values saturate at 6 x scale), and keeps the one with the
# smaller squared error. The fitting scale alone goes wrong when re-quantizing a merge: a block whose
# largest value sits exactly on 6 x scale and grows by any amount would jump to a grid twice as coarse
# (an error many times the update); with the choice, an unchanged block keeps its exact codes and a
# slightly changed one its scale.

_MAGNITUDES = torch.tensor(FP4_VALUES[:8])  # 0, 0.5, 1, 1.5, 2, 3, 4, 6
_MIDPOINTS = (_MAGNITUDES[1:] + _MAGNITUDES[:-1]) / 2
_TOP = 6.0


@dataclass(frozen=True)
class Quantized:
    blocks: Tensor  # u8 [..., C / 32, 16]
    scales: Tensor  # u8 [..., C / 32]
    values: Tensor  # fp32 [..., C]: what the blocks and scales stand for


def _round_at(groups: Tensor, exponents: Tensor) -> tuple[Tensor, Tensor]:
    """Round groups [N, 32] on the grids of the given exponents [N, 1] (saturating at 6 x scale):
    (e2m1 codes, the values they stand for). Powers of two multiply exactly."""
    scale = torch.exp2(exponents.float())
    scaled = groups / scale
    negative = scaled < 0
    index = torch.bucketize(scaled.abs().clamp_(max=_TOP), _MIDPOINTS.to(groups.device))
    magnitude = _MAGNITUDES.to(groups.device)[index]
    values = torch.where(negative, -magnitude, magnitude).mul_(scale)
    return index | (negative.to(torch.int64) << 3), values


def quantize_min_error(values: Tensor) -> Quantized:
    """values [..., C] (C a multiple of 32) -> MXFP4 blocks, scales, and the values they represent."""
    *prefix, columns = values.shape
    if columns % MXFP4_BLOCK_SIZE:
        raise ValueError(f"MXFP4 needs the last dimension to be a multiple of 32, got {columns}")
    groups = values.float().reshape(-1, MXFP4_BLOCK_SIZE)
    largest = groups.abs().amax(dim=-1, keepdim=True)
    fitting = torch.nan_to_num(torch.ceil(torch.log2(largest / _TOP)), neginf=-MXFP4_SCALE_BIAS)
    fitting = fitting.clamp(-MXFP4_SCALE_BIAS, MXFP4_SCALE_BIAS).to(torch.int32)
    finer = (fitting - 1).clamp(min=-MXFP4_SCALE_BIAS)
    codes, rounded = _round_at(groups, fitting)
    codes_finer, rounded_finer = _round_at(groups, finer)
    use_finer = ((rounded_finer - groups) ** 2).sum(-1, keepdim=True) < ((rounded - groups) ** 2).sum(
        -1, keepdim=True
    )
    codes = torch.where(use_finer, codes_finer, codes)
    rounded = torch.where(use_finer, rounded_finer, rounded)
    exponents = torch.where(use_finer, finer, fitting)
    packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).to(torch.uint8)
    return Quantized(
        blocks=packed.view(*prefix, columns // MXFP4_BLOCK_SIZE, MXFP4_BLOCK_SIZE // 2),
        scales=(exponents + MXFP4_SCALE_BIAS).to(torch.uint8).view(*prefix, columns // MXFP4_BLOCK_SIZE),
        values=rounded.view(*prefix, columns),
    )
