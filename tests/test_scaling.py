"""The scaling benchmark's pieces: the train command it runs, its tables, reading metrics."""

from __future__ import annotations

import json

from gptoss_tune.bench.scaling import ScalingRow, equivalence_table, scaling_table, step_speeds, train_command


def test_train_command_uses_the_product_launcher(tmp_path):
    command = train_command(tmp_path / "m", tmp_path / "d.jsonl", tmp_path / "o", 4, 1, 16384, 9, 60.0)
    assert command[1:4] == ["-m", "gptoss_tune", "train"]
    text = " ".join(command)
    assert "--gpus 4" in text and "--grad-accum 1" in text and "--max-steps 9" in text
    assert "--memory-budget-gib 60.0" in text
    assert "--gradient-checkpointing" in train_command(tmp_path, tmp_path, tmp_path, 1, 2, 8, 4, None)


def test_step_speeds_skip_warmup(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    lines = [{"kind": "train", "step": i, "loss": 10 - i, "tokens_per_s": 100.0 * i} for i in range(1, 7)]
    lines.insert(3, {"kind": "eval", "step": 3, "loss": 1.0})
    metrics.write_text("".join(json.dumps(line) + "\n" for line in lines))
    speeds, losses = step_speeds(metrics)
    assert speeds == [400.0, 500.0, 600.0] and losses == [9, 8, 7, 6, 5, 4]


def test_tables():
    rows = [
        ScalingRow(1, 1, "ok", 1000.0, 1000.0, 1.0, [2.0, 1.0]),
        ScalingRow(2, 1, "ok", 1960.0, 980.0, 1.96, [2.0, 1.5]),
        ScalingRow(1, 2, "ok", 900.0, 900.0, None, [2.0, 1.25]),
    ]
    table = scaling_table(rows)
    assert "| 2 | 1 | ok | 1,960 | 980 | 1.96x |" in table and "| 1 | 2 | ok | 900 | 900 | - |" in table
    equivalence = equivalence_table(rows)
    assert "| 2 | 1.50000 | 1.25000 | 2.50e-01 |" in equivalence
    assert equivalence_table(rows[:2]) is None
