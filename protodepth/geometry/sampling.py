"""Area-weighted uniform point sampling on batches of triangle meshes (PyTorch3D's
`sample_points_from_meshes`, for meshes given as verts (M, V, 3) + faces (F, 3) or (M, F, 3))."""
from __future__ import annotations

import sys
from typing import Optional

import torch

from ._checks import check_mesh_cached, mesh_is_empty
from ._mode import host_reads_allowed


def _face_vertex_index(faces: torch.Tensor, face_idx: torch.Tensor) -> torch.Tensor:
    """faces (F, 3) or (M, F, 3), face_idx (M, S) -> vertex indices (M, S, 3) of the chosen faces."""
    if faces.dim() == 2:
        return faces[face_idx]
    return faces.gather(1, face_idx[..., None].expand(-1, -1, 3))


def _gather_face_verts(verts: torch.Tensor, faces: torch.Tensor, face_idx: torch.Tensor) -> torch.Tensor:
    """-> (M, S, 3 corners, 3 coords), differentiable in verts."""
    m, s = face_idx.shape
    vi = _face_vertex_index(faces, face_idx).reshape(m, s * 3, 1).expand(-1, -1, 3)
    return verts.gather(1, vi).reshape(m, s, 3, 3)


def points_from_barycentrics(verts: torch.Tensor, faces: torch.Tensor, face_idx: torch.Tensor,
                             bary: torch.Tensor) -> torch.Tensor:
    """Points at barycentric coordinates bary (M, S, 3) of faces face_idx (M, S) -> (M, S, 3).

    w0 * a + w1 * b + w2 * c for face corners (a, b, c); differentiable in verts (and bary).
    """
    fv = _gather_face_verts(verts, faces, face_idx)
    return (bary[..., None] * fv).sum(2)


