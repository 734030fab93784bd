"""K nearest neighbours between batches of padded point clouds, PyTorch3D's `knn_points` contract.

Padding rules (PyTorch3D 0.7.9, both its CPU and CUDA kernels, which fill outputs with zeros first):
- neighbour slots k >= lengths2[n] (fewer than K valid points in p2): dists 0 and idx 0;
- padded queries i >= lengths1[n]: every slot has dists 0 and idx 0;
- the valid slots come first, ascending (whatever return_sorted says); padded slots stay last.
Gradients never flow into padded slots or padded queries.

Precision rule: float16/bfloat16 inputs are accepted (PyTorch3D refuses them); distances are
computed and returned in float32, gradients come back in the inputs' dtypes. float32 and float64
inputs compute and return in their own dtype. The Triton kernel follows the same rule.

Memory: the search never materialises the (P1, P2) distance matrix of a large input; it walks
blocks of queries and of candidates and merges a running top-K, so extra memory is bounded by
about `_BLOCK_ELEMS_*` distances (+ O(N * P1 * K) outputs) whatever the input size.

Search strategies (all return exact distances of the chosen neighbours, recomputed by direct
differences, so indices can differ from PyTorch3D only between candidates whose distances tie
within the ranking's rounding):
- CPU, small inputs or D > 4: brute force ranked by directly rounded distances (like PyTorch3D's
  CPU kernel);
- CPU, large inputs with D <= 4: Z-order blocks with bounding-box pruning (`_search_pruned`),
  ranked by |c|^2 - 2 q.c centred on each query block (error ~ eps * block size^2);
- CUDA without the Triton kernel: brute force ranked by |c|^2 - 2 q.c centred on p2's mean
  (error ~ eps * |p - mean|^2; one batched matmul per block).
Measured: (1, 200k, 3) x (1, 50k, 3), K=1, one CPU thread: 2.7 s, 89 MiB peak extra RSS. On one
H100 (torch 2.11), this PyTorch path, K=1 fwd / fwd+bwd: 1x10k x 6.4k 0.92 / 2.2 ms,
64x200 x 10k 1.7 / 2.9 ms, 8x50k x 16k 50 / 50 ms, 32x20k x 16k 79 / 79 ms, <= 290 MiB extra.
"""
from __future__ import annotations

import functools
import importlib.util
import os
from typing import NamedTuple, Optional

import torch

from ._checks import check_norm, check_points, check_same_batch, check_same_last_dim, check_tensor, fill_lengths

# Distances per block. 2^22 fp32 = 16 MiB on the CPU keeps a block in the last-level cache; the GPU
# path wants fewer, larger launches (2^26 fp32 = 256 MiB).
_BLOCK_ELEMS_CPU = 1 << 22
_BLOCK_ELEMS_CUDA = 1 << 26
# CPU only: large low-dimensional problems skip candidate blocks that cannot hold a neighbour
# (bounding-box test). The GPU brute force is fast enough, and the loop would cost syncs there.
_PRUNE_MAX_DIM = 4
_PRUNE_MIN_PAIRS = 1 << 24
_PRUNE_BLOCK1 = 256
_PRUNE_BLOCK2 = 64


class KNN(NamedTuple):
    """dists (N, P1, K), idx (N, P1, K) int64, knn (N, P1, K, D) or None."""

    dists: torch.Tensor
    idx: torch.Tensor
    knn: Optional[torch.Tensor]


@functools.lru_cache(maxsize=None)
def _triton_importable() -> bool:
    if importlib.util.find_spec("triton") is None:
        return False
    return importlib.util.find_spec("protodepth.geometry.knn_triton") is not None


