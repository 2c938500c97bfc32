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
        str | None, typer.Option(help="Split of a hub dataset or DatasetDict folder [default: train]")
    ] = None,
    subset: Annotated[str | None, typer.Option(help="Configuration (subset) of a hub dataset.")] = None,
    max_length: Annotated[
        int | None, typer.Option(help="Drop examples longer than this many tokens [default: no limit]")
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
