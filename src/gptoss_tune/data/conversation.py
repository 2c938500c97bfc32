"""The normalized conversation every dataset shape is turned into, and every renderer reads."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Any

ROLES = ("system", "developer", "user", "assistant", "tool")


@dataclass(frozen=True)
class ToolCall:
    """One function call made by the assistant. `arguments` is the decoded JSON value when the data
    held valid JSON (rendered back with json.dumps, as the official template's `tojson` does), else the
    raw string."""

    name: str
    arguments: Any

    def arguments_text(self) -> str:
        return json.dumps(self.arguments, ensure_ascii=False)


@dataclass(frozen=True)
class Message:
    role: str
    content: str = ""
    thinking: str | None = None  # assistant only; None means no thinking
    tool_call: ToolCall | None = None  # assistant only; one call per message (several are split)
    tool_name: str | None = None  # tool only: the function whose result this is


@dataclass(frozen=True)
class Conversation:
    messages: tuple[Message, ...]
    tools: tuple[dict, ...] = ()  # OpenAI function schemas: {"type": "function", "function": {...}}
    source_index: int = 0  # position of the row in the input, for errors and the prepared dataset
    source_file: str = ""  # where the row came from, for error messages
    source_row: str = ""  # "line N" or "row N"
    dropped_messages: int = 0  # system/developer messages after the first (no template renders them)
    # Leading messages that are context only (a prompt-completion row's prompt): a policy that trains
    # assistant blocks trains none of theirs.
    context_messages: int = 0

    def assistant_blocks(self) -> list[tuple[int, int]]:
        """(first, last) message indices of each maximal run of consecutive assistant messages."""
        blocks: list[tuple[int, int]] = []
        for i, message in enumerate(self.messages):
            if message.role != "assistant":
                continue
            if blocks and blocks[-1][1] == i - 1:
                blocks[-1] = (blocks[-1][0], i)
            else:
                blocks.append((i, i))
        return blocks

    def trainable_blocks(self) -> list[tuple[int, int]]:
        """The assistant blocks a policy may train: those that end after the context."""
        return [block for block in self.assistant_blocks() if block[1] >= self.context_messages]

    def truncated(self, last_index: int) -> Conversation:
        return replace(self, messages=self.messages[: last_index + 1])
