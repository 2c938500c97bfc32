"""Checkpoints whose weights are drawn when they are loaded (`init-model --random-on-load`).

Such a folder holds config.json, the tokenizer files and `random_weights.json` (seed and scales),
but no safetensors. Loading draws every tensor on the loading device from a generator seeded by
(seed, tensor name), so the values do not depend on the order of loading, the device count or the
process: every rank of a DDP or FSDP run draws the same model. The experts are MXFP4 values like
the published checkpoints (random codes, one scale per block), so "--expert-storage mxfp4" keeps
them quantized and "bf16" dequantizes them at load, as with a real checkpoint.

This is what benchmarks of the full-size shapes train on: writing 120b's 65 GB (or 234 GB in
bf16) of random safetensors takes longer than the benchmark and may not fit the disk.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor
from transformers import GptOssConfig

from gptoss_tune.files import write_json
from gptoss_tune.model.gpt_oss import GptOss, is_expert_weight
from gptoss_tune.model.mxfp4 import MXFP4_SCALE_BIAS, Mxfp4Weight, empty_mxfp4

RANDOM_WEIGHTS_FILE = "random_weights.json"

# Every MXFP4 block scaled by 2^-7: uniform e2m1 codes have rms 2.93, so |w| ~ 0.023, about gpt-oss's
# initialization (std 0.02) and the published weights' magnitude.
RANDOM_SCALE = MXFP4_SCALE_BIAS - 7
DEFAULT_STD = 0.02


@dataclass(frozen=True)
class RandomWeights:
    """How the weights are drawn: norms 1, lm_head normal(0, lm_head_std), every other dense tensor
    normal(0, std); expert codes uniform bytes with scales uniform in RANDOM_SCALE +- scale_spread."""

    seed: int = 0
    std: float = DEFAULT_STD
    lm_head_std: float | None = None
    scale_spread: int = 1

    @classmethod
    def with_unit_logits(cls, config: GptOssConfig, seed: int, std: float = DEFAULT_STD) -> RandomWeights:
        """lm_head at std 1/sqrt(hidden), so that logits have unit scale."""
        return cls(seed=seed, std=std, lm_head_std=config.hidden_size**-0.5)

    def write(self, directory: Path) -> None:
        write_json(directory / RANDOM_WEIGHTS_FILE, asdict(self))

    @classmethod
    def read(cls, directory: Path) -> RandomWeights | None:
        """The folder's spec, or None for an ordinary checkpoint."""
        file = Path(directory) / RANDOM_WEIGHTS_FILE
        if not file.is_file():
            return None
        try:
            return cls(**json.loads(file.read_text()))
        except (json.JSONDecodeError, TypeError) as exc:
            raise ValueError(f"{file}: not a random-weights spec ({exc})") from None


def generator_for(name: str, seed: int, device: torch.device) -> torch.Generator:
    """A generator that depends only on (seed, name)."""
    return torch.Generator(device).manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))


def fill_dense_(
    name: str, tensor: Tensor, std: float, lm_head_std: float | None, generator: torch.Generator
) -> Tensor:
    """The rule for one dense tensor named as in our model: norms 1, lm_head normal(0, lm_head_std)
    when given, everything else normal(0, std)."""
    with torch.no_grad():
        if name.endswith("norm.weight"):
            return tensor.fill_(1.0)
        if name == "lm_head.weight" and lm_head_std is not None:
            return tensor.normal_(0.0, lm_head_std, generator=generator)
        return tensor.normal_(0.0, std, generator=generator)


def fill_codes_(blocks: Tensor, scales: Tensor, scale_spread: int, generator: torch.Generator) -> None:
    """MXFP4 storage: uniform random code bytes; scales uniform in RANDOM_SCALE +- scale_spread
    (all RANDOM_SCALE when 0)."""
    with torch.no_grad():
        blocks.random_(0, 256, generator=generator)
        if scale_spread:
            scales.random_(RANDOM_SCALE - scale_spread, RANDOM_SCALE + scale_spread + 1, generator=generator)
        else:
            scales.fill_(RANDOM_SCALE)


def draw_(name: str, tensor: Tensor, spec: RandomWeights) -> Tensor:
    """Fill one dense tensor (named as in our model) in place, on its device."""
    return fill_dense_(
        name, tensor, spec.std, spec.lm_head_std, generator_for(name, spec.seed, tensor.device)
    )


def draw_mxfp4(name: str, shape: torch.Size, spec: RandomWeights, device: torch.device) -> Mxfp4Weight:
    """Random MXFP4 storage of an expert weight whose dense shape is `shape` [E, in, out]."""
    weight = empty_mxfp4(shape, device)
    fill_codes_(weight.blocks, weight.scales, spec.scale_spread, generator_for(name, spec.seed, device))
    return weight


def parameter_shapes(config: GptOssConfig) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every parameter of a gpt-oss model with `config`, built on the meta device."""
    with torch.device("meta"):
        model = GptOss(config)
    return [(name, tuple(param.shape)) for name, param in model.named_parameters()]


def drawn_tensors(
    config: GptOssConfig, spec: RandomWeights, dtype: torch.dtype, device: str | torch.device
) -> Iterator[tuple[str, Tensor | Mxfp4Weight]]:
    """(name, tensor) for every parameter, as `iter_stored_tensors` yields a checkpoint's: the
    experts as `Mxfp4Weight`, the rest dense in `dtype`, all on `device`."""
    device = torch.device(device)
    for name, shape in parameter_shapes(config):
        if is_expert_weight(name):
            yield name, draw_mxfp4(name, shape, spec, device)
        else:
            yield name, draw_(name, torch.empty(shape, dtype=dtype, device=device), spec)
