"""merge: transformers loads what we write and gives PEFT's base + adapter logits; MXFP4 round trip."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, Mxfp4Config

from gptoss_tune.errors import GptossTuneError
from gptoss_tune.infer.merge import merge
from gptoss_tune.infer.provenance import training_render_settings
from gptoss_tune.model.checkpoint import (
    FP4_VALUES,
    dequantize_mxfp4,
    load_checkpoint,
    quantize_mxfp4,
)
from gptoss_tune.model.init import init_model
from gptoss_tune.model.lora import LoraOptions
from gptoss_tune.model.mxfp4 import quantize_min_error

INPUT_IDS = torch.tensor([[200006, 17360, 200008, 12194, 11, 1495, 553, 481, 30, 200007, 200006, 173781]])
EXPERTS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.float() - expected.float()).abs().max() / expected.float().abs().max()).item()


def load_hf(path: Path, dtype: torch.dtype = torch.float32, **kwargs):
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs).eval()


@pytest.fixture(scope="module")
def adapter(tiny_model_dir, tmp_path_factory, make_random_adapter) -> Path:
    out = tmp_path_factory.mktemp("adapters") / "all-targets"
    return make_random_adapter(tiny_model_dir, out, LoraOptions(rank=4, alpha=8))


@pytest.fixture(scope="module")
def peft_logits(tiny_model_dir, adapter) -> torch.Tensor:
    """Logits of base + adapter through PEFT on transformers' model: the reference."""
    with torch.no_grad():
        return PeftModel.from_pretrained(load_hf(tiny_model_dir), adapter)(INPUT_IDS).logits


def test_fp32_merge_gives_peft_logits_exactly(tiny_model_dir, adapter, peft_logits, tmp_path) -> None:
    result = merge(tiny_model_dir, adapter, tmp_path / "merged", dtype="fp32")
    with torch.no_grad():
        logits = load_hf(result.output)(INPUT_IDS).logits
    assert relative_error(logits, peft_logits) <= 1e-5
    assert result.merged_tensors == 2 * 6  # 2 layers x (4 attention + 2 expert) sites


