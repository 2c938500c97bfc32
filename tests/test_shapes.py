"""Shape detection and normalization, and errors that name the file, row and field."""

from __future__ import annotations

import pytest

from gptoss_tune.data.load import SourceRow
from gptoss_tune.data.shapes import detect_format, normalize
from gptoss_tune.errors import DataError

from cases import ALL_ROWS


def norm(data: dict, fmt: str | None = None):
    row = SourceRow("data.jsonl", "line 7", data=data)
    return normalize(row, fmt or detect_format(row), 0)


@pytest.mark.parametrize(
    ("name", "fmt"),
    [
        ("mt", "messages"),
        ("tool_call", "messages"),
        ("sharegpt", "sharegpt"),
        ("alpaca", "alpaca"),
        ("prompt_completion_strings", "prompt-completion"),
        ("prompt_completion_messages", "prompt-completion"),
        ("mt_columns", "mt-columns"),
    ],
)
def test_detects_every_shape(name, fmt):
    assert detect_format(SourceRow("f", "line 1", data=ALL_ROWS[name])) == fmt


def test_messages_shape_keeps_roles_thinking_and_aliases():
    c = norm(ALL_ROWS["multi_turn_thinking"])
    assert [m.role for m in c.messages] == [
        "developer",
        "user",
        "assistant",
        "user",
        "assistant",
        "user",
        "assistant",
    ]
    assert [m.thinking for m in c.messages if m.role == "assistant"] == [
        "Simple addition.",
        "4 * 3 = 12.",
        None,
    ]


def test_mt_columns_equal_the_messages_column():
    row = {
        "reasoning_language": "French",
        "developer": "Be cheerful.",
        "user": "Salut",
        "analysis": "Il dit salut.",
        "final": "Coucou !",
    }
    messages = {
        "messages": [
            {"role": "system", "content": "reasoning language: French\n\nBe cheerful.", "thinking": None},
            {"role": "user", "content": "Salut", "thinking": None},
            {"role": "assistant", "content": "Coucou !", "thinking": "Il dit salut."},
        ]
    }
    assert norm(row).messages == norm(messages).messages


def test_sharegpt_alpaca_and_prompt_completion():
    share = norm(ALL_ROWS["sharegpt"])
    assert [(m.role, m.content) for m in share.messages][:3] == [
        ("system", "You are terse."),
        ("user", "Capital of Italy?"),
        ("assistant", "Rome."),
    ]
    alpaca = norm(ALL_ROWS["alpaca"])
    assert [(m.role, m.content) for m in alpaca.messages] == [
        ("system", "You translate."),
        ("user", "Translate to German.\n\nGood morning"),
        ("assistant", "Guten Morgen"),
    ]
    assert [m.content for m in norm(ALL_ROWS["alpaca_no_input"]).messages] == ["Name a prime number.", "7"]
    pc = norm(ALL_ROWS["prompt_completion_messages"])
    assert [m.role for m in pc.messages] == ["system", "user", "assistant"] and pc.messages[
        -1
    ].thinking == "Greet back."
    assert [m.content for m in norm(ALL_ROWS["prompt_completion_strings"]).messages] == [
        "Complete: the quick brown",
        "fox",
    ]


def test_tool_calls_are_split_named_and_parsed():
    c = norm(ALL_ROWS["parallel_tool_calls"])
    calls = [m.tool_call for m in c.messages if m.tool_call]
    assert [(t.name, t.arguments) for t in calls] == [("get_weather", {"location": "Oslo"}), ("get_time", {})]
    assert [m.thinking for m in c.messages if m.tool_call] == ["Two calls.", None]
    assert len(c.tools) == 2
    analysis = norm(ALL_ROWS["tool_call_content_as_analysis"])
    assert analysis.messages[1].thinking == "Let me look it up." and analysis.messages[1].content == ""
    assert analysis.messages[2].tool_name == "get_weather"


def test_later_system_messages_are_dropped_and_counted():
    c = norm(
        {
            "messages": [
                {"role": "user", "content": "a"},
                {"role": "system", "content": "late"},
                {"role": "assistant", "content": "b"},
            ]
        }
    )
    assert [m.role for m in c.messages] == ["user", "assistant"] and c.dropped_messages == 1


