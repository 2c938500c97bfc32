"""`inspect`: show one prepared example with its trained tokens highlighted."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.text import Text

from gptoss_tune.data.prepare import read_prepare_info
from gptoss_tune.errors import GptossTuneError
from gptoss_tune.harmony import tokens as T
from gptoss_tune.harmony.vocab import harmony_encoding

TRAINED_STYLE = "bold green"
SPECIAL_STYLE = "magenta"
PLAIN_OPEN, PLAIN_CLOSE = "⟦", "⟧"


def load_example(directory: str | Path, index: int) -> tuple[dict, dict]:
    import datasets

    info = read_prepare_info(directory)
    dataset = datasets.load_from_disk(str(directory))
    if not -len(dataset) <= index < len(dataset):
        raise GptossTuneError(f"--index {index} is out of range: the dataset has {len(dataset)} examples.")
    return info, dataset[index]


def runs(input_ids: list[int], labels: list[int]) -> list[tuple[bool, bool, list[int]]]:
    """Split into runs of (trained, special, ids) so each run decodes as a whole."""
    out: list[tuple[bool, bool, list[int]]] = []
    for token, label in zip(input_ids, labels, strict=True):
        key = (label != T.IGNORE_INDEX, token >= T.START_OF_TEXT)
        if out and out[-1][:2] == key and not key[1]:
            out[-1][2].append(token)
        else:
            out.append((*key, [token]))
    return out


def example_text(input_ids: list[int], labels: list[int], plain: bool) -> Text | str:
    encoding = harmony_encoding()
    rich_text = Text()
    plain_parts: list[str] = []
    trained_open = False
    for trained, special, ids in runs(input_ids, labels):
        piece = encoding.decode(ids)
        if plain:
            if trained != trained_open:
                plain_parts.append(PLAIN_OPEN if trained else PLAIN_CLOSE)
                trained_open = trained
            plain_parts.append(piece)
        else:
            style = TRAINED_STYLE if trained else ""
            if special:
                style = f"{style} {SPECIAL_STYLE}".strip()
            rich_text.append(piece, style=style or None)
    if plain:
        if trained_open:
            plain_parts.append(PLAIN_CLOSE)
        return "".join(plain_parts)
    return rich_text


def show_example(directory: str | Path, index: int, plain: bool, console: Console) -> None:
    info, row = load_example(directory, index)
    options = info["options"]
    header = (
        f"example {index}: source row {row['source_index']}, turn {row['turn']}, "
        f"{row['length']} tokens, {row['num_trained']} trained | loss_on={options['loss_on']} "
        f"template={options['template']} date={options['date']} effort={options['reasoning_effort']}"
    )
    body = example_text(row["input_ids"], row["labels"], plain)
    if plain:
        print(header)
        print(f"(trained tokens are between {PLAIN_OPEN} and {PLAIN_CLOSE})")
        print(body)
    else:
        console.print(Text(header, style="bold"))
        console.print(
            Text.assemble("legend: ", ("trained", TRAINED_STYLE), "  ", ("special token", SPECIAL_STYLE))
        )
        console.print(body)
