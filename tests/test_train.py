"""The training loop on CPU: outputs, loss normalization, exact resume, NaN stop, untrained adapters, DDP."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gptoss_tune.config import TrainConfig, resolve_config
from gptoss_tune.errors import GptossTuneError
from gptoss_tune.model.init import init_model
from gptoss_tune.train.data import load_examples
from gptoss_tune.train.loop import train


def config(tiny_model_dir, data, output, **overrides) -> TrainConfig:
    values = dict(
        model=str(tiny_model_dir),
        data=str(data),
        output=str(output),
        tokens_per_batch=256,
        lr=5e-3,
        lora_rank=4,
        lora_alpha=8,
        warmup_ratio=0.0,
        seed=0,
    )
    values.update(overrides)
    return TrainConfig(**values).validate()


def adapter_tensors(run_dir):
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def test_training_writes_adapter_metrics_plot_and_lowers_the_loss(tiny_model_dir, short_chats, tmp_path):
    result = train(config(tiny_model_dir, short_chats, tmp_path / "run", epochs=6), log=lambda _: None)
    out = tmp_path / "run"
    for name in (
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
        "metrics.jsonl",
        "loss.png",
        "config.yaml",
        f"checkpoints/step-{result.steps}/optimizer.pt",
    ):
        assert (out / name).is_file(), name
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, result.steps + 1))
    assert result.final_loss < 0.8 * result.first_loss
    assert result.trained_tokens == sum(r["trained_tokens"] for r in records)


def test_step_loss_is_the_mean_over_all_trained_tokens_not_a_mean_of_means(tiny_model_dir, tmp_path):
    """Through the training loop: one step of several packed micro-batches (gradient accumulation)
    has the loss, gradient norm and update of one micro-batch holding them all. The answers differ in
    length, so a mean of per-batch means would weigh their tokens differently."""
    from gptoss_tune.data.prepare import PrepareOptions, prepare

    rows = [
        {
            "messages": [
                {"role": "user", "content": f"Count to {i}"},
                {"role": "assistant", "content": "one " * i},
            ]
        }
        for i in (1, 2, 4, 8, 16, 24, 32, 40)
    ]
    source = tmp_path / "counts.jsonl"
    source.write_text("".join(json.dumps(row) + "\n" for row in rows))
    prepare(str(source), tmp_path / "data", PrepareOptions())
    examples, _ = load_examples(tmp_path / "data")
    trained = [sum(label != -100 for label in labels) for _, labels in examples]
    assert len(set(trained)) == len(rows) and max(len(ids) for ids, _ in examples) <= 128

    def first_step(name, tokens_per_batch, grad_accum):
        options = dict(max_steps=1, tokens_per_batch=tokens_per_batch, grad_accum=grad_accum, lr=1e-2)
        train(config(tiny_model_dir, tmp_path / "data", tmp_path / name, **options), log=lambda _: None)
        (record,) = [
            json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        ]
        return record, adapter_tensors(tmp_path / name)

    together, together_adapter = first_step("together", 4096, 1)
    split, split_adapter = first_step("split", 128, 16)
    assert split["trained_tokens"] == together["trained_tokens"] == sum(trained)
    assert split["loss"] == pytest.approx(together["loss"], rel=1e-5)
    assert split["grad_norm"] == pytest.approx(together["grad_norm"], rel=1e-4)
    for key, tensor in together_adapter.items():
        torch.testing.assert_close(split_adapter[key], tensor, rtol=1e-4, atol=1e-6)


def test_resume_after_kill_ends_with_the_same_adapter(tiny_model_dir, short_chats, tmp_path):
    options = dict(max_steps=8, save_every=2, keep_last=2, lr=5e-3, lora_dropout=0.1)
    train(config(tiny_model_dir, short_chats, tmp_path / "straight", **options), log=lambda _: None)

    out = tmp_path / "killed"
    command = [
        sys.executable,
        "-m",
        "gptoss_tune",
        "train",
        "--model",
        str(tiny_model_dir),
        "--data",
        str(short_chats),
        "--output",
        str(out),
        "--tokens-per-batch",
        "256",
        "--lr",
        "5e-3",
        "--lora-rank",
        "4",
        "--lora-alpha",
        "8",
        "--warmup-ratio",
        "0",
        "--max-steps",
        "8",
        "--save-every",
        "2",
        "--keep-last",
        "2",
        "--lora-dropout",
        "0.1",
    ]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (out / "checkpoints" / "step-2" / "trainer_state.json").exists():
        assert process.poll() is None and time.time() < deadline, "the run ended before its first checkpoint"
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not (out / "adapter").exists(), "killed too late to test resuming"
    resumed = subprocess.run(command + ["--resume"], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    # it continued from the kill's checkpoint (starting over would give the same adapter too)
    match = re.search(r"resumedfrom\S*step-(\d+)\(step(\d+)\)", "".join(resumed.stdout.split()))
    assert match and int(match.group(1)) == int(match.group(2)) >= 2, resumed.stdout
    straight, again = adapter_tensors(tmp_path / "straight"), adapter_tensors(out)
    assert straight.keys() == again.keys()
    for key in straight:
        torch.testing.assert_close(again[key], straight[key], rtol=0, atol=0)
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))
    assert len(list((out / "checkpoints").iterdir())) == 2  # keep_last


def test_existing_run_needs_resume_and_resume_needs_the_same_options(tiny_model_dir, short_chats, tmp_path):
    train(config(tiny_model_dir, short_chats, tmp_path / "run", max_steps=1), log=lambda _: None)
    with pytest.raises(GptossTuneError, match="--resume"):
        train(config(tiny_model_dir, short_chats, tmp_path / "run", max_steps=1), log=lambda _: None)
    with pytest.raises(GptossTuneError, match="lr"):
        train(
            config(tiny_model_dir, short_chats, tmp_path / "run", max_steps=1, lr=1.0, resume=True),
            log=lambda _: None,
        )


def test_nan_loss_stops_with_a_clear_message(tiny_model_dir, short_chats, tmp_path):
    with pytest.raises(GptossTuneError, match="loss became nan at step 2"):
        train(
            config(
                tiny_model_dir,
                short_chats,
                tmp_path / "run",
                max_steps=3,
                lr=1e30,
                max_grad_norm=1e38,
                lora_alpha=1e6,
            ),
            log=lambda _: None,
        )


def test_adapters_that_never_train_fail_loudly(tiny_model_dir, short_chats, tmp_path):
    with pytest.raises(GptossTuneError, match="received no update"):
        train(config(tiny_model_dir, short_chats, tmp_path / "run", max_steps=1, lr=0.0), log=lambda _: None)
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()


def test_split_eval_keeps_every_turn_of_a_conversation_on_one_side():
    from gptoss_tune.train.data import split_eval

    sources = [0, 0, 0, 1, 2, 2, 3, 4, 4, 4, 5, 6, 7, 7, 8, 9]  # turns of ten conversations
    examples = list(range(len(sources)))
    for seed in range(5):
        train_part, held_out = split_eval(examples, sources, 0.3, seed)
        trained = {sources[e] for e in train_part}
        held = {sources[e] for e in held_out}
        assert len(held) == 3 and not trained & held and trained | held == set(sources)
        assert sorted(train_part + held_out) == examples


def test_eval_fraction_holds_out_whole_conversations(tiny_model_dir, short_chats, tmp_path):
    result = train(
        config(tiny_model_dir, short_chats, tmp_path / "run", max_steps=2, eval_fraction=0.25, eval_every=1),
        log=lambda _: None,
    )
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "eval"] == [1, 2]
    assert result.eval_loss == records[-1]["loss"]


def test_recipe_and_command_line_overrides(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: m\ndata: d\noutput: o\nlora-rank: 32\nlr: 0.001\n")
    resolved = resolve_config(recipe, {"lr": 0.5})
    assert (resolved.lora_rank, resolved.lr, resolved.model) == (32, 0.5, "m")
    recipe.write_text("model: m\nlearning_rate: 3\n")
    with pytest.raises(GptossTuneError, match="unknown option"):
        resolve_config(recipe, {})


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"lr": -1.0}, "--lr must not be negative"),
        ({"max_grad_norm": -1.0}, "--max-grad-norm must not be negative"),
        ({"save_every": -1}, "--save-every must not be negative"),
        ({"min_lr_ratio": 5.0}, "--min-lr-ratio must be in"),
        ({"lora_dropout": 1.0}, "--lora-dropout must be in"),
        ({"lora_alpha": 0.0}, "--lora-alpha must be positive"),
        ({"lora_targets": "attn,mlp"}, "Unknown LoRA target 'mlp'"),
        ({"lora_layers": "3-1"}, "the end is before the start"),
        ({"loss_on": "everything"}, "Unknown --loss-on"),
        ({"template": "chatml"}, "Unknown template"),
        ({"device": "tpu"}, "Unknown --device"),
        ({"dtype": "fp16"}, "Unknown --dtype"),
        ({"eval_fraction": 0.1, "eval_data": "held-out"}, "give one of them"),
    ],
)
def test_bad_options_are_refused_before_anything_is_written(override, message):
    with pytest.raises(GptossTuneError, match=message):
        resolve_config(None, {"model": "m", "data": "d", "output": "o"} | override)


def test_recipe_values_are_read_as_their_options_types(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "model: m\ndata: d\noutput: o\nlr: 3e-3\ndate: 2025-01-02\nlora_layers: 4\nepochs: 2.0\n"
    )
    resolved = resolve_config(recipe, {})
    assert (resolved.lr, resolved.date, resolved.lora_layers, resolved.epochs) == (
        0.003,
        "2025-01-02",
        "4",
        2,
    )
    for line, message in (
        ('lora_rank: "8"', "'lora_rank' takes a whole number, got '8'"),
        ("epochs: 1.5", "'epochs' takes a whole number"),
        ("lr: fast", "'lr' takes a number"),
        ("rslora: 1", "'rslora' takes true or false"),
        ("1: 2", "option names are words"),
    ):
        recipe.write_text(f"model: m\n{line}\n")
        with pytest.raises(GptossTuneError, match=message):
            resolve_config(recipe, {})


def test_a_new_run_that_fails_before_its_first_step_leaves_no_output(tiny_model_dir, short_chats, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(GptossTuneError):
        train(config(tmp_path / "no-model", short_chats, out, max_steps=1), log=lambda _: None)
    assert not out.exists()
    out.mkdir()  # an empty folder the user made stays, empty
    with pytest.raises(GptossTuneError):
        train(config(tmp_path / "no-model", short_chats, out, max_steps=1), log=lambda _: None)
    assert out.is_dir() and not any(out.iterdir())
    # the corrected command starts afresh, without --resume
    train(config(tiny_model_dir, short_chats, out, max_steps=1), log=lambda _: None)
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


def test_max_grad_norm_zero_means_no_clipping(tiny_model_dir, short_chats, tmp_path):
    runs = {}
    for name, norm in (("unclipped", 0.0), ("huge", 1e30), ("clipped", 1e-4)):
        train(
            config(tiny_model_dir, short_chats, tmp_path / name, max_steps=1, max_grad_norm=norm),
            log=lambda _: None,
        )
        runs[name] = adapter_tensors(tmp_path / name)
    for key, tensor in runs["unclipped"].items():
        torch.testing.assert_close(tensor, runs["huge"][key], rtol=0, atol=0)
    assert any(not torch.equal(t, runs["clipped"][k]) for k, t in runs["unclipped"].items())


def test_the_adapter_says_how_its_training_data_was_rendered(tiny_model_dir, tmp_path):
    """chat, eval and merge find the data's template, date and effort from the adapter alone, even when
    the run named its data by a relative path or the adapter was copied elsewhere."""
    import shutil

    from gptoss_tune.data.prepare import PrepareOptions, prepare
    from gptoss_tune.infer.provenance import training_render_settings

    options = PrepareOptions(template="harmony", date="2024-01-02", reasoning_effort="high")
    prepare("sample", tmp_path / "prepared", options)
    train(config(tiny_model_dir, tmp_path / "prepared", tmp_path / "run", max_steps=1), log=lambda _: None)
    copied = tmp_path / "elsewhere" / "adapter"
    shutil.copytree(tmp_path / "run" / "adapter", copied)
    shutil.rmtree(tmp_path / "prepared")
    expected = {"template": "harmony", "date": "2024-01-02", "reasoning_effort": "high"}
    assert training_render_settings(copied) == expected
    # the base is named by its absolute path, which PEFT's AutoPeftModel finds from anywhere
    adapter_config = json.loads((copied / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(Path(tiny_model_dir).resolve())
    assert training_render_settings(tmp_path / "run" / "checkpoints" / "step-1" / "adapter") == expected


def test_train_command_takes_the_recipe_and_typed_options_override_it(monkeypatch, tmp_path):
    """Through the real command line: recipe values apply, only options typed on it override them."""
    from typer.testing import CliRunner

    from gptoss_tune.cli import app
    from gptoss_tune.train import run

    started = []
    monkeypatch.setattr(run, "run_training", lambda config, console: started.append(config))
    recipe = Path(__file__).parents[1] / "recipes" / "tiny-cpu.yaml"
    result = CliRunner().invoke(app, ["train", "--config", str(recipe), "--lr", "0.5", "--output", "x"])
    assert result.exit_code == 0, result.output
    (config,) = started
    assert (config.model, config.data, config.device) == ("runs/tiny", "sample", "cpu")
    assert (config.lora_rank, config.lora_alpha, config.epochs, config.warmup_ratio) == (16, 32, 3, 0.05)
    assert (config.lr, config.output) == (0.5, "x")


def train_one_and_two_processes(
    model, data, tmp_path, sharding: str, kernels: str = "auto"
) -> tuple[list, list]:
    """Loss curves of 1 process x 2 accumulated micro-batches and 2 gloo processes x 1 (same global batch)."""
    # torchrun gives each worker one thread; the single process gets one too, so both compute with the
    # same BLAS blocking (otherwise rounding can flip a near-tie in the expert routing).
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    common = [sys.executable, "-m", "gptoss_tune", "train", "--model", str(model), "--data", str(data)]
    common += ["--tokens-per-batch", "128", "--lr", "5e-3", "--lora-rank", "4", "--lora-alpha", "8"]
    common += ["--warmup-ratio", "0", "--max-steps", "3", "--device", "cpu", "--kernels", kernels]
    runs = {
        "one": ["--grad-accum", "2"],
        "two": ["--gpus", "2", "--sharding", sharding],
    }
    for name, extra in runs.items():
        done = subprocess.run(
            [*common, *extra, "--output", str(tmp_path / name)], capture_output=True, text=True, env=env
        )
        assert done.returncode == 0, done.stdout + done.stderr
    return [
        [json.loads(line)["loss"] for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        for run in runs
    ]


@pytest.mark.parametrize("sharding", ["ddp", "fsdp"])
def test_two_gloo_processes_match_one_process(tiny_model_dir, short_chats, tmp_path, sharding):
    one, two = train_one_and_two_processes(tiny_model_dir, short_chats, tmp_path, sharding)
    assert one == pytest.approx(two, rel=1e-5)
    first, second = adapter_tensors(tmp_path / "one"), adapter_tensors(tmp_path / "two")
    for key in first:
        torch.testing.assert_close(second[key], first[key], rtol=1e-4, atol=1e-6)


def test_fast_paths_train_the_same_sharded_over_two_processes(tiny_model_dir, short_chats, tmp_path):
    """The fast paths' hand-written backwards (stacked projections, grouped experts) save the frozen
    weights for backward; FSDP2 frees and re-gathers them in between. Same losses as one process."""
    one, two = train_one_and_two_processes(tiny_model_dir, short_chats, tmp_path, "fsdp", kernels="fast")
    assert one == pytest.approx(two, rel=1e-5)


def test_fsdp_ranks_draw_the_same_random_on_load_model(short_chats, tmp_path):
    """Each rank draws the full tensors and keeps its slice: the sharded model is the one a single
    process draws, so the first step's loss (same weights, same batch) agrees to fp32 rounding."""
    model = init_model("tiny", tmp_path / "drawn", seed=5, random_on_load=True, progress=False)
    one, two = train_one_and_two_processes(model, short_chats, tmp_path, "fsdp")
    assert one[0] == pytest.approx(two[0], rel=1e-6)
    assert one == pytest.approx(two, rel=1e-3)


