"""MXFP4 expert storage on the GPU: bit-exactness against dequantize-at-load, memory, load time.

Run on a CUDA machine: `pytest -s tests/gpu/test_mxfp4_gpu.py` (-s shows the measured numbers).
The load-time test needs a 20b-shaped MXFP4 checkpoint written by
`gptoss-tune init-model --preset 20b --mxfp4 -o DIR`; point GPTOSS_TUNE_20B_MXFP4 at DIR.
"""

from __future__ import annotations

import gc
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import Tensor
from transformers import GptOssConfig
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

from gptoss_tune.bench.weights import empty_mxfp4_, randomize_
from gptoss_tune.bench.weights import random_model as build_random_model
from gptoss_tune.model.checkpoint import load_checkpoint
from gptoss_tune.model.gpt_oss import Experts, GptOss, eager_experts
from gptoss_tune.model.init import init_model
from gptoss_tune.model.lora import LoraOptions, apply_lora
from gptoss_tune.model.mxfp4 import DEFAULT_CHUNK_BYTES, compiled_dequantize_experts, dequantize_experts
from gptoss_tune.model.presets import preset_config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CUDA = torch.device("cuda")
GIB = 1024**3
MIB = 1024**2


def bits(tensor: Tensor) -> Tensor:
    return tensor.contiguous().view({2: torch.int16, 4: torch.int32}[tensor.element_size()])


def every_scale_and_byte(device: torch.device) -> tuple[Tensor, Tensor]:
    blocks = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(1, 1, 16, 16).repeat(1, 256, 1, 1)
    scales = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(1, 256, 1).repeat(1, 1, 16)
    return blocks.to(device), scales.to(device)


def grouped_experts_fn() -> Callable | None:
    try:
        from gptoss_tune.kernels.moe import GroupedExperts
    except ImportError:
        return None
    return GroupedExperts(compile=False)


def experts_fns() -> list:
    """The eager loop, and the grouped-GEMM kernel where `gptoss_tune.kernels` has it."""
    chosen = [pytest.param(eager_experts, id="eager")]
    if (grouped := grouped_experts_fn()) is not None:
        chosen.append(pytest.param(grouped, id="grouped"))
    return chosen


# --- dequantization ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequantization_on_cuda_is_bit_exact(dtype: torch.dtype) -> None:
    blocks, scales = every_scale_and_byte(CUDA)
    on_cpu = dequantize_experts(blocks.cpu(), scales.cpu(), dtype)
    eager = dequantize_experts(blocks, scales, dtype)
    compiled = compiled_dequantize_experts(blocks, scales, dtype)
    reference = convert_moe_packed_tensors(blocks, scales, dtype=dtype)
    for result in (eager, compiled):
        assert result.is_cuda and result.is_contiguous()
        assert torch.equal(bits(result).cpu(), bits(on_cpu))
        assert torch.equal(bits(result), bits(reference))


def _time_ms(fn: Callable[[], Tensor], repeats: int = 10) -> float:
    fn()
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - started) / repeats * 1000


def test_20b_layer_dequantization_matches_cpu_and_reports_speed() -> None:
    with torch.device("meta"):
        experts = Experts(preset_config("20b")).to(torch.bfloat16)
    empty_mxfp4_(experts)
    experts.to_empty(device=CUDA)
    randomize_(experts, torch.Generator(CUDA).manual_seed(0))
    for name in Experts.PROJECTIONS:
        blocks, scales = getattr(experts, f"{name}_blocks"), getattr(experts, f"{name}_scales")
        dense = dequantize_experts(blocks, scales, torch.bfloat16)
        assert torch.equal(bits(dense), bits(compiled_dequantize_experts(blocks, scales, torch.bfloat16)))
        assert torch.equal(
            bits(dense[3]).cpu(),
            bits(dequantize_experts(blocks[3:4].cpu(), scales[3:4].cpu(), torch.bfloat16)[0]),
        )
        gib = dense.numel() * dense.element_size() / GIB
        eager_ms = _time_ms(lambda b=blocks, s=scales: dequantize_experts(b, s, torch.bfloat16))
        compiled_ms = _time_ms(lambda b=blocks, s=scales: compiled_dequantize_experts(b, s, torch.bfloat16))
        print(
            f"\n20b {name}: {gib:.2f} GiB dense; eager {eager_ms:.2f} ms ({gib / eager_ms * 1000:.0f} GiB/s written), "
            f"compiled {compiled_ms:.2f} ms ({gib / compiled_ms * 1000:.0f} GiB/s)"
        )


# --- building models ----------------------------------------------------------------------------------


