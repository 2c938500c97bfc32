"""Held-out loss and perplexity on trained tokens only (the labels `prepare` wrote), per example and
overall, for the base model and, when an adapter is given, base + adapter side by side.

The overall loss is the mean over every trained token (not a mean of example means), as in training.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from gptoss_tune.data.pack import trained_targets
from gptoss_tune.data.prepare import PrepareOptions, is_prepared, prepare
from gptoss_tune.devices import pick_device, pick_dtype
from gptoss_tune.errors import GptossTuneError
from gptoss_tune.model.checkpoint import load_checkpoint
from gptoss_tune.model.gpt_oss import GptOss
from gptoss_tune.model.lora import load_adapter


@dataclass(frozen=True)
class EvalExample:
    input_ids: list[int]
    labels: list[int]
    source_index: int
    turn: int


@dataclass(frozen=True)
class ExampleLoss:
    index: int
    source_index: int
    turn: int
    tokens: int
    trained_tokens: int
    base_loss: float
    adapter_loss: float | None = None


def perplexity(loss: float | None) -> float | None:
    if loss is None:
        return None
    return math.exp(loss) if loss < 700 else math.inf


@dataclass(frozen=True)
class LossReport:
    examples: list[ExampleLoss]

    @property
    def trained_tokens(self) -> int:
        return sum(e.trained_tokens for e in self.examples)

    def overall(self, which: str) -> float | None:
        """Token-weighted mean loss of `base` or `adapter`."""
        losses = [getattr(e, f"{which}_loss") for e in self.examples]
        if any(loss is None for loss in losses) or not self.trained_tokens:
            return None
        return sum(loss * e.trained_tokens for loss, e in zip(losses, self.examples, strict=True)) / (
            self.trained_tokens
        )

    def to_dict(self) -> dict:
        overall = {"examples": len(self.examples), "trained_tokens": self.trained_tokens}
        for which in ("base", "adapter"):
            loss = self.overall(which)
            if loss is not None:
                overall[which] = {"loss": loss, "perplexity": perplexity(loss)}
        examples = []
        for example in self.examples:
            row = asdict(example)
            row["base_perplexity"] = perplexity(example.base_loss)
            if example.adapter_loss is None:
                row.pop("adapter_loss")
            else:
                row["adapter_perplexity"] = perplexity(example.adapter_loss)
            examples.append(row)
        return {"overall": overall, "examples": examples}


def load_eval_examples(data: str, options: PrepareOptions) -> list[EvalExample]:
    """A prepared folder as is; anything `prepare` accepts is prepared (into a temporary folder)."""
    import datasets

    def read(folder: Path) -> list[EvalExample]:
        dataset = datasets.load_from_disk(str(folder)).with_format("python")
        columns = zip(
            dataset["input_ids"], dataset["labels"], dataset["source_index"], dataset["turn"], strict=True
        )
        return [EvalExample(*row) for row in columns]

    if is_prepared(data):
        return read(Path(data))
    with tempfile.TemporaryDirectory() as scratch:
        prepared = Path(scratch) / "prepared"
        prepare(data, prepared, options)
        return read(prepared)


@torch.no_grad()
def example_losses(
    model: GptOss, examples: list[EvalExample], device: torch.device, on_example: Callable[[], None]
) -> list[float]:
    """Mean loss over each example's trained tokens."""
    model.eval()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    losses = []
    for example in examples:
        input_ids = torch.tensor([example.input_ids], device=device)
        labels = torch.tensor([example.labels], device=device)
        with autocast:
            total, count = model.loss(input_ids, labels)
        losses.append(float(total) / max(int(count), 1))
        on_example()
    return losses


def evaluate_loss(
    model: str | Path,
    data: str,
    adapter: str | Path | None = None,
    options: PrepareOptions | None = None,
    device: str = "auto",
    dtype: str = "auto",
    on_example: Callable[[], None] = lambda: None,
) -> LossReport:
    """Loss of `model` (and of `model` + `adapter`) on the trained tokens of `data`.

    `on_example` is called after each example of each pass (2 passes with an adapter)."""
    examples = load_eval_examples(data, options or PrepareOptions())
    if not examples:
        raise GptossTuneError(f"{data}: no example to evaluate.")
    torch_device = pick_device(device)
    network = load_checkpoint(model, dtype=pick_dtype(dtype, torch_device), device=torch_device)
    base = example_losses(network, examples, torch_device, on_example)
    adapted: list[float | None] = [None] * len(examples)
    if adapter is not None:
        load_adapter(network, adapter)
        adapted = example_losses(network, examples, torch_device, on_example)
    return LossReport(
        [
            ExampleLoss(
                index=i,
                source_index=e.source_index,
                turn=e.turn,
                tokens=len(e.input_ids),
                trained_tokens=trained_targets(e.labels),
                base_loss=base_loss,
                adapter_loss=adapter_loss,
            )
            for i, (e, base_loss, adapter_loss) in enumerate(zip(examples, base, adapted, strict=True))
        ]
    )
