"""Distributed faults: one of two CPU ranks dies (SIGKILL), raises (a corrupt PNG that only it reads) or hangs
(SIGSTOP); the whole job must exit non-zero within a bounded time and show the failing rank's error. And the
launcher itself killed: its workers must not train on."""
import os
import re
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from protodepth import checkpoint as ckpt
from trainer_utils import REPO, accelerate_bin, override_args, tiny_config, tiny_overrides

pytestmark = pytest.mark.slow

DIST_TIMEOUT_S = 30
# a dead or failing rank must end the job within the process-group timeout (measured: 1-3 s, the launcher
# notices the exit at once); a hanging one is the separate case: that timeout plus the launcher's grace
BOUND_S = DIST_TIMEOUT_S
ORPHAN_BOUND_S = 5  # workers of a killed launcher get SIGTERM at once (measured: 0.3 s until they are gone)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(overrides: dict, tag: str, log: Path) -> subprocess.Popen:
    cmd = [accelerate_bin(), "launch", "--config_file", "accelerate_configs/cpu_2proc.yaml", "--num_processes", "2",
           "--main_process_port", str(free_port()), "scripts/train.py", *override_args(overrides)]
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", WANDB_SILENT="true", ACCELERATE_USE_CPU="1",
               CUDA_VISIBLE_DEVICES="", PROTODEPTH_TEST_TAG=tag)  # CPU ranks, even on a GPU machine
    with open(log, "w") as f:
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)


def pid_of_rank(tag: str, rank: int) -> int | None:
    """The worker process launched by this test (its environment holds `tag`) with RANK=`rank`, via /proc."""
    want = {f"PROTODEPTH_TEST_TAG={tag}".encode(), f"RANK={rank}".encode()}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            env = set((d / "environ").read_bytes().split(b"\0"))
        except OSError:  # gone, or not ours
            continue
        if want <= env:
            return int(d.name)
    return None


def wait(p: subprocess.Popen, timeout: float, log: Path) -> int:
    try:
        return p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
        raise AssertionError(f"the job did not end within {timeout:.0f} s:\n{log.read_text()[-4000:]}")


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the rank's pid through /proc")
def test_one_rank_killed_ends_the_job_within_the_bound(tmp_path):
    tag = uuid.uuid4().hex
    o = tiny_overrides(tmp_path, **{"train.max_steps": 200, "train.ckpt_every": 1,
                                    "train.dist_timeout_s": DIST_TIMEOUT_S})
    log = tmp_path / "job.log"
    p = launch(o, tag, log)
    root = Path(o["train.output_dir"]) / "checkpoints"
    end = time.monotonic() + 180
    while not ckpt.checkpoint_dirs(root):  # training is under way on both ranks
        assert p.poll() is None, log.read_text()[-4000:]
        assert time.monotonic() < end, log.read_text()[-4000:]
        time.sleep(0.05)
    victim = pid_of_rank(tag, 1)
    assert victim is not None
    os.kill(victim, signal.SIGKILL)
    t0 = time.monotonic()
    rc = wait(p, BOUND_S, log)
    elapsed = time.monotonic() - t0
    out = log.read_text()
    assert rc != 0, out[-4000:]
    assert elapsed < BOUND_S, elapsed
    print(f"job ended {elapsed:.1f} s after the kill")
    # the launcher names the dead rank and the signal
    assert "rank      : 1" in out and "Signal 9 (SIGKILL)" in out, out[-4000:]
    assert pid_of_rank(tag, 0) is None  # no orphan left running


