"""The training loop: LoRA on a frozen gpt-oss, packed micro-batches, exact loss normalization,
checkpoints that resume exactly, data parallel (DDP or FSDP2) through torchrun.

The loss of an optimizer step is the mean over every trained token of the step: each micro-batch's
summed loss is divided by the step's total trained tokens (across gradient accumulation and ranks),
which every rank knows from the packing plan without communicating.
"""

from __future__ import annotations

import math
import random
import shutil
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from gptoss_tune.config import TrainConfig
from gptoss_tune.data.pack import collate
from gptoss_tune.data.prepare import prepared_render_settings
from gptoss_tune.devices import pick_device, pick_dtype
from gptoss_tune.errors import GptossTuneError
from gptoss_tune.files import holds_files
from gptoss_tune.harmony import tokens as T
from gptoss_tune.kernels import RecomputePlan, enable_fast_paths, plan_activation_checkpointing
from gptoss_tune.kernels.memory import GIB, auto_budget_bytes
from gptoss_tune.model.checkpoint import load_checkpoint, model_reference
from gptoss_tune.model.gpt_oss import GptOss
from gptoss_tune.model.lora import (
    LoraOptions,
    adapters_to_fp32,
    apply_lora,
    load_adapter,
    lora_state_dict_peft,
    reset_lora_parameters,
    save_adapter,
    trainable_parameter_report,
)
from gptoss_tune.model.sharded import full_tensor
from gptoss_tune.train import dist
from gptoss_tune.train.checkpoints import (
    latest_checkpoint,
    load_training_checkpoint,
    save_training_checkpoint,
)
from gptoss_tune.train.data import (
    Schedule,
    ensure_prepared,
    eval_batches,
    load_examples,
    make_schedule,
    split_eval,
)
from gptoss_tune.train.metrics import MetricsLog, plot_loss
from gptoss_tune.train.sharding import build_fsdp, wrap_ddp

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
    "sharding",
    "expert_storage",
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


@dataclass
class Run:
    """Everything a training run holds, set up once."""

    config: TrainConfig
    info: dist.DistInfo
    device: torch.device
    dtype: torch.dtype
    output: Path
    schedule: Schedule
    eval_set: list
    model: GptOss
    module: nn.Module  # what forward() is called on: DDP / FSDP wrapper of the loss
    params: dict[str, nn.Parameter]
    options: LoraOptions
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    render: dict[str, str]  # template, date, reasoning_effort of the prepared training data

    @property
    def sharded(self) -> bool:
        return self.config.sharding == "fsdp" and self.info.enabled

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.dtype == torch.bfloat16)


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
        elif holds_files(output):
            raise GptossTuneError(
                f"{output} already holds a run: pass --resume to continue it, or choose another --output."
            )
        output.mkdir(parents=True, exist_ok=True)
        config.save(output / CONFIG_FILE)
    dist.barrier(info)
    return output


def load_data(config: TrainConfig, output: Path, info: dist.DistInfo) -> tuple[Schedule, list, dict]:
    """The step schedule, the held-out batches, and how the training data was rendered."""
    if info.is_main:  # one process prepares; the others read what it wrote
        ensure_prepared(config.data, output / "data", config)
        if config.eval_data:
            ensure_prepared(config.eval_data, output / "eval_data", config)
    dist.barrier(info)
    prepared = ensure_prepared(config.data, output / "data", config)
    examples, sources = load_examples(prepared)
    train_examples, held_out = split_eval(examples, sources, config.eval_fraction, config.seed)
    if config.eval_data:
        held_out = load_examples(ensure_prepared(config.eval_data, output / "eval_data", config))[0]
    schedule = make_schedule(train_examples, config, info.world_size)
    held_out_batches = eval_batches(held_out, config.tokens_per_batch) if held_out else []
    return schedule, held_out_batches, prepared_render_settings(prepared)


