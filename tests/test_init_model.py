"""init_model: a random tiny checkpoint directory that transformers and our loader both open."""

from __future__ import annotations

import json
from importlib.util import find_spec
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from gptoss_tune.errors import GptossTuneError
from gptoss_tune.harmony import tokens
from gptoss_tune.harmony.hf_tokenizer import special_token_names
from gptoss_tune.harmony.vocab import harmony_encoding
from gptoss_tune.model.checkpoint import load_checkpoint, read_config
from gptoss_tune.model.gpt_oss import GptOss
from gptoss_tune.model.init import init_model, init_weights_, official_chat_template
from gptoss_tune.model.presets import preset_config, preset_init_scales

TEXTS = [
    "Hello, world! It's 2024 and we're testing 12345678 numbers.",
    "Привет, мир! Как дела?",
    "日本語のテキストと中文文本。",
    "مرحبا بالعالم",
    "हिन्दी पाठ और 한국어 문장",
    "  leading spaces\n\n\ttabs, trailing   \r\n",
    "emoji 🤖👍🏽 and code: def f(x):\n    return x**2  # ÄÖÜ straße naïve café",
    "text that looks like control tokens: <|start|>user<|message|>hi<|end|>",
]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return init_model("tiny", tmp_path_factory.mktemp("init") / "tiny", seed=3, progress=False)


@pytest.fixture(scope="module")
def tokenizer(tiny_dir: Path):
    return AutoTokenizer.from_pretrained(tiny_dir)


def test_directory_has_the_published_file_set(tiny_dir: Path) -> None:
    names = {p.name for p in tiny_dir.iterdir()}
    assert {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "chat_template.jinja",
    } <= names
    assert (
        json.loads((tiny_dir / "tokenizer_config.json").read_text())["tokenizer_class"]
        == "PreTrainedTokenizerFast"
    )
    assert read_config(tiny_dir).to_dict()["layer_types"] == preset_config("tiny").layer_types


def test_config_json_is_in_the_published_layout(tiny_dir: Path) -> None:
    """rope_scaling + rope_theta, as in openai/gpt-oss-20b's config.json: transformers 4.55 and 4.56 do
    not read transformers 5's rope_parameters and would silently use other YaRN settings."""
    written = json.loads((tiny_dir / "config.json").read_text())
    assert "rope_parameters" not in written
    assert written["rope_theta"] == 150000
    assert written["rope_scaling"] == {
        "rope_type": "yarn",
        "factor": 32.0,
        "original_max_position_embeddings": 4096,
        "beta_fast": 32.0,
        "beta_slow": 1.0,
        "truncate": False,
    }
    assert written["torch_dtype"] == written["dtype"] == "bfloat16"
    assert not {"id2label", "return_dict", "bos_token_id", "problem_type"} & set(written)
    # transformers 5 reads it back as the preset it was written from
    assert read_config(tiny_dir).rope_parameters == preset_config("tiny").rope_parameters


def test_tokenizer_encodes_like_openai_harmony(tokenizer) -> None:
    encoding = harmony_encoding()
    for text in TEXTS:
        expected = encoding.encode(text, disallowed_special=())
        # split_special_tokens: data text is never read as control tokens, as in harmony.
        assert tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True) == expected, text
        assert tokenizer.decode(expected) == text
    rendered = "<|start|>user<|message|>hi<|end|><|start|>assistant<|channel|>final<|message|>yo<|return|>"
    assert tokenizer.encode(rendered, add_special_tokens=False) == encoding.encode(
        rendered, allowed_special="all"
    )


def test_special_tokens_have_their_ids(tokenizer) -> None:
    encoding = harmony_encoding()
    assert tokenizer.convert_tokens_to_ids(special_token_names()) == list(range(199998, 200019))
    for name, token_id in tokens.SPECIAL_TOKENS.items():
        assert tokenizer.convert_tokens_to_ids(name) == token_id
    for token_id in range(199998, 200018):  # 200018 is <|endofprompt|> in the published tokenizer
        assert tokenizer.convert_ids_to_tokens(token_id) == encoding.decode([token_id])
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (
        199998,
        200002,
        199999,
    )


def test_chat_template_is_the_official_one(tiny_dir: Path, tokenizer) -> None:
    assert (tiny_dir / "chat_template.jinja").read_text(encoding="utf-8") == official_chat_template()
    if find_spec("trl") is None:
        pytest.skip("trl (which ships the official template) is not installed")
    official = Path(find_spec("trl").submodule_search_locations[0]) / "chat_templates" / "gptoss.jinja"
    assert (tiny_dir / "chat_template.jinja").read_bytes() == official.read_bytes()
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert rendered.endswith("<|start|>user<|message|>hi<|end|>")


