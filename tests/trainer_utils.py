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
        # Eager steps, so tests that patch the loss per call mean the same thing on a GPU machine; the
        # CUDA-graph path has its own tests (test_cuda_graphs.py) that turn it on.
        "train.cuda_graphs": False,
    }
    o.update(extra)
    return o


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
