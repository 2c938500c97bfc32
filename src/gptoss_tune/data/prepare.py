"""`prepare`: rows in any shape -> a `datasets.load_from_disk` folder of input_ids + labels.

The folder is written to a temporary sibling and renamed when complete; it holds `prepare.json`
with the options, the vocabulary hash and statistics.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from gptoss_tune import __version__
from gptoss_tune.data.conversation import Conversation
from gptoss_tune.data.load import SourceRow, iter_rows
from gptoss_tune.data.shapes import FORMATS, detect_format, normalize
from gptoss_tune.errors import DataError, GptossTuneError
from gptoss_tune.files import atomic_directory, holds_files, write_json
from gptoss_tune.harmony import tokens as T
from gptoss_tune.harmony.labels import POLICIES, make_labels
from gptoss_tune.harmony.render import DEFAULT_DATE, RenderOptions, hf_leaves_out_tool_thinking, render
from gptoss_tune.harmony.vocab import VOCAB_SHA256

PREPARE_INFO = "prepare.json"
RENDER_KEYS = ("template", "date", "reasoning_effort")  # the options a chat prompt must share with the data
HISTOGRAM_EDGES = (0, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)


@dataclass(frozen=True)
class PrepareOptions:
    template: str = "hf"
    date: str = DEFAULT_DATE
    reasoning_effort: str = "medium"
    loss_on: str = "turns"
    format: str = "auto"
    max_length: int | None = None
    truncate: bool = False
    skip_invalid: bool = False
    split: str | None = None
    subset: str | None = None

    def __post_init__(self) -> None:
        if self.loss_on not in POLICIES:
            raise GptossTuneError(f"Unknown --loss-on '{self.loss_on}': use one of {', '.join(POLICIES)}.")
        if self.format not in FORMATS:
            raise GptossTuneError(f"Unknown --format '{self.format}': use one of {', '.join(FORMATS)}.")
        if self.max_length is not None and self.max_length < 2:
            raise GptossTuneError("--max-length must be at least 2.")
        self.render_options()  # validates template, date and effort

    def render_options(self) -> RenderOptions:
        return RenderOptions(self.template, self.date, self.reasoning_effort)


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    source_index: int
    turn: int  # which assistant block of the conversation (0 unless --loss-on turns)


@dataclass
class PrepareStats:
    rows: int = 0
    conversations: int = 0
    examples: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    truncated: int = 0
    dropped_system_messages: int = 0
    # `hf` only: conversations whose final answer after a tool result is trained without the call's
    # thinking (the official template drops it; inference shows it; `harmony` keeps it)
    tool_thinking_left_out: int = 0
    empty_answers: int = 0  # conversations with an empty final answer (trained to answer nothing)
    skipped: Counter = field(default_factory=Counter)
    lengths: list[int] = field(default_factory=list)

    def summary(self) -> dict:
        counts = [0] * (len(HISTOGRAM_EDGES))
        for length in self.lengths:
            bucket = sum(1 for edge in HISTOGRAM_EDGES[1:] if length > edge)
            counts[bucket] += 1
        labels = [f"<= {edge}" for edge in HISTOGRAM_EDGES[1:]] + [f"> {HISTOGRAM_EDGES[-1]}"]
        stats = {k: v for k, v in asdict(self).items() if k not in ("lengths", "skipped")}
        stats["skipped"] = dict(sorted(self.skipped.items()))
        stats["length_histogram"] = {label: n for label, n in zip(labels, counts, strict=True) if n}
        stats["max_length"] = max(self.lengths, default=0)
        stats["mean_length"] = round(sum(self.lengths) / len(self.lengths), 1) if self.lengths else 0
        return stats


def examples_for(conversation: Conversation, options: PrepareOptions) -> Iterator[Example]:
    """The examples of one conversation under the label policy (before length limits)."""
    render_options = options.render_options()
    trainable = conversation.trainable_blocks()
    if options.loss_on == "turns":
        for turn, (_, last) in enumerate(trainable):
            rendered = render(conversation.truncated(last), render_options)
            yield Example(rendered.ids, make_labels(rendered, "last"), conversation.source_index, turn)
    else:
        rendered = render(conversation, render_options)
        context_blocks = len(conversation.assistant_blocks()) - len(trainable)
        labels = make_labels(rendered, options.loss_on, context_blocks)
        yield Example(rendered.ids, labels, conversation.source_index, 0)


def count_trained(labels: list[int]) -> int:
    """Labels the loss policy trains (every label that is not IGNORE_INDEX)."""
    return sum(1 for label in labels if label != T.IGNORE_INDEX)


def _fit_length(example: Example, options: PrepareOptions, stats: PrepareStats) -> Example | None:
    if options.max_length is None or len(example.input_ids) <= options.max_length:
        return example
    if options.truncate:
        head = Example(
            example.input_ids[: options.max_length],
            example.labels[: options.max_length],
            example.source_index,
            example.turn,
        )
        if any(label != T.IGNORE_INDEX for label in head.labels):
            stats.truncated += 1
            return head
    stats.skipped["too_long"] += 1
    return None


def has_an_empty_answer(conversation: Conversation) -> bool:
    return any(
        m.role == "assistant" and m.tool_call is None and not m.content.strip() for m in conversation.messages
    )


def skip_or_raise(error: DataError, options: PrepareOptions, stats: PrepareStats) -> None:
    """A bad row stops the run, or with --skip-invalid is counted by its reason."""
    if not options.skip_invalid:
        raise error
    stats.skipped[error.reason] += 1


def iter_conversations(
    rows: Iterator[SourceRow], options: PrepareOptions, stats: PrepareStats
) -> Iterator[Conversation]:
    fmt = None if options.format == "auto" else options.format
    for index, row in enumerate(rows):
        stats.rows += 1
        try:
            if row.error is not None:
                raise row.error
            fmt = fmt or detect_format(row)
            conversation = normalize(row, fmt, index)
        except DataError as exc:
            skip_or_raise(exc, options, stats)
            continue
        yield conversation


def build_examples(
    rows: Iterator[SourceRow],
    options: PrepareOptions,
    stats: PrepareStats,
    on_row: Callable[[], None] = lambda: None,
) -> list[Example]:
    examples: list[Example] = []
    for conversation in iter_conversations(rows, options, stats):
        on_row()
        try:
            rendered = list(examples_for(conversation, options))
        except DataError as exc:  # what only a template finds (a tool schema it cannot write)
            skip_or_raise(exc.located(conversation.source_file, conversation.source_row), options, stats)
            continue
        stats.conversations += 1
        stats.dropped_system_messages += conversation.dropped_messages
        stats.tool_thinking_left_out += int(
            options.template == "hf" and hf_leaves_out_tool_thinking(conversation)
        )
        stats.empty_answers += int(has_an_empty_answer(conversation))
        for example in rendered:
            trained = count_trained(example.labels)
            if trained == 0:
                stats.skipped["no_trained_tokens"] += 1
                continue
            fitted = _fit_length(example, options, stats)
            if fitted is None:
                continue
            examples.append(fitted)
            stats.examples += 1
            stats.tokens += len(fitted.input_ids)
            stats.trained_tokens += trained if fitted is example else count_trained(fitted.labels)
            stats.lengths.append(len(fitted.input_ids))
    return examples


@contextmanager
def _quiet_datasets():
    """datasets draws its own progress bars when saving; ours is enough."""
    import datasets

    was_disabled = datasets.utils.are_progress_bars_disabled()
    datasets.utils.disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            datasets.utils.enable_progress_bars()


def _to_dataset(examples: list[Example]):
    import datasets

    features = datasets.Features(
        {
            "input_ids": datasets.Sequence(datasets.Value("int32")),
            "labels": datasets.Sequence(datasets.Value("int32")),
            "source_index": datasets.Value("int64"),
            "turn": datasets.Value("int32"),
            "length": datasets.Value("int32"),
            "num_trained": datasets.Value("int32"),
        }
    )
    columns = {
        "input_ids": [e.input_ids for e in examples],
        "labels": [e.labels for e in examples],
        "source_index": [e.source_index for e in examples],
        "turn": [e.turn for e in examples],
        "length": [len(e.input_ids) for e in examples],
        "num_trained": [count_trained(e.labels) for e in examples],
    }
    return datasets.Dataset.from_dict(columns, features=features)


def check_output(output: Path, overwrite: bool) -> None:
    if holds_files(output) and not overwrite:
        raise GptossTuneError(
            f"{output} already exists and is not empty; pass --overwrite or choose another --output."
        )


def write_prepared(examples: list[Example], info: dict, output: Path) -> None:
    """Write the dataset folder atomically: a temporary sibling renamed into place when complete
    (`prepare` checked the output before the work)."""
    with atomic_directory(output, overwrite=True) as tmp:
        with _quiet_datasets():
            _to_dataset(examples).save_to_disk(str(tmp))
        write_json(tmp / PREPARE_INFO, info)


def prepare(
    source: str,
    output: str | Path,
    options: PrepareOptions,
    overwrite: bool = False,
    progress: Callable[[], None] = lambda: None,
) -> dict:
    """Prepare `source` into `output`; returns the prepare.json content."""
    started = time.perf_counter()
    check_output(Path(output), overwrite)  # before the work, not only after it
    stats = PrepareStats()
    examples = build_examples(iter_rows(source, options.split, options.subset), options, stats, progress)
    if not examples:
        skipped = ", ".join(f"{k}: {v}" for k, v in stats.skipped.items()) or "no rows"
        raise GptossTuneError(f"{source}: no example to write ({skipped}).")
    info = {
        "gptoss_tune_version": __version__,
        "source": str(source),
        "options": asdict(options),
        "vocab": {"file": "o200k_base.tiktoken", "sha256": VOCAB_SHA256},
        "stats": stats.summary(),
        "seconds": round(time.perf_counter() - started, 2),
    }
    write_prepared(examples, info, Path(output))
    return info


def is_prepared(path: str | Path) -> bool:
    return (Path(path) / PREPARE_INFO).is_file()


def read_prepare_info(directory: str | Path) -> dict:
    path = Path(directory) / PREPARE_INFO
    if not path.is_file():
        raise GptossTuneError(
            f"{directory}: not a prepared dataset (no {PREPARE_INFO}); run `gptoss-tune prepare`."
        )
    return json.loads(path.read_text())


def prepared_render_settings(directory: str | Path) -> dict[str, str]:
    """How a prepared dataset was rendered: {template, date, reasoning_effort}."""
    options = read_prepare_info(directory)["options"]
    return {key: options[key] for key in RENDER_KEYS}