def random_model(config: GptOssConfig, storage: str, seed: int = 0) -> GptOss:
    """Random bf16 model on the GPU with MXFP4 experts, kept quantized ("mxfp4") or dequantized
    ("bf16"): both storages hold the same values. For "mxfp4" no dense expert is ever allocated."""
    return build_random_model(config, CUDA, torch.bfloat16, storage=storage, seed=seed)


def with_lora(model: GptOss, rank: int = 8) -> list[torch.nn.Parameter]:
    """LoRA on attention and experts, fp32 like the trainer's, with the same random values for any
    storage (B random too, so that every adapter matters)."""
    params = apply_lora(model, LoraOptions(rank=rank, alpha=2 * rank))
    generator = torch.Generator().manual_seed(1)
    for name in sorted(params):
        value = torch.randn(params[name].shape, generator=generator) * (0.01 if "lora_B" in name else 0.05)
        params[name].data = value.to(CUDA)
    return [params[name] for name in sorted(params)]


def autocast():
    return torch.autocast("cuda", dtype=torch.bfloat16)


# --- exactness on a tiny checkpoint -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_mxfp4(tmp_path_factory) -> Path:
    return init_model("tiny", tmp_path_factory.mktemp("gpu") / "tiny", mxfp4=True, progress=False)


def tiny_adapted(path: Path, storage: str, experts_fn) -> tuple[GptOss, list[torch.nn.Parameter]]:
    model = load_checkpoint(path, dtype=torch.bfloat16, device=CUDA, expert_storage=storage)
    params = with_lora(model, rank=4)
    model.set_kernels(experts=experts_fn)
    return model, params


def tiny_batch(length: int = 256) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(3)
    input_ids = torch.randint(0, 200000, (2, length), generator=generator)
    positions = torch.cat([torch.arange(100), torch.arange(length - 100)]).expand(2, length)
    return input_ids.to(CUDA), positions.contiguous().to(CUDA)


@pytest.mark.parametrize("experts_fn", experts_fns())
@pytest.mark.parametrize("checkpointing", [False, True])
def test_mxfp4_storage_equals_dequantize_at_load_on_cuda(
    tiny_mxfp4: Path, experts_fn, checkpointing: bool
) -> None:
    input_ids, positions = tiny_batch()
    results = []
    for storage in ("bf16", "mxfp4"):
        model, params = tiny_adapted(tiny_mxfp4, storage, experts_fn)
        model.set_gradient_checkpointing(checkpointing)
        with torch.no_grad(), autocast():
            logits = model(input_ids, positions)
        with autocast():
            loss, _ = model.loss(input_ids, input_ids, positions)
        loss.backward()
        results.append((logits, loss.detach(), [p.grad for p in params]))
    (logits, loss, grads), (mx_logits, mx_loss, mx_grads) = results
    assert model.model.layers[0].mlp.experts.is_mxfp4("gate_up_proj")
    assert torch.equal(bits(mx_logits), bits(logits))
    assert torch.equal(mx_loss, loss)
    for grad, mx_grad in zip(grads, mx_grads, strict=True):
        assert torch.equal(bits(mx_grad), bits(grad))


@pytest.mark.parametrize("experts_fn", experts_fns())
def test_three_training_steps_give_the_same_losses_on_cuda(tiny_mxfp4: Path, experts_fn) -> None:
    input_ids, positions = tiny_batch()
    curves = []
    for storage in ("bf16", "mxfp4"):
        model, params = tiny_adapted(tiny_mxfp4, storage, experts_fn)
        optimizer = torch.optim.AdamW(params, lr=1e-3, fused=True)
        losses = []
        for _ in range(3):
            with autocast():
                loss, count = model.loss(input_ids, input_ids, positions)
            (loss / count).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
        curves.append(losses)
    assert curves[0] == curves[1]


# --- memory at the 20b shape ---------------------------------------------------------------------------------


def twenty_b(layers: int) -> GptOssConfig:
    config = preset_config("20b")
    config.num_hidden_layers = layers
    config.layer_types = config.layer_types[:layers]
    return config


def fresh_memory() -> int:
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated()


def moe_memory(experts: Experts, experts_fn, tokens: int) -> tuple[int, int]:
    """(bytes still allocated after forward, peak bytes over forward + backward), above the start."""
    generator = torch.Generator(CUDA).manual_seed(0)
    top_k, count = 4, experts.num_experts
    hidden = torch.randn(tokens, 2880, device=CUDA, generator=generator, dtype=torch.bfloat16)
    hidden.requires_grad_(True)
    indices = torch.rand(tokens, count, device=CUDA, generator=generator).topk(top_k).indices
    weights = torch.softmax(torch.randn(tokens, top_k, device=CUDA, generator=generator), -1).to(
        torch.bfloat16
    )
    start = fresh_memory()
    with autocast():
        out = experts_fn(experts, hidden, indices, weights)
    torch.cuda.synchronize()
    retained = torch.cuda.memory_allocated() - start
    out.float().pow(2).mean().backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - start
    del out
    return retained, peak


