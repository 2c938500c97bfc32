"""Launch data-parallel training with torchrun: `gptoss-tune train --gpus N ...` re-runs the same
command line under `torchrun --nproc-per-node N -m gptoss_tune`, one process per GPU.

Several nodes: run the same command on every node with NNODES, NODE_RANK, MASTER_ADDR and
MASTER_PORT set (recipes/slurm/ does this for Slurm); torchrun's rendezvous joins them.
"""

from __future__ import annotations

import os
import subprocess
import sys

DEFAULT_PORT = "29500"


def torchrun_command(nproc_per_node: int, args: list[str], env: dict[str, str] | None = None) -> list[str]:
    env = dict(os.environ if env is None else env)
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc_per_node}"]
    nnodes = int(env.get("NNODES", "1"))
    if nnodes > 1:
        if "MASTER_ADDR" not in env:
            from gptoss_tune.errors import GptossTuneError

            raise GptossTuneError(
                "NNODES > 1 needs MASTER_ADDR (the first node's address) and NODE_RANK on every node."
            )
        command += [
            f"--nnodes={nnodes}",
            f"--node-rank={env.get('NODE_RANK', '0')}",
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
