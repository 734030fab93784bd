"""Sort a point cloud once, search it several times: the two KNN directions of a Chamfer term.

`knn_points(p1, p2)` on CUDA sorts both clouds along a Morton curve (5 Triton launches, a zeroing and a cumsum)
before its pruned search. A Chamfer loss searches the same two clouds twice (p1 -> p2 and p2 -> p1), so it sorted
each cloud twice; and a target cloud that does not depend on the model can be sorted before the model runs (on a
side stream, beside the backbone). Here a cloud is sorted once:

    tgt = sort_cloud(target, lengths)            # (B, N, 3): may run early, on another stream
    prd = sort_cloud(pred, grid=tgt)             # (B, M, 3), on the target's Morton grid
    s = knn_points_sorted(prd, tgt, K=1)         # = knn_points(pred, target, lengths2=lengths, K=1)
    g = knn_points_sorted(tgt, prd, K=3)         # = knn_points(target, pred, lengths1=lengths, K=3)

Each search then costs 2 launches (tile order, search) plus its backward; a large cloud (the target) is also tiled in
64 points for the K = 1 searches that take it as candidates (one launch more in its sort, half the tile order of the
slot direction). The searches of presorted clouds take the look-ahead walk kernel (`knn_triton._walk_choice`). The
results equal `knn_points`' (indices
too, except between candidates at exactly equal distance, where both return the lower index; gradients the same
kernels). Where the sorted path does not apply (CPU, no Triton, torch.compile tracing, small clouds, K > 32, D > 16)
`sort_cloud` keeps the cloud unsorted and `knn_points_sorted` is `knn_points`.

Streams: a cloud sorted on one stream and searched on another needs the usual care: the searching stream waits for
the sorting one, and `SortedCloud.tensors()` (the points, lengths and the sort's buffers) are record_stream'ed on
it, or kept alive otherwise, until it is done.
"""
from __future__ import annotations

from typing import Optional

import torch

from ._checks import check_norm, check_points, check_same_batch, check_same_last_dim
from .knn import KNN, _lengths, _use_triton, knn_gather, knn_points

__all__ = ["SortedCloud", "sort_cloud", "knn_points_sorted"]

# clouds with fewer points (N * P) stay unsorted (their searches are small enough for the one-launch brute force).
# H200, the training step's KNN pair at B = 2 (6 400 predicted points against 10 000 targets, N * P = 12 800 and
# 20 000), graph replay: both clouds sorted 0.21-0.23 ms (target sorted beforehand), brute force 0.42 ms
SORT_MIN_POINTS = 1 << 13
# clouds of more points than this (per cloud, P) are also tiled in 64 points for K = 1 searches that take them as
# candidates: half the candidate tiles, so half the keys each row of the tile order sorts. H200, the training step's
# pair (this session's run 2, graph replays): slot direction (3 200 predicted points against 20 000 targets per image,
# B = 32) 0.265 -> 0.181 ms (tile order 0.063 -> 0.022, search 0.112 -> 0.092); pair 0.529 -> 0.499; B = 2 (10 000
# targets) slot 0.084 -> 0.077. K > 1 searches keep the 32-point tiles (their walk over 64 candidates holds 166
# registers per thread)
CANDIDATE_TILE_64_MIN_POINTS = 1 << 13


class SortedCloud:
    """A padded cloud (points (N, P, D), lengths (N,) int64) and, where the sorted search applies, its Morton-sorted
    copy (`knn_triton.SortedTiles`). Made by `sort_cloud`."""

    __slots__ = ("points", "lengths", "tiles", "ctiles", "_given")

    def __init__(self, points: torch.Tensor, lengths: torch.Tensor, tiles, given: bool, ctiles=None):
        # tiles: the cloud as queries; ctiles: as candidates (the same sorted copy in larger tiles), None: tiles
        self.points, self.lengths, self.tiles, self._given = points, lengths, tiles, given
        self.ctiles = ctiles if ctiles is not None else tiles

    @property
    def is_sorted(self) -> bool:
        return self.tiles is not None

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """Every tensor a search of this cloud reads (points, lengths, the sorted copy and its tables)."""
        out = (self.points, self.lengths)
        if self.tiles is not None:
            out += (self.tiles.xs, self.tiles.perm, self.tiles.box, self.tiles.part, self.ctiles.box)
        return out

    def lengths_arg(self) -> Optional[torch.Tensor]:
        """The lengths as `knn_points` takes them: None where the caller gave none (all points valid)."""
        return self.lengths if self._given else None


def _sortable(points: torch.Tensor, sort: Optional[bool]) -> bool:
    if sort is False or torch.compiler.is_compiling() or not _use_triton():
        return False
    from .knn_triton import MAX_D, _interpreting

    # CPU tensors only under Triton's interpreter, and only when asked (tests)
    if not (points.is_cuda or (sort and _interpreting())):
        return False

    n, p, d = points.shape
    if d > MAX_D or n * p >= (1 << 30):
        return False
    return bool(sort) or n * p >= SORT_MIN_POINTS


