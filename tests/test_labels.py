"""Label policies against an independent computation that reads only the token ids."""

from __future__ import annotations

import random

import pytest

from gptoss_tune.data.conversation import Conversation, Message
from gptoss_tune.data.prepare import PrepareOptions, examples_for
from gptoss_tune.harmony import tokens as T
from gptoss_tune.harmony.labels import POLICIES, make_labels
from gptoss_tune.harmony.render import RenderOptions, render

from cases import ALL_ROWS
from test_render import conversation_of

FINAL_WORD = 17196  # "final" after <|channel|>


def scan_messages(ids: list[int]) -> list[tuple[int, int, bool, bool, int]]:
    """(start, end, is_assistant, is_final, content_start) for each message, from the ids alone."""
    out = []
    i = 0
    while i < len(ids):
        assert ids[i] == T.START
        message_at = ids.index(T.MESSAGE, i)
        end = next(j for j in range(message_at, len(ids)) if ids[j] in T.TERMINALS) + 1
        header = ids[i + 1 : message_at]
        is_final = T.CHANNEL in header and header[header.index(T.CHANNEL) + 1] == FINAL_WORD
        out.append((i, end, ids[i + 1] == T.ASSISTANT, is_final, message_at + 1))
        i = end
    return out


def expected_labels(ids: list[int], policy: str) -> list[int]:
    messages = scan_messages(ids)
    blocks: list[tuple[int, int]] = []  # (start of the block's first message, end of its last)
    previous_assistant = False
    for start, end, is_assistant, _, _ in messages:
        if is_assistant and previous_assistant:
            blocks[-1] = (blocks[-1][0], end)
        elif is_assistant:
            blocks.append((start, end))
        previous_assistant = is_assistant
    trained = [False] * len(ids)
    if policy == "all":
        trained = [True] * len(ids)
    elif policy == "final":
        finals = [m for m in messages if m[2] and m[3]]
        if finals:
            for j in range(finals[-1][4], finals[-1][1]):
                trained[j] = True
    else:
        chosen = blocks[-1:] if policy == "last" else blocks
        for start, end in chosen:
            for j in range(start + 2, end):  # after <|start|>assistant
                trained[j] = True
    return [token if t else T.IGNORE_INDEX for token, t in zip(ids, trained, strict=True)]


def random_conversation(rng: random.Random) -> Conversation:
    words = ["alpha", "beta", "gamma", "día", "Straße", "数据", "<|end|>", "\n", "  "]
    text = lambda: " ".join(rng.choice(words) for _ in range(rng.randint(0, 6)))  # noqa: E731
    messages = [Message(rng.choice(["system", "developer"]), text())] if rng.random() < 0.5 else []
    for _ in range(rng.randint(1, 4)):
        messages.append(Message("user", text()))
        for _ in range(rng.choice([1, 1, 2])):
            messages.append(Message("assistant", text(), text() if rng.random() < 0.6 else None))
    if rng.random() < 0.3:
        messages.append(Message("user", text()))
    return Conversation(tuple(messages))


@pytest.mark.parametrize("policy", [p for p in POLICIES if p != "turns"])
@pytest.mark.parametrize("template", ["hf", "harmony"])
def test_policies_match_independent_spans_on_cases(policy, template):
    for name in ALL_ROWS:
        rendered = render(conversation_of(name), RenderOptions(template))
        assert make_labels(rendered, policy) == expected_labels(rendered.ids, policy), name


@pytest.mark.parametrize("template", ["hf", "harmony"])
def test_policies_match_independent_spans_on_random_conversations(template):
    rng = random.Random(0)
    for _ in range(60):
        rendered = render(random_conversation(rng), RenderOptions(template))
        for policy in ("last", "assistant", "final", "all"):
            assert make_labels(rendered, policy) == expected_labels(rendered.ids, policy)


def test_turns_makes_one_example_per_assistant_block_each_trained_as_last():
    conversation = conversation_of("multi_turn_thinking")
    examples = list(examples_for(conversation, PrepareOptions(loss_on="turns")))
    assert [e.turn for e in examples] == [0, 1, 2]
    for example in examples:
        assert example.labels == expected_labels(example.input_ids, "last")
        assert example.input_ids[-1] == T.RETURN  # each ends with its block, whose thinking is visible
        assert example.labels[-1] == T.RETURN
    # turn 0 shows its own thinking, which the full conversation hides
    assert T.CHANNEL in examples[0].input_ids
    first_turn_text = examples[0].input_ids
    full = render(conversation, RenderOptions()).ids
    assert full[: len(first_turn_text) - 1] != first_turn_text[:-1]


def test_final_policy_trains_only_the_answer_and_its_terminal(encoding):
    rendered = render(conversation_of("mt"), RenderOptions())
    labels = make_labels(rendered, "final")
    trained = [t for t in labels if t != T.IGNORE_INDEX]
    assert trained[-1] == T.RETURN
    assert encoding.decode(trained[:-1]) == "À cause de la diffusion de Rayleigh."


def test_last_policy_trains_analysis_final_and_inner_cue(encoding):
    rendered = render(conversation_of("mt"), RenderOptions())
    trained = [t for t in make_labels(rendered, "last") if t != T.IGNORE_INDEX]
    assert encoding.decode(trained).startswith("<|channel|>analysis<|message|>L'utilisateur")
    assert "<|end|><|start|>assistant<|channel|>final<|message|>À cause" in encoding.decode(trained)
    assert trained[-1] == T.RETURN


def test_tool_call_block_ends_with_call_token():
    conversation = conversation_of("tool_call")
    examples = list(examples_for(conversation, PrepareOptions(loss_on="turns")))
    assert [e.input_ids[-1] for e in examples] == [T.CALL, T.RETURN]
    assert [e.labels[-1] for e in examples] == [T.CALL, T.RETURN]