def build_model(
    config: TrainConfig, options: LoraOptions, dtype: torch.dtype, device: torch.device, info: dist.DistInfo
) -> tuple[GptOss, nn.Module, dict[str, nn.Parameter]]:
    sharded = config.sharding == "fsdp" and info.enabled
    if sharded:
        if config.expert_storage == "mxfp4":
            raise GptossTuneError(
                "--expert-storage mxfp4 does not work with --sharding fsdp yet: use ddp, or bf16."
            )
        module, model, params = build_fsdp(config.model, options, dtype, device, info)
    else:
        model = load_checkpoint(
            config.model, dtype=dtype, device=device, expert_storage=config.expert_storage
        )
        params = adapters_to_fp32(apply_lora(model, options))
    reset_lora_parameters(params, config.seed)  # same initial adapter however the model is placed
    use_kernels(model, config, device)
    model.set_gradient_checkpointing(config.gradient_checkpointing)
    if sharded:
        return model, module, params
    if config.memory_budget_gib is not None and device.type == "cuda":
        budget = (
            auto_budget_bytes(device)
            if config.memory_budget_gib == "auto"
            else int(config.memory_budget_gib * GIB)
        )
        # Measures a real layer's forward and backward (leaving no gradient): before DDP's hooks exist.
        plan_activation_checkpointing(model, config.tokens_per_batch, budget, policy=config.recompute)
    return model, wrap_ddp(model, device, info), params


def use_kernels(model: GptOss, config: TrainConfig, device: torch.device) -> None:
    """The GPU fast paths (attention, grouped experts, fused loss; see enable_fast_paths) unless --kernels eager."""
    if config.kernels == "fast" or (config.kernels == "auto" and device.type == "cuda"):
        enable_fast_paths(
            model,
            compile=device.type == "cuda",
            attention_backend=config.attention,
            expert_gemm=config.expert_gemm,
        )


def expert_storage_label(model: GptOss, dtype: torch.dtype) -> str:
    mxfp4 = any(layer.mlp.experts.is_mxfp4("gate_up_proj") for layer in model.model.layers)
    return "mxfp4" if mxfp4 else "dense " + str(dtype).removeprefix("torch.")


def setup(config: TrainConfig, info: dist.DistInfo, log: Callable[[str], None]) -> Run:
    device = pick_device(config.device, info.local_rank)
    dtype = pick_dtype(config.dtype, device)
    seed_everything(config.seed)
    output = prepare_output(config, info)
    schedule, eval_set, render = load_data(config, output, info)
    options = lora_options(config)
    model, module, params = build_model(config, options, dtype, device, info)
    if info.is_main:
        report = trainable_parameter_report(model)
        log("trainable parameters: " + ", ".join(f"{group} {count:,}" for group, count in report.items()))
        log(f"expert storage: {expert_storage_label(model, dtype)}")
        log(f"activation checkpointing: {RecomputePlan.of(model).describe(len(model.model.layers))}")
    optimizer = torch.optim.AdamW(
        list(params.values()),
        lr=config.lr,
        weight_decay=config.weight_decay,
        fused=device.type == "cuda" and config.sharding != "fsdp",
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config, schedule.total_steps))
    return Run(
        config,
        info,
        device,
        dtype,
        output,
        schedule,
        eval_set,
        model,
        module,
        params,
        options,
        optimizer,
        scheduler,
        render,
    )


def adapter_writer(run: Run) -> Callable[[Path], None]:
    """Gathers the adapter now (a collective under FSDP: every rank calls this); the returned function
    writes it (rank 0 calls it)."""
    state = lora_state_dict_peft(run.model)

    def write(directory: Path) -> None:
        save_adapter(
            run.model,
            run.options,
            directory,
            base_model_name_or_path=model_reference(run.config.model),
            overwrite=True,
            state=state,
            record={
                "render": run.render,
                "model": model_reference(run.config.model),
                "data": run.config.data,
            },
        )

    return write


def save_final_adapter(run: Run, directory: Path) -> None:
    write = adapter_writer(run)
    if run.info.is_main:
        write(directory)
    dist.barrier(run.info)


def save_checkpoint(run: Run, step: int) -> Path:
    write_adapter = adapter_writer(run)
    return save_training_checkpoint(
        run.output,
        step,
        write_adapter,
        run.optimizer,
        run.scheduler,
        {"config": run.config.to_dict()},
        run.config.keep_last,
        run.info,
        run.sharded,
    )


