"""Presets: the published gpt-oss architectures and the tiny test model."""

from __future__ import annotations

import pytest
import torch

from gptoss_tune.errors import GptossTuneError
from gptoss_tune.model.gpt_oss import GptOss
from gptoss_tune.model.presets import preset_config


def parameter_count(preset: str) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in GptOss(preset_config(preset)).parameters())


@pytest.mark.parametrize(
    ("preset", "layers", "experts", "parameters"),
    [("20b", 24, 32, 20_914_757_184), ("120b", 36, 128, 116_829_156_672)],
)
def test_published_architectures(preset: str, layers: int, experts: int, parameters: int) -> None:
    config = preset_config(preset)
    assert (config.num_hidden_layers, config.num_local_experts, config.num_experts_per_tok) == (
        layers,
        experts,
        4,
    )
    assert (config.hidden_size, config.intermediate_size, config.head_dim) == (2880, 2880, 64)
    assert (config.num_attention_heads, config.num_key_value_heads, config.sliding_window) == (64, 8, 128)
    assert config.layer_types[:3] == ["sliding_attention", "full_attention", "sliding_attention"]
    assert len(config.layer_types) == layers
    assert config.rope_parameters == {
        "rope_type": "yarn",
        "rope_theta": 150000,
        "factor": 32.0,
        "original_max_position_embeddings": 4096,
        "beta_fast": 32.0,
        "beta_slow": 1.0,
        "truncate": False,
    }
    assert (config.vocab_size, config.max_position_embeddings, config.tie_word_embeddings) == (
        201088,
        131072,
        False,
    )
    assert (config.eos_token_id, config.pad_token_id, config.swiglu_limit) == (200002, 199999, 7.0)
    # The model cards: 20.91B and 116.83B parameters.
    assert parameter_count(preset) == parameters


def test_tiny_keeps_the_real_vocabulary_and_exercises_every_feature() -> None:
    config = preset_config("tiny")
    assert config.vocab_size == 201088
    assert set(config.layer_types) == {"sliding_attention", "full_attention"}
    assert config.sliding_window <= 16
    assert config.num_attention_heads > config.num_key_value_heads > 1
    assert config.num_local_experts > config.num_experts_per_tok > 1
    assert config.rope_parameters["rope_type"] == "yarn"


def test_presets_are_fresh_objects() -> None:
    preset_config("tiny").num_hidden_layers = 99
    assert preset_config("tiny").num_hidden_layers == 2


def test_unknown_preset_names_the_choices() -> None:
    with pytest.raises(GptossTuneError, match="tiny, 20b, 120b"):
        preset_config("7b")
