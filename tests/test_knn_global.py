"""The training step's global KNN direction (target -> K = 3 nearest predicted points, issue 17) and its pair: the walk
kernels' lean insertion (`_topk_insert_lean`, the lean K = 1 update), the look-ahead walk (`_knn_walk3p_kernel`),
16-query and 64-candidate tiles give the results of the general sorted search, bit for bit; which walk kernel and
which candidate tiles the step's searches take.

The kernels run on CPU tensors under TRITON_INTERPRET=1 in one background job (the variable must be set before triton
is imported); CUDA tests (marked `cuda`) check the same on a GPU at the step's B = 2 shape.
"""
from __future__ import annotations

import os
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from triton_markers import HAVE_TRITON, needs_cuda, needs_triton

REPO = Path(__file__).resolve().parents[1]


_INTERP_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    assert os.environ.get("TRITON_INTERPRET") == "1"
    import torch
    sys.path.insert(0, sys.argv[1])
    import protodepth.geometry.knn_triton as kt
    from protodepth.geometry.knn_sorted import knn_points_sorted, sort_cloud

    g = torch.Generator().manual_seed(0)
    out = {}
    # forward: the walk kernels (1: _knn_walk3_kernel, 2: _knn_walk3p_kernel) with the lean insertion against the
    # general sorted search (_WALK3 = 0: _knn_fwd_kernel, _topk_insert / _nearest_update); exact ties (repeated
    # candidates, a query at the centre of equidistant ones), padded queries and a last candidate tile cut by lengths
    for K, norm in ((3, 2), (5, 1), (2, 2), (1, 2)):
        p1 = torch.randn(2, 37, 3, generator=g) * 1.5; p2 = torch.randn(2, 45, 3, generator=g)
        p2[:, 20:30] = p2[:, 0:10]
        p2[0, 30:40] = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [-1.0, 0, 0], [0, -1.0, 0]] * 2)
        p1[0, :5] = 0.0
        l1 = torch.tensor([37, 20]); l2 = torch.tensor([45, 13])
        rows = {}
        # the shipped insertion (lean) in both walk kernels; the old one (PROTODEPTH_KNN_LEAN=0, a benchmark knob) is
        # left to the CUDA test, to keep this interpreter job short
        for walk, lean in ((0, 0), (1, 1), (2, 1)):
            kt._WALK3, kt._LEAN = walk, lean
            s2 = sort_cloud(p2, l2, sort=True)
            s1 = sort_cloud(p1, l1, sort=True, grid=s2)
            r = knn_points_sorted(s1, s2, K=K, norm=norm)
            rows[(walk, lean)] = (r.dists, r.idx)
        kt._WALK3, kt._LEAN = None, 1
        ref = rows.pop((0, 0))
        out[f"fwd/K{K}/n{norm}"] = dict(
            equal={f"walk{w}/lean{le}": bool(torch.equal(d, ref[0]) and torch.equal(i, ref[1]))
                   for (w, le), (d, i) in rows.items()},
            ties=int((ref[0][0, :5, 1:] == ref[0][0, :5, :-1]).sum()))
    # a cloud of more than CANDIDATE_TILE_64_MIN_POINTS points sorted in 32-point query tiles: also 64-point candidate
    # tiles, taken by K = 1 searches (K > 1: the 32-point tiles); both against knn_points' torch path
    from protodepth.geometry.knn import knn_points

    big = torch.randn(1, 8200, 3, generator=g); lb = torch.tensor([8150])
    sb = sort_cloud(big, lb, sort=True, tile=32)
    small = sort_cloud(torch.randn(1, 16, 3, generator=g) * 0.5, sort=True, grid=sb)
    for K in (1, 3):
        r = knn_points_sorted(small, sb, K=K)
        ref = knn_points(small.points, big, lengths2=lb, K=K)
        out[f"ctile64/K{K}"] = dict(ctile=sb.ctiles.tile, tile=sb.tiles.tile,
                                    equal=bool(torch.equal(r.dists, ref.dists) and torch.equal(r.idx, ref.idx)))
    print("JSON" + json.dumps(out))
    """
)


def _interpreter_run(folder: Path):
    """The interpreter job (a trainer_utils background job: it runs beside the session's other tests)."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    return [sys.executable, "-c", _INTERP_SCRIPT, str(REPO)], env, {}


BACKGROUND_JOBS = {"interp_global": _interpreter_run} if HAVE_TRITON else {}


@pytest.fixture(scope="module")
def interp_global():
    if not HAVE_TRITON:
        pytest.skip("triton is not importable on this machine")
    from trainer_utils import background_json_report

    return background_json_report("interp_global", _interpreter_run)


@needs_triton
def test_interpreter_lean_insertion_and_lookahead_walk_equal_the_general_search(interp_global):
    rows = {k: v for k, v in interp_global.items() if k.startswith("fwd/")}
    assert len(rows) == 4, sorted(interp_global)
    for name, r in rows.items():
        assert all(r["equal"].values()), f"{name}: {r}"
    assert rows["fwd/K3/n2"]["ties"] > 0  # the centred query's equidistant candidates reached the output


@needs_triton
def test_interpreter_large_cloud_takes_64_point_candidate_tiles_for_k1_and_32_for_k3(interp_global):
    for K in (1, 3):
        r = interp_global[f"ctile64/K{K}"]
        assert r["ctile"] == 64 and r["tile"] == 32 and r["equal"], r


def test_step_searches_take_the_lookahead_walk_except_k1_over_64_point_tiles(monkeypatch):
    from protodepth.geometry import knn_sorted as ks
    from protodepth.geometry import knn_triton as kt

    monkeypatch.setattr(kt, "_WALK3", None)
    assert kt._walk_choice(3, 32, presorted=True) == 2 and kt._walk_choice(1, 32, presorted=True) == 2
    assert kt._walk_choice(1, 64, presorted=True) == 1
    assert kt._walk_choice(3, 32, presorted=False) == 1  # knn_points' own sorted path: unchanged
    monkeypatch.setattr(kt, "_WALK3", 0)
    assert kt._walk_choice(3, 32, presorted=True) == 0
    # the step's targets (10 000 or 20 000 points per image) as candidates: 64-point tiles; its 3 200-6 400 predicted
    # points: 32
    assert ks._default_candidate_tile(10000, 32) == 64 and ks._default_candidate_tile(6400, 32) == 32
    assert ks._default_candidate_tile(20000, 16) == 16


def test_k_above_1_searches_take_the_32_point_tiles_of_a_cloud_tiled_in_64_for_candidates(monkeypatch):
    from collections import namedtuple

    from protodepth.geometry import knn_triton as kt
    from protodepth.geometry.knn_sorted import SortedCloud, knn_points_sorted

    tiles = namedtuple("Tiles", "tile")
    seen = []

    def presorted(a, b, s1, s2, K, norm):
        seen.append(s2.tile)
        return torch.zeros(a.shape[0], a.shape[1], K), torch.zeros(a.shape[0], a.shape[1], K, dtype=torch.int64)

    monkeypatch.setattr(kt, "knn_points_presorted", presorted)
    q = SortedCloud(torch.randn(1, 5, 3), torch.tensor([5]), tiles(32), True)
    c = SortedCloud(torch.randn(1, 9, 3), torch.tensor([9]), tiles(32), True, tiles(64))
    for K in (1, 3):
        knn_points_sorted(q, c, K=K)
    assert seen == [64, 32]


def _flags(**kw):
    """Set knn_triton's module flags; returns their previous values."""
    from protodepth.geometry import knn_triton as kt

    old = {k: getattr(kt, k) for k in kw}
    for k, v in kw.items():
        setattr(kt, k, v)
    return old


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("walk,lean,qtile,ctile", [
    (1, 1, 32, 32), (2, 1, 32, 32), (2, 0, 32, 32), (1, 1, 16, 32), (2, 1, 16, 32), (1, 1, 32, 64), (2, 1, 32, 64),
    (None, 1, 32, None)])
def test_cuda_walk_kernels_equal_the_general_search_on_the_step_clouds(walk, lean, qtile, ctile):
    """The target as queries in tiles of qtile points (16: one warp, two lanes per query), as candidates in tiles of
    ctile points (None: sort_cloud's default, 64 here); walk None: the kernel _walk_choice picks."""
    from protodepth.benchmarks.knn_pair import make_inputs
    from protodepth.geometry.knn_sorted import knn_points_sorted, sort_cloud

    pred, target, lengths = make_inputs("b2", seed=5)
    lengths[1] = 7001
    pred[0, 100:140] = pred[0, 0:40]  # exact ties between predicted points
    st = sort_cloud(target, lengths, sort=True, tile=qtile, candidate_tile=ctile)
    sp = sort_cloud(pred, sort=True, grid=st)
    assert st.tiles.tile == qtile and st.ctiles.tile == (ctile or 64)
    res = {}
    for key, flags in (("ref", dict(_WALK3=0)), ("new", dict(_WALK3=walk, _LEAN=lean))):
        old = _flags(**flags)
        try:
            res[key] = [knn_points_sorted(st, sp, K=K) for K in (3, 5)] + [knn_points_sorted(sp, st, K=1)]
        finally:
            _flags(**old)
    for got, want in zip(res["new"], res["ref"]):
        assert torch.equal(got.dists, want.dists) and torch.equal(got.idx, want.idx)
