"""The training step's global KNN direction (target -> K = 3 nearest predicted points, issue 17): the walk kernels'
lean K > 1 insertion (`_topk_insert_lean`), the look-ahead walk (`_knn_walk3p_kernel`) and the 3-D backward kernel
(`_knn_bwd3_kernel`) give the results of the general kernels, bit for bit.

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

REPO = Path(__file__).resolve().parents[1]

try:
    import triton  # noqa: F401

    HAVE_TRITON = True
except Exception:  # pragma: no cover - depends on the install
    HAVE_TRITON = False

needs_cuda = pytest.mark.skipif(not (HAVE_TRITON and torch.cuda.is_available()), reason="needs a CUDA GPU and triton")
needs_triton = pytest.mark.skipif(not HAVE_TRITON, reason="triton is not importable")

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
    # forward: the walk kernels (1: _knn_walk3_kernel, 2: _knn_walk3p_kernel) with either insertion, and with two
    # programs per query tile (qs2), against the general sorted search (_knn_walk3 = 0: _knn_fwd_kernel, _topk_insert
    # / _nearest_update); exact ties (repeated candidates, a
    # query at the centre of equidistant ones), padded queries and a last candidate tile cut by lengths
    for K, norm in ((3, 2), (5, 1), (2, 2), (1, 2)):
        p1 = torch.randn(2, 37, 3, generator=g) * 1.5; p2 = torch.randn(2, 45, 3, generator=g)
        p2[:, 20:30] = p2[:, 0:10]
        p2[0, 30:40] = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [-1.0, 0, 0], [0, -1.0, 0]] * 2)
        p1[0, :5] = 0.0
        l1 = torch.tensor([37, 20]); l2 = torch.tensor([45, 13])
        rows = {}
        for walk, lean, qs in ((0, 0, 1), (1, 0, 1), (1, 1, 1), (2, 0, 1), (2, 1, 1), (1, 1, 2), (2, 1, 2)):
            kt._WALK3, kt._LEAN, kt._QSPLIT = walk, lean, qs
            s2 = sort_cloud(p2, l2, sort=True)
            s1 = sort_cloud(p1, l1, sort=True, grid=s2)
            r = knn_points_sorted(s1, s2, K=K, norm=norm)
            rows[(walk, lean, qs)] = (r.dists, r.idx)
        kt._WALK3, kt._LEAN, kt._QSPLIT = 1, 1, 1
        ref = rows.pop((0, 0, 1))
        out[f"fwd/K{K}/n{norm}"] = dict(
            equal={f"walk{w}/lean{le}/qs{qs}": bool(torch.equal(d, ref[0]) and torch.equal(i, ref[1]))
                   for (w, le, qs), (d, i) in rows.items()},
            ties=int((ref[0][0, :5, 1:] == ref[0][0, :5, :-1]).sum()))
    # backward: _knn_bwd3_kernel against _knn_bwd_kernel (fixed-point path forced: these problems are small enough
    # for the one-launch scan); grad_p2 converted inside the accumulation (finish) or by its own launch; a
    # non-finite incoming gradient; fp32, fp64, bf16; only some gradients wanted
    kt._SCAN_BWD_MAX_PAIRS = -1
    cases = [(torch.float32, 2, 3, 1 << 16, (False, True)), (torch.float32, 2, 3, 0, (True, True)),
             (torch.float32, 1, 5, 0, (True, True)), (torch.float64, 2, 2, 1 << 16, (True, True)),
             (torch.bfloat16, 2, 3, 0, (True, False)), (torch.float32, 2, 1, 0, (True, True))]
    for dtype, norm, K, finish_max, wants in cases:
        kt._FINISH_IN_KERNEL_MAX = finish_max
        p1 = torch.randn(2, 37, 3, generator=g).to(dtype); p2 = torch.randn(2, 19, 3, generator=g).to(dtype)
        l1 = torch.tensor([37, 20]); l2 = torch.tensor([19, 7])
        d, idx = kt.knn_points_triton(p1, p2, l1, l2, K=K, norm=norm)
        w = torch.linspace(-1, 2, d.numel(), dtype=torch.float64).reshape(d.shape).to(d.dtype)
        if K == 3:
            w[0, 3, 1] = float("inf")
        res = []
        for bwd3 in (0, 1):
            kt._BWD3 = bwd3
            res.append(kt._knn_backward(p1, p2, l1, l2, idx, w, norm, *wants))
        kt._BWD3 = 1
        same = all((x is None and y is None) or (torch.equal(x.nan_to_num(7.0), y.nan_to_num(7.0))
                                                 and torch.equal(x.isnan(), y.isnan())) for x, y in zip(*res))
        out[f"bwd/{str(dtype)[6:]}/n{norm}/K{K}/fin{int(finish_max > 0)}/p1{int(wants[0])}"] = dict(
            identical=bool(same), nan=int(sum(int(x.isnan().sum()) for x in res[1] if x is not None)),
            nonzero=bool(all(float(x.abs().nan_to_num(0).sum()) > 0 for x in res[1] if x is not None)))
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
def test_interpreter_3d_backward_kernel_is_bit_identical_to_the_general_one(interp_global):
    rows = {k: v for k, v in interp_global.items() if k.startswith("bwd/")}
    assert len(rows) == 6, sorted(interp_global)
    for name, r in rows.items():
        assert r["identical"] and r["nonzero"], f"{name}: {r}"
    assert rows["bwd/float32/n2/K3/fin1/p10"]["nan"] == 3  # the infinite gradient marked one candidate (3 coords)


def _flags(**kw):
    """Set knn_triton's module flags; returns their previous values."""
    from protodepth.geometry import knn_triton as kt

    old = {k: getattr(kt, k) for k in kw}
    for k, v in kw.items():
        setattr(kt, k, v)
    return old


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("walk,lean,regs,qtile,ctile,qs", [
    (1, 1, None, 32, 32, 1), (2, 1, None, 32, 32, 1), (2, 0, None, 32, 32, 1), (1, 1, 80, 32, 32, 1),
    (1, 1, None, 16, 32, 1), (2, 1, None, 16, 32, 1), (1, 1, None, 32, 64, 1), (2, 1, None, 32, 64, 1),
    (1, 1, None, 32, 32, 2), (2, 1, None, 32, 32, 2)])
