"""The `gptoss-tune` command line: one thin function per command over each stage's public API."""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.text import Text

from gptoss_tune.errors import GptossTuneError

app = typer.Typer(
    name="gptoss-tune",
    help="LoRA fine-tuning of OpenAI gpt-oss on Harmony conversations: prepare, train, merge, chat, eval.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
console = Console()
err_console = Console(stderr=True)


@contextmanager
def progress_bar(description: str, total: int | None = None):
    """A progress bar on stderr; yields a function that advances it by one."""
    columns = [
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    ]
    with Progress(*columns, console=err_console, transient=True) as progress:
        task = progress.add_task(description, total=total)
        yield lambda: progress.advance(task)


# --- prepare / inspect / make-data ---------------------------------------------------------------

RECOMPUTE_HELP = (
    "what layers that do not fit recompute in backward: layers (the whole layer) or auto (also just the "
    "experts' gate_up projection, the largest activation, for one GEMM; the plan with the least measured "
    "time is taken)."
)
DATA_HELP = (
    "A .jsonl/.json/.parquet/.csv file, a folder of them, a datasets.save_to_disk folder, a Hugging Face "
    "hub id (owner/name), or 'sample' for the bundled Multilingual-Thinking-shaped sample."
)


@app.command()
def prepare(
    data: Annotated[str, typer.Argument(help=DATA_HELP)],
    output: Annotated[
        Path, typer.Option("--output", "-o", help="Folder to write (datasets.load_from_disk format).")
    ],
    template: Annotated[
        str,
        typer.Option(
            help="hf: the official chat template, token for token; harmony: openai-harmony's rendering, "
            "which also keeps a tool-calling turn's thinking in view of its final answer, as inference does."
        ),
    ] = "hf",
    loss_on: Annotated[
        str,
        typer.Option(
            help="Which tokens are trained: turns (one example per assistant block), "
            "last, assistant, final, all."
        ),
    ] = "turns",
    date: Annotated[
        str,
        typer.Option(
            help="'Current date' in the system message (YYYY-MM-DD); fixed so renders are reproducible."
        ),
    ] = "2025-08-05",
    reasoning_effort: Annotated[
        str, typer.Option(help="'Reasoning:' in the system message: low, medium, high.")
    ] = "medium",
    format: Annotated[
        str,
        typer.Option(
            "--format", help="Dataset shape: auto, messages, mt-columns, sharegpt, alpaca, prompt-completion."
        ),
    ] = "auto",
    split: Annotated[
        str | None, typer.Option(help="Split of a hub dataset or DatasetDict folder", show_default="train")
    ] = None,
    subset: Annotated[
        str | None,
        typer.Option(help="Configuration (subset) of a hub dataset.", show_default="the dataset's default"),
    ] = None,
    max_length: Annotated[
        int | None, typer.Option(help="Drop examples longer than this many tokens", show_default="no limit")
    ] = None,
    truncate: Annotated[
        bool,
        typer.Option(
            help="With --max-length: keep the head of a long example when trained "
            "tokens remain in it, instead of dropping it."
        ),
    ] = False,
    skip_invalid: Annotated[
        bool,
        typer.Option(
            help="Skip invalid rows (counted by reason in prepare.json) instead of stopping at the first."
        ),
    ] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace OUTPUT if it exists.")] = False,
) -> None:
    """Render a dataset of conversations into Harmony token ids with exact training labels."""
    from gptoss_tune.data.prepare import PrepareOptions
    from gptoss_tune.data.prepare import prepare as run_prepare

    options = PrepareOptions(
        template=template,
        date=date,
        reasoning_effort=reasoning_effort,
        loss_on=loss_on,
        format=format,
        max_length=max_length,
        truncate=truncate,
        skip_invalid=skip_invalid,
        split=split,
        subset=subset,
    )
    with progress_bar("preparing conversations") as advance:
        info = run_prepare(data, output, options, overwrite=overwrite, progress=advance)
    stats = info["stats"]
    console.print(
        f"[bold]wrote[/bold] {output}: {stats['examples']} examples from {stats['conversations']} "
        f"conversations, {stats['tokens']:,} tokens ({stats['trained_tokens']:,} trained), "
        f"{info['seconds']} s"
    )
    if stats["skipped"]:
        console.print(f"skipped: {json.dumps(stats['skipped'])}")
    if stats["empty_answers"]:
        console.print(
            f"[yellow]note:[/yellow] {stats['empty_answers']} conversations have an empty answer: the model learns "
            "to answer nothing there (an empty CSV cell?)."
        )
    if stats["tool_thinking_left_out"]:
        console.print(
            f"[yellow]note:[/yellow] in {stats['tool_thinking_left_out']} conversations a final answer after a "
            "tool result is trained without the call's thinking in view, as the official template renders it; "
            "inference shows that thinking. --template harmony trains what inference shows."
        )


@app.command()
def inspect(
    directory: Annotated[Path, typer.Argument(help="A folder written by `gptoss-tune prepare`.")],
    index: Annotated[
        int, typer.Option("--index", "-i", help="Which example to show (negative counts from the end).")
    ] = 0,
    plain: Annotated[
        bool, typer.Option(help="Plain text: trained tokens between ⟦ and ⟧ instead of colors.")
    ] = False,
) -> None:
    """Show a prepared example with its trained tokens highlighted, token counts and the policy used."""
    from gptoss_tune.data.inspect import show_example

    show_example(directory, index, plain, console)


@app.command("make-data")
def make_data(
    output: Annotated[Path, typer.Option("--output", "-o", help="JSON lines file to write.")],
    like: Annotated[
        str, typer.Option(help="Which dataset's shape and token-length distribution to imitate.")
    ] = "multilingual-thinking",
    rows: Annotated[int, typer.Option(help="Number of rows.", min=1)] = 1000,
    seed: Annotated[int, typer.Option(help="Random seed (same seed, same rows).")] = 0,
    overwrite: Annotated[bool, typer.Option(help="Replace OUTPUT if it exists.")] = False,
) -> None:
    """Write synthetic rows shaped like a real dataset (for benchmarks; random words, realistic lengths)."""
    from gptoss_tune.data.synthetic import make_synthetic_rows, write_jsonl

    if output.is_dir():
        raise GptossTuneError(f"{output} is a folder: --output names the JSON lines file to write.")
    if output.exists() and not overwrite:
        raise GptossTuneError(f"{output} already exists: pass --overwrite or choose another --output.")
    path = write_jsonl(make_synthetic_rows(like=like, rows=rows, seed=seed), output)
    console.print(f"[bold]wrote[/bold] {path}: {rows} rows like {like} (seed {seed})")


# --- models --------------------------------------------------------------------------------------


@app.command("init-model")
def init_model(
    output: Annotated[Path, typer.Option("--output", "-o", help="Checkpoint folder to write.")],
    preset: Annotated[str, typer.Option(help="Architecture: tiny (CPU tests, demo), 20b, 120b.")] = "tiny",
    mxfp4: Annotated[
        bool,
        typer.Option(
            help="Store the experts in MXFP4, like the published checkpoints (20b / 120b: random MXFP4 codes "
            "drawn directly, seconds instead of quantizing for half an hour)."
        ),
    ] = False,
    seed: Annotated[int, typer.Option(help="Random seed of the weights.")] = 0,
    dtype: Annotated[str, typer.Option(help="Dtype of the non-MXFP4 weights: bf16 or fp32.")] = "bf16",
    overwrite: Annotated[bool, typer.Option(help="Replace OUTPUT if it exists.")] = False,
    random_on_load: Annotated[
        bool,
        typer.Option(
            help="Write no weights: whatever loads the folder draws them (seeded, MXFP4 experts) on its own "
            "device. For benchmarks of the full-size shapes without writing tens of GB. A CPU and a GPU draw "
            "different weights from one seed: keep a folder's runs on one kind of device."
        ),
    ] = False,
) -> None:
    """Write a complete gpt-oss checkpoint with random weights (config, safetensors, tokenizer, chat template)."""
    import torch

    from gptoss_tune.model.init import init_model as write_model

    dtypes = {"bf16": torch.bfloat16, "fp32": torch.float32}
    if dtype not in dtypes:
        raise GptossTuneError(f"Unknown --dtype '{dtype}': use bf16 or fp32.")
    path = write_model(
        preset,
        output,
        mxfp4=mxfp4,
        seed=seed,
        dtype=dtypes[dtype],
        overwrite=overwrite,
        random_on_load=random_on_load,
    )
    kind = " (weights drawn at load)" if random_on_load else " (MXFP4 experts)" if mxfp4 else ""
    console.print(f"[bold]wrote[/bold] {path}: random {preset} gpt-oss{kind}")


# --- train ---------------------------------------------------------------------------------------

REQUIRED = "required, here or in the recipe"


def _given_on_command_line(ctx: typer.Context, names: list[str]) -> dict:
    """Options the user typed (not defaults), so they override the recipe. Compared by name: newer
    typer releases carry their own copy of click, whose ParameterSource is another enum than click's."""
    given = {}
    for name in names:
        source = ctx.get_parameter_source(name)
        if source is not None and source.name != "DEFAULT":
            given[name] = ctx.params[name]
    return given


@app.command()
def train(
    ctx: typer.Context,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config", "-c", help="YAML recipe; options given here override it.", show_default="none"
        ),
    ] = None,
    model: Annotated[
        str,
        typer.Option(
            help="Base model: local checkpoint folder or hub id (openai/gpt-oss-20b).", show_default=REQUIRED
        ),
    ] = "",
    data: Annotated[
        str,
        typer.Option(
            help="Prepared folder, or anything `prepare` accepts (prepared into "
            "OUTPUT/data with the options below).",
            show_default=REQUIRED,
        ),
    ] = "",
    output: Annotated[
        str,
        typer.Option(
            "--output",
            "-o",
            help="Run folder: adapter/, checkpoints/, metrics, loss.png.",
            show_default=REQUIRED,
        ),
    ] = "",
    eval_data: Annotated[
        str | None, typer.Option(help="Held-out data for eval loss", show_default="none")
    ] = None,
    eval_fraction: Annotated[
        float, typer.Option(help="Hold out this fraction of the conversations for eval loss.")
    ] = 0.0,
    eval_every: Annotated[int, typer.Option(help="Eval every N steps (0: at the end only).")] = 0,
    template: Annotated[str, typer.Option(help="Rendering when DATA is not prepared: hf or harmony.")] = "hf",
    loss_on: Annotated[
        str, typer.Option(help="Label policy when DATA is not prepared: turns, last, assistant, final, all.")
    ] = "turns",
    date: Annotated[str, typer.Option(help="System message date when DATA is not prepared.")] = "2025-08-05",
    reasoning_effort: Annotated[
        str, typer.Option(help="Reasoning effort when DATA is not prepared.")
    ] = "medium",
    format: Annotated[
        str, typer.Option("--format", help="Dataset shape when DATA is not prepared.")
    ] = "auto",
    max_length: Annotated[
        int | None, typer.Option(help="Drop longer examples when preparing", show_default="no limit")
    ] = None,
    split: Annotated[str | None, typer.Option(help="Split of a hub dataset", show_default="train")] = None,
    subset: Annotated[
        str | None, typer.Option(help="Subset of a hub dataset.", show_default="the dataset's default")
    ] = None,
    lora_rank: Annotated[int, typer.Option(help="LoRA rank r.")] = 8,
    lora_alpha: Annotated[
        float, typer.Option(help="LoRA alpha (scale alpha/r, or alpha/sqrt(r) with --rslora).")
    ] = 16.0,
    lora_dropout: Annotated[float, typer.Option(help="Dropout on the attention adapters' input.")] = 0.0,
    rslora: Annotated[bool, typer.Option(help="Rank-stabilized scaling alpha/sqrt(r).")] = False,
    lora_targets: Annotated[
        str,
        typer.Option(
            help="Comma list: attn, experts, or q_proj,k_proj,v_proj,o_proj,gate_up_proj,down_proj."
        ),
    ] = "attn,experts",
    lora_layers: Annotated[
        str | None, typer.Option(help="Layers to adapt, e.g. '0-11,20'", show_default="all")
    ] = None,
    tokens_per_batch: Annotated[int, typer.Option(help="Token budget of a packed micro-batch.")] = 4096,
    grad_accum: Annotated[int, typer.Option(help="Micro-batches per optimizer step (per GPU).")] = 1,
    epochs: Annotated[int, typer.Option(help="Passes over the data (ignored with --max-steps).")] = 1,
    max_steps: Annotated[
        int | None, typer.Option(help="Stop after this many optimizer steps", show_default="epochs")
    ] = None,
    lr: Annotated[float, typer.Option(help="Peak learning rate (AdamW).")] = 2e-4,
    schedule: Annotated[
        str, typer.Option(help="Learning-rate schedule after warmup: cosine, linear, constant.")
    ] = "cosine",
    warmup_ratio: Annotated[
        float, typer.Option(help="Share of the steps spent warming up linearly (step 1 already above 0).")
    ] = 0.03,
    min_lr_ratio: Annotated[
        float,
        typer.Option(
            help="Where the decay ends, as a share of --lr: reached just after the last step, as in "
            "transformers' schedules (so a short run ends a little above it)."
        ),
    ] = 0.0,
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay on the adapters.")] = 0.0,
    max_grad_norm: Annotated[
        float, typer.Option(help="Clip the gradient norm to this (0: no clipping).")
    ] = 1.0,
    seed: Annotated[int, typer.Option(help="Seed for adapters, data order and dropout.")] = 0,
    device: Annotated[str, typer.Option(help="auto (GPU if present), cpu, cuda.")] = "auto",
    dtype: Annotated[str, typer.Option(help="auto (bf16 on GPU, fp32 on CPU), bf16, fp32.")] = "auto",
    gradient_checkpointing: Annotated[
        bool, typer.Option(help="Recompute layer activations in backward.")
    ] = False,
    memory_budget_gib: Annotated[
        str | None,
        typer.Option(
            help="GPU memory budget in GiB, or auto (what the GPU has free less 8% of it): measure a layer and "
            "recompute in backward only what the budget needs, first the norms' outputs, then layers (see "
            "--recompute; overrides --gradient-checkpointing; DDP and one GPU only). Without a budget the "
            "fast paths recompute the norms' outputs and nothing else unless --gradient-checkpointing.",
            show_default="none",
        ),
    ] = None,
    recompute: Annotated[str, typer.Option(help="With --memory-budget-gib: " + RECOMPUTE_HELP)] = "layers",
    kernels: Annotated[
        str,
        typer.Option(
            help="auto: GPU fast paths (attention, grouped-GEMM experts, stacked q/k/v projections, fused "
            "loss) on CUDA, eager on CPU; fast: the fast paths on any device; eager: the reference code."
        ),
    ] = "auto",
    attention: Annotated[
        str,
        typer.Option(
            help="The fast paths' attention: auto (FlashAttention-4 where the optional flash-attn-4 package "
            "is installed and the GPU is an H100/H200/B200/B300, else FlexAttention), flash, or flex."
        ),
    ] = "auto",
    expert_gemm: Annotated[
        str,
        typer.Option(
            help="The fast paths' expert GEMMs: auto (quack-fused where quack-kernels is installed and "
            "the GPU is an H100/H200, else torch's grouped_mm), quack (quack's GEMMs, the gate_up epilogue "
            "a separate Triton pass), quack-fused (quack's, the gate_up one with the bias, LoRA term and "
            "SwiGLU in its epilogue), or torch."
        ),
    ] = "auto",
    gpus: Annotated[
        int, typer.Option(help="Data-parallel processes on this machine (torchrun underneath).")
    ] = 1,
    sharding: Annotated[
        str,
        typer.Option(
            help="With several GPUs: ddp (whole model per GPU) or fsdp (weights sharded, for models "
            "that do not fit one GPU)."
        ),
    ] = "ddp",
    expert_storage: Annotated[
        str,
        typer.Option(
            help="Expert weights in memory: mxfp4 (kept quantized, dequantized per layer), bf16 (dense in the "
            "training dtype), or auto (mxfp4 for an MXFP4 checkpoint on a GPU)."
        ),
    ] = "auto",
    save_every: Annotated[int, typer.Option(help="Checkpoint every N steps (0: only at the end).")] = 0,
    keep_last: Annotated[int, typer.Option(help="Checkpoints to keep.")] = 2,
    resume: Annotated[
        bool, typer.Option(help="Continue from the newest complete checkpoint in OUTPUT.")
    ] = False,
    log_every: Annotated[int, typer.Option(help="Write metrics every N steps.")] = 1,
) -> None:
    """LoRA-train gpt-oss on a dataset: packed batches, exact labels, checkpoints, metrics and a loss plot."""
    from gptoss_tune.config import option_names, resolve_config

    resolved = resolve_config(config, _given_on_command_line(ctx, option_names()))
    from gptoss_tune.train.launch import launch_torchrun, needs_torchrun

    if needs_torchrun(resolved.gpus):
        raise typer.Exit(launch_torchrun(resolved.gpus))
    from gptoss_tune.train.run import run_training

    run_training(resolved, console)


