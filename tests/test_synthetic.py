"""The bundled Multilingual-Thinking sample and the synthetic row generator (CPU, a few seconds)."""

from __future__ import annotations

import importlib.resources
import importlib.util
import json
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest

from gptoss_tune.data.synthetic import (
    SUPPORTED_LIKES,
    chat_template_overhead_tokens,
    make_synthetic_rows,
    write_jsonl,
)
from gptoss_tune.errors import GptossTuneError
from gptoss_tune.harmony.vocab import harmony_encoding

COLUMNS = ("reasoning_language", "developer", "user", "analysis", "final", "messages")
SAMPLE_NAME = "multilingual_thinking_sample.jsonl"


def _sample_rows() -> list[dict]:
    sample = importlib.resources.files("gptoss_tune.data") / "samples" / SAMPLE_NAME
    return [json.loads(line) for line in sample.read_text(encoding="utf-8").splitlines() if line.strip()]


def _tokens(text: str) -> int:
    return len(harmony_encoding().encode(text, disallowed_special=()))


def _assert_multilingual_thinking_row(row: dict) -> None:
    assert set(row) == set(COLUMNS)
    assert all(isinstance(row[column], str) for column in COLUMNS[:-1])
    messages = row["messages"]
    assert all(set(message) == {"content", "role", "thinking"} for message in messages)
    system, turns = messages[0], messages[1:]
    assert system == {
        "role": "system",
        "content": f"reasoning language: {row['reasoning_language']}\n\n{row['developer']}",
        "thinking": None,
    }
    assert len(turns) >= 2 and len(turns) % 2 == 0
    assert [message["role"] for message in turns] == ["user", "assistant"] * (len(turns) // 2)
    assert all(message["thinking"] is None for message in turns if message["role"] == "user")
    last_user, last_assistant = turns[-2], turns[-1]
    assert last_user["content"] == row["user"]
    assert last_assistant["content"] == row["final"]
    assert last_assistant["thinking"] == (row["analysis"] or None)


# ---------------------------------------------------------------- bundled sample


@pytest.fixture(scope="module")
def sample_rows() -> list[dict]:
    return _sample_rows()


def test_sample_parses_and_has_enough_rows(sample_rows):
    assert len(sample_rows) >= 30


def test_sample_rows_have_the_multilingual_thinking_shape(sample_rows):
    for row in sample_rows:
        _assert_multilingual_thinking_row(row)


def test_sample_has_multi_turn_conversations_whose_earlier_turns_think(sample_rows):
    multi_turn = [row for row in sample_rows if len(row["messages"]) > 3]
    assert len(multi_turn) >= 5
    for row in multi_turn:
        assistants = [message for message in row["messages"] if message["role"] == "assistant"]
        assert all(message["thinking"] for message in assistants)


def test_sample_has_conversations_without_thinking(sample_rows):
    without = [row for row in sample_rows if row["analysis"] == ""]
    assert len(without) >= 5
    assert all(row["messages"][-1]["thinking"] is None for row in without)


def test_sample_covers_several_reasoning_languages(sample_rows):
    languages = {row["reasoning_language"] for row in sample_rows}
    assert len(languages) >= 4
    assert languages <= {"English", "French", "German", "Spanish", "Italian"}


def test_sample_conversations_are_short(sample_rows):
    for row in sample_rows:
        content = sum(_tokens(m["content"]) + _tokens(m["thinking"] or "") for m in row["messages"])
        assert content < 260, row["user"]


# ---------------------------------------------------------------- synthetic rows


@pytest.fixture(scope="module")
def synthetic_rows() -> list[dict]:
    return make_synthetic_rows("multilingual-thinking", rows=1000, seed=0)


def _rendered_tokens(row: dict) -> int:
    """Tokens of a single-turn row under the gpt-oss chat template: contents plus the fixed overhead."""
    contents = (row["messages"][0]["content"], row["user"], row["analysis"], row["final"])
    return chat_template_overhead_tokens() + sum(_tokens(text) for text in contents)


def test_synthetic_rows_have_the_multilingual_thinking_shape(synthetic_rows):
    assert len(synthetic_rows) == 1000
    for row in synthetic_rows:
        _assert_multilingual_thinking_row(row)
        assert row["analysis"] and row["final"] and row["user"]
    assert len({row["reasoning_language"] for row in synthetic_rows}) == 5


def test_synthetic_rows_are_deterministic_for_a_seed(synthetic_rows):
    assert make_synthetic_rows(rows=25, seed=0) == synthetic_rows[:25]


def test_synthetic_rows_differ_across_seeds():
    first, second = make_synthetic_rows(rows=5, seed=1), make_synthetic_rows(rows=5, seed=2)
    assert all(a["analysis"] != b["analysis"] for a, b in zip(first, second, strict=True))


def test_synthetic_token_lengths_resemble_multilingual_thinking(synthetic_rows):
    lengths = np.array([_rendered_tokens(row) for row in synthetic_rows])
    assert 1050 <= lengths.mean() <= 1300
    assert 900 <= np.median(lengths) <= 1200
    assert 0.03 <= (lengths > 2000).mean() <= 0.15
    assert ((lengths >= 600) & (lengths <= 2000)).mean() >= 0.7
    assert lengths.min() >= 300 - 8
    assert lengths.max() <= 4096


def test_synthetic_token_budget_is_split_user_analysis_final(synthetic_rows):
    fields = np.array([[_tokens(row[f]) for f in ("user", "analysis", "final")] for row in synthetic_rows])
    user_share, analysis_share, final_share = fields.sum(axis=0) / fields.sum()
    assert 0.07 <= user_share <= 0.13
    assert 0.38 <= analysis_share <= 0.52
    assert 0.38 <= final_share <= 0.52


def _official_chat_template():
    """gpt-oss's chat template as shipped by TRL, rendered the way transformers does; None if unavailable."""
    pytest.importorskip("jinja2")
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    spec = importlib.util.find_spec("trl")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "chat_templates" / "gptoss.jinja"
    if not path.is_file():
        return None
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(path.read_text(encoding="utf-8"))


def test_overhead_matches_the_official_chat_template(synthetic_rows):
    template = _official_chat_template()
    if template is None:
        pytest.skip("trl's gptoss.jinja is not installed")
    for row in synthetic_rows[:20]:
        rendered = template.render(messages=row["messages"], add_generation_prompt=False)
        official = len(harmony_encoding().encode(rendered, allowed_special="all"))
        assert abs(official - _rendered_tokens(row)) <= 2


def test_unknown_like_names_the_accepted_values():
    with pytest.raises(GptossTuneError) as caught:
        make_synthetic_rows(like="alpaca", rows=1)
    assert all(value in str(caught.value) for value in SUPPORTED_LIKES)


def test_hub_id_is_accepted_as_like():
    assert make_synthetic_rows(
        like="HuggingFaceH4/Multilingual-Thinking", rows=2, seed=3
    ) == make_synthetic_rows(rows=2, seed=3)


def test_write_jsonl_round_trips_atomically(tmp_path):
    rows = make_synthetic_rows(rows=3, seed=4) + _sample_rows()[:2]
    target = tmp_path / "nested" / "rows.jsonl"
    target.parent.mkdir()
    target.write_text("stale\n", encoding="utf-8")
    assert write_jsonl(rows, target) == target
    text = target.read_text(encoding="utf-8")
    assert [json.loads(line) for line in text.splitlines()] == rows
    assert "\\u00" not in text  # non-ASCII characters are written as themselves
    assert sorted(p.name for p in target.parent.iterdir()) == ["rows.jsonl"]
