"""Checkpoint IO: MXFP4 against transformers, round trips, and transformers loading what we write."""

from __future__ import annotations

import json
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from transformers import AutoModelForCausalLM, GptOssConfig, Mxfp4Config
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

from gptoss_tune.errors import GptossTuneError
from gptoss_tune.model.checkpoint import (
    FP4_VALUES,
    atomic_directory,
    dequantize_mxfp4,
    expert_weight_from_mxfp4,
    expert_weight_to_mxfp4,
    iter_checkpoint_tensors,
    load_checkpoint,
    quantize_mxfp4,
    resolve_model_path,
    save_checkpoint,
)
from gptoss_tune.model.gpt_oss import GptOss
from gptoss_tune.model.presets import MXFP4_MODULES_NOT_CONVERTED, preset_config


def small_vocab_config() -> GptOssConfig:
    config = preset_config("tiny")
    config.vocab_size = 1000
    config.pad_token_id = config.eos_token_id = None
    return config


def random_model(config: GptOssConfig, seed: int = 0) -> GptOss:
    model = GptOss(config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            param.copy_(1 + 0.1 * noise if "norm" in name else 0.2 * noise)
    return model


def random_mxfp4(experts: int, rows: int, groups: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 256, (experts, rows, groups, 16), dtype=torch.uint8, generator=generator)
    scales = torch.randint(100, 150, (experts, rows, groups), dtype=torch.uint8, generator=generator)
    return blocks, scales


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max()).item()


# --- MXFP4 -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequantization_equals_transformers(dtype: torch.dtype) -> None:
    blocks, scales = random_mxfp4(experts=3, rows=40, groups=4)
    expected = convert_moe_packed_tensors(blocks, scales, dtype=dtype)  # [E, in, out]
    actual = expert_weight_from_mxfp4(blocks, scales, dtype)
    assert actual.shape == (3, 4 * 32, 40)
    assert torch.equal(actual, expected)


def test_dequantization_in_chunks_equals_one_pass() -> None:
    blocks, scales = random_mxfp4(experts=2, rows=9, groups=3, seed=1)
    assert torch.equal(
        dequantize_mxfp4(blocks, scales, torch.float32, rows_per_chunk=5),
        dequantize_mxfp4(blocks, scales, torch.float32),
    )


def test_quantization_rounds_each_value_to_the_nearest_point_of_its_block_grid() -> None:
    values = torch.randn(6, 64, generator=torch.Generator().manual_seed(2)) * 3
    values[0, :32] = 0.0  # an all-zero block
    blocks, scales = quantize_mxfp4(values)
    restored = dequantize_mxfp4(blocks, scales, torch.float32)

    exponents = scales.to(torch.int32) - 127  # [6, 2]
    grid = torch.tensor(FP4_VALUES) * torch.exp2(exponents.float())[..., None]  # [6, 2, 16]
    distances = (values.view(6, 2, 32, 1) - grid[:, :, None, :]).abs()  # [6, 2, 32, 16]
    best = distances.min(dim=-1).values.view(6, 64)
    assert torch.equal((restored - values).abs(), best)
    # The scale is the smallest power of two that fits the block, or the one below it when the
    # saturating finer grid has the smaller squared error.
    largest, unit = values.view(6, 2, 32).abs().amax(-1), torch.exp2(exponents.float())
    assert (largest <= 12 * unit).all()
    assert ((largest > 3 * unit) | (exponents == -127)).all()
    assert torch.equal(restored[0, :32], torch.zeros(32))


def test_quantize_then_dequantize_is_exact_for_representable_values() -> None:
    blocks, scales = random_mxfp4(experts=2, rows=8, groups=2, seed=3)
    weight = expert_weight_from_mxfp4(blocks, scales, torch.float32)
    again = expert_weight_from_mxfp4(*expert_weight_to_mxfp4(weight), torch.float32)
    assert torch.equal(again, weight)


