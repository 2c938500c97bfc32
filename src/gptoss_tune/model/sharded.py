"""Tensors that may be FSDP2 shards (DTensor): read them whole, write them from whole values.

Both are no-ops for ordinary tensors, so the same model code serves one GPU, DDP and FSDP.
"""

from __future__ import annotations

import torch
from torch import Tensor


def is_sharded(tensor: Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def full_tensor(tensor: Tensor) -> Tensor:
    """The whole value (a collective for a DTensor: every rank must call it in the same order)."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor


@torch.no_grad()
def assign_full_(target: Tensor, value: Tensor) -> None:
    """Copy a whole value into `target`, keeping only this rank's shard when `target` is a DTensor."""
    if is_sharded(target):
        from torch.distributed.tensor import distribute_tensor

        local = distribute_tensor(
            value.to(target.device, target.dtype), target.device_mesh, target.placements, src_data_rank=None
        ).to_local()
        target.to_local().copy_(local)
    else:
        target.copy_(value)