# --- bench ---------------------------------------------------------------------------------------


def _command_line(ctx: typer.Context) -> str:
    """The command as typed (options that were given), for the record."""
    words = ["gptoss-tune", ctx.info_name or "bench"]
    for name, value in _given_on_command_line(ctx, list(ctx.params)).items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            words.append(flag if value else "--no-" + name.replace("_", "-"))
        else:
            words += [flag, str(value)]
    return " ".join(words)


@app.command()
def bench(
    ctx: typer.Context,
    preset: Annotated[
        str,
        typer.Option(
            help="Architecture: 20b, 120b, or tiny (on a CPU too, where the stock recipe uses eager attention: "
            "transformers' flex_attention has no sinks there)."
        ),
    ] = "20b",
    tokens_per_batch: Annotated[
        int | None,
        typer.Option(
            help="Tokens per micro-batch (packed for ours, padded for the others).",
            show_default="16384 on a GPU, 2048 on a CPU",
        ),
    ] = None,
    steps: Annotated[int, typer.Option(help="Timed optimizer steps per recipe.")] = 6,
    warmup: Annotated[int, typer.Option(help="Untimed steps first (torch.compile warm-up).")] = 2,
    layers: Annotated[
        int | None, typer.Option(help="Cut the model to this many layers for a quick run", show_default="all")
    ] = None,
    recipes: Annotated[
        str | None,
        typer.Option(
            help="Comma list of ours, ours-eager, stock, cookbook",
            show_default="ours,stock,cookbook; ours with --long-context or mxfp4 experts",
        ),
    ] = None,
    lora_rank: Annotated[int, typer.Option(help="LoRA rank for every recipe.")] = 8,
    lora_alpha: Annotated[float, typer.Option(help="LoRA alpha for every recipe.")] = 16.0,
    lora_targets: Annotated[str, typer.Option(help="LoRA targets for every recipe.")] = "attn,experts",
    long_context: Annotated[
        str | None,
        typer.Option(
            help="Instead of the throughput table, one sequence of each length: '8192,16384,131072'.",
            show_default="none: the throughput table",
        ),
    ] = None,
    memory_budget_gib: Annotated[
        float,
        typer.Option(
            help="Ours recomputes in backward only what this budget needs, first the norms' outputs, then "
            "layers (<= 0: no budget, no checkpointing)."
        ),
    ] = 60.0,
    recompute: Annotated[
        str, typer.Option(help="Ours, under --memory-budget-gib: " + RECOMPUTE_HELP)
    ] = "layers",
    loss_chunk_tokens: Annotated[int, typer.Option(help="Tokens per chunk of ours' fused loss.")] = 2048,
    compile: Annotated[bool, typer.Option(help="torch.compile ours' kernels.")] = True,
    stock_checkpointing: Annotated[
        bool, typer.Option(help="Gradient checkpointing in the stock recipe (the cookbook always uses it).")
    ] = True,
    attention: Annotated[
        str,
        typer.Option(
            help="Ours' attention: auto (FlashAttention-4 where flash-attn-4 is installed and the GPU is an "
            "H100/H200/B200/B300, else FlexAttention), flash, or flex."
        ),
    ] = "auto",
    expert_gemm: Annotated[
        str,
        typer.Option(
            help="Ours' expert GEMMs: auto (quack-fused where quack-kernels is installed and the GPU is "
            "an H100/H200; else torch's grouped_mm), quack (quack's GEMMs, which gather token rows as they "
            "load; the gate_up epilogue a separate Triton pass), quack-fused (quack's, the gate_up one with "
            "the bias, LoRA term and SwiGLU in its epilogue), or torch."
        ),
    ] = "auto",
    components: Annotated[
        bool, typer.Option(help="Also time experts, attention and loss variants on one layer (CUDA).")
    ] = False,
    profile: Annotated[
        bool,
        typer.Option(
            help="With --components: also write the profiler's kernel table of one layer's experts to "
            "OUTPUT/profile-experts.txt."
        ),
    ] = False,
    peak_tflops: Annotated[
        float | None, typer.Option(help="bf16 peak for MFU", show_default="the GPU's datasheet value")
    ] = None,
    device: Annotated[str, typer.Option(help="auto (GPU if present), cuda, cpu.")] = "auto",
    gpus: Annotated[
        str | None,
        typer.Option(
            help="Data-parallel scaling instead of the recipe table: e.g. '1,2,4' trains ours with "
            "`gptoss-tune train --gpus N` for each N and compares tokens/s",
            show_default="off",
        ),
    ] = None,
    equivalence: Annotated[
        bool,
        typer.Option(
            help="With --gpus: also train 1 GPU with the largest N's global batch and compare losses."
        ),
    ] = False,
    sharding: Annotated[
        str,
        typer.Option(
            help="With --gpus: ddp (each GPU holds the model) or fsdp (FSDP2 shards it; for models that do "
            "not fit one GPU, e.g. 120b with bf16 experts on 2 GPUs)."
        ),
    ] = "ddp",
    expert_storage: Annotated[
        str,
        typer.Option(
            help="bf16: dense random experts shared by every recipe. mxfp4: random MXFP4 experts kept "
            "quantized (fits 20b in ~13 GiB, 120b in ~61 GiB); runs ours / ours-eager only "
            "(by default ours)."
        ),
    ] = "bf16",
    seed: Annotated[int, typer.Option(help="Seed of the synthetic data and the random weights.")] = 0,
    output: Annotated[
        Path, typer.Option("--output", "-o", help="Folder for bench.json and bench.md.")
    ] = Path("runs/bench"),
    record: Annotated[bool, typer.Option(help="Append the table to --record-file.")] = False,
    record_file: Annotated[Path, typer.Option(help="Where --record appends.")] = Path("docs/benchmarks.md"),
) -> None:
    """Throughput of LoRA training: ours vs the cookbook and the best stock transformers recipe, on random
    weights and Multilingual-Thinking-shaped synthetic data."""
    from gptoss_tune.bench.report import components_table, markdown, write_results
    from gptoss_tune.bench.report import record as record_report
    from gptoss_tune.bench.run import Bench, BenchOptions, with_defaults_for_long_context

    def integers(text: str, option: str) -> tuple[int, ...]:
        try:
            return tuple(int(part) for part in text.split(",") if part.strip())
        except ValueError:
            raise GptossTuneError(f"{option} takes comma-separated integers, got '{text}'.") from None

    options = BenchOptions(
        preset=preset,
        layers=layers,
        tokens_per_batch=tokens_per_batch,
        steps=steps,
        warmup=warmup,
        recipes=tuple(r.strip() for r in (recipes or "ours,stock,cookbook").split(",") if r.strip()),
        lora_rank=lora_rank,
        lora_alpha=lora_alpha,
        lora_targets=lora_targets,
        compile=compile,
        memory_budget_gib=memory_budget_gib if memory_budget_gib > 0 else None,
        recompute=recompute,
        loss_chunk_tokens=loss_chunk_tokens,
        stock_checkpointing=stock_checkpointing,
        attention=attention,
        expert_gemm=expert_gemm,
        peak_tflops=peak_tflops,
        long_context=integers(long_context, "--long-context") if long_context else (),
        seed=seed,
        device=device,
        expert_storage=expert_storage,
        sharding=sharding,
    )
    options = with_defaults_for_long_context(options, recipes_given=recipes is not None)
    if gpus:
        _bench_scaling(options, integers(gpus, "--gpus"), output, equivalence, record, record_file, ctx)
        return
    runner = Bench(
        options,
        log=lambda line: err_console.print(line, markup=False, highlight=False),
        on_update=lambda partial: write_results(partial, output),  # a cut-short run keeps what it measured
    )
    report = runner.run()
    console.print(markdown(report), markup=False, highlight=False, soft_wrap=True)
    if components:
        report.components = runner.time_components(output / "profile-experts.txt" if profile else None)
        write_results(report, output)
        console.print(components_table(report.components), markup=False, highlight=False, soft_wrap=True)
    if record:  # after the components, so that the record has their table too
        console.print(f"[bold]recorded[/bold] in {record_report(report, _command_line(ctx), record_file)}")
    console.print(f"[bold]wrote[/bold] {output}")


