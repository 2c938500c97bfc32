"""Our renders against the real libraries: the official jinja template + tokenizer, and openai-harmony."""

from __future__ import annotations

from importlib import resources

import openai_harmony as oh
import pytest

from gptoss_tune.data.conversation import Conversation, Message
from gptoss_tune.data.load import SourceRow
from gptoss_tune.data.shapes import detect_format, normalize
from gptoss_tune.harmony import tokens as T
from gptoss_tune.harmony.labels import assistant_blocks, completion_span
from gptoss_tune.harmony.render import RenderOptions, keeps_thinking, render

from cases import ALL_ROWS, MESSAGES_ROWS

# The official template writes today's date (strftime_now); the comparisons pin it instead, so a run
# that crosses midnight still compares like with like.
PINNED_DATE = "2025-03-14"
TODAY_CALL = 'strftime_now("%Y-%m-%d")'


def conversation_of(name: str) -> Conversation:
    row = SourceRow("cases.py", name, data=ALL_ROWS[name])
    return normalize(row, detect_format(row), 0)


def prefixes(conversation: Conversation) -> list[Conversation]:
    """The whole conversation and every prefix that ends an assistant block (what `turns` renders)."""
    return [conversation] + [conversation.truncated(last) for _, last in conversation.assistant_blocks()]


def official_template() -> str:
    trl_copy = resources.files("trl").joinpath("chat_templates/gptoss.jinja").read_text()
    ours = resources.files("gptoss_tune.harmony").joinpath("chat_template.jinja").read_text()
    assert ours == trl_copy, "our packaged chat_template.jinja must be the official file"
    assert trl_copy.count(TODAY_CALL) == 1
    return trl_copy.replace(TODAY_CALL, f'"{PINNED_DATE}"')


def to_hf_messages(conversation: Conversation) -> list[dict]:
    """The conversation as transformers chat messages (thinking on every message: the template picks)."""
    out = []
    for m in conversation.messages:
        message = {"role": m.role, "content": m.content}
        if m.thinking is not None:
            message["thinking"] = m.thinking
        if m.tool_call is not None:
            message["tool_calls"] = [
                {
                    "type": "function",
                    "function": {"name": m.tool_call.name, "arguments": m.tool_call.arguments},
                }
            ]
        out.append(message)
    return out


def official_ids(tokenizer, conversation: Conversation, effort: str) -> list[int]:
    text = tokenizer.apply_chat_template(
        to_hf_messages(conversation),
        tools=list(conversation.tools) or None,
        chat_template=official_template(),
        tokenize=False,
        reasoning_effort=effort,
    )
    return tokenizer.encode(text, add_special_tokens=False)


@pytest.mark.parametrize("name", sorted(set(ALL_ROWS) - {"literal_special_text", "parallel_tool_calls"}))
@pytest.mark.parametrize("effort", ["medium", "high"])
def test_hf_template_matches_official_jinja_template(hf_tokenizer, name, effort):
    for conversation in prefixes(conversation_of(name)):
        ours = render(conversation, RenderOptions("hf", PINNED_DATE, effort)).ids
        assert ours == official_ids(hf_tokenizer, conversation, effort)


def test_parallel_tool_calls_are_all_rendered_and_results_keep_their_names(hf_tokenizer, encoding):
    """The official template renders only a message's first call and names every result after the latest
    call. We split calls into one message each (all rendered) and name each result after its own call;
    apart from those names the render is the template's."""
    conversation = conversation_of("parallel_tool_calls")
    assert [m.tool_call.name for m in conversation.messages if m.tool_call] == ["get_weather", "get_time"]
    assert [m.tool_name for m in conversation.messages if m.role == "tool"] == ["get_weather", "get_time"]
    ours = render(conversation, RenderOptions("hf", PINNED_DATE)).ids
    text = encoding.decode(ours)
    assert (
        "<|start|>functions.get_weather to=assistant" in text
        and "<|start|>functions.get_time to=assistant" in text
    )
    official = encoding.decode(official_ids(hf_tokenizer, conversation, "medium"))
    assert text.replace("functions.get_weather to=assistant", "functions.get_time to=assistant") == official


