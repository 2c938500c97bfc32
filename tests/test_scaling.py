"""The scaling benchmark's pieces: the train command it runs, its tables, reading metrics."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from gptoss_tune.bench.run import BenchOptions, bench_config
from gptoss_tune.bench.scaling import (
    ScalingRow,
    adapter_difference,
    equivalence_table,
    read_metrics,
    run_scaling,
    scaling_table,
    train_command,
    write_bench_checkpoint,
)
from gptoss_tune.errors import GptossTuneError
from gptoss_tune.model.checkpoint import load_checkpoint


def test_train_command_uses_the_product_launcher(tmp_path):
    command = train_command(tmp_path / "m", tmp_path / "d.jsonl", tmp_path / "o", 4, 1, 16384, 9, 60.0)
    assert command[1:4] == ["-m", "gptoss_tune", "train"]
    text = " ".join(command)
    assert "--gpus 4" in text and "--grad-accum 1" in text and "--max-steps 9" in text
    assert "--memory-budget-gib 60.0" in text
    assert "--gradient-checkpointing" in train_command(tmp_path, tmp_path, tmp_path, 1, 2, 8, 4, None)
    fsdp = " ".join(train_command(tmp_path, tmp_path, tmp_path, 2, 1, 8, 4, 60.0, "fsdp", "bf16"))
    # FSDP does not plan checkpointing against a budget: it checkpoints every layer
    assert "--sharding fsdp" in fsdp and "--expert-storage bf16" in fsdp
    assert "--gradient-checkpointing" in fsdp and "--memory-budget-gib" not in fsdp


def test_read_metrics_skips_warmup(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    lines = [
        {"kind": "train", "step": i, "loss": 10 - i, "tokens_per_s": 100.0 * i, "peak_gib": 1.0 + i % 3}
        for i in range(1, 7)
    ]
    lines.insert(3, {"kind": "eval", "step": 3, "loss": 1.0})
    metrics.write_text("".join(json.dumps(line) + "\n" for line in lines))
    speeds, losses, peak = read_metrics(metrics)
    assert speeds == [400.0, 500.0, 600.0] and losses == [9, 8, 7, 6, 5, 4] and peak == 3.0


def test_bench_checkpoint_is_drawn_at_load(tmp_path):
    config = bench_config("tiny", 2)
    path = write_bench_checkpoint(config, tmp_path / "model", seed=3)
    assert not list(path.glob("*.safetensors"))
    first = load_checkpoint(path, torch.float32, "cpu", "bf16")
    second = load_checkpoint(path, torch.float32, "cpu", "bf16")
    assert first.config.num_hidden_layers == 2
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_adapter_difference(tmp_path):
    for name, scale in (("a", 1.0), ("b", 1.01)):
        (tmp_path / name).mkdir()
        tensors = {"x.lora_A.weight": torch.ones(4, 2) * scale, "x.lora_B.weight": torch.ones(2, 4)}
        save_file(tensors, tmp_path / name / "adapter_model.safetensors")
    difference = adapter_difference(tmp_path / "a", tmp_path / "b")
    assert difference == pytest.approx(0.01 * 8**0.5 / 16**0.5, rel=1e-6)
    assert adapter_difference(tmp_path / "a", tmp_path / "a") == 0


def test_fsdp_scaling_needs_several_gpus(tmp_path):
    options = BenchOptions(preset="tiny", sharding="fsdp")
    with pytest.raises(GptossTuneError, match="leave 1 out"):
        run_scaling(options, (1, 2), tmp_path, equivalence=False, log=print)


def test_tables():
    rows = [
        ScalingRow(1, 1, "ok", 1000.0, 1000.0, 1.0, [2.0, 1.0], 40.0),
        ScalingRow(2, 1, "ok", 1960.0, 980.0, 1.96, [2.0, 1.5], 41.5),
        ScalingRow(1, 2, "ok", 900.0, 900.0, None, [2.0, 1.25]),
    ]
    table = scaling_table(rows)
    assert "| 2 | ddp | 1 | ok | 1,960 | 980 | 1.96x | 41.5 |" in table
    assert "| 1 | ddp | 2 | ok | 900 | 900 | - | - |" in table
    equivalence = equivalence_table(rows)
    assert "| 2 | 1.50000 | 1.25000 | 2.50e-01 |" in equivalence
    assert equivalence_table(rows[:2]) is None