def test_weights_load_in_transformers_and_ours_with_equal_logits(tiny_dir: Path) -> None:
    ours = load_checkpoint(tiny_dir, dtype=torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(
        tiny_dir, dtype=torch.float32, attn_implementation="eager", experts_implementation="eager"
    )
    input_ids = torch.randint(0, 201088, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits, expected = ours(input_ids), reference(input_ids).logits
    assert ((logits - expected).abs().max() / expected.abs().max()).item() <= 1e-5


def test_written_weights_equal_the_in_memory_initialization(tiny_dir: Path) -> None:
    loaded = load_checkpoint(tiny_dir, dtype=torch.bfloat16)
    in_memory = init_weights_(GptOss(preset_config("tiny")), preset_init_scales("tiny"), seed=3)
    for name, tensor in in_memory.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor.to(torch.bfloat16)), name
    assert loaded.model.layers[0].input_layernorm.weight.eq(1).all()
    assert loaded.model.layers[0].self_attn.q_proj.bias.eq(0).all()
    assert loaded.model.layers[0].self_attn.sinks.ne(0).all()


def test_mxfp4_init_stores_quantized_experts(tmp_path: Path) -> None:
    out = init_model("tiny", tmp_path / "mx", mxfp4=True, progress=False)
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "mxfp4"
    model = load_checkpoint(out, dtype=torch.float32)
    experts = model.model.layers[1].mlp.experts.down_proj
    # Dequantized MXFP4 values are (e2m1 value) * 2^k: at most 3 significant bits.
    mantissas = torch.frexp(experts[experts != 0]).mantissa.abs()
    assert torch.isin(mantissas, torch.tensor([0.5, 0.75])).all()


def test_random_on_load_writes_no_weights_and_draws_the_same_model(tmp_path: Path) -> None:
    path = init_model("tiny", tmp_path / "drawn", seed=1, random_on_load=True, progress=False)
    assert not list(path.glob("*.safetensors")) and (path / "tokenizer.json").is_file()
    dense = load_checkpoint(path, torch.float32, "cpu", "bf16")
    again = load_checkpoint(path, torch.float32, "cpu", "bf16")
    quantized = load_checkpoint(path, torch.float32, "cpu", "auto")  # MXFP4 experts: kept on a GPU only
    kept = load_checkpoint(path, torch.float32, "cpu", "mxfp4")
    assert not quantized.model.layers[0].mlp.experts.is_mxfp4("gate_up_proj")
    for name, tensor in dense.state_dict().items():
        assert torch.equal(tensor, again.state_dict()[name]), name
    for layer, kept_layer in zip(dense.model.layers, kept.model.layers, strict=True):
        for projection in ("gate_up_proj", "down_proj"):
            assert kept_layer.mlp.experts.is_mxfp4(projection)
            torch.testing.assert_close(
                kept_layer.mlp.experts.dense(projection),
                getattr(layer.mlp.experts, projection),
                rtol=0,
                atol=0,
            )
    other = init_model("tiny", tmp_path / "other", seed=2, random_on_load=True, progress=False)
    other_model = load_checkpoint(other, torch.float32, "cpu", "bf16")
    assert not torch.equal(other_model.lm_head.weight, dense.lm_head.weight)
    assert float(dense.model.norm.weight.detach().min()) == 1.0
    # transformers cannot load it: chat and eval say so instead of failing inside transformers
    from gptoss_tune.infer.generate import load_hf_model

    with pytest.raises(GptossTuneError, match="random-on-load folder"):
        load_hf_model(path, torch.device("cpu"), torch.float32)


def test_mxfp4_codes_drawn_directly_match_the_random_on_load_model(tmp_path: Path) -> None:
    written = init_model(
        "tiny", tmp_path / "codes", seed=4, mxfp4=True, draw_mxfp4_codes=True, progress=False
    )
    drawn = init_model("tiny", tmp_path / "drawn", seed=4, random_on_load=True, progress=False)
    assert json.loads((written / "config.json").read_text())["quantization_config"]["quant_method"] == "mxfp4"
    first = load_checkpoint(written, torch.bfloat16, "cpu", "mxfp4").state_dict()
    second = load_checkpoint(drawn, torch.bfloat16, "cpu", "mxfp4").state_dict()
    assert first.keys() == second.keys()
    for name, tensor in first.items():
        assert torch.equal(tensor, second[name]), name
