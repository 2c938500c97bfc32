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
            help="hf: the official chat template, token for token; harmony: openai-harmony's rendering."
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
    subset: Annotated[str | None, typer.Option(help="Configuration (subset) of a hub dataset.")] = None,
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
    rows: Annotated[int, typer.Option(help="Number of rows.")] = 1000,
    seed: Annotated[int, typer.Option(help="Random seed (same seed, same rows).")] = 0,
) -> None:
    """Write synthetic rows shaped like a real dataset (for benchmarks; random words, realistic lengths)."""
    from gptoss_tune.data.synthetic import make_synthetic_rows, write_jsonl

    path = write_jsonl(make_synthetic_rows(like=like, rows=rows, seed=seed), output)
    console.print(f"[bold]wrote[/bold] {path}: {rows} rows like {like} (seed {seed})")


# --- models --------------------------------------------------------------------------------------


@app.command("init-model")
def init_model(
    output: Annotated[Path, typer.Option("--output", "-o", help="Checkpoint folder to write.")],
    preset: Annotated[str, typer.Option(help="Architecture: tiny (CPU tests, demo), 20b, 120b.")] = "tiny",
    mxfp4: Annotated[
        bool, typer.Option(help="Store the experts in MXFP4, like the published checkpoints.")
    ] = False,
    seed: Annotated[int, typer.Option(help="Random seed of the weights.")] = 0,
    dtype: Annotated[str, typer.Option(help="Dtype of the non-MXFP4 weights: bf16 or fp32.")] = "bf16",
    overwrite: Annotated[bool, typer.Option(help="Replace OUTPUT if it exists.")] = False,
) -> None:
    """Write a complete gpt-oss checkpoint with random weights (config, safetensors, tokenizer, chat template)."""
    import torch

    from gptoss_tune.model.init import init_model as write_model

    dtypes = {"bf16": torch.bfloat16, "fp32": torch.float32}
    if dtype not in dtypes:
        raise GptossTuneError(f"Unknown --dtype '{dtype}': use bf16 or fp32.")
    path = write_model(preset, output, mxfp4=mxfp4, seed=seed, dtype=dtypes[dtype], overwrite=overwrite)
    console.print(
        f"[bold]wrote[/bold] {path}: random {preset} gpt-oss" + (" (MXFP4 experts)" if mxfp4 else "")
    )


# --- train ---------------------------------------------------------------------------------------


def _given_on_command_line(ctx: typer.Context, names: list[str]) -> dict:
    """Options the user typed (not defaults), so they override the recipe."""
    from click.core import ParameterSource

    return {
        name: ctx.params[name]
        for name in names
        if ctx.get_parameter_source(name) not in (ParameterSource.DEFAULT, None)
    }


@app.command()
def train(
    ctx: typer.Context,
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="YAML recipe; options given here override it.")
    ] = None,
    model: Annotated[
        str, typer.Option(help="Base model: local checkpoint folder or hub id (openai/gpt-oss-20b).")
    ] = "",
    data: Annotated[
        str,
        typer.Option(
            help="Prepared folder, or anything `prepare` accepts (prepared into "
            "OUTPUT/data with the options below)."
        ),
    ] = "",
    output: Annotated[
        str, typer.Option("--output", "-o", help="Run folder: adapter/, checkpoints/, metrics, loss.png.")
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
    subset: Annotated[str | None, typer.Option(help="Subset of a hub dataset.")] = None,
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
    warmup_ratio: Annotated[float, typer.Option(help="Share of the steps spent warming up linearly.")] = 0.03,
    min_lr_ratio: Annotated[float, typer.Option(help="Final learning rate as a share of --lr.")] = 0.0,
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay on the adapters.")] = 0.0,
    max_grad_norm: Annotated[float, typer.Option(help="Clip the gradient norm to this.")] = 1.0,
    seed: Annotated[int, typer.Option(help="Seed for adapters, data order and dropout.")] = 0,
    device: Annotated[str, typer.Option(help="auto (GPU if present), cpu, cuda.")] = "auto",
    dtype: Annotated[str, typer.Option(help="auto (bf16 on GPU, fp32 on CPU), bf16, fp32.")] = "auto",
    gradient_checkpointing: Annotated[
        bool, typer.Option(help="Recompute layer activations in backward.")
    ] = False,
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
    from gptoss_tune.train.dist import launched_by_torchrun

    if resolved.gpus > 1 and not launched_by_torchrun():
        from gptoss_tune.train.launch import launch_torchrun

        raise typer.Exit(launch_torchrun(resolved.gpus))
    from gptoss_tune.train.run import run_training

    run_training(resolved, console)


def main() -> None:
    try:
        app()
    except GptossTuneError as exc:
        err_console.print(Text.assemble(("error: ", "bold red"), str(exc)), highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
