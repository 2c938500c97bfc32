"""Read rows from local files, folders, `save_to_disk` datasets or the Hugging Face hub.

Every row carries where it came from (file and line or row number) so errors can point at it. A
row that cannot even be parsed is yielded with its error, so `--skip-invalid` can count it.

Arrow sources (Parquet, `save_to_disk` folders, the hub) give every record of a column every field
any record has, filled with null: there a null field means an absent one and is dropped, so that a
tool schema or tool-call arguments never gain fields the data does not have.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from gptoss_tune.errors import DataError, GptossTuneError

FILE_SUFFIXES = (".jsonl", ".ndjson", ".json", ".parquet", ".csv")
BUNDLED_SAMPLE = "sample"  # DATA value that selects the bundled Multilingual-Thinking-shaped sample


@dataclass(frozen=True)
class SourceRow:
    file: str
    row: str  # "line 12" (JSON lines, CSV) or "row 3" (1-based record number)
    data: dict | None = None
    error: DataError | None = None


def bundled_sample_path() -> Path:
    from importlib import resources

    return Path(
        str(resources.files("gptoss_tune.data").joinpath("samples/multilingual_thinking_sample.jsonl"))
    )


def iter_rows(source: str, split: str | None = None, subset: str | None = None) -> Iterator[SourceRow]:
    if source == BUNDLED_SAMPLE:
        yield from _iter_file(bundled_sample_path())
        return
    path = Path(source).expanduser()
    if path.is_file():
        yield from _iter_file(path)
    elif path.is_dir():
        yield from _iter_directory(path, split)
    elif _looks_like_hub_id(source):
        yield from _iter_hub(source, split, subset)
    else:
        raise GptossTuneError(
            f"{source}: no such file or folder (and not a Hugging Face hub id 'owner/name')."
        )


def _looks_like_hub_id(source: str) -> bool:
    parts = source.split("/")
    return len(parts) == 2 and all(parts) and not source.startswith((".", "~")) and not Path(source).suffix


def _iter_file(path: Path) -> Iterator[SourceRow]:
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        yield from _iter_json_lines(path)
    elif suffix == ".json":
        yield from _iter_json(path)
    elif suffix == ".parquet":
        yield from _iter_parquet(path)
    elif suffix == ".csv":
        yield from _iter_csv(path)
    else:
        raise GptossTuneError(
            f"{path}: unsupported file type '{suffix}'. Use one of {', '.join(FILE_SUFFIXES)}."
        )


def _iter_json_lines(path: Path) -> Iterator[SourceRow]:
    with open(path, encoding="utf-8-sig") as f:  # -sig: a byte-order mark is not part of the first row
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"line {number}"
            try:
                value = json.loads(line)
            except json.JSONDecodeError as exc:
                yield SourceRow(
                    str(path),
                    where,
                    error=DataError(
                        f"malformed JSON ({exc.msg} at column {exc.colno}); fix the line or pass --skip-invalid",
                        file=str(path),
                        row=where,
                        reason="malformed_json",
                    ),
                )
                continue
            yield _object_row(path, where, value)


def _object_row(path: Path, where: str, value) -> SourceRow:
    if isinstance(value, dict):
        return SourceRow(str(path), where, data=value)
    return SourceRow(
        str(path),
        where,
        error=DataError(
            f"expected a JSON object, found {type(value).__name__}",
            file=str(path),
            row=where,
            reason="malformed_json",
        ),
    )


def _iter_json(path: Path) -> Iterator[SourceRow]:
    text = path.read_text(encoding="utf-8-sig")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # JSON lines saved with a .json name
            yield from _iter_json_lines(path)
            return
        raise DataError(
            f"malformed JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})",
            file=str(path),
            reason="malformed_json",
        ) from None
    if isinstance(value, dict):
        lists = [key for key, item in value.items() if isinstance(item, list)]
        if len(lists) != 1:
            raise DataError(
                "expected a list of objects (or an object holding exactly one list)",
                file=str(path),
                reason="unknown_shape",
            )
        value = value[lists[0]]
    if not isinstance(value, list):
        raise DataError("expected a list of objects", file=str(path), reason="unknown_shape")
    for number, item in enumerate(value, start=1):
        yield _object_row(path, f"row {number}", item)


def _iter_parquet(path: Path) -> Iterator[SourceRow]:
    import pyarrow.parquet as pq

    number = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
        for record in batch.to_pylist():
            number += 1
            yield SourceRow(str(path), f"row {number}", data=without_arrow_nulls(record))


def _iter_csv(path: Path) -> Iterator[SourceRow]:
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        for record in reader:
            yield SourceRow(str(path), f"line {reader.line_num}", data=dict(record))


def without_arrow_nulls(value):
    """A record read through Arrow with its null fields dropped, at every depth (list items stay)."""
    if isinstance(value, dict):
        return {key: without_arrow_nulls(item) for key, item in value.items() if item is not None}
    if isinstance(value, list):
        return [without_arrow_nulls(item) for item in value]
    return value


def _is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def _data_files(folder: Path) -> list[Path]:
    """The data files of a folder of files, at any depth. Hidden files and folders (editor and
    notebook copies) are not data, nor are datasets saved inside it (such as a prepared output)."""
    found = []
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_dir() and not _is_saved_dataset(entry):
            found.extend(_data_files(entry))
        elif entry.is_file() and entry.suffix.lower() in FILE_SUFFIXES:
            found.append(entry)
    return found


def _iter_directory(path: Path, split: str | None) -> Iterator[SourceRow]:
    if _is_saved_dataset(path):
        yield from _iter_saved_dataset(path, split)
        return
    files = _data_files(path)
    if not files:
        raise GptossTuneError(
            f"{path}: the folder holds no {', '.join(FILE_SUFFIXES)} files and is not a "
            "datasets.save_to_disk folder."
        )
    for file in files:
        yield from _iter_file(file)


def _iter_dataset(dataset, label: str) -> Iterator[SourceRow]:
    for number, record in enumerate(dataset, start=1):
        yield SourceRow(label, f"row {number}", data=without_arrow_nulls(record))


def _pick_split(dataset_dict, split: str | None, label: str):
    names = list(dataset_dict.keys())
    chosen = split or ("train" if "train" in names else names[0] if len(names) == 1 else None)
    if chosen not in names:
        raise GptossTuneError(f"{label}: choose a split with --split (available: {', '.join(names)}).")
    return dataset_dict[chosen]


def _iter_saved_dataset(path: Path, split: str | None) -> Iterator[SourceRow]:
    import datasets

    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        loaded = _pick_split(loaded, split, str(path))
    yield from _iter_dataset(loaded, str(path))


def _iter_hub(dataset_id: str, split: str | None, subset: str | None) -> Iterator[SourceRow]:
    import datasets

    try:
        loaded = datasets.load_dataset(dataset_id, subset, split=split)
    except Exception as exc:  # the hub client raises many types (offline, not found, gated)
        raise GptossTuneError(
            f"Cannot load '{dataset_id}' from the Hugging Face hub ({type(exc).__name__}: {exc}). "
            "Offline? Download it where you are online (or pass a local .jsonl/.parquet/folder path)."
        ) from None
    if isinstance(loaded, datasets.DatasetDict):
        loaded = _pick_split(loaded, split, dataset_id)
    label = f"{dataset_id}" + (f"[{split}]" if split else "")
    yield from _iter_dataset(loaded, label)
