"""Hugging Face checkpoint directories for gpt-oss: find, read and write them.

Read: config.json plus model.safetensors or shards listed in model.safetensors.index.json, with
the experts either plain (bf16 / fp32) or MXFP4 (`*_blocks` / `*_scales`, as published by
OpenAI). Tensors are read one at a time and placed into a model built on the meta device, so a
checkpoint is never held twice in memory.

Write: sharded safetensors + index, config.json (with the MXFP4 `quantization_config` when the
experts are quantized) and generation_config.json, into a temporary sibling directory that is
renamed when complete.

MXFP4 on disk, per expert weight: values are stored [E, out, in] (transposed from our [E, in, out]),
in blocks of 32 along `in`; `_blocks` u8 [E, out, in / 32, 16] packs two FP4 (e2m1) codes per
byte, low nibble first; `_scales` u8 [E, out, in / 32] is a power-of-two exponent with bias 127.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor, nn
from transformers import GptOssConfig

from gptoss_tune.errors import GptossTuneError
from gptoss_tune.files import atomic_directory, read_json_object, save_safetensors, write_json
from gptoss_tune.model.gpt_oss import Experts, GptOss, is_expert_weight, rope_settings
from gptoss_tune.model.mxfp4 import (
    FP4_VALUES,
    MXFP4_SCALE_BIAS,
    Mxfp4Weight,
    densify_tensors,
    dequantize_experts,
    quantize_min_error,
    resolve_expert_storage,
)
from gptoss_tune.model.presets import MXFP4_MODULES_NOT_CONVERTED
from gptoss_tune.model.random_weights import RandomWeights, drawn_tensors

DEFAULT_MAX_SHARD_BYTES = 5 * 1000**3
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# generation_config.json of openai/gpt-oss-20b and -120b: stop on <|return|>, <|endoftext|>, <|call|>.
GENERATION_CONFIG: dict[str, Any] = {
    "bos_token_id": 199998,
    "do_sample": True,
    "eos_token_id": [200002, 199999, 200012],
    "pad_token_id": 199999,
}

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
)
# What a model repository must provide for us; the published repos also hold original/ and
# metal/ copies of the weights, which these patterns leave out.
HUB_ALLOW_PATTERNS = [
    "config.json",
    "generation_config.json",
    "model*.safetensors",
    INDEX_FILE,
    *TOKENIZER_FILES,
]


# ---------------------------------------------------------------------------------------------------
# Finding a checkpoint
# ---------------------------------------------------------------------------------------------------


def _looks_like_path(text: str) -> bool:
    return text.startswith((".", "/", "~")) or Path(text).exists() or text.count("/") > 1


def resolve_model_path(model_id_or_path: str | Path) -> Path:
    """A local checkpoint directory as is; otherwise a Hugging Face Hub id, downloaded (or found in
    the hub cache) with only the files we use."""
    text = str(model_id_or_path)
    local = Path(text).expanduser()
    if local.is_dir():
        return local
    if _looks_like_path(text):
        raise GptossTuneError(f"Model directory not found: {text}. Pass a directory holding config.json.")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(text, allow_patterns=HUB_ALLOW_PATTERNS))
    except Exception as exc:
        raise GptossTuneError(
            f"Could not download model '{text}' from the Hugging Face Hub ({type(exc).__name__}: {exc}). "
            "Without network access, download it elsewhere and pass the local directory instead."
        ) from exc


def model_reference(model: str | Path) -> str:
    """How files we write name a base model: a local folder by its absolute path (PEFT's
    AutoPeftModel finds it from anywhere), a hub id as it is."""
    local = Path(str(model)).expanduser()
    return str(local.resolve()) if local.is_dir() else str(model)


def read_config(path: str | Path) -> GptOssConfig:
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise GptossTuneError(f"{path}: no config.json; this is not a Hugging Face model directory.")
    model_type = _read_json(config_file).get("model_type")
    if model_type != "gpt_oss":
        raise GptossTuneError(f"{config_file}: model_type is '{model_type}', expected 'gpt_oss'.")
    return GptOssConfig.from_pretrained(path)


# ---------------------------------------------------------------------------------------------------
# MXFP4
# ---------------------------------------------------------------------------------------------------


def dequantize_mxfp4(
    blocks: Tensor, scales: Tensor, dtype: torch.dtype = torch.bfloat16, rows_per_chunk: int = 1 << 20
) -> Tensor:
    """blocks u8 [..., G, 16] and scales u8 [..., G] -> values [..., G * 32], in the stored orientation.

    Works through the blocks in chunks so the fp32 temporaries stay small.
    """
    if blocks.shape[:-1] != scales.shape:
        raise ValueError(f"MXFP4 blocks {tuple(blocks.shape)} do not match scales {tuple(scales.shape)}")
    *prefix, groups, half_block = blocks.shape
    flat_blocks = blocks.reshape(-1, half_block)
    exponents = scales.reshape(-1, 1).to(torch.int32) - MXFP4_SCALE_BIAS
    table = torch.tensor(FP4_VALUES, dtype=torch.float32, device=blocks.device)
    out = torch.empty(flat_blocks.shape[0], 2 * half_block, dtype=dtype, device=blocks.device)
    for start in range(0, flat_blocks.shape[0], rows_per_chunk):
        rows = slice(start, start + rows_per_chunk)
        chunk = flat_blocks[rows]
        values = torch.empty(chunk.shape[0], 2 * half_block, dtype=torch.float32, device=blocks.device)
        values[:, 0::2] = table[(chunk & 0x0F).long()]
        values[:, 1::2] = table[(chunk >> 4).long()]
        out[rows] = torch.ldexp(values, exponents[rows]).to(dtype)
    return out.view(*prefix, groups * 2 * half_block)


def quantize_mxfp4(values: Tensor) -> tuple[Tensor, Tensor]:
    """values [..., C] (C a multiple of 32) -> (blocks u8 [..., C / 32, 16], scales u8 [..., C / 32]),
    each value rounded to the nearest point of its block's grid (see `mxfp4.quantize_min_error`)."""
    quantized = quantize_min_error(values)
    return quantized.blocks, quantized.scales