def test_bf16_merge_is_a_complete_sharded_checkpoint(tiny_model_dir, adapter, peft_logits, tmp_path) -> None:
    out = merge(tiny_model_dir, adapter, tmp_path / "merged", max_shard_bytes=10_000_000).output
    files = {path.name for path in out.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors.index.json"} <= files
    assert {
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "chat_template.jinja",
    } <= files
    shards = sorted(name for name in files if name.endswith(".safetensors"))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert not [name for name in files if name.startswith(".")]  # no temporary left behind
    assert json.loads((out / "generation_config.json").read_text()) == json.loads(
        (tiny_model_dir / "generation_config.json").read_text()
    )
    merged = load_hf(out, dtype=torch.bfloat16)  # the checkpoint's own dtype
    assert merged.dtype == torch.bfloat16
    with torch.no_grad():
        assert relative_error(merged(INPUT_IDS).logits, peft_logits) <= 2e-2
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.encode("<|start|>assistant", add_special_tokens=False) == [200006, 173781]


def test_base_without_tokenizer_gets_one_built_offline(tiny_model_dir, adapter, tmp_path) -> None:
    base = tmp_path / "bare"
    base.mkdir()
    for name in ("config.json", "model.safetensors"):
        (base / name).symlink_to(tiny_model_dir / name)
    out = merge(base, adapter, tmp_path / "merged").output
    assert AutoTokenizer.from_pretrained(out).encode("Hello", add_special_tokens=False) == [13225]
    assert (out / "chat_template.jinja").is_file()
    # without a generation_config.json in the base, the published one (stop on <|return|>, <|call|>)
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == [
        200002,
        199999,
        200012,
    ]


# --- MXFP4 -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mxfp4_base(tmp_path_factory) -> Path:
    """A tiny checkpoint stored like the published ones: experts MXFP4, the rest bf16."""
    return init_model("tiny", tmp_path_factory.mktemp("mx") / "base", mxfp4=True, seed=3, progress=False)


def scale_units(blocks_scales: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Each stored value's block scale, in our [E, in, out] orientation."""
    _, scales = blocks_scales
    return torch.exp2(scales.float() - 127).repeat_interleave(32, dim=-1).transpose(1, 2)


def nearest_grid_error(
    values: torch.Tensor, blocks_scales: tuple[torch.Tensor, torch.Tensor]
) -> torch.Tensor:
    """Distance from each value (ours [E, in, out]) to the nearest point of its block's MXFP4 grid."""
    unit = scale_units(blocks_scales).unsqueeze(-1)
    return (values.unsqueeze(-1) - torch.tensor(FP4_VALUES) * unit).abs().amin(dim=-1)


def block_errors(values: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Squared error per MXFP4 block (32 consecutive inputs of one output) of [E, in, out] weights."""
    return ((values - reference) ** 2).transpose(1, 2).reshape(-1, 32).sum(-1)


def stored_experts(out: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    found = {}
    with safe_open(out / "model.safetensors", framework="pt") as handle:
        for key in sorted(handle.keys()):
            if key.endswith("_blocks"):
                name = key.removesuffix("_blocks")
                found[name] = (handle.get_tensor(key), handle.get_tensor(name + "_scales"))
    return found


def test_mxfp4_merge_keeps_the_published_layout_and_rounds_to_nearest(
    mxfp4_base, tmp_path, make_random_adapter
) -> None:
    adapter = make_random_adapter(mxfp4_base, tmp_path / "adapter", LoraOptions(rank=4, alpha=8))
    exact = merge(mxfp4_base, adapter, tmp_path / "fp32", dtype="fp32").output
    result = merge(mxfp4_base, adapter, tmp_path / "mxfp4", dtype="mxfp4")
    out = result.output

    config = json.loads((out / "config.json").read_text())
    assert (
        config["quantization_config"]
        == json.loads((mxfp4_base / "config.json").read_text())["quantization_config"]
    )
    stored = stored_experts(out)
    assert set(stored) == {
        f"model.layers.{i}.mlp.experts.{n}" for i in range(2) for n in ("gate_up_proj", "down_proj")
    }
    base_size = sum(p.stat().st_size for p in mxfp4_base.glob("*.safetensors"))
    assert abs(result.bytes_written - base_size) < 0.01 * base_size  # the base's size

    # transformers loads it (dequantizing on CPU); non-expert tensors equal the bf16 merge, experts are
    # the fp32 merge rounded to the nearest point of each block's grid.
    mx_state = load_hf(out, quantization_config=Mxfp4Config(dequantize=True)).state_dict()
    bf16_state = load_hf(merge(mxfp4_base, adapter, tmp_path / "bf16").output).state_dict()
    exact_state = load_hf(exact).state_dict()
    for name, tensor in mx_state.items():
        if name.endswith(EXPERTS):
            error = (tensor - exact_state[name]).abs()
            assert (error <= nearest_grid_error(exact_state[name], stored[name]) + 1e-7).all(), name
            # and no block rounds worse than with the plain fitting-scale rule
            plain = fitting_scale_rule(exact_state[name].transpose(-1, -2)).transpose(-1, -2)
            assert (block_errors(tensor, exact_state[name]) <= block_errors(plain, exact_state[name])).all()
        else:
            assert torch.equal(tensor, bf16_state[name]), name


def test_mxfp4_merge_keeps_the_expert_update(mxfp4_base, tmp_path, make_random_adapter) -> None:
    """The merged experts are not the base's: the adapter's update survives re-quantization."""
    adapter = make_random_adapter(
        mxfp4_base, tmp_path / "adapter", LoraOptions(rank=4, alpha=8, targets=("experts",))
    )
    result = merge(mxfp4_base, adapter, tmp_path / "mxfp4", dtype="mxfp4")
    exact = load_checkpoint(merge(mxfp4_base, adapter, tmp_path / "fp32", dtype="fp32").output, torch.float32)
    base = load_checkpoint(mxfp4_base, torch.float32).state_dict()
    merged = load_checkpoint(result.output, torch.float32).state_dict()
    for name in [n for n in merged if n.endswith(EXPERTS)]:
        target = exact.state_dict()[name]
        assert (merged[name] != base[name]).float().mean() > 0.2, name
        assert (merged[name] - target).norm() < 0.5 * (base[name] - target).norm(), name
    assert result.expert_delta_kept is not None and result.expert_delta_kept > 0.7
    record = json.loads((result.output / "gptoss_tune_merge.json").read_text())
    assert record["expert_delta_kept"] == result.expert_delta_kept and record["dtype"] == "mxfp4"


def test_mxfp4_merge_warns_when_the_update_is_below_the_grid(
    mxfp4_base, tmp_path, make_random_adapter
) -> None:
    adapter = make_random_adapter(
        mxfp4_base, tmp_path / "adapter", LoraOptions(rank=4, alpha=8, targets=("experts",)), b_std=1e-4
    )
    result = merge(mxfp4_base, adapter, tmp_path / "mxfp4", dtype="mxfp4")
    assert result.expert_delta_kept < 0.5
    assert result.warnings and "MXFP4" in result.warnings[0]


# --- options and errors ------------------------------------------------------------------------------


def test_merge_errors_are_user_errors(tiny_model_dir, adapter, tmp_path) -> None:
    with pytest.raises(GptossTuneError, match="--dtype"):
        merge(tiny_model_dir, adapter, tmp_path / "a", dtype="fp8")
    with pytest.raises(GptossTuneError, match="adapter_config.json"):
        merge(tiny_model_dir, tmp_path, tmp_path / "b")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    with pytest.raises(GptossTuneError, match="already exists"):
        merge(tiny_model_dir, adapter, tmp_path / "taken")


@pytest.mark.parametrize("change", [{"num_local_experts": 8}, {"hidden_size": 128}])
def test_an_adapter_for_another_model_is_refused_before_anything_is_written(
    adapter, change, tmp_path
) -> None:
    """4 experts x rank 4 rows also divide among 8 experts: without the check, a 20b adapter would
    merge into 120b as garbage."""
    from gptoss_tune.model.checkpoint import save_checkpoint
    from gptoss_tune.model.init import random_weights
    from gptoss_tune.model.presets import preset_config, preset_init_scales

    config = preset_config("tiny")
    for key, value in change.items():
        setattr(config, key, value)
    other = save_checkpoint(random_weights(config, preset_init_scales("tiny"), 1), config, tmp_path / "other")
    with pytest.raises(GptossTuneError, match="trained for another model"):
        merge(other, adapter, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_a_failed_merge_record_leaves_no_checkpoint(tiny_model_dir, adapter, tmp_path) -> None:
    import shutil

    broken = tmp_path / "adapter"
    shutil.copytree(adapter, broken)
    (broken / "gptoss_tune_adapter.json").write_text("{not json")
    with pytest.raises(GptossTuneError, match="gptoss_tune_adapter.json"):
        merge(tiny_model_dir, broken, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]


def test_written_weights_are_as_readable_as_other_files(tiny_model_dir, adapter, tmp_path) -> None:
    out = merge(tiny_model_dir, adapter, tmp_path / "merged").output
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert modes["model.safetensors"] == modes["config.json"], modes
    assert (adapter / "adapter_model.safetensors").stat().st_mode & 0o777 == (
        adapter / "adapter_config.json"
    ).stat().st_mode & 0o777


def test_render_settings_of_the_training_data_travel_with_the_merge(
    tiny_model_dir, adapter, tmp_path
) -> None:
    run = tmp_path / "run"
    (run / "data").mkdir(parents=True)
    (run / "config.yaml").write_text("template: hf\ndate: '2025-08-05'\nreasoning_effort: medium\ndata: x\n")
    options = {"template": "harmony", "date": "2024-01-02", "reasoning_effort": "high", "loss_on": "last"}
    (run / "data" / "prepare.json").write_text(json.dumps({"options": options}))
    (run / "adapter").symlink_to(adapter, target_is_directory=True)
    expected = {"template": "harmony", "date": "2024-01-02", "reasoning_effort": "high"}
    assert training_render_settings(run / "adapter") == expected
    out = merge(tiny_model_dir, run / "adapter", tmp_path / "merged").output
    assert training_render_settings(out) == expected
    assert training_render_settings(tiny_model_dir) is None
    (run / "checkpoints" / "step-7").mkdir(parents=True)
    (run / "checkpoints" / "step-7" / "adapter").symlink_to(adapter, target_is_directory=True)
    assert training_render_settings(run / "checkpoints" / "step-7" / "adapter") == expected
    (run / "elsewhere").symlink_to(adapter, target_is_directory=True)  # not written by this run
    assert training_render_settings(run / "elsewhere") is None


# --- the re-quantizer ----------------------------------------------------------------------------------


def fitting_scale_rule(values: torch.Tensor) -> torch.Tensor:
    """The common rule, for comparison: each block's smallest fitting power-of-two scale, values rounded
    to the nearest e2m1 number (ties to the smaller magnitude)."""
    groups = values.float().reshape(-1, 32)
    unit = torch.exp2(torch.ceil(torch.log2(groups.abs().amax(-1, keepdim=True) / 6)))
    unit = torch.where(unit > 0, unit, torch.ones_like(unit))
    grid = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
    nearest = ((groups / unit).abs()[..., None] - grid).abs().argmin(-1)
    return (grid[nearest] * torch.sign(groups) * unit).reshape(values.shape)


def test_requantizing_a_slightly_changed_grid_block_keeps_its_scale() -> None:
    """With the fitting-scale rule, a tiny positive change to a block's top value (6 x scale) moves the
    whole block to a grid twice as coarse; choosing the scale by error keeps the base's codes."""
    generator = torch.Generator().manual_seed(0)
    on_grid = dequantize_mxfp4(*quantize_mxfp4(torch.randn(256, 128, generator=generator)), torch.float32)
    nudged = on_grid + torch.randn(on_grid.shape, generator=generator).abs() * 1e-6
    fitting = fitting_scale_rule(nudged)
    requantized = quantize_min_error(nudged)
    chosen = dequantize_mxfp4(requantized.blocks, requantized.scales, torch.float32)
    assert (fitting - nudged).norm() > 100 * (nudged - on_grid).norm()  # the pitfall, measured
    assert torch.equal(chosen, on_grid) and torch.equal(requantized.values, on_grid)
    assert torch.equal(fitting_scale_rule(on_grid), on_grid)
    assert torch.equal(dequantize_mxfp4(*quantize_mxfp4(nudged), torch.float32), on_grid)  # what merges use


def test_scale_choice_never_rounds_worse_than_the_fitting_scale() -> None:
    values = torch.randn(512, 64, generator=torch.Generator().manual_seed(1)) * 0.02
    fitting = fitting_scale_rule(values)
    quantized = quantize_min_error(values)
    chosen = dequantize_mxfp4(quantized.blocks, quantized.scales, torch.float32)
    assert torch.equal(chosen, quantized.values)
    per_block = lambda x: ((x - values) ** 2).reshape(-1, 32).sum(-1)  # noqa: E731
    assert (per_block(chosen) <= per_block(fitting)).all()
    assert per_block(chosen).sum() < per_block(fitting).sum()
