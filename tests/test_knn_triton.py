"""Tests of the Triton KNN kernels (`protodepth.geometry.knn_triton`).

Two groups:
- interpreter tests: the real kernels run on CPU tensors under TRITON_INTERPRET=1. That variable must be set before
  triton is first imported, and other tests of this pytest process import torch/triton first, so the checks run in
  one subprocess whose JSON report the tests below read (it runs beside the session's other tests: see
  BACKGROUND_JOBS). A broken kernel fails CI this way, not only on a GPU.
- CUDA tests (marked `cuda`, skipped without a GPU): larger random inputs, half inputs, gradients, determinism.
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


def dense_knn_reference(p1, p2, lengths1, lengths2, K, norm=2):
    """Exact float64 KNN with PyTorch3D padding: (dists (N, P1, K) float64, idx (N, P1, K) int64).

    Ties go to the lower index (stable sort), like the kernel.
    """
    a, b = p1.double(), p2.double()
    diff = a[:, :, None, :] - b[:, None, :, :]
    d = (diff * diff).sum(-1) if norm == 2 else diff.abs().sum(-1)
    N, P1, P2 = d.shape
    dev = d.device
    d = torch.where(torch.arange(P2, device=dev)[None, None, :] < lengths2[:, None, None], d, float("inf"))
    sd, si = torch.sort(d, dim=2, stable=True)
    if K > P2:
        sd = torch.cat([sd, torch.full((N, P1, K - P2), float("inf"), dtype=sd.dtype, device=dev)], 2)
        si = torch.cat([si, torch.zeros((N, P1, K - P2), dtype=si.dtype, device=dev)], 2)
    sd, si = sd[:, :, :K], si[:, :, :K]
    valid = (torch.arange(P1, device=dev)[None, :, None] < lengths1[:, None, None]) & (
        torch.arange(K, device=dev)[None, None, :] < lengths2[:, None, None]
    )
    return sd.masked_fill(~valid, 0.0), si.masked_fill(~valid, 0)


def reference_grads(p1, p2, lengths1, lengths2, idx, weight, norm=2):
    """Gradients of sum(weight * D(p1, p2[idx])) through plain autograd, float64: (grad_p1, grad_p2)."""
    a = p1.detach().double().requires_grad_()
    b = p2.detach().double().requires_grad_()
    N, P1, K = idx.shape
    nb = torch.gather(b[:, None].expand(-1, P1, -1, -1), 2, idx[..., None].expand(-1, -1, -1, b.shape[2]))
    diff = a[:, :, None] - nb
    if norm == 2:
        d = (diff * diff).sum(-1)
    else:  # PyTorch3D's subgradient of |x| (+1 where x > 0, else -1), which knn.py and the kernel follow
        d = (diff * torch.where(diff > 0, 1.0, -1.0).to(diff.dtype)).sum(-1)
    dev = a.device
    valid = (torch.arange(P1, device=dev)[None, :, None] < lengths1[:, None, None]) & (
        torch.arange(K, device=dev)[None, None, :] < lengths2[:, None, None]
    )
    (torch.where(valid, d, 0.0) * weight.double()).sum().backward()
    return a.grad, b.grad


# ----------------------------------------------------------------------------------------------------------------
# interpreter tests (CPU, CI)

_INTERP_SCRIPT = textwrap.dedent(
    """
    import json, os, sys, time
    assert os.environ.get("TRITON_INTERPRET") == "1"
    import torch
    sys.path.insert(0, sys.argv[1])
    sys.path.insert(0, sys.argv[2])
    from protodepth.geometry.knn_triton import knn_points_triton
    from test_knn_triton import dense_knn_reference, reference_grads

    torch.manual_seed(0)
    out = {}
    t0 = time.time()
    # the interpreter runs 16 x 16 tiles: 21 queries are 2 query tiles (the second partial), 35 candidates 3
    # candidate tiles (splits=3 gives 3 splits); small, since the interpreter's time grows with the tile pairs
    l1 = torch.tensor([21, 12]); l2 = torch.tensor([35, 4])
    for dtype in (torch.float32, torch.bfloat16):
        for D in ((2, 3) if dtype == torch.float32 else (3,)):
            for K in ((1, 3, 5) if D == 3 else (1, 3)):
                modes = ("sorted", 1, 3) if (dtype == torch.float32 and D == 3) else ("sorted", 3)
                for mode in modes:
                    p1 = torch.randn(2, 21, D).to(dtype); p2 = torch.randn(2, 35, D).to(dtype)
                    if mode == "sorted":
                        d, i = knn_points_triton(p1, p2, l1, l2, K=K, spatial_sort=True)
                    else:
                        d, i = knn_points_triton(p1, p2, l1, l2, K=K, splits=mode, spatial_sort=False)
                    rd, ri = dense_knn_reference(p1, p2, l1, l2, K)
                    out[f"fwd/{str(dtype)[6:]}/D{D}/K{K}/{mode}"] = dict(
                        dtype=str(d.dtype), idx_equal=bool((i == ri).all()),
                        max_abs=float((d.double() - rd).abs().max()),
                        max_rel=float(((d.double() - rd).abs() / rd.clamp_min(1e-6)).max()))
    # K far above lengths2 and P2, norm 1, fp16, an empty candidate cloud
    p1 = torch.randn(3, 21, 3); p2 = torch.randn(3, 9, 3)
    a1 = torch.tensor([21, 0, 7]); a2 = torch.tensor([9, 5, 0])
    for K in (12, 33):
        for norm in (1, 2):
            d, i = knn_points_triton(p1, p2, a1, a2, K=K, norm=norm, spatial_sort=(K == 12))
            rd, ri = dense_knn_reference(p1, p2, a1, a2, K, norm)
            out[f"pad/K{K}/n{norm}"] = dict(dtype=str(d.dtype), idx_equal=bool((i == ri).all()),
                                           max_abs=float((d.double() - rd).abs().max()), max_rel=0.0)
    d, i = knn_points_triton(p1.half(), p2.half(), a1, a2, K=3)
    rd, ri = dense_knn_reference(p1.half(), p2.half(), a1, a2, 3)
    out["fwd/float16/D3/K3"] = dict(dtype=str(d.dtype), idx_equal=bool((i == ri).all()),
                                    max_abs=float((d.double() - rd).abs().max()),
                                    max_rel=float(((d.double() - rd).abs() / rd.clamp_min(1e-6)).max()))
    # exact ties: duplicated candidates must resolve to the lower index
    q = torch.randn(1, 8, 3); c = torch.randn(1, 6, 3); c = torch.cat([c, c], 1)
    ln = lambda n: torch.tensor([n])
    for K, kw in ((4, dict(splits=2, spatial_sort=False)), (4, dict(spatial_sort=True)), (1, dict(spatial_sort=True))):
        d, i = knn_points_triton(q, c, ln(8), ln(12), K=K, **kw)
        rd, ri = dense_knn_reference(q, c, ln(8), ln(12), K)
        out[f"ties/K{K}/{len(kw)}"] = dict(dtype=str(d.dtype), idx_equal=bool((i == ri).all()),
                                          max_abs=float((d.double() - rd).abs().max()), max_rel=0.0)
    # clustered clouds far from the origin, many candidate tiles: the pruned walk must still be exact
    base = torch.randn(1, 1, 3) * 100.0
    p1 = base + 0.01 * torch.rand(2, 30, 3); p2 = base + 0.01 * torch.rand(2, 120, 3)
    b1 = torch.tensor([30, 23]); b2 = torch.tensor([120, 85])
    for K in (1, 3):
        d, i = knn_points_triton(p1, p2, b1, b2, K=K, spatial_sort=True)
        rd, ri = dense_knn_reference(p1, p2, b1, b2, K)
        out[f"pad/far/K{K}"] = dict(dtype=str(d.dtype), idx_equal=bool((i == ri).all()),
                                   max_abs=float((d.double() - rd).abs().max()),
                                   max_rel=float(((d.double() - rd).abs() / rd.clamp_min(1e-12)).max()))
    # one far outlier stretches the joint box: every other point falls into one Morton cell, in arbitrary order
    p1 = 0.01 * torch.randn(2, 24, 3); p2 = 0.01 * torch.randn(2, 60, 3); p2[:, 7] = 1e4
    for K in (1, 3):
        d, i = knn_points_triton(p1, p2, torch.tensor([24, 17]), torch.tensor([60, 51]), K=K, spatial_sort=True)
        rd, ri = dense_knn_reference(p1, p2, torch.tensor([24, 17]), torch.tensor([60, 51]), K)
        out[f"pad/onecell/K{K}"] = dict(dtype=str(d.dtype), idx_equal=bool((i == ri).all()),
                                       max_abs=float((d.double() - rd).abs().max()),
                                       max_rel=float(((d.double() - rd).abs() / rd.clamp_min(1e-12)).max()))
    # float64 (tile bounds rounded down to fp32 for the in-register sort) and rows longer than that sort takes
    # (torch.sort of the bounds instead): both exact
    import protodepth.geometry.knn_triton as kt
    # (lengths [20, 13] and [70, 35]: 5 candidate tiles, more than the 4 that longrows allows the in-register sort)
    p1 = torch.randn(2, 24, 3, dtype=torch.float64); p2 = torch.randn(2, 80, 3, dtype=torch.float64)
    for name, limit in (("f64/sorted", kt._MAX_SORT_TILES), ("f64/longrows", 4)):
        kt._MAX_SORT_TILES, saved = limit, kt._MAX_SORT_TILES
        d, i = knn_points_triton(p1, p2, b1 - 10, b2 - 50, K=3, spatial_sort=True)
        kt._MAX_SORT_TILES = saved
        rd, ri = dense_knn_reference(p1, p2, b1 - 10, b2 - 50, 3)
        out[name] = dict(dtype=str(d.dtype), idx_equal=bool((i == ri).all()), max_abs=float((d - rd).abs().max()))
    # backward against autograd of the chosen pairs, float32 and bf16, twice for determinism
    for dtype, norm, K in ((torch.float32, 2, 1), (torch.float32, 2, 3), (torch.float32, 1, 5), (torch.bfloat16, 2, 3)):
        if True:
            p1 = torch.randn(2, 21, 3).to(dtype); p2 = (0.3 * torch.randn(2, 11, 3)).to(dtype)
            grads = []
            for _ in range(2):
                a = p1.clone().requires_grad_(); b = p2.clone().requires_grad_()
                d, i = knn_points_triton(a, b, l1, torch.tensor([11, 4]), K=K, norm=norm, spatial_sort=(K != 1))
                w = torch.linspace(-1, 2, d.numel()).reshape(d.shape)
                (d * w).sum().backward()
                grads.append((a.grad.clone(), b.grad.clone()))
            r1, r2 = reference_grads(p1, p2, l1, torch.tensor([11, 4]), i, w, norm)
            g1, g2 = grads[0]
            out[f"bwd/{str(dtype)[6:]}/n{norm}/K{K}"] = dict(
                grad_dtype=str(g1.dtype),
                rel1=float((g1.double() - r1).norm() / r1.norm()), rel2=float((g2.double() - r2).norm() / r2.norm()),
                identical=bool(torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])))
    # only the gradients autograd asks for: one cloud without requires_grad gets None and the other is unchanged
    p1 = torch.randn(2, 21, 3); p2 = 0.3 * torch.randn(2, 11, 3); l2b = torch.tensor([11, 4])
    for which in ("p1", "p2"):
        a = p1.clone().requires_grad_(which == "p1"); b = p2.clone().requires_grad_(which == "p2")
        d, i = knn_points_triton(a, b, l1, l2b, K=2, splits=2, spatial_sort=False)
        w = torch.linspace(-1, 2, d.numel()).reshape(d.shape)
        (d * w).sum().backward()
        r1, r2 = reference_grads(p1, p2, l1, l2b, i, w)
        got, ref, other = (a.grad, r1, b.grad) if which == "p1" else (b.grad, r2, a.grad)
        out[f"onlygrad/{which}"] = dict(other_none=other is None,
                                        rel=float((got.double() - ref).norm() / ref.norm()))
    # a non-finite contribution marks only the candidate it went to (NaN there, exact gradients elsewhere)
    b = p2.clone().requires_grad_()
    d, i = knn_points_triton(p1, b, l1, l2b, K=1)
    w = torch.ones_like(d); w[0, 5, 0] = float("inf")
    (d * w).sum().backward()
    _, r2 = reference_grads(p1, p2, l1, l2b, i, torch.where(torch.isinf(w), 0.0, w))
    hit = torch.zeros(2, 11, dtype=torch.bool); hit[0, int(i[0, 5, 0])] = True
    fin = torch.isfinite(b.grad).all(-1)
    out["nonfinite"] = dict(nan_only_at_hit=bool(torch.equal(~fin, hit)),
                            rel_rest=float((b.grad[fin].double() - r2[fin]).norm() / r2[fin].norm()))
    # one sort per cloud (knn_sorted), both directions, against two plain calls: padding of both clouds, K 1 / 3
    from protodepth.geometry.knn_sorted import knn_points_sorted, sort_cloud
    # (walk 1: the searches through _knn_walk3_kernel, 2: _knn_walk3p_kernel, the references through _knn_fwd_kernel;
    # p1 then sorted on p2's Morton grid, and p1 partly outside p2's box; walk 1: p2 as candidates in tiles of 32, as
    # queries of 16)
    p1 = torch.randn(2, 21, 3) * 1.5; p2 = torch.randn(2, 35, 3)
    for K, walk in ((1, 0), (3, 0), (1, 1), (3, 1), (3, 2)):
        a = p1.clone().requires_grad_(); b = p2.clone().requires_grad_()
        kt._WALK3 = walk
        s2 = sort_cloud(b, l2, sort=True, candidate_tile=32 if walk == 1 else None)
        s1 = sort_cloud(a, l1, sort=True, grid=s2 if walk else None)
        assert (s2.ctiles.tile == 32 and s2.tiles.tile == 16) if walk == 1 else s2.ctiles is s2.tiles
        f, r = knn_points_sorted(s1, s2, K=K), knn_points_sorted(s2, s1, K=K)
        kt._WALK3 = 0
        w = torch.linspace(-1, 2, f.dists.numel()).reshape(f.dists.shape)
        ga = torch.autograd.grad((f.dists * w).sum() + r.dists.sum(), (a, b))
        a = p1.clone().requires_grad_(); b = p2.clone().requires_grad_()
        f0, _ = knn_points_triton(a, b, l1, l2, K=K, spatial_sort=True)
        r0, ri0 = knn_points_triton(b, a, l2, l1, K=K, spatial_sort=True)
        gb = torch.autograd.grad((f0 * w).sum() + r0.sum(), (a, b))
        out[f"presorted/K{K}/walk{walk}"] = dict(
            sorted=s1.is_sorted and s2.is_sorted, dists_equal=torch.equal(f.dists, f0) and torch.equal(r.dists, r0),
            idx_equal=torch.equal(f.idx, knn_points_triton(p1, p2, l1, l2, K=K, spatial_sort=True)[1])
            and torch.equal(r.idx, ri0),
            grads_identical=all(torch.equal(x, y) for x, y in zip(ga, gb)))
    # the CUDA kernels of the protodepth::knn_points custom op (what torch.compile runs on a GPU), here on CPU
    # tensors, against the op's CPU kernel
    from protodepth.geometry import custom_ops as co
    p1 = torch.randn(2, 21, 3); p2 = torch.randn(2, 35, 3)
    d, i = co._knn_points_cuda(p1, p2, l1, l2, 3, 2)
    rd, ri = torch.ops.protodepth.knn_points(p1, p2, l1, l2, 3, 2)
    w = torch.linspace(-1, 2, d.numel()).reshape(d.shape)
    g1, g2 = co._knn_points_backward_cuda(p1, p2, l1, l2, i, w, 2, True, True)
    r1, r2 = torch.ops.protodepth.knn_points_backward(p1, p2, l1, l2, ri, w, 2, True, True)
    e1, e2 = co._knn_points_backward_cuda(p1, p2, l1, l2, i, w, 2, False, True)
    out["customop"] = dict(idx_equal=bool(torch.equal(i, ri)), max_abs=float((d - rd).abs().max()),
                           rel1=float((g1 - r1).norm() / r1.norm()), rel2=float((g2 - r2).norm() / r2.norm()),
                           unwanted_empty=e1.shape == (0,) and torch.equal(e2, g2))
    out["seconds"] = time.time() - t0
    print("seconds", out["seconds"], file=sys.stderr)
    print("JSON" + json.dumps(out))
    """
)


def _interpreter_run(folder: Path):
    """The interpreter job (a trainer_utils background job: it runs beside the session's other tests)."""
    # one thread: the job has one core to itself while this process's tests use the other
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    return [sys.executable, "-c", _INTERP_SCRIPT, str(REPO), str(REPO / "tests")], env, {}


BACKGROUND_JOBS = {"interp_report": _interpreter_run} if HAVE_TRITON else {}


@pytest.fixture(scope="module")
def interp_report():
    if not HAVE_TRITON:
        pytest.skip("triton is not importable on this machine")
    from trainer_utils import background_json_report  # not at the top: the job itself imports this module

    return background_json_report("interp_report", _interpreter_run)


@needs_triton
def test_interpreter_forward_matches_dense_reference(interp_report):
    fwd = {k: v for k, v in interp_report.items() if k.startswith(("fwd/", "pad/", "ties"))}
    assert len(fwd) >= 25
    for name, r in fwd.items():
        assert r["dtype"] == "torch.float32", name  # half inputs return fp32 distances
        assert r["idx_equal"], f"{name}: indices differ from the dense reference"
        # fp32 direct form vs float64 reference on the same (possibly half-rounded) inputs
        assert r["max_abs"] < 1e-5, f"{name}: {r}"
        if "far" not in name:  # 100 m from the origin, 1 cm apart: fp32 inputs themselves carry ~1e-3 relative
            assert r["max_rel"] < 1e-5, f"{name}: {r}"


@needs_triton
def test_interpreter_backward_matches_autograd_and_is_deterministic(interp_report):
    bwd = {k: v for k, v in interp_report.items() if k.startswith("bwd/")}
    assert len(bwd) == 4
    for name, r in bwd.items():
        tol = 1e-6 if "float32" in name else 1e-2  # bf16 gradients are rounded to bf16 on the way out
        assert r["rel1"] < tol and r["rel2"] < tol, f"{name}: {r}"
        assert r["identical"], f"{name}: two backward runs differ"
        assert r["grad_dtype"] == ("torch.float32" if "float32" in name else "torch.bfloat16")


@needs_triton
def test_interpreter_float64_and_long_candidate_rows(interp_report):
    for name in ("f64/sorted", "f64/longrows"):
        r = interp_report[name]
        assert r["dtype"] == "torch.float64" and r["idx_equal"], f"{name}: {r}"
        assert r["max_abs"] < 1e-12, f"{name}: {r}"


@needs_triton
def test_interpreter_backward_only_requested_gradients(interp_report):
    for which in ("p1", "p2"):
        r = interp_report[f"onlygrad/{which}"]
        assert r["other_none"], f"{which}: the cloud without requires_grad got a gradient"
        assert r["rel"] < 1e-6, f"{which}: {r}"


@needs_triton
def test_interpreter_custom_op_cuda_kernels_match_its_cpu_kernel(interp_report):
    r = interp_report["customop"]
    assert r["idx_equal"] and r["max_abs"] < 1e-6, r
    assert r["rel1"] < 1e-6 and r["rel2"] < 1e-6, r
    assert r["unwanted_empty"], r


@needs_triton
def test_interpreter_nonfinite_contribution_marks_only_its_candidate(interp_report):
    r = interp_report["nonfinite"]
    assert r["nan_only_at_hit"], r
    assert r["rel_rest"] < 1e-6, r


@needs_triton
def test_bad_inputs_raise_value_error():
    from protodepth.geometry.knn_triton import knn_points_triton

    p = torch.randn(2, 5, 3)
    with pytest.raises(ValueError, match="p1"):
        knn_points_triton(torch.randn(5, 3), p)
    with pytest.raises(ValueError, match="agree"):
        knn_points_triton(p, torch.randn(2, 5, 2))
    with pytest.raises(ValueError, match="K"):
        knn_points_triton(p, p, K=0)
    with pytest.raises(ValueError, match="norm"):
        knn_points_triton(p, p, norm=3)
    with pytest.raises(ValueError, match="lengths1"):
        knn_points_triton(p, p, torch.tensor([5]), torch.tensor([5, 5]))
    with pytest.raises(ValueError, match="dtype"):
        knn_points_triton(p.int(), p.int())
    with pytest.raises(ValueError, match="lengths2 must be an integer"):
        knn_points_triton(p, p, torch.tensor([5, 5]), torch.tensor([5.0, 5.0]))


# ----------------------------------------------------------------------------------------------------------------
# CUDA tests

def _random_case(N, P1, P2, D, dtype, seed, full=False):
    g = torch.Generator(device="cpu").manual_seed(seed)
    p1 = torch.randn(N, P1, D, generator=g).to("cuda", dtype)
    p2 = torch.randn(N, P2, D, generator=g).to("cuda", dtype)
    if full:
        l1 = torch.full((N,), P1, dtype=torch.int64)
        l2 = torch.full((N,), P2, dtype=torch.int64)
    else:
        l1 = torch.randint(1, P1 + 1, (N,), generator=g)
        l2 = torch.randint(1, P2 + 1, (N,), generator=g)
        l1[0], l2[0] = P1, P2
    return p1, p2, l1.cuda(), l2.cuda()


def _assert_knn_close(d, i, p1, p2, l1, l2, K, norm=2, rel=1e-5):
    rd, ri = dense_knn_reference(p1, p2, l1, l2, K, norm)
    assert d.dtype == (torch.float64 if p1.dtype == torch.float64 else torch.float32)
    assert torch.allclose(d.double(), rd, rtol=rel, atol=1e-6), (d.double() - rd).abs().max()
    # indices: equal except for ties; where they differ, the chosen point must be exactly as near as the reference's
    mism = i != ri
    if mism.any():
        N, P1, _ = i.shape
        nb = torch.gather(p2.double()[:, None].expand(-1, P1, -1, -1), 2, i[..., None].expand(-1, -1, -1, p2.shape[2]))
        diff = p1.double()[:, :, None] - nb
        di = (diff * diff).sum(-1) if norm == 2 else diff.abs().sum(-1)
        assert torch.allclose(di[mism], rd[mism], rtol=rel, atol=1e-6), "index mismatch that is not a tie"
        assert mism.float().mean() < 1e-3, f"{int(mism.sum())} index mismatches"


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("K,D", [(1, 3), (3, 3), (32, 3), (70, 3), (3, 2)])
def test_cuda_forward_random_with_lengths(K, D):
    from protodepth.geometry.knn_triton import knn_points_triton

    p1, p2, l1, l2 = _random_case(4, 300, 500, D, torch.float32, seed=K * 10 + D)
    l2[1] = min(K // 2 + 1, 500)  # K > lengths2 in one cloud
    for kw in (dict(spatial_sort=True), dict(spatial_sort=False, splits=3), dict(spatial_sort=False, splits=1)):
        d, i = knn_points_triton(p1, p2, l1, l2, K=K, **kw)
        _assert_knn_close(d, i, p1, p2, l1, l2, K)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("dtype,norm", [(torch.float16, 2), (torch.bfloat16, 2), (torch.float64, 2), (torch.bfloat16, 1)])
def test_cuda_half_and_double_inputs(dtype, norm):
    from protodepth.geometry.knn_triton import knn_points_triton

    p1, p2, l1, l2 = _random_case(3, 700, 900, 3, dtype, seed=7 + norm)
    for K in (1, 16):
        for sort in (True, False):
            d, i = knn_points_triton(p1, p2, l1, l2, K=K, norm=norm, spatial_sort=sort)
            _assert_knn_close(d, i, p1, p2, l1, l2, K, norm)


@pytest.mark.cuda
@needs_cuda
def test_cuda_large_inputs_both_paths_match_reference():
    from protodepth.geometry.knn_triton import knn_points_triton

    p1, p2, l1, l2 = _random_case(1, 2000, 6400, 3, torch.float32, seed=3, full=True)
    for K, kw in ((1, dict(spatial_sort=True)), (3, dict(spatial_sort=True)), (1, {}), (3, {})):
        d, i = knn_points_triton(p1, p2, l1, l2, K=K, **kw)
        _assert_knn_close(d, i, p1, p2, l1, l2, K)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("norm,K", [(2, 1), (2, 3), (1, 4)])
def test_cuda_gradients_match_autograd(dtype, norm, K):
    from protodepth.geometry.knn_triton import knn_points_triton

    p1, p2, l1, l2 = _random_case(3, 400, 150, 3, dtype, seed=11 * K + norm)
    a = p1.clone().requires_grad_()
    b = p2.clone().requires_grad_()
    d, i = knn_points_triton(a, b, l1, l2, K=K, norm=norm)
    w = torch.randn(d.shape, generator=torch.Generator().manual_seed(5)).cuda()
    (d * w).sum().backward()
    r1, r2 = reference_grads(p1, p2, l1, l2, i, w, norm)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert a.grad.dtype == dtype and b.grad.dtype == dtype
    assert (a.grad.double() - r1).norm() / r1.norm() < tol
    assert (b.grad.double() - r2).norm() / r2.norm() < tol


@pytest.mark.cuda
@needs_cuda
def test_cuda_gradients_bit_identical_across_runs():
    from protodepth.geometry.knn_triton import knn_points_triton

    # many queries per candidate: the scatter into grad_p2 collides heavily, where atomics would reorder sums
    p1, p2, l1, l2 = _random_case(4, 20000, 300, 3, torch.float32, seed=1, full=True)
    w = torch.randn(4, 20000, 3, device="cuda")
    grads = []
    for _ in range(3):
        a = p1.clone().requires_grad_()
        b = p2.clone().requires_grad_()
        d, _ = knn_points_triton(a, b, l1, l2, K=3)
        (d * w).sum().backward()
        grads.append((a.grad, b.grad))
    for g1, g2 in grads[1:]:
        assert torch.equal(g1, grads[0][0]) and torch.equal(g2, grads[0][1])


@pytest.mark.cuda
@needs_cuda
def test_cuda_only_requested_gradients_match_both():
    from protodepth.geometry.knn_triton import knn_points_triton

    p1, p2, l1, l2 = _random_case(2, 3000, 2500, 3, torch.float32, seed=21)
    w = torch.randn(2, 3000, 3, device="cuda")
    a = p1.clone().requires_grad_()
    b = p2.clone().requires_grad_()
    d, _ = knn_points_triton(a, b, l1, l2, K=3)
    (d * w).sum().backward()
    for which in ("p1", "p2"):
        a1 = p1.clone().requires_grad_(which == "p1")
        b1 = p2.clone().requires_grad_(which == "p2")
        d1, _ = knn_points_triton(a1, b1, l1, l2, K=3)
        (d1 * w).sum().backward()
        if which == "p1":
            assert b1.grad is None and torch.equal(a1.grad, a.grad)
        else:
            assert a1.grad is None and torch.equal(b1.grad, b.grad)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("P1,P2,K,sort", [(3000, 4000, 1, True), (3000, 4000, 3, True), (500, 3000, 1, False),
                                          (200, 3000, 2, False)])
def test_cuda_graph_capture_of_forward_and_backward(P1, P2, K, sort):
    """The whole knn fwd+bwd is capturable (no host sync, no host->device copies) and replays give eager results."""
    from protodepth.geometry.knn_triton import knn_points_triton

    p1, p2, l1, l2 = _random_case(2, P1, P2, 3, torch.float32, seed=P1 + K)
    a = p1.clone().requires_grad_()
    b = p2.clone().requires_grad_()
    w = torch.randn(2, P1, K, device="cuda")

    def step():
        d, i = knn_points_triton(a, b, l1, l2, K=K, spatial_sort=sort)
        g1, g2 = torch.autograd.grad((d * w).sum(), (a, b))
        return d, i, g1, g2

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        eager = [t.clone() for t in step()]  # warm-up: compiles every kernel outside the capture
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = step()
    # new inputs in place, then replay: the graph must follow the data, not the captured values
    a.data.copy_(a.data.flip(1))
    eager2 = [t.clone() for t in step()]
    graph.replay()
    torch.cuda.synchronize()
    for got, want in zip(static, eager2):
        assert torch.equal(got, want)
    assert not torch.equal(eager2[1], eager[1])
