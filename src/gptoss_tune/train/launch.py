"""Launch data-parallel training with torchrun: `gptoss-tune train --gpus N ...` re-runs the same
command line under `torchrun --nproc-per-node N -m gptoss_tune`, one process per GPU.

Several nodes: run the same command on every node with NNODES, NODE_RANK, MASTER_ADDR and
MASTER_PORT set (recipes/slurm/ does this for Slurm); torchrun's rendezvous joins them.
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import NoReturn

DEFAULT_PORT = "29500"


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def needs_torchrun(gpus: int) -> bool:
    """Several GPUs here, or several nodes (NNODES > 1, even with one GPU each)."""
    return (gpus > 1 or int(os.environ.get("NNODES", "1")) > 1) and not launched_by_torchrun()


def torchrun_command(nproc_per_node: int, args: list[str], env: dict[str, str] | None = None) -> list[str]:
    env = dict(os.environ if env is None else env)
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc_per_node}"]
    nnodes = int(env.get("NNODES", "1"))
    if nnodes > 1:
        if "MASTER_ADDR" not in env or "NODE_RANK" not in env:
            from gptoss_tune.errors import GptossTuneError

            raise GptossTuneError(
                "NNODES > 1 needs MASTER_ADDR (the first node's address) and NODE_RANK on every node."
            )
        command += [
            f"--nnodes={nnodes}",
            f"--node-rank={env['NODE_RANK']}",
            f"--master-addr={env['MASTER_ADDR']}",
            f"--master-port={env.get('MASTER_PORT', DEFAULT_PORT)}",
        ]
    else:
        command += ["--standalone"]
    return command + ["-m", "gptoss_tune", *args]


def launch_torchrun(nproc_per_node: int, args: list[str] | None = None) -> int:
    """Run this command line under torchrun; returns its exit code."""
    command = torchrun_command(nproc_per_node, sys.argv[1:] if args is None else args)
    print("launching:", " ".join(command), flush=True)
    return subprocess.call(command)


def end_worker_process(code: int) -> NoReturn:
    """End a torchrun worker without Python's interpreter finalization.

    A gloo worker thread drops its reference to a finished collective (and the collective's tensors) only
    after the waiting thread has woken up. If that happens while Python finalizes, freeing a tensor needs the
    GIL, the thread is ended inside a destructor and the C++ runtime aborts the process ("terminate called
    without an active exception", see pytorch/pytorch#179291). destroy_process_group does not join those
    threads while DTensor's caches keep FSDP's device mesh, and with it the process group, alive. Every output
    is written and closed by now, so the worker flushes its streams and leaves.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
