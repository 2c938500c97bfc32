"""`gptoss-tune bench --gpus 1,2,4`: data-parallel scaling of the real trainer.

Writes one random-on-load checkpoint of the bench architecture (config only: every process draws
the same weights on its GPU, `gptoss_tune.model.random_weights`) and one Multilingual-Thinking-shaped
dataset, then runs `gptoss-tune train --gpus N` (torchrun + DDP, the product's own path) for each N
in the same session, and compares real tokens/s. Each GPU gets micro-batches of the same size, so
N GPUs do N times the work per step (weak scaling): ideal speed-up is N.

With `equivalence`, it also trains 1 GPU with N micro-batches per step (gradient accumulation)
against N GPUs with one each: the same global batch, so the loss curves and the adapters must agree.

With sharding "fsdp" every run shards the model over its GPUs (FSDP2, for models whose weights do
not fit one GPU); a 1-GPU run is then impossible, so there is no speed-up column.
"""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from gptoss_tune.data.synthetic import make_synthetic_rows, write_jsonl
from gptoss_tune.errors import GptossTuneError
from gptoss_tune.files import atomic_directory, write_json
from gptoss_tune.model.checkpoint import checkpoint_config
from gptoss_tune.model.lora import ADAPTER_WEIGHTS
from gptoss_tune.model.random_weights import RandomWeights

UNTIMED_STEPS = 3  # compile warm-up and the first DDP bucket rebuild


@dataclass
class ScalingRow:
    gpus: int
    grad_accum: int
    status: str
    tokens_per_s: float | None = None
    tokens_per_s_per_gpu: float | None = None
    speedup: float | None = None
    losses: list[float] | None = None
    peak_gib: float | None = None  # rank 0's peak GPU memory, weights included
    sharding: str = "ddp"
    output: str = ""  # the run's folder (metrics.jsonl, adapter/)


def write_bench_checkpoint(config, directory: Path, seed: int) -> Path:
    """A random-on-load checkpoint: config.json and the seed, no weights."""
    if (directory / "config.json").is_file():
        return directory
    with atomic_directory(directory) as folder:
        RandomWeights.with_unit_logits(config, seed).write(folder)
        write_json(folder / "config.json", checkpoint_config(config, torch.bfloat16, mxfp4=True))
    return directory


def read_metrics(metrics: Path) -> tuple[list[float], list[float], float | None]:
    """(tokens/s of the timed steps, loss of every step, peak GiB) of a run's metrics.jsonl."""
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line]
    train = [r for r in records if r.get("kind") == "train"]
    peaks = [r["peak_gib"] for r in train if "peak_gib" in r]
    return (
        [r["tokens_per_s"] for r in train[UNTIMED_STEPS:]],
        [r["loss"] for r in train],
        max(peaks, default=None),
    )


def adapter_difference(first: Path, second: Path) -> float:
    """||a - b|| / ||a|| over all tensors of two adapters' safetensors (same names)."""
    a, b = load_file(first / ADAPTER_WEIGHTS), load_file(second / ADAPTER_WEIGHTS)
    if a.keys() != b.keys():
        raise ValueError(f"{first} and {second} hold different adapter tensors")
    difference = sum(float((a[k].double() - b[k].double()).square().sum()) for k in a)
    norm = sum(float(a[k].double().square().sum()) for k in a)
    return (difference / norm) ** 0.5 if norm else float("inf")


def train_command(
    model: Path,
    data: Path,
    output: Path,
    gpus: int,
    grad_accum: int,
    tokens_per_batch: int,
    steps: int,
    memory_budget_gib: float | None,
    sharding: str = "ddp",
    expert_storage: str = "bf16",
) -> list[str]:
    command = [
        sys.executable,
        "-m",
        "gptoss_tune",
        "train",
        "--model",
        str(model),
        "--data",
        str(data),
        "--output",
        str(output),
        "--gpus",
        str(gpus),
        "--grad-accum",
        str(grad_accum),
        "--tokens-per-batch",
        str(tokens_per_batch),
        "--max-steps",
        str(steps),
        "--warmup-ratio",
        "0",
        "--lora-rank",
        "8",
        "--lora-alpha",
        "16",
        "--lr",
        "1e-4",
        "--log-every",
        "1",
        "--sharding",
        sharding,
        "--expert-storage",
        expert_storage,
    ]
    if memory_budget_gib and sharding == "ddp":
        command += ["--memory-budget-gib", str(memory_budget_gib)]
    else:
        command += ["--gradient-checkpointing"]
    return command


