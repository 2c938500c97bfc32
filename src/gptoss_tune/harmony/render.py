"""Render a Conversation to Harmony token ids, with the position of every rendered message.

Two templates:
- `hf`: token for token what the official gpt-oss chat template (chat_template.jinja in
  openai/gpt-oss-20b) plus its tokenizer produce, except that data text is always ordinary text;
- `harmony`: what openai-harmony's `render_conversation_for_training` produces (it is called
  directly), with `auto_drop_analysis=False` and our own choice of which thinking to keep.

Both keep an earlier turn's thinking out, as inference does. Within a turn that calls tools they
differ (see `keeps_thinking`): `hf` renders what the official template renders, `harmony` what
inference shows the model.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from datetime import date
from importlib import resources

from gptoss_tune.data.conversation import Conversation, Message
from gptoss_tune.errors import DataError, GptossTuneError
from gptoss_tune.harmony import tokens as T
from gptoss_tune.harmony.vocab import harmony_encoding

TEMPLATES = ("hf", "harmony")
REASONING_EFFORTS = ("low", "medium", "high")
DEFAULT_DATE = "2025-08-05"  # gpt-oss release day; fixed so that renders do not depend on today
DEFAULT_IDENTITY = "You are ChatGPT, a large language model trained by OpenAI."


@dataclass(frozen=True)
class RenderOptions:
    template: str = "hf"
    date: str = DEFAULT_DATE
    reasoning_effort: str = "medium"

    def __post_init__(self) -> None:
        if self.template not in TEMPLATES:
            raise GptossTuneError(f"Unknown template '{self.template}': use one of {', '.join(TEMPLATES)}.")
        if self.reasoning_effort not in REASONING_EFFORTS:
            raise GptossTuneError(
                f"Unknown reasoning effort '{self.reasoning_effort}': use one of {', '.join(REASONING_EFFORTS)}."
            )
        try:
            valid = date.fromisoformat(self.date).isoformat() == self.date
        except ValueError:
            valid = False
        if not valid:  # fromisoformat also takes 20250805 and week dates
            raise GptossTuneError(f"Invalid date '{self.date}': use YYYY-MM-DD.")


@dataclass(frozen=True)
class RenderedMessage:
    role: str  # author role: system, developer, user, assistant, tool
    channel: str | None  # analysis, commentary, final for assistant messages
    start: int  # index of its <|start|>
    content_start: int  # index right after its <|message|>
    end: int  # exclusive; ids[end - 1] is its terminal token


@dataclass(frozen=True)
class Rendered:
    ids: list[int]
    messages: list[RenderedMessage]


def keeps_thinking(conversation: Conversation, template: str = "hf") -> list[bool]:
    """Whose thinking is rendered.

    A final answer's thinking only when it is the example's last message (earlier turns' thinking is
    dropped, as at inference). A tool call's thinking while no final answer follows it: the turn is
    still going on. The two templates differ on the final answer that ends the example:
    - `hf`: it counts as a following final answer, so the calls before it in its turn lose their
      thinking. This is what the official chat template renders for a whole conversation.
    - `harmony`: it does not count. The model writes that answer with its turn's earlier thinking in
      view: harmony keeps a turn's analysis until its final message, and serving stacks send it back
      after a tool result (the official template too, rendering the prompt with
      add_generation_prompt).
    """
    messages = conversation.messages
    later_final = False
    keep = [False] * len(messages)
    for i in range(len(messages) - 1, -1, -1):
        message = messages[i]
        if message.role != "assistant":
            continue
        last = i == len(messages) - 1
        if message.tool_call is not None:
            keep[i] = not later_final
        else:
            keep[i] = last
            later_final = later_final or not (last and template == "harmony")
    return keep


def hf_leaves_out_tool_thinking(conversation: Conversation) -> bool:
    """Whether the `hf` template renders a tool call's thinking out of sight of the final answer
    that ends its turn (the official template's rule), where inference would show it."""
    hf, harmony = keeps_thinking(conversation, "hf"), keeps_thinking(conversation, "harmony")
    return any(
        message.thinking is not None and here != there
        for message, here, there in zip(conversation.messages, hf, harmony, strict=True)
    )


def render(conversation: Conversation, options: RenderOptions) -> Rendered:
    if options.template == "hf":
        return _render_hf(conversation, options)
    return _render_harmony(conversation, options)


# --- the official chat template ------------------------------------------------------------------


def system_text(options: RenderOptions, has_tools: bool) -> str:
    text = (
        f"{DEFAULT_IDENTITY}\nKnowledge cutoff: 2024-06\nCurrent date: {options.date}\n\n"
        f"Reasoning: {options.reasoning_effort}\n\n"
        "# Valid channels: analysis, commentary, final. Channel must be included for every message."
    )
    if has_tools:
        text += "\nCalls to these tools must go to the commentary channel: 'functions'."
    return text


@functools.cache
def _official_template_module():
    """The official template's macros, evaluated the way transformers evaluates chat templates."""
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    source = resources.files("gptoss_tune.harmony").joinpath("chat_template.jinja").read_text()
    template = env.from_string(source)
    return template.make_module(vars={"messages": [{"role": "user", "content": ""}], "strftime_now": str})


def tools_namespace_text(tools: tuple[dict, ...]) -> str:
    """The `## functions` namespace exactly as the official template writes it (its own macro)."""
    import jinja2

    try:
        return str(_official_template_module().render_tool_namespace("functions", [dict(t) for t in tools]))
    except (jinja2.TemplateError, TypeError) as exc:  # what the macro raises on a schema it cannot write
        raise DataError(
            f"the official chat template cannot write these tool schemas ({type(exc).__name__}: {exc}). "
            "Give every function a string 'description' and its parameters as a JSON schema, "
            "or use --template harmony.",
            field="tools",
            reason="invalid_tools",
        ) from None


def developer_text(instructions: str, tools: tuple[dict, ...]) -> str:
    text = f"# Instructions\n\n{instructions}\n\n" if instructions else ""
    if tools:
        text += "# Tools\n\n" + tools_namespace_text(tools)
    return text


class _IdsBuilder:
    """Appends messages made of special tokens and text; text is always encoded as ordinary text."""

    def __init__(self) -> None:
        self.encoding = harmony_encoding()
        self.ids: list[int] = []
        self.messages: list[RenderedMessage] = []

    def text(self, text: str) -> None:
        if text:
            self.ids.extend(self.encoding.encode(text, disallowed_special=()))

    def message(
        self, role: str, header: str, channel: str | None, header_tail: str, content: str, terminal: int
    ) -> None:
        start = len(self.ids)
        self.ids.append(T.START)
        self.text(header)
        if channel is not None:
            self.ids.append(T.CHANNEL)
            self.text(channel + header_tail)
        self.ids.append(T.MESSAGE)
        content_start = len(self.ids)
        self.text(content)
        self.ids.append(terminal)
        self.messages.append(RenderedMessage(role, channel, start, content_start, len(self.ids)))


def _split_instructions(conversation: Conversation, template: str) -> tuple[str, tuple, list[bool]]:
    """(instructions from a leading system/developer message, the messages after it, whether each
    of those keeps its thinking): what both renderers start from."""
    messages = tuple(conversation.messages)
    instructions = ""
    if messages and messages[0].role in ("system", "developer"):
        instructions, messages = messages[0].content, messages[1:]
    offset = len(conversation.messages) - len(messages)
    return instructions, messages, keeps_thinking(conversation, template)[offset:]


def _render_hf(conversation: Conversation, options: RenderOptions) -> Rendered:
    out = _IdsBuilder()
    out.message("system", "system", None, "", system_text(options, bool(conversation.tools)), T.END)
    instructions, messages, keep = _split_instructions(conversation, "hf")
    if instructions or conversation.tools:
        out.message(
            "developer", "developer", None, "", developer_text(instructions, conversation.tools), T.END
        )
    for i, message in enumerate(messages):
        if message.role == "user":
            out.message("user", "user", None, "", message.content, T.END)
        elif message.role == "tool":
            header = f"functions.{message.tool_name} to=assistant"
            out.message(
                "tool", header, "commentary", "", json.dumps(message.content, ensure_ascii=False), T.END
            )
        elif message.role == "assistant":
            if keep[i] and message.thinking is not None:
                out.message("assistant", "assistant", "analysis", "", message.thinking, T.END)
            if message.tool_call is not None:
                call = message.tool_call
                out.message(
                    "assistant",
                    f"assistant to=functions.{call.name}",
                    "commentary",
                    " json",
                    call.arguments_text(),
                    T.CALL,
                )
            else:
                last = i == len(messages) - 1
                out.message(
                    "assistant", "assistant", "final", "", message.content, T.RETURN if last else T.END
                )
        # system/developer messages after the first are dropped by normalization
    return Rendered(out.ids, out.messages)


# --- openai-harmony ------------------------------------------------------------------------------


def _harmony_messages(conversation: Conversation, options: RenderOptions) -> list:
    import openai_harmony as oh

    effort = {
        "low": oh.ReasoningEffort.LOW,
        "medium": oh.ReasoningEffort.MEDIUM,
        "high": oh.ReasoningEffort.HIGH,
    }
    system = (
        oh.SystemContent.new()
        .with_conversation_start_date(options.date)
        .with_reasoning_effort(effort[options.reasoning_effort])
    )
    out = [oh.Message.from_role_and_content(oh.Role.SYSTEM, system)]

    instructions, messages, keep = _split_instructions(conversation, "harmony")
    if instructions or conversation.tools:
        developer = oh.DeveloperContent.new()
        if instructions:
            developer = developer.with_instructions(instructions)
        if conversation.tools:
            developer = developer.with_function_tools([_harmony_tool(tool) for tool in conversation.tools])
        out.append(oh.Message.from_role_and_content(oh.Role.DEVELOPER, developer))
    for i, message in enumerate(messages):
        out.extend(_harmony_message(oh, message, keep[i]))
    return out


def _harmony_tool(tool: dict):
    import openai_harmony as oh

    function = tool.get("function", tool)
    return oh.ToolDescription.new(
        function["name"], function.get("description", ""), parameters=function.get("parameters")
    )


def _harmony_message(oh, message: Message, keep_thinking: bool) -> list:
    if message.role == "user":
        return [oh.Message.from_role_and_content(oh.Role.USER, message.content)]
    if message.role == "tool":
        author = oh.Author.new(oh.Role.TOOL, f"functions.{message.tool_name}")
        return [
            oh.Message.from_author_and_content(author, message.content)
            .with_recipient("assistant")
            .with_channel("commentary")
        ]
    out = []
    if keep_thinking and message.thinking is not None:
        out.append(
            oh.Message.from_role_and_content(oh.Role.ASSISTANT, message.thinking).with_channel("analysis")
        )
    if message.tool_call is not None:
        call = message.tool_call
        out.append(
            oh.Message.from_role_and_content(oh.Role.ASSISTANT, call.arguments_text())
            .with_channel("commentary")
            .with_recipient(f"functions.{call.name}")
            .with_content_type("<|constrain|>json")
        )
    else:
        out.append(oh.Message.from_role_and_content(oh.Role.ASSISTANT, message.content).with_channel("final"))
    return out


def _render_harmony(conversation: Conversation, options: RenderOptions) -> Rendered:
    import openai_harmony as oh

    messages = _harmony_messages(conversation, options)
    config = oh.RenderConversationConfig(auto_drop_analysis=False)
    ids = list(
        harmony_encoding().render_conversation_for_training(oh.Conversation.from_messages(messages), config)
    )
    # Data text never renders as special tokens, so each message ends at the first terminal token after
    # its <|message|>.
    spans: list[RenderedMessage] = []
    start = 0
    for message in messages:
        content_start = ids.index(T.MESSAGE, start) + 1
        end = next(i for i in range(content_start, len(ids)) if ids[i] in T.TERMINALS) + 1
        spans.append(RenderedMessage(message.author.role.value, message.channel, start, content_start, end))
        start = end
    if start != len(ids):
        raise AssertionError("openai-harmony message boundaries do not add up to the rendered conversation")
    return Rendered(ids, spans)
