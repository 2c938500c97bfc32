"""Packing: best-fit bins, collation, and that a packed micro-batch trains like each example alone."""

from __future__ import annotations

import random

import torch

from gptoss_tune.data.pack import best_fit_bins, collate, trained_targets
from gptoss_tune.harmony import tokens as T
from gptoss_tune.model.gpt_oss import GptOss
from gptoss_tune.model.presets import preset_config


def test_best_fit_places_every_example_once_within_capacity():
    rng = random.Random(0)
    lengths = [rng.randint(1, 900) for _ in range(300)] + [1500]  # one longer than the budget
    bins = best_fit_bins(lengths, 1024)
    placed = sorted(i for b in bins for i in b)
    assert placed == list(range(len(lengths)))
    for b in bins:
        assert sum(lengths[i] for i in b) <= 1024 or len(b) == 1
    # best fit packs densely: few bins beyond the lower bound
    assert len(bins) <= sum(lengths) / 1024 * 1.1 + 2
    assert bins == best_fit_bins(lengths, 1024)


def test_collate_restarts_positions_and_counts_targets():
    a = ([1, 2, 3], [-100, 2, 3])
    b = ([4, 5], [-100, 5])
    batch = collate([a, b], pad_to_multiple=8)
    assert batch.input_ids.tolist() == [[1, 2, 3, 4, 5, T.END_OF_TEXT, T.END_OF_TEXT, T.END_OF_TEXT]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 0, 1, 0, 1, 2]]
    assert batch.labels.tolist()[0][5:] == [-100] * 3
    assert batch.num_trained == trained_targets(a[1]) + trained_targets(b[1]) == 3
    assert batch.num_tokens == 5


def random_model() -> GptOss:
    torch.manual_seed(0)
    model = GptOss(preset_config("tiny")).float()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    return model.eval()


def test_packed_batch_gives_each_example_its_own_loss():
    model = random_model()
    window = model.config.sliding_window
    rng = random.Random(1)
    examples = []
    for length in (window + 5, 7, 2 * window + 3):
        ids = [rng.randrange(1000, 5000) for _ in range(length)]
        labels = [t if rng.random() < 0.6 else -100 for t in ids]
        examples.append((ids, labels))
    with torch.no_grad():
        alone = []
        for example in examples:
            single = collate([example])
            total, count = model.loss(single.input_ids, single.labels, single.position_ids)
            alone.append((float(total), int(count)))
        packed = collate(examples, pad_to_multiple=16)
        total, count = model.loss(packed.input_ids, packed.labels, packed.position_ids)
    assert int(count) == sum(c for _, c in alone) == packed.num_trained
    torch.testing.assert_close(float(total), sum(t for t, _ in alone), rtol=1e-5, atol=1e-5)
