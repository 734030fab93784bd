"""The Accelerator of a run: DDP / DeepSpeed / precision / W&B wiring, and the launcher watchdog.

Model and loss know nothing of Accelerate; everything distributed or precision-related is decided here and in
`step.py`, so the same code runs on a CPU, one GPU, DDP, several machines and DeepSpeed.
"""
from __future__ import annotations

import ctypes
import datetime
import os
import signal
from pathlib import Path

import torch

from protodepth.config import Config


def uses_deepspeed() -> bool:
    """`accelerate launch --use_deepspeed` / a DeepSpeed config file sets this before the process starts."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def deepspeed_plugin(cfg: Config):
    """DeepSpeed's clipping, accumulation and precision come from the protodepth config, so `optim.grad_clip`
    and `train.grad_accum` are never silently overridden by a value in an Accelerate config file.

    Precision: the engine autocasts inside its forward (`torch_autocast`) and keeps fp32 parameters, as the DDP
    path does under Accelerate's autocast. DeepSpeed's own bf16 mode casts the parameters but neither the
    inputs nor batch norm's running statistics, and fails at the first convolution or batch norm."""
    from accelerate.utils import DeepSpeedPlugin

    plugin = DeepSpeedPlugin(gradient_accumulation_steps=cfg.train.grad_accum)
    # explicit: the plugin drops a falsy 0.0 (DeepSpeed then clips at 1.0), and a value in a DeepSpeed config
    # file would otherwise win over ours with only a log line
    plugin.deepspeed_config["gradient_clipping"] = float(cfg.optim.grad_clip)
    plugin.deepspeed_config["gradient_accumulation_steps"] = cfg.train.grad_accum
    precision = {"bf16": "bfloat16", "fp16": "float16"}.get(cfg.train.mixed_precision)
    if precision:
        plugin.deepspeed_config["torch_autocast"] = {"enabled": True, "dtype": precision}
    return plugin


def build_accelerator(cfg: Config, wandb_mode: str):
    from accelerate import Accelerator, DistributedDataParallelKwargs, InitProcessGroupKwargs
    from accelerate.utils import DataLoaderConfiguration, GradientAccumulationPlugin, ProjectConfiguration

    t = cfg.train
    timeout = datetime.timedelta(seconds=t.dist_timeout_s)
    # DeepSpeed on a CPU machine only works over gloo
    backend = "gloo" if (not torch.cuda.is_available() and uses_deepspeed()) else None
    kwargs = [
        InitProcessGroupKwargs(backend=backend, timeout=timeout) if backend else InitProcessGroupKwargs(timeout=timeout),
        # every parameter gets a gradient every step: no unused-parameter search, fixed bucket order
        DistributedDataParallelKwargs(find_unused_parameters=False, static_graph=True),
    ]
    deepspeed = uses_deepspeed()
    return Accelerator(
        mixed_precision="no" if deepspeed else t.mixed_precision,  # DeepSpeed autocasts itself (above)
        # Windows of exactly grad_accum micro-batches, also across an epoch's end: Accelerate would otherwise close
        # a short window at the end of a DataLoader's epoch (not on the on-device path, whose batches are no
        # DataLoader), so the two paths, and a resumed run, would step at different micro-batches.
        gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=t.grad_accum, sync_with_dataloader=False),
        deepspeed_plugin=deepspeed_plugin(cfg) if deepspeed else None,
        log_with=None if wandb_mode == "disabled" else "wandb",
        project_config=ProjectConfiguration(project_dir=t.output_dir, automatic_checkpoint_naming=False),
        kwargs_handlers=kwargs,
        step_scheduler_with_optimizer=False,
        # batches come from pinned memory: an asynchronous copy lets the host queue the next step while the GPU
        # still runs this one (a blocking copy waits for the GPU to go idle first)
        dataloader_config=DataLoaderConfiguration(non_blocking=torch.cuda.is_available()),
    )


def _launched_by() -> str:
    """The command line of the parent process ('' when unknown)."""
    try:
        return Path(f"/proc/{os.getppid()}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def end_with_launcher() -> None:
    """Ask Linux to end this worker when the launcher that started it dies.

    `accelerate launch` runs its workers as children; a kill -9 of the launcher would otherwise leave them
    training on as orphans, holding GPUs and writing into the run folder. PR_SET_PDEATHSIG sends SIGTERM
    instead. Only for workers whose parent is `accelerate launch` / torchrun, on Linux; a no-op otherwise
    (a plain `python scripts/train.py` keeps running when its shell goes away, as any program)."""
    parent = os.getppid()
    if not any(name in _launched_by() for name in ("accelerate", "torchrun", "torch.distributed.run")):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return
    PR_SET_PDEATHSIG = 1
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        return
    if os.getppid() != parent:  # the launcher died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)
