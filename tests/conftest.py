from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def hf_tokenizer():
    from gptoss_tune.harmony.hf_tokenizer import build_hf_tokenizer

    return build_hf_tokenizer()


@pytest.fixture(scope="session")
def encoding():
    from gptoss_tune.harmony.vocab import harmony_encoding

    return harmony_encoding()
