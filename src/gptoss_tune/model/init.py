"""Random-weight gpt-oss checkpoints in the real on-disk layout, with a tokenizer built offline.

`init_model("tiny", dir)` writes what a Hub snapshot of openai/gpt-oss-* holds (config.json,
safetensors, generation_config.json, tokenizer.json, tokenizer_config.json,
special_tokens_map.json, chat_template.jinja), so every stage can be exercised without a download.
Full-size presets stream: one tensor (one expert, for the experts) is generated at a time.
"""

from __future__ import annotations

from collections.abc import Iterator
from importlib.resources import files
from pathlib import Path

import torch
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn
from torch import Tensor
from transformers import GptOssConfig

from gptoss_tune.files import atomic_directory, write_json
from gptoss_tune.harmony.hf_tokenizer import build_hf_tokenizer
from gptoss_tune.model.checkpoint import GENERATION_CONFIG, checkpoint_config, write_weights
from gptoss_tune.model.gpt_oss import GptOss
from gptoss_tune.model.mxfp4 import Mxfp4Weight
from gptoss_tune.model.presets import InitScales, preset_config, preset_init_scales
from gptoss_tune.model.random_weights import RandomWeights, drawn_tensors, parameter_shapes

BOS_TOKEN, EOS_TOKEN, PAD_TOKEN = "<|startoftext|>", "<|return|>", "<|endoftext|>"
CHAT_TEMPLATE_FILE = "chat_template.jinja"

# tokenizer_config.json as published, so transformers 4.x (e.g. inside vLLM) reads it too.
TOKENIZER_CONFIG = {
    "bos_token": BOS_TOKEN,
    "clean_up_tokenization_spaces": False,
    "eos_token": EOS_TOKEN,
    "extra_special_tokens": {},
    "model_input_names": ["input_ids", "attention_mask"],
    "model_max_length": 1000000000000000019884624838656,
    "pad_token": PAD_TOKEN,
    "tokenizer_class": "PreTrainedTokenizerFast",
}


def official_chat_template() -> str:
    """The chat template of openai/gpt-oss-20b (shipped with this package, byte for byte)."""
    return files("gptoss_tune.harmony").joinpath(CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")


def _special_token_entry(content: str) -> dict:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}


def write_tokenizer_files(directory: Path) -> None:
    """tokenizer.json, tokenizer_config.json, special_tokens_map.json and chat_template.jinja."""
    build_hf_tokenizer().backend_tokenizer.save(str(directory / "tokenizer.json"))
    write_json(directory / "tokenizer_config.json", TOKENIZER_CONFIG)
    special_tokens = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "pad_token": PAD_TOKEN}
    write_json(
        directory / "special_tokens_map.json", {k: _special_token_entry(v) for k, v in special_tokens.items()}
    )
    (directory / CHAT_TEMPLATE_FILE).write_text(official_chat_template(), encoding="utf-8")


# ---------------------------------------------------------------------------------------------------
# Random weights
# ---------------------------------------------------------------------------------------------------


def _std(name: str, scales: InitScales) -> float:
    if name == "model.embed_tokens.weight":
        return scales.embed_tokens
    if name == "lm_head.weight":
        return scales.lm_head
    return scales.default


def initial_value(
    name: str, shape: tuple[int, ...], scales: InitScales, generator: torch.Generator
) -> Tensor:
    """fp32 initial value of one parameter, as transformers initializes gpt-oss: norms 1, linear and
    expert biases 0, everything else (sinks and router bias included) normal(0, std). Stacked
    experts are drawn one expert at a time."""
    if name.endswith("norm.weight"):
        return torch.ones(shape)
    if name.endswith(("_proj.bias", "experts.gate_up_proj_bias", "experts.down_proj_bias")):
        return torch.zeros(shape)
    std = _std(name, scales)
    if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
        return torch.stack([torch.randn(shape[1:], generator=generator) * std for _ in range(shape[0])])
    return torch.randn(shape, generator=generator) * std