def resume(run: Run, log: Callable[[str], None]) -> int:
    checkpoint = latest_checkpoint(run.output) if run.config.resume else None
    if checkpoint is None:
        if run.config.resume and run.info.is_main:
            log(f"--resume: no checkpoint in {run.output} yet, so the run starts at step 0")
        return 0
    state = load_training_checkpoint(
        checkpoint, lambda d: load_adapter(run.model, d), run.optimizer, run.scheduler, run.info, run.sharded
    )
    if run.info.is_main:
        log(f"resumed from {checkpoint} (step {state['step']})")
    return state["step"]


def evaluate(run: Run) -> float:
    """Mean loss over the held-out trained tokens. Every rank evaluates every batch (the set is small),
    so FSDP's collectives stay in step and no reduction is needed."""
    run.module.eval()
    loss_sum, count = 0.0, 0
    with torch.no_grad(), run.autocast():
        for batch in run.eval_set:
            batch = batch.to(run.device)
            total, n = run.module(batch.input_ids, batch.labels, batch.position_ids)
            loss_sum += float(total)
            count += int(n)
    run.module.train()
    return loss_sum / max(count, 1)


def train_step(run: Run, step: int) -> dict:
    """Forward and backward over this rank's micro-batches of `step`, then one optimizer update."""
    denominator = run.schedule.step_trained_tokens(step)
    batches = run.schedule.rank_batches(
        step, run.info.rank, pad_to_multiple=128 if run.device.type == "cuda" else 1
    )
    loss_sum = torch.zeros((), device=run.device, dtype=torch.float32)
    tokens = 0
    count = max(len(batches), 1)
    for index, batch in enumerate(batches or [None]):
        defer_sync = run.info.enabled and not run.sharded and index < count - 1
        with run.module.no_sync() if defer_sync else nullcontext(), run.autocast():
            if batch is None:
                # This rank has no micro-batch left in the epoch's last step: it runs a tiny batch with
                # zero weight, so every rank goes through the same forward/backward collectives.
                dummy = collate([([T.END_OF_TEXT] * 2, [T.END_OF_TEXT] * 2)]).to(run.device)
                total = run.module(dummy.input_ids, dummy.labels, dummy.position_ids)[0] * 0.0
            else:
                batch = batch.to(run.device)
                total, _ = run.module(batch.input_ids, batch.labels, batch.position_ids)
                tokens += batch.num_tokens
            # DDP and FSDP average gradients over ranks; scaling by world size makes that a sum.
            (total * (run.info.world_size / denominator)).backward()
        loss_sum += total.detach().float()
    reduced = dist.all_reduce_sum(
        torch.stack([loss_sum, torch.tensor(float(tokens), device=run.device)]), run.info
    )
    step_loss = float(reduced[0]) / denominator
    if not math.isfinite(step_loss):
        raise GptossTuneError(
            f"The loss became {step_loss} at step {step + 1}; stopping. Last good checkpoint: "
            f"{latest_checkpoint(run.output) or 'none'}. Lower --lr, check the data, or use --dtype fp32 to find "
            "the cause."
        )
    max_norm = run.config.max_grad_norm or math.inf  # 0: no clipping (the norm is still measured)
    grad_norm = float(full_tensor(torch.nn.utils.clip_grad_norm_(list(run.params.values()), max_norm)))
    lr = run.scheduler.get_last_lr()[0]
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return {
        "kind": "train",
        "step": step + 1,
        "epoch": run.schedule.epoch_of(step),
        "loss": step_loss,
        "lr": lr,
        "grad_norm": grad_norm,
        "tokens": int(reduced[1]),
        "trained_tokens": denominator,
    }


def adapters_without_updates(initial: dict[str, torch.Tensor], params: dict[str, nn.Parameter]) -> list[str]:
    """Adapter tensors that never changed. LoRA B starts at zero, so an adapter whose B is unchanged
    received no gradient (A legitimately stays put on the first step)."""
    return [
        name
        for name, p in params.items()
        if "lora_B" in name and torch.equal(initial[name], full_tensor(p.detach()).cpu())
    ]


