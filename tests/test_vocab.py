"""Vocabulary resolution: env var, cache, the bpe-openai wheel, download; a clear error otherwise."""

from __future__ import annotations

from pathlib import Path

import pytest

from gptoss_tune.errors import GptossTuneError
from gptoss_tune.harmony import vocab


@pytest.fixture
def isolated(monkeypatch, tmp_path):
    monkeypatch.delenv("GPTOSS_TUNE_VOCAB", raising=False)
    monkeypatch.delenv("TIKTOKEN_ENCODINGS_BASE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path


def test_bpe_openai_wheel_fills_the_cache(isolated):
    path = vocab.resolve_vocab_file()
    assert path == isolated / "cache" / "gptoss-tune" / vocab.VOCAB_FILE
    assert vocab._sha256(path) == vocab.VOCAB_SHA256


def test_env_var_folder_wins(isolated, monkeypatch):
    folder = isolated / "enc"
    folder.mkdir()
    (folder / vocab.VOCAB_FILE).write_bytes(vocab._from_bpe_openai())
    monkeypatch.setenv("TIKTOKEN_ENCODINGS_BASE", str(folder))
    assert vocab.resolve_vocab_file() == folder / vocab.VOCAB_FILE


def test_corrupt_file_is_skipped_and_nothing_found_lists_every_place(isolated, monkeypatch):
    bad = isolated / "bad.tiktoken"
    bad.write_text("not a vocabulary")
    monkeypatch.setenv("GPTOSS_TUNE_VOCAB", str(bad))

    def offline():
        raise OSError("network unreachable")

    monkeypatch.setattr(vocab, "_bpe_openai_dir", lambda: None)
    monkeypatch.setattr(vocab, "_download", offline)
    with pytest.raises(GptossTuneError) as info:
        vocab.resolve_vocab_file()
    message = str(info.value)
    for expected in (
        "$GPTOSS_TUNE_VOCAB",
        "wrong sha256",
        "cache",
        "bpe-openai package (not installed)",
        "network unreachable",
        "pip install bpe-openai",
    ):
        assert expected in message
    assert not Path(isolated / "cache" / "gptoss-tune" / vocab.VOCAB_FILE).exists()


def test_token_ids_match_openai_harmony(encoding):
    from gptoss_tune.harmony import tokens as T

    for name, token_id in T.SPECIAL_TOKENS.items():
        assert encoding.encode(name, allowed_special="all") == [token_id]
    assert encoding.encode("assistant", disallowed_special=()) == [T.ASSISTANT]


def test_hf_tokenizer_encodes_like_harmony(hf_tokenizer, encoding):
    for text in [
        "Hello, world!",
        "Écris un haïku.\n\nSur la mer.  ",
        "日本語 123456 🙂",
        "  spaces\t\ttabs\r\n",
    ]:
        assert hf_tokenizer.encode(text, add_special_tokens=False) == encoding.encode(
            text, disallowed_special=()
        )
    assert hf_tokenizer.convert_tokens_to_ids(["<|start|>", "<|end|>", "<|return|>", "<|call|>"]) == [
        200006,
        200007,
        200002,
        200012,
    ]