# --- merge / chat / eval / demo ------------------------------------------------------------------


def _bench_scaling(
    options, gpu_counts, output: Path, equivalence: bool, record: bool, record_file: Path, ctx
):
    import torch

    from gptoss_tune.bench.scaling import (
        UNTIMED_STEPS,
        environment_line,
        equivalence_table,
        run_scaling,
        scaling_table,
    )

    options = options.for_device(torch.device("cuda"))  # the trainer on GPUs
    rows = run_scaling(
        options,
        gpu_counts,
        output,
        equivalence,
        log=lambda line: err_console.print(line, markup=False, highlight=False),
    )
    text = scaling_table(rows)
    if table := equivalence_table(rows):
        text += "\n\nSame global batch, loss per step:\n\n" + table
    console.print(text, markup=False, highlight=False, soft_wrap=True)
    (output / "scaling.md").write_text(text + "\n")
    if record:
        with open(record_file, "a", encoding="utf-8") as f:
            f.write(
                f"\n### Data-parallel scaling ({environment_line()})\n\nCommand: `{_command_line(ctx)}`\n\n"
                f"{options.preset} shape, {options.layers or 'all'} layers, {options.tokens_per_batch} tokens per "
                f"micro-batch per GPU, LoRA r=8 attention+experts, median tok/s after {UNTIMED_STEPS} warm-up steps.\n\n"
                f"{text}\n"
            )
        console.print(f"[bold]recorded[/bold] in {record_file}")


