"""The training loop: LoRA on a frozen gpt-oss, packed micro-batches, exact loss normalization,
checkpoints that resume exactly, data parallel through torchrun.

The loss of an optimizer step is the mean over every trained token of the step: each micro-batch's
summed loss is divided by the step's total trained tokens (across gradient accumulation and ranks),
which every rank knows from the packing plan without communicating.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from gptoss_tune.config import TrainConfig
from gptoss_tune.data.pack import MicroBatch
from gptoss_tune.errors import GptossTuneError
from gptoss_tune.model.checkpoint import load_checkpoint
from gptoss_tune.model.lora import (
    LoraOptions,
    apply_lora,
    load_adapter,
    save_adapter,
    trainable_parameter_report,
)
from gptoss_tune.train import dist
from gptoss_tune.train.checkpoints import (
    latest_checkpoint,
    load_training_checkpoint,
    save_training_checkpoint,
)
from gptoss_tune.train.data import (
    ensure_prepared,
    eval_batches,
    load_examples,
    make_schedule,
    split_eval,
)
from gptoss_tune.train.metrics import MetricsLog, plot_loss

CONFIG_FILE = "config.yaml"
# Options a resumed run must share with the run it continues.
RESUME_KEYS = (
    "model",
    "data",
    "template",
    "loss_on",
    "date",
    "reasoning_effort",
    "format",
    "max_length",
    "lora_rank",
    "lora_alpha",
    "lora_dropout",
    "rslora",
    "lora_targets",
    "lora_layers",
    "tokens_per_batch",
    "grad_accum",
    "epochs",
    "max_steps",
    "lr",
    "schedule",
    "warmup_ratio",
    "min_lr_ratio",
    "weight_decay",
    "max_grad_norm",
    "seed",
    "eval_fraction",
)


@dataclass
class TrainResult:
    output: Path
    steps: int
    first_loss: float | None
    final_loss: float | None
    eval_loss: float | None
    tokens: int
    trained_tokens: int
    seconds: float
    files: dict[str, Path] = field(default_factory=dict)


class LossModule(nn.Module):
    """forward() = the model's summed loss, so DistributedDataParallel's hooks see the computation."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, labels, position_ids):
        return self.model.loss(input_ids, labels, position_ids)


