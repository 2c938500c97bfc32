"""Which device and dtype a command runs on, from its --device / --dtype options (one place for all)."""

from __future__ import annotations

import torch

from gptoss_tune.errors import GptossTuneError

DTYPES = {
    "auto": None,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp32": torch.float32,
    "float32": torch.float32,
}


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    """auto: this process's GPU when there is one, else the CPU; `cuda` means this process's GPU."""
    if name == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise GptossTuneError(f"Unknown --device '{name}': use auto, cpu, cuda or cuda:N.") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise GptossTuneError(f"--device {name}: no CUDA device is available.")
        if device.index is None:
            device = torch.device(f"cuda:{local_rank}")
    return device


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """auto: bf16 on a GPU (where it is fast), fp32 on the CPU."""
    if name not in DTYPES:
        raise GptossTuneError(f"Unknown --dtype '{name}': use auto, bf16 or fp32.")
    chosen = DTYPES[name]
    if chosen is None:
        chosen = torch.bfloat16 if device.type == "cuda" else torch.float32
    return chosen
