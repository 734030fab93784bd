"""Triton launches without Triton's per-call argument binding: what small eager KNN calls pay for.

`kernel[grid](*args, **meta)` binds and specialises every argument in Python on every call (data pointer,
alignment and dtype of each tensor, divisibility of each integer) and builds a cache key from them: measured
~80 us per launch of the 22-argument KNN search kernel on a 2-core CPU, more than the GPU needs for a
10 000 x 6 400 search. `launch` does that once per specialisation and keeps the compiled kernel; later calls with
the same key go straight to the compiled kernel's launcher (`CompiledKernel[grid](*all_params)`, the entry
point Triton's own tutorials use), which only reads the pointers.

The key (`arg_key`) holds everything Triton specialises on: each tensor's dtype and 16-byte alignment, each
integer's width, divisibility by 16 and equality to 1, and the compile-time values. Under TRITON_INTERPRET=1
there is no compiled kernel and every call takes the ordinary path.

The compiled kernel's launcher is not a stable Triton API: its arguments have changed between releases, and a
launcher that took the wrong arguments without refusing them would compute garbage. So the shortcut is on only
for the Triton releases it was checked on (`VERIFIED_TRITON`, CUDA tests on an H200); elsewhere every launch
takes Triton's ordinary path. `PROTODEPTH_TRITON_FAST_LAUNCH=0` or `=1` (read at import) forces it off or on; a
launcher that refuses the call (TypeError) switches it off for the process and the ordinary path runs instead.
"""
from __future__ import annotations

import os

import torch

VERIFIED_TRITON = ("3.6.",)  # release prefixes whose compiled launcher this calling convention was tested on


def _default_on() -> bool:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return False
    forced = os.environ.get("PROTODEPTH_TRITON_FAST_LAUNCH")
    if forced is not None:
        return forced != "0"
    try:
        import triton
    except ImportError:
        return False
    return triton.__version__.startswith(VERIFIED_TRITON)


_enabled = [_default_on()]
_compiled: dict = {}
_current_device = torch.cuda.current_device
_I32 = 1 << 31


def enabled() -> bool:
    return _enabled[0]


def set_enabled(on: bool) -> bool:
    """Turn the shortcut on or off (benchmarks compare both); returns the previous setting."""
    prev = _enabled[0]
    _enabled[0] = bool(on) and os.environ.get("TRITON_INTERPRET", "0") != "1"
    return prev


def arg_key(args: tuple) -> tuple:
    """What Triton specialises a launch on, per runtime argument (tensors and Python ints/floats)."""
    out = []
    for a in args:
        t = type(a)
        if t is int:
            out.append((a == 1, a & 15 == 0, -_I32 <= a < _I32))
        elif t is float:
            out.append(t)
        elif isinstance(a, torch.Tensor):
            out.append((a.dtype, a.data_ptr() & 15 == 0))
        elif isinstance(a, int) and not isinstance(a, bool):  # an int subclass: as an int
            out.append((a == 1, a & 15 == 0, -_I32 <= a < _I32))
        else:
            out.append((t, a))
    return tuple(out)


def launch(fn, grid: tuple, args: tuple, meta: dict, key: tuple) -> None:
    """fn[grid](*args, **meta) with grid a 3-tuple; `key` must determine meta and arg_key(args) (callers pass
    arg_key(args) plus the compile-time values, or less where fn is declared not to specialise)."""
    if _enabled[0]:
        # a compiled kernel is loaded on one device: the current one, which is where Triton launches
        key = (_current_device(), key)
        hit = _compiled.get((fn, key))
        if hit is not None:
            try:
                hit[0][grid](*args, *hit[1])
                return
            except TypeError:  # a Triton whose launcher takes other arguments: the ordinary path from now on
                _enabled[0] = False
                _compiled.clear()
    kernel = fn[grid](*args, **meta)
    if _enabled[0] and kernel is not None and hasattr(kernel, "__getitem__"):
        rest = fn.params[len(args):]
        consts = tuple(meta[p.name] if p.name in meta else p.default for p in rest)
        _compiled[(fn, key)] = (kernel, consts)
