"""Wrap the model for several processes: DDP (each rank holds the whole model; only the LoRA
gradients travel) or FSDP2 (`fully_shard` per decoder layer; for models whose weights do not fit
one GPU).

For FSDP the model is built on the meta device, sharded, then filled tensor by tensor from the
checkpoint: each rank keeps only its slice, so no process ever holds the whole model.
"""

from __future__ import annotations

import torch
from torch import nn

from gptoss_tune.errors import GptossTuneError
from gptoss_tune.model.checkpoint import (
    checked_tensors,
    iter_checkpoint_tensors,
    read_config,
    resolve_model_path,
)
from gptoss_tune.model.gpt_oss import GptOss
from gptoss_tune.model.lora import LoraOptions, adapters_to_fp32, apply_lora
from gptoss_tune.model.sharded import assign_full_
from gptoss_tune.train.dist import DistInfo


class LossModule(nn.Module):
    """forward() = the model's summed loss, so DDP's and FSDP's hooks see the whole computation."""

    def __init__(self, model: GptOss) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, labels, position_ids):
        return self.model.loss(input_ids, labels, position_ids)


def wrap_ddp(model: GptOss, device: torch.device, info: DistInfo) -> nn.Module:
    module = LossModule(model)
    if not info.enabled:
        return module
    device_ids = [device.index] if device.type == "cuda" else None
    # No buffer broadcast: MXFP4 expert buffers are frozen and identical on every rank.
    return nn.parallel.DistributedDataParallel(module, device_ids=device_ids, broadcast_buffers=False)


def build_fsdp(
    model_path: str, options: LoraOptions, dtype: torch.dtype, device: torch.device, info: DistInfo
) -> tuple[nn.Module, GptOss, dict[str, nn.Parameter]]:
    """(root module to call, the inner model, trainable LoRA parameters), sharded over all ranks."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if not info.enabled:
        raise GptossTuneError("--sharding fsdp needs several processes: use --gpus N (N > 1) or torchrun.")
    path = resolve_model_path(model_path)
    with torch.device("meta"):
        model = GptOss(read_config(path)).to(dtype)
    adapters_to_fp32(apply_lora(model, options))
    mesh = init_device_mesh(device.type, (info.world_size,))
    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    root = LossModule(model)
    fully_shard(root, mesh=mesh, mp_policy=policy)
    root.to_empty(device=device)
    _fill_from_checkpoint(model, path, dtype, device)
    return root, model, {name: p for name, p in model.named_parameters() if p.requires_grad}


def _fill_from_checkpoint(model: GptOss, path, dtype: torch.dtype, device: torch.device) -> None:
    """Each full tensor is read (or drawn) on this rank's device, and only its slice is kept."""
    expected = {name: tuple(p.shape) for name, p in model.named_parameters() if not p.requires_grad}
    for name, tensor in checked_tensors(path, iter_checkpoint_tensors(path, dtype, device), expected):
        assign_full_(model.get_parameter(name), tensor)
