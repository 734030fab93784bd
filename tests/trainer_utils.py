"""Helpers shared by the trainer tests: a tiny config that trains in seconds on a CPU."""
from __future__ import annotations

import os
import queue
import shutil
import subprocess
import sys
import threading
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


def script_env(env_extra: dict | None = None) -> dict:
    """The environment run_script gives a command: this one, unbuffered, one thread, quiet W&B."""
    env = dict(os.environ)
    env.update({"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true"})
    env.pop("WANDB_MODE", None)
    env.update(env_extra or {})
    return env


def run_script(args: list[str], env_extra: dict | None = None, timeout: float = 300, cwd: Path | None = None):
    """Run a command with the repo's Python environment; returns CompletedProcess (text)."""
    return subprocess.run(args, cwd=cwd or REPO, env=script_env(env_extra), capture_output=True, text=True,
                          timeout=timeout)


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


def launch_job(config: str, overrides: dict, env: dict, nproc: int = 2, timeout: float = 400) -> dict:
    """`accelerate launch --config_file config` of scripts/train.py; asserts it succeeded; its summary.json."""
    import json

    cmd = [accelerate_bin(), "launch", "--config_file", config, "--num_processes", str(nproc),
           "--main_process_port", str(free_port()), "scripts/train.py", *override_args(overrides)]
    r = run_script(cmd, env_extra=env, timeout=timeout)
    assert r.returncode == 0, f"launch failed:\nSTDOUT\n{r.stdout[-3000:]}\nSTDERR\n{r.stderr[-6000:]}"
    return json.loads(Path(overrides["train.output_dir"], "summary.json").read_text())


def _ddp_runs(folder: Path):
    """The suite's 2-process DDP jobs over gloo, one after the other in the lane:
    - two_machines: launched as two one-process "machines" on localhost (what a multi-node job runs): 2 steps, a
      checkpoint at step 2, its end-of-run pictures; what tests/test_multinode.py reads is captured before the
      run is resumed: overrides (dict), results (two CompletedProcess, machine 0 first), summary (summary.json
      after step 2), machine1_files (names in machine 1's working folder), pictures (PNG names under viz/);
    - resumed: summary.json of that run resumed on both ranks (cpu_2proc.yaml) from step 2 to step 4;
    - flat: summary.json of the same 4 steps from scratch with train.data_parallel=flat (no checkpoint)."""
    import json
    from types import SimpleNamespace

    workdirs = [folder / f"machine{r}" for r in range(2)]
    for d in workdirs:
        d.mkdir()
    o = tiny_overrides(folder, **{"train.max_steps": 2, "train.ckpt_every": 2, **PICTURES})
    results = launch_machines(o, workdirs)
    for rank, r in enumerate(results):
        assert r.returncode == 0, (f"machine {rank} failed:\nSTDOUT\n{r.stdout[-3000:]}\n"
                                   f"STDERR\n{r.stderr[-6000:]}")
    run = Path(o["train.output_dir"])
    two = SimpleNamespace(overrides=o, results=results, summary=json.loads((run / "summary.json").read_text()),
                          machine1_files=sorted(p.name for p in workdirs[1].iterdir()),
                          pictures=sorted(p.name for p in (run / "viz").rglob("*.png")))
    o = {**o, "train.viz_images": 0, "train.max_steps": 4}
    resumed = launch_job("accelerate_configs/cpu_2proc.yaml", {**o, "train.resume": "latest"}, CPU_ENV)
    flat = launch_job("accelerate_configs/cpu_2proc.yaml", {**o, "train.ckpt_every": 0, "train.data_parallel": "flat",
                                                            "train.output_dir": str(folder / "flat")}, CPU_ENV)
    return SimpleNamespace(two_machines=two, resumed=resumed, flat=flat)


# ------------------------------------------------------------------------- background jobs (a second CPU lane)

# The suite runs one test at a time, and its in-process tests keep one core busy (conftest.py: one thread). A
# subprocess whose result a fixture only reads (the Triton-interpreter run of test_knn_triton.py, a command that
# must fail with one clear line) can run on the other core meanwhile: its module declares
# BACKGROUND_JOBS = {fixture name: spec}, spec(folder) -> (argv, env, extra Popen arguments), given an empty
# folder of its own; conftest.py queues the jobs of the fixtures the selected tests use, in the order of those
# tests, with the session's first test; one lane thread runs them one after the other; the fixture calls
# background_job(its name, spec).result(timeout) (which queues the job then, if the session did not). A spec may
# also be a LaneCall (a function run in the lane: the multi-process launches of test_distributed.py,
# test_multinode.py, test_deepspeed_precision.py and test_kill_resume.py). conftest.py runs the tests that read a
# job after all the others, so the lane works while the in-process tests run rather than when one waits for it.


