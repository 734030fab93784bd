"""Atomic, verified checkpoints on top of `Accelerator.save_state`.

Layout: `<root>/checkpoint-<step:08d>/` holding what `save_state` wrote plus `MANIFEST.json`
(`{"step": int, "files": {relative path: {"size": bytes, "sha256": hex digest}}}`; manifests of older versions
list a bare size per file and are checked by size only).

Writing (`train.save` drives it): `save_state` writes into `<root>/.tmp-checkpoint-<step:08d>`; then the main
process (`commit`) flushes every file to disk, lists them with their sizes and content hashes in
`MANIFEST.json` and renames the folder to `checkpoint-<step:08d>`. A rename within one folder is atomic, so a
reader sees either no checkpoint or a complete one; a process killed mid-write leaves only a `.tmp-*` folder,
which `clean_stale_temps` removes at the next start.

Retention (`commit`, then `retain`) keeps `limit` checkpoints: it deletes broken ones first, then the oldest
complete ones, and never the one just written nor the newest complete one. A folder is first renamed to
`.deleting-<name>` and only then removed, so a kill during retention leaves no half-deleted `checkpoint-*`
(`clean_stale_temps` removes the leftover).

Reading (`find_resume_checkpoint`): a checkpoint is used only if its manifest is readable, names its own step,
and every listed file exists with the listed size and content hash (same-size garbage is caught too).
`--resume latest` skips a bad one with a warning naming what is wrong and falls back to the next older one;
an explicit folder that is bad is an error. After loading, `check_compatible` (the saved model shape against
the current config) and `check_finite_state` (no NaN/inf weight) turn the remaining ways a checkpoint can be
wrong into one line each; `describe_write_error` words a failed write (a full disk says so).

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
import errno
import hashlib
import json
import os
import re
import shutil
import time
import warnings
from pathlib import Path

MANIFEST = "MANIFEST.json"
TEMP_PREFIX = ".tmp-checkpoint-"
DELETING_PREFIX = ".deleting-"
SLOW_ENV = "PROTODEPTH_TEST_SLOW_CHECKPOINT_S"
FSYNC_ENV = "PROTODEPTH_CHECKPOINT_FSYNC"
_NAME = re.compile(r"^checkpoint-(\d+)$")
_CHUNK = 1 << 20
# Folders that `find_resume_checkpoint` found broken in this process (path -> what is wrong). Retention checks
# sizes only (hashing every kept checkpoint at every save would cost seconds), so it learns of a same-size
# corruption from here; `commit` forgets a folder when it writes that step anew.
_known_broken: dict[Path, str] = {}


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


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks (checkpoint files are hundreds of MB)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _hash_files(paths: list[Path]) -> list[str]:
    """sha256 of each file, several files at once: hashlib releases the GIL, so the weights and the optimizer
    state (the two big files) hash in parallel."""
    from concurrent.futures import ThreadPoolExecutor

    if len(paths) < 2:
        return [file_sha256(p) for p in paths]
    with ThreadPoolExecutor(max_workers=min(8, len(paths), os.cpu_count() or 1)) as pool:
        return list(pool.map(file_sha256, paths))


def write_manifest(folder: Path, step: int) -> None:
    """Flush every file under `folder` to disk and list them with their sizes and sha256 in `folder/MANIFEST.json`.

    The files are synced first so that after a power loss a manifest never vouches for data still in the page
    cache; the manifest itself is written under another name and renamed, so it is never seen half-written."""
    paths = [p for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST]
    for p in paths:
        _fsync_path(p)
    files = {p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": digest}
             for p, digest in zip(paths, _hash_files(paths))}
    if not files:
        raise CheckpointError(f"checkpoint {folder}: save_state wrote no files")
    tmp = folder / (MANIFEST + ".part")
    with open(tmp, "w") as f:
        json.dump({"step": step, "files": files}, f, indent=1)
        f.flush()
    _fsync_path(tmp)
    tmp.rename(folder / MANIFEST)


def verify(folder: str | Path, content: bool = True) -> str | None:
    """None if the checkpoint at `folder` is complete and intact, else one sentence saying what is wrong with it.

    content=False checks the manifest and the file sizes only (no file is read)."""
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
    entries = {rel: e if isinstance(e, dict) else {"size": e} for rel, e in files.items()}
    for rel, entry in entries.items():  # every cheap check before the first byte is hashed
        p = folder / rel
        if not p.is_file():
            return f"{p} is missing"
        have = p.stat().st_size
        if have != entry.get("size"):
            return f"{p} has {have} bytes, the manifest says {entry.get('size')} (truncated or overwritten)"
    if content:
        hashed = [rel for rel, entry in entries.items() if "sha256" in entry]
        for rel, digest in zip(hashed, _hash_files([folder / rel for rel in hashed])):
            if digest != entries[rel]["sha256"]:
                return f"{folder / rel} does not match its manifest (corrupt: its content hash differs)"
    return None


def find_resume_checkpoint(root: str | Path, resume: str) -> Path:
    """Resolve `resume`: "latest" (the newest complete checkpoint under `root`) or an explicit checkpoint folder.

    "latest" skips incomplete checkpoints with a warning naming the problem of each and returns the newest
    complete one; it raises NoCheckpointError when `root` holds no checkpoint folder at all and CheckpointError
    when it holds only broken ones. An explicit folder that is missing or incomplete raises CheckpointError.
    """
    if resume != "latest":
        folder = Path(resume)
        if folder.is_file():
            inside = (folder.parent / MANIFEST).is_file()
            raise CheckpointError(f"train.resume: {folder} is a file; pass a checkpoint folder "
                                  + (f"(the one holding it: {folder.parent})" if inside else
                                     "(checkpoint-XXXXXXXX, holding MANIFEST.json)") + " or 'latest'")
        if not folder.is_dir():
            raise CheckpointError(f"train.resume: checkpoint folder {folder} not found "
                                  "(use 'latest' or a checkpoint-XXXXXXXX folder)")
        if not (folder / MANIFEST).is_file() and checkpoint_dirs(folder):
            raise CheckpointError(f"train.resume: {folder} holds checkpoint folders, it is not one; pass one of "
                                  f"them (newest: {checkpoint_dirs(folder)[-1]}) or use 'latest'")
        problem = verify(folder)
        if problem:
            raise CheckpointError(f"train.resume: checkpoint {folder} is broken: {problem}; pass another "
                                  "checkpoint folder or use 'latest' (it skips broken ones)")
        return folder
    candidates = checkpoint_dirs(root)
    if not candidates:
        raise NoCheckpointError(f"train.resume=latest: no checkpoint under {root}")
    for folder in reversed(candidates):
        problem = verify(folder)
        if problem is None:
            return folder
        _known_broken[folder.resolve()] = problem
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
    """Remove half-written and half-deleted checkpoints left by a killed process (main process only); returns
    what it removed."""
    removed = []
    root = Path(root)
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith((TEMP_PREFIX, DELETING_PREFIX)):
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
    _known_broken.pop(dst.resolve(), None)
    retain(root, limit, keep=dst)
    return dst


def retain(root: Path, limit: int, keep: Path | None = None) -> list[Path]:
    """Delete checkpoints beyond the newest `limit` (main process only); returns the deleted folders.

    Broken ones go first (a size or manifest problem, or a corruption `find_resume_checkpoint` found), then the
    oldest complete ones. Never deleted: `keep` (the checkpoint just written) and the newest complete one, so a
    run that fell back past a broken newest checkpoint keeps the one it resumed from."""
    folders = checkpoint_dirs(root)
    excess = len(folders) - limit
    if excess <= 0:
        return []
    broken = [f for f in folders if f.resolve() in _known_broken or verify(f, content=False) is not None]
    complete = [f for f in folders if f not in broken]
    protected = {keep, complete[-1] if complete else None}
    doomed = [f for f in broken + complete if f not in protected][:excess]
    for folder in doomed:
        remove_checkpoint(folder)
    return doomed


def remove_checkpoint(folder: Path) -> None:
    """Rename the folder out of the checkpoint namespace, then delete it: a kill in between leaves a
    `.deleting-*` folder (removed at the next start), never a half-deleted `checkpoint-*`."""
    aside = folder.parent / f"{DELETING_PREFIX}{folder.name}"
    shutil.rmtree(aside, ignore_errors=True)
    _known_broken.pop(folder.resolve(), None)
    folder.rename(aside)
    shutil.rmtree(aside, ignore_errors=True)


# ------------------------------------------------------------------------------- after a load, after a failed save

# What torch's zip writer and safetensors say when a write runs out of room, without an errno to go by.
_FULL_DISK_TEXT = ("No space left on device", "os error 28", "unexpected pos", "PytorchStreamWriter failed")
_NEARLY_FULL_BYTES = 16 << 20  # below this the disk is full for a checkpoint of any size


def _free_bytes(path: Path) -> int | None:
    """Free bytes on the file system holding `path` (or its nearest existing parent), None if unknown."""
    path = Path(path).absolute()
    for p in (path, *path.parents):
        try:
            return shutil.disk_usage(p).free
        except OSError:
            continue
    return None


def describe_write_error(exc: BaseException, root: str | Path) -> str:
    """Words for a failed checkpoint write into `root`, for the one-line error.

    A full disk is named as such: "the disk holding <root> is full (N MiB free)", recognised by ENOSPC anywhere
    in the exception's chain, or by torch's / safetensors' own messages ("unexpected pos", "PytorchStreamWriter
    failed", "os error 28") when the disk has next to no space left. Anything else: "<error>; N MiB free there".
    """
    free = _free_bytes(Path(root))
    mib = "unknown" if free is None else f"{free / 2**20:.0f}"
    chain, e = [], exc
    while e is not None and len(chain) < 10:
        chain.append(e)
        e = e.__cause__ or e.__context__
    enospc = any(getattr(c, "errno", None) == errno.ENOSPC for c in chain)
    full_text = any(t in str(c) for c in chain for t in _FULL_DISK_TEXT)
    if enospc or (full_text and free is not None and free < _NEARLY_FULL_BYTES):
        return f"the disk holding {root} is full ({mib} MiB free)"
    what = getattr(exc, "strerror", None) or " ".join(str(exc).split()) or exc.__class__.__name__
    return f"{what}; {mib} MiB free there"


_SHAPE_FIELDS = ("num_slots", "num_prototypes", "ico_level")


def check_compatible(folder: str | Path, cfg_model: dict) -> None:
    """Raise CheckpointError if the checkpoint at `folder` was trained with another model shape than
    `cfg_model` (the current config's `model` section, as a dict or a ModelConfig): loading it would fail deep
    inside torch with a "size mismatch". A checkpoint without config.yaml (written by hand) is not checked."""
    import dataclasses

    import yaml

    if dataclasses.is_dataclass(cfg_model):
        cfg_model = dataclasses.asdict(cfg_model)
    path = Path(folder) / "config.yaml"
    if not path.is_file():
        return
    try:
        saved = (yaml.safe_load(path.read_text()) or {}).get("model") or {}
    except (yaml.YAMLError, UnicodeDecodeError, AttributeError) as e:
        raise CheckpointError(f"checkpoint {folder}: {path.name} is unreadable ({e.__class__.__name__})") from None
    differ = [f for f in _SHAPE_FIELDS if f in saved and f in cfg_model and saved[f] != cfg_model[f]]
    if differ:
        theirs = " ".join(f"model.{f}={saved[f]}" for f in differ)
        ours = ", ".join(f"model.{f}={cfg_model[f]}" for f in differ)
        raise CheckpointError(f"checkpoint {folder} was trained with {theirs.replace(' ', ', ')}, the config says "
                              f"{ours}; resume it with {theirs}, or start a new run in another train.output_dir")


def check_finite_state(model, folder: str | Path | None = None) -> None:
    """Raise CheckpointError naming the first parameter or buffer of `model` that holds NaN or inf (after a
    load: such weights would make every later loss non-finite and the error would blame optim.lr).

    One device sync for the whole model, not one per tensor."""
    import torch

    named = [(n.removeprefix("module."), t) for n, t in model.state_dict().items()
             if torch.is_tensor(t) and t.is_floating_point() and t.numel()]
    if not named:
        return
    ok = torch.stack([torch.isfinite(t).all() for _, t in named]).cpu()
    if bool(ok.all()):
        return
    name = named[int((~ok).nonzero()[0])][0]
    where = f"checkpoint {folder}" if folder is not None else "the loaded checkpoint"
    raise CheckpointError(f"{where}: the model's {name} holds NaN or inf values; resume from an older checkpoint "
                          "(pass its folder as train.resume)")