def face_areas(verts: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """verts (M, V, 3), faces (F, 3) or (M, F, 3) -> triangle areas (M, F)."""
    return 0.5 * _doubled_face_areas(verts, faces)


def _doubled_face_areas(verts: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """-> (M, F) twice the triangle areas, |(v1 - v0) x (v2 - v0)|."""
    fv = verts[:, faces] if faces.dim() == 2 else verts.gather(
        1, faces.reshape(faces.shape[0], -1, 1).expand(-1, -1, 3)).reshape(faces.shape[0], -1, 3, 3)
    v0, v1, v2 = fv.unbind(2)
    return torch.linalg.cross(v1 - v0, v2 - v0, dim=-1).norm(dim=-1)


def sample_points_from_meshes(
    verts: torch.Tensor,
    faces: torch.Tensor,
    num_samples: int = 10000,
    return_normals: bool = False,
    return_face_info: bool = False,
    generator: Optional[torch.Generator] = None,
):
    """Sample num_samples points on each mesh, uniformly by area.

    Faces are drawn with probability proportional to their area (with replacement, torch.multinomial),
    then a point uniformly inside the face: u, v ~ U(0, 1), barycentrics
    (1 - sqrt(u), sqrt(u) (1 - v), sqrt(u) v), PyTorch3D's construction. Points are differentiable
    in verts (face choice and barycentrics are not: they are random draws).

    Args:
        verts: (M, V, 3) float vertices; faces: (F, 3) shared or (M, F, 3) int64.
        num_samples: S >= 1 points per mesh.
        return_normals: also return the unit normal of each point's face, (v1 - v0) x (v2 - v1)
            normalised (zero-area faces give a zero vector), as PyTorch3D.
        return_face_info: also return the chosen face indices (M, S) int64 and barycentric
            weights (M, S, 3), so callers can re-evaluate the same samples on other vertices.
        generator: torch.Generator on verts' device, for reproducible draws.
    Degenerate meshes (a choice, made explicit): eagerly, non-finite vertices raise ValueError ("Meshes
    contain nan or inf.", as PyTorch3D) and a mesh whose faces have zero total area raises ValueError
    (PyTorch3D fails inside multinomial). In capture_mode() and under torch.compile, which allow no
    host reads, nothing is raised: such a mesh's faces are drawn uniformly instead, so a finite mesh
    collapsed to zero area yields points on its collapsed faces (finite, with zero normals), and
    non-finite vertices yield non-finite points, which the caller's check of the loss catches.
    Returns:
        points (M, S, 3) alone, or a tuple (points, [normals (M, S, 3)], [face_idx, bary]).
    """
    _check_sampling_input(verts, faces, num_samples)
    m = verts.shape[0]
    with torch.no_grad():
        areas = _face_weights(verts, faces)
        face_idx = torch.multinomial(areas, num_samples, replacement=True, generator=generator)  # (M, S)
        uv = torch.rand(2, m, num_samples, dtype=verts.dtype, device=verts.device, generator=generator)
    return _points_on_faces(verts, faces, face_idx, uv, return_normals, return_face_info)


def sample_points_from_uniforms(verts: torch.Tensor, faces: torch.Tensor, face_u: torch.Tensor,
                                uv: torch.Tensor) -> torch.Tensor:
    """sample_points_from_meshes with the random draws given as tensors (no generator): what torch.compile
    can trace, and what makes two runs (eager and compiled) draw the same points.

    face_u (M, S) uniform in [0, 1) picks each sample's face by inverting the cumulative area (area-weighted
    like multinomial, but not the same faces for the same generator); uv (2, M, S) uniform in [0, 1) places
    the point inside its face as in sample_points_from_meshes. verts (M, V, 3), faces (F, 3) or (M, F, 3)
    -> points (M, S, 3), differentiable in verts. Degenerate meshes as in sample_points_from_meshes.
    """
    m, s = face_u.shape
    _check_sampling_input(verts, faces, s)
    if m != verts.shape[0] or uv.shape != (2, m, s):
        raise ValueError(f"face_u, uv: expected shapes ({verts.shape[0]}, S) and (2, {verts.shape[0]}, S), "
                         f"got {tuple(face_u.shape)} and {tuple(uv.shape)}")
    with torch.no_grad():
        cdf = torch.cumsum(_face_weights(verts, faces), dim=1)  # (M, F)
        # right=True: the first face whose cumulative area exceeds the draw, so zero-area faces are never picked
        face_idx = torch.searchsorted(cdf, face_u.to(cdf.dtype) * cdf[:, -1:], right=True)
        face_idx = face_idx.clamp_(max=cdf.shape[1] - 1)  # a draw rounding up to the total
    return _points_on_faces(verts, faces, face_idx, uv.to(verts.dtype), False, False)


def _check_sampling_input(verts, faces, num_samples) -> None:
    check_mesh_cached(verts, faces)
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples: expected an integer >= 1, got {num_samples!r}")
    if mesh_is_empty(verts, faces):
        raise ValueError(f"verts, faces: Meshes are empty. (M = {verts.shape[0]} meshes of F = {faces.shape[-2]} "
                         f"faces)")


def _face_weights(verts: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """Twice the face areas (M, F) in fp32 to draw faces by, after the degenerate-mesh rule of
    sample_points_from_meshes' docstring (a raise eagerly, uniform weights without host reads). Twice: the
    draws only see ratios of weights, which a factor of 2 leaves exact, and it saves a pass over M x F. On CUDA
    one Triton kernel computes them (areas_triton: a weight may differ from the PyTorch path in its last bit)."""
    vd = verts.detach()
    if vd.is_cuda and _triton_areas(vd.float(), faces):  # one kernel instead of six over (M, F, 3, 3)
        from . import areas_triton

        areas = areas_triton.doubled_face_areas(vd.float(), faces)
    else:
        areas = _doubled_face_areas(vd.float(), faces)  # half inputs accumulate in fp32
    total = areas.sum(1)
    if not host_reads_allowed():
        ok = ((total > 0) & (total < float("inf")))[:, None]  # finite and positive (NaN fails both)
        return torch.where(ok, areas, 1.0)
    # one host read for both checks: non-finite vertices, and meshes whose faces have no area (multinomial
    # would fail on them with an unhelpful message)
    if not bool(torch.isfinite(total).all() & (total > 0).all() & torch.isfinite(vd).all()):
        if not bool(torch.isfinite(vd).all()):
            raise ValueError("verts: Meshes contain nan or inf.")
        bad = (total <= 0).nonzero().flatten().tolist()[:8]
        raise ValueError(f"faces: meshes {bad} have zero total area, cannot sample points on them")
    return areas


def _triton_areas(verts: torch.Tensor, faces: torch.Tensor) -> bool:
    """Whether the sampling weights come from the Triton kernel (CUDA, Triton on, not while torch.compile traces)."""
    if torch.compiler.is_compiling():
        return False
    from . import areas_triton
    from .knn import _use_triton

    return _use_triton() and areas_triton.usable(verts, faces)


def _points_on_faces(verts, faces, face_idx, uv, return_normals: bool, return_face_info: bool):
    """Points at uniform draws uv (2, M, S) inside faces face_idx (M, S) -> what sample_points_from_meshes returns."""
    with torch.no_grad():
        u_sqrt = uv[0].sqrt()
        bary = torch.stack([1.0 - u_sqrt, u_sqrt * (1.0 - uv[1]), u_sqrt * uv[1]], dim=-1)  # (M, S, 3)
    fv = _gather_face_verts(verts, faces, face_idx)  # (M, S, 3, 3)
    points = (bary[..., None] * fv).sum(2)
    out = [points]
    if return_normals:
        v0, v1, v2 = fv.unbind(2)
        n = torch.linalg.cross(v1 - v0, v2 - v1, dim=-1)
        out.append(n / n.norm(dim=-1, keepdim=True).clamp(min=sys.float_info.epsilon))
    if return_face_info:
        out.extend([face_idx, bary])
    return out[0] if len(out) == 1 else tuple(out)