def train(config: TrainConfig, log: Callable[[str], None] = print, progress=None) -> TrainResult:
    """Run a training job described by `config`. `progress(step, total, record)` reports each step."""
    info = dist.init_distributed(pick_device(config.device).type)
    try:
        return _train(config, info, log, progress)
    finally:
        dist.shutdown(info)


def _set_up_or_clean_up(config: TrainConfig, info: dist.DistInfo, log) -> tuple[Run, int]:
    """The run set up and its first step; a new run that fails before it (a missing model, a bad data
    row) leaves no output behind, so the corrected command starts afresh instead of asking for --resume."""
    output = Path(config.output)
    new_run = info.is_main and not config.resume and not holds_files(output)
    existed = output.exists()
    try:
        run = setup(config, info, log)
        return run, resume(run, log)
    except BaseException:
        if new_run and output.is_dir():
            for path in list(output.iterdir()) if existed else [output]:
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
        raise


def _train(config: TrainConfig, info: dist.DistInfo, log, progress) -> TrainResult:
    started = time.perf_counter()
    run, start_step = _set_up_or_clean_up(config, info, log)
    initial = {name: full_tensor(p.detach()).cpu().clone() for name, p in run.params.items()}
    if start_step:  # compare against a fresh adapter: B starts at zero
        initial = {name: torch.zeros_like(t) if "lora_B" in name else t for name, t in initial.items()}
    metrics = MetricsLog(run.output, resume_step=start_step) if info.is_main else None
    total_steps = run.schedule.total_steps
    first_loss = last_loss = eval_loss = None
    tokens_seen = trained_seen = 0
    step_started = time.perf_counter()
    for step in range(start_step, total_steps):
        record = train_step(run, step)
        now = time.perf_counter()
        record["tokens_per_s"] = record["tokens"] / max(now - step_started, 1e-9)
        if run.device.type == "cuda":  # this rank's peak so far, weights included
            record["peak_gib"] = round(torch.cuda.max_memory_allocated(run.device) / GIB, 2)
        step_started = now
        done = record["step"]
        tokens_seen += record["tokens"]
        trained_seen += record["trained_tokens"]
        first_loss = record["loss"] if first_loss is None else first_loss
        last_loss = record["loss"]
        if metrics and (done % config.log_every == 0 or done == total_steps):
            metrics.log(record)
        if progress and info.is_main:
            progress(done, total_steps, record)
        if run.eval_set and config.eval_every and done % config.eval_every == 0:
            eval_loss = evaluate(run)
            if metrics:
                metrics.log({"kind": "eval", "step": done, "loss": eval_loss})
        if config.save_every and done % config.save_every == 0 and done < total_steps:
            save_checkpoint(run, done)

    if run.eval_set and (not config.eval_every or total_steps % config.eval_every):
        eval_loss = evaluate(run)
        if metrics:
            metrics.log({"kind": "eval", "step": total_steps, "loss": eval_loss})
    files: dict[str, Path] = {}
    if start_step < total_steps:
        files["checkpoint"] = save_checkpoint(run, total_steps)
    files["adapter"] = run.output / "adapter"
    save_final_adapter(run, files["adapter"])
    if metrics:
        metrics.close()
        if plot := plot_loss(run.output / "metrics.jsonl", run.output / "loss.png"):
            files["loss_plot"] = plot
        files["metrics"] = run.output / "metrics.jsonl"
        files["config"] = run.output / CONFIG_FILE
    if untouched := adapters_without_updates(initial, run.params):
        raise GptossTuneError(
            f"{len(untouched)} LoRA adapter(s) received no update, e.g. {', '.join(untouched[:4])}: their layers "
            "never saw a trained token's gradient. The adapter was saved, but check --lora-targets/--lora-layers "
            "and the data."
        )
    return TrainResult(
        run.output,
        total_steps,
        first_loss,
        last_loss,
        eval_loss,
        tokens_seen,
        trained_seen,
        time.perf_counter() - started,
        files,
    )
