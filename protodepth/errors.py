"""Every error that a user's mistake or a broken input raises, and the one place that prints them.

This module imports nothing of protodepth, so any module can raise these without import cycles. The scripts
wrap their `main` in `run_cli`, which prints a user error as one line (`error: ...`, exit code 2, no
traceback); anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
from typing import Callable


class UserError(Exception):
    """Base of the errors that end a run with one line naming the field, file or folder to fix."""


class ConfigError(UserError, ValueError):
    """A configuration value or command-line flag is wrong; the message names the field and how to fix it."""


class CheckpointError(UserError, RuntimeError):
    """No usable checkpoint where one was asked for, or one could not be written."""


class NoCheckpointError(CheckpointError):
    """`resume=latest` found no checkpoint folder at all (a fresh run), as opposed to only broken ones."""


class BadFrameError(UserError, ValueError):
    """A depth frame cannot be used (unreadable, wrong pixel format, or no valid point); names the file."""


class DataSetupError(UserError, ValueError):
    """The data named by the config can't be opened (missing folder, no frames, bad cache...)."""


class WeightsError(UserError, ValueError):
    """Backbone weights were asked for that cannot be had."""


class NonFiniteError(UserError, RuntimeError):
    """The loss, the gradients or the model's output stopped being finite."""


class InferError(UserError, ValueError):
    """A bad checkpoint or input for inference; the message names the file or folder."""


class GraphCaptureError(UserError, RuntimeError):
    """The training step could not be captured in a CUDA graph; the message says how to train without graphs."""


class RunFolderError(UserError, RuntimeError):
    """The run folder holds another run, or can't be written."""


def require(ok: bool, field: str, problem: str) -> None:
    """The one form of every config check: `ConfigError("section.field: problem")`. `problem` says what was
    given and what is expected or how to fix it, e.g. require(lr > 0, "optim.lr", f"got {lr}, must be > 0")."""
    if not ok:
        raise ConfigError(f"{field}: {problem}")


def require_one_of(value, field: str, choices: tuple) -> None:
    require(value in choices, field, f"got {value!r}, expected one of {', '.join(map(repr, choices))}")


def one_line(e: BaseException) -> str:
    """The message of a user error as one line. An error re-raised from a DataLoader worker carries the worker's
    traceback in its message; its last line is the original message."""
    lines = [line for line in str(e).strip().splitlines() if line.strip()]
    if len(lines) > 1 and "Traceback" in str(e):
        return lines[-1].split(": ", 1)[-1]
    return " ".join(lines)


class CliParser(argparse.ArgumentParser):
    """The scripts' argument parser: a bad flag ends like every other user error (last line `error: ...`, exit
    code 2, whatever the program name), and no abbreviations (`--max-step 3` must not silently mean --max-steps)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.print_usage(sys.stderr)
        self.exit(2, f"error: {message}\n")


def run_cli(main: Callable[[list[str]], int], argv: list[str]) -> int:
    """Run a script's `main(argv)`; a `UserError` becomes one line on stderr and exit code 2.

    `--traceback` anywhere in argv shows the full traceback instead (for bug reports)."""
    show = "--traceback" in argv
    try:
        return main([a for a in argv if a != "--traceback"])
    except UserError as e:
        if show:
            raise
        message = one_line(e)
    rank = os.environ.get("RANK")
    prefix = f"[rank {rank}] " if rank not in (None, "0") else ""
    # Printed only now, after the exception (and through its traceback the trainer's frames) is gone: a progress
    # bar left open by the failure prints its last state when collected, and our line must stay the last one.
    gc.collect()
    print(f"{prefix}error: {message}", file=sys.stderr)
    return 2
