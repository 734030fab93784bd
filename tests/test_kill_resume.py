"""kill -9 at any moment, restart with --resume latest, and end exactly where an uninterrupted run ends.

A CPU training process (scripts/train.py, deterministic, a checkpoint every step) is SIGKILLed at seeded
random moments: while a checkpoint is being written (a `.tmp-checkpoint-*` folder exists; the
PROTODEPTH_TEST_SLOW_CHECKPOINT_S knob of protodepth/checkpoint.py holds that window open for a while) and
at random delays after a step's checkpoint appeared (which lands anywhere: in a forward/backward pass, in
save_state, in the rename). It is restarted with --resume latest until it finishes. Its final weights and
its logged losses must equal those of a run that was never interrupted; after every kill each committed
checkpoint must still verify (the rename is atomic), and every restart must remove the half-written folder.
"""
import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from protodepth import checkpoint as ckpt
from trainer_utils import REPO, LaneCall, background_job, override_args, python, tiny_overrides

pytestmark = pytest.mark.slow

MAX_STEPS = 5
# One setup that exercises every rule a resume must restore: warmup over steps 1-2 and cosine decay over 3-5
# (kills land in both phases; the schedule factor must not be applied twice), 2 micro-batches per optimizer step.
# A constant schedule with no accumulation is the easier case (tests/test_train.py resumes it in-process).
SETUPS = {
    "cosine_warmup_accum2": {"optim.schedule": "cosine", "optim.warmup_steps": 2, "train.grad_accum": 2},
}
SLOW_COMMIT_S = 0.5  # a commit sleeps this long with the files written and no manifest yet (polled every 10 ms)