@app.command()
def merge(
    model: Annotated[
        str, typer.Option(help="Base model: local checkpoint folder or hub id (openai/gpt-oss-20b).")
    ],
    adapter: Annotated[Path, typer.Option(help="PEFT LoRA adapter folder, e.g. a training run's adapter/.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Checkpoint folder to write.")],
    dtype: Annotated[
        str,
        typer.Option(
            help="bf16; mxfp4 (experts re-quantized to MXFP4 like the published checkpoints, the rest "
            "bf16: the base's size); fp32."
        ),
    ] = "bf16",
    max_shard_gb: Annotated[float, typer.Option(help="Largest safetensors shard, in GB.", min=0.001)] = 5.0,
    device: Annotated[
        str, typer.Option(help="Where the expert arithmetic runs: auto (GPU if present), cpu, cuda.")
    ] = "auto",
    overwrite: Annotated[bool, typer.Option(help="Replace OUTPUT if it exists.")] = False,
) -> None:
    """Fold a LoRA adapter into its base model: a complete Hugging Face checkpoint folder, streamed."""
    from gptoss_tune.infer.merge import count_base_tensors
    from gptoss_tune.infer.merge import merge as run_merge
    from gptoss_tune.model.checkpoint import resolve_model_path

    base = resolve_model_path(model)
    with progress_bar("merging", total=count_base_tensors(base)) as advance:
        result = run_merge(
            base,
            adapter,
            output,
            dtype=dtype,
            overwrite=overwrite,
            max_shard_bytes=int(max_shard_gb * 1000**3),
            on_tensor=advance,
            device=device,
        )
    console.print(
        f"[bold]wrote[/bold] {result.output}: {result.tensors} tensors ({result.merged_tensors} adapted), "
        f"{result.bytes_written / 1e9:.2f} GB of weights in {result.dtype}, {result.seconds} s"
    )
    if result.expert_delta_kept is not None:
        console.print(f"expert update kept by MXFP4 rounding: {result.expert_delta_kept:.1%}")
    for warning in result.warnings:
        err_console.print(Text.assemble(("warning: ", "bold yellow"), warning))