def run_one(workdir: Path, model: Path, data: Path, gpus: int, grad_accum: int, options, log) -> ScalingRow:
    output = workdir / f"run-{gpus}gpu-accum{grad_accum}"
    command = train_command(
        model,
        data,
        output,
        gpus,
        grad_accum,
        options.tokens_per_batch,
        UNTIMED_STEPS + options.steps,
        options.memory_budget_gib,
        options.sharding,
        options.expert_storage,
    )
    if (output / "adapter").is_dir():  # finished in an earlier invocation with the same workdir
        log(f"reusing {output}")
    else:
        shutil.rmtree(output, ignore_errors=True)  # a run cut short earlier: start it again
        log(" ".join(command))
        log_file = workdir / f"{output.name}.log"
        with open(log_file, "w") as sink:  # streamed, so a run killed by a time limit leaves its log
            finished = subprocess.run(command, stdout=sink, stderr=subprocess.STDOUT)
        if finished.returncode != 0:
            tail = log_file.read_text(errors="replace").strip().splitlines()[-1:] or ["?"]
            return ScalingRow(
                gpus, grad_accum, f"error: {tail[0][:200]}", sharding=options.sharding, output=str(output)
            )
    speeds, losses, peak = read_metrics(output / "metrics.jsonl")
    speed = statistics.median(speeds) if speeds else None
    return ScalingRow(
        gpus,
        grad_accum,
        "ok",
        speed,
        speed / gpus if speed else None,
        losses=losses,
        peak_gib=peak,
        sharding=options.sharding,
        output=str(output),
    )


def run_scaling(
    options, gpu_counts: tuple[int, ...], workdir: Path, equivalence: bool, log
) -> list[ScalingRow]:
    from gptoss_tune.bench.run import bench_config

    if options.sharding == "fsdp" and (1 in gpu_counts or equivalence):
        raise GptossTuneError(
            "bench --sharding fsdp shards over several GPUs: leave 1 out of --gpus and drop --equivalence "
            "(compare with --sharding ddp for that)."
        )
    workdir.mkdir(parents=True, exist_ok=True)
    config = bench_config(options.preset, options.layers)
    log(f"random-on-load {options.preset} checkpoint ({config.num_hidden_layers} layers)")
    model = write_bench_checkpoint(config, workdir / "model", options.seed)
    data = write_jsonl(make_synthetic_rows(rows=1000, seed=options.seed), workdir / "mt-synthetic.jsonl")
    rows: list[ScalingRow] = []

    def record(row: ScalingRow) -> None:  # after every run, so a run cut short keeps what it measured
        rows.append(row)
        base = next(
            (r.tokens_per_s for r in rows if r.gpus == 1 and r.grad_accum == 1 and r.tokens_per_s), None
        )
        for done in rows:
            done.speedup = (
                done.tokens_per_s / base if base and done.tokens_per_s and done.grad_accum == 1 else None
            )
        (workdir / "scaling.json").write_text(json.dumps([asdict(r) for r in rows], indent=2))
        log(scaling_table(rows))

    for n in sorted(set(gpu_counts)):
        record(run_one(workdir, model, data, n, 1, options, log))
    if equivalence:
        record(run_one(workdir, model, data, 1, max(gpu_counts), options, log))
    return rows


def environment_line() -> str:
    from gptoss_tune.bench.run import environment

    env = environment(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    return (
        f"{env['date']}, {torch.cuda.device_count()} x {env['device']}, torch {env['torch']}, transformers "
        f"{env['transformers']}, peft {env['peft']}"
    )


def scaling_table(rows: list[ScalingRow]) -> str:
    lines = [
        "| GPUs | sharding | micro-batches per GPU per step | status | real tok/s | tok/s per GPU "
        "| speed-up vs 1 GPU | peak GiB (rank 0) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        fmt = lambda x, spec: "-" if x is None else format(x, spec)  # noqa: E731
        lines.append(
            f"| {r.gpus} | {r.sharding} | {r.grad_accum} | {r.status} | {fmt(r.tokens_per_s, ',.0f')} | "
            f"{fmt(r.tokens_per_s_per_gpu, ',.0f')} | {fmt(r.speedup, '.2f')}{'x' if r.speedup else ''} | "
            f"{fmt(r.peak_gib, '.1f')} |"
        )
    return "\n".join(lines)


def equivalence_table(rows: list[ScalingRow]) -> str | None:
    """Loss per step of N GPUs x 1 micro-batch against 1 GPU x N micro-batches (same global batch),
    and how far apart their final adapters are."""
    accumulated = next((r for r in rows if r.gpus == 1 and r.grad_accum > 1 and r.losses), None)
    parallel = next(
        (
            r
            for r in rows
            if accumulated and r.gpus == accumulated.grad_accum and r.grad_accum == 1 and r.losses
        ),
        None,
    )
    if not (accumulated and parallel):
        return None
    lines = [
        f"| step | {parallel.gpus} GPUs | 1 GPU x {accumulated.grad_accum} accumulation | difference |",
        "|---|---|---|---|",
    ]
    for step, (a, b) in enumerate(zip(parallel.losses, accumulated.losses, strict=False), start=1):
        lines.append(f"| {step} | {a:.5f} | {b:.5f} | {abs(a - b):.2e} |")
    adapters = [Path(r.output) / "adapter" for r in (parallel, accumulated)]
    if all((a / ADAPTER_WEIGHTS).is_file() for a in adapters):
        lines.append(
            f"\nFinal adapters: ||a - b|| / ||a|| = {adapter_difference(*adapters):.2e} over all LoRA tensors."
        )
    return "\n".join(lines)