def _default_candidate_tile(p: int, tile: int) -> int:
    """The candidate tile of a cloud of p points per cloud sorted in query tiles of `tile` points (sort_cloud)."""
    return 64 if tile == 32 and p > CANDIDATE_TILE_64_MIN_POINTS else tile


def sort_cloud(points: torch.Tensor, lengths: Optional[torch.Tensor] = None, sort: Optional[bool] = None, *,
               grid: Optional[SortedCloud] = None, tile: Optional[int] = None,
               candidate_tile: Optional[int] = None) -> SortedCloud:
    """points (N, P, D) padded, lengths (N,) integer valid points per cloud (None: all) -> SortedCloud.

    On CUDA with Triton the cloud is sorted here (no host sync; capturable in a CUDA graph) when sort is True, or
    when sort is None and N * P >= SORT_MIN_POINTS. The points are not copied: the result keeps them, and gradients
    of `knn_points_sorted` flow into them. tile: points per tile of the sorted search, 32 or 64 (None: 32; 16 under
    Triton's interpreter): the query tile where this cloud holds the queries (32 points per warp), the candidate
    tile where it holds the candidates. grid: a cloud sorted earlier (same batch) whose Morton grid this one is
    sorted on (one launch fewer; both clouds' tiles then follow the same cells, which prunes better when one cloud
    lies inside the other's box, e.g. predicted points inside the target scene); ignored where grid is unsorted.
    candidate_tile: where this cloud holds the candidates, tiles of this many points instead (16, 32 or 64; one
    more launch): larger candidate tiles mean fewer steps of the search's walk, smaller query tiles prune better.
    None: 64 where P > CANDIDATE_TILE_64_MIN_POINTS and the query tile is 32 (used by K = 1 searches only; K > 1
    searches take such a cloud's 32-point tiles), else the query tile.
    """
    for name, t in (("tile", tile), ("candidate_tile", candidate_tile)):
        if t is not None and t not in (16, 32, 64):
            raise ValueError(f"{name}: expected 16, 32 or 64, got {t!r}")
    check_points("points", points, "(N, P, D)")
    n, p, _ = points.shape
    given = lengths is not None
    lengths = _lengths("lengths", lengths, n, p, points.device)
    tiles = ctiles = None
    if _sortable(points, sort):
        from .knn_triton import _interpreting, sort_tiles

        pts = points if points.is_contiguous() else points.contiguous()
        on = grid.tiles if grid is not None else None
        t = tile or (16 if _interpreting() else 32)
        ct = candidate_tile if candidate_tile is not None else _default_candidate_tile(p, t)
        tiles, ctiles = sort_tiles(pts, lengths, t, grid=on, tile_a2=ct if ct != t else 0)
    return SortedCloud(points, lengths, tiles, given, ctiles)


def knn_points_sorted(p1: SortedCloud, p2: SortedCloud, K: int = 1, norm: int = 2, return_nn: bool = False) -> KNN:
    """K nearest neighbours in p2 of every point of p1: `knn_points(p1.points, p2.points, p1's lengths, p2's
    lengths, norm=norm, K=K, return_nn=return_nn)`, through the clouds' sorted copies when both have one.

    Returns KNN(dists (N, P1, K), idx (N, P1, K) int64, knn (N, P1, K, D) or None), differentiable in p1.points and
    p2.points, PyTorch3D's padding (see knn.py).
    """
    a, b = p1.points, p2.points
    plain_k = not isinstance(K, int) or isinstance(K, bool) or not 1 <= K <= 32
    if p1.tiles is None or p2.tiles is None or plain_k or torch.compiler.is_compiling():
        return knn_points(a, b, p1.lengths_arg(), p2.lengths_arg(), norm=norm, K=K, return_nn=return_nn)
    check_same_batch("p1", a, "p2", b)
    check_same_last_dim("p1", a, "p2", b)
    check_norm(norm)
    if a.device != b.device:
        raise ValueError(f"p2: expected a tensor on {a.device} (p1's device), got one on {b.device}")
    if a.dtype != b.dtype:
        raise ValueError(f"p2: expected dtype {a.dtype} (p1's), got {b.dtype}")
    from .knn_triton import knn_points_presorted

    # K > 1 over 64-point candidate tiles: the cloud's query tiles instead (the K > 1 walk over 64 candidates holds
    # 166 registers per thread against 94 over 32)
    cand = p2.tiles if K > 1 and p2.ctiles.tile == 64 and p2.tiles.tile < 64 else p2.ctiles
    dists, idx = knn_points_presorted(a if a.is_contiguous() else a.contiguous(),
                                      b if b.is_contiguous() else b.contiguous(), p1.tiles, cand, K, norm)
    nn = knn_gather(b, idx, p2.lengths) if return_nn else None
    return KNN(dists=dists, idx=idx, knn=nn)
