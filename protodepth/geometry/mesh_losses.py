"""Mesh regularisers equal to PyTorch3D's `mesh_edge_loss`, `mesh_normal_consistency` and
`mesh_laplacian_smoothing` on the matching `Meshes` batch.

A batch is verts (M, V, 3) with faces (F, 3) shared by every mesh, or (M, F, 3) one per mesh (then
the meshes are packed into one vertex list, as PyTorch3D does). Every loss is a per-mesh mean over
its elements (unique edges, pairs of faces sharing an edge, vertices) averaged over the M meshes.
An empty batch (M = 0 or F = 0) gives PyTorch3D's answer: tensor([0.]), shape (1,), that requires grad.

The index structures depend on the faces only, and the trainer passes the same faces tensor every
step, so they are cached per faces tensor (keyed by identity and in-place version, so editing the
faces in place invalidates the entry), together with the per-element weights of the means.

Vertices are read with one `index_select` per loss (all the corners a loss needs, in one index list),
never with advanced indexing (`v[:, idx]`): the backward of `index_select` is one `index_add`, while
that of advanced indexing sorts the indices on every step (several radix-sort kernels on the GPU).
"""
from __future__ import annotations

import weakref
from collections import OrderedDict
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ._checks import check_mesh, mesh_is_empty


def unique_edges(faces: torch.Tensor, num_verts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch3D's `edges_packed` and `faces_packed_to_edges_packed` for faces (F, 3) int64.

    Returns edges (E, 2) with edges[:, 0] < edges[:, 1], sorted ascending by (v0, v1), and
    face_to_edge (F, 3) whose columns index the edges (v1, v2), (v2, v0), (v0, v1) of each face.
    """
    n_faces = faces.shape[0]
    v0, v1, v2 = faces.unbind(1)
    # this concatenation order (e12, e20, e01) defines face_to_edge's column order in PyTorch3D
    all_edges = torch.cat([torch.stack([v1, v2], 1), torch.stack([v2, v0], 1), torch.stack([v0, v1], 1)], 0)
    all_edges, _ = all_edges.sort(dim=1)
    edge_hash = num_verts * all_edges[:, 0] + all_edges[:, 1]
    uniq, inverse = torch.unique(edge_hash, return_inverse=True)
    edges = torch.stack([uniq // num_verts, uniq % num_verts], dim=1)
    return edges, inverse.reshape(3, n_faces).t()


class _Topology(NamedTuple):
    num_meshes: int  # meshes packed into this topology (1 when faces are shared)
    verts_per_mesh: int
    edges: torch.Tensor  # (E, 2) unique edges of the packed vertex list
    edge_mesh: torch.Tensor  # (E,) mesh of each edge
    edge_count: torch.Tensor  # (num_meshes,) unique edges per mesh
    nc_edge: torch.Tensor  # (3F,) edge of each (face, edge) incidence, sorted by edge
    nc_face_verts: torch.Tensor  # (3F, 3) the face's vertices for each incidence
    nc_pairs: torch.Tensor  # (Q, 2) incidences sharing an edge (i < j within the edge's group)
    nc_pair_mesh: torch.Tensor  # (Q,)
    nc_pair_count: torch.Tensor  # (num_meshes,)
    degree: torch.Tensor  # (V_packed,) number of unique edges at each vertex
    edge_corners: torch.Tensor  # (2E,) edges.reshape(-1): both ends of every edge, for one index_select
    nc_corners: torch.Tensor  # (3F*5,) per incidence: its edge's two ends, then its face's three vertices
    nc_pairs_flat: torch.Tensor  # (2Q,) nc_pairs.reshape(-1)
    lap_src: torch.Tensor  # (2E,) uniform Laplacian: neighbour read ...
    lap_dst: torch.Tensor  # (2E,) ... and the vertex it is added to (e1 -> e0, then e0 -> e1)
    edge_weight: torch.Tensor  # (E,) float32 1 / (edge count of the edge's mesh)
    nc_weight: torch.Tensor  # (Q,) float32 1 / (pair count of the pair's mesh)
    vert_weight: torch.Tensor  # (V_packed,) float32 1 / verts_per_mesh


def _pairs_within_groups(counts: torch.Tensor) -> torch.Tensor:
    """counts (E,) group sizes of consecutive items -> (Q, 2) all (i, j), i < j, inside each group.

    Vectorised form of PyTorch3D's `mesh_normal_consistency_find_verts` (same set of pairs).
    """
    if counts.numel() == 0 or int(counts.max()) < 2:
        return torch.zeros((0, 2), dtype=torch.int64, device=counts.device)
    cmax = int(counts.max())
    starts = torch.cumsum(counts, 0) - counts
    ii, jj = torch.triu_indices(cmax, cmax, offset=1, device=counts.device)
    keep = jj[None, :] < counts[:, None]  # (E, cmax*(cmax-1)/2)
    first = (starts[:, None] + ii[None, :])[keep]
    second = (starts[:, None] + jj[None, :])[keep]
    return torch.stack([first, second], dim=1)


def _build_topology(faces: torch.Tensor, num_verts: int) -> _Topology:
    if faces.dim() == 3:
        m = faces.shape[0]
        offsets = torch.arange(m, device=faces.device)[:, None, None] * num_verts
        packed = (faces + offsets).reshape(-1, 3)
    else:
        m = 1
        packed = faces
    total_verts = m * num_verts
    n_faces = packed.shape[0]
    edges, face_to_edge = unique_edges(packed, total_verts)
    edge_mesh = edges[:, 0] // num_verts
    edge_count = torch.bincount(edge_mesh, minlength=m)

    nc_edge = face_to_edge.reshape(n_faces * 3)
    nc_face_verts = packed[:, None, :].expand(n_faces, 3, 3).reshape(n_faces * 3, 3)
    # stable sort: PyTorch3D's order inside an edge's group is unspecified, and the loss of a pair is
    # symmetric in its two faces, so any order gives the same value
    nc_edge, order = torch.sort(nc_edge, stable=True)
    nc_face_verts = nc_face_verts[order]
    nc_pairs = _pairs_within_groups(torch.bincount(nc_edge, minlength=edges.shape[0]))
    nc_pair_mesh = nc_face_verts[nc_pairs[:, 0], 0] // num_verts
    nc_pair_count = torch.bincount(nc_pair_mesh, minlength=m)

    degree = torch.bincount(edges.reshape(-1), minlength=total_verts)
    e0, e1 = edges.unbind(1)
    nc_corners = torch.cat([edges[nc_edge], nc_face_verts], dim=1).reshape(-1)  # (3F, 5) flattened
    vert_count = torch.full((m,), num_verts, device=faces.device)
    vert_mesh = torch.arange(total_verts, device=faces.device) // num_verts
    return _Topology(m, num_verts, edges, edge_mesh, edge_count, nc_edge, nc_face_verts, nc_pairs,
                     nc_pair_mesh, nc_pair_count, degree, edges.reshape(-1), nc_corners, nc_pairs.reshape(-1),
                     torch.cat([e1, e0]), torch.cat([e0, e1]), _mean_weights(edge_mesh, edge_count),
                     _mean_weights(nc_pair_mesh, nc_pair_count), _mean_weights(vert_mesh, vert_count))


def _mean_weights(mesh_id: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """(X,) float32 weight of each element in its mesh's mean: 1 / (its mesh's element count)."""
    return 1.0 / counts[mesh_id].to(torch.float32)


_TOPO_CACHE: "OrderedDict[tuple, tuple[weakref.ref, _Topology]]" = OrderedDict()
_TOPO_CACHE_SIZE = 16


def cached_topologies() -> list:
    """The topologies cached now. A CUDA graph that replays the mesh losses reads their tensors by address,
    so it must keep them alive even after this cache evicts them (cuda_graphs.GraphedStep holds them)."""
    return [topo for _, topo in _TOPO_CACHE.values()]


def _topology(verts: torch.Tensor, faces: torch.Tensor) -> _Topology:
    """Validated, cached topology for this faces tensor and vertex count."""
    key = (id(faces), faces._version, verts.shape[1], tuple(faces.shape), str(faces.device))
    hit = _TOPO_CACHE.get(key)
    if hit is not None and hit[0]() is faces:
        _TOPO_CACHE.move_to_end(key)
        return hit[1]
    check_mesh(verts, faces, check_index_range=True)
    with torch.no_grad():
        topo = _build_topology(faces.detach(), verts.shape[1])
    _TOPO_CACHE[key] = (weakref.ref(faces), topo)
    while len(_TOPO_CACHE) > _TOPO_CACHE_SIZE:
        _TOPO_CACHE.popitem(last=False)
    return topo


def _prepare(verts, faces) -> tuple[torch.Tensor, _Topology]:
    """-> (verts (R, V', 3), topology): R = M with shared faces, R = 1 and V' = M*V when packed."""
    topo = _topology(verts, faces)
    if faces.dim() == 3:
        verts = verts.reshape(1, -1, 3)
    return verts, topo


def _empty_loss(verts: torch.Tensor) -> torch.Tensor:
    """PyTorch3D's loss of an empty batch: tensor([0.]) that requires grad. Tied to verts' graph when verts
    requires grad (a zero gradient reaches it), through an empty slice so that NaN vertices stay out of it."""
    zero = verts.new_zeros(1)
    if verts.requires_grad:
        return zero + verts.reshape(-1)[:0].sum()
    return zero.requires_grad_()


def _dispatch(verts, faces, kind: str, target_length: float) -> torch.Tensor:
    """Validate, answer an empty batch, then evaluate the loss `kind`: directly, or through the custom op
    `protodepth::mesh_loss` while torch.compile traces (the topology cache can't be traced)."""
    check_mesh(verts, faces, check_index_range=False)
    if mesh_is_empty(verts, faces):
        return _empty_loss(verts)
    if torch.compiler.is_compiling():
        return torch.ops.protodepth.mesh_loss(verts, faces, kind, target_length)
    return eager_mesh_loss(verts, faces, kind, target_length)


def eager_mesh_loss(verts: torch.Tensor, faces: torch.Tensor, kind: str, target_length: float) -> torch.Tensor:
    """The loss `kind` ("edge", "normal", or a Laplacian method) of a validated, non-empty batch -> ()."""
    if kind == "edge":
        return _edge_loss(verts, faces, target_length)
    if kind == "normal":
        return _normal_consistency(verts, faces)
    return _laplacian_smoothing(verts, faces, kind)


def _per_mesh_mean(values: torch.Tensor, weights: torch.Tensor, num_meshes: int) -> torch.Tensor:
    """values (R, X) with element weights (X,) float32 (1 / count of the element's mesh) -> () sum_x values *
    weight / num_meshes.

    This is PyTorch3D's weighting: each mesh's elements weigh 1 / (its element count), then the
    sum is divided by the batch size.
    """
    if weights.dtype != values.dtype:  # the cached weights are float32; 1 / count rounded once in values' dtype
        weights = (1.0 / weights.double()).round().to(values.dtype).reciprocal()
    return (values * weights).sum() / num_meshes


def mesh_edge_loss(verts: torch.Tensor, faces: torch.Tensor, target_length: float = 0.0) -> torch.Tensor:
    """Mean over meshes of the mean over unique edges of (|v_i - v_j| - target_length)^2.

    verts (M, V, 3), faces (F, 3) or (M, F, 3) int64 -> () loss, differentiable in verts ((1,) zero when
    the batch is empty).
    """
    return _dispatch(verts, faces, "edge", float(target_length))


def _edge_loss(verts: torch.Tensor, faces: torch.Tensor, target_length: float) -> torch.Tensor:
    v, topo = _prepare(verts, faces)
    # unbind, not indexing: its backward is one stack, that of each index a zero-filled copy plus an add
    a, b = v.index_select(1, topo.edge_corners).view(v.shape[0], -1, 2, 3).unbind(2)  # (R, E, 3) each
    lengths = (a - b).norm(dim=-1, p=2)  # (R, E)
    loss = (lengths - target_length) ** 2
    return _per_mesh_mean(loss, topo.edge_weight, verts.shape[0])


def mesh_normal_consistency(verts: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """Mean over meshes of the mean over face pairs sharing an edge of 1 - cos(n0, n1).

    Each face's normal is taken relative to the shared edge (v0 < v1): n = (v1 - v0) x (w - v0),
    w the face's third vertex, and the second face's normal is negated so that a flat fold gives 0,
    exactly PyTorch3D's construction (non-manifold edges give all pairs of their faces).
    verts (M, V, 3), faces (F, 3) or (M, F, 3) int64 -> () loss, differentiable in verts ((1,) zero when
    the batch is empty).
    """
    return _dispatch(verts, faces, "normal", 0.0)


def _normal_consistency(verts: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    v, topo = _prepare(verts, faces)
    if topo.nc_pairs.shape[0] == 0:
        return verts.sum() * 0.0  # no shared edge anywhere: zero that still has a graph
    r = v.shape[0]
    # (R, 3F, 3) each: the edge's ends, the face's vertices (unbind: one stack in backward)
    v0, v1, w0, w1, w2 = v.index_select(1, topo.nc_corners).view(r, -1, 5, 3).unbind(2)
    d = v1 - v0
    # the two edge vertices contribute exactly zero; kept to mirror PyTorch3D's arithmetic
    n = (torch.linalg.cross(d, w0 - v0, dim=-1) + torch.linalg.cross(d, w1 - v0, dim=-1)
         + torch.linalg.cross(d, w2 - v0, dim=-1))
    n0, n1 = n.index_select(1, topo.nc_pairs_flat).view(r, -1, 2, 3).unbind(2)  # (R, Q, 3) each
    loss = 1 - F.cosine_similarity(n0, -n1, dim=-1)  # (R, Q)
    return _per_mesh_mean(loss, topo.nc_weight, verts.shape[0])


def mesh_laplacian_smoothing(verts: torch.Tensor, faces: torch.Tensor, method: str = "uniform") -> torch.Tensor:
    """Mean over meshes of the mean over vertices of |L v|, PyTorch3D's three Laplacians.

    - "uniform": (L v)_i = mean of v_i's edge neighbours - v_i.
    - "cot": (sum_j w_ij v_j) / (sum_j w_ij) - v_i with cotangent weights w_ij (where the weight
      sum is <= 0 it is used as is, not inverted, as in PyTorch3D).
    - "cotcurv": (sum_j w_ij (v_j - v_i)) / (4 * area around v_i).
    As in PyTorch3D the weights are computed without gradient: gradients flow through the v in
    L v only. verts (M, V, 3), faces (F, 3) or (M, F, 3) int64 -> () loss ((1,) zero when the batch is empty).
    """
    if method not in ("uniform", "cot", "cotcurv"):
        raise ValueError(f"method: expected one of ['uniform', 'cot', 'cotcurv'], got {method!r}")
    return _dispatch(verts, faces, method, 0.0)


def _laplacian_smoothing(verts: torch.Tensor, faces: torch.Tensor, method: str) -> torch.Tensor:
    v, topo = _prepare(verts, faces)
    r, nv = v.shape[0], v.shape[1]
    if method == "uniform":
        # sum of the neighbours: e1 added at e0, then e0 at e1, in one index_add (the same order of additions)
        nbr = torch.zeros_like(v).index_add(1, topo.lap_dst, v.index_select(1, topo.lap_src))
        deg = topo.degree.to(v.dtype)
        inv_deg = torch.where(deg > 0, 1.0 / deg.clamp_min(1), torch.zeros_like(deg))
        lap = nbr * inv_deg[None, :, None] - v
    else:
        packed = faces.reshape(-1, 3) if faces.dim() == 2 else (
            faces + torch.arange(faces.shape[0], device=faces.device)[:, None, None] * faces.new_tensor(verts.shape[1])
        ).reshape(-1, 3)
        with torch.no_grad():
            w, inv_areas = _cot_weights(v.detach(), packed)  # (R, F, 3), (R, V')
            ii = packed[:, [1, 2, 0]].reshape(-1)
            jj = packed[:, [2, 0, 1]].reshape(-1)
            wf = w.reshape(r, -1)
            row_sum = torch.zeros(r, nv, dtype=v.dtype, device=v.device).index_add(1, ii, wf).index_add(1, jj, wf)
        # L is symmetric: entry (i, j) and (j, i) both carry w
        lv = torch.zeros_like(v).index_add(1, ii, wf[..., None] * v.index_select(1, jj)).index_add(
            1, jj, wf[..., None] * v.index_select(1, ii))
        if method == "cot":
            norm_w = torch.where(row_sum > 0, 1.0 / torch.where(row_sum > 0, row_sum, torch.ones_like(row_sum)), row_sum)
            lap = lv * norm_w[..., None] - v
        else:
            lap = (lv - row_sum[..., None] * v) * (0.25 * inv_areas)[..., None]
    loss = lap.norm(dim=-1)  # (R, V')
    return _per_mesh_mean(loss, topo.vert_weight, verts.shape[0])


def _cot_weights(v: torch.Tensor, faces: torch.Tensor, eps: float = 1e-12) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch3D's `cot_laplacian` pieces, batched: v (R, V, 3), faces (F, 3) ->
    (w (R, F, 3): cot/4 of the angle at vertex k, for the edge opposite it; inv_areas (R, V))."""
    fv = v[:, faces]  # (R, F, 3, 3)
    v0, v1, v2 = fv.unbind(2)
    a = (v1 - v2).norm(dim=-1)
    b = (v0 - v2).norm(dim=-1)
    c = (v0 - v1).norm(dim=-1)
    s = 0.5 * (a + b + c)
    area = (s * (s - a) * (s - b) * (s - c)).clamp(min=eps).sqrt()  # Heron, as PyTorch3D
    a2, b2, c2 = a * a, b * b, c * c
    cot = torch.stack([(b2 + c2 - a2) / area, (a2 + c2 - b2) / area, (a2 + b2 - c2) / area], dim=-1) / 4.0
    inv_areas = torch.zeros(v.shape[0], v.shape[1], dtype=v.dtype, device=v.device)
    inv_areas.index_add_(1, faces.reshape(-1), area[..., None].expand(-1, -1, 3).reshape(v.shape[0], -1))
    inv_areas = torch.where(inv_areas > 0, 1.0 / torch.where(inv_areas > 0, inv_areas, torch.ones_like(inv_areas)), inv_areas)
    return cot, inv_areas
