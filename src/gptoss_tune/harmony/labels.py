"""Training labels ("Fix Target"): which rendered tokens are trained, by policy.

An assistant block is a maximal run of consecutive assistant messages. Its completion is every token
after the block's opening `<|start|>assistant` cue (2 tokens) up to and including its last terminal
token: exactly what the model generates at inference. Labels are aligned with input_ids (the model
shifts) and use -100 where nothing is trained.
"""

from __future__ import annotations

from gptoss_tune.harmony import tokens as T
from gptoss_tune.harmony.render import Rendered, RenderedMessage

POLICIES = ("turns", "last", "assistant", "final", "all")
POLICY_HELP = {
    "turns": "one example per assistant block, rendered up to it (its thinking visible), trained as 'last'",
    "last": "the completion of the last assistant block (its analysis, calls and final)",
    "assistant": "the completions of every assistant block",
    "final": "only the content of the last final-channel message and its terminal token",
    "all": "every token",
}
CUE_LENGTH = 2  # <|start|>assistant


def assistant_blocks(rendered: Rendered) -> list[list[RenderedMessage]]:
    blocks: list[list[RenderedMessage]] = []
    previous_was_assistant = False
    for message in rendered.messages:
        is_assistant = message.role == "assistant"
        if is_assistant and previous_was_assistant:
            blocks[-1].append(message)
        elif is_assistant:
            blocks.append([message])
        previous_was_assistant = is_assistant
    return blocks


def completion_span(block: list[RenderedMessage]) -> tuple[int, int]:
    return block[0].start + CUE_LENGTH, block[-1].end


def trained_spans(rendered: Rendered, policy: str, context_blocks: int = 0) -> list[tuple[int, int]]:
    """Half-open [start, end) ranges of trained positions. `turns` is handled by the caller (one
    example per block) and labels each example as `last`. `context_blocks`: how many leading
    assistant blocks are context only (a prompt-completion row's prompt), which `assistant` skips."""
    if policy == "all":
        return [(0, len(rendered.ids))]
    blocks = assistant_blocks(rendered)[context_blocks:]
    if policy == "final":
        finals = [m for block in blocks for m in block if m.channel == "final"]
        return [(finals[-1].content_start, finals[-1].end)] if finals else []
    if not blocks:
        return []
    if policy in ("last", "turns"):
        return [completion_span(blocks[-1])]
    if policy == "assistant":
        return [completion_span(block) for block in blocks]
    raise ValueError(f"unknown policy {policy!r}")


def make_labels(rendered: Rendered, policy: str, context_blocks: int = 0) -> list[int]:
    labels = [T.IGNORE_INDEX] * len(rendered.ids)
    for start, end in trained_spans(rendered, policy, context_blocks):
        labels[start:end] = rendered.ids[start:end]
    return labels
