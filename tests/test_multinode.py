"""Two one-process "machines" on localhost train together over gloo, launched the way a multi-node job is:
the same `accelerate launch` on every machine with --num_machines 2 and its own --machine_rank."""
import json
import math
import os
import socket
import subprocess
from pathlib import Path

import pytest

from trainer_utils import REPO, accelerate_bin, override_args, tiny_overrides

pytestmark = pytest.mark.slow

# CPU processes over gloo even on a GPU machine (see test_distributed.py)
CPU_ENV = {"ACCELERATE_USE_CPU": "1", "CUDA_VISIBLE_DEVICES": ""}
TIMEOUT_S = 240


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def machine_cmd(machine_rank: int, port: int, overrides: dict) -> list[str]:
    """The command a user runs on machine `machine_rank` of 2, one process each (2 processes in total)."""
    return [accelerate_bin(), "launch", "--multi_gpu", "--num_machines", "2", "--machine_rank", str(machine_rank),
            "--num_processes", "2", "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
            "--mixed_precision", "no", "--dynamo_backend", "no",
            "scripts/train.py", *override_args(overrides)]


def launch_machines(overrides: dict, workdirs: list[Path]) -> list[subprocess.CompletedProcess]:
    """Start both machines at once (each blocks until the other joins), each in its own working folder;
    return both finished processes."""
    env = dict(os.environ)
    env.update({"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true", **CPU_ENV})
    env.pop("WANDB_MODE", None)
    port = free_port()
    procs = []
    for rank, cwd in enumerate(workdirs):
        cmd = machine_cmd(rank, port, overrides)
        cmd[cmd.index("scripts/train.py")] = str(REPO / "scripts" / "train.py")
        procs.append(subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    done = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=TIMEOUT_S)
            done.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    finally:
        for p in procs:  # a machine left waiting for a dead peer must not outlive the test
            if p.poll() is None:
                p.kill()
                p.communicate()
    return done


def test_two_single_process_machines_train_together_over_gloo(tmp_path):
    workdirs = [tmp_path / f"machine{r}" for r in range(2)]
    for d in workdirs:
        d.mkdir()
    o = tiny_overrides(tmp_path, **{"train.max_steps": 2})
    results = launch_machines(o, workdirs)
    for rank, r in enumerate(results):
        assert r.returncode == 0, (f"machine {rank} failed:\nSTDOUT\n{r.stdout[-3000:]}\n"
                                   f"STDERR\n{r.stderr[-6000:]}")
    s = json.loads(Path(o["train.output_dir"], "summary.json").read_text())
    assert s["processes"] == 2 and "MULTI_CPU" in s["distributed_type"]
    # the two machines stayed in step: their parameter checksums are equal
    assert len(s["rank_checksums"]) == 2 and s["rank_checksums"][0] == s["rank_checksums"][1]
    assert s["steps"] == 2 and [h[0] for h in s["history"]] == [1, 2]
    assert all(math.isfinite(h[1]) for h in s["history"])
    # only machine rank 0 (global rank 0) prints the run summary; machine 1 leaves its working folder empty
    assert "done: 2 steps" in results[0].stdout and "done: 2 steps" not in results[1].stdout
    assert not list(workdirs[1].iterdir()), sorted(p.name for p in workdirs[1].iterdir())