def random_weights(
    config: GptOssConfig, scales: InitScales, seed: int = 0, dtype: torch.dtype = torch.bfloat16
) -> Iterator[tuple[str, Tensor]]:
    """(name, tensor) for every parameter, generated one at a time in a fixed order (reproducible)."""
    generator = torch.Generator().manual_seed(seed)
    for name, shape in parameter_shapes(config):
        yield name, initial_value(name, shape, scales, generator).to(dtype)


def init_weights_(model: GptOss, scales: InitScales, seed: int = 0) -> GptOss:
    """Fill an in-memory model with the same values `init_model` writes for this seed."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(initial_value(name, tuple(param.shape), scales, generator))
    return model


def stored_pairs(tensors: Iterator[tuple[str, Tensor | Mxfp4Weight]]) -> Iterator[tuple[str, Tensor]]:
    """MXFP4 weights as the `X_blocks` / `X_scales` pairs that `write_weights` stores as they are."""
    for name, tensor in tensors:
        if isinstance(tensor, Mxfp4Weight):
            yield f"{name}_blocks", tensor.blocks
            yield f"{name}_scales", tensor.scales
        else:
            yield name, tensor


def _with_progress(
    tensors: Iterator[tuple[str, Tensor]], total: int, description: str, enabled: bool
) -> Iterator[tuple[str, Tensor]]:
    columns = (TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), TimeRemainingColumn())
    with Progress(*columns, disable=not enabled, transient=True) as progress:
        task = progress.add_task(description, total=total)
        for name, tensor in tensors:
            yield name, tensor
            # MXFP4 blocks hold two values per byte; their scales count as no values
            values = (
                0 if name.endswith("_scales") else tensor.numel() * (2 if name.endswith("_blocks") else 1)
            )
            progress.advance(task, values)


def init_model(
    preset: str,
    output_dir: str | Path,
    mxfp4: bool = False,
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
    overwrite: bool = False,
    progress: bool = True,
    random_on_load: bool = False,
    draw_mxfp4_codes: bool | None = None,
) -> Path:
    """Write a complete random-weight checkpoint of `preset` (tiny, 20b, 120b) to `output_dir`.

    With `mxfp4`, the experts are stored as MXFP4 like the published checkpoints; the rest is in
    `dtype`. With `draw_mxfp4_codes` (default: for the full-size presets) they are then drawn as
    random MXFP4 codes, as `random_on_load` draws them, not quantized from normal weights (which
    would take half an hour for 20b on a CPU).
    With `random_on_load`, no weights are written: the loader draws them on its device
    (`gptoss_tune.model.random_weights`; MXFP4 experts, lm_head at std 1/sqrt(hidden) so logits have
    unit scale). Returns the output directory.
    """
    config = preset_config(preset)
    scales = preset_init_scales(preset)
    total = sum(torch.Size(shape).numel() for _, shape in parameter_shapes(config))
    drawn = RandomWeights.with_unit_logits(config, seed, scales.default)
    with atomic_directory(output_dir, overwrite=overwrite) as directory:
        if random_on_load:
            drawn.write(directory)
        else:
            if draw_mxfp4_codes is None:
                draw_mxfp4_codes = preset != "tiny"
            if mxfp4 and draw_mxfp4_codes:
                stream = stored_pairs(drawn_tensors(config, drawn, dtype, "cpu"))
            else:
                stream = random_weights(config, scales, seed, dtype)
            tensors = _with_progress(stream, total, f"Writing random {preset} weights", progress)
            write_weights(directory, tensors, dtype, mxfp4)
        write_json(directory / "config.json", checkpoint_config(config, dtype, mxfp4 or random_on_load))
        write_json(directory / "generation_config.json", GENERATION_CONFIG)
        write_tokenizer_files(directory)
        write_json(
            directory / "gptoss_tune_init.json",
            {
                "preset": preset,
                "seed": seed,
                "mxfp4": mxfp4 or random_on_load,
                "dtype": str(dtype),
                "random_on_load": random_on_load,
            },
        )
    return Path(output_dir)
