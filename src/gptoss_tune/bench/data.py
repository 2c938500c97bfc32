"""Benchmark data: Multilingual-Thinking-shaped synthetic conversations, rendered and labeled by our
prepare pipeline, cut into the batches each recipe trains on.

- Padded batches (the transformers recipes): consecutive examples, as many as fit
  `tokens_per_batch` once padded to the longest, right-padded.
- Packed micro-batches (ours): whole examples packed best-fit into one row of at most
  `tokens_per_batch` tokens, positions restarting per example, every row padded to the same length
  (`BenchData.row_length`, a multiple of 128): compiled kernels see one shape, so warm-up compiles
  once. The padding is processed but not counted as real tokens (the trainer pads only to a
  multiple of 128). Bins less than half full are left out (see `packed_batches`).

The first batch is the same examples for every recipe (the "shared batch" the losses are compared
on); the rest of the stream is each recipe's own way of batching the same example sequence.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from gptoss_tune.data.load import SourceRow
from gptoss_tune.data.pack import MicroBatch, collate, plan_packing
from gptoss_tune.data.prepare import PrepareOptions, PrepareStats, build_examples
from gptoss_tune.data.synthetic import make_synthetic_rows
from gptoss_tune.errors import GptossTuneError
from gptoss_tune.harmony import tokens as T

Example = tuple[list[int], list[int]]  # (input_ids, labels)

PACK_MULTIPLE = 128
MEAN_EXAMPLE_TOKENS = 1100  # Multilingual-Thinking as rendered by the chat template


def synthetic_examples(rows: int, seed: int = 0) -> list[Example]:
    """`rows` synthetic Multilingual-Thinking conversations as (input_ids, labels) examples."""
    source = (
        SourceRow(file="synthetic", row=f"row {index + 1}", data=row)
        for index, row in enumerate(make_synthetic_rows(like="multilingual-thinking", rows=rows, seed=seed))
    )
    return [(e.input_ids, e.labels) for e in build_examples(source, PrepareOptions(), PrepareStats())]


def rows_for(tokens: int) -> int:
    """Enough synthetic rows to cover about `tokens` tokens, with margin."""
    return math.ceil(1.3 * tokens / MEAN_EXAMPLE_TOKENS) + 8


@dataclass(frozen=True)
class PaddedBatch:
    input_ids: Tensor  # [B, L], right-padded with <|endoftext|>
    attention_mask: Tensor  # [B, L], 1 on real tokens
    labels: Tensor  # [B, L], -100 on padding and untrained tokens
    lengths: tuple[int, ...]  # real length of each row

    @property
    def num_tokens(self) -> int:
        return sum(self.lengths)

    def to(self, device: torch.device | str) -> PaddedBatch:
        return PaddedBatch(
            self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device), self.lengths
        )


def pad_examples(examples: Sequence[Example]) -> PaddedBatch:
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), T.END_OF_TEXT, dtype=torch.long)
    labels = torch.full((len(examples), width), T.IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, (ids, example_labels) in enumerate(examples):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(ids)] = torch.tensor(example_labels)
        mask[row, : len(ids)] = 1
    return PaddedBatch(input_ids, mask, labels, tuple(len(ids) for ids, _ in examples))


def take_padded(examples: Sequence[Example], start: int, tokens_per_batch: int) -> int:
    """How many examples from `start` fit one padded batch (at least one)."""
    count, width = 0, 0
    for ids, _ in examples[start:]:
        width = max(width, len(ids))
        if (count + 1) * width > tokens_per_batch and count > 0:
            break
        count += 1
    return count


def padded_batches(examples: Sequence[Example], tokens_per_batch: int) -> Iterator[PaddedBatch]:
    """Consecutive padded batches, cycling over the examples forever."""
    start = 0
    while True:
        count = take_padded(examples, start, tokens_per_batch)
        if count == 0:
            start = 0
            continue
        yield pad_examples(examples[start : start + count])
        start += count


def packed_batches(
    examples: Sequence[Example], tokens_per_batch: int, row_length: int, seed: int = 0
) -> Iterator[MicroBatch]:
    """Best-fit packed micro-batches of the examples, in packing-plan order, cycling forever; each
    row padded to `row_length`. Bins less than half full (the last few of a best-fit packing) are
    left out while fuller ones exist: the trainer pads a row only to a multiple of 128, so such a
    bin is a short step there, but padded to the one row length here it would be timed as a full
    step of mostly padding."""
    lengths = [len(ids) for ids, _ in examples]
    plan = plan_packing(lengths, tokens_per_batch, seed)
    fill = [sum(lengths[i] for i in bin_) for bin_ in plan.bins]
    kept = {index for index, tokens in enumerate(fill) if 2 * tokens >= tokens_per_batch} or set(
        range(len(fill))
    )
    for epoch in itertools.count():
        for index in plan.epoch_order(epoch):
            if index in kept:
                yield collate([examples[i] for i in plan.bins[index]], row_length)


@dataclass(frozen=True)
class BenchData:
    """The shared first batch and the examples that follow it."""

    shared: list[Example]
    rest: list[Example]
    tokens_per_batch: int

    @property
    def row_length(self) -> int:
        """The length of every packed row: the budget (or the longest example), rounded up to 128."""
        longest = max(len(ids) for ids, _ in self.shared + self.rest)
        return -(-max(self.tokens_per_batch, longest) // PACK_MULTIPLE) * PACK_MULTIPLE

    def padded(self) -> Iterator[PaddedBatch]:
        return itertools.chain([pad_examples(self.shared)], padded_batches(self.rest, self.tokens_per_batch))

    def packed(self) -> Iterator[MicroBatch]:
        first = collate(self.shared, self.row_length)
        return itertools.chain([first], packed_batches(self.rest, self.tokens_per_batch, self.row_length))


def bench_data(tokens_per_batch: int, steps: int, seed: int = 0) -> BenchData:
    """Examples for `steps` batches of `tokens_per_batch` tokens (padded recipes included)."""
    examples = synthetic_examples(rows_for(2 * steps * tokens_per_batch), seed)
    if not examples:
        raise GptossTuneError("The synthetic data produced no example.")
    shared_count = take_padded(examples, 0, tokens_per_batch)
    return BenchData(examples[:shared_count], examples[shared_count:], tokens_per_batch)


def long_sequence(examples: Sequence[Example], length: int) -> MicroBatch:
    """One document of exactly `length` tokens: the examples' tokens and labels laid end to end
    (cycled as needed), positions 0..length-1, so attention spans the whole sequence."""
    ids: list[int] = []
    labels: list[int] = []
    for example_ids, example_labels in itertools.cycle(examples):
        ids.extend(example_ids)
        labels.extend(example_labels)
        if len(ids) >= length:
            break
    return collate([(ids[:length], labels[:length])])
