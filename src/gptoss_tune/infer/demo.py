"""`gptoss-tune demo`: the whole pipeline, offline, on a CPU, in a few minutes.

A random tiny gpt-oss (the real vocabulary and Harmony format) is LoRA-trained on a few
conversations of the bundled Multilingual-Thinking-shaped sample until it reproduces them, merged
into a bf16 checkpoint, and asked one of the training prompts with greedy decoding: the base model
babbles, the fine-tuned model must answer with the trained final answer word for word, or the demo
fails (non-zero exit).
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rich.console import Console
from rich.panel import Panel
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from gptoss_tune.data.synthetic import write_jsonl
from gptoss_tune.errors import GptossTuneError
from gptoss_tune.files import holds_files, write_json
from gptoss_tune.harmony.render import RenderOptions
from gptoss_tune.infer.generate import Completion, HfGenerator, SamplingOptions
from gptoss_tune.infer.prompt import ChatHistory, generation_prompt

# Rows of the bundled sample the demo trains on, the first being the one it chats with: short
# conversations with thinking in German, Italian and English (the last one has two turns).
DEMO_ROWS = (15, 29, 1)
DEMO_RECORD = "demo.json"
DEMO_DATA = "demo_data.jsonl"


@dataclass(frozen=True)
class DemoSettings:
    output: Path = Path("runs/demo")
    conversations: int = len(DEMO_ROWS)  # how many of DEMO_ROWS to train on (CI uses 1)
    steps: int = 80
    lr: float = 1e-2
    lora_rank: int = 32
    base: Path | None = None  # an existing tiny checkpoint to start from instead of a new one
    overwrite: bool = False

    def __post_init__(self) -> None:
        if not 1 <= self.conversations <= len(DEMO_ROWS):
            raise GptossTuneError(f"--conversations must be between 1 and {len(DEMO_ROWS)}.")
        if self.steps < 1:
            raise GptossTuneError("--steps must be at least 1.")


@dataclass
class DemoResult:
    output: Path
    reproduced: bool
    expected_final: str
    base_answer: dict
    tuned_answer: dict
    first_loss: float | None
    final_loss: float | None
    seconds: dict[str, float] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)


def sample_rows(indices: tuple[int, ...]) -> list[dict]:
    from gptoss_tune.data.load import bundled_sample_path

    rows = [json.loads(line) for line in bundled_sample_path().read_text(encoding="utf-8").splitlines()]
    return [rows[i] for i in indices]


def write_demo_data(rows: list[dict], path: Path) -> Path:
    """The chosen conversations in the `messages` shape (the dataset's own column), atomically."""
    return write_jsonl(({"messages": row["messages"]} for row in rows), path)


def chat_history(row: dict) -> tuple[ChatHistory, str]:
    """The training conversation up to its last user message, as a chat history plus that message."""
    history = ChatHistory(developer=row["developer"], reasoning_language=row["reasoning_language"])
    messages = row["messages"][1:]  # [0] is the system message that ChatHistory writes itself
    for user, assistant in zip(messages[0:-2:2], messages[1:-2:2], strict=True):
        history.add_exchange(user["content"], assistant["content"], assistant.get("thinking"))
    return history, messages[-2]["content"]


def check_reproduction(expected_final: str, completion: Completion) -> None:
    """The fine-tuned model must give the trained final answer, exactly, and stop after it."""
    if completion.final == expected_final and completion.stopped:
        return
    got = completion.final or completion.raw or "(nothing)"
    raise GptossTuneError(
        "The fine-tuned model did not reproduce its training answer in greedy decoding.\n"
        f"  expected: {expected_final!r}\n  got:      {got!r}"
        + ("" if completion.stopped else " (no stop token)")
        + "\nTrain longer (--steps) or with a higher --lr."
    )


def prepare_demo_folder(settings: DemoSettings) -> Path:
    """An empty output folder marked as a demo's (so that even an interrupted demo can be replaced);
    a previous demo's is replaced only with --overwrite, anything else never."""
    output = settings.output
    if holds_files(output):
        if not (output / DEMO_RECORD).is_file():
            raise GptossTuneError(f"{output} exists and is not a demo folder: choose another --output.")
        if not settings.overwrite:
            raise GptossTuneError(f"{output} holds a previous demo: pass --overwrite to replace it.")
        shutil.rmtree(output)
    output.mkdir(parents=True, exist_ok=True)
    write_json(output / DEMO_RECORD, {"status": "running"})
    return output


def _answer_panel(title: str, completion: Completion) -> Panel:
    text = Text()
    if completion.analysis:
        text.append(completion.analysis + "\n\n", style="dim")
    if completion.final:
        text.append(completion.final)
    elif completion.raw:
        text.append(completion.raw, style="yellow")
    return Panel(text, title=title, title_align="left")


def _merge_with_progress(base: Path, adapter: Path, out: Path, console: Console):
    from gptoss_tune.infer.merge import count_base_tensors, merge

    columns = (TextColumn("[bold]merge[/bold]"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task("merge", total=count_base_tensors(base))
        return merge(base, adapter, out, dtype="bf16", on_tensor=lambda: progress.advance(task))


def _timed(seconds: dict[str, float], stage: str, work: Callable):
    started = time.perf_counter()
    result = work()
    seconds[stage] = round(time.perf_counter() - started, 1)
    return result


def run_demo(settings: DemoSettings, console: Console) -> DemoResult:
    import torch

    from gptoss_tune.config import TrainConfig
    from gptoss_tune.model.init import init_model
    from gptoss_tune.train.run import run_training

    seconds: dict[str, float] = {}
    output = prepare_demo_folder(settings)
    rows = sample_rows(DEMO_ROWS[: settings.conversations])

    console.rule("[bold]1. a random tiny gpt-oss[/bold]")
    base = settings.base or _timed(
        seconds,
        "init",
        lambda: init_model("tiny", output / "base", seed=0, dtype=torch.float32),
    )
    console.print(f"base model: {base} (2 layers, hidden 64, the real 201,088-token vocabulary)")

    console.rule("[bold]2. LoRA training on the bundled sample[/bold]")
    data = write_demo_data(rows, output / DEMO_DATA)
    console.print(f"{len(rows)} conversation(s) from the bundled sample -> {data}")
    config = TrainConfig(
        model=str(base),
        data=str(data),
        output=str(output / "run"),
        loss_on="last",
        lora_rank=settings.lora_rank,
        lora_alpha=2.0 * settings.lora_rank,
        max_steps=settings.steps,
        lr=settings.lr,
        warmup_ratio=0.05,
        tokens_per_batch=4096,  # every conversation in each step
        device="cpu",
        dtype="fp32",
    ).validate()
    trained = _timed(seconds, "train", lambda: run_training(config, console))

    console.rule("[bold]3. merge into a bf16 checkpoint[/bold]")
    adapter = trained.files["adapter"]
    merged = _timed(
        seconds, "merge", lambda: _merge_with_progress(Path(base), adapter, output / "merged", console)
    )
    console.print(f"merged model: {merged.output} ({merged.bytes_written / 1e6:.0f} MB of weights)")

    console.rule("[bold]4. chat with a training prompt (greedy decoding)[/bold]")
    history, prompt = chat_history(rows[0])
    expected = rows[0]["final"]
    prompt_ids = generation_prompt(history.conversation_with(prompt), RenderOptions())
    expected_length = len(_completion_ids(rows[0]))
    sampling = SamplingOptions(max_new_tokens=expected_length + 16, temperature=0.0)
    console.print(Text(f"reasoning language: {rows[0]['reasoning_language']}", style="dim"))
    console.print(Text.assemble(("user> ", "bold green"), prompt))

    def answers() -> tuple[Completion, Completion]:
        with console.status("the base model answers"):
            base_answer = HfGenerator(base, device="cpu", dtype="fp32").complete(prompt_ids, sampling)
        with console.status("the fine-tuned model answers"):
            tuned_answer = HfGenerator(merged.output, device="cpu", dtype="fp32").complete(
                prompt_ids, sampling
            )
        return base_answer, tuned_answer

    base_answer, tuned_answer = _timed(seconds, "chat", answers)
    table = Table.grid(expand=True, padding=(0, 1))
    table.add_column(ratio=1)
    table.add_column(ratio=1)
    table.add_row(
        _answer_panel("base model", base_answer), _answer_panel("fine-tuned (merged)", tuned_answer)
    )
    console.print(table)

    reproduced = tuned_answer.final == expected and tuned_answer.stopped
    result = DemoResult(
        output=output,
        reproduced=reproduced,
        expected_final=expected,
        base_answer={"analysis": base_answer.analysis, "final": base_answer.final, "raw": base_answer.raw},
        tuned_answer={
            "analysis": tuned_answer.analysis,
            "final": tuned_answer.final,
            "raw": tuned_answer.raw,
        },
        first_loss=trained.first_loss,
        final_loss=trained.final_loss,
        seconds=seconds,
        files=_files_written(output, Path(base), trained.files, merged.output),
    )
    _write_record(result)
    check_reproduction(expected, tuned_answer)
    console.print(Text("✓ the fine-tuned model reproduces its training answer", style="bold green"))
    console.print(summary_table(result))
    return result


def _completion_ids(row: dict) -> list[int]:
    """Token ids the model must generate for the row's last answer (analysis, final, <|return|>)."""
    from gptoss_tune.data.conversation import Conversation, Message
    from gptoss_tune.harmony.labels import assistant_blocks, completion_span
    from gptoss_tune.harmony.render import render

    last = row["messages"][-1]
    conversation = Conversation(
        (Message("user", ""), Message("assistant", last["content"], last.get("thinking")))
    )
    rendered = render(conversation, RenderOptions())
    start, end = completion_span(assistant_blocks(rendered)[-1])
    return rendered.ids[start:end]


def _files_written(output: Path, base: Path, run_files: dict[str, Path], merged: Path) -> dict[str, str]:
    files = {"base model": base, "training data": output / DEMO_DATA}
    names = {"adapter": "adapter", "loss_plot": "loss plot", "metrics": "metrics", "checkpoint": "checkpoint"}
    files |= {label: run_files[key] for key, label in names.items() if key in run_files}
    files |= {"merged model": merged, "demo record": output / DEMO_RECORD}
    return {label: str(path) for label, path in files.items()}


def _write_record(result: DemoResult) -> None:
    status = "reproduced" if result.reproduced else "not reproduced"
    write_json(result.output / DEMO_RECORD, asdict(result) | {"output": str(result.output), "status": status})


def summary_table(result: DemoResult) -> Table:
    table = Table(title="demo done", show_header=False, title_style="bold")
    total = sum(result.seconds.values())
    stages = ", ".join(f"{stage} {seconds:.0f} s" for stage, seconds in result.seconds.items())
    table.add_row("time", f"{total:.0f} s ({stages})")
    if result.first_loss is not None and result.final_loss is not None:
        table.add_row("training loss", f"{result.first_loss:.3f} -> {result.final_loss:.3f}")
    for label, path in result.files.items():
        table.add_row(label, path)
    return table
