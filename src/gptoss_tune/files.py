"""Writing outputs so that a failed or killed run never leaves a half-written file or folder:
write into a temporary sibling, rename it into place when complete."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from gptoss_tune.errors import GptossTuneError


def holds_files(output: Path) -> bool:
    """Whether an output folder already has something in it. An output path that is a file is an
    error: no command writes its outputs over a file."""
    if output.exists() and not output.is_dir():
        raise GptossTuneError(f"{output} is a file, and the output must be a folder: choose another path.")
    return output.is_dir() and any(output.iterdir())


@contextmanager
def atomic_directory(out_dir: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of `out_dir` to write into; rename it to `out_dir` on success and
    delete it on failure, so a failed run never leaves a half-written output. An existing `out_dir`
    is replaced only with `overwrite` (or when it is an empty directory)."""
    out_dir = Path(os.path.abspath(out_dir))  # "." has no name to make a sibling of
    if holds_files(out_dir) and not overwrite:
        raise GptossTuneError(f"{out_dir} already exists. Choose another output directory or remove it.")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    temporary = out_dir.with_name(f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}")
    temporary.mkdir()
    try:
        yield temporary
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    if out_dir.exists():
        previous = out_dir.with_name(f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}")
        out_dir.rename(previous)
        temporary.rename(out_dir)
        shutil.rmtree(previous, ignore_errors=True)
    else:
        temporary.rename(out_dir)


@contextmanager
def atomic_file(path: str | Path, mode: str = "w") -> Iterator[IO]:
    """Open a temporary sibling of `path` for writing (`mode` "w" for UTF-8 text, "wb" for bytes);
    it replaces `path` when the block completes and is deleted if it fails."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with open(temporary, mode, encoding=None if "b" in mode else "utf-8") as handle:
            yield handle
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def read_json_object(path: Path, remedy: str) -> dict:
    """A JSON object from `path`; a file that is unreadable, not JSON or not an object is an error
    naming it, ending with `remedy` (what the user should do)."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise GptossTuneError(f"{path}: cannot read it ({exc}); {remedy}") from None
    if not isinstance(value, dict):
        raise GptossTuneError(f"{path}: expected a JSON object; {remedy}")
    return value


def write_json(path: Path, value: Mapping[str, Any]) -> None:
    """Write JSON atomically (a temporary sibling, then a rename)."""
    with atomic_file(path) as handle:
        handle.write(json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_safetensors(tensors: Mapping[str, Any], path: Path, metadata: dict[str, str] | None = None) -> None:
    """safetensors' save_file, leaving the file readable as the umask allows, like every other file we
    write: safetensors 0.8 writes through a temporary file created 0600, which a server running as
    another user (a container, a shared cluster) cannot read."""
    from safetensors.torch import save_file

    save_file(dict(tensors), path, metadata=metadata)
    os.chmod(path, 0o666 & ~_umask())
