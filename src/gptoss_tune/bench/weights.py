"""Random gpt-oss weights built straight on the device, and models that share them.

`random_model(config, device, dtype, storage="mxfp4")` never allocates a dense expert weight: the
model is built on the meta device, every layer's experts are switched to MXFP4 storage
(`Experts.store_mxfp4`) with empty buffers, `to_empty` allocates what remains on the device, and
`randomize_` fills it there (no CPU loop, no quantization: the codes are drawn as random bytes).
A 120b-shaped model (~57 GiB of MXFP4 experts) builds in seconds on a GPU.

`shared_copy(model)` is a fresh module tree over the same tensors (what each benchmark recipe
attaches its adapters and kernels to, so recipes never see each other's), and
`model_from_state_dict` the same over a state dict (e.g. of transformers' GptOssForCausalLM).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn
from transformers import GptOssConfig

from gptoss_tune.model.gpt_oss import Experts, GptOss
from gptoss_tune.model.mxfp4 import Mxfp4Weight, empty_mxfp4
from gptoss_tune.model.random_weights import DEFAULT_STD, fill_codes_, fill_dense_

# Storage of the experts in `gptoss-tune bench --expert-storage`.
BENCH_EXPERT_STORAGES = ("bf16", "mxfp4")


def empty_mxfp4_(experts: Experts) -> None:
    """Switch both projections to MXFP4 storage with uninitialized buffers on the experts' device
    (on meta, `to_empty` then allocates them: the dense weights are never allocated)."""
    device = experts.gate_up_proj_bias.device
    for name in Experts.PROJECTIONS:
        experts.store_mxfp4(name, empty_mxfp4(experts.weight_shape(name), device))


def randomize_(
    module: nn.Module,
    generator: torch.Generator,
    std: float = DEFAULT_STD,
    lm_head_std: float | None = None,
    scale_spread: int = 0,
) -> None:
    """Fill `module` in place, on its device, by the rules of `gptoss_tune.model.random_weights`
    (norms 1, lm_head normal(0, lm_head_std or std), every other parameter normal(0, std); MXFP4
    codes random bytes, scales RANDOM_SCALE +- scale_spread) from one shared generator."""
    for name, param in module.named_parameters():
        fill_dense_(name, param, std, lm_head_std, generator)
    buffers = dict(module.named_buffers())
    for name, blocks in buffers.items():
        if name.endswith("_blocks"):
            fill_codes_(blocks, buffers[name.removesuffix("_blocks") + "_scales"], scale_spread, generator)


def random_model(
    config: GptOssConfig,
    device: torch.device | str,
    dtype: torch.dtype = torch.bfloat16,
    storage: str = "mxfp4",
    seed: int = 0,
    lm_head_std: float | None = None,
    scale_spread: int = 0,
) -> GptOss:
    """Random model on `device` with MXFP4 expert values, kept quantized ("mxfp4") or dequantized
    ("bf16": dense experts in `dtype`): both storages hold the same values. For "mxfp4" no dense
    expert weight is ever allocated. The model is frozen (no parameter requires grad)."""
    if storage not in BENCH_EXPERT_STORAGES:
        raise ValueError(
            f"unknown expert storage {storage!r}; choose from {', '.join(BENCH_EXPERT_STORAGES)}"
        )
    device = torch.device(device)
    with torch.device("meta"):
        model = GptOss(config).to(dtype)
    for layer in model.model.layers:
        empty_mxfp4_(layer.mlp.experts)
    model.to_empty(device=device)
    model.requires_grad_(False)
    randomize_(
        model, torch.Generator(device).manual_seed(seed), lm_head_std=lm_head_std, scale_spread=scale_spread
    )
    if storage == "bf16":
        for layer in model.model.layers:
            for name in Experts.PROJECTIONS:
                layer.mlp.experts.store_dense(name, layer.mlp.experts.dense(name))
    return model


def model_from_state_dict(config: GptOssConfig, state: Mapping[str, Tensor]) -> GptOss:
    """Our model over the tensors of `state` (dense experts; transformers' names): no copy."""
    with torch.device("meta"):
        model = GptOss(config)
    model.load_state_dict(state, assign=True)
    model.requires_grad_(False)
    return model


def shared_copy(model: GptOss) -> GptOss:
    """A fresh GptOss (no adapters, eager kernels, no checkpointing) over `model`'s tensors, MXFP4
    expert buffers included: no copy of any weight."""
    with torch.device("meta"):
        copy = GptOss(model.config)
    for mine, theirs in zip(copy.model.layers, model.model.layers, strict=True):
        experts = theirs.mlp.experts
        for name in Experts.PROJECTIONS:
            if experts.is_mxfp4(name):
                blocks, scales = experts._buffers[f"{name}_blocks"], experts._buffers[f"{name}_scales"]
                mine.mlp.experts.store_mxfp4(name, Mxfp4Weight(blocks, scales))
    copy.load_state_dict(model.state_dict(), assign=True)
    copy.requires_grad_(False)
    return copy


def expert_storage_of(model: GptOss) -> str:
    """The experts' storage: "mxfp4" when every layer's are MXFP4, "bf16" when none is, else "mixed"."""
    flags = {layer.mlp.experts.is_mxfp4(name) for layer in model.model.layers for name in Experts.PROJECTIONS}
    return "mxfp4" if flags == {True} else "bf16" if flags == {False} else "mixed"


def weight_bytes(module: nn.Module) -> int:
    """Bytes of the module's parameters and buffers (MXFP4 experts at their stored size)."""
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())
