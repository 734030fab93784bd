"""Atomic, verified checkpoints on top of `Accelerator.save_state`.

Layout: `<root>/checkpoint-<step:08d>/` holding what `save_state` wrote plus `MANIFEST.json`
(`{"step": int, "files": {relative path: size in bytes}}`).

Writing (`train.save` drives it): `save_state` writes into `<root>/.tmp-checkpoint-<step:08d>`; then the main
process (`commit`) flushes every file to disk, lists them with their sizes in `MANIFEST.json` and renames the
folder to `checkpoint-<step:08d>`. A rename within one folder is atomic, so a reader sees either no checkpoint
or a complete one; a process killed mid-write leaves only a `.tmp-*` folder, which `clean_stale_temps` removes
at the next start.

Reading (`find_resume_checkpoint`): a checkpoint is used only if its manifest is readable, names its own step,
and every listed file exists with the listed size. `--resume latest` skips a bad one with a warning naming
what is wrong and falls back to the next older one; an explicit folder that is bad is an error.

Knobs (environment variables):
- `PROTODEPTH_CHECKPOINT_FSYNC=0` skips flushing the files to disk before the manifest is written (about 0.7 s
  per 270 MB checkpoint on a test machine). A killed process loses nothing without it (written data is in
  the page cache); only a power loss or OS crash could then leave a manifest vouching for unwritten data. The
  tests set it to keep every-step checkpoints cheap.
- `PROTODEPTH_TEST_SLOW_CHECKPOINT_S=<seconds>` makes `commit` sleep after the files are written and before
  the manifest and rename, widening the window in which a killed process leaves a `.tmp-*` folder
  (tests/test_kill_resume.py kills the trainer inside it).
"""
from __future__ import annotations

from protodepth.errors import CheckpointError, NoCheckpointError  # noqa: F401  (raised here)
import json
import os
import re
import shutil
import time
import warnings
from pathlib import Path

MANIFEST = "MANIFEST.json"
TEMP_PREFIX = ".tmp-checkpoint-"
SLOW_ENV = "PROTODEPTH_TEST_SLOW_CHECKPOINT_S"
FSYNC_ENV = "PROTODEPTH_CHECKPOINT_FSYNC"
_NAME = re.compile(r"^checkpoint-(\d+)$")




