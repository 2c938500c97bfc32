"""MXFP4 quantization of merged expert weights, with each block's scale chosen for the smallest error.

`model.checkpoint.quantize_mxfp4` gives each block of 32 the smallest power-of-two scale that fits its
largest magnitude (nothing saturates). Re-quantizing a merge with that rule goes wrong where it matters:
a base block whose largest value sits exactly on the top of its grid (6 x scale) and receives any
positive update, however small, moves to the next scale, and every value of the block is rounded on a
grid twice as coarse, an error many times the update itself. (The other common rule, OCP's
2^(floor(log2 max) - 2) with saturation, has the mirror-image pitfall when a top value of 4 x scale
shrinks.) Here each block tries the fitting scale and the one below it (where the largest values
saturate at 6 x scale) and keeps the one with the smaller squared error, so an unchanged block keeps
its codes and a slightly changed one its scale.

Layout as in `model.checkpoint`: blocks of 32 along the last dimension, two e2m1 codes a byte (low
nibble first), scales as exponent + 127.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from gptoss_tune.model.checkpoint import FP4_VALUES, MXFP4_BLOCK_SIZE, MXFP4_SCALE_BIAS

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
