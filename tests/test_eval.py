"""eval: loss on trained tokens against transformers/PEFT; reasoning-language scoring with canned answers
and its plumbing on the tiny model."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from gptoss_tune.cli import app
from gptoss_tune.data.prepare import PrepareOptions
from gptoss_tune.errors import GptossTuneError
from gptoss_tune.eval.language import (
    LanguagePrompt,
    identify_language,
    language_code,
    load_prompts,
    report,
    run_language_eval,
    score,
)
from gptoss_tune.eval.loss import evaluate_loss, load_eval_examples
from gptoss_tune.harmony.render import RenderOptions
from gptoss_tune.infer.generate import Completion, SamplingOptions
from gptoss_tune.model.lora import LoraOptions

ANALYSES = {  # from the bundled sample
    "English": "The user wants a simple explanation of the sky's color. Air molecules scatter short wavelengths.",
    "French": "L'utilisateur veut savoir comment les abeilles fabriquent le miel à partir du nectar des fleurs.",
    "German": "Der Nutzer möchte den Unterschied zwischen Wetter und Klima wissen. Das Wetter ist kurzfristig.",
    "Spanish": "El usuario pregunta cómo se forma un arcoíris. La luz del sol entra en las gotas de lluvia.",
    "Italian": "L'utente chiede come funzionano i vaccini. Un vaccino insegna al sistema immunitario.",
}


@pytest.fixture(scope="module")
def eval_adapter(tiny_model_dir, tmp_path_factory, make_random_adapter) -> Path:
    return make_random_adapter(
        tiny_model_dir, tmp_path_factory.mktemp("eval") / "adapter", LoraOptions(rank=4, alpha=8), b_std=0.5
    )


# --- loss -------------------------------------------------------------------------------------------


def reference_loss(model, input_ids: list[int], labels: list[int]) -> float:
    """Mean next-token cross-entropy over the trained tokens, from transformers' logits."""
    with torch.no_grad():
        logits = model(torch.tensor([input_ids])).logits[0, :-1]
    return F.cross_entropy(logits, torch.tensor(labels[1:]), ignore_index=-100).item()


def test_loss_per_example_equals_transformers_and_peft(tiny_model_dir, short_chats, eval_adapter) -> None:
    result = evaluate_loss(tiny_model_dir, str(short_chats), eval_adapter, device="cpu")
    examples = load_eval_examples(str(short_chats), PrepareOptions())
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    base_losses = [reference_loss(base, e.input_ids, e.labels) for e in examples]
    adapted = PeftModel.from_pretrained(base, eval_adapter).eval()
    adapter_losses = [reference_loss(adapted, e.input_ids, e.labels) for e in examples]

    assert len(result.examples) == len(examples) == 12
    for row, base_loss, adapter_loss in zip(result.examples, base_losses, adapter_losses, strict=True):
        assert row.base_loss == pytest.approx(base_loss, rel=1e-4)
        assert row.adapter_loss == pytest.approx(adapter_loss, rel=1e-4)
        assert row.base_loss != pytest.approx(row.adapter_loss, rel=1e-3)
    counts = [sum(1 for x in e.labels[1:] if x != -100) for e in examples]
    assert [row.trained_tokens for row in result.examples] == counts
    weighted = sum(c * loss for c, loss in zip(counts, base_losses, strict=True)) / sum(counts)
    assert result.overall("base") == pytest.approx(weighted, rel=1e-4)
    overall = result.to_dict()["overall"]
    assert overall["adapter"]["perplexity"] == pytest.approx(
        torch.tensor(overall["adapter"]["loss"]).exp().item()
    )


def test_eval_command_writes_the_loss_report(tiny_model_dir, short_chats, tmp_path) -> None:
    out = tmp_path / "loss.json"
    result = CliRunner().invoke(
        app,
        [
            "eval",
            "--model",
            str(tiny_model_dir),
            "--data",
            str(short_chats),
            "-o",
            str(out),
            "--device",
            "cpu",
        ],
    )
    assert result.exit_code == 0, result.output
    report_json = json.loads(out.read_text())
    assert report_json["overall"]["examples"] == 12 and "adapter" not in report_json["overall"]
    assert "loss on trained tokens" in result.output
    both = CliRunner().invoke(app, ["eval", "--model", "m", "--data", "d", "--reasoning-language"])
    assert isinstance(both.exception, GptossTuneError) and "Choose one mode" in str(both.exception)


def test_raw_data_is_prepared_with_the_given_policy(tmp_path) -> None:
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"prompt": "Hi", "completion": "Hello there."}) + "\n")
    examples = load_eval_examples(str(rows), PrepareOptions(loss_on="final"))
    assert (
        len(examples) == 1 and sum(1 for x in examples[0].labels if x != -100) == 4
    )  # "Hello there." <|return|>


# --- reasoning language: scoring ---------------------------------------------------------------------


