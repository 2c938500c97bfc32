"""MXFP4 expert storage: exact dequantization, the storage switch at load, bit-identical training,
and no dense expert weight kept alive by autograd."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

from gptoss_tune.errors import GptossTuneError
from gptoss_tune.model.checkpoint import (
    checkpoint_has_mxfp4_experts,
    dequantize_mxfp4,
    load_checkpoint,
    save_checkpoint,
)
from gptoss_tune.model.gpt_oss import Experts, GptOss
from gptoss_tune.model.init import init_model
from gptoss_tune.model.lora import LoraOptions, apply_lora, lora_state_dict_peft, trainable_parameter_report
from gptoss_tune.model.mxfp4 import (
    Mxfp4Weight,
    check_mxfp4,
    compiled_dequantize_experts,
    densify_tensors,
    dequantize_experts,
    frozen_weight_op,
    resolve_expert_storage,
)

EXPERTS = ("gate_up_proj", "down_proj")


def bits(tensor: torch.Tensor) -> torch.Tensor:
    """The raw bits, so that -0.0 / 0.0 and NaN payloads count as different."""
    return tensor.contiguous().view({2: torch.int16, 4: torch.int32}[tensor.element_size()])


def every_scale_and_byte() -> tuple[torch.Tensor, torch.Tensor]:
    """blocks [1, 256, 16, 16] / scales [1, 256, 16]: row s pairs scale s with each of the 256 bytes."""
    blocks = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(1, 1, 16, 16).repeat(1, 256, 1, 1)
    scales = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(1, 256, 1).repeat(1, 1, 16)
    return blocks, scales


def random_mxfp4(experts: int, rows: int, groups: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 256, (experts, rows, groups, 16), dtype=torch.uint8, generator=generator)
    scales = torch.randint(110, 135, (experts, rows, groups), dtype=torch.uint8, generator=generator)
    return blocks, scales


# --- dequantization --------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_scale_and_byte_dequantizes_like_transformers(dtype: torch.dtype) -> None:
    blocks, scales = every_scale_and_byte()
    ours = dequantize_experts(blocks, scales, dtype)
    assert ours.shape == (1, 16 * 32, 256) and ours.is_contiguous()
    assert torch.equal(bits(ours), bits(convert_moe_packed_tensors(blocks, scales, dtype=dtype)))
    assert torch.equal(bits(ours), bits(dequantize_mxfp4(blocks, scales, dtype).transpose(1, 2)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_dequantization_of_many_experts_equals_transformers(dtype: torch.dtype) -> None:
    blocks, scales = random_mxfp4(experts=5, rows=48, groups=3, seed=1)
    expected = convert_moe_packed_tensors(blocks, scales, dtype=dtype)
    one_expert_per_chunk = blocks[0].numel() * 8
    assert torch.equal(
        bits(dequantize_experts(blocks, scales, dtype, chunk_bytes=one_expert_per_chunk)), bits(expected)
    )
    assert torch.equal(bits(dequantize_experts(blocks, scales, dtype)), bits(expected))
    assert torch.equal(bits(dequantize_experts(blocks[2:3], scales[2:3], dtype)), bits(expected[2:3]))


def test_compiled_dequantization_equals_eager() -> None:
    blocks, scales = every_scale_and_byte()
    for dtype in (torch.float32, torch.bfloat16):
        compiled = compiled_dequantize_experts(blocks, scales, dtype)
        assert compiled.is_contiguous()
        assert torch.equal(bits(compiled), bits(dequantize_experts(blocks, scales, dtype)))


def test_malformed_mxfp4_is_rejected() -> None:
    blocks, scales = random_mxfp4(experts=2, rows=4, groups=2)
    with pytest.raises(ValueError, match="uint8"):
        check_mxfp4(blocks.to(torch.int32), scales)
    with pytest.raises(ValueError, match=r"\[E, out, G, 16\]"):
        check_mxfp4(blocks, scales[:, :, :1])
    with pytest.raises(ValueError, match=r"\[E, out, G, 16\]"):
        Mxfp4Weight(blocks[..., :8], scales)
    assert Mxfp4Weight(blocks, scales).shape == (2, 64, 4)


# --- autograd without the weight ---------------------------------------------------------------------


def test_frozen_weight_op_matches_plain_matmul_under_autocast() -> None:
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(32, 24, generator=generator).to(torch.bfloat16)
    x = torch.randn(7, 32, generator=generator)  # fp32 input, as LoRA-adapted activations can be
    outputs, grads = [], []
    for frozen in (False, True):
        leaf = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = frozen_weight_op(torch.matmul, leaf, weight, lambda: weight) if frozen else leaf @ weight
        out.float().pow(2).sum().backward()
        outputs.append(out)
        grads.append(leaf.grad)
    assert outputs[1].dtype == torch.bfloat16 and grads[1].dtype == torch.float32
    assert torch.equal(outputs[0], outputs[1])
    assert torch.equal(grads[0], grads[1])


@pytest.mark.skipif(not hasattr(torch.nn.functional, "grouped_mm"), reason="torch without F.grouped_mm")
def test_frozen_weight_op_matches_plain_grouped_mm() -> None:
    """The grouped-GEMM experts' use: one weight stack [E, in, out], rows sorted by expert."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(3, 32, 16, generator=generator).to(torch.bfloat16)
    x = torch.randn(10, 32, generator=generator).to(torch.bfloat16)
    offsets = torch.tensor([3, 3, 10], dtype=torch.int32)  # the middle expert gets no rows

    def grouped(rows: torch.Tensor, weights: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.grouped_mm(rows, weights, offs=offs)

    results = []
    for frozen in (False, True):
        leaf = x.clone().requires_grad_(True)
        out = (
            frozen_weight_op(grouped, leaf, weight, lambda: weight, offsets)
            if frozen
            else grouped(leaf, weight, offsets)
        )
        out.float().pow(2).sum().backward()
        results.append((out, leaf.grad))
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])


