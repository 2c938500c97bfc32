"""Chat with a model: one answer or an interactive session, streamed channel by channel.

The prompt is the conversation so far rendered by the training renderer plus `<|start|>assistant`;
the answer's analysis is shown dimmed (or hidden) and its final answer plainly, as they arrive.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from rich.console import Console
from rich.text import Text

from gptoss_tune.harmony.render import RenderOptions
from gptoss_tune.infer.generate import Completion, Delta, Generator, SamplingOptions
from gptoss_tune.infer.prompt import ChatHistory, generation_prompt

RESET_COMMAND, QUIT_COMMANDS = "/reset", ("/quit", "/exit")
CHANNEL_LABELS = {"analysis": "thinking", "commentary": "commentary", None: "not Harmony"}


@dataclass
class ChatSession:
    generator: Generator
    render_options: RenderOptions
    sampling: SamplingOptions
    history: ChatHistory = field(default_factory=ChatHistory)

    def prompt_ids(self, user_text: str) -> list[int]:
        return generation_prompt(self.history.conversation_with(user_text), self.render_options)

    def ask(self, user_text: str, on_delta: Callable[[Delta], None] | None = None) -> Completion:
        """Answer `user_text` after the history, then add the exchange to the history, unless the
        model gave no answer at all (cut off in its thinking): an empty answer the model never wrote
        would stand in the next prompt."""
        completion = self.generator.complete(self.prompt_ids(user_text), self.sampling, on_delta)
        final = completion.final or completion.raw
        if final.strip():
            self.history.add_exchange(user_text, final, completion.analysis)
        return completion


class ChannelPrinter:
    """Prints deltas as they arrive: analysis dimmed (or hidden), final plain, other text labelled."""

    def __init__(self, console: Console, hide_analysis: bool = False) -> None:
        self.console = console
        self.hide_analysis = hide_analysis
        self.channel: str | None | bool = False  # False: nothing printed yet
        self.raw_printed = ""

    def _style(self, channel: str | None) -> str:
        return {"analysis": "dim", "final": "", None: "yellow"}.get(channel, "cyan")

    def _start_channel(self, channel: str | None) -> None:
        if self.channel is not False:
            self.console.print()
        if channel != "final":
            self.console.print(Text(f"[{CHANNEL_LABELS.get(channel, channel)}] ", style="italic dim"), end="")
        self.channel = channel

    def __call__(self, delta: Delta) -> None:
        if delta.channel == "analysis" and self.hide_analysis:
            return
        if delta.channel != self.channel:
            self._start_channel(delta.channel)
        if delta.channel is None:
            self.raw_printed += delta.text
        self.console.print(Text(delta.text, style=self._style(delta.channel)), end="")

    def end(self, completion: Completion) -> None:
        """Finish the answer: text left in an unfinished header is only known now."""
        if completion.raw.startswith(self.raw_printed) and len(completion.raw) > len(self.raw_printed):
            self(Delta(None, completion.raw[len(self.raw_printed) :]))
        if self.channel is not False:
            self.console.print()
        if not completion.stopped:
            self.console.print(Text("[stopped at --max-new-tokens]", style="italic dim"))
        if not (completion.final or completion.raw).strip():
            self.console.print(
                Text("[no answer: this exchange is not kept in the history]", style="italic dim")
            )
        self.channel = False
        self.raw_printed = ""


def answer_once(session: ChatSession, prompt: str, console: Console, hide_analysis: bool) -> Completion:
    printer = ChannelPrinter(console, hide_analysis)
    completion = session.ask(prompt, printer)
    printer.end(completion)
    return completion


def interactive(
    session: ChatSession, console: Console, hide_analysis: bool, read_line: Callable[[], str] | None = None
) -> None:
    """Read prompts until /quit or end of input; /reset forgets the conversation so far."""
    read = read_line or (lambda: console.input("[bold green]you>[/bold green] "))
    console.print(Text(f"{RESET_COMMAND} forgets the conversation, {QUIT_COMMANDS[0]} ends.", style="dim"))
    while True:
        try:
            line = read().strip()
        except EOFError:
            break
        if not line:
            continue
        if line in QUIT_COMMANDS:
            break
        if line == RESET_COMMAND:
            session.history.reset()
            console.print(Text("(conversation cleared)", style="dim"))
            continue
        answer_once(session, line, console, hide_analysis)
