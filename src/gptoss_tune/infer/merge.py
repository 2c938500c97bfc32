"""Merge a LoRA adapter into its base model and write a complete Hugging Face checkpoint.

The base is streamed tensor by tensor (`iter_checkpoint_tensors`), the adapter folded in (attention
by `merge_lora_into_state_dict`, experts one expert at a time here) and the result written in shards
(`save_checkpoint`), so host memory holds about one output shard plus one layer's expert weights twice.

`--dtype mxfp4` re-quantizes the merged experts to the `*_blocks` / `*_scales` layout of the published
checkpoints (rounding to nearest, each block's scale picked for the smallest error: `model.mxfp4.quantize_min_error`), so
the merged model has the base's size and loads wherever the base loads. An expert update smaller than
half a step of MXFP4's grid rounds back to the base value: how much of the adapter's expert update
survived is measured and recorded (`gptoss_tune_merge.json`, `expert_delta_kept`), and a warning is
given when most of it was lost.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from gptoss_tune.devices import pick_device
from gptoss_tune.errors import GptossTuneError
from gptoss_tune.files import atomic_file
from gptoss_tune.infer.provenance import MERGE_RECORD, training_render_settings
from gptoss_tune.model.checkpoint import (
    DEFAULT_MAX_SHARD_BYTES,
    GENERATION_CONFIG,
    iter_checkpoint_tensors,
    read_config,
    resolve_model_path,
    save_checkpoint,
)
from gptoss_tune.model.gpt_oss import is_expert_weight
from gptoss_tune.model.lora import (
    EXPERT_TARGETS,
    Site,
    base_tensor_name,
    check_adapter_fits,
    expert_lora_from_peft,
    merge_lora_into_state_dict,
    peft_keys,
    read_adapter,
)
from gptoss_tune.model.mxfp4 import quantize_min_error

MERGE_DTYPES = ("bf16", "fp32", "mxfp4")
# Below this share of the adapter's expert update surviving MXFP4 rounding, the merge warns.
DELTA_KEPT_WARNING = 0.5


@dataclass
class ExpertDeltaStats:
    """How much of the adapter's expert update survives MXFP4 rounding, over all expert tensors.

    kept = <Q(W + D) - W, D> / <D, D>: 1 when the update is stored exactly, 0 when every merged
    weight rounded back to the base's value. `relative_error` = |Q(W + D) - (W + D)| / |D|.
    """

    dot: float = 0.0
    delta_squared: float = 0.0
    error_squared: float = 0.0

    def add(self, base: Tensor, merged: Tensor, stored: Tensor) -> None:
        delta = merged - base
        self.dot += float(((stored - base) * delta).sum(dtype=torch.float64))
        self.delta_squared += float((delta * delta).sum(dtype=torch.float64))
        self.error_squared += float(((stored - merged) ** 2).sum(dtype=torch.float64))

    @property
    def kept(self) -> float | None:
        return self.dot / self.delta_squared if self.delta_squared else None

    @property
    def relative_error(self) -> float | None:
        return (self.error_squared / self.delta_squared) ** 0.5 if self.delta_squared else None


@dataclass
class MergeResult:
    output: Path
    dtype: str
    tensors: int
    merged_tensors: int
    seconds: float
    bytes_written: int
    expert_delta_kept: float | None = None  # mxfp4 only
    expert_delta_relative_error: float | None = None  # mxfp4 only
    warnings: list[str] = field(default_factory=list)


def _storage(dtype: str) -> tuple[torch.dtype, bool]:
    """(dtype of the non-quantized tensors, whether the experts are MXFP4)."""
    if dtype not in MERGE_DTYPES:
        raise GptossTuneError(f"Unknown --dtype '{dtype}': use one of {', '.join(MERGE_DTYPES)}.")
    return {"bf16": (torch.bfloat16, False), "fp32": (torch.float32, False), "mxfp4": (torch.bfloat16, True)}[
        dtype
    ]


def expert_lora_pairs(
    sites: list[Site], adapter: dict[str, Tensor], num_experts: int
) -> dict[str, tuple[Tensor, Tensor]]:
    """Expert weight name -> the adapter's (A [E, in, r], B [E, r, out]) for it, in fp32."""
    pairs = {}
    for site in sites:
        if site[1] in EXPERT_TARGETS:
            key_a, key_b = peft_keys(site, sites)
            pairs[base_tensor_name(site)] = expert_lora_from_peft(
                adapter[key_a].float(), adapter[key_b].float(), num_experts
            )
    return pairs


