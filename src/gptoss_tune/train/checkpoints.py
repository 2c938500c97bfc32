"""Training checkpoints: OUT/checkpoints/step-N/ with the adapter (PEFT format), optimizer, scheduler,
every rank's RNG state and the step.

Written into a temporary folder that rank 0 renames when every rank has written its part, so a run
killed at any moment never leaves a half checkpoint. With FSDP each rank keeps its own optimizer
shard (`optimizer-rank{r}.pt`); otherwise rank 0 writes `optimizer.pt`. The folder must be on a file
system that every node sees.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gptoss_tune.train import dist

STATE_FILE = "trainer_state.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoints_dir(output: Path) -> Path:
    return output / "checkpoints"


def complete_checkpoints(output: Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint, oldest first (temporary folders are ignored)."""
    found = []
    root = checkpoints_dir(output)
    if root.is_dir():
        for path in root.iterdir():
            match = _STEP_DIR.match(path.name)
            if match and (path / STATE_FILE).is_file():
                found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(output: Path) -> Path | None:
    found = complete_checkpoints(output)
    return found[-1][1] if found else None


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _optimizer_file(rank: int, sharded: bool) -> str:
    return f"optimizer-rank{rank}.pt" if sharded else "optimizer.pt"


def save_training_checkpoint(
    output: Path,
    step: int,
    write_adapter: Callable[[Path], None],
    optimizer,
    scheduler,
    state: dict,
    keep_last: int,
    info: dist.DistInfo,
    sharded: bool,
) -> Path:
    """Every rank calls this. `write_adapter(dir)` runs on rank 0 (gather the weights before)."""
    target = checkpoints_dir(output) / f"step-{step}"
    tmp = target.with_name(f".{target.name}.tmp")
    if info.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        write_adapter(tmp / "adapter")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    dist.barrier(info)
    torch.save(rng_state(), tmp / f"rng-rank{info.rank}.pt")
    if sharded or info.is_main:
        torch.save(optimizer.state_dict(), tmp / _optimizer_file(info.rank, sharded))
    dist.barrier(info)
    if info.is_main:
        (tmp / STATE_FILE).write_text(
            json.dumps({**state, "step": step, "world_size": info.world_size}, indent=2)
        )
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
        for _, old in complete_checkpoints(output)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier(info)
    return target


def load_training_checkpoint(
    path: Path,
    load_adapter_from: Callable[[Path], None],
    optimizer,
    scheduler,
    info: dist.DistInfo,
    sharded: bool,
) -> dict:
    from gptoss_tune.errors import GptossTuneError

    state = json.loads((path / STATE_FILE).read_text())
    if state.get("world_size", 1) != info.world_size:
        raise GptossTuneError(
            f"{path} was written by {state.get('world_size', 1)} processes; resume with the same "
            f"number (now {info.world_size}) to continue exactly."
        )
    load_adapter_from(path / "adapter")
    optimizer.load_state_dict(torch.load(path / _optimizer_file(info.rank, sharded), weights_only=False))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
    restore_rng_state(torch.load(path / f"rng-rank{info.rank}.pt", weights_only=False))
    return state
