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


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A complete random tiny gpt-oss checkpoint (fp32), shared by the tests that train or generate."""
    import torch

    from gptoss_tune.model.init import init_model

    return init_model(
        "tiny", tmp_path_factory.mktemp("models") / "tiny", seed=0, dtype=torch.float32, progress=False
    )


@pytest.fixture(scope="session")
def short_chats(tmp_path_factory):
    """A prepared dataset of short conversations: cheap to train on the CPU."""
    import json

    from gptoss_tune.data.prepare import PrepareOptions, prepare

    folder = tmp_path_factory.mktemp("data")
    rows = []
    for i in range(12):
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": f"Number {i}?"},
                    {"role": "assistant", "content": f"It is {i}.", "thinking": f"Say {i}."},
                ]
            }
        )
    source = folder / "short.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    prepare(str(source), folder / "prepared", PrepareOptions())
    return folder / "prepared"


@pytest.fixture(scope="session")
def make_random_adapter():
    """make(base, out, options, b_std=0.05): a trained-looking LoRA adapter (PEFT's A initialization and
    a random, non-zero B) for `base`, saved in PEFT's format to `out`."""
    import torch

    from gptoss_tune.model.checkpoint import load_checkpoint
    from gptoss_tune.model.lora import apply_lora, save_adapter

    def make(base, out, options, b_std: float = 0.05):
        model = load_checkpoint(base, dtype=torch.float32)
        params = apply_lora(model, options, generator=torch.Generator().manual_seed(0))
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, param in params.items():
                if "lora_B" in name:
                    param.copy_(torch.randn(param.shape, generator=generator) * b_std)
        return save_adapter(model, options, out)

    return make