def test_literal_special_text_stays_text_where_the_template_route_breaks(hf_tokenizer, encoding):
    conversation = conversation_of("literal_special_text")
    for template in ("hf", "harmony"):
        ids = render(conversation, RenderOptions(template, PINNED_DATE)).ids
        assert ids.count(T.END) == 3 and ids.count(T.RETURN) == 1  # system, user, analysis; final
        assert "What does <|end|> mean?" in encoding.decode(ids)
    # The jinja + tokenizer route turns the literal text into control tokens.
    assert official_ids(hf_tokenizer, conversation, "medium").count(T.END) > 3


def inference_keeps_thinking(conversation: Conversation) -> list[bool]:
    """Which messages' thinking inference shows when the model writes the conversation's last
    message, written out apart from render.py: the analysis since the last final answer before it
    (a turn's tool calls), and the last message's own."""
    messages = conversation.messages
    finals_before_last = [
        i for i, m in enumerate(messages[:-1]) if m.role == "assistant" and m.tool_call is None
    ]
    cut = finals_before_last[-1] if finals_before_last else -1
    return [
        m.role == "assistant" and (i == len(messages) - 1 if m.tool_call is None else i > cut)
        for i, m in enumerate(messages)
    ]


def harmony_reference(conversation: Conversation, options: RenderOptions) -> list[int]:
    """openai-harmony rendering built straight from the conversation, independently of render.py."""
    effort = getattr(oh.ReasoningEffort, options.reasoning_effort.upper())
    messages = [
        oh.Message.from_role_and_content(
            oh.Role.SYSTEM,
            oh.SystemContent.new().with_conversation_start_date(options.date).with_reasoning_effort(effort),
        )
    ]
    rest = list(conversation.messages)
    developer = oh.DeveloperContent.new()
    if rest[0].role in ("system", "developer"):
        developer = developer.with_instructions(rest.pop(0).content)
    if conversation.tools:
        developer = developer.with_function_tools(
            [
                oh.ToolDescription.new(
                    t["function"]["name"], t["function"]["description"], t["function"]["parameters"]
                )
                for t in conversation.tools
            ]
        )
    if developer.instructions or conversation.tools:
        messages.append(oh.Message.from_role_and_content(oh.Role.DEVELOPER, developer))
    keep = inference_keeps_thinking(conversation)[len(conversation.messages) - len(rest) :]
    for m, keep_thinking in zip(rest, keep, strict=True):
        if m.role == "user":
            messages.append(oh.Message.from_role_and_content(oh.Role.USER, m.content))
        elif m.role == "tool":
            messages.append(
                oh.Message.from_author_and_content(
                    oh.Author.new(oh.Role.TOOL, f"functions.{m.tool_name}"), m.content
                )
                .with_channel("commentary")
                .with_recipient("assistant")
            )
        else:
            if keep_thinking and m.thinking:
                messages.append(
                    oh.Message.from_role_and_content(oh.Role.ASSISTANT, m.thinking).with_channel("analysis")
                )
            if m.tool_call:
                messages.append(
                    oh.Message.from_role_and_content(oh.Role.ASSISTANT, m.tool_call.arguments_text())
                    .with_channel("commentary")
                    .with_recipient(f"functions.{m.tool_call.name}")
                    .with_content_type("<|constrain|>json")
                )
            else:
                messages.append(
                    oh.Message.from_role_and_content(oh.Role.ASSISTANT, m.content).with_channel("final")
                )
    encoding = oh.load_harmony_encoding(oh.HarmonyEncodingName.HARMONY_GPT_OSS)
    config = oh.RenderConversationConfig(auto_drop_analysis=False)
    return encoding.render_conversation_for_training(oh.Conversation.from_messages(messages), config)


@pytest.mark.parametrize("name", sorted(ALL_ROWS))
@pytest.mark.parametrize("effort", ["low", "medium"])
def test_harmony_template_matches_openai_harmony(encoding, name, effort):
    options = RenderOptions("harmony", "2025-01-15", effort)
    for conversation in prefixes(conversation_of(name)):
        rendered = render(conversation, options)
        assert rendered.ids == harmony_reference(conversation, options)
        # message spans tile the sequence and each starts with <|start|> and ends with a terminal
        assert rendered.messages[0].start == 0 and rendered.messages[-1].end == len(rendered.ids)
        for a, b in zip(rendered.messages, rendered.messages[1:], strict=False):
            assert a.end == b.start
        for m in rendered.messages:
            assert rendered.ids[m.start] == T.START and rendered.ids[m.end - 1] in T.TERMINALS
            assert rendered.ids[m.content_start - 1] == T.MESSAGE


