"""Training data: a prepared folder (or anything `prepare` accepts, prepared into OUT/data), split
into train and eval examples, and the packing plan that turns them into micro-batches."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from gptoss_tune.config import TrainConfig
from gptoss_tune.data.pack import MicroBatch, PackPlan, collate, plan_packing, trained_targets
from gptoss_tune.data.prepare import PrepareOptions, is_prepared, prepare, read_prepare_info
from gptoss_tune.errors import GptossTuneError

Example = tuple[list[int], list[int]]  # (input_ids, labels)


def prepare_options(config: TrainConfig) -> PrepareOptions:
    return PrepareOptions(
        template=config.template,
        date=config.date,
        reasoning_effort=config.reasoning_effort,
        loss_on=config.loss_on,
        format=config.format,
        max_length=config.max_length,
        split=config.split,
        subset=config.subset,
    )


def ensure_prepared(source: str, prepared_dir: Path, config: TrainConfig) -> Path:
    """`source` itself when it is a prepared folder; else prepare it once into `prepared_dir`."""
    if is_prepared(source):
        return Path(source)
    options = prepare_options(config)
    if is_prepared(prepared_dir):  # a resumed run reuses what it prepared
        info = read_prepare_info(prepared_dir)
        if info["source"] == str(source) and info["options"] == asdict(options):
            return prepared_dir
    prepare(source, prepared_dir, options, overwrite=True)
    return prepared_dir


def load_examples(prepared: Path) -> tuple[list[Example], list[int]]:
    """(examples, source_index of each)."""
    import datasets

    dataset = datasets.load_from_disk(str(prepared)).with_format("python")
    return list(zip(dataset["input_ids"], dataset["labels"], strict=True)), list(dataset["source_index"])


def split_eval(
    examples: list[Example], sources: list[int], fraction: float, seed: int
) -> tuple[list[Example], list[Example]]:
    """Hold out a fraction of the conversations (all turns of a conversation stay on one side)."""
    if fraction <= 0:
        return examples, []
    conversations = sorted(set(sources))
    held = max(1, round(fraction * len(conversations)))
    if held >= len(conversations):
        raise GptossTuneError(f"--eval-fraction {fraction} leaves no conversation to train on.")
    chosen = set(np.random.default_rng(seed).permutation(conversations)[:held].tolist())
    train = [e for e, s in zip(examples, sources, strict=True) if s not in chosen]
    held_out = [e for e, s in zip(examples, sources, strict=True) if s in chosen]
    return train, held_out


@dataclass
class Schedule:
    """Which micro-batches each optimizer step uses, on each rank.

    Every rank knows the whole plan, so the number of trained tokens of a step (the loss's
    denominator) is known everywhere without communication.
    """

    plan: PackPlan
    examples: list[Example]
    grad_accum: int
    world_size: int
    epochs: int
    max_steps: int | None

    @property
    def batches_per_step(self) -> int:
        return self.grad_accum * self.world_size

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.plan.bins) / self.batches_per_step)

    @property
    def total_steps(self) -> int:
        return self.max_steps if self.max_steps is not None else self.epochs * self.steps_per_epoch

    def step_bins(self, step: int) -> list[list[int]]:
        epoch, within = divmod(step, self.steps_per_epoch)
        order = self.plan.epoch_order(epoch)
        chosen = order[within * self.batches_per_step : (within + 1) * self.batches_per_step]
        return [self.plan.bins[b] for b in chosen]

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    @cached_property
    def trained_counts(self) -> list[int]:
        """Trained targets of each example, counted once."""
        return [trained_targets(labels) for _, labels in self.examples]

    def step_trained_tokens(self, step: int) -> int:
        return sum(self.trained_counts[i] for bin_ in self.step_bins(step) for i in bin_)

    def rank_batches(self, step: int, rank: int, pad_to_multiple: int = 1) -> list[MicroBatch]:
        bins = self.step_bins(step)[rank :: self.world_size]
        return [collate([self.examples[i] for i in bin_], pad_to_multiple) for bin_ in bins]


def make_schedule(examples: list[Example], config: TrainConfig, world_size: int) -> Schedule:
    if not examples:
        raise GptossTuneError("No training example (after the eval split).")
    plan = plan_packing([len(ids) for ids, _ in examples], config.tokens_per_batch, config.seed)
    return Schedule(plan, examples, config.grad_accum, world_size, config.epochs, config.max_steps)


def eval_batches(examples: list[Example], tokens_per_batch: int) -> list[MicroBatch]:
    plan = plan_packing([len(ids) for ids, _ in examples], tokens_per_batch, seed=0)
    return [collate([examples[i] for i in bin_]) for bin_ in plan.bins]