class LaneCall:
    """A BACKGROUND_JOBS spec that is a function run in the lane thread, fn(folder) -> value: for jobs of several
    processes (a 2-process launch, a resume after it, kills at chosen moments) whose waiting and polling can
    happen beside the other tests. Its assertions fail in the lane and are raised again by result() in the test
    that reads it. Its processes must end by themselves (every launch has a timeout)."""

    def __init__(self, fn, cores: int = 2):
        # cores: how many processes it keeps busy at once (conftest.py queues the one-core jobs first)
        self.fn, self.__name__, self.cores = fn, fn.__name__, cores


class BackgroundJob:
    """One queued subprocess; stdout and stderr go to files (no pipe to fill up while nobody reads it). Or a
    LaneCall, whose value result() returns."""

    def __init__(self, spec):
        self.spec, self.proc, self.error = spec, None, None
        self.rc, self.out, self.err, self.folder = None, "", "", None
        self.value = None
        self.done = threading.Event()

    def run(self) -> None:
        """In the lane thread: set up, run to the end (at most 600 s), keep the outputs."""
        import tempfile

        try:
            self.folder = Path(tempfile.mkdtemp(prefix="protodepth-test-job-"))
            if isinstance(self.spec, LaneCall):
                self.value = self.spec.fn(self.folder)
                return
            args, env, extra = self.spec(self.folder)
            with open(self.folder / "stdout", "w") as out, open(self.folder / "stderr", "w") as err:
                self.proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=out, stderr=err, text=True, **extra)
                self.rc = self.proc.wait(timeout=600)
            self.out, self.err = (self.folder / "stdout").read_text(), (self.folder / "stderr").read_text()
        except BaseException as e:  # handed to the test by result()
            self.error = e
            self.stop()
        finally:
            self.done.set()

    def result(self, timeout: float):
        """Wait for the job (queued or running): (exit code, stdout, stderr), or a LaneCall's value."""
        if not self.done.wait(timeout):
            raise AssertionError(f"background job {self.spec.__name__} not done after {timeout:.0f} s")
        if self.error is not None:
            raise self.error
        if isinstance(self.spec, LaneCall):
            return self.value
        return self.rc, self.out, self.err

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class _Lane:
    def __init__(self):
        self.jobs: dict[str, BackgroundJob] = {}
        self.queue: queue.Queue = queue.Queue()
        self.thread: threading.Thread | None = None
        self.closing = False

    def submit(self, name: str, spec) -> BackgroundJob:
        if name not in self.jobs:
            self.jobs[name] = BackgroundJob(spec)
            self.queue.put(self.jobs[name])
            if self.thread is None:
                self.thread = threading.Thread(target=self._work, daemon=True)
                self.thread.start()
        return self.jobs[name]

    def _work(self) -> None:
        while (job := self.queue.get()) is not None:
            if self.closing:  # the session ended first (pytest -x, an interrupt): start nothing more
                job.error = AssertionError("the session ended before this background job started")
                job.done.set()
            else:
                job.run()

    def end(self) -> None:
        if self.thread is not None:
            self.closing = True
            self.queue.put(None)
            for job in self.jobs.values():
                job.stop()
            if any(isinstance(j.spec, LaneCall) and j.folder is not None and not j.done.is_set()
                   for j in self.jobs.values()):
                _kill_children()  # a LaneCall's launches, still running (the trainer's workers end with them)
            self.thread.join(timeout=30)
        for job in self.jobs.values():
            if job.folder is not None:
                shutil.rmtree(job.folder, ignore_errors=True)
        self.__init__()


def _kill_children() -> None:
    """SIGKILL the child processes of this process, found through /proc (Linux)."""
    import signal

    me = str(os.getpid())
    for d in Path("/proc").glob("[0-9]*"):
        try:
            ppid = (d / "stat").read_text().rsplit(")", 1)[1].split()[1]
            if ppid == me:
                os.kill(int(d.name), signal.SIGKILL)
        except (OSError, IndexError):  # gone meanwhile, or not readable
            continue


_LANE = _Lane()


def background_job(name: str, spec) -> BackgroundJob:
    return _LANE.submit(name, spec)


def background_json_report(name: str, spec, timeout: float = 900) -> dict:
    """Wait for background job `name` (a script that prints its results as a last line "JSON{...}") and return
    that dict; fail the caller with the job's output tails if it exited non-zero."""
    import json

    rc, out, err = background_job(name, spec).result(timeout=timeout)
    assert rc == 0, f"{name} failed:\n{out[-3000:]}\n{err[-6000:]}"
    return json.loads([ln for ln in out.splitlines() if ln.startswith("JSON")][-1][4:])


DDP_RUNS = LaneCall(_ddp_runs)  # BACKGROUND_JOBS["ddp_runs"] of test_multinode.py and test_distributed.py


def end_background_jobs() -> None:
    _LANE.end()
