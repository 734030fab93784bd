"""`capture_mode()`: the one switch that tells the geometry ops not to read device values on the host.

Eagerly, the ops check values that live on the device (lengths in range, a mesh with area, finite
vertices, non-negative weights): each check is one host read, i.e. a device sync. A CUDA graph cannot
contain a host read, and neither can a `torch.compile(fullgraph=True)` trace. So:

- inside `with capture_mode():` (the CUDA-graph step wraps its capture in it) and while
  `torch.compile` traces, the ops skip those value checks and take their sync-free branches; the
  caller checks the outputs instead (the trainer checks every step's loss for non-finite values);
- everywhere else they check, and raise one clear ValueError.

Shape, dtype and device checks never read the device and run in every mode. The flag is a
ContextVar, so it is local to the thread (and asyncio task) that entered the context.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator

import torch

_NO_HOST_READS: contextvars.ContextVar[bool] = contextvars.ContextVar("protodepth_geometry_capture_mode",
                                                                       default=False)


@contextlib.contextmanager
def capture_mode() -> Iterator[None]:
    """Inside this context the geometry ops make no host reads (see the module docstring)."""
    token = _NO_HOST_READS.set(True)
    try:
        yield
    finally:
        _NO_HOST_READS.reset(token)


def host_reads_allowed() -> bool:
    """False inside capture_mode() and while torch.compile traces; True otherwise."""
    # is_compiling() first: dynamo folds it to True and never traces the ContextVar lookup
    if torch.compiler.is_compiling():
        return False
    return not _NO_HOST_READS.get()