def test_cuda_walk_kernels_equal_the_general_search_on_the_step_clouds(walk, lean, regs, qtile, ctile, qs):
    """The target as queries in tiles of qtile points (16: one warp, two lanes per query), as candidates in tiles of
    ctile points; qs programs per query tile."""
    from protodepth.benchmarks.knn_pair import make_inputs
    from protodepth.geometry.knn_sorted import knn_points_sorted, sort_cloud

    pred, target, lengths = make_inputs("b2", seed=5)
    lengths[1] = 7001
    pred[0, 100:140] = pred[0, 0:40]  # exact ties between predicted points
    st = sort_cloud(target, lengths, sort=True, tile=qtile, candidate_tile=ctile)
    sp = sort_cloud(pred, sort=True, grid=st)
    assert st.tiles.tile == qtile and st.ctiles.tile == ctile
    res = {}
    for key, flags in (("ref", dict(_WALK3=0)), ("new", dict(_WALK3=walk, _LEAN=lean, _WALK_MAXNREG=regs, _QSPLIT=qs))):
        old = _flags(**flags)
        try:
            res[key] = [knn_points_sorted(st, sp, K=K) for K in (3, 5)] + [knn_points_sorted(sp, st, K=1)]
        finally:
            _flags(**old)
    for got, want in zip(res["new"], res["ref"]):
        assert torch.equal(got.dists, want.dists) and torch.equal(got.idx, want.idx)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("K,norm,dtype,finish", [(3, 2, torch.float32, False), (1, 2, torch.float32, False),
                                                 (5, 1, torch.float32, False), (3, 2, torch.bfloat16, True)])
def test_cuda_3d_backward_kernel_is_bit_identical_to_the_general_one(K, norm, dtype, finish):
    from protodepth.benchmarks.knn_pair import make_inputs
    from protodepth.geometry import knn_triton as kt

    # b2's grad_p2 (2 x 6 400 x 3) is converted by the last accumulating program, b32's (32 x 3 200 x 3) by its own
    # launch (the step's global direction)
    pred, target, lengths = make_inputs("b2" if finish else "b32", seed=6)
    pred, target = pred.to(dtype), target.to(dtype)
    lengths[1] = 7001
    d, idx = kt.knn_points_triton(target, pred, lengths, None, K=K, norm=norm)
    g = torch.rand(d.shape, device=d.device, dtype=d.dtype)
    assert not kt._backward_scans(*target.shape[:2], K, pred.shape[1])
    assert (pred.numel() <= kt._FINISH_IN_KERNEL_MAX) == finish
    full = torch.full((pred.shape[0],), pred.shape[1], device=pred.device)
    res = []
    for bwd3 in (0, 1, 1):
        old = _flags(_BWD3=bwd3)
        try:
            res.append(kt._knn_backward(target, pred, lengths, full, idx, g, norm, True, True))
        finally:
            _flags(**old)
    for a, b, c in zip(*res):
        assert torch.equal(a, b) and torch.equal(b, c)