def test_frozen_weight_op_gets_the_weight_from_rebuild_in_backward() -> None:
    weight = torch.randn(4, 3)
    x = torch.randn(5, 4, requires_grad=True)
    out = frozen_weight_op(torch.matmul, x, weight, lambda: 2 * weight)  # a rebuild that differs on purpose
    (grad,) = torch.autograd.grad(out.sum(), x)
    assert torch.allclose(grad, torch.ones(5, 3) @ (2 * weight).T)


def test_frozen_weight_op_leaves_trainable_weights_to_plain_autograd() -> None:
    weight = torch.randn(4, 3, requires_grad=True)
    x = torch.randn(5, 4, requires_grad=True)
    frozen_weight_op(torch.matmul, x, weight, lambda: weight).sum().backward()
    assert torch.allclose(weight.grad, x.detach().T @ torch.ones(5, 3))


# --- the storage switch on a tiny model -------------------------------------------------------------


@pytest.fixture(scope="module")
def mxfp4_dir(tmp_path_factory) -> Path:
    return init_model(
        "tiny", tmp_path_factory.mktemp("mxfp4") / "tiny", mxfp4=True, dtype=torch.float32, progress=False
    )


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory) -> Path:
    return init_model("tiny", tmp_path_factory.mktemp("dense") / "tiny", dtype=torch.float32, progress=False)


