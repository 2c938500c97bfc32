"""Model presets: the real gpt-oss-20b / gpt-oss-120b architectures and a tiny one for tests.

20b and 120b repeat the fields of the published `config.json` files (openai/gpt-oss-20b and
openai/gpt-oss-120b) except `quantization_config`, which describes a checkpoint on disk, not the
architecture: the checkpoint writer adds it when it writes MXFP4 experts.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import GptOssConfig

from gptoss_tune.errors import GptossTuneError

# The MXFP4 `quantization_config` of the published checkpoints: everything but the experts stays bf16.
MXFP4_MODULES_NOT_CONVERTED = [
    "model.layers.*.self_attn",
    "model.layers.*.mlp.router",
    "model.embed_tokens",
    "lm_head",
]


def _layer_types(num_layers: int) -> list[str]:
    # Layer 0 is sliding; sliding and full attention alternate.
    return ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(num_layers)]


def _published_fields(num_layers: int, num_experts: int) -> dict:
    """config.json of openai/gpt-oss-{20b,120b}, which differ only in depth and expert count."""
    return {
        "architectures": ["GptOssForCausalLM"],
        "attention_bias": True,
        "attention_dropout": 0.0,
        "eos_token_id": 200002,
        "experts_per_token": 4,
        "head_dim": 64,
        "hidden_act": "silu",
        "hidden_size": 2880,
        "initial_context_length": 4096,
        "initializer_range": 0.02,
        "intermediate_size": 2880,
        "layer_types": _layer_types(num_layers),
        "max_position_embeddings": 131072,
        "num_attention_heads": 64,
        "num_experts_per_tok": 4,
        "num_hidden_layers": num_layers,
        "num_key_value_heads": 8,
        "num_local_experts": num_experts,
        "output_router_logits": False,
        "pad_token_id": 199999,
        "rms_norm_eps": 1e-05,
        "rope_scaling": {
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "factor": 32.0,
            "original_max_position_embeddings": 4096,
            "rope_type": "yarn",
            "truncate": False,
        },
        "rope_theta": 150000,
        "router_aux_loss_coef": 0.9,
        "sliding_window": 128,
        "swiglu_limit": 7.0,
        "tie_word_embeddings": False,
        "use_cache": True,
        "vocab_size": 201088,
    }


def _tiny_fields() -> dict:
    """The real vocabulary, rope, sinks and layer pattern at a size that trains in seconds on a CPU."""
    fields = _published_fields(num_layers=2, num_experts=4)
    fields.update(
        experts_per_token=2,
        num_experts_per_tok=2,
        hidden_size=64,
        intermediate_size=64,
        head_dim=16,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=8,
    )
    return fields


_PRESET_FIELDS = {
    "tiny": _tiny_fields,
    "20b": lambda: _published_fields(num_layers=24, num_experts=32),
    "120b": lambda: _published_fields(num_layers=36, num_experts=128),
}

PRESETS = tuple(_PRESET_FIELDS)


@dataclass(frozen=True)
class InitScales:
    """Standard deviations of the random weights `init_model` writes for a preset.

    The published models were trained, so only the tiny test model needs care: with every weight at
    std 0.02, logits over the 201,088-token vocabulary stay nearly flat (the best a final hidden
    state of norm 8 can do is a logit of about 0.02 * 64) and a LoRA on attention and experts cannot
    lift one token above the rest; the loss plateaus near 11 nats. With lm_head at std 0.25 the
    same LoRA memorizes short sequences to well below 1 nat (tests/test_lora.py).
    """

    default: float = 0.02
    embed_tokens: float = 0.02
    lm_head: float = 0.02


_INIT_SCALES = {
    "tiny": InitScales(lm_head=0.25),
    "20b": InitScales(),
    "120b": InitScales(),
}


def _check_preset(name: str) -> None:
    if name not in _PRESET_FIELDS:
        raise GptossTuneError(f"Unknown model preset '{name}'. Choose one of: {', '.join(PRESETS)}.")


def preset_config(name: str) -> GptOssConfig:
    """A fresh `GptOssConfig` for the preset `tiny`, `20b` or `120b`."""
    _check_preset(name)
    return GptOssConfig(**_PRESET_FIELDS[name]())


def preset_init_scales(name: str) -> InitScales:
    _check_preset(name)
    return _INIT_SCALES[name]
