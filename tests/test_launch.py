"""Launch command lines: torchrun for one and several nodes, and the Slurm templates (run with stub
srun / scontrol / gptoss-tune on the PATH, so the exact commands each node would run are checked)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from gptoss_tune.errors import GptossTuneError
from gptoss_tune.train.launch import needs_torchrun, torchrun_command

ROOT = Path(__file__).resolve().parents[1]


def test_single_node_uses_a_standalone_rendezvous():
    command = torchrun_command(4, ["train", "--config", "r.yaml", "--gpus", "4"], env={})
    assert command[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert "--nproc-per-node=4" in command and "--standalone" in command
    assert command[-6:] == ["-m", "gptoss_tune", "train", "--config", "r.yaml", "--gpus", "4"][-6:]


def test_several_nodes_pass_rank_address_and_port():
    env = {"NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "node-a", "MASTER_PORT": "1234"}
    command = torchrun_command(8, ["train"], env=env)
    assert {
        "--nnodes=2",
        "--node-rank=1",
        "--master-addr=node-a",
        "--master-port=1234",
        "--nproc-per-node=8",
    } <= set(command)
    assert "--standalone" not in command
    with pytest.raises(GptossTuneError, match="MASTER_ADDR"):
        torchrun_command(8, ["train"], env={"NNODES": "2"})
    with pytest.raises(GptossTuneError, match="NODE_RANK"):
        torchrun_command(8, ["train"], env={"NNODES": "2", "MASTER_ADDR": "node-a"})


def test_several_nodes_with_one_gpu_each_still_start_torchrun(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("NNODES", raising=False)
    assert not needs_torchrun(1) and needs_torchrun(2)
    monkeypatch.setenv("NNODES", "4")
    assert needs_torchrun(1)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert not needs_torchrun(1)  # already a torchrun worker


def stub(directory: Path, name: str, body: str) -> None:
    path = directory / name
    path.write_text("#!/bin/bash\n" + body + "\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


@pytest.fixture
def fake_cluster(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.log"
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "activate").write_text(f"export PATH={bin_dir}:$PATH\n")
    stub(
        bin_dir,
        "gptoss-tune",
        f'echo "node=$NODE_RANK nnodes=$NNODES master=$MASTER_ADDR:$MASTER_PORT args=$*" >> {log}',
    )
    stub(bin_dir, "scontrol", 'printf "gpu-001\\ngpu-002\\ngpu-003\\ngpu-004\\n"')
    # srun: run the task once per node, as Slurm would, with SLURM_NODEID set
    stub(bin_dir, "srun", 'for i in $(seq 0 $((SLURM_NNODES - 1))); do SLURM_NODEID=$i "${@:2}"; done')
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "VENV": str(venv),
        "SLURM_JOB_NAME": "job",
        "SLURM_JOB_ID": "42",
        "SLURM_JOB_NODELIST": "gpu-[001-004]",
    }
    return env, log


@pytest.mark.parametrize("gpus", ["4", "8"])
def test_one_node_template(fake_cluster, gpus):
    env, log = fake_cluster
    env.update(SLURM_NNODES="1", SLURM_GPUS_PER_NODE=f"h200:{gpus}")
    subprocess.run(["bash", str(ROOT / "recipes/slurm/train-1node.sbatch")], env=env, check=True, cwd=ROOT)
    lines = log.read_text().splitlines()
    assert len(lines) == 1
    assert lines[0].endswith(
        f"args=train --config recipes/gpt-oss-20b-multilingual-thinking.yaml --output runs/job --gpus {gpus}"
    )


@pytest.mark.parametrize(("nodes", "gpus"), [(2, "8"), (4, "4")])
def test_multi_node_template(fake_cluster, nodes, gpus):
    env, log = fake_cluster
    env.update(SLURM_NNODES=str(nodes), SLURM_GPUS_PER_NODE=gpus, RESUME="1")
    subprocess.run(
        ["bash", str(ROOT / "recipes/slurm/train-multinode.sbatch")], env=env, check=True, cwd=ROOT
    )
    lines = log.read_text().splitlines()
    assert [line.split()[0] for line in lines] == [f"node={i}" for i in range(nodes)]
    for line in lines:
        assert f"nnodes={nodes} master=gpu-001:29500" in line
        assert line.endswith(f"--output runs/job --gpus {gpus} --resume")


def test_recipes_resolve(tmp_path):
    from gptoss_tune.config import resolve_config

    for recipe in (ROOT / "recipes").glob("*.yaml"):
        resolved = resolve_config(recipe, {"output": str(tmp_path / "o")})
        assert resolved.model and resolved.data


@pytest.mark.parametrize("under_torchrun", [False, True])
def test_worker_exit_keeps_output_and_exit_code(short_chats, tmp_path, under_torchrun):
    """A torchrun worker leaves through os._exit (see end_worker_process): what it printed to a pipe is
    flushed first, and the command's exit code (0, usage error, GptossTuneError) is the process's."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    if under_torchrun:
        env |= {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}
    cli = [sys.executable, "-m", "gptoss_tune"]
    cases = {
        0: ["inspect", str(short_chats), "--index", "3", "--plain"],
        2: ["train", "--model", "m", "--data", str(tmp_path / "absent"), "--output", str(tmp_path / "o")],
    }
    for code, args in cases.items():
        done = subprocess.run([*cli, *args], env=env, capture_output=True, text=True)
        assert done.returncode == code, done.stderr
        if code == 0:
            assert "Number 3?" in done.stdout and "Say 3." in done.stdout
        else:
            assert "error:" in done.stderr and "absent: no such file" in done.stderr
    usage = subprocess.run([*cli, "train", "--no-such-option"], env=env, capture_output=True, text=True)
    assert usage.returncode == 2 and "No such option" in usage.stderr