@pytest.mark.parametrize("name", sorted(n for n in MESSAGES_ROWS if "tool" not in n))
def test_assistant_completions_agree_between_templates(name):
    """Both templates render the model's own turns identically (tool calls differ by design: harmony
    writes `<|constrain|>json`, the template `json`)."""
    conversation = conversation_of(name)
    completions = []
    for template in ("hf", "harmony"):
        rendered = render(conversation, RenderOptions(template))
        completions.append([rendered.ids[slice(*completion_span(b))] for b in assistant_blocks(rendered)])
    assert completions[0] == completions[1]


def test_thinking_is_kept_only_where_inference_sees_it():
    conversation = conversation_of("multi_turn_thinking")
    for template in ("hf", "harmony"):
        assert keeps_thinking(conversation, template) == [False, False, False, False, False, False, True]
    tool = conversation_of("tool_call")

    def kept(conversation, template):
        keep = keeps_thinking(conversation, template)
        return [k for m, k in zip(conversation.messages, keep, strict=True) if m.role == "assistant"]

    # hf: the official template drops the call's thinking once a final answer follows it
    assert kept(tool, "hf") == [False, True]
    # harmony: the turn's final answer is written with the call's thinking in view
    assert kept(tool, "harmony") == [True, True]
    # a later turn drops it under both
    later = Conversation(tool.messages + (Message("user", "And Rome?"), Message("assistant", "Sunny.", "t")))
    assert kept(later, "hf") == kept(later, "harmony") == [False, False, True]
    for template in ("hf", "harmony"):
        assert kept(tool.truncated(2), template) == [True]


def test_harmony_final_answer_after_a_tool_sees_what_inference_shows(encoding):
    """The context of a final answer that follows a tool result is what openai-harmony renders for
    the next completion of that conversation: the call's thinking included."""
    tool = conversation_of("tool_call")
    options = RenderOptions("harmony", "2025-01-15", "medium")
    rendered = render(tool, options)
    answer = assistant_blocks(rendered)[-1]
    messages = [
        oh.Message.from_role_and_content(
            oh.Role.SYSTEM,
            oh.SystemContent.new()
            .with_conversation_start_date(options.date)
            .with_reasoning_effort(oh.ReasoningEffort.MEDIUM),
        ),
        oh.Message.from_role_and_content(
            oh.Role.DEVELOPER,
            oh.DeveloperContent.new()
            .with_instructions(tool.messages[0].content)
            .with_function_tools(
                [
                    oh.ToolDescription.new(
                        t["function"]["name"], t["function"]["description"], t["function"]["parameters"]
                    )
                    for t in tool.tools
                ]
            ),
        ),
        oh.Message.from_role_and_content(oh.Role.USER, tool.messages[1].content),
        oh.Message.from_role_and_content(oh.Role.ASSISTANT, tool.messages[2].thinking).with_channel(
            "analysis"
        ),
        oh.Message.from_role_and_content(oh.Role.ASSISTANT, tool.messages[2].tool_call.arguments_text())
        .with_channel("commentary")
        .with_recipient("functions.get_weather")
        .with_content_type("<|constrain|>json"),
        oh.Message.from_author_and_content(
            oh.Author.new(oh.Role.TOOL, "functions.get_weather"), tool.messages[3].content
        )
        .with_channel("commentary")
        .with_recipient("assistant"),
    ]
    prompt = encoding.render_conversation_for_completion(
        oh.Conversation.from_messages(messages), oh.Role.ASSISTANT
    )
    assert rendered.ids[: answer[0].start + 2] == list(prompt)


def test_system_message_carries_date_and_effort(encoding):
    for template in ("hf", "harmony"):
        ids = render(conversation_of("mt"), RenderOptions(template, "2024-02-29", "high")).ids
        text = encoding.decode(ids)
        assert "Current date: 2024-02-29" in text and "Reasoning: high" in text


def test_render_options_are_validated():
    from gptoss_tune.errors import GptossTuneError

    for bad in ({"template": "chatml"}, {"date": "28/11/2026"}, {"reasoning_effort": "max"}):
        with pytest.raises(GptossTuneError):
            RenderOptions(**bad)
