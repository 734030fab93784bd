"""Fused K-nearest-neighbour search in Triton: exact, padded batches, half inputs, deterministic backward.

`knn_points_triton` is what `protodepth.geometry.knn.knn_points` calls for CUDA inputs. It never forms the
(N, P1, P2) distance matrix: each program owns a tile of BLOCK_Q queries of one cloud, walks the candidate cloud in
tiles of BLOCK_C points, computes the direct form sum_d (a_d - b_d)^2 (or sum_d |a_d - b_d| for norm=1) in fp32
(fp64 for fp64 inputs) and keeps a running top-K per query in registers. The direct form is what PyTorch3D and the
torch path compute, so indices agree with them except for exact ties; the expanded |a|^2 + |b|^2 - 2ab form would be
faster but cancels badly for points far from the origin and can swap near neighbours.

Ties are broken towards the lower candidate index, both inside a tile and across tiles.

Backward (no float atomics, bit-identical across runs, only the gradients autograd asks for, no host sync):
- grad_p1[n, i] = sum_k g[n, i, k] * dD/dp1: one kernel gathers each query's K neighbours and sums in fixed order.
- grad_p2[n, j] = -sum over every (i, k) that chose j: each contribution becomes a 64-bit fixed-point integer (a
  power-of-two scale from the largest contribution, found first) and is added with integer atomics, whose sum does
  not depend on the order of arrival; a last pass converts back (inside the accumulation launch when grad_p2 is
  small). A zeroing and 2-3 launches whatever the imbalance between candidates (a sort-based CSR of the chosen pairs,
  an earlier version, took ~25 launches and 0.6-1.2 ms).

Small problems (issue 17): eager calls are bound by host time, not by the GPU, so the brute-force search of a small
problem is one launch (candidates read in place; when the candidates are split over several programs to fill the GPU,
the last program of each query tile merges the splits, found by a ticket counter), and every launch after the first
of its specialisation skips Triton's per-call argument binding (`_triton_launch`).

Padding follows PyTorch3D: queries i >= lengths1[n] get dists 0 and idx 0; slots k >= lengths2[n] (K larger than
the candidate cloud) get dists 0 and idx 0 after the valid, ascending neighbours.

Triton's interpreter (`TRITON_INTERPRET=1` set before triton is imported) runs the same kernels on CPU tensors; the
tests use it so that CI exercises the kernels without a GPU.
"""
from __future__ import annotations

import functools
import os
from typing import NamedTuple

import torch

from . import _triton_launch

try:  # triton ships with torch's CUDA wheels; a CPU-only install may lack it
    import triton
    import triton.language as tl

    _TRITON_ERROR: Exception | None = None
except Exception as exc:  # pragma: no cover - depends on the install
    triton = None
    tl = None
    _TRITON_ERROR = exc

__all__ = ["knn_points_triton", "knn_points_validated", "MAX_K", "MAX_D"]

MAX_K = 128  # running top-K lives in registers: (BLOCK_Q, next_pow2(K)) per program
MAX_D = 16


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


