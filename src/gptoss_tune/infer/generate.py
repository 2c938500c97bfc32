"""Generation: transformers' `generate` (with its KV cache) on a merged checkpoint or on base + adapter
through PEFT, stopping on openai-harmony's stop tokens, with the completion parsed into Harmony
channels as the tokens arrive (openai-harmony's StreamableParser).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from gptoss_tune.devices import pick_device, pick_dtype
from gptoss_tune.errors import GptossTuneError
from gptoss_tune.harmony import tokens as T
from gptoss_tune.harmony.vocab import harmony_encoding


@dataclass(frozen=True)
class SamplingOptions:
    """How tokens are picked. temperature 0 is greedy decoding (then top_p and seed do not matter)."""

    max_new_tokens: int = 1024
    temperature: float = 1.0  # OpenAI's recommendation for gpt-oss: temperature 1.0, top_p 1.0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise GptossTuneError("--max-new-tokens must be at least 1.")
        if self.temperature < 0:
            raise GptossTuneError("--temperature must be >= 0 (0 is greedy decoding).")
        if not 0 < self.top_p <= 1:
            raise GptossTuneError("--top-p must be in (0, 1].")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


# ---------------------------------------------------------------------------------------------------
# Parsing a completion into Harmony channels, token by token
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Delta:
    """New text of one channel (`analysis`, `commentary`, `final`), or `None` for text outside any
    Harmony message (a model that does not follow the format, e.g. an untrained one)."""

    channel: str | None
    text: str


@dataclass
class Completion:
    token_ids: list[int]
    channels: dict[str, str] = field(default_factory=dict)  # channel -> its text, messages a blank line apart
    raw: str = ""  # text that is not part of any Harmony message
    stopped: bool = False  # ended on a stop token (not on --max-new-tokens)

    @property
    def analysis(self) -> str:
        return self.channels.get("analysis", "")

    @property
    def final(self) -> str:
        return self.channels.get("final", "")


class HarmonyStream:
    """Feeds completion tokens (what follows `<|start|>assistant`) to openai-harmony's StreamableParser.

    Text that cannot be parsed as Harmony, from where the parser gave up (or from the unfinished
    header it was reading), is reported as raw text rather than dropped.
    """

    def __init__(self) -> None:
        import openai_harmony as oh

        self.encoding = harmony_encoding()
        self.parser = oh.StreamableParser(self.encoding, oh.Role.ASSISTANT, strict=False)
        self.tokens: list[int] = []
        self.message_start = 0  # index in `tokens` where the message being parsed starts
        self.broken = False
        self.raw_shown = ""

    def feed(self, token: int) -> list[Delta]:
        import openai_harmony as oh

        self.tokens.append(token)
        if not self.broken:
            messages_before = len(self.parser.messages)
            try:
                self.parser.process(token)
            except oh.HarmonyError:
                self.broken = True
            else:
                if len(self.parser.messages) > messages_before:
                    self.message_start = len(self.tokens)
                delta = self.parser.last_content_delta
                return [Delta(self.parser.current_channel, delta)] if delta else []
        return self._raw_delta()

    def _raw_text(self) -> str:
        return self.encoding.decode(self.tokens[self.message_start :])

    def _raw_delta(self) -> list[Delta]:
        text = self._raw_text()
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
            return []
        new, self.raw_shown = text[len(self.raw_shown) :], text
        return [Delta(None, new)] if new else []

    def finish(self, stopped: bool) -> Completion:
        """The completion so far; `stopped` says whether generation ended on a stop token."""
        channels: dict[str, str] = {}
        for message in self.parser.messages:
            text = "".join(getattr(part, "text", "") for part in message.content)
            _add_message(channels, message.channel or "", text)
        raw = ""
        if self.broken or self.message_start < len(self.tokens):
            if not self.broken and self.parser.current_channel is not None:
                # cut off inside a message's content (--max-new-tokens): keep what it said
                _add_message(channels, self.parser.current_channel, self.parser.current_content)
            else:
                raw = self._raw_text()
        return Completion(list(self.tokens), channels, raw, stopped)


def _add_message(channels: dict[str, str], channel: str, text: str) -> None:
    """A channel's messages, a blank line apart (a model may write two final messages)."""
    channels[channel] = f"{channels[channel]}\n\n{text}" if channel in channels else text


def parse_completion(token_ids: list[int], stop_tokens: set[int] | None = None) -> Completion:
    """Parse a whole completion (the tokens after `<|start|>assistant`)."""
    stops = stop_tokens if stop_tokens is not None else set(stop_token_ids())
    stream = HarmonyStream()
    for token in token_ids:
        stream.feed(token)
    return stream.finish(stopped=bool(token_ids) and token_ids[-1] in stops)


def stop_token_ids() -> list[int]:
    """<|return|> and <|call|>: where the assistant hands the turn back (openai-harmony's list)."""
    return sorted(harmony_encoding().stop_tokens_for_assistant_actions())


