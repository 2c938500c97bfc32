"""Pack whole examples into micro-batches of at most `tokens_per_batch` tokens (best-fit decreasing).

A micro-batch is one row: its examples one after the other, positions restarting at 0 for each, so
the model keeps them apart (no attention across examples, no target across a boundary). An example
longer than the budget gets a micro-batch of its own.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import numpy as np
import torch

from gptoss_tune.harmony import tokens as T


@dataclass(frozen=True)
class MicroBatch:
    input_ids: torch.Tensor  # [1, L] int64
    labels: torch.Tensor  # [1, L] int64, -100 where not trained
    position_ids: torch.Tensor  # [1, L] int64, restarting at 0 for each example
    num_trained: int  # trained targets after the shift: what the loss sums over
    num_tokens: int  # real (non-padding) tokens

    def to(self, device: torch.device | str) -> MicroBatch:
        return MicroBatch(
            self.input_ids.to(device),
            self.labels.to(device),
            self.position_ids.to(device),
            self.num_trained,
            self.num_tokens,
        )


def best_fit_bins(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices of examples grouped into bins of total length <= capacity (best-fit decreasing).

    Deterministic: ties keep the input order.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (remaining capacity, bin index), sorted
    for i in order:
        slot = bisect.bisect_left(free, (lengths[i], -1))
        if slot < len(free):
            remaining, b = free.pop(slot)
            bins[b].append(i)
            remaining -= lengths[i]
        else:
            bins.append([i])
            b, remaining = len(bins) - 1, capacity - lengths[i]
        if remaining > 0:
            bisect.insort(free, (remaining, b))
    return [sorted(b) for b in bins]


def trained_targets(labels: list[int]) -> int:
    """Targets the shifted loss sees: labels[1:] that are trained (the first token is never a target)."""
    return sum(1 for label in labels[1:] if label != T.IGNORE_INDEX)


def collate(examples: list[tuple[list[int], list[int]]], pad_to_multiple: int = 1) -> MicroBatch:
    """One packed row from (input_ids, labels) pairs; padding (if any) is its own untrained document."""
    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    trained = 0
    for example_ids, example_labels in examples:
        ids.extend(example_ids)
        labels.extend(example_labels)
        positions.extend(range(len(example_ids)))
        trained += trained_targets(example_labels)
    real = len(ids)
    padding = -real % pad_to_multiple
    ids.extend([T.END_OF_TEXT] * padding)
    labels.extend([T.IGNORE_INDEX] * padding)
    positions.extend(range(padding))

    def row(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long).unsqueeze(0)

    return MicroBatch(row(ids), row(labels), row(positions), trained, real)


@dataclass(frozen=True)
class PackPlan:
    """Which examples go in which micro-batch, and the micro-batch order of each epoch."""

    bins: list[list[int]]
    seed: int

    def epoch_order(self, epoch: int) -> list[int]:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.bins)).tolist()


def plan_packing(lengths: list[int], tokens_per_batch: int, seed: int) -> PackPlan:
    return PackPlan(best_fit_bins(lengths, tokens_per_batch), seed)
