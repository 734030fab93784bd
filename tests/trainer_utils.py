"""Helpers shared by the trainer tests: a tiny config that trains in seconds on a CPU."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from protodepth.config import Config, load_config

REPO = Path(__file__).resolve().parent.parent


def tiny_overrides(tmp_path: Path, **extra) -> dict:
    """Overrides giving a model and data small enough for a few CPU steps per second."""
    o = {
        "model.num_slots": 2,
        "model.num_prototypes": 2,
        "model.ico_level": 1,
        "model.channels_last": False,
        "loss.samples_per_slot": 16,
        "optim.lr": 1e-4,
        "model.trans_max": 100.0,
        "model.head_input_scale": 0.022,
        "data.root": str(tmp_path / "synthetic"),
        "data.height": 32,
        "data.width": 32,
        "data.num_bins": 2,
        "data.points_per_bin": 64,
        "data.synthetic_num_scenes": 12,
        "data.synthetic_sequences": 2,
        "data.synthetic_height": 48,
        "data.synthetic_width": 64,
        "data.val_fraction": 0.2,
        "data.num_workers": 0,
        "train.output_dir": str(tmp_path / "run"),
        "train.batch_size": 2,
        "train.max_steps": 4,
        "train.log_every": 1,
        "train.val_every": 0,
        "train.ckpt_every": 0,
        "train.wandb": "disabled",
        # No end-of-run pictures: drawing them costs about 4 s of CPU in a fresh process (matplotlib and trimesh
        # imports, rendering). Tests of the pictures, and one run per distributed mode, turn them on (PICTURES).
        "train.viz_images": 0,
        # Eager steps, so tests that patch the loss per call mean the same thing on a GPU machine; the
        # CUDA-graph path has its own tests (test_cuda_graphs.py) that turn it on.
        "train.cuda_graphs": False,
    }
    o.update(extra)
    return o


PICTURES = {"train.viz_images": 4}  # extra overrides for a tiny run that draws its end-of-run pictures


def tiny_config(tmp_path: Path, **extra) -> Config:
    return load_config(None, tiny_overrides(tmp_path, **extra))


def override_args(overrides: dict) -> list[str]:
    return [f"{k}={v}" for k, v in overrides.items()]


def run_script(args: list[str], env_extra: dict | None = None, timeout: float = 300, cwd: Path | None = None):
    """Run a command with the repo's Python environment; returns CompletedProcess (text)."""
    env = dict(os.environ)
    env.update({"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true"})
    env.pop("WANDB_MODE", None)
    env.update(env_extra or {})
    return subprocess.run(args, cwd=cwd or REPO, env=env, capture_output=True, text=True, timeout=timeout)


def python() -> str:
    return sys.executable


def accelerate_bin() -> str:
    return str(Path(sys.executable).parent / "accelerate")


def load_script(name: str):
    """scripts/<name>.py as a module (the scripts are not a package), e.g. load_script("infer").main(argv)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"protodepth_script_{name}", REPO / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ------------------------------------------------------------------------------ multi-process launches on the CPU

# CPU processes over gloo even on a GPU machine: with CUDA visible, Accelerate's barrier asks for one GPU per rank
# ("invalid device ordinal" on a 1-GPU host). Checkpoints skip fsync (0.7 s each; no test here needs durability
# against a power loss).
CPU_ENV = {"ACCELERATE_USE_CPU": "1", "CUDA_VISIBLE_DEVICES": "", "PROTODEPTH_CHECKPOINT_FSYNC": "0"}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def machine_cmd(machine_rank: int, port: int, overrides: dict) -> list[str]:
    """The command a user runs on machine `machine_rank` of 2, one process each (2 processes in total)."""
    return [accelerate_bin(), "launch", "--multi_gpu", "--num_machines", "2", "--machine_rank", str(machine_rank),
            "--num_processes", "2", "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
            "--mixed_precision", "no", "--dynamo_backend", "no",
            str(REPO / "scripts" / "train.py"), *override_args(overrides)]


def launch_machines(overrides: dict, workdirs: list[Path], timeout: float = 240) -> list[subprocess.CompletedProcess]:
    """Start two one-process "machines" on localhost at once (each blocks until the other joins), each in its own
    working folder; return both finished processes."""
    env = dict(os.environ)
    env.update({"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true", **CPU_ENV})
    env.pop("WANDB_MODE", None)
    port = free_port()
    procs = [subprocess.Popen(machine_cmd(rank, port, overrides), cwd=cwd, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for rank, cwd in enumerate(workdirs)]
    done = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=timeout)
            done.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    finally:
        for p in procs:  # a machine left waiting for a dead peer must not outlive the test
            if p.poll() is None:
                p.kill()
                p.communicate()
    return done


# ------------------------------------------------------------------------- background jobs (a second CPU lane)

# The suite runs one test at a time, and most of its in-process tests keep only about one of the two cores busy.
# A long subprocess whose result a fixture reads (e.g. the Triton-interpreter run of test_knn_triton.py) can run
# beside them: its module declares BACKGROUND_JOBS = {fixture name: start}, start() returning a started
# BackgroundJob; conftest.py starts the job with the session's first test when a selected test uses that
# fixture, and the fixture calls background_job(its name, start) to get it (started then, if not yet).
_BACKGROUND: dict = {}


class BackgroundJob:
    """A subprocess writing its stdout and stderr to files (no pipe to fill up while nobody reads it)."""

    def __init__(self, args: list[str], env: dict):
        import tempfile

        self.folder = Path(tempfile.mkdtemp(prefix="protodepth-test-job-"))
        self.out_path, self.err_path = self.folder / "stdout", self.folder / "stderr"
        with open(self.out_path, "w") as out, open(self.err_path, "w") as err:
            self.proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=out, stderr=err, text=True)

    def result(self, timeout: float) -> tuple[int, str, str]:
        """Wait for the job: (exit code, stdout, stderr); killed and an AssertionError after `timeout` s."""
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.end()
            raise AssertionError(f"background job {self.proc.args[:3]} ran past {timeout:.0f} s")
        return rc, self.out_path.read_text(), self.err_path.read_text()

    def end(self) -> None:
        import shutil

        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        shutil.rmtree(self.folder, ignore_errors=True)


def background_job(name: str, start) -> BackgroundJob:
    if name not in _BACKGROUND:
        _BACKGROUND[name] = start()
    return _BACKGROUND[name]


def end_background_jobs() -> None:
    for job in _BACKGROUND.values():
        job.end()
    _BACKGROUND.clear()