def start(tmp_path: Path, name: str, resume: bool, setup: dict, slow: bool = True) -> tuple[subprocess.Popen, Path]:
    o = tiny_overrides(tmp_path, **{"train.max_steps": MAX_STEPS, "train.ckpt_every": 1,
                                    "train.deterministic": True, "train.output_dir": str(tmp_path / name)}, **setup)
    args = [python(), "scripts/train.py", *override_args(o)] + (["--resume", "latest"] if resume else [])
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", WANDB_SILENT="true")
    if slow:  # the sleep changes no result, only when a kill can land
        env[ckpt.SLOW_ENV] = str(SLOW_COMMIT_S)
    env[ckpt.FSYNC_ENV] = "0"  # a SIGKILL loses nothing that fsync would keep (the page cache survives it)
    log = tmp_path / f"{name}.log"
    with open(log, "a") as f:
        f.write(f"\n===== start (resume={resume})\n")
        f.flush()
        p = subprocess.Popen(args, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
    return p, log


def wait_for(p: subprocess.Popen, cond, timeout: float = 90.0) -> bool:
    """Poll `cond()` every 10 ms; True when it held while `p` still ran, False when `p` ended first."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return p.poll() is None
        if p.poll() is not None:
            return False
        time.sleep(0.01)
    p.kill()
    raise AssertionError("the training process made no progress within the timeout")


def fresh_dir(path: Path, since: float) -> bool:
    """`path` is a folder holding a file written at or after `since`: the new process is writing it. Not the
    folder's own mtime: a stale folder left by the previous kill gets a new mtime while the new process deletes
    its files at start-up."""
    try:
        return path.is_dir() and any(f.stat().st_mtime >= since for f in path.rglob("*") if f.is_file())
    except FileNotFoundError:  # deleted or renamed away while we looked
        return False


def committed(root: Path) -> list[int]:
    return [int(d.name.split("-")[1]) for d in ckpt.checkpoint_dirs(root)]


def params(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def _kill_and_resume(tmp_path: Path, setup: dict) -> dict:
    """One setup's scenario: the reference run beside a run killed at the plan's moments and resumed until done.
    Checks what must hold after each kill; returns what the test compares at the end."""
    rng = random.Random(20261124)
    # the reference: the same process, never interrupted (single-threaded, so it runs beside the others)
    ref_p, ref_log = start(tmp_path, "straight", False, setup, slow=False)

    run = tmp_path / "killed"
    root = run / "checkpoints"
    # each kill: (what to wait for, given the start time; extra random delay). The waits are on progress, not
    # wall time, so the kills land inside training whatever the machine's speed.
    plan = [
        ("during the write of step 2", lambda t0: fresh_dir(ckpt.temp_dir(root, 2), t0), 0.0),
        ("after the checkpoint of step 3, random delay", lambda t0: 3 in committed(root), rng.uniform(0.0, 0.8)),
        # (the kill before lands at most 0.8 s after checkpoint 3: too early for checkpoint 4 to be committed,
        # but perhaps inside its write: then the folder seen must be the new process's, not that stale one)
        ("during the write of step 4", lambda t0: fresh_dir(ckpt.temp_dir(root, 4), t0), rng.uniform(0.0, 0.3)),
    ]
    kills = []
    resume = False
    try:
        for what, cond, delay in plan:
            time.sleep(0.05)  # folders made from now on are newer than the killed process's
            t0 = time.time()
            p, log = start(tmp_path, "killed", resume, setup)
            reached = wait_for(p, lambda: cond(t0))
            assert reached, f"the process ended before the kill point '{what}':\n{log.read_text()[-3000:]}"
            time.sleep(delay)
            p.send_signal(signal.SIGKILL)
            assert p.wait(timeout=30) == -signal.SIGKILL
            kills.append((what, committed(root), sorted(x.name for x in root.glob(".tmp-*"))))
            # atomicity: whatever moment the kill hit, every committed checkpoint is complete
            for d in ckpt.checkpoint_dirs(root):
                assert ckpt.verify(d) is None, (what, d, ckpt.verify(d))
            resume = True
        # restart until done (one more start is enough; a loop guards against a slow machine)
        for _ in range(3):  # (no kill is aimed at these runs: their commits need no window held open)
            p, log = start(tmp_path, "killed", True, setup, slow=False)
            if p.wait(timeout=120) == 0:
                break
        else:
            raise AssertionError(log.read_text()[-3000:])
        assert ref_p.wait(timeout=120) == 0, ref_log.read_text()[-3000:]
    finally:  # a failed scenario leaves no process behind
        if ref_p.poll() is None:
            ref_p.kill()
            ref_p.wait()
    return dict(kills=kills, plan=len(plan), temp2=ckpt.temp_dir(root, 2).name, log=log.read_text(),
                leftover_temps=list(root.glob(".tmp-*")),
                reference=json.loads((tmp_path / "straight" / "summary.json").read_text()),
                resumed=json.loads((run / "summary.json").read_text()))


def _kill_resume_runs(folder: Path) -> dict:
    """Every setup's scenario, in the lane of background jobs (trainer_utils): its processes are single-threaded
    and spend much of their time in start-up, so they run beside the in-process tests."""
    out = {}
    for name, setup in SETUPS.items():
        (folder / name).mkdir()
        out[name] = _kill_and_resume(folder / name, setup)
    return out


# one core: after the reference run's few steps, one single-threaded process at a time
KILL_RESUME_RUNS = LaneCall(_kill_resume_runs, cores=1)
BACKGROUND_JOBS = {"kill_resume_runs": KILL_RESUME_RUNS}


@pytest.fixture(scope="module")
def kill_resume_runs():
    return background_job("kill_resume_runs", KILL_RESUME_RUNS).result(timeout=1800)


@pytest.mark.parametrize("setup", list(SETUPS))
def test_sigkill_at_random_moments_then_resume_equals_an_uninterrupted_run(kill_resume_runs, setup):
    r = kill_resume_runs[setup]
    kills = r["kills"]
    assert kills[0][2] == [r["temp2"]], kills  # killed with a half-written folder on disk
    assert 2 not in kills[0][1], kills  # ... which never became a checkpoint
    assert r["log"].count("resumed from") == r["plan"], r["log"][-3000:]
    assert not r["leftover_temps"]  # every restart cleans up after the kill before it

    reference, resumed = r["reference"], r["resumed"]
    assert resumed["steps"] == MAX_STEPS
    assert resumed["history"] == reference["history"], (resumed["history"], reference["history"], kills)
    a, b = params(Path(reference["checkpoint"])), params(Path(resumed["checkpoint"]))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), (k, kills)