def checkpoint_dirs(root: str | Path) -> list[Path]:
    """Committed checkpoint folders under root (complete or not), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def _fsync_path(path: Path) -> None:
    # a file or a folder (a folder's fsync makes the names in it, e.g. after a rename, durable)
    if os.environ.get(FSYNC_ENV, "1") == "0":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_manifest(folder: Path, step: int) -> None:
    """Flush every file under `folder` to disk and list them with their sizes in `folder/MANIFEST.json`.

    The files are synced first so that after a power loss a manifest never vouches for data still in the page
    cache; the manifest itself is written under another name and renamed, so it is never seen half-written."""
    files = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            _fsync_path(p)
            files[p.relative_to(folder).as_posix()] = p.stat().st_size
    if not files:
        raise CheckpointError(f"checkpoint {folder}: save_state wrote no files")
    tmp = folder / (MANIFEST + ".part")
    with open(tmp, "w") as f:
        json.dump({"step": step, "files": files}, f, indent=1)
        f.flush()
    _fsync_path(tmp)
    tmp.rename(folder / MANIFEST)


def verify(folder: str | Path) -> str | None:
    """None if the checkpoint at `folder` is complete, else one sentence saying what is wrong with it."""
    folder = Path(folder)
    man = folder / MANIFEST
    if not man.is_file():
        return f"{man} is missing (the write did not finish)"
    try:
        data = json.loads(man.read_text())
        files = data["files"]
        if not isinstance(files, dict) or not files:
            raise ValueError("no file list")
        step = data.get("step")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        return f"{man} is unreadable ({e.__class__.__name__}: {e})"
    m = _NAME.match(folder.name)
    if m and step is not None and int(m.group(1)) != step:
        return f"{man} is for step {step}, not {int(m.group(1))} (a folder copied over another?)"
    for rel, size in files.items():
        p = folder / rel
        if not p.is_file():
            return f"{p} is missing"
        have = p.stat().st_size
        if have != size:
            return f"{p} has {have} bytes, the manifest says {size} (truncated or overwritten)"
    return None


def find_resume_checkpoint(root: str | Path, resume: str) -> Path:
    """Resolve `resume`: "latest" (the newest complete checkpoint under `root`) or an explicit checkpoint folder.

    "latest" skips incomplete checkpoints with a warning naming the problem of each and returns the newest
    complete one; it raises NoCheckpointError when `root` holds no checkpoint folder at all and CheckpointError
    when it holds only broken ones. An explicit folder that is missing or incomplete raises CheckpointError.
    """
    if resume != "latest":
        folder = Path(resume)
        if not folder.is_dir():
            raise CheckpointError(f"train.resume: checkpoint folder {folder} not found "
                                  "(use 'latest' or a checkpoint-XXXXXXXX folder)")
        if not (folder / MANIFEST).is_file() and checkpoint_dirs(folder):
            raise CheckpointError(f"train.resume: {folder} holds checkpoint folders, it is not one; pass one of "
                                  f"them (newest: {checkpoint_dirs(folder)[-1]}) or use 'latest'")
        problem = verify(folder)
        if problem:
            raise CheckpointError(f"train.resume: checkpoint {folder} is incomplete: {problem}; pass another "
                                  "checkpoint folder or use 'latest' (it skips incomplete ones)")
        return folder
    candidates = checkpoint_dirs(root)
    if not candidates:
        raise NoCheckpointError(f"train.resume=latest: no checkpoint under {root}")
    for folder in reversed(candidates):
        problem = verify(folder)
        if problem is None:
            return folder
        warnings.warn(f"skipping checkpoint {folder}: {problem}; falling back to an older one", stacklevel=2)
    raise CheckpointError(
        f"train.resume=latest: none of the {len(candidates)} checkpoints under {root} is complete (see the "
        "warnings above); move them away to start from step 0, or pass a good checkpoint folder")


def latest_checkpoint_or_none(root: str | Path) -> Path | None:
    """The newest complete checkpoint under `root`, or None (warning about each incomplete one skipped)."""
    try:
        return find_resume_checkpoint(root, "latest")
    except CheckpointError:
        return None


def temp_dir(root: Path, step: int) -> Path:
    return Path(root) / f"{TEMP_PREFIX}{step:08d}"


def final_dir(root: Path, step: int) -> Path:
    return Path(root) / f"checkpoint-{step:08d}"


def clean_stale_temps(root: Path) -> list[Path]:
    """Remove half-written checkpoints left by a killed process (main process only); returns what it removed."""
    removed = []
    root = Path(root)
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(TEMP_PREFIX):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
                removed.append(p)
    return removed


def commit(root: Path, step: int, limit: int) -> Path:
    """Seal a fully written temp folder (main process only): manifest, atomic rename, retention of `limit`."""
    root = Path(root)
    tmp, dst = temp_dir(root, step), final_dir(root, step)
    slow = os.environ.get(SLOW_ENV)
    if slow:
        time.sleep(float(slow))
    write_manifest(tmp, step)
    if dst.exists():
        # a re-save of a step whose checkpoint was skipped as incomplete: move the old one aside under a temp
        # name (removed at the next start if we die here) rather than delete it before the new one is in place
        aside = root / f"{TEMP_PREFIX}{step:08d}-replaced"
        shutil.rmtree(aside, ignore_errors=True)
        dst.rename(aside)
        tmp.rename(dst)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        tmp.rename(dst)
    _fsync_path(root)
    for old in checkpoint_dirs(root)[:-limit]:
        shutil.rmtree(old, ignore_errors=True)
    return dst