class ExpertMerger:
    """Folds expert LoRA into the expert weights one expert at a time (the whole [E, in, out] update
    in fp32 would take three times the memory of the layer), on `device`, and with MXFP4 output
    quantizes them, measuring how much of the update survived."""

    def __init__(
        self, pairs: dict[str, tuple[Tensor, Tensor]], scaling: float, mxfp4: bool, device: torch.device
    ) -> None:
        self.pairs = {name: (a.to(device), b.to(device)) for name, (a, b) in pairs.items()}
        self.scaling, self.mxfp4, self.device = scaling, mxfp4, device
        self.stats = ExpertDeltaStats()
        self.merged: set[str] = set()

    def _experts(self, name: str, weight: Tensor) -> Iterator[tuple[Tensor, Tensor]]:
        """Each expert's (base, merged) weight [in, out], in fp32 on the merge device."""
        lora_a, lora_b = self.pairs.get(name, (None, None))
        for expert in range(weight.shape[0]):
            base = weight[expert].to(self.device).float()
            merged = base if lora_a is None else base + self.scaling * (lora_a[expert] @ lora_b[expert])
            yield base, merged

    def _dense(self, name: str, weight: Tensor) -> Tensor:
        out = torch.empty_like(weight)
        for expert, (_, merged) in enumerate(self._experts(name, weight)):
            out[expert] = merged.to(weight.dtype).cpu()
        return out

    def _quantized(self, name: str, weight: Tensor) -> tuple[Tensor, Tensor]:
        """Stored [E, out, in / 32, 16] blocks and [E, out, in / 32] scales; the writer keeps them as given."""
        blocks, scales = [], []
        for base, merged in self._experts(name, weight):
            quantized = quantize_min_error(merged.T)  # stored orientation [out, in]
            if name in self.pairs:
                self.stats.add(base, merged, quantized.values.T)
            blocks.append(quantized.blocks.cpu())
            scales.append(quantized.scales.cpu())
        return torch.stack(blocks), torch.stack(scales)

    def __call__(self, tensors: Iterable[tuple[str, Tensor]]) -> Iterator[tuple[str, Tensor]]:
        for name, tensor in tensors:
            if not is_expert_weight(name):
                yield name, tensor
                continue
            if name in self.pairs:
                self.merged.add(name)
            if self.mxfp4:
                blocks, scales = self._quantized(name, tensor)
                yield f"{name}_blocks", blocks
                yield f"{name}_scales", scales
            else:
                yield name, self._dense(name, tensor) if name in self.pairs else tensor
        if missing := set(self.pairs) - self.merged:
            raise GptossTuneError(
                f"The base model has no tensors {sorted(missing)[:3]} that the adapter modifies."
            )


def _counted(tensors: Iterable[tuple[str, Tensor]], on_tensor: Callable[[], None], seen: list[str]):
    for name, tensor in tensors:
        seen.append(name)
        yield name, tensor
        on_tensor()


def base_generation_config(base: Path) -> dict:
    file = base / "generation_config.json"
    return json.loads(file.read_text()) if file.is_file() else dict(GENERATION_CONFIG)


def count_base_tensors(base: Path) -> int:
    """Number of parameters of the base model (what the progress bar counts)."""
    from gptoss_tune.model.gpt_oss import GptOss

    with torch.device("meta"):
        return sum(1 for _ in GptOss(read_config(base)).parameters())