def test_expert_round_trip_error_is_bounded_by_the_block_scale() -> None:
    weight = torch.randn(4, 64, 48, generator=torch.Generator().manual_seed(4))
    blocks, scales = expert_weight_to_mxfp4(weight)
    assert blocks.shape == (4, 48, 2, 16) and scales.shape == (4, 48, 2)
    restored = expert_weight_from_mxfp4(blocks, scales, torch.float32)
    assert restored.shape == weight.shape
    # On the grid of the smallest scale that fits a block, every value is within one unit (the
    # largest gap between e2m1 numbers is 2, from 4 to 6); the chosen grid errs no more than that one.
    blocks_of = lambda t: t.transpose(1, 2).reshape(4, 48, 2, 32)  # noqa: E731 - stored orientation
    fitting_unit = torch.exp2(torch.ceil(torch.log2(blocks_of(weight).abs().amax(-1) / 6)))
    squared_error = ((blocks_of(restored) - blocks_of(weight)) ** 2).sum(-1)
    assert (squared_error <= 32 * fitting_unit**2).all()


# --- Writing and reading checkpoints -----------------------------------------------------------------


def test_sharded_checkpoint_round_trip(tmp_path: Path) -> None:
    config = small_vocab_config()
    model = random_model(config)
    out = save_checkpoint(
        model.state_dict().items(), config, tmp_path / "ckpt", torch.float32, max_shard_bytes=100_000
    )

    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 2 and set(index["weight_map"].values()) == set(shards)
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == [
        200002,
        199999,
        200012,
    ]
    assert "quantization_config" not in json.loads((out / "config.json").read_text())

    loaded = load_checkpoint(out, dtype=torch.float32)
    expected = model.state_dict()
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, expected[name]), name
    assert not list(tmp_path.glob(".ckpt*")), "no temporary directory is left behind"


def test_single_file_mxfp4_checkpoint_layout(tmp_path: Path) -> None:
    config = small_vocab_config()
    model = random_model(config)
    out = save_checkpoint(model.state_dict().items(), config, tmp_path / "ckpt", torch.bfloat16, mxfp4=True)
    assert (out / "model.safetensors").is_file() and not (out / "model.safetensors.index.json").exists()
    written = json.loads((out / "config.json").read_text())
    assert written["quantization_config"] == {
        "modules_to_not_convert": MXFP4_MODULES_NOT_CONVERTED,
        "quant_method": "mxfp4",
    }
    names = dict(iter_checkpoint_tensors(out, torch.float32))
    assert "model.layers.0.mlp.experts.gate_up_proj" in names

    from safetensors import safe_open

    with safe_open(out / "model.safetensors", framework="pt") as handle:
        keys = set(handle.keys())
        blocks = handle.get_tensor("model.layers.0.mlp.experts.gate_up_proj_blocks")
        attention = handle.get_tensor("model.layers.0.self_attn.q_proj.weight")
    assert "model.layers.0.mlp.experts.gate_up_proj" not in keys
    assert "model.layers.0.mlp.experts.down_proj_scales" in keys
    # gate_up_proj is [E, H, 2I] in our layout and [E, 2I, H / 32, 16] on disk.
    assert blocks.dtype == torch.uint8 and blocks.shape == (4, 128, 2, 16)
    assert attention.dtype == torch.bfloat16