def test_mxfp4_expert_storage_trains_exactly_like_dense(short_chats, tmp_path):
    from gptoss_tune.model.init import init_model

    model_dir = init_model("tiny", tmp_path / "mxfp4", mxfp4=True, dtype=torch.float32, progress=False)
    runs = {}
    for storage in ("bf16", "mxfp4"):
        lines: list[str] = []
        out = tmp_path / f"run-{storage}"
        train(config(model_dir, short_chats, out, max_steps=3, expert_storage=storage), log=lines.append)
        assert f"expert storage: {'mxfp4' if storage == 'mxfp4' else 'dense float32'}" in lines
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        runs[storage] = ([r["loss"] for r in records], adapter_tensors(out))
    assert len(runs["bf16"][0]) == 3 and runs["bf16"][0] == runs["mxfp4"][0]
    assert all(torch.equal(runs["mxfp4"][1][key], value) for key, value in runs["bf16"][1].items())


def test_memory_budget_is_a_number_of_gib_or_auto(tmp_path):
    base = {"model": "m", "data": "d", "output": "o"}
    assert resolve_config(None, base | {"memory_budget_gib": "auto"}).memory_budget_gib == "auto"
    assert resolve_config(None, base | {"memory_budget_gib": "70"}).memory_budget_gib == 70.0
    assert resolve_config(None, base).memory_budget_gib is None
    for bad in ("lots", "0", -5):
        with pytest.raises(GptossTuneError, match="memory-budget-gib"):
            resolve_config(None, base | {"memory_budget_gib": bad})
    for recipe in ("gpt-oss-20b-multilingual-thinking.yaml", "gpt-oss-120b-multilingual-thinking.yaml"):
        resolved = resolve_config(Path(__file__).parents[1] / "recipes" / recipe, {"output": "o"})
        assert resolved.memory_budget_gib == "auto" and resolved.gradient_checkpointing
        assert resolved.recompute == "layers"


def test_recompute_policy_is_layers_or_auto():
    base = {"model": "m", "data": "d", "output": "o"}
    assert resolve_config(None, base).recompute == "layers"
    assert resolve_config(None, base | {"recompute": "auto"}).recompute == "auto"
    with pytest.raises(GptossTuneError, match="Unknown --recompute 'gate_up': use layers, auto"):
        resolve_config(None, base | {"recompute": "gate_up"})
