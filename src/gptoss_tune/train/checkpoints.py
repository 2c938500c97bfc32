"""Training checkpoints: OUT/checkpoints/step-N/ with the adapter (PEFT format), optimizer, scheduler,
RNG states and the step, written atomically so a killed run never leaves a half checkpoint."""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gptoss_tune.model.checkpoint import atomic_directory

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


def save_training_checkpoint(
    output: Path, step: int, save_adapter_to, optimizer, scheduler, state: dict, keep_last: int
) -> Path:
    """Write step-N (adapter via `save_adapter_to(dir)`), then delete all but the newest `keep_last`."""
    target = checkpoints_dir(output) / f"step-{step}"
    with atomic_directory(target, overwrite=True) as tmp:
        save_adapter_to(tmp / "adapter")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(rng_state(), tmp / "rng.pt")
        (tmp / STATE_FILE).write_text(json.dumps({**state, "step": step}, indent=2) + "\n")
    for _, old in complete_checkpoints(output)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def load_training_checkpoint(path: Path, load_adapter_from, optimizer, scheduler) -> dict:
    load_adapter_from(path / "adapter")
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=False))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
    restore_rng_state(torch.load(path / "rng.pt", weights_only=False))
    return json.loads((path / STATE_FILE).read_text())