def ended(pid: int) -> bool:
    """The process is gone, or a zombie waiting to be reaped (it runs no more)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the workers' pids through /proc")
def test_killing_the_launcher_ends_its_workers(tmp_path):
    """kill -9 of `accelerate launch` gives its workers no chance to be told; they must not train on as orphans
    (holding GPUs, writing into the run folder). protodepth/training/accel.py asks Linux to end them."""
    tag = uuid.uuid4().hex
    o = tiny_overrides(tmp_path, **{"train.max_steps": 200, "train.ckpt_every": 1})
    log = tmp_path / "job.log"
    p = launch(o, tag, log)
    root = Path(o["train.output_dir"]) / "checkpoints"
    end = time.monotonic() + 180
    while not ckpt.checkpoint_dirs(root):  # both workers are training
        assert p.poll() is None, log.read_text()[-4000:]
        assert time.monotonic() < end, log.read_text()[-4000:]
        time.sleep(0.05)
    workers = [pid_of_rank(tag, r) for r in (0, 1)]
    assert None not in workers, workers
    try:
        p.send_signal(signal.SIGKILL)
        assert p.wait(timeout=10) == -signal.SIGKILL
        t0 = time.monotonic()
        while not all(ended(w) for w in workers) and time.monotonic() - t0 < ORPHAN_BOUND_S:
            time.sleep(0.05)
        assert all(ended(w) for w in workers), (workers, log.read_text()[-4000:])
        print(f"workers ended {time.monotonic() - t0:.1f} s after the launcher was killed")
    finally:
        for w in workers:  # never leave an orphan behind, even when the test fails
            try:
                os.kill(w, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_one_rank_raising_ends_the_job_and_shows_its_error(tmp_path):
    o = tiny_overrides(tmp_path, **{"train.max_steps": 20, "train.dist_timeout_s": DIST_TIMEOUT_S})
    # Generate the scenes here, then truncate a PNG that only rank 1 reads in its first batch: Accelerate gives
    # rank r the batches r, r + 2, ... of the sampler's order, so rank 1's first batch is order[2:4].
    from protodepth.data import build_datasets
    from protodepth.data.loaders import EpochShuffleSampler

    cfg = tiny_config(tmp_path, **{"train.max_steps": 20})
    train_ds, _ = build_datasets(cfg.data, seed=cfg.train.seed, progress=False)
    order = list(EpochShuffleSampler(len(train_ds), cfg.train.seed))
    bad = Path(train_ds[order[2]]["path"])
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])  # header intact (the startup scan passes), pixel data cut
    log = tmp_path / "job.log"
    p = launch(o, uuid.uuid4().hex, log)
    end = time.monotonic() + 180
    while "[rank 1] error:" not in log.read_text():
        assert p.poll() is None, log.read_text()[-4000:]
        assert time.monotonic() < end, log.read_text()[-4000:]
        time.sleep(0.05)
    t0 = time.monotonic()
    rc = wait(p, BOUND_S, log)
    elapsed = time.monotonic() - t0
    out = log.read_text()
    assert rc != 0 and elapsed < BOUND_S, (rc, elapsed, out[-4000:])
    print(f"job ended {elapsed:.1f} s after rank 1's error")
    # both ranks write into one stream: rank 0's progress bar (ended by \r, not \n) may precede the line
    err = re.findall(r"\[rank 1\] error: [^\r\n]*", out)
    assert len(err) == 1 and bad.name in err[0] and "truncated or corrupt" in err[0], out[-4000:]
    assert "rank      : 1" in out and "exitcode  : 2" in out  # the launcher names the failing rank too
    assert not ckpt.checkpoint_dirs(Path(o["train.output_dir"]) / "checkpoints")


LAUNCHER_GRACE_S = 30  # torch elastic's shutdown_timeout: SIGTERM to the workers, SIGKILL this much later


def test_one_rank_hanging_ends_the_job_after_dist_timeout_s_plus_the_launchers_grace(tmp_path):
    """A rank that stops answering (SIGSTOP: stuck on I/O, a deadlock) is not seen by the launcher; the others
    wait in a collective until train.dist_timeout_s and then fail. The launcher then sends SIGTERM to every
    worker, which the stopped one cannot act on, and SIGKILL LAUNCHER_GRACE_S later: that is when the job
    ends. The true bound, which README states: dist_timeout_s + up to one step + LAUNCHER_GRACE_S + teardown."""
    timeout_s = 20  # above the skew between ranks at startup on a loaded 2-core machine
    slack_s = 15  # a step (rank 0 may enter its next collective up to one step after the stop) and teardown
    tag = uuid.uuid4().hex
    o = tiny_overrides(tmp_path, **{"train.max_steps": 200, "train.ckpt_every": 1, "train.dist_timeout_s": timeout_s})
    log = tmp_path / "job.log"
    p = launch(o, tag, log)
    root = Path(o["train.output_dir"]) / "checkpoints"
    end = time.monotonic() + 180
    while not ckpt.checkpoint_dirs(root):
        assert p.poll() is None, log.read_text()[-4000:]
        assert time.monotonic() < end, log.read_text()[-4000:]
        time.sleep(0.05)
    victim = pid_of_rank(tag, 1)
    assert victim is not None
    os.kill(victim, signal.SIGSTOP)
    t0 = time.monotonic()
    timed_out_after = None
    try:
        while p.poll() is None:
            if timed_out_after is None and "Timed out" in log.read_text():
                timed_out_after = time.monotonic() - t0
            assert time.monotonic() - t0 < timeout_s + LAUNCHER_GRACE_S + 2 * slack_s, log.read_text()[-4000:]
            time.sleep(0.05)
        ended_after = time.monotonic() - t0
    finally:
        try:
            os.kill(victim, signal.SIGKILL)
        except ProcessLookupError:
            pass
    out = log.read_text()
    print(f"rank 0 timed out {timed_out_after:.1f} s after the stop, the job ended after {ended_after:.1f} s")
    assert p.returncode != 0, out[-4000:]
    assert f"Timed out waiting {timeout_s * 1000}ms" in out and "rank      : 0" in out, out[-4000:]
    assert timeout_s - 2 < timed_out_after < timeout_s + slack_s, (timed_out_after, out[-4000:])
    # the launcher's grace is the rest: the stopped rank is only ended by its SIGKILL
    assert timeout_s + LAUNCHER_GRACE_S - 2 < ended_after < timeout_s + LAUNCHER_GRACE_S + slack_s, ended_after
