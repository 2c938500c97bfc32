"""Our LoRA against PEFT 0.21 on transformers' GptOssForCausalLM: format both ways, logits, gradients, merge."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import GptOssConfig, GptOssForCausalLM

from gptoss_tune.errors import GptossTuneError
from gptoss_tune.model.gpt_oss import GptOss
from gptoss_tune.model.init import init_weights_
from gptoss_tune.model.lora import (
    LoraOptions,
    apply_lora,
    load_adapter,
    lora_state_dict_peft,
    merge_lora_into_state_dict,
    parse_layers,
    read_adapter,
    save_adapter,
    trainable_parameter_report,
)
from gptoss_tune.model.presets import preset_config, preset_init_scales

RTOL = 1e-5


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def small_config() -> GptOssConfig:
    """Tiny preset with 3 layers (so a layer subset is a real subset) and a small vocabulary."""
    config = preset_config("tiny")
    config.vocab_size = 1000
    config.pad_token_id = config.eos_token_id = None
    config.num_hidden_layers = 3
    config.layer_types = ["sliding_attention", "full_attention", "sliding_attention"]
    return config


def randomize_(module: torch.nn.Module, seed: int, only: str = "") -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if only in name:
                noise = torch.randn(param.shape, generator=generator)
                param.copy_(1 + 0.1 * noise if "norm" in name else 0.2 * noise)


def base_pair() -> tuple[GptOss, GptOssForCausalLM]:
    config = small_config()
    ours = GptOss(config).eval()
    randomize_(ours, seed=0)
    reference = GptOssForCausalLM._from_config(
        config, attn_implementation="eager", experts_implementation="eager"
    )
    reference.load_state_dict(ours.state_dict())
    return ours, reference.eval()


INPUT_IDS = torch.randint(0, 1000, (2, 20), generator=torch.Generator().manual_seed(7))

OPTION_CASES = {
    "all": LoraOptions(rank=4, alpha=8),
    "subset-rslora": LoraOptions(
        rank=2, alpha=3, rslora=True, targets=("q_proj", "v_proj", "down_proj"), layers=(1, 2)
    ),
    "experts-one-layer": LoraOptions(rank=3, alpha=6, targets=("gate_up_proj",), layers=(1,)),
}


@pytest.mark.parametrize("options", OPTION_CASES.values(), ids=OPTION_CASES.keys())
def test_peft_loads_our_adapter_with_equal_logits(tmp_path: Path, options: LoraOptions) -> None:
    ours, reference = base_pair()
    apply_lora(ours, options)
    randomize_(ours, seed=1, only="lora_")  # B random too: a zero B would hide every layout mistake
    out = save_adapter(ours, options, tmp_path / "adapter", base_model_name_or_path="tiny-test")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = PeftModel.from_pretrained(reference, out).eval()
    with torch.no_grad():
        assert relative_error(ours(INPUT_IDS), peft_model(INPUT_IDS).logits) <= RTOL
        assert relative_error(ours(INPUT_IDS), base_pair()[0](INPUT_IDS)) > 1e-3  # the adapter matters

    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", options.rank, options.alpha)
    assert config["use_rslora"] == options.rslora and config["base_model_name_or_path"] == "tiny-test"


def test_our_keys_and_shapes_equal_what_peft_saves(tmp_path: Path) -> None:
    ours, reference = base_pair()
    apply_lora(ours, LoraOptions(rank=4, alpha=8))
    peft_config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        get_peft_model(reference, peft_config).save_pretrained(tmp_path)
    expected = {k: tuple(v.shape) for k, v in load_file(tmp_path / "adapter_model.safetensors").items()}
    assert {k: tuple(v.shape) for k, v in lora_state_dict_peft(ours).items()} == expected
    assert "base_model.model.model.layers.0.mlp.experts.base_layer.lora_A.weight" in expected
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["target_parameters"] == ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def peft_model_with_random_adapter(reference: GptOssForCausalLM, rslora: bool) -> PeftModel:
    config = LoraConfig(
        r=4,
        lora_alpha=16,
        use_rslora=rslora,
        target_modules="all-linear",
        # As in OpenAI's fine-tuning cookbook: experts of some layers only.
        target_parameters=[
            "1.mlp.experts.gate_up_proj",
            "1.mlp.experts.down_proj",
            "2.mlp.experts.down_proj",
        ],
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(reference, config)
    randomize_(model, seed=2, only="lora_")
    return model.eval()


@pytest.mark.parametrize("rslora", [False, True])
def test_peft_saved_adapter_loads_into_ours_with_equal_logits(tmp_path: Path, rslora: bool) -> None:
    ours, reference = base_pair()
    peft_model = peft_model_with_random_adapter(reference, rslora)
    peft_model.save_pretrained(tmp_path)

    options = load_adapter(ours, tmp_path)
    assert options.rslora == rslora and options.rank == 4
    report = trainable_parameter_report(ours)
    assert set(report) == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_up_proj",
        "down_proj",
        "trainable",
        "total",
    }
    with torch.no_grad():
        assert relative_error(ours(INPUT_IDS), peft_model(INPUT_IDS).logits) <= RTOL


def test_lora_gradients_equal_peft_gradients(tmp_path: Path) -> None:
    ours, reference = base_pair()
    peft_model = peft_model_with_random_adapter(reference, rslora=False)
    peft_model.save_pretrained(tmp_path)
    load_adapter(ours, tmp_path)

    labels = INPUT_IDS.clone()
    ours_sum, count = ours.loss(INPUT_IDS, labels)
    (ours_sum / count).backward()
    peft_model(INPUT_IDS, labels=labels).loss.backward()

    peft_grads = {
        n.replace(".default", ""): p.grad for n, p in peft_model.named_parameters() if p.grad is not None
    }
    ours_grads = lora_state_dict_peft(ours, gradients=True)
    assert set(ours_grads) == set(peft_grads)
    for key, grad in peft_grads.items():
        assert relative_error(ours_grads[key], grad) <= RTOL, key
    assert all(p.grad is None for n, p in ours.named_parameters() if ".lora_" not in n)


def test_merge_equals_peft_merge_and_unload(tmp_path: Path) -> None:
    ours, reference = base_pair()
    base_state = ours.state_dict()
    peft_model = peft_model_with_random_adapter(reference, rslora=True)
    peft_model.save_pretrained(tmp_path)
    expected = peft_model.merge_and_unload().state_dict()

    options, sites, adapter = read_adapter(tmp_path)
    merged = dict(merge_lora_into_state_dict(base_state.items(), options, sites, adapter))
    assert set(merged) == set(expected)
    changed = 0
    for name, tensor in merged.items():
        assert relative_error(tensor, expected[name]) <= RTOL, name
        changed += not torch.equal(tensor, base_state[name])
    assert changed == 3 * 4 + 3  # attention of 3 layers, experts: 2 in layer 1, 1 in layer 2


def test_fresh_adapter_changes_nothing_and_trains_only_lora() -> None:
    ours, _ = base_pair()
    with torch.no_grad():
        before = ours(INPUT_IDS)
    trainable = apply_lora(ours, LoraOptions(rank=4, alpha=8, targets=("attn", "experts")))
    with torch.no_grad():
        assert torch.equal(ours(INPUT_IDS), before)
    assert all(".lora_" in name for name, p in ours.named_parameters() if p.requires_grad)
    assert set(trainable) == {name for name, p in ours.named_parameters() if p.requires_grad}
    # A is U(-1/sqrt(in), 1/sqrt(in)) as in PEFT: hidden 64 -> bound 0.125.
    a = ours.model.layers[0].self_attn.q_proj.lora_A
    assert 0.1 < a.abs().max().item() <= 0.125


def test_parameter_report_counts_each_target() -> None:
    ours, _ = base_pair()
    apply_lora(ours, LoraOptions(rank=2, targets=("q_proj", "experts"), layers=(0, 2)))
    report = trainable_parameter_report(ours)
    hidden, experts, inner, q_out = 64, 4, 64, 4 * 16
    assert report["q_proj"] == 2 * (2 * hidden + q_out * 2)
    assert report["gate_up_proj"] == 2 * experts * (hidden * 2 + 2 * 2 * inner)
    assert report["down_proj"] == 2 * experts * (inner * 2 + 2 * hidden)
    assert report["trainable"] == report["q_proj"] + report["gate_up_proj"] + report["down_proj"]


def test_attention_dropout_only_in_training() -> None:
    ours, _ = base_pair()
    apply_lora(ours, LoraOptions(rank=4, dropout=0.5, targets=("attn",)))
    randomize_(ours, seed=3, only="lora_")
    with torch.no_grad():
        ours.train()
        assert not torch.equal(ours(INPUT_IDS), ours(INPUT_IDS))
        ours.eval()
        assert torch.equal(ours(INPUT_IDS), ours(INPUT_IDS))


def test_resume_loads_into_an_adapted_model_and_rejects_other_targets(tmp_path: Path) -> None:
    ours, _ = base_pair()
    options = LoraOptions(rank=4, alpha=8)
    apply_lora(ours, options)
    randomize_(ours, seed=4, only="lora_")
    save_adapter(ours, options, tmp_path / "a")
    resumed, _ = base_pair()
    apply_lora(resumed, options)
    load_adapter(resumed, tmp_path / "a")
    with torch.no_grad():
        assert torch.equal(resumed(INPUT_IDS), ours(INPUT_IDS))

    other, _ = base_pair()
    apply_lora(other, LoraOptions(rank=4, targets=("attn",)))
    with pytest.raises(GptossTuneError, match="targets differ"):
        load_adapter(other, tmp_path / "a")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (LoraOptions(targets=("mlp",)), "Unknown LoRA target 'mlp'"),
        (LoraOptions(layers=(0, 5)), r"layers \[5\] do not exist"),
        (LoraOptions(rank=0), "rank must be positive"),
    ],
)
def test_invalid_options_are_user_errors(options: LoraOptions, message: str) -> None:
    ours, _ = base_pair()
    with pytest.raises(GptossTuneError, match=message):
        apply_lora(ours, options)


def test_options_from_command_line_strings() -> None:
    options = LoraOptions.from_strings(rank=8, alpha=16, targets="attn, down_proj", layers="0-2,5")
    assert options.target_names() == ("q_proj", "k_proj", "v_proj", "o_proj", "down_proj")
    assert options.layers == (0, 1, 2, 5)
    assert LoraOptions.from_strings(layers="").layers is None
    assert parse_layers("3,1-2") == (1, 2, 3)
    for bad in ("a-b", "4-2"):
        with pytest.raises(GptossTuneError, match="LoRA layer"):
            parse_layers(bad)


def test_lora_memorizes_short_sequences_on_the_tiny_preset() -> None:
    """The tiny preset's init lets a LoRA on attention + experts drive the loss far down (with every
    weight at std 0.02 it plateaus near 11 nats)."""
    model = init_weights_(GptOss(preset_config("tiny")), preset_init_scales("tiny"), seed=0)
    params = apply_lora(model, LoraOptions(rank=16, alpha=32), generator=torch.Generator().manual_seed(0))
    sequences = torch.randint(0, 200_000, (4, 8), generator=torch.Generator().manual_seed(1))
    optimizer = torch.optim.Adam(params.values(), lr=3e-3)
    losses = []
    for _ in range(40):
        loss_sum, count = model.loss(sequences, sequences)
        optimizer.zero_grad()
        (loss_sum / count).backward()
        optimizer.step()
        losses.append((loss_sum / count).item())
    assert losses[0] > 12 and losses[-1] < 1.0