def merge(
    base: str | Path,
    adapter: str | Path,
    output: str | Path,
    dtype: str = "bf16",
    overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    on_tensor: Callable[[], None] = lambda: None,
    device: str = "auto",
) -> MergeResult:
    """Write base + adapter as a checkpoint folder: config.json, safetensors shards (+ index),
    generation_config.json, tokenizer files and chat template (the base's, or built offline).

    `device` runs the expert arithmetic (LoRA products, MXFP4 rounding) there: a GPU makes an MXFP4
    merge of gpt-oss-20b minutes instead of an hour on a few CPU cores."""
    started = time.perf_counter()
    torch_device = pick_device(device)
    storage_dtype, mxfp4 = _storage(dtype)
    base_path = resolve_model_path(base)
    config = read_config(base_path)
    options, sites, adapter_state = read_adapter(adapter)
    check_adapter_fits(config, options, sites, adapter_state, adapter)

    # Attention LoRA through merge_lora_into_state_dict; experts here, one expert at a time.
    attention_sites = [site for site in sites if site[1] not in EXPERT_TARGETS]
    experts = ExpertMerger(
        expert_lora_pairs(sites, adapter_state, config.num_local_experts),
        options.scaling,
        mxfp4,
        torch_device,
    )
    seen: list[str] = []
    tensors = iter_checkpoint_tensors(base_path, storage_dtype)
    merged = experts(
        _counted(
            merge_lora_into_state_dict(tensors, options, attention_sites, adapter_state), on_tensor, seen
        )
    )

    render = training_render_settings(adapter)  # read before the work: a bad record fails early
    results: list[MergeResult] = []

    def write_record(folder: Path) -> None:  # inside the checkpoint's atomic write
        result = MergeResult(
            output=Path(output),
            dtype=dtype,
            tensors=len(seen),
            merged_tensors=len(sites),
            seconds=round(time.perf_counter() - started, 2),
            bytes_written=sum(f.stat().st_size for f in folder.glob("*.safetensors")),
            expert_delta_kept=experts.stats.kept,
            expert_delta_relative_error=experts.stats.relative_error,
        )
        if mxfp4 and experts.stats.kept is not None and experts.stats.kept < DELTA_KEPT_WARNING:
            result.warnings.append(
                f"Only {experts.stats.kept:.0%} of the adapter's expert update survived MXFP4 rounding: most of "
                "it is smaller than the grid step. Merge with --dtype bf16 to keep it all, or serve base + adapter."
            )
        _write_record(folder, base, adapter, render, result)
        results.append(result)

    with tempfile.TemporaryDirectory() as scratch:
        save_checkpoint(
            merged,
            config,
            output,
            dtype=storage_dtype,
            mxfp4=mxfp4,
            max_shard_bytes=max_shard_bytes,
            generation_config=base_generation_config(base_path),
            copy_tokenizer_from=_tokenizer_source(base_path, Path(scratch)),
            overwrite=overwrite,
            finish=write_record,
        )
    return results[0]


def _tokenizer_source(base: Path, scratch: Path) -> Path:
    """The base folder when it has a tokenizer; otherwise gpt-oss's tokenizer files built offline."""
    if (base / "tokenizer.json").is_file():
        return base
    from gptoss_tune.model.init import write_tokenizer_files

    write_tokenizer_files(scratch)
    return scratch


def _write_record(
    out: Path, base: str | Path, adapter: str | Path, render: dict | None, result: MergeResult
) -> None:
    """gptoss_tune_merge.json: what was merged, how, and (for chat) the training's render options."""
    record = {
        "base": str(base),
        "adapter": str(Path(adapter).resolve()),
        "render": render,
        **{k: v for k, v in asdict(result).items() if k not in ("output", "warnings")},
    }
    with atomic_file(out / MERGE_RECORD) as handle:
        handle.write(json.dumps(record, indent=2, default=str) + "\n")
