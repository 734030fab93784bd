"""Shared input validation for the geometry ops.

Every check raises one `ValueError` that names the argument and says what was expected, so a caller
sees "p2: expected shape (N, P2, 3) ..." instead of an indexing error deep inside an op. Where
PyTorch3D's own tests match an error's text ("Support for 1 or 2 norm.", "batch_reduction must be one
of", "Expected lengths to be of shape"...), the message contains PyTorch3D's words too.
"""
from __future__ import annotations

import torch

from ._mode import host_reads_allowed

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(name: str, x, ndim: int, shape_doc: str) -> torch.Tensor:
    """Require a tensor of rank `ndim`; `shape_doc` (e.g. "(N, P, D)") is quoted in the error."""
    if not torch.is_tensor(x):
        raise ValueError(f"{name}: expected a torch.Tensor of shape {shape_doc}, got {type(x).__name__}")
    if x.dim() != ndim:
        raise ValueError(f"{name}: expected shape {shape_doc} (rank {ndim}), got shape {tuple(x.shape)}")
    return x


def check_float(name: str, x: torch.Tensor) -> None:
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{name}: expected a floating point tensor, got dtype {x.dtype}")


def check_points(name: str, x, shape_doc: str = "(N, P, D)", last_dim: int | None = None) -> torch.Tensor:
    """Require a floating (N, P, D) tensor; with `last_dim`, D must equal it."""
    check_tensor(name, x, 3, shape_doc)
    check_float(name, x)
    if last_dim is not None and x.shape[-1] != last_dim:
        raise ValueError(f"{name}: expected last dimension {last_dim} in shape {shape_doc}, got shape {tuple(x.shape)}")
    return x


def check_same_batch(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"{name_b}: batch size {b.shape[0]} does not match {name_a}'s batch size {a.shape[0]}")


def check_same_last_dim(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    if a.shape[-1] != b.shape[-1]:
        raise ValueError(f"{name_b}: point dimension {b.shape[-1]} does not match {name_a}'s point dimension {a.shape[-1]}")


def fill_lengths(name: str, lengths, n: int, p: int, device: torch.device) -> torch.Tensor:
    """Validate an optional lengths tensor against a padded (N, P, ...) batch; return it as int64 (N,).

    None means every cloud is full (length P). Values must lie in [0, P]; checking that costs one
    device sync, which is cheap next to any op that takes lengths (skipped in capture_mode and under
    torch.compile, where the caller answers for them).
    """
    if lengths is None:
        return torch.full((n,), p, dtype=torch.int64, device=device)
    if not torch.is_tensor(lengths):
        raise ValueError(f"{name}: expected an integer tensor of shape ({n},) or None, got {type(lengths).__name__}")
    if lengths.dim() != 1 or lengths.shape[0] != n:
        raise ValueError(f"{name}: Expected lengths to be of shape (N,) = ({n},) (one length per batch element), "
                         f"got {tuple(lengths.shape)}")
    if lengths.dtype.is_floating_point or lengths.dtype.is_complex or lengths.dtype == torch.bool:
        raise ValueError(f"{name}: expected an integer tensor, got dtype {lengths.dtype}")
    if lengths.device != device:
        raise ValueError(f"{name}: expected a tensor on {device}, got one on {lengths.device}")
    lengths = lengths.to(torch.int64)
    if n > 0 and host_reads_allowed() and bool(((lengths < 0) | (lengths > p)).any()):
        raise ValueError(f"{name}: every value must lie in [0, {p}], got {lengths.tolist()[:16]}")
    return lengths


def check_reduction(name: str, value, allowed: tuple) -> None:
    """value must be one of `allowed` (strings, and None when allowed)."""
    if value not in allowed:
        names = ", ".join(f'"{a}"' for a in allowed if a is not None)
        tail = " or None" if None in allowed else ""
        raise ValueError(f"{name} must be one of [{names}]{tail}, got {value!r}")


def check_norm(norm) -> None:
    if norm not in (1, 2) or isinstance(norm, bool):
        raise ValueError(f"norm: Support for 1 or 2 norm. Expected 1 (L1) or 2 (squared L2), got {norm!r}")


def mesh_is_empty(verts: torch.Tensor, faces: torch.Tensor) -> bool:
    """PyTorch3D's `Meshes.isempty()` for a validated batch: no mesh at all, or no face in any mesh."""
    return verts.shape[0] == 0 or faces.shape[-2] == 0


def check_mesh(verts, faces, check_index_range: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate a batch of meshes: verts (M, V, 3) float, faces (F, 3) shared or (M, F, 3) int64.

    An empty batch (M = 0 or F = 0) passes: each op says what it makes of it (`mesh_is_empty`).

    Index range checking costs one device sync; the topology caches call it once per faces tensor. It is
    skipped in capture_mode and under torch.compile (no host reads there).
    """
    check_points("verts", verts, "(M, V, 3)", last_dim=3)
    if not torch.is_tensor(faces):
        raise ValueError(f"faces: expected an int64 tensor of shape (F, 3) or (M, F, 3), got {type(faces).__name__}")
    if faces.dim() not in (2, 3) or faces.shape[-1] != 3:
        raise ValueError(f"faces: expected shape (F, 3) or (M, F, 3), got {tuple(faces.shape)}")
    if faces.dtype != torch.int64:
        raise ValueError(f"faces: expected dtype torch.int64, got {faces.dtype}")
    if faces.dim() == 3 and faces.shape[0] != verts.shape[0]:
        raise ValueError(f"faces: batch size {faces.shape[0]} does not match verts' batch size {verts.shape[0]}")
    if faces.device != verts.device:
        raise ValueError(f"faces: expected a tensor on {verts.device} (verts' device), got one on {faces.device}")
    if check_index_range and faces.numel() > 0 and host_reads_allowed():
        lo, hi = int(faces.min()), int(faces.max())
        if lo < 0 or hi >= verts.shape[1]:
            raise ValueError(f"faces: vertex indices must lie in [0, {verts.shape[1] - 1}], got range [{lo}, {hi}]")
    return verts, faces


_VALIDATED_FACES: dict = {}


def check_mesh_cached(verts, faces) -> None:
    """check_mesh, with the faces' index range checked once per faces tensor (identity, in-place
    version and vertex count): the trainer passes the same faces every step, and the range check
    costs a device sync."""
    import weakref

    check_mesh(verts, faces, check_index_range=False)
    if not host_reads_allowed():
        return  # and remember nothing: the range is checked on the next eager call
    key = (id(faces), faces._version, verts.shape[1])
    ref = _VALIDATED_FACES.get(key)
    if ref is not None and ref() is faces:
        return
    check_mesh(verts, faces, check_index_range=True)
    if len(_VALIDATED_FACES) > 64:
        _VALIDATED_FACES.clear()
    _VALIDATED_FACES[key] = weakref.ref(faces)
