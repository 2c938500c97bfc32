"""The benchmark's table: markdown for people and docs/benchmarks.md, JSON for machines."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from gptoss_tune.bench.run import LOSS_GAP_TOLERANCE, BenchReport, RecipeResult
from gptoss_tune.files import atomic_file

RESULTS_JSON = "bench.json"
RESULTS_MARKDOWN = "bench.md"


def _number(value: float | None, digits: int = 0, suffix: str = "") -> str:
    if value is None:
        return "–"
    return f"{value:,.{digits}f}{suffix}"


def _ratio(result: RecipeResult, baseline: RecipeResult | None) -> str:
    if baseline is None or not (result.tokens_per_s and baseline.tokens_per_s):
        return "–"
    return f"{result.tokens_per_s / baseline.tokens_per_s:.2f}x"


def _loss_gap(result: RecipeResult, tolerance: float) -> str:
    if result.loss_gap is None:
        return "–"
    flag = "" if result.loss_gap <= tolerance else " (disagrees)"
    return f"{result.loss_gap:.4f}{flag}"


def loss_gap_tolerance(results: list[RecipeResult]) -> float:
    """LOSS_GAP_TOLERANCE, or 1.5 x the gap between stock and cookbook when both ran: the two
    transformers recipes compute the same function, so their gap is the bf16 noise of this run
    (it grows with depth: 0.15 at 4 layers, 0.26 at 24 on random weights)."""
    stock = _baseline(results, "stock")
    if stock is not None and stock.loss_gap is not None and _baseline(results, "cookbook") is not None:
        return max(LOSS_GAP_TOLERANCE, 1.5 * stock.loss_gap)
    return LOSS_GAP_TOLERANCE


def _baseline(results: list[RecipeResult], name: str) -> RecipeResult | None:
    return next((r for r in results if r.recipe == name and r.ok and r.length is None), None)


def throughput_table(results: list[RecipeResult]) -> str:
    cookbook, stock = _baseline(results, "cookbook"), _baseline(results, "stock")
    tolerance = loss_gap_tolerance(results)
    header = (
        "| recipe | status | real tok/s | MFU | peak GiB | first-step loss | shared-batch loss "
        "| per-token loss gap | vs cookbook | vs stock | checkpointed layers | padding |"
    )
    lines = [header, "|" + "---|" * 12]
    for r in results:
        lines.append(
            f"| {r.recipe} | {r.status} | {_number(r.tokens_per_s)} | {_number(r.mfu and 100 * r.mfu, 1, '%')} "
            f"| {_number(r.peak_gib, 1)} | {_number(r.first_loss, 4)} | {_number(r.shared_loss, 4)} "
            f"| {_loss_gap(r, tolerance)} | {_ratio(r, cookbook)} | {_ratio(r, stock)} "
            f"| {r.notes.get('checkpointed_layers', '–')} | {_number(r.padding_fraction and 100 * r.padding_fraction, 1, '%')} |"
        )
    return "\n".join(lines)


def long_context_table(results: list[RecipeResult]) -> str:
    lines = [
        "| recipe | length | status | real tok/s | MFU | peak GiB | checkpointed layers |",
        "|" + "---|" * 7,
    ]
    for r in results:
        lines.append(
            f"| {r.recipe} | {r.length:,} | {r.status} | {_number(r.tokens_per_s)} "
            f"| {_number(r.mfu and 100 * r.mfu, 1, '%')} | {_number(r.peak_gib, 1)} "
            f"| {r.notes.get('checkpointed_layers', '–')} |"
        )
    return "\n".join(lines)


def components_table(components: list[dict]) -> str:
    lines = ["| component (fwd + bwd) | tokens | ms | peak MiB |", "|---|---|---|---|"]
    for c in components:
        ms = c.get("status") or _number(c["ms"], 2)
        lines.append(f"| {c['component']} | {c['tokens']:,} | {ms} | {_number(c['peak_mib'])} |")
    return "\n".join(lines)


def _experts(meta: dict) -> str:
    if meta.get("expert_storage", "bf16") == "mxfp4":
        return "experts stored MXFP4 (expert storage mxfp4)"
    return f"experts dense {meta['dtype']} (expert storage bf16)"


def _kernel_packages(meta: dict) -> str:
    """ ", flash-attn-4 4.0.0b36, quack-kernels 0.6.5" for the optional kernel packages installed."""
    return "".join(f", {name} {version}" for name, version in meta.get("kernel_packages", {}).items())


def _recomputed(meta: dict) -> str:
    if meta.get("recompute", "layers") == "auto":
        return "its norms' outputs, then whole layers or only their experts' gate_up (least measured time),"
    return "its norms' outputs, then whole layers,"


def _memory_policy(meta: dict) -> str:
    if not meta["memory_budget_gib"]:
        return "ours checkpoints no layer; "
    if meta["device"] == "cpu":
        return "ours checkpoints every layer (a memory plan needs a GPU); "
    return f"ours recomputes {_recomputed(meta)} as a {meta['memory_budget_gib']} GiB budget needs; "


def describe_meta(meta: dict) -> str:
    lines = [
        f"{meta['device']}, torch {meta['torch']} (CUDA {meta['cuda']}), transformers {meta['transformers']}, "
        f"peft {meta['peft']}{_kernel_packages(meta)}; {meta['date']}.",
        f"Model: gpt-oss-{meta['preset']} shape, {meta['layers']} layers, random {meta['dtype']} weights, "
        f"{_experts(meta)} ({meta['weights_gib']} GiB); LoRA {meta['lora']}.",
        (
            "one sequence of each length"
            if meta.get("long_context")
            else f"{meta['tokens_per_batch']:,} tokens per micro-batch"
        )
        + f", {meta['warmup']} warm-up (plus one per new padded shape) + {meta['steps']} timed steps; "
        + _memory_policy(meta)
        + (
            f"MFU against {meta['peak_tflops']} TFLOP/s (bf16 dense), FLOPs as in bench/flops.py."
            if meta["peak_tflops"]
            else "no MFU (unknown peak; pass --peak-tflops)."
        ),
    ]
    if meta.get("loss_reference"):
        lines.append(f"Per-token loss gap: mean |loss - {meta['loss_reference']}'s| on the shared batch.")
    return "\n".join(lines)


def markdown(report: BenchReport) -> str:
    long_context = any(r.length is not None for r in report.results)
    table = long_context_table(report.results) if long_context else throughput_table(report.results)
    notes = [
        f"Kernels of {r.recipe}: {r.notes['kernels']}." for r in report.results if r.notes.get("kernels")
    ]
    notes += [
        f"{r.description}." for r in report.results if r.recipe in ("stock", "cookbook") and r.description
    ]
    notes += [
        f"Memory plan of {r.recipe}{'' if r.length is None else f' at {r.length:,} tokens'}: {r.notes['memory_plan']}."
        for r in report.results
        if r.notes.get("memory_plan")
    ]
    parts = [describe_meta(report.meta), *notes, "", table]
    if report.components:
        parts += ["", components_table(report.components)]
    return "\n".join(parts) + "\n"


def _write_atomically(path: Path, text: str) -> None:
    with atomic_file(path) as handle:
        handle.write(text)


def write_results(report: BenchReport, directory: Path) -> tuple[Path, Path]:
    """bench.json and bench.md in `directory`."""
    payload = {
        "meta": report.meta,
        "results": [asdict(r) for r in report.results],
        "components": report.components,
    }
    json_path, markdown_path = directory / RESULTS_JSON, directory / RESULTS_MARKDOWN
    _write_atomically(json_path, json.dumps(payload, indent=2, default=str) + "\n")
    _write_atomically(markdown_path, markdown(report))
    return json_path, markdown_path


def record(report: BenchReport, command: str, path: Path) -> Path:
    """Append the run (date, GPU, versions, command, table) to the benchmarks document."""
    meta = report.meta
    heading = (
        f"### {meta['date']} — {meta['device']}, torch {meta['torch']}, transformers {meta['transformers']}"
    )
    heading = f"{heading}, peft {meta['peft']}"
    if meta.get("expert_storage", "bf16") != "bf16":
        heading = f"{heading} — {meta['expert_storage']} experts"
    section = f"\n{heading}\n\n```\n{command}\n```\n\n{markdown(report)}"
    existing = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    _write_atomically(path, existing.rstrip("\n") + "\n" + section)
    return path
