"""Training options: one flat dataclass, loadable from a YAML recipe and overridden on the command line.

YAML keys are the option names with underscores (`tokens_per_batch: 16384`); the CLI spells them
with dashes (`--tokens-per-batch 16384`). The resolved options are saved beside the outputs.
"""

from __future__ import annotations

import dataclasses
import datetime
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from gptoss_tune.errors import GptossTuneError
from gptoss_tune.harmony.render import DEFAULT_DATE
from gptoss_tune.kernels import ATTENTION_BACKENDS, EXPERT_GEMMS, RECOMPUTE_POLICIES
from gptoss_tune.model.mxfp4 import EXPERT_STORAGES

SCHEDULES = ("cosine", "linear", "constant")
SHARDINGS = ("ddp", "fsdp")
KERNELS = ("auto", "fast", "eager")
ATTENTIONS = ATTENTION_BACKENDS  # the --attention values


@dataclass
class TrainConfig:
    model: str = ""
    data: str = ""
    output: str = ""
    # evaluation
    eval_data: str | None = None
    eval_fraction: float = 0.0
    eval_every: int = 0
    # how DATA is prepared when it is not already a prepared folder
    template: str = "hf"
    loss_on: str = "turns"
    date: str = DEFAULT_DATE
    reasoning_effort: str = "medium"
    format: str = "auto"
    max_length: int | None = None
    split: str | None = None
    subset: str | None = None
    # LoRA
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    rslora: bool = False
    lora_targets: str = "attn,experts"
    lora_layers: str | None = None
    # batches and schedule
    tokens_per_batch: int = 4096
    grad_accum: int = 1
    epochs: int = 1
    max_steps: int | None = None
    lr: float = 2e-4
    schedule: str = "cosine"
    warmup_ratio: float = 0.03
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    # hardware
    device: str = "auto"
    dtype: str = "auto"
    gradient_checkpointing: bool = False
    # GPU: recompute only what this budget needs (norm outputs, then layers); "auto": free memory less headroom
    memory_budget_gib: float | str | None = None
    recompute: str = "layers"  # under a budget: layers (whole layers), auto (also the experts' gate_up alone)
    kernels: str = "auto"  # auto (fast paths on GPU), fast, eager
    attention: str = "auto"  # the fast paths' attention: auto (FlashAttention-4 if installed), flash, flex
    expert_gemm: str = "auto"  # the fast paths' expert GEMMs: auto, quack, quack-fused, torch
    gpus: int = 1
    sharding: str = "ddp"
    expert_storage: str = "auto"  # auto, mxfp4, bf16: see gptoss_tune.model.mxfp4
    # outputs
    save_every: int = 0
    keep_last: int = 2
    resume: bool = False
    log_every: int = 1

    def validate(self) -> TrainConfig:
        for name in ("model", "data", "output"):
            if not getattr(self, name):
                raise GptossTuneError(
                    f"--{name} is required (on the command line or in the --config recipe)."
                )
        if self.expert_storage not in EXPERT_STORAGES:
            raise GptossTuneError(
                f"Unknown --expert-storage '{self.expert_storage}': use {', '.join(EXPERT_STORAGES)}."
            )
        if self.kernels not in KERNELS:
            raise GptossTuneError(f"Unknown --kernels '{self.kernels}': use auto, fast or eager.")
        if self.attention not in ATTENTIONS:
            raise GptossTuneError(f"Unknown --attention '{self.attention}': use {', '.join(ATTENTIONS)}.")
        if self.expert_gemm not in EXPERT_GEMMS:
            raise GptossTuneError(
                f"Unknown --expert-gemm '{self.expert_gemm}': use {', '.join(EXPERT_GEMMS)}."
            )
        if self.sharding not in SHARDINGS:
            raise GptossTuneError(f"Unknown --sharding '{self.sharding}': use ddp or fsdp.")
        self.memory_budget_gib = parse_memory_budget(self.memory_budget_gib)
        if self.recompute not in RECOMPUTE_POLICIES:
            raise GptossTuneError(
                f"Unknown --recompute '{self.recompute}': use {', '.join(RECOMPUTE_POLICIES)}."
            )
        if self.schedule not in SCHEDULES:
            raise GptossTuneError(f"Unknown --schedule '{self.schedule}': use one of {', '.join(SCHEDULES)}.")
        positive = ("lora_rank", "tokens_per_batch", "grad_accum", "epochs", "keep_last", "log_every", "gpus")
        for name in positive:
            if getattr(self, name) < 1:
                raise GptossTuneError(f"--{name.replace('_', '-')} must be at least 1.")
        if self.max_steps is not None and self.max_steps < 1:
            raise GptossTuneError("--max-steps must be at least 1.")
        if not 0 <= self.eval_fraction < 1:
            raise GptossTuneError("--eval-fraction must be in [0, 1).")
        if self.eval_fraction and self.eval_data:
            raise GptossTuneError(
                "--eval-fraction and --eval-data both choose the held-out data: give one of them, e.g. "
                "--eval-fraction 0 over a recipe's fraction (with both, the fraction would be neither "
                "trained on nor evaluated)."
            )
        if not 0 <= self.warmup_ratio < 1:
            raise GptossTuneError("--warmup-ratio must be in [0, 1).")
        self._validate_numbers()
        self._validate_choices_checked_later()
        return self

    def _validate_numbers(self) -> None:
        if not self.lr >= 0:
            raise GptossTuneError(f"--lr must not be negative, got {self.lr}.")
        if not self.lora_alpha > 0:
            raise GptossTuneError(f"--lora-alpha must be positive, got {self.lora_alpha}.")
        if not 0 <= self.lora_dropout < 1:
            raise GptossTuneError(f"--lora-dropout must be in [0, 1), got {self.lora_dropout}.")
        if not 0 <= self.min_lr_ratio <= 1:
            raise GptossTuneError(f"--min-lr-ratio must be in [0, 1], got {self.min_lr_ratio}.")
        for name in ("max_grad_norm", "weight_decay", "save_every", "eval_every"):
            if getattr(self, name) < 0:
                raise GptossTuneError(f"--{name.replace('_', '-')} must not be negative.")

    def _validate_choices_checked_later(self) -> None:
        """What the run would only find after it made its output folder: checked before it."""
        from gptoss_tune.data.prepare import PrepareOptions
        from gptoss_tune.devices import DTYPES, pick_device
        from gptoss_tune.model.lora import LoraOptions

        PrepareOptions(
            template=self.template,
            date=self.date,
            reasoning_effort=self.reasoning_effort,
            loss_on=self.loss_on,
            format=self.format,
            max_length=self.max_length,
        )
        LoraOptions.from_strings(targets=self.lora_targets, layers=self.lora_layers).target_names()
        pick_device(self.device)
        if self.dtype not in DTYPES:
            raise GptossTuneError(f"Unknown --dtype '{self.dtype}': use auto, bf16 or fp32.")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: Path) -> None:
        path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True))


