"""Find the o200k_base vocabulary that gpt-oss's tokenizer (o200k_harmony) is built on, offline if possible.

Order: $GPTOSS_TUNE_VOCAB (the file), $TIKTOKEN_ENCODINGS_BASE (a folder holding it), our cache,
the `bpe-openai` wheel (which ships it gzipped), then a download into the cache. Each candidate
is checked against the known sha256, so a truncated or foreign file is never used.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import importlib.util
import os
import urllib.request
from pathlib import Path

from gptoss_tune.errors import GptossTuneError
from gptoss_tune.files import atomic_file

VOCAB_FILE = "o200k_base.tiktoken"
VOCAB_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"
VOCAB_URL = "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken"


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "gptoss-tune"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _bpe_openai_dir() -> Path | None:
    """Where the bpe-openai package is installed, found without importing it (its import is slow)."""
    spec = importlib.util.find_spec("bpe_openai")
    return Path(spec.submodule_search_locations[0]) if spec and spec.submodule_search_locations else None


def _from_bpe_openai() -> bytes | None:
    package = _bpe_openai_dir()
    packed = package / "data" / f"{VOCAB_FILE}.gz" if package else None
    return gzip.decompress(packed.read_bytes()) if packed and packed.is_file() else None


def _download() -> bytes:
    with urllib.request.urlopen(VOCAB_URL, timeout=60) as response:
        return response.read()


def resolve_vocab_file() -> Path:
    """Return the path of a verified o200k_base.tiktoken, fetching it into the cache if needed."""
    looked: list[str] = []

    def verified(path: Path, label: str) -> Path | None:
        if not path.is_file():
            looked.append(f"{label}: {path} (not found)")
            return None
        if _sha256(path) != VOCAB_SHA256:
            looked.append(f"{label}: {path} (wrong sha256)")
            return None
        return path

    candidates = []
    if env_file := os.environ.get("GPTOSS_TUNE_VOCAB"):
        candidates.append((Path(env_file), "$GPTOSS_TUNE_VOCAB"))
    if env_dir := os.environ.get("TIKTOKEN_ENCODINGS_BASE"):
        candidates.append((Path(env_dir) / VOCAB_FILE, "$TIKTOKEN_ENCODINGS_BASE"))
    cached = cache_dir() / VOCAB_FILE
    candidates.append((cached, "cache"))
    for path, label in candidates:
        if found := verified(path, label):
            return found

    for label, fetch in (("the bpe-openai package", _from_bpe_openai), (VOCAB_URL, _download)):
        try:
            data = fetch()
        except OSError as exc:
            looked.append(f"{label} ({exc})")
            continue
        if data is None:
            looked.append(f"{label} (not installed)")
            continue
        if hashlib.sha256(data).hexdigest() != VOCAB_SHA256:
            looked.append(f"{label} (wrong sha256)")
            continue
        with atomic_file(cached, "wb") as handle:
            handle.write(data)
        return cached

    places = "\n  - ".join(looked)
    raise GptossTuneError(
        f"Cannot find the o200k_base vocabulary ({VOCAB_FILE}). Looked in:\n  - {places}\n"
        "Fix: `pip install bpe-openai==0.1.4` (ships it), or put the file in a folder and set "
        "TIKTOKEN_ENCODINGS_BASE to that folder, or set GPTOSS_TUNE_VOCAB to the file."
    )


@functools.cache
def harmony_encoding():
    """openai-harmony's HARMONY_GPT_OSS encoding, loaded from the resolved vocabulary."""
    from openai_harmony import HarmonyEncodingName, load_harmony_encoding

    vocab = resolve_vocab_file()
    # openai-harmony reads the vocabulary from this folder (and would download it otherwise).
    if vocab.name != VOCAB_FILE:
        linked = cache_dir() / VOCAB_FILE
        if not linked.is_file():
            with atomic_file(linked, "wb") as handle:
                handle.write(vocab.read_bytes())
        vocab = linked
    os.environ["TIKTOKEN_ENCODINGS_BASE"] = str(vocab.parent)
    return load_harmony_encoding(HarmonyEncodingName.HARMONY_GPT_OSS)