MODEL_HELP = "Checkpoint folder or hub id: a merged model, or the base with --adapter."
ADAPTER_HELP = "PEFT LoRA adapter folder to apply on top of MODEL (no merge needed)."
RENDER_DEFAULT = "the fine-tuning data's, else {}"


def _render_options(model: str, adapter: Path | None, template, date, reasoning_effort):
    """Render options: given ones, else those of the fine-tuning data (found beside the adapter or in
    a merged model), else the defaults."""
    from gptoss_tune.harmony.render import RenderOptions
    from gptoss_tune.infer.provenance import training_render_settings

    trained = training_render_settings(adapter) or training_render_settings(model) or {}
    defaults = RenderOptions()
    return RenderOptions(
        template=template or trained.get("template", defaults.template),
        date=date or trained.get("date", defaults.date),
        reasoning_effort=reasoning_effort or trained.get("reasoning_effort", defaults.reasoning_effort),
    )


@app.command()
def chat(
    model: Annotated[str, typer.Option(help=MODEL_HELP)],
    adapter: Annotated[
        Path | None, typer.Option(help=ADAPTER_HELP, show_default="none: MODEL as it is")
    ] = None,
    prompt: Annotated[
        str | None,
        typer.Option(help="Answer this one prompt and exit", show_default="an interactive session"),
    ] = None,
    developer: Annotated[
        str | None, typer.Option(help="Developer instructions (the system prompt)", show_default="none")
    ] = None,
    reasoning_language: Annotated[
        str | None,
        typer.Option(help="Ask for thinking in this language ('reasoning language: X')", show_default="none"),
    ] = None,
    reasoning_effort: Annotated[
        str | None, typer.Option(help="low, medium or high", show_default=RENDER_DEFAULT.format("medium"))
    ] = None,
    hide_analysis: Annotated[bool, typer.Option(help="Do not show the analysis (thinking) channel.")] = False,
    max_new_tokens: Annotated[int, typer.Option(help="Most tokens generated per answer.")] = 1024,
    temperature: Annotated[float, typer.Option(help="Sampling temperature; 0 is greedy decoding.")] = 1.0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling: keep this share of probability.")] = 1.0,
    seed: Annotated[
        int | None, typer.Option(help="Random seed of the sampling", show_default="random")
    ] = None,
    template: Annotated[
        str | None,
        typer.Option(help="Prompt rendering: hf or harmony", show_default=RENDER_DEFAULT.format("hf")),
    ] = None,
    date: Annotated[
        str | None,
        typer.Option(help="'Current date' (YYYY-MM-DD)", show_default=RENDER_DEFAULT.format("2025-08-05")),
    ] = None,
    device: Annotated[str, typer.Option(help="auto (GPU if present), cpu, cuda.")] = "auto",
    dtype: Annotated[str, typer.Option(help="auto (bf16 on GPU, fp32 on CPU), bf16, fp32.")] = "auto",
) -> None:
    """Chat with a model: streamed answers, thinking dimmed, final answer plain. /reset, /quit."""
    from gptoss_tune.infer.chat import ChatSession, answer_once, interactive
    from gptoss_tune.infer.generate import HfGenerator, SamplingOptions
    from gptoss_tune.infer.prompt import ChatHistory

    options = _render_options(model, adapter, template, date, reasoning_effort)
    sampling = SamplingOptions(max_new_tokens, temperature, top_p, seed)
    with progress_bar("loading the model"):
        generator = HfGenerator(model, adapter, device=device, dtype=dtype)
    history = ChatHistory(developer=developer, reasoning_language=reasoning_language)
    session = ChatSession(generator, options, sampling, history)
    if prompt is not None:
        answer_once(session, prompt, console, hide_analysis)
    else:
        interactive(session, console, hide_analysis)