def option_names() -> list[str]:
    return [f.name for f in dataclasses.fields(TrainConfig)]


def load_recipe(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise GptossTuneError(f"{path}: cannot read the recipe ({exc}).") from None
    if not isinstance(values, dict) or not all(isinstance(key, str) for key in values):
        raise GptossTuneError(f"{path}: a recipe is a mapping of option: value (option names are words).")
    values = {key.replace("-", "_"): value for key, value in values.items()}
    unknown = sorted(set(values) - set(option_names()))
    if unknown:
        raise GptossTuneError(
            f"{path}: unknown option(s) {', '.join(unknown)}. Known: {', '.join(option_names())}."
        )
    declared = {f.name: f.type for f in dataclasses.fields(TrainConfig)}
    return {name: _recipe_value(path, name, value, declared[name]) for name, value in values.items()}


def _recipe_value(path: Path, name: str, value: Any, declared: str) -> Any:
    """A recipe value as the option's type, the way the command line would have read it. YAML reads
    `3e-3` as text and a date as a date; a quoted number for a count is a mistake worth naming."""
    kinds = [kind.strip() for kind in declared.split("|")]
    if value is None and "None" in kinds:
        return None
    if "float" in kinds and "str" in kinds:  # memory_budget_gib: validate() reads it
        return value
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if "bool" in kinds and isinstance(value, bool):
        return value
    if "int" in kinds and number and float(value).is_integer():
        return int(value)
    if "float" in kinds and number:
        return float(value)
    if "float" in kinds and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    if "str" in kinds and isinstance(value, str):
        return value
    if "str" in kinds and (number or isinstance(value, datetime.date)):
        return value.isoformat() if isinstance(value, datetime.date) else str(value)
    wanted = {"int": "a whole number", "float": "a number", "bool": "true or false", "str": "text"}
    expected = " or ".join(wanted.get(kind, "null") for kind in kinds)
    raise GptossTuneError(f"{path}: '{name}' takes {expected}, got {value!r}.")


def parse_memory_budget(value: float | str | None) -> float | str | None:
    """None, "auto", or a positive number of GiB (numbers may come as text from the command line)."""
    if value is None or value == "auto":
        return value
    try:
        budget = float(value)
    except (TypeError, ValueError):
        raise GptossTuneError(
            f"--memory-budget-gib takes a number of GiB or 'auto', got '{value}'."
        ) from None
    if budget <= 0:
        raise GptossTuneError("--memory-budget-gib must be positive (leave it out for no budget).")
    return budget


def resolve_config(recipe: str | Path | None, overrides: dict[str, Any]) -> TrainConfig:
    """Defaults, then the recipe, then the options given on the command line."""
    values: dict[str, Any] = load_recipe(recipe) if recipe else {}
    values.update(overrides)
    return TrainConfig(**values).validate()