@pytest.mark.parametrize("mxfp4", [False, True], ids=["bf16", "mxfp4"])
def test_transformers_loads_what_we_write_with_equal_logits(tmp_path: Path, mxfp4: bool) -> None:
    config = small_vocab_config()
    model = random_model(config)
    out = save_checkpoint(
        model.state_dict().items(),
        config,
        tmp_path / "ckpt",
        torch.bfloat16,
        mxfp4=mxfp4,
        max_shard_bytes=200_000,
    )
    ours = load_checkpoint(out, dtype=torch.float32)
    # On CPU transformers dequantizes MXFP4 experts while loading (no triton kernels here).
    quantization = {"quantization_config": Mxfp4Config(dequantize=True)} if mxfp4 else {}
    reference = AutoModelForCausalLM.from_pretrained(
        out, dtype=torch.float32, attn_implementation="eager", experts_implementation="eager", **quantization
    )
    reference_state = reference.state_dict()
    for name, tensor in ours.state_dict().items():
        assert torch.equal(tensor, reference_state[name]), name

    input_ids = torch.randint(0, 1000, (2, 20), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert relative_error(ours(input_ids), reference(input_ids).logits) <= 1e-5


def test_loading_reports_missing_and_unexpected_tensors(tmp_path: Path) -> None:
    config = small_vocab_config()
    state = random_model(config).state_dict()
    missing = {k: v for k, v in state.items() if k != "lm_head.weight"}
    save_checkpoint(missing.items(), config, tmp_path / "missing")
    with pytest.raises(GptossTuneError, match="lacks 1 tensors"):
        load_checkpoint(tmp_path / "missing")
    save_checkpoint([*state.items(), ("model.extra.weight", torch.zeros(2))], config, tmp_path / "extra")
    with pytest.raises(GptossTuneError, match="unexpected tensor 'model.extra.weight'"):
        load_checkpoint(tmp_path / "extra")


def test_broken_files_are_named_in_a_clear_error(tmp_path: Path) -> None:
    config = small_vocab_config()
    state = random_model(config).state_dict()
    whole = save_checkpoint(state.items(), config, tmp_path / "whole")
    weights = whole / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(GptossTuneError, match=r"model\.safetensors: cannot read it .*truncated or corrupt"):
        load_checkpoint(whole)
    sharded = save_checkpoint(state.items(), config, tmp_path / "sharded", max_shard_bytes=1 << 12)
    shards = sorted(sharded.glob("model-*.safetensors"))
    assert len(shards) > 1
    shards[-1].unlink()
    with pytest.raises(GptossTuneError, match=f"{shards[-1].name}: cannot read it"):
        load_checkpoint(sharded)
    (sharded / "config.json").write_text("{oops")
    with pytest.raises(GptossTuneError, match=r"config\.json: cannot read it"):
        load_checkpoint(sharded)


def test_atomic_directory_leaves_nothing_on_failure_and_keeps_existing_outputs(tmp_path: Path) -> None:
    target = tmp_path / "out"
    with pytest.raises(RuntimeError), atomic_directory(target) as directory:
        (directory / "partial").write_text("x")
        raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []

    with atomic_directory(target) as directory:
        (directory / "done").write_text("1")
    with pytest.raises(GptossTuneError, match="already exists"), atomic_directory(target):
        pass
    with atomic_directory(target, overwrite=True) as directory:
        (directory / "done").write_text("2")
    assert (target / "done").read_text() == "2"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]

    empty = tmp_path / "empty"
    empty.mkdir()
    with atomic_directory(empty) as directory:  # an empty directory holds nothing to lose
        (directory / "done").write_text("3")
    assert (empty / "done").read_text() == "3"


def test_atomic_directory_writes_into_the_current_folder(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    with atomic_directory(".") as directory:  # "." has no name of its own to make a sibling of
        (directory / "done").write_text("4")
    assert (tmp_path / "here" / "done").read_text() == "4"


# --- Resolving ---------------------------------------------------------------------------------------


def test_resolve_model_path_local_and_missing(tmp_path: Path) -> None:
    assert resolve_model_path(tmp_path) == tmp_path
    with pytest.raises(GptossTuneError, match="not found"):
        resolve_model_path(tmp_path / "nope")


def test_resolve_model_path_offline_hub_id_asks_for_a_local_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(GptossTuneError, match="pass the local directory"):
        resolve_model_path("openai/gpt-oss-20b")
