"""Terminal tables of the eval reports."""

from __future__ import annotations

from rich.table import Table

from gptoss_tune.eval.loss import LossReport, perplexity

MAX_EXAMPLE_ROWS = 20  # the JSON report has every example


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}" if value < 1e4 else f"{value:.3g}"


def loss_table(report: LossReport) -> Table:
    with_adapter = report.overall("adapter") is not None
    table = Table(title="loss on trained tokens", title_style="bold")
    for name in ("example", "source row", "turn", "trained tokens", "base loss", "base ppl"):
        table.add_column(name, justify="right")
    if with_adapter:
        table.add_column("adapter loss", justify="right")
        table.add_column("adapter ppl", justify="right")
    for example in report.examples[:MAX_EXAMPLE_ROWS]:
        row = [str(example.index), str(example.source_index), str(example.turn), str(example.trained_tokens)]
        row += [_number(example.base_loss), _number(perplexity(example.base_loss))]
        if with_adapter:
            row += [_number(example.adapter_loss), _number(perplexity(example.adapter_loss))]
        table.add_row(*row)
    if len(report.examples) > MAX_EXAMPLE_ROWS:
        table.add_row("...", *[""] * (len(table.columns) - 1))
    overall = ["all", "", "", str(report.trained_tokens)]
    for which in ("base", "adapter") if with_adapter else ("base",):
        loss = report.overall(which)
        overall += [_number(loss), _number(perplexity(loss))]
    table.add_row(*overall, style="bold")
    return table


def language_table(report: dict) -> Table:
    """Per asked language: the share of analyses written in it, per model."""
    scores = report["scores"]
    models = list(scores)
    table = Table(title="reasoning-language adherence", title_style="bold")
    table.add_column("language")
    table.add_column("prompts", justify="right")
    for model in models:
        table.add_column(f"{model}: in language", justify="right")
        table.add_column(f"{model}: detected", justify="left")
    languages = list(scores[models[0]]) if models else []
    for language in languages:
        first = scores[models[0]][language]
        row = [language, str(first["asked"])]
        for model in models:
            entry = scores[model][language]
            detected = list(entry["detected"].items())[:4]  # most common first
            row += [
                f"{entry['share']:.0%} ({entry['adherent']}/{entry['asked']})",
                ", ".join(f"{code} {n}" for code, n in detected),
            ]
        table.add_row(*row, style="bold" if language == "all" else None)
    return table
