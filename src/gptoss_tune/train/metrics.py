"""Training metrics: metrics.jsonl (one line per logged step), TensorBoard events, the loss plot."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class MetricsLog:
    def __init__(self, output: Path, resume_step: int = 0, tensorboard: bool = True) -> None:
        self.path = output / "metrics.jsonl"
        self._truncate_after(resume_step)
        self.file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(output / "tensorboard"), purge_step=resume_step or None)
            except ImportError:  # tensorboard is optional
                self.writer = None

    def _truncate_after(self, step: int) -> None:
        """On resume, forget what a stopped run logged after its last checkpoint."""
        if not self.path.exists():
            return
        kept = [
            line
            for line in self.path.read_text().splitlines()
            if line and json.loads(line).get("step", 0) <= step
        ]
        self.path.write_text("".join(line + "\n" for line in kept))

    def log(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.writer is not None:
            prefix = "eval" if record.get("kind") == "eval" else "train"
            for key, value in record.items():
                if key not in ("step", "kind") and isinstance(value, int | float):
                    self.writer.add_scalar(f"{prefix}/{key}", value, record["step"])

    def close(self) -> None:
        self.file.close()
        if self.writer is not None:
            self.writer.close()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def plot_loss(metrics_path: Path, output: Path) -> Path | None:
    """loss.png: training loss per step (and eval loss when there is one)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in records if r.get("kind") == "train"]
    evals = [(r["step"], r["loss"]) for r in records if r.get("kind") == "eval"]
    if not train:
        return None
    figure, axis = plt.subplots(figsize=(7, 4), dpi=120)
    axis.plot(*zip(*train, strict=True), label="train", linewidth=1.2)
    if evals:
        axis.plot(*zip(*evals, strict=True), "o-", label="eval", linewidth=1.2)
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("loss (nats per trained token)")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(output)
    plt.close(figure)
    return output