# ---------------------------------------------------------------------------------------------------
# Generators
# ---------------------------------------------------------------------------------------------------

OnDelta = Callable[[Delta], None]


class Generator(Protocol):
    """Completes a prompt (token ids ending with `<|start|>assistant`); `use_adapter=False` asks for
    the base model's answer where an adapter is loaded; `stop_tokens` replaces the default stops
    (<|return|>, <|call|>)."""

    has_adapter: bool

    def complete(
        self,
        prompt_ids: list[int],
        sampling: SamplingOptions,
        on_delta: OnDelta | None = None,
        use_adapter: bool = True,
        stop_tokens: list[int] | None = None,
    ) -> Completion: ...


class _TokenStreamer:
    """transformers streamer interface (`put`, `end`): skips the prompt, hands on each new token."""

    def __init__(self, on_token: Callable[[int], None]) -> None:
        self.on_token = on_token
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        for token in value.reshape(-1).tolist():
            self.on_token(int(token))

    def end(self) -> None:
        pass


def is_mxfp4_checkpoint(path: Path) -> bool:
    config = json.loads((path / "config.json").read_text())
    return (config.get("quantization_config") or {}).get("quant_method") == "mxfp4"


def load_hf_model(model: str | Path, device: torch.device, dtype: torch.dtype):
    """transformers' GptOssForCausalLM from a local folder or hub id, in eval mode on `device`."""
    from transformers import AutoModelForCausalLM, Mxfp4Config
    from transformers.utils import logging as hf_logging

    from gptoss_tune.model.checkpoint import read_config, resolve_model_path
    from gptoss_tune.model.random_weights import RandomWeights

    path = resolve_model_path(model)
    read_config(path)  # a clear error for a folder that is not a gpt-oss checkpoint
    if RandomWeights.read(path) is not None:
        raise GptossTuneError(
            f"{path} is a random-on-load folder (init-model --random-on-load): it holds no weights for "
            "transformers to load. Write one with weights (init-model without --random-on-load), or `merge` "
            "an adapter into it, which draws the weights and writes them."
        )
    extra = {}
    if is_mxfp4_checkpoint(path):
        # The MXFP4 kernels are fetched from the hub at run time; dequantizing works everywhere.
        extra["quantization_config"] = Mxfp4Config(dequantize=True)
    hf_logging.disable_progress_bar()
    loaded = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **extra)
    return loaded.to(device).eval()


def load_peft_adapter(model, adapter: str | Path):
    """Wrap a transformers model with a PEFT LoRA adapter directory (no merge)."""
    from peft import PeftModel

    from gptoss_tune.model.lora import read_adapter

    read_adapter(adapter)  # validates the adapter with our error messages first
    with warnings.catch_warnings():
        # peft 0.21 calls a transformers 5 method that warns about its own deprecation
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        return PeftModel.from_pretrained(model, str(adapter), is_trainable=False).eval()


class HfGenerator:
    """transformers generation on a checkpoint, optionally with a PEFT adapter on top."""

    def __init__(
        self, model: str | Path, adapter: str | Path | None = None, device: str = "auto", dtype: str = "auto"
    ) -> None:
        self.device = pick_device(device)
        self.dtype = pick_dtype(dtype, self.device)
        base = load_hf_model(model, self.device, self.dtype)
        self.model = load_peft_adapter(base, adapter) if adapter is not None else base
        self.has_adapter = adapter is not None
        self.stop_tokens = stop_token_ids()

    def _generation_config(self, sampling: SamplingOptions, stop_tokens: list[int]):
        from transformers import GenerationConfig

        values = dict(
            max_new_tokens=sampling.max_new_tokens,
            eos_token_id=stop_tokens,
            pad_token_id=T.END_OF_TEXT,  # as in the published generation_config.json
            use_cache=True,
            do_sample=not sampling.greedy,
        )
        if not sampling.greedy:
            values.update(temperature=sampling.temperature, top_p=sampling.top_p, top_k=0)
        return GenerationConfig(**values)

    @torch.inference_mode()
    def complete(
        self,
        prompt_ids: list[int],
        sampling: SamplingOptions,
        on_delta: OnDelta | None = None,
        use_adapter: bool = True,
        stop_tokens: list[int] | None = None,
    ) -> Completion:
        stops = stop_tokens or self.stop_tokens
        stream = HarmonyStream()

        def on_token(token: int) -> None:
            for delta in stream.feed(token):
                if on_delta is not None:
                    on_delta(delta)

        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)
        input_ids = torch.tensor([prompt_ids], device=self.device)
        arguments = dict(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            generation_config=self._generation_config(sampling, stops),
            streamer=_TokenStreamer(on_token),
        )
        if use_adapter or not self.has_adapter:
            self.model.generate(**arguments)
        else:
            with self.model.disable_adapter():
                self.model.generate(**arguments)
        tokens = stream.tokens
        return stream.finish(stopped=bool(tokens) and tokens[-1] in stops)