@pytest.mark.parametrize("experts_fn", experts_fns())
def test_20b_moe_layer_keeps_no_dense_weight_for_backward(experts_fn) -> None:
    config = twenty_b(1)
    tokens = 8192
    usage = {}
    for storage in ("bf16", "mxfp4"):
        model = random_model(config, storage)
        with_lora(model)
        experts = model.model.layers[0].mlp.experts
        resident = sum(
            t.numel() * t.element_size()
            for name, t in experts.state_dict().items()
            if name.startswith(Experts.PROJECTIONS) and not name.endswith("_bias")  # the weights only
        )
        usage[storage] = (resident, *moe_memory(experts, experts_fn, tokens))
        del model, experts
    dense_layer = sum(torch.Size(shape).numel() * 2 for shape in Experts(config).shapes.values())
    for storage, (resident, retained, peak) in usage.items():
        print(
            f"\n{storage}: experts resident {resident / GIB:.2f} GiB, kept after forward {retained / GIB:.2f} GiB, "
            f"peak over fwd+bwd {peak / GIB:.2f} GiB (dense layer {dense_layer / GIB:.2f} GiB)"
        )
    (dense_resident, dense_retained, dense_peak), (mx_resident, mx_retained, mx_peak) = (
        usage["bf16"],
        usage["mxfp4"],
    )
    assert mx_resident <= 0.27 * dense_resident  # 4.25 bits per value
    assert mx_retained <= dense_retained + 32 * MIB  # autograd holds no dequantized weight
    assert mx_peak <= dense_peak + dense_layer + DEFAULT_CHUNK_BYTES + 64 * MIB  # one layer dense at a time


def test_two_layer_20b_model_peak_memory() -> None:
    """A training step (LoRA on attention and experts, checkpointing, 8k tokens): MXFP4 storage saves all
    of the experts' bf16 memory but one layer's worth, and computes the same logits."""
    config = twenty_b(2)
    input_ids = torch.randint(0, config.vocab_size, (4, 2048), generator=torch.Generator().manual_seed(0)).to(
        CUDA
    )
    peaks, logits, resident = {}, {}, {}
    for storage in ("bf16", "mxfp4"):
        model = random_model(config, storage)
        params = with_lora(model)
        model.set_gradient_checkpointing(True)
        optimizer = torch.optim.AdamW(params, lr=1e-4, fused=True)
        with torch.no_grad(), autocast():
            logits[storage] = model(input_ids[:1, :256]).cpu()
        start = fresh_memory()
        for _ in range(2):
            with autocast():
                loss, count = model.loss(input_ids, input_ids)
            (loss / count).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        peaks[storage] = torch.cuda.max_memory_allocated()
        resident[storage] = start
        print(
            f"\n2-layer 20b, {storage} experts: resident {start / GIB:.2f} GiB, step peak {peaks[storage] / GIB:.2f} GiB"
        )
        del model, params, optimizer, loss
        fresh_memory()
    dense_layer = sum(torch.Size(shape).numel() * 2 for shape in Experts(config).shapes.values())
    saved = resident["bf16"] - resident["mxfp4"]
    assert saved >= 2 * dense_layer * 0.7
    assert peaks["mxfp4"] <= peaks["bf16"] - saved + dense_layer + DEFAULT_CHUNK_BYTES + 128 * MIB
    assert torch.equal(bits(logits["mxfp4"]), bits(logits["bf16"]))


# --- load time --------------------------------------------------------------------------------------------


@pytest.mark.skipif(
    "GPTOSS_TUNE_20B_MXFP4" not in os.environ, reason="set GPTOSS_TUNE_20B_MXFP4 to a 20b MXFP4 dir"
)
def test_20b_mxfp4_checkpoint_loads_to_the_gpu_within_a_minute() -> None:
    path = Path(os.environ["GPTOSS_TUNE_20B_MXFP4"])
    start = fresh_memory()
    started = time.perf_counter()
    model = load_checkpoint(path, dtype=torch.bfloat16, device=CUDA, expert_storage="mxfp4")
    torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    allocated = torch.cuda.memory_allocated() - start
    peak = torch.cuda.max_memory_allocated() - start
    print(
        f"\n20b MXFP4 load: {seconds:.1f} s, {allocated / GIB:.2f} GiB allocated, peak {peak / GIB:.2f} GiB"
    )
    assert all(layer.mlp.experts.is_mxfp4("down_proj") for layer in model.model.layers)
    assert seconds <= 60
    assert peak <= 14 * GIB  # ~12.8 GiB of weights; never a bf16 copy of the experts (~39 GiB)
