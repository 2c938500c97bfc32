"""demo: the chat prompt is the training prompt, and the reproduction check is real (a shortened run)."""

from __future__ import annotations

import json
import sys

import pytest
from rich.console import Console

from gptoss_tune.cli import main
from gptoss_tune.data.load import iter_rows
from gptoss_tune.data.prepare import PrepareOptions, PrepareStats, examples_for, iter_conversations
from gptoss_tune.errors import GptossTuneError
from gptoss_tune.harmony.render import RenderOptions
from gptoss_tune.infer.demo import (
    DEMO_ROWS,
    DemoSettings,
    _completion_ids,
    chat_history,
    check_reproduction,
    prepare_demo_folder,
    run_demo,
    sample_rows,
)
from gptoss_tune.infer.generate import Completion
from gptoss_tune.infer.prompt import generation_prompt

CI_STEPS = 50  # one conversation (62 trained tokens): smallest greedy margin 2.5 logits after 50 steps


@pytest.mark.parametrize("row_index", DEMO_ROWS)
def test_the_demo_chat_prompt_is_the_prompt_it_trained_on(row_index) -> None:
    """Chat prompt + the trained completion == the prepared training example, token for token."""
    options = PrepareOptions(loss_on="last")
    conversation = list(iter_conversations(iter_rows("sample"), options, PrepareStats()))[row_index]
    example = next(examples_for(conversation, options))
    (row,) = sample_rows((row_index,))
    history, prompt = chat_history(row)
    chat_prompt = generation_prompt(history.conversation_with(prompt), RenderOptions())
    completion = _completion_ids(row)
    assert chat_prompt + completion == example.input_ids
    assert [label for label in example.labels if label != -100] == completion


def test_reproduction_check_needs_the_exact_final_and_a_stop() -> None:
    expected = "Das Fahrrad kostet jetzt 360 Euro."
    check_reproduction(expected, Completion([], {"analysis": "x", "final": expected}, stopped=True))
    with pytest.raises(GptossTuneError, match="did not reproduce"):
        check_reproduction(expected, Completion([], {"final": expected + " Mehr."}, stopped=True))
    with pytest.raises(GptossTuneError, match="no stop token"):
        check_reproduction(expected, Completion([], {"final": expected}, stopped=False))
    with pytest.raises(GptossTuneError, match="did not reproduce"):
        check_reproduction(expected, Completion([], {}, raw="babble", stopped=True))


def test_shortened_demo_reproduces_its_training_answer(tiny_model_dir, tmp_path) -> None:
    console = Console(record=True, width=120)
    settings = DemoSettings(output=tmp_path / "demo", conversations=1, steps=CI_STEPS, base=tiny_model_dir)
    result = run_demo(settings, console)
    assert result.reproduced and result.tuned_answer["final"] == result.expected_final
    assert result.base_answer["final"] != result.expected_final
    for label in ("adapter", "merged model", "loss plot", "metrics", "training data", "demo record"):
        assert (tmp_path / "demo").joinpath(result.files[label]).exists(), label
    record = json.loads((tmp_path / "demo" / "demo.json").read_text())
    assert record["reproduced"] is True
    output = console.export_text()
    assert "reproduces its training answer" in output and result.expected_final[:30] in output.replace(
        "\n", " "
    )

    with pytest.raises(GptossTuneError, match="--overwrite"):
        run_demo(settings, console)


def test_demo_fails_loudly_when_the_answer_is_not_reproduced(
    tiny_model_dir, tmp_path, monkeypatch, capsys
) -> None:
    out = tmp_path / "demo"
    arguments = ["--output", str(out), "--conversations", "1", "--steps", "1", "--base", str(tiny_model_dir)]
    monkeypatch.setattr(sys, "argv", ["gptoss-tune", "demo", *arguments])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    assert "did not reproduce" in capsys.readouterr().err
    assert json.loads((out / "demo.json").read_text())["reproduced"] is False


def test_demo_output_must_be_new_or_a_previous_demo(tmp_path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(GptossTuneError, match="not a demo folder"):
        run_demo(DemoSettings(output=tmp_path, overwrite=True), Console())
    assert (tmp_path / "notes.txt").read_text() == "mine"
    interrupted = tmp_path / "interrupted"
    interrupted.mkdir()
    (interrupted / "demo.json").write_text('{"status": "running"}')
    (interrupted / "half-written").write_text("x")
    with pytest.raises(GptossTuneError, match="--overwrite"):
        prepare_demo_folder(DemoSettings(output=interrupted))
    assert prepare_demo_folder(DemoSettings(output=interrupted, overwrite=True)) == interrupted
    assert [p.name for p in interrupted.iterdir()] == ["demo.json"]
    with pytest.raises(GptossTuneError, match="--steps"):
        DemoSettings(steps=0)