def test_content_parts_and_csv_json_cells():
    c = norm(
        {
            "messages": '[{"role": "user", "content": [{"type": "text", "text": "hi "}, {"type": "text", '
            '"text": "there"}]}, {"role": "assistant", "content": "yo"}]'
        }
    )
    assert c.messages[0].content == "hi there"


def test_prompt_completion_text_that_looks_like_json_stays_text():
    for text in ('{"name": "Bob", "age": 3}', "[2, 3, 5]", "[]", "{}"):
        c = norm({"prompt": text, "completion": text})
        assert [(m.role, m.content) for m in c.messages] == [("user", text), ("assistant", text)]
    # a message list given as JSON text (a CSV cell) is still a message list
    c = norm({"prompt": '[{"role": "user", "content": "Q"}]', "completion": "A"})
    assert [(m.role, m.content) for m in c.messages] == [("user", "Q"), ("assistant", "A")]


def test_a_prompts_messages_are_context():
    fewshot = {
        "prompt": [
            {"role": "system", "content": "S"},
            {"role": "user", "content": "Q1"},
            {"role": "assistant", "content": "A1"},
            {"role": "user", "content": "Q2"},
        ],
        "completion": [{"role": "assistant", "content": "A2"}],
    }
    c = norm(fewshot)
    assert c.context_messages == 4 and c.trainable_blocks() == [(4, 4)]
    assert norm({"prompt": "Q", "completion": "A"}).context_messages == 1
    assert norm(ALL_ROWS["mt"]).context_messages == 0


@pytest.mark.parametrize(
    ("data", "field", "reason"),
    [
        (
            {"messages": [{"role": "wizard", "content": "x"}, {"role": "assistant", "content": "y"}]},
            "messages[0].role",
            "unknown_role",
        ),
        (
            {"messages": [{"role": "user"}, {"role": "assistant", "content": "y"}]},
            "messages[0].content",
            "missing_content",
        ),
        (
            {"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "y"}]},
            "messages[0].content",
            "invalid_content",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "x"},
                    {"role": "assistant", "content": "y", "thinking": 5},
                ]
            },
            "messages[1].thinking",
            "invalid_content",
        ),
        ({"messages": []}, "messages", "empty_conversation"),
        ({"messages": [{"role": "user", "content": "x"}]}, "messages", "no_assistant"),
        (
            {
                "messages": [
                    {"role": "user", "content": "x"},
                    {"role": "tool", "content": "r"},
                    {"role": "assistant", "content": "y"},
                ]
            },
            "messages[1].role",
            "orphan_tool_message",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "x"},
                    {
                        "role": "assistant",
                        "tool_calls": [{"function": {"name": "f", "arguments": "{not json"}}],
                    },
                ]
            },
            "messages[1].tool_calls[0].function.arguments",
            "invalid_tool_call",
        ),
        ({"conversations": [{"from": "alien", "value": "x"}]}, "conversations[0].from", "unknown_role"),
        ({"conversations": [{"from": "human", "value": None}]}, "conversations[0].value", "missing_content"),
        ({"instruction": "x", "output": 3}, "output", "invalid_field"),
        ({"prompt": "x", "completion": None}, "completion", "missing_field"),
        (
            {
                "tools": [{"type": "function", "function": {"name": "f", "parameters": "city"}}],
                "messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}],
            },
            "tools[0].function.parameters",
            "invalid_tools",
        ),
        (
            {
                "tools": [{"name": "f", "description": 3}],
                "messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}],
            },
            "tools[0].description",
            "invalid_tools",
        ),
    ],
)
def test_bad_rows_name_file_row_and_field(data, field, reason):
    with pytest.raises(DataError) as info:
        norm(data)
    error = info.value
    assert (error.file, error.row, error.field, error.reason) == ("data.jsonl", "line 7", field, reason)
    assert str(error).startswith(f"data.jsonl, line 7, field '{field}': ")


def test_unknown_shape_lists_columns_and_shapes():
    with pytest.raises(DataError) as info:
        norm({"question": "x", "answer": "y"})
    assert info.value.reason == "unknown_shape"
    assert (
        "answer, question" in str(info.value)
        and "sharegpt" in str(info.value)
        and "--format" in str(info.value)
    )
