"""chat: the prompt is the training render + <|start|>assistant (checked against openai-harmony and the
official template), channels are parsed as tokens stream in, and generation runs on transformers/PEFT."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import openai_harmony as oh
import pytest
from rich.console import Console
from typer.testing import CliRunner

from gptoss_tune.cli import app
from gptoss_tune.data.conversation import Conversation, Message
from gptoss_tune.data.load import SourceRow
from gptoss_tune.data.shapes import normalize
from gptoss_tune.harmony.render import RenderOptions, render
from gptoss_tune.infer.chat import ChannelPrinter, ChatSession, interactive
from gptoss_tune.infer.generate import (
    Completion,
    Delta,
    HarmonyStream,
    HfGenerator,
    SamplingOptions,
    parse_completion,
    stop_token_ids,
)
from gptoss_tune.infer.merge import merge
from gptoss_tune.infer.prompt import ChatHistory, generation_prompt
from gptoss_tune.model.lora import LoraOptions

PINNED_DATE = "2025-03-14"  # in place of the official template's strftime_now: no midnight flake
DEVELOPER = "You are a patient tutor."


def history_with_one_exchange() -> ChatHistory:
    history = ChatHistory(developer=DEVELOPER, reasoning_language="German")
    history.add_exchange("Wie spät ist es?", "Es ist 12 Uhr.", analysis="Die Uhr zeigt zwölf.")
    return history


# --- the prompt --------------------------------------------------------------------------------------


@pytest.mark.parametrize("effort", ["low", "high"])
def test_harmony_prompt_equals_render_conversation_for_completion(encoding, effort) -> None:
    history = history_with_one_exchange()
    ours = generation_prompt(
        history.conversation_with("Und morgen?"), RenderOptions("harmony", "2025-02-03", effort)
    )

    efforts = {"low": oh.ReasoningEffort.LOW, "high": oh.ReasoningEffort.HIGH}
    system = (
        oh.SystemContent.new()
        .with_conversation_start_date("2025-02-03")
        .with_reasoning_effort(efforts[effort])
    )
    developer = oh.DeveloperContent.new().with_instructions(f"reasoning language: German\n\n{DEVELOPER}")
    messages = [
        oh.Message.from_role_and_content(oh.Role.SYSTEM, system),
        oh.Message.from_role_and_content(oh.Role.DEVELOPER, developer),
        oh.Message.from_role_and_content(oh.Role.USER, "Wie spät ist es?"),
        oh.Message.from_role_and_content(oh.Role.ASSISTANT, "Die Uhr zeigt zwölf.").with_channel("analysis"),
        oh.Message.from_role_and_content(oh.Role.ASSISTANT, "Es ist 12 Uhr.").with_channel("final"),
        oh.Message.from_role_and_content(oh.Role.USER, "Und morgen?"),
    ]
    expected = encoding.render_conversation_for_completion(
        oh.Conversation.from_messages(messages), oh.Role.ASSISTANT
    )
    assert ours == list(expected)


@pytest.mark.parametrize("with_history", [False, True])
def test_hf_prompt_equals_the_official_template_with_generation_prompt(hf_tokenizer, with_history) -> None:
    history = history_with_one_exchange() if with_history else ChatHistory(developer=DEVELOPER)
    conversation = history.conversation_with("Und morgen?")
    ours = generation_prompt(conversation, RenderOptions("hf", PINNED_DATE, "medium"))

    template = resources.files("trl").joinpath("chat_templates/gptoss.jinja").read_text()
    template = template.replace('strftime_now("%Y-%m-%d")', f'"{PINNED_DATE}"')
    messages = [
        {"role": m.role, "content": m.content} | ({"thinking": m.thinking} if m.thinking else {})
        for m in conversation.messages
    ]
    text = hf_tokenizer.apply_chat_template(
        messages,
        chat_template=template,
        tokenize=False,
        add_generation_prompt=True,
        reasoning_effort="medium",
    )
    assert ours == hf_tokenizer.encode(text, add_special_tokens=False)
    assert ours[-2:] == [200006, 173781]


def test_reasoning_language_instruction_is_written_as_the_dataset_writes_it() -> None:
    row = SourceRow(
        "x.jsonl",
        "line 1",
        {"reasoning_language": "French", "developer": DEVELOPER, "user": "Hi", "final": "Salut"},
    )
    trained = normalize(row, "mt-columns", 0)
    chat = ChatHistory(developer=DEVELOPER, reasoning_language="French").conversation_with("Hi")
    assert chat.messages == trained.messages[:2]
    assert (
        ChatHistory(reasoning_language="French").leading_messages()[0].content == "reasoning language: French"
    )
    assert ChatHistory().leading_messages() == []


def test_the_prompt_of_a_training_conversation_is_its_training_render(encoding) -> None:
    """Training render of [..., assistant] == chat prompt of [...] + the completion tokens."""
    options = RenderOptions("hf", "2025-08-05", "medium")
    history = history_with_one_exchange()
    prompt = generation_prompt(history.conversation_with("Und morgen?"), options)
    training = Conversation(
        history.conversation_with("Und morgen?").messages + (Message("assistant", "Morgen auch.", "Gleich."),)
    )
    trained_ids = render(training, options).ids
    assert trained_ids[: len(prompt)] == prompt


# --- parsing the stream ------------------------------------------------------------------------------

COMPLETION = (
    "<|channel|>analysis<|message|>Größe: 5 × 3 = 15 🙂<|end|>"
    "<|start|>assistant<|channel|>final<|message|>Die Fläche ist 15 m².<|return|>"
)


def test_stream_deltas_add_up_to_the_channels_openai_harmony_parses(encoding) -> None:
    tokens = encoding.encode(COMPLETION, allowed_special="all")
    stream = HarmonyStream()
    deltas = [delta for token in tokens for delta in stream.feed(token)]
    completion = stream.finish(stopped=True)
    assert (
        completion.analysis
        == "".join(d.text for d in deltas if d.channel == "analysis")
        == "Größe: 5 × 3 = 15 🙂"
    )
    assert (
        completion.final == "".join(d.text for d in deltas if d.channel == "final") == "Die Fläche ist 15 m²."
    )
    assert completion.raw == "" and completion.stopped
    reference = encoding.parse_messages_from_completion_tokens(tokens, oh.Role.ASSISTANT)
    assert [(m.channel, m.content[0].text) for m in reference] == [
        ("analysis", completion.analysis),
        ("final", completion.final),
    ]


def test_stream_cut_off_by_max_new_tokens_keeps_the_partial_channel(encoding) -> None:
    tokens = encoding.encode(COMPLETION, allowed_special="all")
    cut = tokens[: tokens.index(200008, 5) + 3]  # three tokens into the final message
    completion = parse_completion(cut)
    assert completion.analysis == "Größe: 5 × 3 = 15 🙂"
    assert completion.final and "Die Fläche ist 15 m²".startswith(completion.final)
    assert not completion.stopped and completion.raw == ""


def test_text_outside_harmony_is_reported_raw_not_dropped(encoding) -> None:
    babble = encoding.encode("just some words without any header", allowed_special=set())
    completion = parse_completion(babble)
    assert completion.channels == {} and completion.raw == "just some words without any header"

    after_analysis = (
        encoding.encode("<|channel|>analysis<|message|>Hmm.<|end|>", allowed_special="all") + babble
    )
    stream = HarmonyStream()
    deltas = [delta for token in after_analysis for delta in stream.feed(token)]
    completion = stream.finish(stopped=False)
    assert completion.analysis == "Hmm." and completion.raw == "just some words without any header"
    # a header that breaks Harmony streams raw text as soon as the parser gives up
    broken = encoding.encode("<|channel|><|message|>", allowed_special="all") + babble
    stream = HarmonyStream()
    raw = "".join(d.text for token in broken for d in stream.feed(token) if d.channel is None)
    assert raw.endswith("without any header") and stream.finish(False).raw == raw
    assert "".join(d.text for d in deltas if d.channel == "analysis") == "Hmm."


def test_two_messages_of_one_channel_stay_apart(encoding) -> None:
    text = (
        "<|channel|>final<|message|>It is 12:35.<|end|>"
        "<|start|>assistant<|channel|>final<|message|>Then it arrives at 12:35.<|return|>"
    )
    tokens = encoding.encode(text, allowed_special="all")
    reference = encoding.parse_messages_from_completion_tokens(tokens, oh.Role.ASSISTANT)
    assert parse_completion(tokens).final == "\n\n".join(m.content[0].text for m in reference)
    cut = parse_completion(tokens[:-3])  # the second message cut off by --max-new-tokens
    assert cut.final.startswith("It is 12:35.\n\nThen")


def test_stop_tokens_are_openai_harmonys(encoding) -> None:
    assert set(stop_token_ids()) == set(encoding.stop_tokens_for_assistant_actions()) == {200002, 200012}


def test_printer_dims_analysis_or_hides_it() -> None:
    deltas = [Delta("analysis", "thinking hard"), Delta("final", "The answer.")]
    for hide in (False, True):
        console = Console(record=True, width=80, force_terminal=True)
        printer = ChannelPrinter(console, hide_analysis=hide)
        for delta in deltas:
            printer(delta)
        printer.end(Completion([], {"final": "The answer."}, stopped=True))
        text = console.export_text(clear=False)
        assert "The answer." in text
        assert ("thinking hard" in text) is not hide
        if not hide:
            assert "\x1b[2m" in console.export_text(styles=True)  # dim


# --- sessions ----------------------------------------------------------------------------------------


class RecordingGenerator:
    """Answers every prompt with a canned completion and remembers the prompts."""

    has_adapter = False

    def __init__(self) -> None:
        self.prompts: list[list[int]] = []

    def complete(self, prompt_ids, sampling, on_delta=None, use_adapter=True, stop_tokens=None) -> Completion:
        self.prompts.append(prompt_ids)
        number = len(self.prompts)
        if on_delta:
            on_delta(Delta("final", f"answer {number}"))
        return Completion([], {"analysis": f"thought {number}", "final": f"answer {number}"}, stopped=True)


def test_interactive_session_keeps_history_resets_and_quits() -> None:
    generator = RecordingGenerator()
    options = RenderOptions()
    session = ChatSession(generator, options, SamplingOptions(), ChatHistory(developer=DEVELOPER))
    lines = iter(["first", "second", "/reset", "", "third", "/quit", "never read"])
    console = Console(record=True, width=100)
    interactive(session, console, hide_analysis=False, read_line=lambda: next(lines))

    first_turn = ChatHistory(developer=DEVELOPER)
    assert generator.prompts[0] == generation_prompt(first_turn.conversation_with("first"), options)
    first_turn.add_exchange("first", "answer 1", "thought 1")
    assert generator.prompts[1] == generation_prompt(first_turn.conversation_with("second"), options)
    assert generator.prompts[2] == generation_prompt(
        ChatHistory(developer=DEVELOPER).conversation_with("third"), options
    )
    assert len(generator.prompts) == 3
    assert "answer 3" in console.export_text()


def test_an_answer_cut_off_in_its_thinking_is_not_kept_in_the_history() -> None:
    class ThinkingOnly(RecordingGenerator):
        def complete(self, prompt_ids, sampling, on_delta=None, use_adapter=True, stop_tokens=None):
            self.prompts.append(prompt_ids)
            return Completion([], {"analysis": "still thinking"}, stopped=False)

    generator = ThinkingOnly()
    session = ChatSession(generator, RenderOptions(), SamplingOptions(), ChatHistory())
    console = Console(record=True, width=100)
    interactive(session, console, hide_analysis=False, read_line=iter(["first", "second", "/quit"]).__next__)
    assert generator.prompts[1] == generation_prompt(
        ChatHistory().conversation_with("second"), RenderOptions()
    )
    assert "not kept in the history" in console.export_text()


# --- generation on the tiny model -------------------------------------------------------------------


@pytest.fixture(scope="module")
def chat_adapter(tiny_model_dir, tmp_path_factory, make_random_adapter) -> Path:
    out = tmp_path_factory.mktemp("chat") / "adapter"
    return make_random_adapter(tiny_model_dir, out, LoraOptions(rank=4, alpha=8), b_std=0.5)


def test_base_plus_adapter_through_peft_generates_what_the_merged_model_generates(
    tiny_model_dir, chat_adapter, tmp_path
) -> None:
    prompt = generation_prompt(ChatHistory().conversation_with("Hello"), RenderOptions())
    greedy = SamplingOptions(max_new_tokens=12, temperature=0.0)
    with_adapter = HfGenerator(tiny_model_dir, chat_adapter, device="cpu", dtype="fp32")
    merged = HfGenerator(
        merge(tiny_model_dir, chat_adapter, tmp_path / "m", dtype="fp32").output, dtype="fp32"
    )
    base = HfGenerator(tiny_model_dir, dtype="fp32")

    tuned = with_adapter.complete(prompt, greedy)
    assert len(tuned.token_ids) == 12 and not tuned.stopped
    assert merged.complete(prompt, greedy).token_ids == tuned.token_ids
    base_answer = with_adapter.complete(prompt, greedy, use_adapter=False)
    assert base_answer.token_ids == base.complete(prompt, greedy).token_ids != tuned.token_ids

    sampled = SamplingOptions(max_new_tokens=8, temperature=1.0, seed=3)
    assert base.complete(prompt, sampled).token_ids == base.complete(prompt, sampled).token_ids


def test_generation_stops_on_the_given_stop_tokens(tiny_model_dir) -> None:
    generator = HfGenerator(tiny_model_dir, dtype="fp32")
    prompt = generation_prompt(ChatHistory().conversation_with("Hello"), RenderOptions())
    greedy = SamplingOptions(max_new_tokens=6, temperature=0.0)
    first = generator.complete(prompt, greedy).token_ids[0]
    stopped = generator.complete(prompt, greedy, stop_tokens=[first])
    assert stopped.token_ids == [first] and stopped.stopped


def test_chat_command_answers_one_prompt(tiny_model_dir, chat_adapter) -> None:
    result = CliRunner().invoke(
        app,
        [
            "chat",
            "--model",
            str(tiny_model_dir),
            "--adapter",
            str(chat_adapter),
            "--prompt",
            "Hi",
            "--max-new-tokens",
            "5",
            "--temperature",
            "0",
            "--reasoning-language",
            "German",
            "--device",
            "cpu",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "[stopped at --max-new-tokens]" in result.output


def test_sampling_options_are_validated() -> None:
    from gptoss_tune.errors import GptossTuneError

    for bad in ({"max_new_tokens": 0}, {"temperature": -1.0}, {"top_p": 0.0}):
        with pytest.raises(GptossTuneError):
            SamplingOptions(**bad)
    assert SamplingOptions(temperature=0).greedy