def test_identifier_recognizes_the_sample_languages() -> None:
    for language, text in ANALYSES.items():
        assert identify_language(text)[0] == language_code(language)
    assert identify_language("   ") == ("none", 0.0)


def test_language_names_and_codes() -> None:
    assert language_code("French") == language_code("fr") == language_code("FRENCH") == "fr"
    assert language_code("Norwegian Nynorsk") == "nn"
    with pytest.raises(GptossTuneError, match="Unknown language 'Klingon'"):
        language_code("Klingon")


class CannedGenerator:
    """Reads the reasoning language from the rendered prompt and answers with canned analyses: the base
    always thinks in English, the adapter in the asked language (except French, where it stays silent)."""

    has_adapter = True

    def __init__(self, encoding) -> None:
        self.encoding = encoding
        self.stop_tokens: list[list[int] | None] = []

    def complete(self, prompt_ids, sampling, on_delta=None, use_adapter=True, stop_tokens=None) -> Completion:
        self.stop_tokens.append(stop_tokens)
        language = re.search(r"reasoning language: (\w+)", self.encoding.decode(prompt_ids))[1]
        if not use_adapter:
            return Completion([], {"analysis": ANALYSES["English"]})
        return Completion([], {"analysis": "" if language == "French" else ANALYSES[language]})


def test_scores_per_language_and_model_from_canned_answers(encoding) -> None:
    prompts = [
        LanguagePrompt("Why is the sky blue?", "German"),
        LanguagePrompt("How do bees make honey?", "German", developer="Be brief."),
        LanguagePrompt("Why do onions make you cry?", "French"),
        LanguagePrompt("What is a rainbow?", "Spanish"),
    ]
    generator = CannedGenerator(encoding)
    results = run_language_eval(generator, prompts, RenderOptions(), SamplingOptions(temperature=0))
    assert {tuple(stops) for stops in generator.stop_tokens} == {(200002, 200007, 200012)}

    scores = score(results)
    assert list(scores) == ["base", "adapter"]
    assert list(scores["adapter"]) == ["German", "French", "Spanish", "all"]
    assert [(s.adherent, s.asked) for s in scores["base"].values()] == [(0, 2), (0, 1), (0, 1), (0, 4)]
    assert [(s.adherent, s.asked) for s in scores["adapter"].values()] == [(2, 2), (0, 1), (1, 1), (3, 4)]
    assert scores["adapter"]["all"].share == 0.75 and scores["adapter"]["French"].no_analysis == 1
    assert scores["base"]["German"].detected == {"en": 2}

    report_json = report(results, {"note": "canned"})
    assert report_json["scores"]["adapter"]["all"]["share"] == 0.75
    assert len(report_json["results"]) == 8 and report_json["results"][4]["adherent"] is True


def test_prompts_from_the_sample_and_from_files(tmp_path) -> None:
    sample = load_prompts("sample")
    assert len(sample) == 36 and {p.language for p in sample} == set(ANALYSES)
    assert sample[0].developer and sample[0].prompt == "Why is the sky blue?"

    text = tmp_path / "prompts.txt"
    text.write_text("First?\n\nSecond?\n")
    crossed = load_prompts(str(text), ["German", "it"])
    assert [(p.prompt, p.language) for p in crossed] == [
        ("First?", "German"),
        ("First?", "it"),
        ("Second?", "German"),
        ("Second?", "it"),
    ]
    with pytest.raises(GptossTuneError, match="no 'reasoning_language'"):
        load_prompts(str(text))
    rows = tmp_path / "prompts.jsonl"
    rows.write_text(json.dumps({"user": "Hola?", "reasoning_language": "Spanish"}) + "\n")
    assert load_prompts(str(rows)) == [LanguagePrompt("Hola?", "Spanish")]
    rows.write_text(json.dumps({"user": "Hola?", "reasoning_language": "Elvish"}) + "\n")
    with pytest.raises(GptossTuneError, match="Unknown language 'Elvish'"):
        load_prompts(str(rows))


# --- reasoning language: plumbing on the tiny model ---------------------------------------------------


def test_reasoning_language_command_on_the_tiny_model(tiny_model_dir, eval_adapter, tmp_path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Why is the sky blue?\nWhat is rain?\n")
    result = CliRunner().invoke(
        app,
        [
            "eval",
            "--model",
            str(tiny_model_dir),
            "--adapter",
            str(eval_adapter),
            "--reasoning-language",
            "--prompts",
            str(prompts),
            "--languages",
            "German,French",
            "--max-new-tokens",
            "6",
            "--device",
            "cpu",
            "-o",
            "-",
        ],
    )
    assert result.exit_code == 0, result.output
    report_json = json.loads(result.stdout)
    assert set(report_json["scores"]) == {"base", "adapter"}
    assert report_json["scores"]["adapter"]["all"]["asked"] == 4
    assert len(report_json["results"]) == 8
    assert report_json["settings"]["sampling"]["max_new_tokens"] == 6
