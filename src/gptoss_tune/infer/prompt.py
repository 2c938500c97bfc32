"""The prompt a model sees at chat time: the conversation so far, rendered by the training renderer,
followed by the `<|start|>assistant` cue.

Rendering with `harmony.render` (the code that renders training data) means that a model fine-tuned
on `--template hf` or `--template harmony` data is prompted at chat time exactly as it was trained.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gptoss_tune.data.conversation import Conversation, Message
from gptoss_tune.harmony import tokens as T
from gptoss_tune.harmony.render import RenderOptions, render

GENERATION_CUE = (T.START, T.ASSISTANT)  # <|start|>assistant: what the model completes


def instructions_text(developer: str | None, reasoning_language: str | None) -> str:
    """The leading system message's text, with the Multilingual-Thinking instruction written as the
    dataset writes it ("reasoning language: X", a blank line, then the developer's instructions)."""
    parts = [f"reasoning language: {reasoning_language}"] if reasoning_language else []
    if developer:
        parts.append(developer)
    return "\n\n".join(parts)


def generation_prompt(conversation: Conversation, options: RenderOptions) -> list[int]:
    """Token ids of `conversation` (ending with a user or tool message) plus the assistant cue."""
    return render(conversation, options).ids + list(GENERATION_CUE)


@dataclass
class ChatHistory:
    """A conversation built turn by turn: a fixed system/developer text, then user and assistant turns.

    Assistant turns keep their thinking; the renderer drops it from earlier turns, as at training.
    """

    developer: str | None = None
    reasoning_language: str | None = None
    turns: list[Message] = field(default_factory=list)

    def leading_messages(self) -> list[Message]:
        text = instructions_text(self.developer, self.reasoning_language)
        return [Message("system", text)] if text else []

    def conversation_with(self, user_text: str) -> Conversation:
        return Conversation(tuple([*self.leading_messages(), *self.turns, Message("user", user_text)]))

    def add_exchange(self, user_text: str, final: str, analysis: str | None) -> None:
        self.turns += [Message("user", user_text), Message("assistant", final, thinking=analysis or None)]

    def reset(self) -> None:
        self.turns = []
