"""Atomic, verified checkpoints on top of `Accelerator.save_state`.

A checkpoint is written into `<root>/.tmp-checkpoint-<step>`, then the main process lists every file with its
size in `MANIFEST.json` and renames the folder to `<root>/checkpoint-<step:08d>`. A rename within one folder is
atomic, so a reader sees either no checkpoint or a complete one; a process killed mid-write leaves only a
`.tmp-*` folder, which the next save removes. Loading re-checks the manifest and falls back to the previous
good checkpoint, warning what was wrong.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from pathlib import Path

MANIFEST = "MANIFEST.json"
_NAME = re.compile(r"^checkpoint-(\d+)$")


class CheckpointError(RuntimeError):
    """No usable checkpoint where one was asked for."""


def checkpoint_dirs(root: str | Path) -> list[Path]:
    """Committed checkpoint folders under root, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def write_manifest(folder: Path, step: int) -> None:
    files = {
        str(p.relative_to(folder)): p.stat().st_size
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }
    if not files:
        raise CheckpointError(f"checkpoint {folder}: save_state wrote no files")
    tmp = folder / (MANIFEST + ".part")
    tmp.write_text(json.dumps({"step": step, "files": files}, indent=1))
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    tmp.rename(folder / MANIFEST)


def verify(folder: Path) -> str | None:
    """None if the checkpoint at `folder` is complete, else what is wrong with it."""
    man = folder / MANIFEST
    if not man.is_file():
        return f"{man} is missing (the write did not finish)"
    try:
        files = json.loads(man.read_text())["files"]
    except (ValueError, KeyError) as e:
        return f"{man} is unreadable ({e.__class__.__name__})"
    for rel, size in files.items():
        p = folder / rel
        if not p.is_file():
            return f"{p} is missing"
        if p.stat().st_size != size:
            return f"{p} has {p.stat().st_size} bytes, the manifest says {size}"
    return None


def find_resume_checkpoint(root: str | Path, resume: str) -> Path:
    """Resolve `--resume latest` (newest complete checkpoint under root) or an explicit folder.

    Incomplete checkpoints are skipped with a warning naming the problem; raises CheckpointError when
    nothing usable is left.
    """
    if resume != "latest":
        folder = Path(resume)
        if not folder.is_dir():
            raise CheckpointError(f"train.resume: checkpoint folder {folder} not found")
        problem = verify(folder)
        if problem:
            raise CheckpointError(f"train.resume: checkpoint {folder} is incomplete: {problem}")
        return folder
    candidates = checkpoint_dirs(root)
    for folder in reversed(candidates):
        problem = verify(folder)
        if problem is None:
            return folder
        warnings.warn(f"skipping checkpoint {folder}: {problem}; falling back to an older one", stacklevel=2)
    raise CheckpointError(
        f"train.resume=latest: no complete checkpoint under {root}"
        + (f" ({len(candidates)} incomplete)" if candidates else "")
    )


def latest_checkpoint_or_none(root: str | Path) -> Path | None:
    try:
        return find_resume_checkpoint(root, "latest")
    except CheckpointError:
        return None


def temp_dir(root: Path, step: int) -> Path:
    return root / f".tmp-checkpoint-{step:08d}"


def final_dir(root: Path, step: int) -> Path:
    return root / f"checkpoint-{step:08d}"


def clean_stale_temps(root: Path) -> None:
    """Remove half-written checkpoints left by a killed process (main process only)."""
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(".tmp-checkpoint-"):
                shutil.rmtree(p, ignore_errors=True)


def commit(root: Path, step: int, limit: int) -> Path:
    """Seal a fully written temp folder (main process only): manifest, atomic rename, retention."""
    tmp, dst = temp_dir(root, step), final_dir(root, step)
    write_manifest(tmp, step)
    if dst.exists():  # a re-save of the same step after a resume: replace it whole
        shutil.rmtree(dst)
    tmp.rename(dst)
    for old in checkpoint_dirs(root)[:-limit]:
        shutil.rmtree(old, ignore_errors=True)
    return dst