def pick_device(config: TrainConfig, info: dist.DistInfo) -> torch.device:
    if config.device == "auto":
        return torch.device(f"cuda:{info.local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(config.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device(f"cuda:{info.local_rank}")
    return device


def pick_dtype(config: TrainConfig, device: torch.device) -> torch.dtype:
    choices = {
        "auto": torch.bfloat16 if device.type == "cuda" else torch.float32,
        "bf16": torch.bfloat16,
        "fp32": torch.float32,
        "float32": torch.float32,
        "bfloat16": torch.bfloat16,
    }
    if config.dtype not in choices:
        raise GptossTuneError(f"Unknown --dtype '{config.dtype}': use auto, bf16 or fp32.")
    return choices[config.dtype]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def lora_options(config: TrainConfig) -> LoraOptions:
    return LoraOptions.from_strings(
        rank=config.lora_rank,
        alpha=config.lora_alpha,
        dropout=config.lora_dropout,
        rslora=config.rslora,
        targets=config.lora_targets,
        layers=config.lora_layers,
    )


def lr_lambda(config: TrainConfig, total_steps: int) -> Callable[[int], float]:
    warmup = math.ceil(config.warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if config.schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if config.schedule == "cosine" else 1 - progress
        return config.min_lr_ratio + (1 - config.min_lr_ratio) * shape

    return factor


def check_resume_compatible(config: TrainConfig, output: Path) -> None:
    import yaml

    saved = yaml.safe_load((output / CONFIG_FILE).read_text()) if (output / CONFIG_FILE).is_file() else {}
    differ = [key for key in RESUME_KEYS if key in saved and saved[key] != getattr(config, key)]
    if differ:
        changes = ", ".join(f"{k}: {saved[k]!r} -> {getattr(config, k)!r}" for k in differ)
        raise GptossTuneError(f"--resume needs the options of the run it continues; these differ: {changes}.")


def prepare_output(config: TrainConfig, info: dist.DistInfo) -> Path:
    output = Path(config.output)
    if info.is_main:
        if config.resume:
            check_resume_compatible(config, output)
        elif output.exists() and any(output.iterdir()):
            raise GptossTuneError(
                f"{output} already holds a run: pass --resume to continue it, or choose another --output."
            )
        output.mkdir(parents=True, exist_ok=True)
        config.save(output / CONFIG_FILE)
    dist.barrier(info)
    return output


def evaluate(module: nn.Module, batches: list[MicroBatch], device: torch.device, autocast) -> float:
    module.eval()
    loss_sum, count = 0.0, 0
    with torch.no_grad(), autocast():
        for batch in batches:
            batch = batch.to(device)
            total, n = module(batch.input_ids, batch.labels, batch.position_ids)
            loss_sum += float(total)
            count += int(n)
    module.train()
    return loss_sum / max(count, 1)


def adapters_without_updates(initial: dict[str, torch.Tensor], params: dict[str, nn.Parameter]) -> list[str]:
    """Adapter tensors that never changed. LoRA B starts at zero, so an adapter whose B is unchanged
    received no gradient (A legitimately stays put on the first step)."""
    return [
        name
        for name, p in params.items()
        if "lora_B" in name and torch.equal(initial[name], p.detach().to(initial[name].device))
    ]


def train(config: TrainConfig, log: Callable[[str], None] = print, progress=None) -> TrainResult:
    """Run a training job described by `config`. `progress(step, total, record)` reports each step."""
    started = time.perf_counter()
    device_type = "cuda" if config.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu"
    if config.device not in ("auto", "cuda") and not config.device.startswith("cuda"):
        device_type = "cpu"
    info = dist.init_distributed(device_type)
    try:
        return _train(config, info, log, progress, started)
    finally:
        dist.shutdown(info)


def _train(config: TrainConfig, info: dist.DistInfo, log, progress, started: float) -> TrainResult:
    device = pick_device(config, info)
    dtype = pick_dtype(config, device)
    seed_everything(config.seed)
    output = prepare_output(config, info)

    # data
    prepared = ensure_prepared(config.data, output / "data", config) if info.is_main else None
    dist.barrier(info)
    prepared = prepared or ensure_prepared(config.data, output / "data", config)
    examples, sources = load_examples(prepared)
    train_examples, held_out = split_eval(examples, sources, config.eval_fraction, config.seed)
    if config.eval_data:
        held_out = load_examples(ensure_prepared(config.eval_data, output / "eval_data", config))[0]
    schedule = make_schedule(train_examples, config, info.world_size)
    eval_set = eval_batches(held_out, config.tokens_per_batch) if held_out else []

    # model + adapters
    model = load_checkpoint(config.model, dtype=dtype, device=device)
    model.requires_grad_(False)
    options = lora_options(config)
    params = apply_lora(model, options)
    for param in params.values():  # adapters and their optimizer state in fp32 (autocast computes in bf16)
        param.data = param.data.float()
    model.set_gradient_checkpointing(config.gradient_checkpointing)
    if info.is_main:
        report = trainable_parameter_report(model)
        log("trainable parameters: " + ", ".join(f"{group} {count:,}" for group, count in report.items()))
    initial = {name: p.detach().clone().cpu() for name, p in params.items()}
    module: nn.Module = LossModule(model)
    if info.enabled:
        module = nn.parallel.DistributedDataParallel(
            module, device_ids=[device.index] if device.type == "cuda" else None
        )

    optimizer = torch.optim.AdamW(
        list(params.values()), lr=config.lr, weight_decay=config.weight_decay, fused=device.type == "cuda"
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config, schedule.total_steps))

    def save_adapter_to(directory: Path) -> None:
        save_adapter(model, options, directory, base_model_name_or_path=config.model, overwrite=True)

    start_step = 0
    if config.resume and (checkpoint := latest_checkpoint(output)):
        state = load_training_checkpoint(checkpoint, lambda d: load_adapter(model, d), optimizer, scheduler)
        start_step = state["step"]
        if info.is_main:
            log(f"resumed from {checkpoint} (step {start_step})")

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)

    metrics = MetricsLog(output, resume_step=start_step) if info.is_main else None
    first_loss = last_loss = eval_loss = None
    tokens_seen = trained_seen = 0
    pad = 128 if device.type == "cuda" else 1
    step_started = time.perf_counter()
    for step in range(start_step, schedule.total_steps):
        denominator = schedule.step_trained_tokens(step)
        batches = schedule.rank_batches(step, info.rank, pad)
        loss_sum = torch.zeros((), device=device, dtype=torch.float32)
        local_tokens = 0
        for index, batch in enumerate(batches or [None]):
            is_last = index == max(len(batches), 1) - 1
            sync = module.no_sync() if info.enabled and not is_last else nullcontext()
            with sync, autocast():
                if batch is None:  # this rank has no micro-batch left in the last step: join with zero loss
                    total = sum(p.sum() for p in params.values()) * 0.0
                else:
                    batch = batch.to(device)
                    total, _ = module(batch.input_ids, batch.labels, batch.position_ids)
                    local_tokens += batch.num_tokens
                    if not total.requires_grad:  # nothing trained in this micro-batch
                        total = total + sum(p.sum() for p in params.values()) * 0.0
                (total * (info.world_size / denominator)).backward()
            loss_sum += total.detach().float()
        reduced = dist.all_reduce_sum(
            torch.stack([loss_sum, torch.tensor(float(local_tokens), device=device)]), info
        )
        step_loss = float(reduced[0]) / denominator
        if not math.isfinite(step_loss):
            previous = latest_checkpoint(output)
            raise GptossTuneError(
                f"The loss became {step_loss} at step {step + 1}; stopping. Last good checkpoint: "
                f"{previous or 'none'}. Lower --lr, check the data, or use --dtype fp32 to find the cause."
            )
        grad_norm = float(torch.nn.utils.clip_grad_norm_(list(params.values()), config.max_grad_norm))
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        done = step + 1
        tokens_seen += int(reduced[1])
        trained_seen += denominator
        first_loss = step_loss if first_loss is None else first_loss
        last_loss = step_loss
        now = time.perf_counter()
        record = {
            "kind": "train",
            "step": done,
            "epoch": schedule.epoch_of(step),
            "loss": step_loss,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens": int(reduced[1]),
            "trained_tokens": denominator,
            "tokens_per_s": int(reduced[1]) / max(now - step_started, 1e-9),
        }
        step_started = now
        if metrics and (done % config.log_every == 0 or done == schedule.total_steps):
            metrics.log(record)
        if progress and info.is_main:
            progress(done, schedule.total_steps, record)
        if eval_set and config.eval_every and done % config.eval_every == 0:
            eval_loss = evaluate(module, eval_set, device, autocast)
            if metrics:
                metrics.log({"kind": "eval", "step": done, "loss": eval_loss})
        if config.save_every and done % config.save_every == 0 and done < schedule.total_steps:
            _save(output, done, save_adapter_to, optimizer, scheduler, config, info)

    total_steps = schedule.total_steps
    if eval_set and (not config.eval_every or total_steps % config.eval_every):
        eval_loss = evaluate(module, eval_set, device, autocast)
        if metrics:
            metrics.log({"kind": "eval", "step": total_steps, "loss": eval_loss})
    files: dict[str, Path] = {}
    if start_step < total_steps:
        files["checkpoint"] = _save(output, total_steps, save_adapter_to, optimizer, scheduler, config, info)
    if info.is_main:
        files["adapter"] = output / "adapter"
        save_adapter_to(files["adapter"])
        metrics.close()
        if plot := plot_loss(output / "metrics.jsonl", output / "loss.png"):
            files["loss_plot"] = plot
        files["metrics"] = output / "metrics.jsonl"
        files["config"] = output / CONFIG_FILE
    if untouched := adapters_without_updates(initial, params):
        raise GptossTuneError(
            f"{len(untouched)} LoRA adapter(s) received no update, e.g. {', '.join(untouched[:4])}: their layers "
            "never saw a trained token's gradient. The adapter was saved, but check --lora-targets/--lora-layers "
            "and the data."
        )
    return TrainResult(
        output,
        total_steps,
        first_loss,
        last_loss,
        eval_loss,
        tokens_seen,
        trained_seen,
        time.perf_counter() - started,
        files,
    )


def _save(
    output, step, save_adapter_to, optimizer, scheduler, config: TrainConfig, info: dist.DistInfo
) -> Path:
    target = output / "checkpoints" / f"step-{step}"
    if info.is_main:
        save_training_checkpoint(
            output,
            step,
            save_adapter_to,
            optimizer,
            scheduler,
            {"config": config.to_dict()},
            config.keep_last,
        )
    dist.barrier(info)
    return target