if triton is not None:

    @triton.jit
    def _tile_dists(p1_base, p2_base, Q_SD, P2S, q, qmask, c, cmask,
                    D: tl.constexpr, NORM: tl.constexpr, ACC: tl.constexpr, Q_SQ: tl.constexpr,
                    C_ROWS: tl.constexpr = False):
        """(BLOCK_C, BLOCK_Q) direct-form distances; +inf for masked candidates.

        Query coordinate d of query q sits at p1_base + d * Q_SD + q * Q_SQ: a coordinate-major (D, P) copy
        (Q_SD = padded length, Q_SQ = 1) or the caller's (P, D) rows read in place (Q_SD = 1, Q_SQ = D; one query per
        thread, so the strided load costs nothing). Candidates come from a coordinate-major (D, P2S) copy, or with
        C_ROWS from the caller's (P2, D) rows read in place (masked loads, no copy launch: small problems).
        Candidates run along dim 0 so that Triton's default layout gives each thread whole columns: the per-query
        reductions over candidates then stay inside a thread instead of crossing warps through shared memory.
        """
        # candidate loads unmasked: the coordinate-major copies are padded to whole tiles, which lets them
        # vectorise; whatever the padding holds is replaced by +inf below
        a = tl.load(p1_base + q * Q_SQ, mask=qmask, other=0.0).to(ACC)
        if C_ROWS:
            b = tl.load(p2_base + c * D, mask=cmask, other=0.0).to(ACC)
        else:
            b = tl.load(p2_base + c).to(ACC)
        diff = a[None, :] - b[:, None]
        if NORM == 2:
            dist = diff * diff
        else:
            dist = tl.abs(diff)
        for d in tl.static_range(1, D):
            a = tl.load(p1_base + d * Q_SD + q * Q_SQ, mask=qmask, other=0.0).to(ACC)
            if C_ROWS:
                b = tl.load(p2_base + c * D + d, mask=cmask, other=0.0).to(ACC)
            else:
                b = tl.load(p2_base + d * P2S + c).to(ACC)
            diff = a[None, :] - b[:, None]
            if NORM == 2:
                dist += diff * diff
            else:
                dist += tl.abs(diff)
        return tl.where(cmask[:, None], dist, float("inf"))

    @triton.jit
    def _box_lower_bound(p1_base, Q_SD, Q_SQ, q, qmask, box, D: tl.constexpr, NORM: tl.constexpr,
                         ACC: tl.constexpr, BLOCK_Q: tl.constexpr):
        """(BLOCK_Q,) lower bound of each query's distance to the points of the box (lo, hi) at box (2, D)."""
        lb = tl.zeros((BLOCK_Q,), ACC)
        for d in tl.static_range(D):
            a = tl.load(p1_base + d * Q_SD + q * Q_SQ, mask=qmask, other=0.0).to(ACC)
            lo = tl.load(box + d)
            hi = tl.load(box + D + d)
            gap = tl.maximum(tl.maximum(lo - a, a - hi), 0.0)
            if NORM == 2:
                lb += gap * gap
            else:
                lb += gap
        return lb

    @triton.jit
    def _nearest_update(dist, oidx, c0, best1_d, best1_i, SORTED: tl.constexpr):
        """K = 1: the tile's (BLOCK_C, BLOCK_Q) distances of candidates oidx against the running best per query."""
        BIG: tl.constexpr = 2147483647
        if SORTED:
            m = tl.min(dist, 0)
            mi = tl.min(tl.where(dist == m[None, :], oidx[:, None], BIG), 0)
            upd = (m < best1_d) | ((m == best1_d) & (mi < best1_i))
        else:
            # candidates arrive in index order: the first minimum of a later tile never wins a tie
            m, arg = tl.min(dist, 0, return_indices=True, return_indices_tie_break_left=True)
            mi = c0 + arg
            upd = m < best1_d
        return tl.where(upd, m, best1_d), tl.where(upd, mi, best1_i)

    @triton.jit
    def _topk_insert(dist, oidx, best_d, best_i, K: tl.constexpr):
        """K > 1: insert the tile's candidates that beat a query's K-th best into its (KP, BLOCK_Q) top-K slots."""
        BIG: tl.constexpr = 2147483647
        kth = tl.max(best_d, 0)
        hits = (dist <= kth[None, :]).to(tl.int32)
        n_ins = tl.minimum(tl.max(tl.sum(hits, 0), 0), K)
        for _ in range(n_ins):
            # next tile candidate in (dist, idx) order
            m = tl.min(dist, 0)
            mi = tl.min(tl.where(dist == m[None, :], oidx[:, None], BIG), 0)
            # it evicts the worst slot, (dist, idx)-largest, when it is smaller in that order
            mx = tl.max(best_d, 0)
            at_mx = best_d == mx[None, :]
            ev = tl.max(tl.where(at_mx, best_i, -BIG), 0)
            ins = (m < mx) | ((m == mx) & (mi < ev))
            sel = at_mx & (best_i == ev[None, :]) & ins[None, :]
            best_d = tl.where(sel, m[None, :], best_d)
            best_i = tl.where(sel, mi[None, :], best_i)
            dist = tl.where((dist == m[None, :]) & (oidx[:, None] == mi[None, :]), float("inf"), dist)
        return best_d, best_i

    @triton.jit
    def _topk_insert_lean(dist, oidx, best_d, best_i, K: tl.constexpr):
        """_topk_insert with less work per tile, same result (the exact (dist, idx) top-K of slots and tile).

        The tile's candidates are taken in ascending (dist, idx) order only while some query's next one could still
        enter its top-K (its distance <= that query's current K-th best), at most K times: a query's K-th best only
        shrinks as candidates enter, so _topk_insert's count of candidates under the K-th best *before* the loop
        runs more rounds than needed, and that count itself costs a compare, a select and a sum per candidate. A
        taken candidate leaves the tile by its index alone (indices are distinct within a tile): one compare per
        candidate instead of two; and nothing of the (dist == min) mask lives across the round (the compiler packed
        it into bit masks: 363 instructions per round in the walk kernel's sm_90 PTX, 239 here)."""
        BIG: tl.constexpr = 2147483647
        m = tl.min(dist, 0)
        kth = tl.max(best_d, 0)
        rounds = 0
        go = tl.max(tl.where(m <= kth, 1, 0), 0) > 0
        while go:
            mi = tl.min(tl.where(dist == m[None, :], oidx[:, None], BIG), 0)
            # it evicts the worst slot, (dist, idx)-largest, when it is smaller in that order
            at_mx = best_d == kth[None, :]
            ev = tl.max(tl.where(at_mx, best_i, -BIG), 0)
            ins = (m < kth) | ((m == kth) & (mi < ev))
            sel = at_mx & (best_i == ev[None, :]) & ins[None, :]
            best_d = tl.where(sel, m[None, :], best_d)
            best_i = tl.where(sel, mi[None, :], best_i)
            dist = tl.where(oidx[:, None] == mi[None, :], float("inf"), dist)
            m = tl.min(dist, 0)
            kth = tl.max(best_d, 0)
            rounds += 1
            go = (rounds < K) & (tl.max(tl.where(m <= kth, 1, 0), 0) > 0)
        return best_d, best_i

    @triton.jit
    def _nearest_walk(dist, oidx, best1_d, best1_i, LEAN: tl.constexpr):
        """K = 1 in the walk kernels: _nearest_update (SORTED); with LEAN the index of the tile's minimum is looked for
        only when some query's minimum can replace its best (a compare, a select and a min per candidate saved on the
        tiles that improve no query)."""
        if not LEAN:
            return _nearest_update(dist, oidx, 0, best1_d, best1_i, True)
        BIG: tl.constexpr = 2147483647
        m = tl.min(dist, 0)
        if tl.max(tl.where(m <= best1_d, 1, 0), 0) > 0:
            mi = tl.min(tl.where(dist == m[None, :], oidx[:, None], BIG), 0)
            upd = (m < best1_d) | ((m == best1_d) & (mi < best1_i))
            best1_d = tl.where(upd, m, best1_d)
            best1_i = tl.where(upd, mi, best1_i)
        return best1_d, best1_i

    @triton.jit
    def _topk_walk(dist, oidx, best_d, best_i, K: tl.constexpr, LEAN: tl.constexpr):
        if LEAN:
            return _topk_insert_lean(dist, oidx, best_d, best_i, K)
        return _topk_insert(dist, oidx, best_d, best_i, K)

    @triton.jit
    def _store_slot(dist_ptr, idx_ptr, off, row_ok, valid, d, i, FINAL: tl.constexpr):
        """One slot per query at off: (d, i) where valid, else PyTorch3D's (0, 0) (FINAL) or the merge's (+inf, -1)."""
        if FINAL:
            out_d = tl.where(valid, d, 0.0)
            out_i = tl.where(valid, i, 0)
        else:
            out_d = tl.where(valid, d, float("inf"))
            out_i = tl.where(valid, i, -1)
        tl.store(dist_ptr + off, out_d.to(dist_ptr.dtype.element_ty), mask=row_ok)
        tl.store(idx_ptr + off, out_i.to(idx_ptr.dtype.element_ty), mask=row_ok)

    @triton.jit
    def _store_topk(dist_ptr, idx_ptr, off, row_ok, qmask, L2, best_d, best_i, K: tl.constexpr, KP: tl.constexpr,
                    FINAL: tl.constexpr):
        """The K slots (KP, BLOCK_Q) of each query in ascending (dist, idx) order to rows at off (BLOCK_Q,)."""
        BIG: tl.constexpr = 2147483647
        slot = tl.arange(0, KP)
        bd = tl.where(slot[:, None] < K, best_d, float("inf"))
        # a runtime loop, not unrolled: unrolling K extraction steps made K=32..128 compile for minutes
        for k in range(K):
            # ascending (dist, idx) order: smallest distance, then smallest index among equals
            m = tl.min(bd, 0)
            at_m = bd == m[None, :]
            i_sel = tl.min(tl.where(at_m, best_i, BIG), 0)
            bd = tl.where(at_m & (best_i == i_sel[None, :]), float("inf"), bd)
            valid = qmask & (k < L2) & (m < float("inf"))
            _store_slot(dist_ptr, idx_ptr, off + k, row_ok, valid, m, i_sel, FINAL)

    @triton.jit
    def _ticket_merge(cnt_ptr, pd_ptr, pi_ptr, dist_ptr, idx_ptr, n, num_n, S, q, L1, L2, P1,
                      K: tl.constexpr, KP: tl.constexpr, BLOCK_Q: tl.constexpr):
        """Take this program's ticket of its query tile (counter at cnt_ptr); the last of the tile's S programs
        resets the counter and merges the S partial rows into dist / idx."""
        # every thread's partial rows are written before this program's ticket is taken; the ticket's
        # acquire-release atomic (with the barrier: the usual "last block" pattern) makes the other programs'
        # rows visible to the one that takes the last ticket
        tl.debug_barrier()
        ticket = tl.atomic_add(cnt_ptr, 1, sem="acq_rel", scope="gpu")
        if ticket == S - 1:
            # every program of the tile has counted: back to zero for the next launch that uses these counters
            tl.atomic_xchg(cnt_ptr, 0)
            _merge_rows(pd_ptr, pi_ptr, dist_ptr, idx_ptr, n, num_n, q, L1, L2, S, P1, K, KP, BLOCK_Q)

    @triton.jit
    def _knn_fwd_kernel(
        p1_ptr, p2_ptr, len1_ptr, len2_ptr, dist_ptr, idx_ptr, perm1_ptr, perm2_ptr, box_ptr, order_ptr, lbs_ptr,
        fin_d_ptr, fin_i_ptr, cnt_ptr,
        P1, P2, P1N, Q_SD, P2S, CHUNK, T1, T2,
        K: tl.constexpr, KP: tl.constexpr, D: tl.constexpr, NORM: tl.constexpr,
        ACC: tl.constexpr, FINAL: tl.constexpr, SORTED: tl.constexpr, Q_SQ: tl.constexpr,
        BLOCK_Q: tl.constexpr, BLOCK_C: tl.constexpr, C_ROWS: tl.constexpr = False, TICKET: tl.constexpr = False,
    ):
        """One program: BLOCK_Q queries of cloud n against candidates [s*CHUNK, (s+1)*CHUNK) of cloud n.

        p1: cloud n starts at p1_ptr + n * P1N; coordinate d of query q at + d * Q_SD + q * Q_SQ (the sorted
        coordinate-major copy (N, D, P1S), or the caller's contiguous (N, P1, D) tensor read in place).
        p2 (N, D, P2S): coordinate-major copy padded to whole tiles (P2S a multiple of BLOCK_C; the padding may hold
        anything). lengths (N,) integer, clamped here to [0, P1] / [0, P2].
        Output (S, N, P1, K) with S = grid dim 2. FINAL (a single split): write PyTorch3D padding (0, 0) directly.
        Otherwise write +inf / -1 for empty slots and padded queries (idx in idx_ptr's integer type), and with
        TICKET the merge happens here: each program takes a ticket from cnt (N, T1) int32 (zero on entry) after
        its partial rows are written, and the last of the S programs of a query tile merges the S partial rows
        into fin_d / fin_i (N, P1, K) with PyTorch3D padding (one launch instead of a search and a merge kernel)
        and sets the tile's counter back to zero (so cnt can serve the next launch without a zeroing).
        C_ROWS: candidates read in place from the caller's contiguous (N, P2, D) rows (P2S = P2), no copy.

        SORTED: p1 and p2 are sorted by Morton cell (valid points first), perm1/perm2 (N, P1)/(N, P2) int32
        map sorted positions to original indices, box (N, T2, 2, D) holds each candidate tile's bounding box,
        order (N, T1, T2) int32 (int64 from torch.sort for very long rows) lists the candidate tiles of each query
        tile by ascending box-to-box lower bound and lbs (N, T1, T2) holds those bounds. The program walks its list
        and stops at the first tile whose bound exceeds every query's current K-th best; inside, a tile is also
        skipped when no single query's distance to its box can reach that query's K-th best. Bounds are shrunk
        by 2^-20 relative before comparing, which covers the rounding differences between bound and distance
        (fused multiply-adds), so skipping is exact. Ties compare original indices.
        """
        pid_q = tl.program_id(0)
        n = tl.program_id(1)
        s = tl.program_id(2)
        num_n = tl.num_programs(1)
        num_s = tl.num_programs(2)
        L1 = tl.minimum(tl.maximum(tl.load(len1_ptr + n).to(tl.int32), 0), P1)
        L2 = tl.minimum(tl.maximum(tl.load(len2_ptr + n).to(tl.int32), 0), P2)
        BIG: tl.constexpr = 2147483647
        inf = float("inf")

        q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
        qmask = q < L1
        slot = tl.arange(0, KP)
        cols = tl.arange(0, BLOCK_C)
        p1_base = p1_ptr + n.to(tl.int64) * P1N
        p2_base = p2_ptr + n.to(tl.int64) * P2S * D

        if K == 1:
            best1_d = tl.full((BLOCK_Q,), inf, ACC)
            best1_i = tl.full((BLOCK_Q,), BIG, tl.int32)
        else:
            # (KP, BLOCK_Q): slots >= K are parked at -inf so the eviction max never picks them; distinct
            # negative placeholder indices keep the (dist, idx) eviction rule unambiguous before the slots fill
            best_d = tl.where(slot[:, None] < K, tl.full((KP, BLOCK_Q), inf, ACC), -inf)
            best_i = tl.zeros((KP, BLOCK_Q), tl.int32) - 1 - slot[:, None]

        if SORTED:
            c_end = L2
            n_steps = tl.cdiv(L2, BLOCK_C)
            lbase = (n.to(tl.int64) * T1 + pid_q) * T2
        else:
            c_start = s * CHUNK
            c_end = tl.minimum(L2, c_start + CHUNK)
            n_steps = tl.cdiv(tl.maximum(c_end - c_start, 0), BLOCK_C)
        # a tile of padded queries does no search at all
        if pid_q * BLOCK_Q >= L1:
            n_steps = 0
        SHRINK: tl.constexpr = 1.0 - 1.0 / 1048576.0
        j = 0
        go_on = n_steps > 0
        while go_on:
            if SORTED:
                tile = tl.load(order_ptr + lbase + j).to(tl.int32)
                c0 = tile * BLOCK_C
                box = box_ptr + (n.to(tl.int64) * T2 + tile) * (2 * D)
                lb = _box_lower_bound(p1_base, Q_SD, Q_SQ, q, qmask, box, D, NORM, ACC, BLOCK_Q)
                if K == 1:
                    kth = best1_d
                else:
                    kth = tl.max(best_d, 0)
                # <= keeps tiles that could hold an equal distance with a lower original index
                go = tl.max(tl.where(qmask & (lb * SHRINK <= kth), 1, 0), 0) > 0
            else:
                go = j >= 0
                c0 = c_start + j * BLOCK_C
            if go:
                c = c0 + cols
                cmask = c < c_end
                dist = _tile_dists(p1_base, p2_base, Q_SD, P2S, q, qmask, c, cmask, D, NORM, ACC, Q_SQ, C_ROWS)
                if SORTED:
                    oidx = tl.load(perm2_ptr + n.to(tl.int64) * P2 + c, mask=cmask, other=0).to(tl.int32)
                else:
                    oidx = c
                if K == 1:
                    best1_d, best1_i = _nearest_update(dist, oidx, c0, best1_d, best1_i, SORTED)
                else:
                    best_d, best_i = _topk_insert(dist, oidx, best_d, best_i, K)
            j += 1
            if SORTED:
                # later tiles are no nearer than this bound: stop once it exceeds every query's K-th best
                if K == 1:
                    kth = best1_d
                else:
                    kth = tl.max(best_d, 0)
                thr = tl.max(tl.where(qmask, kth, -inf), 0)
                nxt = tl.load(lbs_ptr + lbase + j, mask=j < n_steps, other=inf)
                go_on = (j < n_steps) & (nxt * SHRINK <= thr)
            else:
                go_on = j < n_steps

        out_base = (s.to(tl.int64) * num_n + n) * P1 * K
        row_ok = q < P1
        if SORTED:
            q_out = tl.load(perm1_ptr + n.to(tl.int64) * P1 + q, mask=row_ok, other=0)
        else:
            q_out = q
        if K == 1:
            valid = qmask & (L2 > 0) & (best1_d < inf)
            _store_slot(dist_ptr, idx_ptr, out_base + q_out, row_ok, valid, best1_d, best1_i, FINAL)
        else:
            _store_topk(dist_ptr, idx_ptr, out_base + q_out * K, row_ok, qmask, L2, best_d, best_i, K, KP, FINAL)
        if TICKET:
            _ticket_merge(cnt_ptr + n * T1 + pid_q, dist_ptr, idx_ptr, fin_d_ptr, fin_i_ptr, n, num_n, num_s, q, L1,
                          L2, P1, K, KP, BLOCK_Q)

    @triton.jit
    def _pair_dist3(a0, a1, a2, b0, b1, b2, NORM: tl.constexpr):
        """(BLOCK_C, BLOCK_Q) distances of 3-D queries (a0, a1, a2) and candidates (b0, b1, b2), summed over d in the
        order _tile_dists uses (the same roundings)."""
        diff = a0[None, :] - b0[:, None]
        if NORM == 2:
            dist = diff * diff
        else:
            dist = tl.abs(diff)
        diff = a1[None, :] - b1[:, None]
        if NORM == 2:
            dist += diff * diff
        else:
            dist += tl.abs(diff)
        diff = a2[None, :] - b2[:, None]
        if NORM == 2:
            dist += diff * diff
        else:
            dist += tl.abs(diff)
        return dist

    @triton.jit
    def _box_bound3(a0, a1, a2, box, NORM: tl.constexpr):
        """(BLOCK_Q,) lower bound of each 3-D query's distance to the box (lo, hi) at box (2, 3)."""
        g0 = tl.maximum(tl.maximum(tl.load(box) - a0, a0 - tl.load(box + 3)), 0.0)
        g1 = tl.maximum(tl.maximum(tl.load(box + 1) - a1, a1 - tl.load(box + 4)), 0.0)
        g2 = tl.maximum(tl.maximum(tl.load(box + 2) - a2, a2 - tl.load(box + 5)), 0.0)
        if NORM == 2:
            return g0 * g0 + g1 * g1 + g2 * g2
        return g0 + g1 + g2

    @triton.jit
    def _knn_walk3_kernel(
        p1_ptr, p2_ptr, len1_ptr, len2_ptr, dist_ptr, idx_ptr, perm1_ptr, perm2_ptr, box_ptr, order_ptr, lbs_ptr,
        P1, P2, Q_SD, P2S, T1, T2,
        K: tl.constexpr, KP: tl.constexpr, NORM: tl.constexpr, ACC: tl.constexpr,
        BLOCK_Q: tl.constexpr, BLOCK_C: tl.constexpr, LEAN: tl.constexpr = False,
    ):
        """The SORTED walk of _knn_fwd_kernel for D = 3 (one split, PyTorch3D padding written directly), arranged for
        memory latency: the queries are loaded once, the next entry of the tile list (tile and bound) is loaded one
        step ahead, and a tile's box, candidates and original indices are requested together before the box test
        decides whether the candidates are used. The walk in _knn_fwd_kernel waits for order -> box -> bound ->
        candidates, three dependent round trips per tile. Same arguments and results as _knn_fwd_kernel with
        SORTED, FINAL and Q_SQ = 1 (p1 the sorted coordinate-major copy (N, 3, Q_SD))."""
        pid_q = tl.program_id(0)
        n = tl.program_id(1)
        L1 = tl.minimum(tl.maximum(tl.load(len1_ptr + n).to(tl.int32), 0), P1)
        L2 = tl.minimum(tl.maximum(tl.load(len2_ptr + n).to(tl.int32), 0), P2)
        BIG: tl.constexpr = 2147483647
        SHRINK: tl.constexpr = 1.0 - 1.0 / 1048576.0
        inf = float("inf")
        q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
        qmask = q < L1
        slot = tl.arange(0, KP)
        cols = tl.arange(0, BLOCK_C)
        p1_base = p1_ptr + n.to(tl.int64) * 3 * Q_SD
        p2_base = p2_ptr + n.to(tl.int64) * P2S * 3
        perm2_base = perm2_ptr + n.to(tl.int64) * P2
        a0 = tl.load(p1_base + q, mask=qmask, other=0.0).to(ACC)
        a1 = tl.load(p1_base + Q_SD + q, mask=qmask, other=0.0).to(ACC)
        a2 = tl.load(p1_base + 2 * Q_SD + q, mask=qmask, other=0.0).to(ACC)
        if K == 1:
            best1_d = tl.full((BLOCK_Q,), inf, ACC)
            best1_i = tl.full((BLOCK_Q,), BIG, tl.int32)
        else:
            best_d = tl.where(slot[:, None] < K, tl.full((KP, BLOCK_Q), inf, ACC), -inf)
            best_i = tl.zeros((KP, BLOCK_Q), tl.int32) - 1 - slot[:, None]
        n_steps = tl.cdiv(L2, BLOCK_C)
        if pid_q * BLOCK_Q >= L1:
            n_steps = 0
        lbase = (n.to(tl.int64) * T1 + pid_q) * T2
        tile = tl.load(order_ptr + lbase, mask=n_steps > 0, other=0).to(tl.int32)
        j = 0
        go_on = n_steps > 0
        while go_on:
            # issued together: this tile's box, candidates and indices, and the next list entry
            c = tile * BLOCK_C + cols
            cmask = c < L2
            # entries past L2 (the sorted copy's padding holds anything) load as +inf: their distance to a finite
            # query is +inf (NaN to an infinite one: never taken either), one select per lane here instead of a
            # compare and a select per candidate and query on the tile
            b0 = tl.load(p2_base + c, mask=cmask, other=inf).to(ACC)
            b1 = tl.load(p2_base + P2S + c, mask=cmask, other=inf).to(ACC)
            b2 = tl.load(p2_base + 2 * P2S + c, mask=cmask, other=inf).to(ACC)
            oidx = tl.load(perm2_base + c, mask=cmask, other=0).to(tl.int32)
            more = j + 1 < n_steps
            nxt_tile = tl.load(order_ptr + lbase + j + 1, mask=more, other=0).to(tl.int32)
            nxt_lb = tl.load(lbs_ptr + lbase + j + 1, mask=more, other=inf)
            lb = _box_bound3(a0, a1, a2, box_ptr + (n.to(tl.int64) * T2 + tile) * 6, NORM)
            if K == 1:
                kth = best1_d
            else:
                kth = tl.max(best_d, 0)
            # <= keeps tiles that could hold an equal distance with a lower original index
            if tl.max(tl.where(qmask & (lb * SHRINK <= kth), 1, 0), 0) > 0:
                dist = _pair_dist3(a0, a1, a2, b0, b1, b2, NORM)
                if K == 1:
                    best1_d, best1_i = _nearest_walk(dist, oidx, best1_d, best1_i, LEAN)
                else:
                    best_d, best_i = _topk_walk(dist, oidx, best_d, best_i, K, LEAN)
            j += 1
            if K == 1:
                kth = best1_d
            else:
                kth = tl.max(best_d, 0)
            thr = tl.max(tl.where(qmask, kth, -inf), 0)
            # later tiles are no nearer than this bound: stop once it exceeds every query's K-th best
            go_on = more & (nxt_lb * SHRINK <= thr)
            tile = nxt_tile
        row_ok = q < P1
        q_out = tl.load(perm1_ptr + n.to(tl.int64) * P1 + q, mask=row_ok, other=0)
        out_base = n.to(tl.int64) * P1 * K
        if K == 1:
            valid = qmask & (L2 > 0) & (best1_d < inf)
            _store_slot(dist_ptr, idx_ptr, out_base + q_out, row_ok, valid, best1_d, best1_i, True)
        else:
            _store_topk(dist_ptr, idx_ptr, out_base + q_out * K, row_ok, qmask, L2, best_d, best_i, K, KP, True)

    @triton.jit
    def _knn_walk3p_kernel(
        p1_ptr, p2_ptr, len1_ptr, len2_ptr, dist_ptr, idx_ptr, perm1_ptr, perm2_ptr, box_ptr, order_ptr, lbs_ptr,
        P1, P2, Q_SD, P2S, T1, T2,
        K: tl.constexpr, KP: tl.constexpr, NORM: tl.constexpr, ACC: tl.constexpr,
        BLOCK_Q: tl.constexpr, BLOCK_C: tl.constexpr, LEAN: tl.constexpr = False,
    ):
        """_knn_walk3_kernel with the loads one tile ahead: while tile j is searched, tile j + 1's box, candidates
        and indices and list entry j + 2 are already requested (carried in the loop in the layout they load in).
        Same arguments and results."""
        pid_q = tl.program_id(0)
        n = tl.program_id(1)
        L1 = tl.minimum(tl.maximum(tl.load(len1_ptr + n).to(tl.int32), 0), P1)
        L2 = tl.minimum(tl.maximum(tl.load(len2_ptr + n).to(tl.int32), 0), P2)
        BIG: tl.constexpr = 2147483647
        SHRINK: tl.constexpr = 1.0 - 1.0 / 1048576.0
        inf = float("inf")
        q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
        qmask = q < L1
        slot = tl.arange(0, KP)
        cols = tl.arange(0, BLOCK_C)
        p1_base = p1_ptr + n.to(tl.int64) * 3 * Q_SD
        p2_base = p2_ptr + n.to(tl.int64) * P2S * 3
        perm2_base = perm2_ptr + n.to(tl.int64) * P2
        box_base = box_ptr + n.to(tl.int64) * T2 * 6
        a0 = tl.load(p1_base + q, mask=qmask, other=0.0).to(ACC)
        a1 = tl.load(p1_base + Q_SD + q, mask=qmask, other=0.0).to(ACC)
        a2 = tl.load(p1_base + 2 * Q_SD + q, mask=qmask, other=0.0).to(ACC)
        if K == 1:
            best1_d = tl.full((BLOCK_Q,), inf, ACC)
            best1_i = tl.full((BLOCK_Q,), BIG, tl.int32)
        else:
            best_d = tl.where(slot[:, None] < K, tl.full((KP, BLOCK_Q), inf, ACC), -inf)
            best_i = tl.zeros((KP, BLOCK_Q), tl.int32) - 1 - slot[:, None]
        n_steps = tl.cdiv(L2, BLOCK_C)
        if pid_q * BLOCK_Q >= L1:
            n_steps = 0
        lbase = (n.to(tl.int64) * T1 + pid_q) * T2
        # entry 0 in full, entry 1's tile and bound
        tile = tl.load(order_ptr + lbase, mask=n_steps > 0, other=0).to(tl.int32)
        c = tile * BLOCK_C + cols
        b0 = tl.load(p2_base + c, mask=c < L2, other=inf)
        b1 = tl.load(p2_base + P2S + c, mask=c < L2, other=inf)
        b2 = tl.load(p2_base + 2 * P2S + c, mask=c < L2, other=inf)
        oidx = tl.load(perm2_base + c, mask=c < L2, other=0)
        bx = box_base + tile * 6
        lo0, lo1, lo2 = tl.load(bx), tl.load(bx + 1), tl.load(bx + 2)
        hi0, hi1, hi2 = tl.load(bx + 3), tl.load(bx + 4), tl.load(bx + 5)
        nxt_tile = tl.load(order_ptr + lbase + 1, mask=n_steps > 1, other=0).to(tl.int32)
        nxt_lb = tl.load(lbs_ptr + lbase + 1, mask=n_steps > 1, other=inf)
        j = 0
        go_on = n_steps > 0
        while go_on:
            more = j + 1 < n_steps
            # requested now, used in the next step: entry j + 1's box, candidates, indices; entry j + 2
            cn = nxt_tile * BLOCK_C + cols
            b0n = tl.load(p2_base + cn, mask=cn < L2, other=inf)
            b1n = tl.load(p2_base + P2S + cn, mask=cn < L2, other=inf)
            b2n = tl.load(p2_base + 2 * P2S + cn, mask=cn < L2, other=inf)
            oidxn = tl.load(perm2_base + cn, mask=cn < L2, other=0)
            bxn = box_base + nxt_tile * 6
            lo0n, lo1n, lo2n = tl.load(bxn), tl.load(bxn + 1), tl.load(bxn + 2)
            hi0n, hi1n, hi2n = tl.load(bxn + 3), tl.load(bxn + 4), tl.load(bxn + 5)
            nn_tile = tl.load(order_ptr + lbase + j + 2, mask=j + 2 < n_steps, other=0).to(tl.int32)
            nn_lb = tl.load(lbs_ptr + lbase + j + 2, mask=j + 2 < n_steps, other=inf)
            # entry j, whose loads were requested one step earlier
            g0 = tl.maximum(tl.maximum(lo0 - a0, a0 - hi0), 0.0)
            g1 = tl.maximum(tl.maximum(lo1 - a1, a1 - hi1), 0.0)
            g2 = tl.maximum(tl.maximum(lo2 - a2, a2 - hi2), 0.0)
            if NORM == 2:
                lb = g0 * g0 + g1 * g1 + g2 * g2
            else:
                lb = g0 + g1 + g2
            if K == 1:
                kth = best1_d
            else:
                kth = tl.max(best_d, 0)
            if tl.max(tl.where(qmask & (lb * SHRINK <= kth), 1, 0), 0) > 0:
                dist = _pair_dist3(a0, a1, a2, b0.to(ACC), b1.to(ACC), b2.to(ACC), NORM)
                if K == 1:
                    best1_d, best1_i = _nearest_walk(dist, oidx.to(tl.int32), best1_d, best1_i, LEAN)
                else:
                    best_d, best_i = _topk_walk(dist, oidx.to(tl.int32), best_d, best_i, K, LEAN)
            j += 1
            if K == 1:
                kth = best1_d
            else:
                kth = tl.max(best_d, 0)
            thr = tl.max(tl.where(qmask, kth, -inf), 0)
            go_on = more & (nxt_lb * SHRINK <= thr)
            tile, nxt_tile, nxt_lb = nxt_tile, nn_tile, nn_lb
            b0, b1, b2, oidx = b0n, b1n, b2n, oidxn
            lo0, lo1, lo2, hi0, hi1, hi2 = lo0n, lo1n, lo2n, hi0n, hi1n, hi2n
        row_ok = q < P1
        q_out = tl.load(perm1_ptr + n.to(tl.int64) * P1 + q, mask=row_ok, other=0)
        out_base = n.to(tl.int64) * P1 * K
        if K == 1:
            valid = qmask & (L2 > 0) & (best1_d < inf)
            _store_slot(dist_ptr, idx_ptr, out_base + q_out, row_ok, valid, best1_d, best1_i, True)
        else:
            _store_topk(dist_ptr, idx_ptr, out_base + q_out * K, row_ok, qmask, L2, best_d, best_i, K, KP, True)

    @triton.jit
    def _bbox_kernel(p1_ptr, p2_ptr, len1_ptr, len2_ptr, part_ptr, P1, P2, CH1, CH2,
                     D: tl.constexpr, DM: tl.constexpr, DP: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
        """Partial joint box of both clouds' valid points: program (c, n) covers rows [c*CH, (c+1)*CH) of each cloud
        and writes min and max of the first DM coordinates to part (N, NCH, 2, DP). Many programs per cloud: one
        program per cloud walking 36 000 points took 0.15 ms of latency on an H100."""
        ch = tl.program_id(0)
        n = tl.program_id(1)
        nch = tl.num_programs(0)
        dd = tl.arange(0, DP)
        dmask = dd < DM
        mn = tl.full((DP,), float("inf"), ACC)
        mx = tl.full((DP,), -float("inf"), ACC)
        L1 = tl.minimum(tl.maximum(tl.load(len1_ptr + n).to(tl.int32), 0), P1)
        L2 = tl.minimum(tl.maximum(tl.load(len2_ptr + n).to(tl.int32), 0), P2)
        e1 = tl.minimum(L1, (ch + 1) * CH1)
        for s0 in range(ch * CH1, e1, BLOCK):
            r = s0 + tl.arange(0, BLOCK)
            m2 = (r < e1)[:, None] & dmask[None, :]
            x = tl.load(p1_ptr + n.to(tl.int64) * P1 * D + r[:, None] * D + dd[None, :], mask=m2, other=0.0).to(ACC)
            mn = tl.minimum(mn, tl.min(tl.where(m2, x, float("inf")), 0))
            mx = tl.maximum(mx, tl.max(tl.where(m2, x, -float("inf")), 0))
        e2 = tl.minimum(L2, (ch + 1) * CH2)
        for s0 in range(ch * CH2, e2, BLOCK):
            r = s0 + tl.arange(0, BLOCK)
            m2 = (r < e2)[:, None] & dmask[None, :]
            x = tl.load(p2_ptr + n.to(tl.int64) * P2 * D + r[:, None] * D + dd[None, :], mask=m2, other=0.0).to(ACC)
            mn = tl.minimum(mn, tl.min(tl.where(m2, x, float("inf")), 0))
            mx = tl.maximum(mx, tl.max(tl.where(m2, x, -float("inf")), 0))
        base = part_ptr + (n * nch + ch) * (2 * DP)
        tl.store(base + dd, mn)
        tl.store(base + DP + dd, mx)

    @triton.jit
    def _spread10(v):
        # 10-bit integers -> bits at every third position (3-D Morton interleave), int32
        v = (v | (v << 16)) & 0x030000FF
        v = (v | (v << 8)) & 0x0300F00F
        v = (v | (v << 4)) & 0x030C30C3
        return (v | (v << 2)) & 0x09249249

    @triton.jit
    def _bucket_block(p_ptr, len_ptr, part_ptr, bkt_ptr, cnt_ptr, P, NCH, n, blk, seg,
                      B: tl.constexpr, D: tl.constexpr, DM: tl.constexpr, DP: tl.constexpr, NCHP: tl.constexpr,
                      ACC: tl.constexpr, BLOCK: tl.constexpr):
        r = blk * BLOCK + tl.arange(0, BLOCK)
        rm = r < P
        L = tl.minimum(tl.maximum(tl.load(len_ptr + n).to(tl.int32), 0), P)
        cc = tl.arange(0, NCHP)
        dd = tl.arange(0, DP)
        pm = (cc < NCH)[:, None]
        pb = part_ptr + (n * NCH + cc[:, None]) * (2 * DP) + dd[None, :]
        mn = tl.min(tl.load(pb, mask=pm, other=float("inf")), 0)
        mx = tl.max(tl.load(pb + DP, mask=pm, other=-float("inf")), 0)
        fin = (mn < float("inf")) & (mx > -float("inf"))
        lo = tl.where(fin, mn, 0.0)
        top: tl.constexpr = (1 << B) - 1
        scale = top / tl.maximum(tl.where(fin, mx - lo, 1.0), 1e-30)
        code = tl.zeros((BLOCK,), tl.int32)
        for d in tl.static_range(DM):
            x = tl.load(p_ptr + n.to(tl.int64) * P * D + r * D + d, mask=rm, other=0.0).to(ACC)
            lo_d = tl.sum(tl.where(dd == d, lo, 0.0), 0)
            sc_d = tl.sum(tl.where(dd == d, scale, 0.0), 0)
            g = (x - lo_d) * sc_d
            g = tl.where(g == g, g, 0.0)  # NaN coordinates: anywhere on the curve, results stay exact
            g = tl.minimum(tl.maximum(g, 0.0), top)
            code = code | (_spread10(g.to(tl.int32)) << d)
        # padding points: a bucket of their own after every cell, so each cloud's valid points come first
        code = tl.where(r < L, code, 1 << (3 * B))
        tl.store(bkt_ptr + n.to(tl.int64) * P + r, code, mask=rm)
        tl.atomic_add(cnt_ptr + seg.to(tl.int64) * ((1 << (3 * B)) + 1) + code, 1, mask=rm)

    @triton.jit
    def _bucket_kernel(p1_ptr, p2_ptr, len1_ptr, len2_ptr, part_ptr, bkt_ptr, cnt_ptr, P1, P2, NB1, NCH,
                       B: tl.constexpr, D: tl.constexpr, DM: tl.constexpr, DP: tl.constexpr, NCHP: tl.constexpr,
                       ACC: tl.constexpr, BLOCK: tl.constexpr):
        """Counting-sort pass 1 for both clouds in one launch: each point's cell on a Morton curve of 2^B cells per
        axis over the joint box (reduced from part (N, NCH, 2, DP)) into bkt (N*P1 + N*P2,) int32, and integer
        atomic counts into cnt (2N, 2^(3B) + 1): cloud 1's cloud n is segment n, cloud 2's is segment N + n, the
        last bucket of a segment holds its padding points."""
        pid = tl.program_id(0)
        n = tl.program_id(1)
        N = tl.num_programs(1)
        if pid < NB1:
            _bucket_block(p1_ptr, len1_ptr, part_ptr, bkt_ptr, cnt_ptr, P1, NCH, n, pid, n,
                          B, D, DM, DP, NCHP, ACC, BLOCK)
        else:
            _bucket_block(p2_ptr, len2_ptr, part_ptr, bkt_ptr + N.to(tl.int64) * P1, cnt_ptr, P2, NCH, n, pid - NB1,
                          N + n, B, D, DM, DP, NCHP, ACC, BLOCK)

    @triton.jit
    def _scatter_block(src_ptr, bkt_ptr, end_ptr, lperm_ptr, out_ptr, P, PS, n, blk, seg, seg_base,
                       B: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
        r = blk * BLOCK + tl.arange(0, BLOCK)
        rm = r < P
        dd = tl.arange(0, DP)
        row0 = n.to(tl.int64) * P
        code = tl.load(bkt_ptr + row0 + r, mask=rm, other=0)
        # claim a slot at the end of the bucket's range (integer atomics: the order inside a bucket may differ
        # between runs, the results never do: every comparison in the search is on (distance, original index))
        pos = tl.atomic_add(end_ptr + seg.to(tl.int64) * ((1 << (3 * B)) + 1) + code, -1, mask=rm) - 1
        lp = pos - seg_base
        tl.store(lperm_ptr + row0 + lp, r, mask=rm)
        x = tl.load(src_ptr + (row0 + r[:, None]) * D + dd[None, :], mask=rm[:, None] & (dd < D)[None, :],
                    other=0.0).to(ACC)
        tl.store(out_ptr + n.to(tl.int64) * D * PS + dd[None, :] * PS + lp[:, None], x,
                 mask=rm[:, None] & (dd < D)[None, :])

    @triton.jit
    def _scatter_kernel(p1_ptr, p2_ptr, bkt_ptr, end_ptr, lperm_ptr, out1_ptr, out2_ptr, P1, P2, P1S, P2S, NB1,
                        B: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
        """Counting-sort pass 2 for both clouds: each point takes a slot of its bucket (end (2N*NB,) int32 holds
        the inclusive prefix sums of the counts, decremented here) and is written to its sorted position: the
        coordinate-major copies out1 (N, D, P1S) / out2 (N, D, P2S) in the compute dtype (entries past P left
        unwritten) and lperm (N*P1 + N*P2,) int32, the original index at each sorted position."""
        pid = tl.program_id(0)
        n = tl.program_id(1)
        N = tl.num_programs(1)
        if pid < NB1:
            _scatter_block(p1_ptr, bkt_ptr, end_ptr, lperm_ptr, out1_ptr, P1, P1S, n, pid, n, n * P1,
                           B, D, DP, ACC, BLOCK)
        else:
            off = N.to(tl.int64) * P1
            _scatter_block(p2_ptr, bkt_ptr + off, end_ptr, lperm_ptr + off, out2_ptr, P2, P2S, n, pid - NB1, N + n,
                           off + n * P2, B, D, DP, ACC, BLOCK)

    @triton.jit
    def _box_block(xs_ptr, len_ptr, box_ptr, P, PS, T, n, t,
                   D: tl.constexpr, DP: tl.constexpr, TILE: tl.constexpr):
        c = t * TILE + tl.arange(0, TILE)
        L = tl.minimum(tl.maximum(tl.load(len_ptr + n).to(tl.int32), 0), P)
        valid = c < L
        dd = tl.arange(0, DP)
        dmask = dd < D
        x = tl.load(xs_ptr + n.to(tl.int64) * D * PS + dd[None, :] * PS + c[:, None],
                    mask=valid[:, None] & dmask[None, :], other=0.0)
        lo = tl.min(tl.where(valid[:, None], x, float("inf")), 0)
        hi = tl.max(tl.where(valid[:, None], x, -float("inf")), 0)
        bptr = box_ptr + (n.to(tl.int64) * T + t) * (2 * D)
        tl.store(bptr + dd, lo, mask=dmask)
        tl.store(bptr + D + dd, hi, mask=dmask)

    @triton.jit
    def _tile_box_kernel(xs1_ptr, xs2_ptr, len1_ptr, len2_ptr, box1_ptr, box2_ptr, P1, P2, P1S, P2S, T1, T2,
                         D: tl.constexpr, DP: tl.constexpr, TILE1: tl.constexpr, TILE2: tl.constexpr):
        """Bounding box (lo, hi) of the valid points of every sorted tile of both clouds, in one launch:
        box1 (N, T1, 2, D) from xs1 (N, D, P1S), box2 (N, T2, 2, D) from xs2; an empty tile gets (+inf, -inf)."""
        pid = tl.program_id(0)
        n = tl.program_id(1)
        if pid < T1:
            _box_block(xs1_ptr, len1_ptr, box1_ptr, P1, P1S, T1, n, pid, D, DP, TILE1)
        else:
            _box_block(xs2_ptr, len2_ptr, box2_ptr, P2, P2S, T2, n, pid - T1, D, DP, TILE2)

    @triton.jit
    def _tile_lb_kernel(qbox_ptr, cbox_ptr, lbs_ptr, T1, T2,
                        D: tl.constexpr, NORM: tl.constexpr, ACC: tl.constexpr, BLOCK_T: tl.constexpr):
        """Lower bounds (N, T1, T2) of the distance between query tile t1's box and every candidate tile's box.

        Accumulated over d in the search kernel's order; +inf where either tile is empty.
        """
        t1 = tl.program_id(0)
        n = tl.program_id(1)
        qb = qbox_ptr + (n.to(tl.int64) * T1 + t1) * (2 * D)
        for t0 in range(0, T2, BLOCK_T):
            t = t0 + tl.arange(0, BLOCK_T)
            tm = t < T2
            cb = cbox_ptr + (n.to(tl.int64) * T2 + t) * (2 * D)
            lb = tl.zeros((BLOCK_T,), ACC)
            for d in tl.static_range(D):
                clo = tl.load(cb + d, mask=tm, other=float("inf"))
                chi = tl.load(cb + D + d, mask=tm, other=-float("inf"))
                gap = tl.maximum(tl.maximum(clo - tl.load(qb + D + d), tl.load(qb + d) - chi), 0.0)
                if NORM == 2:
                    lb += gap * gap
                else:
                    lb += gap
            lb = tl.where(lb == lb, lb, float("inf"))
            tl.store(lbs_ptr + (n.to(tl.int64) * T1 + t1) * T2 + t, lb, mask=tm)

    @triton.jit
    def _tile_order_kernel(qbox_ptr, cbox_ptr, lbs_ptr, order_ptr, T1, T2,
                           D: tl.constexpr, NORM: tl.constexpr, ACC: tl.constexpr, F64: tl.constexpr,
                           T2P: tl.constexpr):
        """Query tile t1's box against every candidate tile's box: lower bounds sorted ascending into lbs (N, T1, T2)
        and the tiles in that order into order (N, T1, T2) int32, in one program (ties by tile index).

        The sort runs in registers on int32 keys: the bound's fp32 bits (non-negative floats order like their bits)
        with the low log2(T2P) mantissa bits replaced by the tile index. Dropping those bits rounds the bound down
        (at most 2^-11 relative for 4096 tiles), so lbs, which holds the truncated values, is still a lower bound
        and still ascending: the early exit stays exact. For fp64 boxes the bound is rounded down to fp32 first.
        int32 keys halve the registers and the data each bitonic stage moves against the int64 keys (bits << 32 |
        tile) of v7, which took 0.455 ms per call at 32 x 20 000 x 16 000.
        """
        t1 = tl.program_id(0)
        n = tl.program_id(1)
        t = tl.arange(0, T2P)
        tm = t < T2
        qb = qbox_ptr + (n.to(tl.int64) * T1 + t1) * (2 * D)
        cb = cbox_ptr + (n.to(tl.int64) * T2 + t) * (2 * D)
        lb = tl.zeros((T2P,), ACC)
        for d in tl.static_range(D):
            clo = tl.load(cb + d, mask=tm, other=float("inf"))
            chi = tl.load(cb + D + d, mask=tm, other=-float("inf"))
            gap = tl.maximum(tl.maximum(clo - tl.load(qb + D + d), tl.load(qb + d) - chi), 0.0)
            if NORM == 2:
                lb += gap * gap
            else:
                lb += gap
        # empty tiles (inverted boxes) give NaN or +inf: never visited
        lb = tl.where((lb == lb) & tm, lb, float("inf"))
        l32 = lb.to(tl.float32)
        bits = l32.to(tl.int32, bitcast=True)
        if F64:
            bits = tl.where(l32.to(tl.float64) > lb, bits - 1, bits)  # round down: stays a lower bound
        # -T2P is ~(T2P - 1): the high bits of the bound; +inf keeps its bits (its mantissa is zero)
        key = tl.sort((bits & -T2P) | t)
        out = (n.to(tl.int64) * T1 + t1) * T2 + t
        tl.store(order_ptr + out, key & (T2P - 1), mask=tm)
        lbs = (key & -T2P).to(tl.float32, bitcast=True)
        tl.store(lbs_ptr + out, lbs.to(ACC), mask=tm)

    @triton.jit
    def _merge_rows(pd_ptr, pi_ptr, dist_ptr, idx_ptr, n, num_n, q, L1, L2, S, P1,
                    K: tl.constexpr, KP: tl.constexpr, BLOCK_Q: tl.constexpr):
        """Merge S candidate splits (S, N, P1, K) (+inf / -1 in empty slots, each sorted by (dist, idx), split s
        holding lower candidate indices than split s + 1) of queries q (BLOCK_Q,) of cloud n into dist / idx
        (N, P1, K) with PyTorch3D padding.

        Fixed order (split by split, slot by slot) and the same (dist, idx) rule as the search, so the result is
        the one a single split would give. Loads bypass L1 (.cg): the rows were written by other programs of the
        same launch.
        """
        BIG: tl.constexpr = 2147483647
        inf = float("inf")
        row_ok = q < P1
        qmask = q < L1
        slot = tl.arange(0, KP)
        if K == 1:
            best1_d = tl.full((BLOCK_Q,), inf, tl.float32).to(pd_ptr.dtype.element_ty)
            best1_i = tl.full((BLOCK_Q,), BIG, tl.int32)
            for s in range(S):
                base = (n.to(tl.int64) + s * num_n) * P1
                m = tl.load(pd_ptr + base + q, mask=qmask, other=inf, cache_modifier=".cg")
                mi = tl.load(pi_ptr + base + q, mask=qmask, other=-1, cache_modifier=".cg").to(tl.int32)
                # a later split only holds larger indices: equal distances never replace
                upd = m < best1_d
                best1_d = tl.where(upd, m, best1_d)
                best1_i = tl.where(upd, mi, best1_i)
            valid = qmask & (L2 > 0) & (best1_d < inf)
            tl.store(dist_ptr + n.to(tl.int64) * P1 + q, tl.where(valid, best1_d, 0.0), mask=row_ok)
            tl.store(idx_ptr + n.to(tl.int64) * P1 + q, tl.where(valid, best1_i, 0).to(tl.int64), mask=row_ok)
        else:
            best_d = tl.where(slot[:, None] < K, tl.full((KP, BLOCK_Q), inf, tl.float32), -inf)
            best_d = best_d.to(pd_ptr.dtype.element_ty)
            best_i = tl.zeros((KP, BLOCK_Q), tl.int32) - 1 - slot[:, None]
            for s in range(S):
                base = ((n.to(tl.int64) + s * num_n) * P1 + q) * K
                for k in range(K):
                    m = tl.load(pd_ptr + base + k, mask=qmask, other=inf, cache_modifier=".cg")
                    mi = tl.load(pi_ptr + base + k, mask=qmask, other=-1, cache_modifier=".cg").to(tl.int32)
                    mx = tl.max(best_d, 0)
                    at_mx = best_d == mx[None, :]
                    ev = tl.max(tl.where(at_mx, best_i, -BIG), 0)
                    ins = (m < inf) & ((m < mx) | ((m == mx) & (mi < ev)))
                    sel = at_mx & (best_i == ev[None, :]) & ins[None, :]
                    best_d = tl.where(sel, m[None, :], best_d)
                    best_i = tl.where(sel, mi[None, :], best_i)
            bd = tl.where(slot[:, None] < K, best_d, inf)
            obase = (n.to(tl.int64) * P1 + q) * K
            for k in range(K):
                m = tl.min(bd, 0)
                at_m = bd == m[None, :]
                i_sel = tl.min(tl.where(at_m, best_i, BIG), 0)
                bd = tl.where(at_m & (best_i == i_sel[None, :]), inf, bd)
                valid = qmask & (k < L2) & (m < inf)
                tl.store(dist_ptr + obase + k, tl.where(valid, m, 0.0), mask=row_ok)
                tl.store(idx_ptr + obase + k, tl.where(valid, i_sel, 0).to(tl.int64), mask=row_ok)

    @triton.jit
    def _fixed_point_scale(acc_ptr, STAT, NE, F64: tl.constexpr):
        """(scale, 1 / scale): powers of two such that NE contributions of magnitude <= the maximum stored at
        acc[STAT] (its float bits) sum to less than 2^61 in magnitude once multiplied by scale."""
        bits = tl.load(acc_ptr + STAT)
        if F64:
            mx = bits.to(tl.float64, bitcast=True)
        else:
            mx = bits.to(tl.int32).to(tl.float32, bitcast=True).to(tl.float64)
        bound = mx * NE
        # floor(log2(bound)) from the exponent field (-1023 for 0); |sum| < 2^(e+1) * 2^(60-e) = 2^61
        e = ((bound.to(tl.int64, bitcast=True) >> 52) & 0x7FF) - 1023
        se = tl.minimum(tl.maximum(60 - e, -1000), 1000)
        scale = ((se + 1023) << 52).to(tl.float64, bitcast=True)
        inv = ((1023 - se) << 52).to(tl.float64, bitcast=True)
        return scale, inv

    @triton.jit
    def _knn_bwd_kernel(
        p1_ptr, p2_ptr, len1_ptr, len2_ptr, idx_ptr, g_ptr, gp1_ptr, acc_ptr, gp2_ptr,
        P1, P2, K, GS0, GS1, GS2, STAT, BAD, NE, ND,
        D: tl.constexpr, DP: tl.constexpr, NORM: tl.constexpr, ACC: tl.constexpr, F64: tl.constexpr,
        PHASE: tl.constexpr, WANT_P1: tl.constexpr, WANT_P2: tl.constexpr, BLOCK_Q: tl.constexpr,
        FINISH: tl.constexpr = False, FBLOCK: tl.constexpr = 1024,
    ):
        """Backward over BLOCK_Q queries of cloud n and their K chosen candidates.

        p1 (N, P1, D), p2 (N, P2, D) contiguous; idx (N, P1, K) int64; g: dL/d dists, element (n, i, k) at
        n * GS0 + i * GS1 + k * GS2 (strides, so an expanded gradient needs no copy). c[n, i, k] = dD/dp1 * g is
        the contribution of pair (i, idx[n, i, k]): +c to grad_p1[n, i], -c to grad_p2[n, idx].
        PHASE 0: grad_p1 (N, P1, D) = sum over k in order (WANT_P1), and (WANT_P2) the largest finite |c| into
            acc[STAT] (integer atomic max of its float bits).
        PHASE 1: each finite c as a 64-bit fixed-point integer (scale from acc[STAT], a power of two) added into
            acc[(n * P2 + j) * D + d] with integer atomics; a non-finite c marks acc[BAD + n * P2 + j].
        Integer sums do not depend on the order of the additions, so grad_p2 is bit-identical across runs.
        FINISH (PHASE 1, small N*P2*D = ND): the program that takes the last ticket (acc[STAT + 1], after its own
        additions) converts all of grad_p2 (N, P2, D) itself, which saves the launch of _knn_grad_p2_finish_kernel.
        """
        pid = tl.program_id(0)
        n = tl.program_id(1)
        n64 = n.to(tl.int64)
        L1 = tl.minimum(tl.maximum(tl.load(len1_ptr + n).to(tl.int32), 0), P1)
        L2 = tl.minimum(tl.maximum(tl.load(len2_ptr + n).to(tl.int32), 0), P2)
        q = pid * BLOCK_Q + tl.arange(0, BLOCK_Q)
        qmask = q < L1
        dd = tl.arange(0, DP)
        dmask = dd < D
        pq = tl.load(p1_ptr + (n64 * P1 + q[:, None]) * D + dd[None, :], mask=qmask[:, None] & dmask[None, :],
                     other=0.0).to(ACC)
        acc1 = tl.zeros((BLOCK_Q, DP), ACC)
        amax = tl.zeros((BLOCK_Q, DP), ACC)
        if PHASE == 1:
            scale, inv = _fixed_point_scale(acc_ptr, STAT, NE, F64)
        for k in range(K):
            valid = qmask & (k < L2)
            j = tl.load(idx_ptr + (n64 * P1 + q) * K + k, mask=valid, other=0)
            valid = valid & (j >= 0) & (j < L2)
            gv = tl.load(g_ptr + n64 * GS0 + q * GS1 + k * GS2, mask=valid, other=0.0).to(ACC)
            m2 = valid[:, None] & dmask[None, :]
            pj = tl.load(p2_ptr + (n64 * P2 + j[:, None]) * D + dd[None, :], mask=m2, other=0.0).to(ACC)
            diff = pq - pj
            if NORM == 2:
                c = 2.0 * diff * gv[:, None]
            else:
                # PyTorch3D's subgradient of |x|: +1 where x > 0, else -1 (also at 0), as knn.py's torch path
                c = tl.where(diff > 0, 1.0, -1.0).to(ACC) * gv[:, None]
            c = tl.where(m2, c, 0.0)
            finite = (c == c) & (tl.abs(c) < float("inf"))
            if PHASE == 0:
                if WANT_P1:
                    acc1 += c
                if WANT_P2:
                    amax = tl.maximum(amax, tl.where(finite, tl.abs(c), 0.0))
            else:
                v = tl.floor(c.to(tl.float64) * scale + 0.5).to(tl.int64)
                tl.atomic_add(acc_ptr + (n64 * P2 + j[:, None]) * D + dd[None, :], v, mask=m2 & finite & (v != 0))
                bad = tl.max(tl.where(finite, 0, 1), 1)  # c is 0 (finite) outside m2
                tl.atomic_max(acc_ptr + BAD + n64 * P2 + j, bad.to(tl.int64), mask=valid & (bad > 0))
        if PHASE == 1:
            if FINISH:
                # the usual "last block" pattern: every thread's atomics are issued before the ticket is taken
                tl.debug_barrier()
                total = tl.num_programs(0) * tl.num_programs(1)
                ticket = tl.atomic_add(acc_ptr + STAT + 1, 1, sem="acq_rel", scope="gpu")
                if ticket == total - 1:
                    for r0 in range(0, ND, FBLOCK):
                        _grad_p2_finish_block(acc_ptr, gp2_ptr, r0, ND, STAT, BAD, NE, D, F64, FBLOCK)
        if PHASE == 0:
            if WANT_P1:
                tl.store(gp1_ptr + (n64 * P1 + q[:, None]) * D + dd[None, :], acc1.to(gp1_ptr.dtype.element_ty),
                         mask=(q < P1)[:, None] & dmask[None, :])
            if WANT_P2:
                m = tl.max(tl.max(amax, 1), 0)
                if F64:
                    mbits = m.to(tl.int64, bitcast=True)
                else:
                    mbits = m.to(tl.int32, bitcast=True).to(tl.int64)
                tl.atomic_max(acc_ptr + STAT, mbits)

    @triton.jit
    def _pair_contrib(pa, pb, gv, m2, NORM: tl.constexpr, ACC: tl.constexpr):
        """dD/dp1 * g for rows pa, pb (B, DP) and g (B,), 0 where m2 (B, DP) is False."""
        diff = pa - pb
        if NORM == 2:
            c = 2.0 * diff * gv[:, None]
        else:
            # PyTorch3D's subgradient of |x|: +1 where x > 0, else -1 (also at 0), as knn.py's torch path
            c = tl.where(diff > 0, 1.0, -1.0).to(ACC) * gv[:, None]
        return tl.where(m2, c, 0.0)

    @triton.jit
    def _knn_bwd_small_kernel(
        p1_ptr, p2_ptr, len1_ptr, len2_ptr, idx_ptr, g_ptr, gp1_ptr, gp2_ptr,
        P1, P2, K, GS0, GS1, GS2, NQB,
        D: tl.constexpr, DP: tl.constexpr, NORM: tl.constexpr, ACC: tl.constexpr,
        WANT_P1: tl.constexpr, WANT_P2: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_J: tl.constexpr,
        BLOCK_E: tl.constexpr,
    ):
        """The whole backward of a small problem in one launch, without atomics or zeroing.

        Programs pid < NQB: grad_p1 (N, P1, D) of BLOCK_Q queries of cloud n, a fixed-order sum over k (as
        _knn_bwd_kernel). Programs pid >= NQB own BLOCK_J candidates of cloud n and scan every chosen pair (i, k) of
        the cloud in order, summing the contributions of the pairs that chose them: grad_p2 (N, P2, D), bit-identical
        across runs; a candidate with a non-finite contribution gets NaN. The scan costs N*P1*K*P2 comparisons, so
        the caller takes this path for small problems only. Arguments as _knn_bwd_kernel.
        """
        pid = tl.program_id(0)
        n = tl.program_id(1)
        n64 = n.to(tl.int64)
        L1 = tl.minimum(tl.maximum(tl.load(len1_ptr + n).to(tl.int32), 0), P1)
        L2 = tl.minimum(tl.maximum(tl.load(len2_ptr + n).to(tl.int32), 0), P2)
        dd = tl.arange(0, DP)
        dmask = dd < D
        if pid < NQB:
            if WANT_P1:
                q = pid * BLOCK_Q + tl.arange(0, BLOCK_Q)
                qmask = q < L1
                pq = tl.load(p1_ptr + (n64 * P1 + q[:, None]) * D + dd[None, :],
                             mask=qmask[:, None] & dmask[None, :], other=0.0).to(ACC)
                acc1 = tl.zeros((BLOCK_Q, DP), ACC)
                for k in range(K):
                    valid = qmask & (k < L2)
                    j = tl.load(idx_ptr + (n64 * P1 + q) * K + k, mask=valid, other=0)
                    valid = valid & (j >= 0) & (j < L2)
                    gv = tl.load(g_ptr + n64 * GS0 + q * GS1 + k * GS2, mask=valid, other=0.0).to(ACC)
                    m2 = valid[:, None] & dmask[None, :]
                    pj = tl.load(p2_ptr + (n64 * P2 + j[:, None]) * D + dd[None, :], mask=m2, other=0.0).to(ACC)
                    acc1 += _pair_contrib(pq, pj, gv, m2, NORM, ACC)
                tl.store(gp1_ptr + (n64 * P1 + q[:, None]) * D + dd[None, :], acc1.to(gp1_ptr.dtype.element_ty),
                         mask=(q < P1)[:, None] & dmask[None, :])
        else:
            if WANT_P2:
                jj = (pid - NQB) * BLOCK_J + tl.arange(0, BLOCK_J)
                acc2 = tl.zeros((BLOCK_J, DP), ACC)
                bad = tl.zeros((BLOCK_J,), tl.int32)
                E = L1 * K
                for e0 in range(0, E, BLOCK_E):
                    e = e0 + tl.arange(0, BLOCK_E)
                    i = e // K
                    k = e - i * K
                    valid = (e < E) & (k < L2)
                    j = tl.load(idx_ptr + n64 * P1 * K + e, mask=valid, other=0)
                    valid = valid & (j >= 0) & (j < L2)
                    gv = tl.load(g_ptr + n64 * GS0 + i * GS1 + k * GS2, mask=valid, other=0.0).to(ACC)
                    m2 = valid[:, None] & dmask[None, :]
                    pi = tl.load(p1_ptr + (n64 * P1 + i[:, None]) * D + dd[None, :], mask=m2, other=0.0).to(ACC)
                    pj = tl.load(p2_ptr + (n64 * P2 + j[:, None]) * D + dd[None, :], mask=m2, other=0.0).to(ACC)
                    c = _pair_contrib(pi, pj, gv, m2, NORM, ACC)
                    finite = (c == c) & (tl.abs(c) < float("inf"))
                    cbad = tl.max(tl.where(finite, 0, 1), 1)
                    c = tl.where(finite, c, 0.0)
                    hit = (j[:, None] == jj[None, :]) & valid[:, None]  # (BLOCK_E, BLOCK_J)
                    for d in tl.static_range(D):
                        c_d = tl.sum(tl.where(dd[None, :] == d, c, 0.0), 1)
                        s_d = tl.sum(tl.where(hit, c_d[:, None], 0.0), 0)
                        acc2 += tl.where(dd[None, :] == d, s_d[:, None], 0.0)
                    bad = tl.maximum(bad, tl.max(tl.where(hit, cbad[:, None], 0), 0))
                out = tl.where(bad[:, None] != 0, float("nan"), -acc2)
                tl.store(gp2_ptr + (n64 * P2 + jj[:, None]) * D + dd[None, :], out.to(gp2_ptr.dtype.element_ty),
                         mask=(jj < P2)[:, None] & dmask[None, :])

    @triton.jit
    def _knn_grad_p2_finish_kernel(acc_ptr, out_ptr, ND, STAT, BAD, NE,
                                   D: tl.constexpr, F64: tl.constexpr, BLOCK: tl.constexpr):
        """grad_p2 (N*P2*D,) = -(fixed-point sums) / scale in the output dtype; NaN where a contribution was not
        finite. Exact: int64 -> float64 and the power-of-two division round at most once before the output cast."""
        _grad_p2_finish_block(acc_ptr, out_ptr, tl.program_id(0).to(tl.int64) * BLOCK, ND, STAT, BAD, NE, D, F64,
                              BLOCK)

    @triton.jit
    def _grad_p2_finish_block(acc_ptr, out_ptr, r0, ND, STAT, BAD, NE,
                              D: tl.constexpr, F64: tl.constexpr, BLOCK: tl.constexpr):
        """Elements [r0, r0 + BLOCK) of grad_p2 from the fixed-point sums (loads bypass L1: the sums may have been
        added by other programs of the same launch)."""
        r = r0 + tl.arange(0, BLOCK)
        rm = r < ND
        scale, inv = _fixed_point_scale(acc_ptr, STAT, NE, F64)
        v = tl.load(acc_ptr + r, mask=rm, other=0, cache_modifier=".cg")
        bad = tl.load(acc_ptr + BAD + r // D, mask=rm, other=0, cache_modifier=".cg")
        x = -(v.to(tl.float64) * inv)
        x = tl.where(bad != 0, float("nan"), x)
        if not F64:
            x = x.to(tl.float32)  # through fp32: Triton's interpreter turned a direct fp64 -> bf16 cast into NaN
        tl.store(out_ptr + r, x.to(out_ptr.dtype.element_ty), mask=rm)


# candidate tiles per row sorted in registers by _tile_order_kernel (4096 int64 keys over 8 warps: 16 per thread;
# 8192 took 21 s to compile); longer rows (P2 > 131 072 at 32-candidate tiles) go through torch.sort
_MAX_SORT_TILES = 4096
# brute-force problems below this many pairs (~30 us of search on an H100) read p2 in place instead of a copy (at
# 64x200x10000 = 1.3e8 pairs the in-place loads cost 0.03 ms of device time on an H200 against the copy)
_ROWS_MAX_PAIRS = 1 << 26
# grad_p2 of at most this many elements is converted inside the accumulation launch (by its last program)
_FINISH_IN_KERNEL_MAX = 1 << 16
# backward problems with N*P1*K*P2 at most this many comparisons take the one-launch _knn_bwd_small_kernel; larger
# ones the fixed-point accumulation (zeroing + 2-3 launches). The scan's device time (H200, graph replays of
# fwd+bwd): 1.8e7 comparisons (2x3000x3000, K=1) +0.044 ms over the fixed-point backward, which costs two more
# launches (~0.1 ms of host time on eager calls); 6.4e7 (1x10000x6400) +0.2 ms: more than the launches save
_SCAN_BWD_MAX_PAIRS = 1 << 25


def _run(fn, grid: tuple, *args, **meta) -> None:
    """fn[grid](*args, **meta), through the compiled kernel after the first launch of a specialisation
    (_triton_launch: Triton's per-call argument binding costs more host time than a small search)."""
    grid = tuple(grid) + (1,) * (3 - len(grid))
    _triton_launch.launch(fn, grid, args, meta, (_triton_launch.arg_key(args), tuple(meta.items())))


def _cdiv(a: int, b: int) -> int:
    # host-side ceil division; triton.cdiv is a constexpr function (~10 us of Python per call in triton 3.8)
    return -(-a // b)


def _next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def _acc_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _out_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@functools.lru_cache(maxsize=None)
def _sm_count_cached(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


_SMS: dict = {}


def _sm_count(device: torch.device) -> int:
    sms = _SMS.get(device)
    if sms is None:
        if device.type != "cuda":
            return 4
        sms = _sm_count_cached(device.index if device.index is not None else torch.cuda.current_device())
        if device.index is not None:
            _SMS[device] = sms
    return sms


def _forward_config(N: int, P1: int, P2: int, K: int, D: int, device: torch.device, block_q=None, block_c=None,
                    splits=None, num_warps=None, spatial_sort=None):
    """(block_q, block_c, splits, chunk, num_warps, spatial_sort, candidate rows in place) for one call.

    Cached per shape: eager calls of small problems are bound by host time, and this is pure Python.
    """
    return _forward_config_cached(N, P1, P2, K, D, device.type, _sm_count(device), _interpreting(), block_q, block_c,
                                  splits, num_warps, spatial_sort)


@functools.lru_cache(maxsize=4096)
def _forward_config_cached(N: int, P1: int, P2: int, K: int, D: int, dev_type: str, sms: int, interp: bool,
                           block_q, block_c, splits, num_warps, spatial_sort):
    """The body of _forward_config.

    The (BLOCK_C, BLOCK_Q) tile is laid out one query column per thread (num_warps = BLOCK_Q / 32), so a thread
    holds BLOCK_C candidates of its query and reduces them without crossing threads.
    """
    target = 2 * sms
    if spatial_sort is None:
        # Pruning needs enough work to amortise its ~10 extra launches and enough query tiles to hide the latency
        # of its walk: measured on an H100, brute force took 4.8 ms per 1e10 pairs, so below ~2.7e8 pairs (~0.13 ms)
        # it wins; the tile-pair table must also stay small.
        spatial_sort = (N * P1 * P2 >= (1 << 28) and P2 >= 8 * (block_c or 32) and N * (P1 + P2) < (1 << 31)
                        and N * _cdiv(P1, block_q or 32) * _cdiv(P2, block_c or 32) <= (1 << 25))
    if interp:
        bc = block_c or 16
    elif spatial_sort:
        bc = block_c or (32 if K <= 32 else 16)
    else:
        # brute force, K = 1: 64-candidate tiles measured 4.8 ms vs 6.1 ms with 32 at 32 x 20 000 x 16 000;
        # K > 1 keeps 32 (K = 3 at 64 needs 255 registers)
        bc = block_c or (64 if K == 1 else (32 if K <= 32 else 16))
    if block_q is None:
        if interp:
            bq = 16
        elif spatial_sort:
            # one-warp programs: the early-exit bound is the worst K-th distance of the tile's queries, so small
            # query tiles prune more (simulated on random clouds: 5.6% of pairs at 32 queries, 10% at 128), and
            # their cross-query reductions stay inside one warp
            bq = 32
        elif K > 1 and N * P1 * P2 < (1 << 28):
            # small K > 1 problems: one-warp query tiles; the insertion loop runs as often as the tile's busiest
            # query needs, so fewer queries per tile waste less (H200 sweep, forward device time: 4x5000x5000 K=8
            # 0.28 ms at 32 queries vs 0.36 at 64; 2x3000x3000 K=32 0.30 vs 0.39)
            bq = 32
        else:
            bq = 128
            # fill the GPU with query tiles before resorting to candidate splits
            while bq > 32 and N * _cdiv(P1, bq) < target:
                bq //= 2
    else:
        bq = block_q
    n_qblocks = _cdiv(P1, bq)
    if spatial_sort:
        splits = 1  # each split would need its own bounds; pruning wants the whole candidate cloud
    elif splits is None:
        # too few query tiles to fill the GPU: split the candidates too and merge afterwards. H200 sweep (forward
        # device time by splits): 1x10000x6400 K=1 0.152 / 0.094 / 0.070 / 0.061 ms at 1 / 2 / 4 / 8 splits;
        # 4x5000x5000 K=8 0.31 / 0.28 / 0.29 / 0.36; 2x3000x3000 K=32 0.35 / 0.30 / 0.38 / 0.45: the merge (by one
        # program per query tile, S*K insertions) limits the splits of large K
        want = (8 if K == 1 else 4) * target
        splits = 1
        if N * n_qblocks < want:
            splits = min(_cdiv(want, N * n_qblocks), max(1, P2 // (4 * bc)), max(1, 64 // K))
    splits = max(1, min(int(splits), _cdiv(max(P2, 1), bc)))
    chunk = _cdiv(_cdiv(max(P2, 1), splits), bc) * bc
    splits = _cdiv(max(P2, 1), chunk)
    num_warps = num_warps or max(1, min(8, bq // 32))
    # small brute-force problems read the candidates in place: the coordinate-major copy (16-byte loads) saves
    # device time only where there is device time to save, and costs a launch
    rows = not spatial_sort and N * P1 * P2 < _ROWS_MAX_PAIRS
    return bq, bc, splits, chunk, num_warps, bool(spatial_sort), rows


def _coord_major(x: torch.Tensor, padded: int) -> torch.Tensor:
    """(N, P, D) -> contiguous (N, D, padded) copy in one launch; entries past P are left unwritten (the kernel
    replaces whatever they hold by +inf)."""
    N, P, D = x.shape
    out = torch.empty((N, D, padded), dtype=x.dtype, device=x.device)
    out[:, :, :P].copy_(x.transpose(1, 2))
    return out


class SortedTiles(NamedTuple):
    """One cloud sorted for the SORTED search kernel (made by `sort_tiles`).

    xs (N, D, T*tile) coordinate-major copy in the compute dtype: each cloud's valid points first, in the order of the
    cells of a Morton curve of the first min(D, 3) coordinates (points of one cell in any order), entries past P
    unwritten; perm (N, P) int32: the original index at each sorted position; box (N, T, 2, D): each tile's bounding
    box (lo, hi) of valid points, (+inf, -inf) when empty; lengths (N,) integer: the valid points the sort used;
    part (N, NCH, 2, DP) and bits: the Morton grid (partial boxes whose union is the grid's box, bits per axis), which
    another cloud can be sorted on (`grid`), so that both clouds' tiles follow the same cells.
    """

    xs: torch.Tensor
    perm: torch.Tensor
    box: torch.Tensor
    lengths: torch.Tensor
    tile: int
    part: torch.Tensor
    bits: int


# 3-D sorted searches of 16- or 32-query / 16-, 32- or 64-candidate tiles go through a walk kernel: 1
# _knn_walk3_kernel (the latency-arranged walk; H200, the training step's KNN pair at B = 32, graph replay: search
# kernels 0.699 -> 0.653 ms, pair 0.752 -> 0.721 ms), 2 _knn_walk3p_kernel (loads one tile ahead); 0 never
# (_knn_fwd_kernel). None: _walk_choice decides per search. PROTODEPTH_KNN_WALK3 sets it; benchmarks set it.
_env_walk = os.environ.get("PROTODEPTH_KNN_WALK3")
_WALK3 = int(_env_walk) if _env_walk is not None else None


def _walk_choice(K: int, bc: int, presorted: bool) -> int:
    """Which walk kernel (see _WALK3) a 3-D sorted search with K neighbours and bc-point candidate tiles takes.

    The look-ahead walk for presorted clouds (the training step's searches; H200 graph replays of the step's pair,
    this session's run 2: global direction, K = 3, search kernel 0.073 -> 0.059 ms at B = 2 and 0.254 either way at
    B = 32; slot direction, K = 1 over 32-point tiles, 0.112 -> 0.082 at B = 32 and 0.037 -> 0.030 at B = 2), except
    K = 1 over 64-point tiles (measured with the plain walk only; the look-ahead one holds 127 registers there, the
    plain one 106). knn_points' own sorted path keeps the plain walk (not measured on its shapes)."""
    if _WALK3 is not None:
        return _WALK3
    return 2 if presorted and not (K == 1 and bc == 64) else 1
# the walk kernels' insertion: _topk_insert_lean / _nearest_walk's lean form (1) or _topk_insert / _nearest_update (0).
# Benchmarks set it.
_LEAN = int(os.environ.get("PROTODEPTH_KNN_LEAN", "1"))

# Morton bits per axis for the counting sort; None: chosen from the cloud sizes (_morton_bits). Benchmarks set it.
_MORTON_BITS = None


def _morton_bits(segments: int, pmax: int) -> int:
    """Bits per axis: cells much smaller than a tile on typical clouds, at most 2^24 counters over all segments."""
    if _MORTON_BITS is not None:
        return _MORTON_BITS
    bits = 5 if pmax > 4096 else 4
    while bits > 2 and segments * ((1 << (3 * bits)) + 1) > (1 << 24):
        bits -= 1
    return bits


def sort_tiles(a, la, tile_a: int, b=None, lb=None, tile_b: int = 0, grid: "SortedTiles | None" = None,
               tile_a2: int = 0):
    """Counting sort of cloud a (N, P1, D) (and of b (N, P2, D) in the same launches when given) along a Morton
    curve over their joint box -> (SortedTiles of a, SortedTiles of b or None).

    5 Triton launches, a zeroing and a cumsum whether one cloud or two, no host sync (a torch.sort here cost ~14
    launches). la, lb (N,) integer lengths on the device, clamped by the kernels. grid: the Morton grid of another
    cloud sorted earlier (same N and D) instead of these clouds' own box: one launch fewer, and tiles that follow
    that cloud's cells (a CPU simulation of the step's clouds: 20 instead of 28 tile-list entries walked per query
    tile of the slot direction at 5 bits; points outside the grid's box go to its border cells, still exact).
    tile_a2 (one cloud only): also the boxes of a's tiles of tile_a2 points (one more launch), returned as a third
    SortedTiles sharing a's sorted copy: the cloud then serves as queries in tiles of tile_a and as candidates in
    tiles of tile_a2.
    """
    N, P1, D = a.shape
    two = b is not None
    if not two:  # the two-cloud kernels with an empty second cloud
        b, lb, tile_b = a, la, tile_a
    P2 = b.shape[1] if two else 0
    dev = a.device
    acc_t, acc = _out_dtype(a.dtype), _acc_dtype(a.dtype)
    dm, dp = min(D, 3), _next_pow2(D)
    a = a.detach().contiguous()
    b = b.detach().contiguous() if two else a
    if N * (P1 + P2) >= (1 << 31):  # sorted positions are int32
        raise ValueError(f"p1, p2: N * (P1 + P2) = {N * (P1 + P2)} too large for spatial_sort=True; use False")
    segs = (2 if two else 1) * N
    if grid is not None and grid.part.shape[0] == N and grid.part.dtype == acc_t and grid.part.shape[2:] == (2, dp):
        part, nch, bits = grid.part, grid.part.shape[1], grid.bits
        while bits > 2 and segs * ((1 << (3 * bits)) + 1) > (1 << 24):
            bits -= 1
    else:
        # partial boxes over NCH chunks of both clouds, reduced inside the Morton kernel
        nch = max(1, min(64, _cdiv(max(P1, P2), 2048)))
        part = torch.empty((N, nch, 2, dp), dtype=acc_t, device=dev)
        _run(_bbox_kernel, (nch, N), a, b, la, lb, part, P1, P2, _cdiv(P1, nch), _cdiv(P2, nch),
             D=D, DM=dm, DP=dp, ACC=acc, BLOCK=256)
        bits = _morton_bits(segs, max(P1, P2))
    # counting sort of every cloud of both sides at once: 2N segments of 2^(3B) Morton cells (+1 for padding)
    nbk = (1 << (3 * bits)) + 1
    cnt = torch.zeros(segs * nbk, dtype=torch.int32, device=dev)
    bkt = torch.empty(N * (P1 + P2), dtype=torch.int32, device=dev)
    nb1, nb2 = _cdiv(P1, 1024), _cdiv(P2, 1024)
    _run(_bucket_kernel, (nb1 + nb2, N), a, b, la, lb, part, bkt, cnt, P1, P2, nb1, nch, B=bits, D=D, DM=dm, DP=dp,
         NCHP=_next_pow2(nch), ACC=acc, BLOCK=1024)
    ends = torch.cumsum(cnt, 0, dtype=torch.int32)
    T1, T2 = _cdiv(P1, tile_a), _cdiv(P2, tile_b)
    pad1 = max(tile_a, tile_a2)  # both tilings read whole tiles of the copy (powers of two)
    xs1 = torch.empty((N, D, _cdiv(P1, pad1) * pad1), dtype=acc_t, device=dev)
    xs2 = torch.empty((N, D, T2 * tile_b), dtype=acc_t, device=dev) if two else xs1
    lperm = torch.empty(N * (P1 + P2), dtype=torch.int32, device=dev)
    nb1, nb2 = _cdiv(P1, 256), _cdiv(P2, 256)
    _run(_scatter_kernel, (nb1 + nb2, N), a, b, bkt, ends, lperm, xs1, xs2, P1, P2, xs1.shape[2], T2 * tile_b, nb1,
         B=bits, D=D, DP=dp, ACC=acc, BLOCK=256)
    box1 = torch.empty((N, T1, 2, D), dtype=acc_t, device=dev)
    box2 = torch.empty((N, T2, 2, D), dtype=acc_t, device=dev) if two else box1
    _run(_tile_box_kernel, (T1 + T2, N), xs1, xs2, la, lb, box1, box2, P1, P2, xs1.shape[2], T2 * tile_b, T1, T2,
         D=D, DP=dp, TILE1=tile_a, TILE2=tile_b)
    s1 = SortedTiles(xs1, lperm[:N * P1].view(N, P1), box1, la, tile_a, part, bits)
    s2 = SortedTiles(xs2, lperm[N * P1:].view(N, P2), box2, lb, tile_b, part, bits) if two else None
    if tile_a2 and not two:
        T3 = _cdiv(P1, tile_a2)
        box3 = torch.empty((N, T3, 2, D), dtype=acc_t, device=dev)
        _run(_tile_box_kernel, (T3, N), xs1, xs1, la, la, box3, box3, P1, 0, xs1.shape[2], 0, T3, 0,
             D=D, DP=dp, TILE1=tile_a2, TILE2=tile_a2)
        return s1, s1._replace(box=box3, tile=tile_a2)
    return s1, s2


# num_warps of _tile_order_kernel; None: one warp per 1024 keys (sm_90 PTX of a 1024-key row: one warp sorts in
# registers and shuffles, 103 registers, no shared memory or barrier, ~9 500 instructions; four warps need 71 barriers
# and ~4 x 4 100 instructions). Benchmarks set it.
_ORDER_WARPS = None


def tile_order(qs: SortedTiles, cs: SortedTiles, norm: int):
    """The candidate tiles of cs for each query tile of qs, by ascending box-to-box lower bound: (order (N, T1, T2)
    int32 (int64 beyond _MAX_SORT_TILES tiles), lbs (N, T1, T2) those bounds, +inf for empty tiles). One launch."""
    N, T1, _, D = qs.box.shape
    T2 = cs.box.shape[1]
    acc_t = qs.box.dtype
    acc = _acc_dtype(acc_t)
    lbs = torch.empty((N, T1, T2), dtype=acc_t, device=qs.box.device)
    t2p = _next_pow2(T2)
    if t2p <= _MAX_SORT_TILES:
        order = torch.empty((N, T1, T2), dtype=torch.int32, device=qs.box.device)
        warps = _ORDER_WARPS or max(1, t2p // 1024)
        _run(_tile_order_kernel, (T1, N), qs.box, cs.box, lbs, order, T1, T2, D=D, NORM=norm, ACC=acc,
             F64=acc_t == torch.float64, T2P=t2p, num_warps=warps)
    else:  # a row too long for one program's registers
        _run(_tile_lb_kernel, (T1, N), qs.box, cs.box, lbs, T1, T2, D=D, NORM=norm, ACC=acc, BLOCK_T=256)
        lbs, order = torch.sort(lbs, dim=2)
    return order, lbs


def _check_inputs(p1, p2, lengths1, lengths2, K, norm):
    if triton is None:
        raise RuntimeError(f"triton is not importable: {_TRITON_ERROR}")
    if not isinstance(p1, torch.Tensor) or p1.dim() != 3:
        raise ValueError(f"p1 must be a (N, P1, D) tensor, got {getattr(p1, 'shape', type(p1))}")
    if not isinstance(p2, torch.Tensor) or p2.dim() != 3:
        raise ValueError(f"p2 must be a (N, P2, D) tensor, got {getattr(p2, 'shape', type(p2))}")
    if p1.shape[0] != p2.shape[0] or p1.shape[2] != p2.shape[2]:
        raise ValueError(f"p1 {tuple(p1.shape)} and p2 {tuple(p2.shape)} must agree in N and D")
    if not 1 <= p1.shape[2] <= MAX_D:
        raise ValueError(f"p1: point dimension D must be in [1, {MAX_D}] for the Triton kernel, got {p1.shape[2]}")
    if p1.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64) or p2.dtype != p1.dtype:
        raise ValueError(f"p1 and p2 must share a float dtype (fp32/fp16/bf16/fp64), got {p1.dtype}, {p2.dtype}")
    if p1.device != p2.device:
        raise ValueError(f"p1 and p2 must be on one device, got {p1.device} and {p2.device}")
    if isinstance(K, bool) or not isinstance(K, int) or not 1 <= K <= MAX_K:
        raise ValueError(f"K must be an int in [1, {MAX_K}] for the Triton path, got {K!r}")
    if norm not in (1, 2):
        raise ValueError(f"norm must be 1 or 2, got {norm!r}")
    for name, lengths in (("lengths1", lengths1), ("lengths2", lengths2)):
        if lengths.shape != (p1.shape[0],):
            raise ValueError(f"{name} must have shape ({p1.shape[0]},), got {tuple(lengths.shape)}")
        if lengths.dtype.is_floating_point or lengths.dtype.is_complex or lengths.dtype == torch.bool:
            raise ValueError(f"{name} must be an integer tensor, got {lengths.dtype}")
    if p1.device.type != "cuda" and not _interpreting():
        raise ValueError(f"p1 must be a CUDA tensor (or set TRITON_INTERPRET=1 for CPU), got {p1.device}")


def _knn_forward(p1, p2, lengths1, lengths2, K, norm, block_q=None, block_c=None, splits=None, num_warps=None,
                 spatial_sort=None, presorted=None):
    """(dists (N, P1, K) fp32 (fp64 for fp64 inputs), idx (N, P1, K) int64), sorted ascending, PyTorch3D padding.

    lengths (N,) integer tensors on p1's device; the kernels clamp them to [0, P1] / [0, P2]. Launches: small brute
    force problems 1 (candidates read in place; candidate splits merged in the kernel, its tickets kept per
    stream), larger ones + 1 candidate copy; the sorted path about 9, 2 with `presorted` (SortedTiles of p1 and of
    p2, made with these lengths: only the tile order and the search are left). No host sync.
    """
    N, P1, D = p1.shape
    P2 = p2.shape[1]
    dev = p1.device
    out_dtype = _out_dtype(p1.dtype)
    if N == 0 or P1 == 0:
        return torch.zeros(N, P1, K, dtype=out_dtype, device=dev), torch.zeros(N, P1, K, dtype=torch.int64, device=dev)
    l1, l2 = lengths1, lengths2
    if presorted is not None:
        s1, s2 = presorted
        bq, bc, S, chunk, sort, rows = s1.tile, s2.tile, 1, 0, True, False
        warps = num_warps or max(1, bq // 32)
    else:
        bq, bc, S, chunk, warps, sort, rows = _forward_config(N, P1, P2, K, D, dev, block_q, block_c, splits,
                                                              num_warps, spatial_sort)
    p1d = p1.detach()
    T1 = _cdiv(P1, bq)
    if sort and P2 > 0:
        if presorted is None:
            s1, s2 = sort_tiles(p1d, l1, bq, p2.detach(), l2, bc)
        order, lbs = tile_order(s1, s2, norm)
        p1c, p2c, perm1, perm2, box = s1.xs, s2.xs, s1.perm, s2.perm, s2.box
        T2 = order.shape[2]
        p1n, q_sd, q_sq, p2s = D * p1c.shape[2], p1c.shape[2], 1, p2c.shape[2]
    else:
        sort = False
        # queries are read in place from the (N, P1, D) rows (one query per thread); candidates too on small
        # problems, otherwise from a coordinate-major copy padded to whole tiles (16-byte loads; one launch)
        p1c = p1d if p1d.is_contiguous() else p1d.contiguous()
        if rows:
            p2c, p2s = (p2.detach() if p2.is_contiguous() else p2.detach().contiguous()), P2
        else:
            p2c = _coord_major(p2.detach(), _cdiv(max(P2, 1), bc) * bc)
            p2s = p2c.shape[2]
        p1n, q_sd, q_sq = P1 * D, 1, D
        perm1 = perm2 = box = order = lbs = l1  # never read
        T2 = 1
    dists = torch.empty(N, P1, K, dtype=out_dtype, device=dev)
    idx = torch.empty(N, P1, K, dtype=torch.int64, device=dev)
    if S == 1:
        part_d, part_i, tickets = dists, idx, l1  # tickets never read
    else:
        # the S partial rows and one merge ticket per query tile
        part_d = torch.empty(S, N, P1, K, dtype=out_dtype, device=dev)
        part_i = torch.empty(S, N, P1, K, dtype=torch.int32, device=dev)
        tickets = _tickets(N * T1, dev)
    kp = _next_pow2(max(K, 2))
    # (any tiles under the interpreter, whose 16-point tiles stand for the GPU's 32; 16-query tiles: one warp, two
    # lanes per query)
    walk = _walk_choice(K, bc, presorted is not None) if sort and D == 3 and S == 1 else 0
    if walk and ((bq in (16, 32) and bc in (16, 32, 64)) or _interpreting()):
        _run(_knn_walk3p_kernel if walk == 2 else _knn_walk3_kernel, (T1, N), p1c, p2c, l1, l2, dists, idx, perm1,
             perm2, box, order, lbs,
             P1, P2, q_sd, p2s, T1, T2, K=K, KP=kp, NORM=norm, ACC=_acc_dtype(p1.dtype), BLOCK_Q=bq, BLOCK_C=bc,
             LEAN=bool(_LEAN), num_warps=warps)
        return dists, idx
    _run(
        _knn_fwd_kernel, (T1, N, S), p1c, p2c, l1, l2, part_d, part_i, perm1, perm2, box, order, lbs, dists, idx, tickets,
        P1, P2, p1n, q_sd, p2s, chunk, T1, T2,
        K=K, KP=kp, D=D, NORM=norm, ACC=_acc_dtype(p1.dtype), FINAL=(S == 1), SORTED=sort, Q_SQ=q_sq,
        BLOCK_Q=bq, BLOCK_C=bc, C_ROWS=rows, TICKET=(S > 1), num_warps=warps,
    )
    return dists, idx


def _backward_scans(N: int, P1: int, K: int, P2: int) -> bool:
    """Whether grad_p2 comes from the one-launch candidate scan (small problems) or the fixed-point sums."""
    return N * P1 * K * P2 <= _SCAN_BWD_MAX_PAIRS


_TICKETS: dict = {}


def _tickets(n: int, device: torch.device) -> torch.Tensor:
    """At least n int32 zeros for the merge tickets of one search launch, which leaves them at zero again.

    Eagerly one buffer per (device, stream), kept between calls: a zeroing per call is a launch, and launches are
    what small eager calls pay for; launches on one stream run in order, so they never share a counter at the same
    time. While a CUDA graph is being captured, fresh zeros instead: the graph owns them and its replays cannot
    meet another stream's launches on them.
    """
    if device.type == "cuda":
        if torch.cuda.is_current_stream_capturing():
            return torch.zeros(n, dtype=torch.int32, device=device)
        key = (device, torch.cuda.current_stream(device).cuda_stream)
    else:
        key = (device, None)  # the interpreter: programs run one after another
    buf = _TICKETS.get(key)
    if buf is None or buf.numel() < n:
        # a replaced buffer may still be in use by this stream's queued launches; the caching allocator hands its
        # memory out again only in this stream's order, after them
        buf = _TICKETS[key] = torch.zeros(max(n, 1 << 14), dtype=torch.int32, device=device)
    return buf


def _knn_backward(p1, p2, lengths1, lengths2, idx, grad_dists, norm, want_p1=True, want_p2=True):
    """(grad_p1 (N, P1, D) or None, grad_p2 (N, P2, D) or None) in the inputs' dtype; only the wanted ones computed.

    Small problems (N*P1*K*P2 <= _SCAN_BWD_MAX_PAIRS): both in one launch of _knn_bwd_small_kernel (fixed-order
    float sums, candidate blocks scanning the chosen pairs). Otherwise grad_p1: one launch, a fixed-order sum over k
    per query; grad_p2: 64-bit fixed-point sums through integer atomics (order-independent, so bit-identical across
    runs; no float atomics): zeroed accumulator, largest contribution (for the scale), accumulation, conversion (in
    the accumulation launch when grad_p2 is small, else its own). The scale is a power of two
    with sum bound 2^61 for N*P1*K contributions, so each candidate's gradient carries an absolute error of at most
    (its number of contributions) * max|contribution| * N*P1*K * 2^-60, far below fp32 rounding at these sizes.
    No host sync.
    """
    N, P1, D = p1.shape
    P2 = p2.shape[1]
    K = idx.shape[2]
    dev = p1.device
    if N * P1 == 0 or P2 == 0:  # no chosen pairs
        return (torch.zeros_like(p1) if want_p1 else None), (torch.zeros_like(p2) if want_p2 else None)
    a = p1.detach()
    a = a if a.is_contiguous() else a.contiguous()
    b = p2.detach()
    b = b if b.is_contiguous() else b.contiguous()
    idx = idx if idx.is_contiguous() else idx.contiguous()
    f64 = p1.dtype == torch.float64
    interp = _interpreting()
    bq = 16 if interp else 128
    dp = _next_pow2(D)
    gs = grad_dists.stride()
    grad_p1 = torch.empty_like(a) if want_p1 else None
    if want_p2 and _backward_scans(N, P1, K, P2):
        # one launch, no zeroing: each candidate block scans every chosen pair of its cloud
        grad_p2 = torch.empty_like(b)
        nqb = _cdiv(P1, bq) if want_p1 else 0
        bj = 16 if interp else 32
        _run(_knn_bwd_small_kernel, (nqb + _cdiv(P2, bj), N), a, b, lengths1, lengths2, idx, grad_dists,
             grad_p1 if want_p1 else a, grad_p2, P1, P2, K, gs[0], gs[1], gs[2], nqb, D=D, DP=dp, NORM=norm,
             ACC=_acc_dtype(p1.dtype), WANT_P1=want_p1, WANT_P2=True, BLOCK_Q=bq, BLOCK_J=bj,
             BLOCK_E=32 if interp else 128, num_warps=4)
        return grad_p1, grad_p2
    grid = (_cdiv(P1, bq), N)
    nd = N * P2 * D
    stat, bad = nd + N * P2, nd
    # accumulator: N*P2*D fixed-point sums, N*P2 non-finite flags, the max |contribution| bits, the finish ticket
    acc = torch.zeros(nd + N * P2 + 2 if want_p2 else 1, dtype=torch.int64, device=dev)
    ne = float(N * P1 * K)
    blk = 256 if interp else 1024
    # small grad_p2: converted by the last program of the accumulation (a few us of one program's time) instead
    # of a third launch (~30-80 us of host time on eager calls)
    finish = nd <= _FINISH_IN_KERNEL_MAX
    common = dict(D=D, DP=dp, NORM=norm, ACC=_acc_dtype(p1.dtype), F64=f64, WANT_P1=want_p1, WANT_P2=want_p2,
                  BLOCK_Q=bq, FINISH=finish, FBLOCK=blk, num_warps=4)
    grad_p2 = torch.empty_like(b) if want_p2 else a
    _run(_knn_bwd_kernel, grid, a, b, lengths1, lengths2, idx, grad_dists, grad_p1 if want_p1 else a, acc, a,
         P1, P2, K, gs[0], gs[1], gs[2], stat, bad, ne, nd, PHASE=0, **common)
    if not want_p2:
        return grad_p1, None
    _run(_knn_bwd_kernel, grid, a, b, lengths1, lengths2, idx, grad_dists, a, acc, grad_p2,
         P1, P2, K, gs[0], gs[1], gs[2], stat, bad, ne, nd, PHASE=1, **common)
    if not finish:
        _run(_knn_grad_p2_finish_kernel, (_cdiv(nd, blk),), acc, grad_p2, nd, stat, bad, ne, D=D, F64=f64, BLOCK=blk)
    return grad_p1, grad_p2


class _KnnPointsTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, p1, p2, lengths1, lengths2, K, norm, tiling, presorted=None):
        dists, idx = _knn_forward(p1, p2, lengths1, lengths2, K, norm, *tiling, presorted=presorted)
        ctx.save_for_backward(p1, p2, lengths1, lengths2, idx)
        ctx.norm = norm
        ctx.mark_non_differentiable(idx)
        return dists, idx

    @staticmethod
    def backward(ctx, grad_dists, grad_idx):
        want_p1, want_p2 = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if grad_dists is None or not (want_p1 or want_p2):
            return (None,) * 8
        p1, p2, lengths1, lengths2, idx = ctx.saved_tensors
        # only what autograd asks for: in a Chamfer term one cloud is often data without gradient
        g1, g2 = _knn_backward(p1, p2, lengths1, lengths2, idx, grad_dists, ctx.norm, want_p1, want_p2)
        return (g1, g2) + (None,) * 6


def knn_points_triton(
    p1: torch.Tensor,
    p2: torch.Tensor,
    lengths1: torch.Tensor | None = None,
    lengths2: torch.Tensor | None = None,
    K: int = 1,
    norm: int = 2,
    *,
    block_q: int | None = None,
    block_c: int | None = None,
    splits: int | None = None,
    num_warps: int | None = None,
    spatial_sort: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """K nearest neighbours in p2 of every point of p1, on the GPU, without a distance matrix.

    Args:
        p1: (N, P1, D) queries, fp32/fp16/bf16/fp64, CUDA (CPU only under TRITON_INTERPRET=1).
        p2: (N, P2, D) candidates, same dtype and device.
        lengths1: (N,) int64 valid queries per cloud (None: all P1); values are clamped to [0, P1].
        lengths2: (N,) int64 valid candidates per cloud (None: all P2); clamped to [0, P2].
        K: neighbours per query >= 1; K > 128 or D > 16 go to knn.py's blocked torch path.
        norm: 2 for squared Euclidean distances, 1 for L1.
        block_q, block_c, splits, num_warps: tiling overrides for tests and benchmarks (None: heuristics).
        spatial_sort: search Morton-sorted copies and skip candidate tiles whose bounding box is farther than every
            query's current K-th distance (exact; None: on when P2 >= 8 candidate tiles).

    Returns (always ascending in (dist, idx)):
        dists: (N, P1, K) float32 (float64 for fp64 inputs; fp16/bf16 inputs are accumulated and returned in fp32),
            differentiable w.r.t. p1 and p2 with a deterministic backward.
        idx: (N, P1, K) int64 indices into p2. Padded queries (i >= lengths1[n]) and slots k >= lengths2[n] hold
            dists 0 and idx 0, as in PyTorch3D.
    """
    N = p1.shape[0] if isinstance(p1, torch.Tensor) and p1.dim() == 3 else None
    if lengths1 is None and N is not None:
        lengths1 = torch.full((N,), p1.shape[1], dtype=torch.int64, device=p1.device)
    if lengths2 is None and N is not None and isinstance(p2, torch.Tensor) and p2.dim() == 3:
        lengths2 = torch.full((N,), p2.shape[1], dtype=torch.int64, device=p1.device)
    if lengths1 is None or lengths2 is None:
        _check_inputs(p1, p2, torch.empty(0), torch.empty(0), K, norm)
    too_big = isinstance(K, int) and not isinstance(K, bool) and K > MAX_K
    if isinstance(p1, torch.Tensor) and p1.dim() == 3 and (too_big or p1.shape[2] > MAX_D):
        # beyond the register budget of one program: the blocked torch path gives the same answer
        from .knn import _knn_points_torch

        return _knn_points_torch(p1, p2, lengths1, lengths2, K, norm)
    _check_inputs(p1, p2, lengths1, lengths2, K, norm)
    # the kernels read int32/int64 lengths on the device and clamp them; anything else costs a conversion launch
    if lengths1.device != p1.device or lengths1.dtype not in (torch.int32, torch.int64):
        lengths1 = lengths1.to(device=p1.device, dtype=torch.int64)
    if lengths2.device != p1.device or lengths2.dtype not in (torch.int32, torch.int64):
        lengths2 = lengths2.to(device=p1.device, dtype=torch.int64)
    tiling = (block_q, block_c, splits, num_warps, spatial_sort)
    return _KnnPointsTriton.apply(p1, p2, lengths1, lengths2, K, norm, tiling)


_DEFAULT_TILING = (None, None, None, None, None)


def knn_points_validated(p1: torch.Tensor, p2: torch.Tensor, lengths1: torch.Tensor, lengths2: torch.Tensor, K: int,
                         norm: int) -> tuple[torch.Tensor, torch.Tensor]:
    """knn_points_triton for arguments `knn.knn_points` has already checked (shapes, float dtypes, one device, K, norm;
    lengths int64 (N,) on that device): the same result without a second round of checks, which cost ~25 us of
    host time per call, as much as a small search takes on the GPU."""
    if K > MAX_K or p1.shape[2] > MAX_D:
        from .knn import _knn_points_torch

        return _knn_points_torch(p1, p2, lengths1, lengths2, K, norm)
    if p2.dtype != p1.dtype:
        raise ValueError(f"p1 and p2 must share a float dtype (fp32/fp16/bf16/fp64), got {p1.dtype}, {p2.dtype}")
    return _KnnPointsTriton.apply(p1, p2, lengths1, lengths2, K, norm, _DEFAULT_TILING)


def knn_points_presorted(p1: torch.Tensor, p2: torch.Tensor, s1: SortedTiles, s2: SortedTiles, K: int,
                         norm: int) -> tuple[torch.Tensor, torch.Tensor]:
    """knn_points_validated for clouds already sorted by `sort_tiles`: s1 of p1 (its tile = the query tile), s2 of
    p2 (the candidate tile), each with the lengths it was sorted with (used here). The search then costs 2 launches
    (tile order, search); a cloud sorted once serves both directions of a Chamfer term. K <= 32 (the candidate
    tile holds the running top-K of 32-point tiles in registers)."""
    if not 1 <= K <= 32:
        raise ValueError(f"K: expected an integer in [1, 32] for presorted clouds, got {K!r}")
    return _KnnPointsTriton.apply(p1, p2, s1.lengths, s2.lengths, K, norm, _DEFAULT_TILING, (s1, s2))