def _use_triton() -> bool:
    """Whether CUDA inputs go to the Triton kernel: off when PROTODEPTH_DISABLE_TRITON=1 or triton
    (or protodepth's kernel module) is not installed. A kernel failure is raised, never hidden."""
    if os.environ.get("PROTODEPTH_DISABLE_TRITON", "0") == "1":
        return False
    return _triton_importable()


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _block_sizes(n: int, p1: int, p2: int, budget: int) -> tuple[int, int, int]:
    """Block sizes (batch, queries, candidates) with bn * b1 * b2 <= budget (at least 1 each)."""
    b2 = max(1, min(p2, budget))
    b1 = max(1, min(p1, budget // (n * b2)))
    bn = n
    if bn * b1 * b2 > budget:
        bn = max(1, budget // (b1 * b2))
    return bn, b1, b2


def _block_dists(q: torch.Tensor, c: torch.Tensor, c_sq: torch.Tensor, norm: int, direct: bool = False) -> torch.Tensor:
    """Ranking distances of queries q (n, b1, D) to candidates c (n, b2, D) -> (n, b1, b2).

    For norm 2 this is |c|^2 - 2 q.c, which ranks like |q - c|^2 (|q|^2 is constant per row) at a
    fraction of the cost; invalid candidates carry |c|^2 = +inf. It rounds with an absolute error
    of about eps * (|q|^2 + |c|^2), so callers centre q and c near the queries first. `direct`
    ranks by the exactly rounded |q - c| instead (6x slower on the CPU). Exact distances of the
    chosen neighbours are recomputed afterwards either way.
    """
    if norm == 2 and not direct:
        return torch.baddbmm(c_sq[:, None, :], q, c.transpose(1, 2), alpha=-2.0)
    mask = torch.where(torch.isinf(c_sq), c_sq, torch.zeros_like(c_sq))[:, None, :]  # 0 / +inf
    if norm == 2:
        return torch.cdist(q, c, p=2, compute_mode="donot_use_mm_for_euclid_dist") + mask
    return torch.cdist(q, c, p=1) + mask


def _search(p1, p2, lengths1, lengths2, K: int, norm: int) -> torch.Tensor:
    """Indices (N, P1, K) of the K nearest valid candidates (by ranking distance), unsorted, no gradient.

    Where lengths2 < K the extra slots hold -1 or padded candidates (index >= lengths2); the
    caller sorts them last and pads them.
    """
    n, P1, D = p1.shape
    P2 = p2.shape[1]
    budget = _BLOCK_ELEMS_CUDA if p1.is_cuda else _BLOCK_ELEMS_CPU
    bn, b1, b2 = _block_sizes(n, P1, P2, budget)
    # centre both clouds on p2's valid mean so |c|^2 - 2 q.c loses less to cancellation far from the origin
    valid2 = torch.arange(P2, device=p2.device)[None, :] < lengths2[:, None]  # (N, P2)
    centre = (p2 * valid2[..., None]).sum(1, keepdim=True) / lengths2.clamp_min(1)[:, None, None].to(p2.dtype)
    q_all = p1 - centre
    c_all = p2 - centre
    inf = torch.tensor(float("inf"), dtype=p2.dtype, device=p2.device)
    if norm == 2:
        c_sq_all = torch.where(valid2, (c_all * c_all).sum(-1), inf)
    else:
        c_sq_all = torch.where(valid2, torch.zeros((), dtype=p2.dtype, device=p2.device), inf)
    # -1 marks slots that found no candidate (fewer than K points); _knn_forward pads them
    idx_out = torch.full((n, P1, K), -1, dtype=torch.int64, device=p1.device)
    if not p1.is_cuda and D <= _PRUNE_MAX_DIM and P1 * P2 > _PRUNE_MIN_PAIRS:
        l1s, l2s = lengths1.tolist(), lengths2.tolist()
        for s in range(n):
            if l1s[s] > 0 and l2s[s] > 0:
                found = _search_pruned(q_all[s, : l1s[s]], c_all[s, : l2s[s]], c_sq_all[s, : l2s[s]], K, norm)
                idx_out[s, : l1s[s], : found.shape[1]] = found
        return idx_out
    for s0 in range(0, n, bn):
        s1 = min(n, s0 + bn)
        for i0 in range(0, P1, b1):
            i1 = min(P1, i0 + b1)
            q = q_all[s0:s1, i0:i1]
            best_d = best_i = None
            for j0 in range(0, P2, b2):
                j1 = min(P2, j0 + b2)
                # the CPU brute force is for small inputs: rank exactly, as PyTorch3D's CPU kernel does
                d = _block_dists(q, c_all[s0:s1, j0:j1], c_sq_all[s0:s1, j0:j1], norm, direct=not p1.is_cuda)
                if K == 1:
                    dv, di = d.min(dim=2, keepdim=True)
                else:
                    dv, di = d.topk(min(K, j1 - j0), dim=2, largest=False, sorted=False)
                di = di + j0
                if best_d is None:
                    best_d, best_i = dv, di
                else:
                    # running merge: keep the K smallest of (best so far, this block)
                    cat_d, cat_i = torch.cat([best_d, dv], 2), torch.cat([best_i, di], 2)
                    kk = min(K, cat_d.shape[2])
                    best_d, sel = cat_d.topk(kk, dim=2, largest=False, sorted=False)
                    best_i = cat_i.gather(2, sel)
                del d
            idx_out[s0:s1, i0:i1, : best_i.shape[2]] = best_i
    return idx_out


def _morton_keys(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Z-order keys (P,) of points x (P, D) on a 1024^3 grid over [lo, hi] of the first 3 dims."""
    d3 = min(3, x.shape[1])
    span = (hi[:d3] - lo[:d3]).clamp_min(1e-30)
    cells = ((x[:, :d3] - lo[:d3]) / span * 1023).clamp(0, 1023).to(torch.int64)
    key = torch.zeros(x.shape[0], dtype=torch.int64, device=x.device)
    for bit in range(10):
        for d in range(d3):
            key |= ((cells[:, d] >> bit) & 1) << (3 * bit + d)
    return key


def _blocks(x: torch.Tensor, order: torch.Tensor, size: int, fill: float):
    """Points x (P, D) taken in `order`, cut into blocks of `size` ->
    (members (nb, size) original indices, -1 for padding; pts (nb, size, D) padded with `fill`; box lo, hi (nb, D))."""
    P, D = x.shape
    nb = -(-P // size)
    members = torch.full((nb * size,), -1, dtype=torch.int64, device=x.device)
    members[:P] = order
    members = members.reshape(nb, size)
    pts = torch.full((nb * size, D), fill, dtype=x.dtype, device=x.device)
    pts[:P] = x[order]
    pts = pts.reshape(nb, size, D)
    valid = (members >= 0)[..., None]
    big = torch.tensor(float("inf"), dtype=x.dtype, device=x.device)
    lo = torch.where(valid, pts, big).amin(1)
    hi = torch.where(valid, pts, -big).amax(1)
    return members, pts, lo, hi


def _search_pruned(q: torch.Tensor, c: torch.Tensor, c_sq: torch.Tensor, K: int, norm: int) -> torch.Tensor:
    """Exact KNN for one large low-dimensional pair of clouds, visiting only candidate blocks that
    can hold a neighbour: q (L1, D), c (L2, D), c_sq (L2,) -> idx (L1, min(K, L2)).

    Both clouds are sorted along a Z-order curve and cut into compact blocks with bounding boxes.
    A first pass over the few candidate blocks nearest each query block bounds its queries' K-th
    distances; a second pass visits every other candidate block whose box-to-box lower bound is
    within that bound, so the result equals the brute-force search (up to ties). Query blocks are
    processed many at a time as one batched matmul (few large ops parallelise well, many small
    ones do not), padded with an empty candidate block.
    """
    L1, D = q.shape
    L2 = c.shape[0]
    kk = min(K, L2)
    B1, B2 = _PRUNE_BLOCK1, _PRUNE_BLOCK2
    lo = torch.minimum(q.amin(0), c.amin(0))
    hi = torch.maximum(q.amax(0), c.amax(0))
    c_order = torch.argsort(_morton_keys(c, lo, hi))
    q_order = torch.argsort(_morton_keys(q, lo, hi))
    c_members, c_pts, c_lo, c_hi = _blocks(c, c_order, B2, 0.0)
    ncb = c_members.shape[0]
    # one extra all-padding block (index ncb) fills ragged block lists
    c_members = torch.cat([c_members, c_members.new_full((1, B2), -1)])
    c_pts = torch.cat([c_pts, c_pts.new_zeros((1, B2, D))])
    q_members, q_pts, q_lo, q_hi = _blocks(q, q_order, B1, 0.0)
    nqb = q_members.shape[0]
    q_valid = q_members >= 0  # (nqb, B1)
    # centre each query block on its own mean: the ranking error of |c|^2 - 2 q.c then scales
    # with the block's size, not with the distance from the cloud's centre
    centre = (q_pts * q_valid[..., None]).sum(1) / q_valid.sum(1, keepdim=True)  # (nqb, D)
    q_loc = q_pts - centre[:, None]
    gap = torch.maximum(q_lo[:, None] - c_hi[None], c_lo[None] - q_hi[:, None]).clamp_min(0)
    lower = (gap * gap).sum(-1) if norm == 2 else gap.sum(-1)  # (nqb, ncb) box-to-box lower bounds
    centre_gap = (((q_lo + q_hi)[:, None] - (c_lo + c_hi)[None]) ** 2).sum(-1)
    n_first = min(ncb, -(-kk // B2) + 1)  # enough full blocks for kk valid candidates
    first_blocks = centre_gap.topk(n_first, dim=1, largest=False).indices  # (nqb, n_first)

    def visit(qbs: torch.Tensor, blocks: torch.Tensor):
        """Query blocks qbs (G,) against candidate blocks (G, m) -> ranking dists and idx (G, B1, kk)."""
        g, m = blocks.shape
        members = c_members[blocks].reshape(g, m * B2)
        cb = c_pts[blocks].reshape(g, m * B2, D) - centre[qbs][:, None]
        if norm == 2:
            csq = torch.where(members >= 0, (cb * cb).sum(-1), torch.tensor(float("inf"), dtype=cb.dtype))
        else:
            csq = torch.where(members >= 0, torch.zeros((), dtype=cb.dtype), torch.tensor(float("inf"), dtype=cb.dtype))
        d = _block_dists(q_loc[qbs], cb, csq, norm)  # (G, B1, m*B2)
        if kk == 1:
            v, i = d.min(dim=2, keepdim=True)
        else:
            v, i = d.topk(kk, dim=2, largest=False, sorted=False)
        return v, members.gather(1, i.reshape(g, -1)).reshape(g, B1, kk)

    budget = _BLOCK_ELEMS_CPU
    best_v = torch.empty((nqb, B1, kk), dtype=q.dtype)
    best_i = torch.empty((nqb, B1, kk), dtype=torch.int64)
    g1 = max(1, budget // (B1 * n_first * B2))
    for s0 in range(0, nqb, g1):
        qbs = torch.arange(s0, min(nqb, s0 + g1))
        best_v[qbs], best_i[qbs] = visit(qbs, first_blocks[qbs])

    # bound on each query block's K-th exact distance
    diff = q_pts[:, :, None, :] - c[best_i.clamp_min(0)]
    exact = (diff * diff).sum(-1) if norm == 2 else diff.abs().sum(-1)
    worst = torch.where(q_valid[..., None], exact, torch.zeros((), dtype=exact.dtype)).amax(dim=(1, 2))  # (nqb,)
    if norm == 2:
        # rounding of the ranking distances is about eps * (|q|^2 + |c|^2) from the block centre, and
        # a competing candidate lies within r_q + sqrt(worst) of it: widen the bound well past that
        r_q = torch.where(q_valid, q_loc.norm(dim=-1), torch.zeros((), dtype=q.dtype)).amax(1)
        worst = worst + 1e-5 * (r_q + worst.sqrt()) ** 2
    bound = worst * (1 + 1e-4)
    todo = lower <= bound[:, None]
    todo.scatter_(1, first_blocks, False)
    counts = todo.sum(1)
    # group query blocks with similar numbers of blocks to visit, so padding wastes little
    by_count = torch.argsort(counts, descending=True)
    ranks = torch.cumsum(todo.to(torch.int64), 1) - 1  # position of each todo block in its row
    s0 = 0
    while s0 < nqb:
        m = int(counts[by_count[s0]])
        if m == 0:
            break
        g = max(1, budget // (B1 * m * B2))
        qbs = by_count[s0 : s0 + g]
        rows, cols = todo[qbs].nonzero(as_tuple=True)
        blocks = torch.full((qbs.shape[0], m), ncb, dtype=torch.int64)
        blocks[rows, ranks[qbs][rows, cols]] = cols
        v2, i2 = visit(qbs, blocks)
        cat_v, cat_i = torch.cat([best_v[qbs], v2], 2), torch.cat([best_i[qbs], i2], 2)
        sel_v, sel = cat_v.topk(kk, dim=2, largest=False, sorted=False)
        best_v[qbs], best_i[qbs] = sel_v, cat_i.gather(2, sel)
        s0 += qbs.shape[0]

    out = torch.empty((L1, kk), dtype=torch.int64)
    out[q_members[q_valid]] = best_i[q_valid]
    return out


def _exact_dists(p1: torch.Tensor, p2: torch.Tensor, idx: torch.Tensor, norm: int) -> torch.Tensor:
    """Distances of p1 (N, P1, D) to its chosen neighbours p2[idx] -> (N, P1, K), by direct differences."""
    nn = knn_gather(p2, idx)
    diff = p1[:, :, None, :] - nn
    return (diff * diff).sum(-1) if norm == 2 else diff.abs().sum(-1)


def _knn_forward(p1, p2, lengths1, lengths2, K: int, norm: int):
    """-> (dists (N, P1, K) in the compute dtype, idx (N, P1, K) int64) with PyTorch3D padding."""
    n, P1, _ = p1.shape
    ct = _compute_dtype(p1.dtype)
    a, b = p1.detach().to(ct), p2.detach().to(ct)
    if n == 0 or P1 == 0 or p2.shape[1] == 0:
        return (torch.zeros((n, P1, K), dtype=ct, device=p1.device),
                torch.zeros((n, P1, K), dtype=torch.int64, device=p1.device))
    idx = _search(a, b, lengths1, lengths2, K, norm)
    invalid = (idx < 0) | (idx >= lengths2[:, None, None])
    idx = idx.clamp_min(0)
    dists = _exact_dists(a, b, idx, norm)
    if K > 1:
        # blocks merge with unsorted top-K, and where lengths2 < K some slots hold padded
        # candidates: sort by exact distance with those last (always sorted, so the padding rule,
        # valid neighbours in the first lengths2 slots, holds whatever return_sorted asks).
        dists, order = dists.masked_fill(invalid, float("inf")).sort(dim=2, stable=True)
        idx = idx.gather(2, order)
    ks = torch.arange(K, device=p1.device)
    pad = (ks[None, None, :] >= lengths2[:, None, None]) | (
        torch.arange(P1, device=p1.device)[None, :, None] >= lengths1[:, None, None])  # (N, P1, K)
    idx = idx.masked_fill(pad, 0)
    dists = dists.masked_fill(pad, 0.0)
    return dists, idx


def _knn_backward_torch(p1, p2, lengths1, lengths2, idx, grad_dists, norm: int, want_p1: bool, want_p2: bool):
    """(grad_p1 (N, P1, D) or None, grad_p2 (N, P2, D) or None) in the inputs' dtypes, only those wanted."""
    n, P1, K = idx.shape
    ct = _compute_dtype(p1.dtype)
    a, b = p1.to(ct), p2.to(ct)
    g = grad_dists.to(ct)
    valid = (torch.arange(K, device=idx.device)[None, None, :] < lengths2[:, None, None]) & (
        torch.arange(P1, device=idx.device)[None, :, None] < lengths1[:, None, None])
    g = g * valid  # padded slots are constant zeros: no gradient
    diff = a[:, :, None, :] - knn_gather(b, idx)  # (N, P1, K, D)
    if norm == 2:
        contrib = 2.0 * g[..., None] * diff
    else:
        # PyTorch3D's subgradient: +1 where p1 > p2, else -1 (also at equality)
        contrib = g[..., None] * torch.where(diff > 0, 1.0, -1.0).to(ct)
    grad_p1 = grad_p2 = None
    if want_p1:
        grad_p1 = contrib.sum(2).to(p1.dtype)
    if want_p2:
        D = p2.shape[2]
        grad_p2 = torch.zeros(b.shape, dtype=ct, device=b.device)
        grad_p2.scatter_add_(1, idx.reshape(n, P1 * K, 1).expand(-1, -1, D), -contrib.reshape(n, P1 * K, D))
        grad_p2 = grad_p2.to(p2.dtype)
    return grad_p1, grad_p2


class _KnnPointsTorch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, p1, p2, lengths1, lengths2, K, norm):
        # autocast would run the ranking matmul in bf16/fp16, far too coarse to rank neighbours
        with torch.autocast(device_type=p1.device.type, enabled=False):
            dists, idx = _knn_forward(p1, p2, lengths1, lengths2, K, norm)
        ctx.save_for_backward(p1, p2, lengths1, lengths2, idx)
        ctx.norm = norm
        ctx.mark_non_differentiable(idx)
        return dists, idx

    @staticmethod
    def backward(ctx, grad_dists, grad_idx):
        p1, p2, lengths1, lengths2, idx = ctx.saved_tensors
        with torch.autocast(device_type=grad_dists.device.type, enabled=False):
            g1, g2 = _knn_backward_torch(p1, p2, lengths1, lengths2, idx, grad_dists, ctx.norm,
                                         ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        return g1, g2, None, None, None, None


def _knn_points_torch(p1, p2, lengths1, lengths2, K: int, norm: int):
    """Blocked PyTorch KNN: p1 (N, P1, D), p2 (N, P2, D), lengths int64 (N,) filled ->
    (dists (N, P1, K), idx (N, P1, K) int64); differentiable in p1 and p2 through the chosen idx."""
    return _KnnPointsTorch.apply(p1, p2, lengths1, lengths2, K, norm)


def knn_points(
    p1: torch.Tensor,
    p2: torch.Tensor,
    lengths1: Optional[torch.Tensor] = None,
    lengths2: Optional[torch.Tensor] = None,
    norm: int = 2,
    K: int = 1,
    version: int = -1,
    return_nn: bool = False,
    return_sorted: bool = True,
) -> KNN:
    """K nearest neighbours in p2 of every point of p1, per batch element (PyTorch3D's signature).

    Args:
        p1: (N, P1, D) query clouds, padded; p2: (N, P2, D) candidate clouds, padded.
        lengths1, lengths2: int (N,) valid points per cloud (None: all), values in [0, P1] / [0, P2].
        norm: 2 for squared Euclidean distances, 1 for L1 (sum of absolute differences).
        K: neighbours per query (>= 1). version: accepted for PyTorch3D compatibility, ignored.
        return_nn: also gather the neighbours' coordinates. return_sorted: accepted for PyTorch3D
            compatibility; the neighbours always come in ascending distance (also a valid answer to False).
    Returns:
        KNN(dists (N, P1, K), idx (N, P1, K) int64, knn (N, P1, K, D) or None). Padding as in the
        module docstring (zeros); dists are float32 for half inputs. Differentiable in p1 and p2.
    """
    check_points("p1", p1, "(N, P1, D)")
    check_points("p2", p2, "(N, P2, D)")
    check_same_batch("p1", p1, "p2", p2)
    check_same_last_dim("p1", p1, "p2", p2)
    if p1.device != p2.device:
        raise ValueError(f"p2: expected a tensor on {p1.device} (p1's device), got one on {p2.device}")
    if isinstance(K, bool) or not isinstance(K, int) or K < 1:
        raise ValueError(f"K: expected an integer >= 1, got {K!r}")
    check_norm(norm)
    n = p1.shape[0]
    lengths1 = _lengths("lengths1", lengths1, n, p1.shape[1], p1.device)
    lengths2 = _lengths("lengths2", lengths2, n, p2.shape[1], p1.device)
    p1 = p1 if p1.is_contiguous() else p1.contiguous()
    p2 = p2 if p2.is_contiguous() else p2.contiguous()
    if torch.compiler.is_compiling():
        # torch.compile traces the custom op (custom_ops.py), whose CUDA kernel is the same Triton kernel
        dists, idx = torch.ops.protodepth.knn_points(p1, p2, lengths1, lengths2, K, norm)
    elif p1.is_cuda and _use_triton():
        from .knn_triton import knn_points_validated

        dists, idx = knn_points_validated(p1, p2, lengths1, lengths2, K, norm)
    else:
        dists, idx = _knn_points_torch(p1, p2, lengths1, lengths2, K, norm)
    nn = knn_gather(p2, idx, lengths2) if return_nn else None
    return KNN(dists=dists, idx=idx, knn=nn)


# full-length tensors of CUDA calls without lengths, one per (N, P, device): a torch.full per call is a launch
_FULL_LENGTHS: dict = {}


def _lengths(name: str, lengths, n: int, p: int, device: torch.device) -> torch.Tensor:
    """fill_lengths, except that a CUDA call without lengths reuses one cached (n,) int64 tensor of p (never
    written: the ops only read lengths). While a CUDA graph is captured or torch.compile traces, a fresh tensor:
    a fill captured into a graph only runs when the graph replays."""
    if lengths is not None or device.type != "cuda" or torch.compiler.is_compiling() or \
            torch.cuda.is_current_stream_capturing():
        return fill_lengths(name, lengths, n, p, device)
    key = (n, p, device)
    out = _FULL_LENGTHS.get(key)
    if out is None:
        out = fill_lengths(name, None, n, p, device)
        # never evicted: a CUDA graph captured with a cached tensor keeps reading its memory
        if len(_FULL_LENGTHS) < 1024:
            _FULL_LENGTHS[key] = out
    return out


def knn_gather(x: torch.Tensor, idx: torch.Tensor, lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Gather x (N, M, U) at idx (N, L, K) -> (N, L, K, U), out[n, l, k] = x[n, idx[n, l, k]].

    Where k >= lengths[n] (the neighbour slots knn_points pads) the output is 0, as in PyTorch3D.
    Differentiable in x.
    """
    check_tensor("x", x, 3, "(N, M, U)")
    check_tensor("idx", idx, 3, "(N, L, K)")
    check_same_batch("x", x, "idx", idx)
    n, m, u = x.shape
    _, L, K = idx.shape
    out = x.gather(1, idx.reshape(n, L * K, 1).expand(-1, -1, u)).reshape(n, L, K, u)
    if lengths is not None:
        lengths = fill_lengths("lengths", lengths, n, m, x.device)
        # always masked: testing first whether any slot is padded would cost a host read
        mask = torch.arange(K, device=x.device)[None, :] >= lengths[:, None]  # (N, K)
        out = out.masked_fill(mask[:, None, :, None], 0.0)
    return out
