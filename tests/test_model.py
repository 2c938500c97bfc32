"""Our training model against transformers' GptOssForCausalLM and OpenAI's reference implementation."""

from __future__ import annotations

import pytest
import torch
from transformers import GptOssConfig, GptOssForCausalLM

from gptoss_tune.model.gpt_oss import (
    IGNORE_INDEX,
    GptOss,
    causal_lm_loss,
    chunked_causal_lm_loss,
    document_ids,
    eager_attention,
    rms_norm,
    rope_settings,
    rotate_query_key,
    shift_labels,
)
from gptoss_tune.model.presets import preset_config

RTOL = 1e-5


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


def small_vocab_config(**overrides) -> GptOssConfig:
    """The tiny preset (sliding + full layers, sinks, YaRN, GQA) with a small vocabulary for speed."""
    config = preset_config("tiny")
    config.vocab_size = 1000
    config.pad_token_id = config.eos_token_id = None
    for name, value in overrides.items():
        setattr(config, name, value)
    return config


def randomize_(model: torch.nn.Module, seed: int = 0) -> None:
    """Every parameter random (norm weights around 1), so no term of the computation hides at zero."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            param.copy_(1 + 0.1 * noise if "norm" in name else 0.2 * noise)


def hf_model(config: GptOssConfig) -> GptOssForCausalLM:
    return GptOssForCausalLM._from_config(config, attn_implementation="eager", experts_implementation="eager")


@pytest.fixture(scope="module")
def pair() -> tuple[GptOss, GptOssForCausalLM]:
    config = small_vocab_config()
    reference = hf_model(config).float()
    randomize_(reference)
    ours = GptOss(config)
    ours.load_state_dict(reference.state_dict())
    return ours, reference


def test_state_dict_matches_transformers_names_and_shapes() -> None:
    config = preset_config("tiny")
    reference = GptOssForCausalLM(config)
    with torch.device("meta"):
        ours = GptOss(config)
    expected = {name: tuple(t.shape) for name, t in reference.state_dict().items()}
    assert {name: tuple(t.shape) for name, t in ours.state_dict().items()} == expected
    assert "model.layers.1.mlp.experts.gate_up_proj" in expected


def test_logits_loss_and_gradients_match_transformers(pair) -> None:
    ours, reference = pair
    generator = torch.Generator().manual_seed(1)
    # 24 tokens with an 8-token window: the sliding layer really slides.
    input_ids = torch.randint(0, 1000, (2, 24), generator=generator)
    labels = input_ids.clone()
    labels[:, :5] = IGNORE_INDEX

    ours.zero_grad()
    reference.zero_grad()
    logits = ours(input_ids)
    loss_sum, count = causal_lm_loss(logits, labels)
    (loss_sum / count).backward()
    expected = reference(input_ids, labels=labels)
    expected.loss.backward()

    assert relative_error(logits, expected.logits) <= RTOL
    assert abs((loss_sum / count).item() - expected.loss.item()) <= RTOL * expected.loss.item()
    reference_params = dict(reference.named_parameters())
    for name, param in ours.named_parameters():
        assert relative_error(param.grad, reference_params[name].grad) <= RTOL, name


def test_sliding_window_includes_the_token_itself() -> None:
    # Window 2: query 5 sees keys 4 and 5 only; values are one-hot key positions so the output
    # reveals which keys carried weight.
    length = 8
    query = torch.zeros(1, 1, length, length)
    key = torch.zeros(1, 1, length, length)
    value = torch.eye(length).view(1, 1, length, length)
    sinks = torch.full((1,), -1e9)
    out = eager_attention(
        query,
        key,
        value,
        sinks,
        scaling=1.0,
        sliding_window=2,
        documents=torch.zeros(1, length, dtype=torch.long),
    )
    assert torch.allclose(out[0, 0, 5], torch.tensor([0, 0, 0, 0, 0.5, 0.5, 0, 0]))
    assert torch.allclose(out[0, 0, 0], torch.tensor([1.0, 0, 0, 0, 0, 0, 0, 0]))


def test_sinks_take_probability_mass() -> None:
    value = torch.ones(1, 1, 1, 4)
    query = key = torch.zeros(1, 1, 1, 4)
    documents = torch.zeros(1, 1, dtype=torch.long)
    kwargs = {"scaling": 1.0, "sliding_window": None, "documents": documents}
    # One visible key with logit 0 and a sink with logit 0: half the mass goes to the sink.
    out = eager_attention(query, key, value, torch.zeros(1), **kwargs)
    assert torch.allclose(out, torch.full_like(out, 0.5))


def test_document_ids_follow_position_resets() -> None:
    positions = torch.tensor([[0, 1, 2, 0, 1, 0, 0, 1], [5, 6, 7, 8, 0, 1, 2, 3]])
    expected = torch.tensor([[0, 0, 0, 1, 1, 2, 3, 3], [0, 0, 0, 0, 1, 1, 1, 1]])
    assert torch.equal(document_ids(positions), expected)


def test_packed_documents_equal_each_document_alone(pair) -> None:
    ours, _ = pair
    generator = torch.Generator().manual_seed(2)
    # Both longer than the sliding window; the third piece is padding-like filler.
    first = torch.randint(0, 1000, (13,), generator=generator)
    second = torch.randint(0, 1000, (11,), generator=generator)
    filler = torch.randint(0, 1000, (3,), generator=generator)
    packed = torch.cat([first, second, filler])[None]
    positions = torch.cat([torch.arange(13), torch.arange(11), torch.arange(3)])[None]
    with torch.no_grad():
        packed_logits = ours(packed, positions)[0]
        alone_first = ours(first[None])[0]
        alone_second = ours(second[None])[0]
    assert relative_error(packed_logits[:13], alone_first) <= RTOL
    assert relative_error(packed_logits[13:24], alone_second) <= RTOL


def test_shift_labels_never_predicts_across_documents() -> None:
    labels = torch.tensor([[10, 11, 12, 20, 21, 22]])
    positions = torch.tensor([[0, 1, 2, 0, 1, 2]])
    assert shift_labels(labels).tolist() == [[11, 12, 20, 21, 22, IGNORE_INDEX]]
    assert shift_labels(labels, positions).tolist() == [[11, 12, IGNORE_INDEX, 21, 22, IGNORE_INDEX]]


def test_chunked_loss_equals_full_loss_with_gradients(pair) -> None:
    ours, _ = pair
    generator = torch.Generator().manual_seed(3)
    input_ids = torch.randint(0, 1000, (2, 20), generator=generator)
    labels = input_ids.clone()
    labels[0, :7] = IGNORE_INDEX
    positions = torch.cat([torch.arange(12), torch.arange(8)]).expand(2, 20)

    hidden = ours.hidden_states(input_ids, positions).detach().requires_grad_(True)
    full_sum, full_count = causal_lm_loss(ours.lm_head(hidden), labels, positions)
    (full_grad,) = torch.autograd.grad(full_sum, hidden)
    chunked_sum, chunked_count = chunked_causal_lm_loss(hidden, ours.lm_head.weight, labels, positions, 5)
    (chunked_grad,) = torch.autograd.grad(chunked_sum, hidden)

    assert chunked_count.item() == full_count.item() == 2 * 19 - 6 - 2
    assert relative_error(chunked_sum, full_sum) <= RTOL
    assert relative_error(chunked_grad, full_grad) <= RTOL


def test_loss_without_trained_tokens_is_zero_and_still_differentiable(pair) -> None:
    ours, _ = pair
    input_ids = torch.randint(0, 1000, (1, 6), generator=torch.Generator().manual_seed(6))
    ours.zero_grad()
    loss_sum, count = ours.loss(input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    loss_sum.backward()
    assert loss_sum.item() == 0.0 and count.item() == 0
    assert ours.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() == 0


def test_gradient_checkpointing_gives_the_same_gradients(pair) -> None:
    ours, _ = pair
    input_ids = torch.randint(0, 1000, (1, 16), generator=torch.Generator().manual_seed(4))

    def gradients() -> dict[str, torch.Tensor]:
        ours.zero_grad()
        loss_sum, _ = ours.loss(input_ids, input_ids)
        loss_sum.backward()
        return {name: p.grad.clone() for name, p in ours.named_parameters()}

    plain = gradients()
    ours.set_gradient_checkpointing(True)
    try:
        recomputed = gradients()
    finally:
        ours.set_gradient_checkpointing(False)
    for name, grad in plain.items():
        assert relative_error(recomputed[name], grad) <= RTOL, name


def test_set_kernels_routes_every_layer_through_the_given_functions(pair) -> None:
    ours, _ = pair
    calls: list[int | None] = []

    def recording_attention(*args, **kwargs):
        calls.append(kwargs["sliding_window"])
        return eager_attention(*args, **kwargs)

    norms: list[int] = []
    rotations: list[tuple[int, int]] = []

    def recording_norm(hidden, weight, eps):
        norms.append(hidden.shape[-1])
        return rms_norm(hidden, weight, eps)

    def recording_rotary(query, key, cos, sin):
        rotations.append((query.shape[2], key.shape[2]))  # [B, T, H, D]
        return rotate_query_key(query, key, cos, sin)

    ours.set_kernels(attention=recording_attention, norm=recording_norm, rotary=recording_rotary)
    try:
        with torch.no_grad():
            ours(torch.zeros(1, 4, dtype=torch.long))
    finally:
        ours.set_kernels(attention=eager_attention, norm=rms_norm, rotary=rotate_query_key)
    assert calls == [8, None]
    config = ours.config
    assert norms == [config.hidden_size] * (2 * config.num_hidden_layers + 1)  # 2 per layer + final
    assert rotations == [(config.num_attention_heads, config.num_key_value_heads)] * config.num_hidden_layers


# --- OpenAI's reference implementation (gpt_oss.torch.model) -------------------------------------


def _openai_reference_state(hf_state: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """Our / transformers' names -> OpenAI's original checkpoint names."""
    state = {
        "embedding.weight": hf_state["model.embed_tokens.weight"],
        "norm.scale": hf_state["model.norm.weight"],
        "unembedding.weight": hf_state["lm_head.weight"],
    }
    for i in range(num_layers):
        hf = {k.removeprefix(f"model.layers.{i}."): v for k, v in hf_state.items() if f"layers.{i}." in k}
        ours = f"block.{i}."
        projections = ("q_proj", "k_proj", "v_proj")
        state[ours + "attn.norm.scale"] = hf["input_layernorm.weight"]
        state[ours + "attn.qkv.weight"] = torch.cat([hf[f"self_attn.{p}.weight"] for p in projections])
        state[ours + "attn.qkv.bias"] = torch.cat([hf[f"self_attn.{p}.bias"] for p in projections])
        state[ours + "attn.sinks"] = hf["self_attn.sinks"]
        state[ours + "attn.out.weight"] = hf["self_attn.o_proj.weight"]
        state[ours + "attn.out.bias"] = hf["self_attn.o_proj.bias"]
        state[ours + "mlp.norm.scale"] = hf["post_attention_layernorm.weight"]
        state[ours + "mlp.gate.weight"] = hf["mlp.router.weight"]
        state[ours + "mlp.gate.bias"] = hf["mlp.router.bias"]
        state[ours + "mlp.mlp1_weight"] = hf["mlp.experts.gate_up_proj"].transpose(1, 2)
        state[ours + "mlp.mlp1_bias"] = hf["mlp.experts.gate_up_proj_bias"]
        state[ours + "mlp.mlp2_weight"] = hf["mlp.experts.down_proj"].transpose(1, 2)
        state[ours + "mlp.mlp2_bias"] = hf["mlp.experts.down_proj_bias"]
    return state


def test_logits_match_openai_reference(pair) -> None:
    reference_model = pytest.importorskip(
        "gpt_oss.torch.model",
        reason="OpenAI's reference is optional: pip install --no-deps --ignore-requires-python gpt-oss==0.0.9",
    )
    ours, _ = pair
    config = ours.config
    rope = rope_settings(config)
    reference_config = reference_model.ModelConfig(
        num_hidden_layers=config.num_hidden_layers,
        num_experts=config.num_local_experts,
        experts_per_token=config.num_experts_per_tok,
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        swiglu_limit=config.swiglu_limit,
        head_dim=config.head_dim,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        # The reference masks keys k <= q - window, i.e. the same window-includes-self convention.
        sliding_window=config.sliding_window,
        initial_context_length=rope["original_max_position_embeddings"],
        rope_theta=rope["rope_theta"],
        rope_scaling_factor=rope["factor"],
        rope_ntk_alpha=rope["beta_slow"],
        rope_ntk_beta=rope["beta_fast"],
    )
    reference = reference_model.Transformer(reference_config, device=torch.device("cpu")).float()
    reference.load_state_dict(_openai_reference_state(ours.state_dict(), config.num_hidden_layers))

    input_ids = torch.randint(0, 1000, (30,), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = reference(input_ids)
        logits = ours(input_ids[None])[0]
    assert relative_error(logits, expected) <= RTOL