def expert_weight_from_mxfp4(blocks: Tensor, scales: Tensor, dtype: torch.dtype) -> Tensor:
    """Stored [E, out, in] MXFP4 -> our [E, in, out] expert weight (contiguous)."""
    return dequantize_experts(blocks, scales, dtype)


def expert_weight_to_mxfp4(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Our [E, in, out] expert weight -> stored [E, out, in] MXFP4 (blocks, scales), one expert at a time."""
    quantized = [quantize_mxfp4(weight[expert].T) for expert in range(weight.shape[0])]
    return torch.stack([b for b, _ in quantized]), torch.stack([s for _, s in quantized])


# ---------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict:
    return read_json_object(path, "the checkpoint is incomplete or corrupt.")


@contextmanager
def _reading(file: Path) -> Iterator[None]:
    """safetensors' and the file system's errors, said of the file they come from."""
    from safetensors import SafetensorError

    try:
        yield
    except (SafetensorError, OSError) as exc:
        raise GptossTuneError(
            f"{file}: cannot read it ({exc}); the file is missing, truncated or corrupt: download or write it again."
        ) from None


def _tensor_files(path: Path) -> dict[str, Path]:
    """Checkpoint tensor name -> the safetensors file holding it."""
    index = path / INDEX_FILE
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise GptossTuneError(f"{index}: no 'weight_map'; the checkpoint is corrupt.")
        return {name: path / file for name, file in weight_map.items()}
    single = path / SINGLE_FILE
    if single.is_file():
        with _reading(single), safe_open(single, framework="pt") as handle:
            return dict.fromkeys(handle.keys(), single)
    raise GptossTuneError(
        f"{path}: no {SINGLE_FILE} or {INDEX_FILE}; only safetensors checkpoints are supported."
    )


def checkpoint_has_mxfp4_experts(path: str | Path) -> bool:
    """Whether the checkpoint at `path` stores (some) expert weights as MXFP4 `_blocks` / `_scales`
    (a random-on-load checkpoint draws MXFP4 experts)."""
    if _random_weights_spec(Path(path)) is not None:
        return True
    return any(name.endswith("_blocks") for name in _tensor_files(Path(path)))


def _random_weights_spec(path: Path) -> RandomWeights | None:
    try:
        return RandomWeights.read(path)
    except ValueError as exc:
        raise GptossTuneError(str(exc)) from None


def iter_checkpoint_tensors(
    path: str | Path, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu"
) -> Iterator[tuple[str, Tensor]]:
    """(name, tensor) pairs in our layout and names, one tensor in memory at a time.

    MXFP4 experts are dequantized to `dtype`; floating tensors are cast to `dtype`.
    """
    for name, tensor in iter_stored_tensors(path, dtype, device):
        yield name, tensor.dequantize(dtype) if isinstance(tensor, Mxfp4Weight) else tensor


def iter_stored_tensors(
    path: str | Path, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu"
) -> Iterator[tuple[str, Tensor | Mxfp4Weight]]:
    """Like `iter_checkpoint_tensors`, but MXFP4 experts come as they are stored: an `Mxfp4Weight`
    (blocks and scales, read straight to `device`) under our name of the dense weight.

    A random-on-load checkpoint (`gptoss_tune.model.random_weights`) draws its tensors on `device`."""
    path = Path(path)
    spec = _random_weights_spec(path)
    if spec is not None:
        yield from drawn_tensors(read_config(path), spec, dtype, device)
        return
    files = _tensor_files(path)
    with ExitStack() as stack:
        handles: dict[Path, Any] = {}

        def read(name: str) -> Tensor:
            file = files[name]
            with _reading(file):
                if file not in handles:
                    handles[file] = stack.enter_context(safe_open(file, framework="pt", device=str(device)))
                return handles[file].get_tensor(name)

        for name in files:
            if name.endswith("_scales"):
                if name.removesuffix("_scales") + "_blocks" not in files:
                    raise GptossTuneError(f"{path}: {name} has no matching _blocks tensor.")
                continue
            if name.endswith("_blocks"):
                base = name.removesuffix("_blocks")
                if base + "_scales" not in files:
                    raise GptossTuneError(f"{path}: {name} has no matching _scales tensor.")
                try:
                    weight = Mxfp4Weight(read(name), read(base + "_scales"))
                except ValueError as exc:
                    raise GptossTuneError(f"{path}: {base}: {exc}") from None
                yield base, weight
                continue
            tensor = read(name)
            yield name, tensor.to(dtype) if tensor.is_floating_point() else tensor


def _replace_parameter(model: nn.Module, name: str, tensor: Tensor) -> None:
    module_name, _, attribute = name.rpartition(".")
    module = model.get_submodule(module_name)
    old = getattr(module, attribute)
    setattr(module, attribute, nn.Parameter(tensor, requires_grad=old.requires_grad))


def _store_mxfp4(model: nn.Module, name: str, weight: Mxfp4Weight) -> None:
    module_name, _, attribute = name.rpartition(".")
    experts = model.get_submodule(module_name)
    if not isinstance(experts, Experts):
        raise GptossTuneError(f"'{name}' is stored as MXFP4, but only expert weights can be.")
    experts.store_mxfp4(attribute, weight)


def load_weights(
    model: GptOss,
    path: str | Path,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    keep_mxfp4: bool = False,
) -> None:
    """Fill `model` (usually built on the meta device) from the checkpoint at `path`, tensor by tensor.

    With `keep_mxfp4`, MXFP4 experts stay quantized (`Experts.store_mxfp4`, straight to `device`);
    otherwise they are dequantized to `dtype`.
    """
    expected = {name: tuple(param.shape) for name, param in model.named_parameters()}
    for name, tensor in checked_tensors(path, iter_stored_tensors(path, dtype, device), expected):
        if isinstance(tensor, Mxfp4Weight) and keep_mxfp4:
            _store_mxfp4(model, name, tensor)
        elif isinstance(tensor, Mxfp4Weight):
            _replace_parameter(model, name, tensor.dequantize(dtype))
        else:
            _replace_parameter(model, name, tensor.to(device))


def checked_tensors(
    path: str | Path, tensors: Iterable[tuple[str, Any]], expected: Mapping[str, tuple[int, ...]]
) -> Iterator[tuple[str, Any]]:
    """`tensors`, each checked against the `expected` names and shapes (our layout); raises on an
    unexpected name or shape, and at the end if an expected tensor never came."""
    missing = set(expected)
    for name, tensor in tensors:
        if name not in expected:
            raise GptossTuneError(f"{path}: unexpected tensor '{name}' for a gpt-oss model.")
        if tuple(tensor.shape) != expected[name]:
            raise GptossTuneError(
                f"{path}: tensor '{name}' has shape {tuple(tensor.shape)}, the config implies {expected[name]}."
            )
        missing.discard(name)
        yield name, tensor
    if missing:
        raise GptossTuneError(
            f"{path}: the checkpoint lacks {len(missing)} tensors, e.g. {sorted(missing)[:3]}."
        )


def load_checkpoint(
    model_id_or_path: str | Path,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    expert_storage: str = "bf16",
) -> GptOss:
    """Our model with the weights of a local directory or hub id (plain or MXFP4 experts).

    `expert_storage` (see `gptoss_tune.model.mxfp4`): "bf16" keeps the experts dense in `dtype`
    (MXFP4 ones are dequantized at load); "mxfp4" keeps an MXFP4 checkpoint's experts quantized on
    `device`; "auto" is mxfp4 for an MXFP4 checkpoint loaded to a GPU, else bf16.
    """
    path = resolve_model_path(model_id_or_path)
    config = read_config(path)
    try:
        storage = resolve_expert_storage(expert_storage, checkpoint_has_mxfp4_experts(path), device)
    except ValueError as exc:
        raise GptossTuneError(f"{path}: {exc}") from None
    with torch.device("meta"):
        model = GptOss(config)
    load_weights(model, path, dtype, device, keep_mxfp4=storage == "mxfp4")
    return model


# ---------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------


class ShardWriter:
    """Collects tensors into safetensors shards of at most `max_shard_bytes` (a bigger tensor gets
    its own shard) and names them like transformers does once the count is known."""

    def __init__(self, directory: Path, max_shard_bytes: int) -> None:
        self.directory = directory
        self.max_shard_bytes = max_shard_bytes
        self.pending: dict[str, Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_shard_bytes:
            self._flush()
        self.pending[name] = tensor.detach().contiguous().cpu()
        self.pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        file = self.directory / f".shard-{len(self.shards):05d}.safetensors"
        save_safetensors(self.pending, file, metadata={"format": "pt"})
        self.shards.append((file, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> None:
        if self.pending or not self.shards:
            self._flush()
        if len(self.shards) == 1:
            self.shards[0][0].rename(self.directory / SINGLE_FILE)
            return
        weight_map = {}
        count = len(self.shards)
        for number, (file, names) in enumerate(self.shards, start=1):
            final = f"model-{number:05d}-of-{count:05d}.safetensors"
            file.rename(self.directory / final)
            weight_map.update(dict.fromkeys(names, final))
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def checkpoint_config(config: GptOssConfig, dtype: torch.dtype, mxfp4: bool) -> dict[str, Any]:
    """config.json contents for a checkpoint of `config` stored in `dtype` (experts in MXFP4 if asked).

    In the published checkpoints' layout, which every reader knows: `rope_scaling` + `rope_theta`
    (transformers 5 reads them into its `rope_parameters`; 4.55 and 4.56 ignore `rope_parameters` and
    would fall back to YaRN settings without `original_max_position_embeddings`, silently), the dtype
    under both its names, and none of the generic fields left at their defaults."""
    from transformers import PretrainedConfig

    fields = config.to_dict()
    generic = PretrainedConfig().to_dict()
    defaults = [
        key for key, value in fields.items() if (key in generic and generic[key] == value) or value is None
    ]
    for key in set(defaults) - {"transformers_version"}:
        del fields[key]
    fields.pop("quantization_config", None)
    fields.pop("_name_or_path", None)
    fields.pop("rope_parameters", None)
    rope = dict(rope_settings(config))
    fields["rope_theta"] = rope.pop("rope_theta")
    fields["rope_scaling"] = rope
    fields["architectures"] = ["GptOssForCausalLM"]
    fields["dtype"] = fields["torch_dtype"] = str(dtype).removeprefix("torch.")
    if mxfp4:
        fields["quantization_config"] = {
            "modules_to_not_convert": list(MXFP4_MODULES_NOT_CONVERTED),
            "quant_method": "mxfp4",
        }
    return fields


def write_weights(
    directory: Path,
    tensors: Iterable[tuple[str, Tensor]],
    dtype: torch.dtype,
    mxfp4: bool,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> None:
    """Write (name, tensor) pairs in our layout as safetensors shards in `directory`.

    MXFP4 pairs (`X_blocks`, `X_scales`, e.g. from the state dict of a model with MXFP4 expert
    storage) are written as they are with `mxfp4`, and dequantized to `dtype` without.
    """
    writer = ShardWriter(directory, max_shard_bytes)
    if not mxfp4:
        tensors = densify_tensors(tensors, dtype)
    for name, tensor in tensors:
        if mxfp4 and is_expert_weight(name):
            blocks, scales = expert_weight_to_mxfp4(tensor)
            writer.add(f"{name}_blocks", blocks)
            writer.add(f"{name}_scales", scales)
        else:
            writer.add(name, tensor.to(dtype) if tensor.is_floating_point() else tensor)
    writer.finish()


def copy_tokenizer_files(source: str | Path, directory: Path) -> list[str]:
    """Copy the tokenizer and chat template files that `source` has; returns their names."""
    copied = [name for name in TOKENIZER_FILES if (Path(source) / name).is_file()]
    for name in copied:
        shutil.copyfile(Path(source) / name, directory / name)
    return copied


def save_checkpoint(
    tensors: Iterable[tuple[str, Tensor]],
    config: GptOssConfig,
    out_dir: str | Path,
    dtype: torch.dtype = torch.bfloat16,
    mxfp4: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    generation_config: Mapping[str, Any] | None = None,
    copy_tokenizer_from: str | Path | None = None,
    overwrite: bool = False,
    finish: Callable[[Path], None] | None = None,
) -> Path:
    """Write a complete Hugging Face checkpoint directory, atomically.

    `tensors` yields (name, tensor) in our layout, e.g. `model.state_dict().items()` or
    `iter_checkpoint_tensors(...)`; it is consumed once, so a generator streams a model that
    never sits in memory whole. With `mxfp4`, the expert weights are quantized and stored as
    `_blocks` / `_scales`; everything else is stored in `dtype`. `finish(folder)` adds the caller's
    own files before the folder is renamed into place.
    """
    out_dir = Path(out_dir)
    with atomic_directory(out_dir, overwrite=overwrite) as directory:
        write_weights(directory, tensors, dtype, mxfp4, max_shard_bytes)
        write_json(directory / "config.json", checkpoint_config(config, dtype, mxfp4))
        write_json(directory / "generation_config.json", dict(generation_config or GENERATION_CONFIG))
        if copy_tokenizer_from is not None:
            copy_tokenizer_files(copy_tokenizer_from, directory)
        if finish is not None:
            finish(directory)
    return out_dir
