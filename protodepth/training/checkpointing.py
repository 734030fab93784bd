"""`Checkpointer`: owns the run folder: the check that a fresh run does not land in another run's folder,
saving and resuming. Which checkpoint is good and which may be deleted is protodepth/checkpoint.py's rule."""
from __future__ import annotations

import datetime
import shutil
from pathlib import Path

from protodepth import checkpoint as ckpt
from protodepth.config import Config
from protodepth.errors import CheckpointError, ConfigError, RunFolderError

RUN_FILES = ("config.yaml", "summary.json")  # besides checkpoints/: what says a folder holds a run


def check_writable(path: Path, min_free_bytes: int) -> None:
    """Fail before training, with the reason, if the run folder can't hold a checkpoint."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"train.output_dir: {path} is not writable ({e.strerror or e})") from None
    free = shutil.disk_usage(path).free
    if free < min_free_bytes:
        raise ConfigError(
            f"train.output_dir: {path} has {free / 2**20:.0f} MiB free, a checkpoint needs about "
            f"{min_free_bytes / 2**20:.0f} MiB; free some space or choose another folder")


def holds_a_run(out: Path) -> bool:
    root = out / "checkpoints"
    return any((out / f).exists() for f in RUN_FILES) or (root.is_dir() and any(root.iterdir()))


def claim_run_folder(out: Path, resume: str | None, overwrite: bool, log) -> None:
    """A fresh run (no resume) may only start in an empty or new folder: it would otherwise mix its files with
    another run's (retention would delete that run's checkpoints, `--resume latest` would continue it).
    `overwrite` moves the old run aside into `replaced-<time>/` (nothing is deleted). Main process only."""
    if resume is not None or not holds_a_run(out):
        return
    if not overwrite:
        steps = [int(p.name.split("-")[1]) for p in ckpt.checkpoint_dirs(out / "checkpoints")]
        what = f"checkpoints up to step {steps[-1]}" if steps else "files of an earlier run"
        raise RunFolderError(
            f"train.output_dir: {out} already holds a run ({what}); pass --resume latest to continue it, "
            "--output-dir to start a new run elsewhere, or --overwrite to start over here (the old run is moved "
            "into a replaced-* folder, not deleted)")
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    aside, n = out / f"replaced-{stamp}", 1
    while aside.exists():  # two overwrites within a second
        aside, n = out / f"replaced-{stamp}-{n}", n + 1
    try:
        aside.mkdir()
        for name in ("checkpoints", "viz", "wandb") + RUN_FILES:
            if (out / name).exists():
                (out / name).rename(aside / name)
    except OSError as e:
        raise RunFolderError(f"train.output_dir: --overwrite could not move the earlier run in {out} aside into "
                             f"{aside} ({e.strerror or e}); choose another --output-dir") from None
    log(f"--overwrite: the earlier run in {out} was moved to {aside}")


class Checkpointer:
    def __init__(self, cfg: Config, accelerator, log):
        self.cfg, self.acc, self.log = cfg, accelerator, log
        self.out = Path(cfg.train.output_dir)
        self.root = self.out / "checkpoints"

    def claim(self) -> None:
        """First thing a run does (seconds, before the model and data are built): a fresh run may not land in
        another run's folder."""
        if self.acc.is_main_process:
            t = self.cfg.train
            claim_run_folder(self.out, t.resume, t.overwrite, self.log)
        self.acc.wait_for_everyone()

    def prepare_folder(self, min_free_bytes: int) -> None:
        """Before any checkpoint is written: the folder can hold one; half-written leftovers are cleared."""
        if self.acc.is_main_process:
            check_writable(self.out, min_free_bytes)
            ckpt.clean_stale_temps(self.root)
        self.acc.wait_for_everyone()

    def resume(self, model) -> Path | None:
        """Load the checkpoint named by train.resume into the prepared objects; the folder loaded, or None."""
        t = self.cfg.train
        if t.resume is None:
            return None
        try:
            folder = ckpt.find_resume_checkpoint(self.root, t.resume)
        except ckpt.NoCheckpointError:
            # "latest" with nothing saved yet: a fresh start, so a restart loop can always pass it. Only broken
            # checkpoints (CheckpointError) stop the run: starting over would let retention delete them.
            self.log(f"resume=latest: no checkpoint under {self.root} yet, starting from step 0")
            return None
        ckpt.check_compatible(folder, self.cfg.to_dict()["model"])
        self.acc.load_state(str(folder))
        ckpt.check_finite_state(self.acc.unwrap_model(model))
        return folder

    def save(self, step: int) -> Path:
        tmp = ckpt.temp_dir(self.root, step)
        main = self.acc.is_main_process
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        self.acc.wait_for_everyone()
        try:
            self.acc.save_state(str(tmp))
            self.acc.wait_for_everyone()
            if main:
                self.cfg.save(tmp / "config.yaml")  # self-contained: scripts/infer.py needs only the folder
                ckpt.commit(self.root, step, self.cfg.train.ckpt_limit)
        except Exception as e:
            # Disk full, file too large, folder removed, permissions: leave no partial checkpoint behind. Writers
            # report these as OSError, SafetensorError or RuntimeError (torch.save), hence Exception.
            if main:
                shutil.rmtree(tmp, ignore_errors=True)
            good = ckpt.checkpoint_dirs(self.root)
            raise CheckpointError(
                f"could not write the checkpoint of step {step} to {self.root} ({ckpt.describe_write_error(e, self.root)}"
                f"); the last complete checkpoint is {good[-1] if good else 'none'}") from e
        self.acc.wait_for_everyone()
        return ckpt.final_dir(self.root, step)

    def latest(self) -> Path | None:
        dirs = ckpt.checkpoint_dirs(self.root)
        return dirs[-1] if dirs else None
