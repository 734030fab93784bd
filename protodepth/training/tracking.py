"""Weights & Biases through Accelerate's tracker: the mode, and one W&B run per training (resumes continue it)."""
from __future__ import annotations

import netrc
import os
import uuid
from pathlib import Path


def wandb_key_configured() -> bool:
    """An API key in the environment or in ~/.netrc (where `wandb login` writes it)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    path = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        hosts = netrc.netrc(str(path)).hosts
    except (OSError, netrc.NetrcParseError):
        return False
    return any(h == "api.wandb.ai" or h.endswith(".wandb.ai") for h in hosts)


def resolve_wandb_mode(mode: str) -> str:
    """'auto' -> WANDB_MODE if set, 'online' when an API key is configured, else 'offline'."""
    if mode != "auto":
        return mode
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    return "online" if wandb_key_configured() else "offline"


def prepare_wandb_env(mode: str) -> None:
    if mode != "disabled":
        os.environ["WANDB_MODE"] = mode
        os.environ.setdefault("WANDB_SILENT", "true")


def start_tracking(accelerator, cfg, state, mode: str, log) -> None:
    """Start (or, after a resume, continue) this training's W&B run. The run id lives in the train state, which
    every checkpoint saves, so `--resume` logs into the same W&B run instead of opening a second one."""
    if mode == "disabled":
        return
    t = cfg.train
    out = Path(t.output_dir)
    resumed = state.wandb_run_id is not None
    if not resumed:
        state.wandb_run_id = uuid.uuid4().hex[:12]
    if t.wandb == "auto" and mode == "offline":
        log(f"W&B: no API key configured, logging offline into {out / 'wandb'} (sync later with `wandb sync`; "
            "train.wandb=disabled turns it off)")
    init = {"dir": str(out), "name": t.run_name or out.name, "id": state.wandb_run_id, "resume": "allow"}
    accelerator.init_trackers(t.wandb_project, config=flatten(cfg.to_dict()), init_kwargs={"wandb": init})


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