def _write_json_report(path: Path, report: dict) -> None:
    from gptoss_tune.files import atomic_file

    with atomic_file(path) as handle:
        handle.write(json.dumps(report, indent=2, ensure_ascii=False) + "\n")


@app.command("eval")
def eval_command(
    model: Annotated[str, typer.Option(help=MODEL_HELP)],
    adapter: Annotated[
        Path | None,
        typer.Option(
            help=ADAPTER_HELP.removesuffix(".") + "; scores base and adapter.",
            show_default="none: MODEL alone",
        ),
    ] = None,
    data: Annotated[
        str | None,
        typer.Option(help="Loss mode: a prepared folder or anything `prepare` accepts.", show_default="none"),
    ] = None,
    reasoning_language: Annotated[
        bool,
        typer.Option(
            "--reasoning-language",
            help="Reasoning-language adherence mode (see --prompts).",
            show_default="off",
        ),
    ] = False,
    prompts: Annotated[
        str,
        typer.Option(
            help="Adherence mode: .jsonl/.json of {prompt, reasoning_language?, developer?}, .txt (a "
            "prompt a line) or 'sample'."
        ),
    ] = "sample",
    languages: Annotated[
        str | None,
        typer.Option(
            help="Adherence mode: ask every prompt in each of these (comma list).",
            show_default="each prompt's own reasoning_language",
        ),
    ] = None,
    output: Annotated[
        str | None,
        typer.Option(
            "--output",
            "-o",
            help="Write the JSON report to this file, or '-' for stdout.",
            show_default="none",
        ),
    ] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Adherence mode: most tokens of analysis.")] = 512,
    temperature: Annotated[float, typer.Option(help="Adherence mode: 0 is greedy decoding.")] = 0.0,
    top_p: Annotated[float, typer.Option(help="Adherence mode: nucleus sampling share.")] = 1.0,
    seed: Annotated[int, typer.Option(help="Adherence mode: sampling seed.")] = 0,
    template: Annotated[
        str | None, typer.Option(help="hf or harmony", show_default=RENDER_DEFAULT.format("hf"))
    ] = None,
    loss_on: Annotated[
        str, typer.Option(help="Loss mode, DATA not prepared: turns, last, assistant, final, all.")
    ] = "turns",
    date: Annotated[
        str | None,
        typer.Option(help="'Current date' (YYYY-MM-DD)", show_default=RENDER_DEFAULT.format("2025-08-05")),
    ] = None,
    reasoning_effort: Annotated[
        str | None, typer.Option(help="low, medium, high", show_default=RENDER_DEFAULT.format("medium"))
    ] = None,
    device: Annotated[str, typer.Option(help="auto (GPU if present), cpu, cuda.")] = "auto",
    dtype: Annotated[str, typer.Option(help="auto (bf16 on GPU, fp32 on CPU), bf16, fp32.")] = "auto",
) -> None:
    """Evaluate: loss on trained tokens (--data) or reasoning-language adherence (--reasoning-language).

    With --adapter, the base model and base + adapter are scored side by side.

    A prepared --data folder is scored as it was prepared: --template, --date, --reasoning-effort and --loss-on apply to data that is not prepared, and to the prompts of adherence mode."""  # noqa: E501
    if reasoning_language == (data is not None):
        raise GptossTuneError("Choose one mode: --data FILE (loss) or --reasoning-language (adherence).")
    options = _render_options(model, adapter, template, date, reasoning_effort)
    if data is not None:
        from gptoss_tune.data.prepare import PrepareOptions
        from gptoss_tune.eval.loss import evaluate_loss
        from gptoss_tune.eval.tables import loss_table

        prepare_options = PrepareOptions(
            template=options.template,
            date=options.date,
            reasoning_effort=options.reasoning_effort,
            loss_on=loss_on,
        )
        with progress_bar("evaluating") as advance:
            loss_report = evaluate_loss(model, data, adapter, prepare_options, device, dtype, advance)
        report = loss_report.to_dict()
        table = loss_table(loss_report)
    else:
        from gptoss_tune.eval.language import load_prompts, run_language_eval
        from gptoss_tune.eval.language import report as language_report
        from gptoss_tune.eval.tables import language_table
        from gptoss_tune.infer.generate import HfGenerator, SamplingOptions

        asked = [x.strip() for x in languages.split(",") if x.strip()] if languages else None
        items = load_prompts(prompts, asked)
        sampling = SamplingOptions(max_new_tokens, temperature, top_p, seed)
        with progress_bar("loading the model"):
            generator = HfGenerator(model, adapter, device=device, dtype=dtype)
        passes = 2 if generator.has_adapter else 1
        with progress_bar("generating", total=passes * len(items)) as advance:
            results = run_language_eval(generator, items, options, sampling, advance)
        settings = {
            "model": model,
            "adapter": str(adapter) if adapter else None,
            "prompts": prompts,
            "render": {
                "template": options.template,
                "date": options.date,
                "reasoning_effort": options.reasoning_effort,
            },
            "sampling": {
                "max_new_tokens": max_new_tokens,
                "temperature": temperature,
                "top_p": top_p,
                "seed": seed,
            },
            "identifier": "py3langid",
        }
        report = language_report(results, settings)
        table = language_table(report)
    if output == "-":  # JSON alone on stdout, the table on stderr
        err_console.print(table)
        sys.stdout.write(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
        return
    console.print(table)
    if output is not None:
        _write_json_report(Path(output), report)
        console.print(f"[bold]wrote[/bold] {output}")


@app.command()
def demo(
    output: Annotated[
        Path, typer.Option("--output", "-o", help="Folder for everything the demo writes.")
    ] = Path("runs/demo"),
    overwrite: Annotated[bool, typer.Option(help="Replace a previous demo in OUTPUT.")] = False,
    steps: Annotated[int, typer.Option(help="Training steps.")] = 80,
    lr: Annotated[float, typer.Option(help="Peak learning rate (cosine schedule).")] = 1e-2,
    conversations: Annotated[
        int, typer.Option(help="How many sample conversations to train on (1 to 3; the first is asked).")
    ] = 3,
    base: Annotated[
        Path | None, typer.Option(help="Start from this tiny checkpoint", show_default="initialize a new one")
    ] = None,
) -> None:
    """The whole pipeline offline on a CPU: tiny model, LoRA training, merge, chat (must reproduce).

    A random tiny gpt-oss is trained on conversations of the bundled sample, merged and asked a training
    prompt in greedy decoding; the demo exits with code 2 unless the answer is the trained one."""
    from gptoss_tune.infer.demo import DemoSettings, run_demo

    run_demo(
        DemoSettings(
            output=output, conversations=conversations, steps=steps, lr=lr, base=base, overwrite=overwrite
        ),
        console,
    )


def run_app() -> int:
    """Run the command line; returns its exit code (2 for a GptossTuneError, whose message is printed)."""
    try:
        app()
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            return exc.code or 0
        err_console.print(str(exc.code), highlight=False, soft_wrap=True)
        return 1
    except GptossTuneError as exc:
        err_console.print(Text.assemble(("error: ", "bold red"), str(exc)), highlight=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        err_console.print("interrupted")
        return 130
    return 0


def main() -> None:
    code = run_app()
    from gptoss_tune.train.launch import end_worker_process, launched_by_torchrun

    if launched_by_torchrun():
        end_worker_process(code)
    sys.exit(code)


if __name__ == "__main__":
    main()
