"""`gptoss-tune train` on the terminal: a progress bar while training, a summary at the end."""

from __future__ import annotations

import os

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from gptoss_tune.config import TrainConfig
from gptoss_tune.train.launch import launched_by_torchrun
from gptoss_tune.train.loop import TrainResult, train


def run_training(config: TrainConfig, console: Console) -> TrainResult:
    quiet = launched_by_torchrun() and int(os.environ["RANK"]) != 0  # only rank 0 draws and summarizes
    columns = [
        TextColumn("[bold]train[/bold]"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[stats]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    ]
    with Progress(*columns, console=console, disable=quiet) as bar:
        task = bar.add_task("train", total=None, stats="")

        def progress(done: int, total: int, record: dict) -> None:
            stats = f"loss {record['loss']:.4f}  lr {record['lr']:.2e}  {record['tokens_per_s']:,.0f} tok/s"
            if "peak_gib" in record:
                stats += f"  peak {record['peak_gib']:.1f} GiB"
            bar.update(task, completed=done, total=total, stats=stats)

        result = train(config, log=lambda text: bar.console.print(text), progress=progress)
    if not quiet:
        console.print(summary_table(result))
    return result


def summary_table(result: TrainResult) -> Table:
    table = Table(title="training done", show_header=False, title_style="bold")
    fmt = lambda x: "-" if x is None else f"{x:.4f}"  # noqa: E731
    table.add_row("steps", str(result.steps))
    table.add_row("tokens (trained)", f"{result.tokens:,} ({result.trained_tokens:,})")
    table.add_row("time", f"{result.seconds:.1f} s")
    table.add_row("loss first -> last", f"{fmt(result.first_loss)} -> {fmt(result.final_loss)}")
    if result.eval_loss is not None:
        table.add_row("eval loss", fmt(result.eval_loss))
    for name, path in result.files.items():
        table.add_row(name, str(path))
    return table