def adapted(path: Path, storage: str, dtype: torch.dtype = torch.float32) -> GptOss:
    """The checkpoint with LoRA on attention and experts, B random so that every adapter matters."""
    model = load_checkpoint(path, dtype=dtype, expert_storage=storage)
    params = apply_lora(model, LoraOptions(rank=4, alpha=8), generator=torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name in sorted(params):
            if "lora_B" in name:
                params[name].copy_(0.1 * torch.randn(params[name].shape, generator=generator))
    return model


def batch(seed: int = 3, length: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    input_ids = torch.randint(0, 1000, (2, length), generator=torch.Generator().manual_seed(seed))
    positions = torch.cat([torch.arange(10), torch.arange(length - 10)]).expand(2, length)  # two documents
    return input_ids, positions


def test_mxfp4_storage_keeps_the_checkpoint_blocks_as_buffers(mxfp4_dir: Path) -> None:
    model = load_checkpoint(mxfp4_dir, dtype=torch.float32, expert_storage="mxfp4")
    dense = load_checkpoint(mxfp4_dir, dtype=torch.float32, expert_storage="bf16")
    parameters, buffers = dict(model.named_parameters()), dict(model.named_buffers())
    with safe_open(str(mxfp4_dir / "model.safetensors"), framework="pt") as handle:
        for layer, name in ((0, "gate_up_proj"), (1, "down_proj")):
            key = f"model.layers.{layer}.mlp.experts.{name}"
            assert key not in parameters and key in dict(dense.named_parameters())
            for part in ("blocks", "scales"):
                assert torch.equal(buffers[f"{key}_{part}"], handle.get_tensor(f"{key}_{part}"))
    experts: Experts = model.model.layers[1].mlp.experts
    dense_experts: Experts = dense.model.layers[1].mlp.experts
    assert experts.is_mxfp4("gate_up_proj") and not dense_experts.is_mxfp4("gate_up_proj")
    assert torch.equal(experts.gate_up_weight(), dense_experts.gate_up_weight())
    assert torch.equal(experts.down_weight(), dense_experts.down_weight())
    assert torch.equal(experts.expert_weight("down_proj", 2), dense_experts.down_proj[2])
    assert experts.down_weight().dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_mxfp4_storage_equals_dequantize_at_load_bit_for_bit(
    mxfp4_dir: Path, dtype: torch.dtype, checkpointing: bool
) -> None:
    input_ids, positions = batch()
    results = []
    for storage in ("bf16", "mxfp4"):
        model = adapted(mxfp4_dir, storage, dtype)
        model.set_gradient_checkpointing(checkpointing)
        with torch.no_grad():
            logits = model(input_ids, positions)
        loss, _ = model.loss(input_ids, input_ids, positions)
        loss.backward()
        grads = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
        results.append((logits, loss.detach(), grads))
    (logits, loss, grads), (mx_logits, mx_loss, mx_grads) = results
    assert torch.equal(bits(mx_logits), bits(logits))
    assert torch.equal(mx_loss, loss)
    assert grads.keys() == mx_grads.keys()
    assert any("gate_up_lora" in name for name in grads) and any("down_lora" in name for name in grads)
    for name, grad in grads.items():
        assert grad.abs().sum() > 0, name
        assert torch.equal(bits(mx_grads[name]), bits(grad)), name


def test_training_with_mxfp4_storage_gives_the_same_losses(mxfp4_dir: Path) -> None:
    input_ids, positions = batch(seed=5, length=32)
    runs = []
    for storage in ("bf16", "mxfp4"):
        model = adapted(mxfp4_dir, storage)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-2)
        losses = []
        for _ in range(3):
            loss, count = model.loss(input_ids, input_ids, positions)
            (loss / count).backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        runs.append((losses, lora_state_dict_peft(model)))
    (losses, adapter), (mx_losses, mx_adapter) = runs
    assert losses == mx_losses and losses[2] < losses[0]
    assert all(torch.equal(mx_adapter[key], value) for key, value in adapter.items())


def test_parameter_report_counts_mxfp4_experts(mxfp4_dir: Path) -> None:
    reports = [trainable_parameter_report(adapted(mxfp4_dir, storage)) for storage in ("bf16", "mxfp4")]
    assert reports[0] == reports[1]


def test_no_dequantized_weight_outlives_the_forward(mxfp4_dir: Path) -> None:
    model = adapted(mxfp4_dir, "mxfp4")
    alive: list[weakref.ref] = []
    calls: list[int] = []

    def recording_dequantize(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        weight = dequantize_experts(blocks, scales, dtype)
        alive.append(weakref.ref(weight))
        calls.append(blocks.shape[0])
        return weight

    for layer in model.model.layers:
        layer.mlp.experts.dequantize_fn = recording_dequantize
    input_ids, positions = batch()
    loss, _ = model.loss(input_ids, input_ids, positions)
    gc.collect()
    experts = model.config.num_local_experts
    assert calls == [experts] * 2 * len(model.model.layers)  # gate_up and down once per layer
    assert [ref for ref in alive if ref() is not None] == []
    # The detector works: plain autograd keeps the weight it multiplies by.
    hidden = torch.randn(3, model.config.hidden_size, requires_grad=True)
    kept = hidden @ model.model.layers[0].mlp.experts.gate_up_weight()[0]
    gc.collect()
    assert alive[-1]() is not None and kept.grad_fn is not None
    del kept

    calls.clear()
    loss.backward()
    assert set(calls) == {1}  # backward dequantizes one expert at a time, what the gradient needs


def test_saved_tensors_hold_no_expert_weight(mxfp4_dir: Path) -> None:
    model = adapted(mxfp4_dir, "mxfp4")
    experts = model.model.layers[0].mlp.experts
    one_expert_bytes = min(experts.weight_shape(name)[1:].numel() for name in EXPERTS) * 4
    saved_bytes: list[int] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved_bytes.append(tensor.untyped_storage().nbytes())
        return tensor

    # 8 tokens: the activations are far smaller than one expert's weight.
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model.model.layers[0].mlp(torch.randn(1, 8, model.config.hidden_size, requires_grad=True))
    assert saved_bytes and max(saved_bytes) < one_expert_bytes
    # Trainable dense weights (plain autograd) do get saved: the check can see them.
    dense = load_checkpoint(mxfp4_dir, dtype=torch.float32, expert_storage="bf16")
    saved_bytes.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        dense.model.layers[0].mlp(torch.randn(1, 8, model.config.hidden_size, requires_grad=True))
    assert max(saved_bytes) >= one_expert_bytes


# --- choosing the storage, state dicts, saving -----------------------------------------------------------


def test_auto_storage_is_mxfp4_only_for_mxfp4_checkpoints_on_a_gpu(mxfp4_dir: Path, dense_dir: Path) -> None:
    assert checkpoint_has_mxfp4_experts(mxfp4_dir) and not checkpoint_has_mxfp4_experts(dense_dir)
    assert resolve_expert_storage("auto", True, "cuda:0") == "mxfp4"
    assert resolve_expert_storage("auto", True, "cpu") == "bf16"
    assert resolve_expert_storage("auto", False, torch.device("cuda")) == "bf16"
    assert resolve_expert_storage("mxfp4", True, "cpu") == "mxfp4"
    assert resolve_expert_storage("bf16", True, "cuda") == "bf16"
    with pytest.raises(ValueError, match="Unknown expert storage"):
        resolve_expert_storage("fp8", True, "cuda")
    model = load_checkpoint(mxfp4_dir, dtype=torch.float32, expert_storage="auto")
    assert not list(model.named_buffers())  # on the CPU, auto dequantizes at load
    with pytest.raises(GptossTuneError, match="needs a checkpoint with MXFP4 experts"):
        load_checkpoint(dense_dir, dtype=torch.float32, expert_storage="mxfp4")


def test_store_mxfp4_rejects_a_weight_of_another_shape(mxfp4_dir: Path) -> None:
    model = load_checkpoint(mxfp4_dir, dtype=torch.float32, expert_storage="mxfp4")
    experts = model.model.layers[0].mlp.experts
    blocks, scales = experts.down_proj_blocks, experts.down_proj_scales
    with pytest.raises(ValueError, match="expected"):
        experts.store_mxfp4("gate_up_proj", Mxfp4Weight(blocks, scales))


def test_state_dict_of_mxfp4_storage_saves_as_mxfp4_or_dense(mxfp4_dir: Path, tmp_path: Path) -> None:
    model = load_checkpoint(mxfp4_dir, dtype=torch.float32, expert_storage="mxfp4")
    state = model.state_dict()
    as_mxfp4 = save_checkpoint(state.items(), model.config, tmp_path / "mxfp4", torch.float32, mxfp4=True)
    as_dense = save_checkpoint(state.items(), model.config, tmp_path / "dense", torch.float32, mxfp4=False)
    assert checkpoint_has_mxfp4_experts(as_mxfp4) and not checkpoint_has_mxfp4_experts(as_dense)
    reference = load_checkpoint(mxfp4_dir, dtype=torch.float32).state_dict()
    for path in (as_mxfp4, as_dense):
        reloaded = load_checkpoint(path, dtype=torch.float32).state_dict()
        assert reloaded.keys() == reference.keys()
        assert all(torch.equal(reloaded[key], value) for key, value in reference.items())
    again = load_checkpoint(as_mxfp4, dtype=torch.float32, expert_storage="mxfp4").state_dict()
    assert all(torch.equal(again[key], value) for key, value in state.items())


def test_densify_pairs_blocks_with_scales_and_reports_orphans() -> None:
    blocks, scales = random_mxfp4(experts=2, rows=8, groups=2)
    tensors = [("a.w_scales", scales), ("a.bias", torch.ones(2)), ("a.w_blocks", blocks)]
    out = dict(densify_tensors(tensors, torch.float32))
    assert list(out) == ["a.bias", "a.w"]
    assert torch.equal(out["a.w"], dequantize_experts(blocks, scales, torch.float32))
    with pytest.raises(ValueError, match="other half"):
        list(densify_tensors([("a.w_blocks", blocks)], torch.float32))
