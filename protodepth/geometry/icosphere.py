"""Unit icospheres with PyTorch3D's exact vertex and face order.

`pytorch3d.utils.ico_sphere(level)` subdivides level - 1 with `SubdivideMeshes`: every unique edge
(sorted ascending by (v0, v1)) gets a midpoint vertex appended after the old vertices, each face
(v0, v1, v2) becomes four faces, and all vertices are projected back to the unit sphere. Level 0 is
the hard-coded 12-vertex icosahedron, *not* renormalised (its coordinates have 4 digits, so its norm
is 1 +- 2e-5), exactly as PyTorch3D leaves it.
"""
from __future__ import annotations

import torch

from .mesh_losses import unique_edges

_ICO_VERTS0 = [
    [-0.5257, 0.8507, 0.0000],
    [0.5257, 0.8507, 0.0000],
    [-0.5257, -0.8507, 0.0000],
    [0.5257, -0.8507, 0.0000],
    [0.0000, -0.5257, 0.8507],
    [0.0000, 0.5257, 0.8507],
    [0.0000, -0.5257, -0.8507],
    [0.0000, 0.5257, -0.8507],
    [0.8507, 0.0000, -0.5257],
    [0.8507, 0.0000, 0.5257],
    [-0.8507, 0.0000, -0.5257],
    [-0.8507, 0.0000, 0.5257],
]

_ICO_FACES0 = [
    [0, 11, 5], [0, 5, 1], [0, 1, 7], [0, 7, 10], [0, 10, 11],
    [1, 5, 9], [5, 11, 4], [11, 10, 2], [10, 7, 6], [7, 1, 8],
    [3, 9, 4], [3, 4, 2], [3, 2, 6], [3, 6, 8], [3, 8, 9],
    [4, 9, 5], [2, 4, 11], [6, 2, 10], [8, 6, 7], [9, 8, 1],
]

_CACHE: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
# levels up to this one are kept once built (level 6: 41k vertices, 2 MiB); larger ones are rebuilt
_CACHE_MAX_LEVEL = 6
# PyTorch3D has no upper bound; level 10 (10.5M vertices, 21M faces: 0.6 GB, about 3 GB while building) is the
# largest protodepth builds, each further level costs four times that
MAX_LEVEL = 10


def subdivide(verts: torch.Tensor, faces: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One loop-free midpoint subdivision in PyTorch3D's order (no projection to the sphere).

    verts (V, 3), faces (F, 3) int64 -> verts (V + E, 3), faces (4F, 3), E = number of unique edges.
    Midpoint of unique edge e is vertex V + e; face (v0, v1, v2) with edge midpoints m12, m20, m01
    becomes [v0, m01, m20], [v1, m12, m01], [v2, m20, m12] (these three for all faces first, in
    that block order) and then [m12, m20, m01].
    """
    edges, face_to_edge = unique_edges(faces, verts.shape[0])
    mid = face_to_edge + verts.shape[0]  # (F, 3): columns are edges (v1,v2), (v2,v0), (v0,v1)
    f0 = torch.stack([faces[:, 0], mid[:, 2], mid[:, 1]], dim=1)
    f1 = torch.stack([faces[:, 1], mid[:, 0], mid[:, 2]], dim=1)
    f2 = torch.stack([faces[:, 2], mid[:, 1], mid[:, 0]], dim=1)
    new_faces = torch.cat([f0, f1, f2, mid], dim=0)
    new_verts = torch.cat([verts, verts[edges].mean(dim=1)], dim=0)
    return new_verts, new_faces


def _build(level: int) -> tuple[torch.Tensor, torch.Tensor]:
    verts = torch.tensor(_ICO_VERTS0, dtype=torch.float32)
    faces = torch.tensor(_ICO_FACES0, dtype=torch.int64)
    for _ in range(level):
        verts, faces = subdivide(verts, faces)
        verts = verts / verts.norm(p=2, dim=1, keepdim=True)
    return verts, faces


def ico_sphere(level: int = 0, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit icosphere of subdivision `level`, vertex and face order identical to PyTorch3D 0.7.9.

    Returns (verts (V, 3) float32, faces (F, 3) int64) with V = 10 * 4**level + 2, F = 20 * 4**level,
    faces oriented outwards (counter-clockwise seen from outside). Levels 0 to MAX_LEVEL (10); PyTorch3D
    sets no bound, level 9 (2.6M vertices) being the largest its tests build. Levels up to 6 are built
    once per device and cached; each call returns fresh copies, so callers may modify them in place.
    """
    if isinstance(level, bool) or not isinstance(level, int) or level < 0:
        raise ValueError(f"level must be >= 0: expected an integer in [0, {MAX_LEVEL}], got {level!r}")
    if level > MAX_LEVEL:
        raise ValueError(f"level: expected at most {MAX_LEVEL} (level {level} has {10 * 4**level + 2:,} vertices, "
                         f"{4 ** (level - MAX_LEVEL) * 0.6:g} GB), got {level}")
    device = torch.device("cpu") if device is None else torch.device(device)
    key = (level, str(device))
    if key in _CACHE:
        verts, faces = _CACHE[key]
        return verts.clone(), faces.clone()
    verts, faces = _build(level)
    verts, faces = verts.to(device), faces.to(device)
    if level <= _CACHE_MAX_LEVEL:
        _CACHE[key] = (verts, faces)
        return verts.clone(), faces.clone()
    return verts, faces
