"""Mesh and point-cloud files (PLY, GLB) through trimesh, with protodepth's conventions: M slot meshes sharing
one topology go into one file, colours are per mesh or per vertex, files appear complete or not at all.

- `write_ply(path, verts, faces, colors, binary)`: M meshes (M, V, 3) with faces (F, 3) -> one PLY.
- `write_glb(path, verts, faces, colors)`: the same as binary glTF (3-D viewers, `wandb.Object3D`).
- `write_point_ply(path, points, colors, binary)`: a coloured point cloud.
- `ply_to_glb(path)`: a mesh PLY -> the same meshes as `.glb` beside it.

trimesh is imported on first use (it takes about half a second).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from protodepth.pictures import TARGET_GREY, as_array, check_shape, slot_colors


def _colors_for(colors: Any, m: int, v: int, name: str) -> np.ndarray:
    """Per-mesh (M, 3), one (3,), or per-vertex (M, V, 3) colours, uint8 or floats in [0, 1] -> (M, V, 3) uint8;
    None: the slot palette, one colour per mesh."""
    if colors is None:
        return np.broadcast_to(slot_colors(max(m, 1))[:m, None, :], (m, v, 3))
    c = np.asarray(colors.detach().cpu().numpy() if hasattr(colors, "detach") else colors)
    if c.dtype.kind == "f":
        c = np.clip(np.round(c * 255), 0, 255)
    c = c.astype(np.uint8)
    if c.shape == (3,):
        return np.broadcast_to(c, (m, v, 3))
    if c.shape == (m, 3):
        return np.broadcast_to(c[:, None, :], (m, v, 3))
    if c.shape == (m, v, 3) or (m == 1 and c.shape == (v, 3)):
        return c.reshape(m, v, 3)
    raise ValueError(f"{name}: expected (3,), ({m}, 3) per mesh or ({m}, {v}, 3) per vertex, got {c.shape}")


def _save(path: str | os.PathLike, data: bytes) -> Path:
    """Write through a temporary name and rename, so a reader (a viewer, W&B's uploader) never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return path


def _mesh(verts: Any, faces: Any, colors: Any):
    """(M, V, 3) or (V, 3) verts, (F, 3) faces shared by the M meshes -> one trimesh.Trimesh (faces offset per
    mesh, vertex colours), built without trimesh's processing so vertex order and count are kept."""
    import trimesh

    v = as_array(verts, "verts")
    if v.ndim == 2:
        v = v[None]
    check_shape("verts", v, (3,), 3, "(M, V, 3) or (V, 3)")
    fc = as_array(faces, "faces", np.int64)
    check_shape("faces", fc, (2,), 3, "(F, 3)")
    M, V, _ = v.shape
    if fc.size and (fc.min() < 0 or fc.max() >= V):
        raise ValueError(f"faces: indices must lie in [0, {V}), got [{fc.min()}, {fc.max()}]")
    if not np.isfinite(v).all():
        raise ValueError("verts: contains NaN or inf")
    col = _colors_for(colors, M, V, "colors").reshape(-1, 3)
    all_faces = (fc[None] + (np.arange(M) * V)[:, None, None]).reshape(-1, 3)
    return trimesh.Trimesh(v.reshape(-1, 3), all_faces, vertex_colors=col, process=False, validate=False)


def write_ply(path: str | os.PathLike, verts: Any, faces: Any, colors: Any = None, binary: bool = True) -> Path:
    """Write M meshes sharing one topology as one PLY with vertex colours (RGBA, alpha 255).

    verts (M, V, 3) or (V, 3) float; faces (F, 3) int indices into V (shared by every mesh; offset per mesh
    here); colors: None (slot palette, one colour per mesh), (3,) for all, (M, 3) per mesh, or (M, V, 3) per
    vertex, uint8 or floats in [0, 1]. Binary little-endian by default (a level-4 scene of 32 slots is
    ~80 k vertices: 1.6 MB binary, ~3x that in ASCII). Returns the path.
    """
    mesh = _mesh(verts, faces, colors)
    return _save(path, mesh.export(file_type="ply", encoding="binary" if binary else "ascii"))


def write_glb(path: str | os.PathLike, verts: Any, faces: Any, colors: Any = None) -> Path:
    """The meshes of `write_ply` (same arguments) as one binary glTF file (.glb) with vertex colours: what
    web viewers, Blender and `wandb.Object3D` open. Returns the path."""
    return _save(path, _mesh(verts, faces, colors).export(file_type="glb"))


def write_point_ply(path: str | os.PathLike, points: Any, colors: Any = None, binary: bool = True) -> Path:
    """Write a coloured point cloud: points (N, 3), colors (N, 3) or (3,) (uint8 or floats in [0, 1]; None:
    grey). Non-finite points are dropped; a cloud with no finite point is refused. Returns the path."""
    import trimesh

    p = as_array(points, "points").reshape(-1, 3)
    col = _colors_for(TARGET_GREY if colors is None else colors, 1, p.shape[0], "colors")[0]
    ok = np.isfinite(p).all(axis=1)
    if not ok.any():
        raise ValueError(f"points: no finite point to write to {path}")
    cloud = trimesh.PointCloud(p[ok], colors=col[ok])
    return _save(path, cloud.export(file_type="ply", encoding="binary" if binary else "ascii"))


def ply_to_glb(path: str | os.PathLike) -> Path:
    """A mesh PLY (e.g. from `write_ply`) -> the same meshes and vertex colours as `<stem>.glb` beside it."""
    import trimesh

    path = Path(path)
    mesh = trimesh.load(path, file_type="ply", process=False)
    return _save(path.with_suffix(".glb"), mesh.export(file_type="glb"))
