"""Chamfer distance between batches of padded point clouds, PyTorch3D 0.7.9's `chamfer_distance`.

Uses knn_points (K = 1) in each direction, so it never builds a dense distance matrix. Rules kept
from PyTorch3D: point_reduction in {"mean", "sum", "max", None}, batch_reduction in {"mean", "sum",
None}; point_reduction=None requires batch_reduction=None and then returns per-point terms
((N, P1), (N, P2)) or (N, P1) when single_directional; "max" (Hausdorff-like) refuses normals;
"mean" divides by each cloud's length (clamped to 1); weights (N,) scale batch elements and turn the
batch "mean" into a division by their sum.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ._checks import check_norm, check_points, check_reduction, fill_lengths
from ._mode import host_reads_allowed
from .knn import knn_gather, knn_points


def _check_cloud(name: str, x, shape_doc: str) -> None:
    """A padded cloud (N, P, D), worded as PyTorch3D where its tests match the text."""
    if not torch.is_tensor(x):
        raise ValueError(f"{name}: expected a torch.Tensor of shape {shape_doc} (PyTorch3D also takes Pointclouds "
                         f"objects or torch.Tensor; protodepth takes tensors), got {type(x).__name__}")
    if x.dim() != 3:
        raise ValueError(f"{name}: Expected points to be of shape {shape_doc}, got shape {tuple(x.shape)}")
    check_points(name, x, shape_doc)


def _validate_reductions(batch_reduction, point_reduction) -> None:
    check_reduction("batch_reduction", batch_reduction, ("mean", "sum", None))
    check_reduction("point_reduction", point_reduction, ("mean", "sum", "max", None))
    if point_reduction is None and batch_reduction is not None:
        raise ValueError(
            f"batch_reduction: must be None when point_reduction is None (per-point terms cannot be "
            f"reduced over the batch), got {batch_reduction!r}")


def _single_direction(x, y, x_lengths, y_lengths, x_normals, y_normals, weights, point_reduction, norm, abs_cosine):
    return_normals = x_normals is not None and y_normals is not None
    n, p1, _ = x.shape
    x_pad = torch.arange(p1, device=x.device)[None] >= x_lengths[:, None]  # (N, P1)
    cham_norm_x = x.new_zeros(())
    nn = knn_points(x, y, lengths1=x_lengths, lengths2=y_lengths, norm=norm, K=1)
    cham_x = nn.dists[..., 0].masked_fill(x_pad, 0.0)  # (N, P1)
    if weights is not None:
        cham_x = cham_x * weights.view(n, 1)
    if return_normals:
        near = knn_gather(y_normals, nn.idx, y_lengths)[..., 0, :]
        cos = F.cosine_similarity(x_normals, near, dim=2, eps=1e-6)
        cham_norm_x = (1 - (torch.abs(cos) if abs_cosine else cos)).masked_fill(x_pad, 0.0)
        if weights is not None:
            cham_norm_x = cham_norm_x * weights.view(n, 1)

    if point_reduction == "max":
        cham_x = cham_x.max(1).values  # (N,)
    elif point_reduction is not None:
        cham_x = cham_x.sum(1)
        if return_normals:
            cham_norm_x = cham_norm_x.sum(1)
        if point_reduction == "mean":
            denom = x_lengths.clamp(min=1).to(cham_x.dtype)
            cham_x = cham_x / denom
            if return_normals:
                cham_norm_x = cham_norm_x / denom
    return cham_x, (cham_norm_x if return_normals else None)


def _zero_weights_result(x, weights, batch_reduction):
    """PyTorch3D's answer when every weight is 0: zeros that keep the graph, for loss_normals too (normals
    or not): scalars with a batch reduction, else (N, N) (PyTorch3D broadcasts (N,) against (N, 1)). In
    capture_mode and under torch.compile (no host read can notice all-zero weights) the general path
    runs instead and gives zeros of the usual shapes."""
    per = x.sum((1, 2)) * weights.view(-1, 1) * 0.0  # (N, N)
    if batch_reduction is None:
        return per, per.clone()
    return per.sum(), per.sum()


def _batch_reduce(loss, loss_normals, weights, batch_reduction):
    if batch_reduction is None:
        return loss, loss_normals
    n = loss.shape[0]
    loss = loss.sum()
    if loss_normals is not None:
        loss_normals = loss_normals.sum()
    if batch_reduction == "mean":
        if weights is None:
            div = max(n, 1)
        else:
            wsum = weights.sum()
            div = torch.where(wsum == 0.0, torch.ones_like(wsum), wsum)  # no host read
        loss = loss / div
        if loss_normals is not None:
            loss_normals = loss_normals / div
    return loss, loss_normals


def chamfer_distance(
    x: torch.Tensor,
    y: torch.Tensor,
    x_lengths: Optional[torch.Tensor] = None,
    y_lengths: Optional[torch.Tensor] = None,
    x_normals: Optional[torch.Tensor] = None,
    y_normals: Optional[torch.Tensor] = None,
    weights: Optional[torch.Tensor] = None,
    batch_reduction: Optional[str] = "mean",
    point_reduction: Optional[str] = "mean",
    norm: int = 2,
    single_directional: bool = False,
    abs_cosine: bool = True,
):
    """Chamfer distance between padded clouds x (N, P1, D) and y (N, P2, D).

    For each valid point of x the distance (squared L2 for norm 2, L1 for norm 1) to its nearest
    valid point of y, and (unless single_directional) the same from y to x, reduced over points
    and then over the batch. With x_normals (N, P1, D) and y_normals (N, P2, D), also
    1 - |cos| (1 - cos without abs_cosine) between each point's normal and its neighbour's.

    Returns (loss, loss_normals): scalars with a batch reduction; (N,) with batch_reduction=None;
    with point_reduction=None per-point terms, a pair ((N, P1), (N, P2)) or (N, P1) when
    single_directional. loss_normals is None without normals. Padded points contribute 0.
    float32 for half inputs (knn_points' rule).
    """
    _validate_reductions(batch_reduction, point_reduction)
    check_norm(norm)
    if point_reduction == "max" and (x_normals is not None or y_normals is not None):
        raise ValueError('x_normals, y_normals: must be None when point_reduction is "max"')
    _check_cloud("x", x, "(N, P1, D)")
    _check_cloud("y", y, "(N, P2, D)")
    if y.shape[0] != x.shape[0] or y.shape[2] != x.shape[2]:
        raise ValueError(f"y: expected shape ({x.shape[0]}, P2, {x.shape[2]}) to match x {tuple(x.shape)}, got {tuple(y.shape)}")
    n = x.shape[0]
    x_lengths = fill_lengths("x_lengths", x_lengths, n, x.shape[1], x.device)
    y_lengths = fill_lengths("y_lengths", y_lengths, n, y.shape[1], x.device)
    for name, nrm, pts in (("x_normals", x_normals, x), ("y_normals", y_normals, y)):
        if nrm is not None:
            shape = tuple(nrm.shape) if torch.is_tensor(nrm) else type(nrm).__name__
            if not torch.is_tensor(nrm) or nrm.shape != pts.shape:
                raise ValueError(f"{name}: Expected normals to be of shape (N, P, D) = {tuple(pts.shape)}, its "
                                 f"points' shape, got {shape}")
            check_points(name, nrm, "(N, P, D)")
    if weights is not None:
        if not torch.is_tensor(weights) or weights.shape != (n,):
            shape = tuple(weights.shape) if torch.is_tensor(weights) else type(weights).__name__
            raise ValueError(f"weights: expected shape ({n},), got {shape}")
        if host_reads_allowed():
            if not bool((weights >= 0).all()):
                raise ValueError("weights: must be >= 0")
            if bool(weights.sum() == 0.0):
                return _zero_weights_result(x, weights, batch_reduction)

    cham_x, cham_norm_x = _single_direction(
        x, y, x_lengths, y_lengths, x_normals, y_normals, weights, point_reduction, norm, abs_cosine)
    if single_directional:
        loss, loss_normals = cham_x, cham_norm_x
    else:
        cham_y, cham_norm_y = _single_direction(
            y, x, y_lengths, x_lengths, y_normals, x_normals, weights, point_reduction, norm, abs_cosine)
        if point_reduction == "max":
            loss, loss_normals = torch.maximum(cham_x, cham_y), None
        elif point_reduction is not None:
            loss = cham_x + cham_y
            loss_normals = cham_norm_x + cham_norm_y if cham_norm_x is not None else None
        else:
            loss = (cham_x, cham_y)
            loss_normals = (cham_norm_x, cham_norm_y) if cham_norm_x is not None else None
    return _batch_reduce(loss, loss_normals, weights, batch_reduction)
