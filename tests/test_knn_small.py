"""Small KNN problems (issue 17): one-launch forward (candidates read in place, candidate splits merged inside the
search kernel through per-tile tickets) and Triton launches through the compiled kernel (`_triton_launch`).

The kernels run on CPU tensors under TRITON_INTERPRET=1 in one subprocess (the variable must be set before triton is
imported); CUDA tests (marked `cuda`) check the same paths on a GPU, with the fast launches on.
"""
from __future__ import annotations

import json
import os
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from protodepth.geometry import _triton_launch
from triton_markers import HAVE_TRITON, needs_cuda

REPO = Path(__file__).resolve().parents[1]


_INTERP_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    assert os.environ.get("TRITON_INTERPRET") == "1"
    import torch
    sys.path.insert(0, sys.argv[1]); sys.path.insert(0, sys.argv[2])
    import protodepth.geometry.knn_triton as kt
    from test_knn_triton import dense_knn_reference, reference_grads

    torch.manual_seed(0)
    out = {}
    l1 = torch.tensor([37, 21, 0]); l2 = torch.tensor([47, 4, 9])
    for K in (1, 3, 8):
        for splits in (1, 3):
            for rows in (True, False):
                kt._ROWS_MAX_PAIRS = (1 << 27) if rows else 0
                kt._forward_config_cached.cache_clear()
                cfg = kt._forward_config(3, 37, 47, K, 3, torch.device("cpu"), None, None, splits, None, False)
                p1 = torch.randn(3, 37, 3); p2 = torch.randn(3, 47, 3)
                a = p1.clone().requires_grad_(); b = p2.clone().requires_grad_()
                d, i = kt.knn_points_triton(a, b, l1, l2, K=K, splits=splits, spatial_sort=False)
                w = torch.linspace(-1, 2, d.numel()).reshape(d.shape)
                (d * w).sum().backward()
                rd, ri = dense_knn_reference(p1, p2, l1, l2, K)
                r1, r2 = reference_grads(p1, p2, l1, l2, i, w)
                out[f"K{K}/S{splits}/rows{int(rows)}"] = dict(
                    cfg_splits=cfg[2], cfg_rows=cfg[6], idx_equal=bool(torch.equal(i, ri)),
                    max_abs=float((d.double() - rd).abs().max()),
                    rel1=float((a.grad.double() - r1).norm() / r1.norm()),
                    rel2=float((b.grad.double() - r2).norm() / r2.norm()))
    kt._ROWS_MAX_PAIRS = 1 << 27
    kt._forward_config_cached.cache_clear()
    # exact ties across splits: duplicated candidates, the copy in the later split must lose
    q = torch.randn(1, 9, 3); c = torch.randn(1, 20, 3); c = torch.cat([c, c], 1)
    for K in (1, 4):
        d, i = kt.knn_points_triton(q, c, torch.tensor([9]), torch.tensor([40]), K=K, splits=3, spatial_sort=False)
        rd, ri = dense_knn_reference(q, c, torch.tensor([9]), torch.tensor([40]), K)
        out[f"ties/K{K}"] = dict(cfg_splits=3, cfg_rows=True, idx_equal=bool(torch.equal(i, ri)),
                                 max_abs=float((d.double() - rd).abs().max()), rel1=0.0, rel2=0.0)
    # backward: one-launch candidate scan (small), or fixed-point sums with grad_p2 converted by the last
    # accumulating program or by its own launch (forced here); twice each for determinism; norm 1 and 2
    for name, scan_max, finish_max in (("scan", 1 << 26, 1 << 16), ("finish", 0, 1 << 16), ("own", 0, 0)):
        kt._SCAN_BWD_MAX_PAIRS, kt._FINISH_IN_KERNEL_MAX = scan_max, finish_max
        for norm in (1, 2):
            p1 = torch.randn(2, 37, 3); p2 = 0.3 * torch.randn(2, 11, 3)
            grads = []
            for _ in range(2):
                a = p1.clone().requires_grad_(); b = p2.clone().requires_grad_()
                d, i = kt.knn_points_triton(a, b, l1[:2], torch.tensor([11, 4]), K=3, norm=norm)
                w = torch.linspace(-1, 2, d.numel()).reshape(d.shape)
                (d * w).sum().backward()
                grads.append((a.grad, b.grad))
            r1, r2 = reference_grads(p1, p2, l1[:2], torch.tensor([11, 4]), i, w, norm)
            out[f"finish/{name}/n{norm}"] = dict(rel1=float((a.grad.double() - r1).norm() / r1.norm()),
                                                 rel2=float((b.grad.double() - r2).norm() / r2.norm()),
                                                 identical=all(torch.equal(x, y) for x, y in zip(*grads)))
        # only one gradient asked for, and a non-finite contribution (NaN at its candidate only)
        a = p1.clone().requires_grad_(); b = p2.clone().requires_grad_()
        d, i = kt.knn_points_triton(p1, b, l1[:2], torch.tensor([11, 4]), K=3)
        w = torch.ones_like(d); w[0, 5, 0] = float("inf")
        (d * w).sum().backward()
        _, r2 = reference_grads(p1, p2, l1[:2], torch.tensor([11, 4]), i, torch.where(torch.isinf(w), 0.0, w))
        hit = torch.zeros(2, 11, dtype=torch.bool); hit[0, int(i[0, 5, 0])] = True
        fin = torch.isfinite(b.grad).all(-1)
        out[f"finish/{name}/nonfinite"] = dict(rel1=0.0, identical=True, nan_only_at_hit=bool(torch.equal(~fin, hit)),
                                               rel2=float((b.grad[fin].double() - r2[fin]).norm() / r2[fin].norm()))
    # the merge tickets are kept between calls: every launch above left them at zero
    out["tickets_left"] = int(kt._TICKETS[(torch.device("cpu"), None)].abs().sum())
    print("JSON" + json.dumps(out))
    """
)


def _interpreter_run(folder: Path):
    """The interpreter job, a trainer_utils background job: it runs beside the session's other tests."""
    # one thread: the job has one core to itself while the pytest process uses the other
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    return [sys.executable, "-c", _INTERP_SCRIPT, str(REPO), str(REPO / "tests")], env, {}


BACKGROUND_JOBS = {"interp_small": _interpreter_run} if HAVE_TRITON else {}


@pytest.fixture(scope="module")
def interp_small():
    if not HAVE_TRITON:
        pytest.skip("triton is not importable on this machine")
    from trainer_utils import background_job

    rc, out, err = background_job("interp_small", _interpreter_run).result(timeout=900)
    assert rc == 0, f"interpreter run failed:\n{out[-3000:]}\n{err[-6000:]}"
    line = [ln for ln in out.splitlines() if ln.startswith("JSON")][-1]
    return json.loads(line[4:])


def test_interpreter_one_launch_forward_with_split_candidates_matches_reference(interp_small):
    # splits merged in the search kernel (tickets), candidates read in place or from the copy, padding, K=1..8
    rows = {k: v for k, v in interp_small.items() if not k.startswith(("finish", "tickets"))}
    assert len(rows) == 14
    for name, r in rows.items():
        assert r["idx_equal"], name
        assert r["max_abs"] < 1e-5, (name, r)
        if "ties" not in name:
            assert r["rel1"] < 1e-5 and r["rel2"] < 1e-5, (name, r)
            assert r["cfg_rows"] == name.endswith("rows1"), name
            assert r["cfg_splits"] == int(name.split("/S")[1][0]), name


def test_interpreter_backward_one_launch_scan_and_fixed_point_paths_match_autograd(interp_small):
    names = [k for k in interp_small if k.startswith("finish/")]
    assert len(names) == 9
    for name in names:
        r = interp_small[name]
        assert r["rel1"] < 1e-5 and r["rel2"] < 1e-5 and r["identical"], (name, r)
        assert r.get("nan_only_at_hit", True), name


def test_interpreter_merge_tickets_are_back_to_zero_after_every_launch(interp_small):
    assert interp_small["tickets_left"] == 0


def test_small_problem_config_reads_candidates_in_place_and_is_cached():
    if not HAVE_TRITON:
        pytest.skip("triton is not importable on this machine")
    from protodepth.geometry import knn_triton as kt

    cuda = torch.device("cuda", 0)
    kt._sm_count_cached.cache_clear()
    saved = kt._sm_count
    kt._sm_count = lambda device: 132  # an H200's SMs, without a GPU
    try:
        small = kt._forward_config(1, 10000, 6400, 1, 3, cuda)
        big = kt._forward_config(32, 20000, 16000, 1, 3, cuda)
        mid = kt._forward_config(64, 200, 10000, 1, 3, cuda)
        assert small[6] and not small[5]  # candidate rows in place, brute force
        assert small[2] > 1  # too few query tiles for 132 SMs: candidate splits, merged in the kernel
        assert big[5] and not big[6]  # the sorted path keeps its copies
        assert not mid[6]  # 1.3e8 pairs: the copy (16-byte loads) measured 0.03 ms faster than in place
        hits = kt._forward_config_cached.cache_info().hits
        kt._forward_config(1, 10000, 6400, 1, 3, cuda)
        assert kt._forward_config_cached.cache_info().hits == hits + 1
    finally:
        kt._sm_count = saved


def test_one_launch_backward_only_where_its_scan_costs_less_than_the_launches_it_saves():
    if not HAVE_TRITON:
        pytest.skip("triton is not importable on this machine")
    from protodepth.geometry.knn_triton import _backward_scans

    assert _backward_scans(2, 3000, 1, 3000)  # H200: +0.044 ms of device time, two launches fewer
    assert not _backward_scans(1, 10000, 1, 6400)  # +0.2 ms of device time: the fixed-point sums instead
    assert not _backward_scans(2, 3000, 8, 3000) and not _backward_scans(64, 200, 1, 10000)


class _FakeCompiled:
    def __init__(self, log, refuse=False):
        self.log, self.refuse = log, refuse

    def __getitem__(self, grid):
        def run(*args):
            if self.refuse:
                raise TypeError("launcher takes other arguments")
            self.log.append(("compiled", grid, args))
        return run


class _FakeParam:
    def __init__(self, name, default=None):
        self.name, self.default = name, default


class _FakeJit:
    """Stands in for a triton.JITFunction: fn[grid](*args, **meta) records the call, returns a compiled kernel."""

    def __init__(self, refuse=False):
        self.log, self.refuse = [], refuse
        self.params = [_FakeParam("x"), _FakeParam("n"), _FakeParam("A"), _FakeParam("B", 7)]

    def __getitem__(self, grid):
        def run(*args, **meta):
            self.log.append(("jit", grid, args, meta))
            return _FakeCompiled(self.log, self.refuse)
        return run


def test_fast_launch_goes_through_the_compiled_kernel_after_the_first_call(monkeypatch):
    monkeypatch.setattr(_triton_launch, "_enabled", [True])
    monkeypatch.setattr(_triton_launch, "_compiled", {})
    monkeypatch.setattr(_triton_launch, "_current_device", lambda: 0)
    fn = _FakeJit()
    x = torch.zeros(4)
    for n in (5, 5, 6):
        args = (x, n)
        _triton_launch.launch(fn, (2, 1, 1), args, dict(A=3, num_warps=1), (_triton_launch.arg_key(args), 3))
    kinds = [e[0] for e in fn.log]
    # 5 and 6 differ in nothing Triton specialises on (neither is 1 or a multiple of 16): one compile
    assert kinds == ["jit", "compiled", "compiled"]
    # another current device: its own compiled kernel (a loaded kernel belongs to one device)
    monkeypatch.setattr(_triton_launch, "_current_device", lambda: 1)
    _triton_launch.launch(fn, (2, 1, 1), (x, 6), dict(A=3, num_warps=1), (_triton_launch.arg_key((x, 6)), 3))
    assert fn.log[-1][0] == "jit"
    # every parameter in signature order, compile-time values (and defaults) after the runtime ones
    assert fn.log[2][2] == (x, 6, 3, 7)


def test_fast_launch_key_separates_what_triton_specialises_on():
    key = _triton_launch.arg_key
    base = torch.zeros(64)
    assert key((5,)) == key((7,))
    assert key((16,)) != key((17,)) and key((1,)) != key((2,)) and key((1 << 31,)) != key((5,))
    assert key((base,)) != key((base.double(),))
    assert key((base,)) != key((base[1:],))  # 4-byte offset: not 16-byte aligned
    assert key((base,)) == key((base[4:],))


def test_fast_launch_falls_back_to_the_ordinary_path_when_the_launcher_refuses(monkeypatch):
    monkeypatch.setattr(_triton_launch, "_enabled", [True])
    monkeypatch.setattr(_triton_launch, "_compiled", {})
    monkeypatch.setattr(_triton_launch, "_current_device", lambda: 0)
    fn = _FakeJit(refuse=True)
    for _ in range(3):
        _triton_launch.launch(fn, (1, 1, 1), (3,), dict(A=1), ("k",))
    assert [e[0] for e in fn.log] == ["jit", "jit", "jit"]
    assert not _triton_launch.enabled()


@pytest.mark.parametrize("version,env,on", [("3.6.0", None, True), ("3.8.0", None, False), ("3.8.0", "1", True),
                                             ("3.6.0", "0", False)])
def test_fast_launch_is_on_only_for_verified_triton_releases_unless_forced(monkeypatch, version, env, on):
    """The compiled launcher's calling convention changes between Triton releases: an unverified release takes
    Triton's ordinary (always correct) path unless PROTODEPTH_TRITON_FAST_LAUNCH forces the shortcut."""
    import sys
    import types

    monkeypatch.setitem(sys.modules, "triton", types.SimpleNamespace(__version__=version))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if env is None:
        monkeypatch.delenv("PROTODEPTH_TRITON_FAST_LAUNCH", raising=False)
    else:
        monkeypatch.setenv("PROTODEPTH_TRITON_FAST_LAUNCH", env)
    assert _triton_launch._default_on() is on


# ----------------------------------------------------------------------------------------------------------------
# CUDA


def _dense(p1, p2, K):
    d = ((p1[:, :, None].double() - p2[:, None].double()) ** 2).sum(-1)
    sd, si = torch.sort(d, dim=2, stable=True)
    return sd[..., :K], si[..., :K]


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("N,P1,P2,K", [(1, 3000, 2000, 1), (2, 1000, 1500, 8), (2, 700, 900, 32), (4, 500, 500, 3)])
def test_cuda_small_shapes_match_reference_with_and_without_fast_launch(N, P1, P2, K, fast):
    from protodepth.geometry.knn_triton import _forward_config, knn_points_triton

    prev = _triton_launch.set_enabled(fast)
    try:
        g = torch.Generator(device="cuda").manual_seed(3)
        p1 = torch.randn(N, P1, 3, device="cuda", generator=g)
        p2 = torch.randn(N, P2, 3, device="cuda", generator=g)
        assert _forward_config(N, P1, P2, K, 3, p1.device)[6]  # the in-place path
        for _ in range(2):  # the second call takes the compiled-kernel launch
            d, i = knn_points_triton(p1, p2, K=K)
        rd, ri = _dense(p1, p2, K)
        assert (d.double() - rd).abs().max() < 1e-4
        differ = i != ri
        assert int(differ.sum()) <= 2, int(differ.sum())  # only near ties between the two roundings
    finally:
        _triton_launch.set_enabled(prev)


@pytest.mark.cuda
@needs_cuda
def test_cuda_graph_replay_of_the_ticketed_forward_equals_eager():
    from protodepth.geometry.knn_triton import _forward_config, knn_points_triton

    g = torch.Generator(device="cuda").manual_seed(4)
    a = torch.randn(2, 900, 3, device="cuda", generator=g).requires_grad_()
    b = torch.randn(2, 1100, 3, device="cuda", generator=g).requires_grad_()
    assert _forward_config(2, 900, 1100, 8, 3, a.device)[2] > 1  # tickets in play

    def step():
        d, i = knn_points_triton(a, b, K=8)
        return (d, i) + torch.autograd.grad(d.sum(), (a, b))

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step()
    with torch.no_grad():
        a.copy_(torch.randn(2, 900, 3, device="cuda", generator=g))
    for _ in range(3):  # tickets must come back to zero in every replay
        graph.replay()
    torch.cuda.synchronize()
    eager = step()
    for x, y in zip(outs, eager):
        assert torch.equal(x, y)


@pytest.mark.cuda
@needs_cuda
def test_cuda_kept_merge_tickets_serve_calls_of_changing_shapes_and_end_at_zero():
    from protodepth.geometry import knn_triton as kt

    g = torch.Generator(device="cuda").manual_seed(5)
    for N, P1, P2, K in [(1, 3000, 2000, 1), (2, 700, 900, 8), (1, 5000, 600, 3), (2, 700, 900, 8), (3, 64, 4000, 2)]:
        p1 = torch.randn(N, P1, 3, device="cuda", generator=g)
        p2 = torch.randn(N, P2, 3, device="cuda", generator=g)
        assert kt._forward_config(N, P1, P2, K, 3, p1.device)[2] > 1
        d, i = kt.knn_points_triton(p1, p2, K=K)
        rd, ri = _dense(p1, p2, K)
        assert (d.double() - rd).abs().max() < 1e-4
        assert int((i != ri).sum()) <= 2
    torch.cuda.synchronize()
    key = (p1.device, torch.cuda.current_stream(p1.device).cuda_stream)
    assert int(kt._TICKETS[key].abs().sum()) == 0


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("N,P1,P2,K,norm", [(1, 3000, 2000, 1, 2), (2, 500, 700, 8, 2), (2, 300, 400, 3, 1)])
def test_cuda_one_launch_backward_matches_autograd_and_repeats_bit_for_bit(N, P1, P2, K, norm):
    from protodepth.geometry import knn_triton as kt

    assert N * P1 * K * P2 <= kt._SCAN_BWD_MAX_PAIRS  # the candidate-scan backward
    g = torch.Generator(device="cuda").manual_seed(6)
    p1 = torch.randn(N, P1, 3, device="cuda", generator=g)
    p2 = torch.randn(N, P2, 3, device="cuda", generator=g)
    runs = []
    for _ in range(2):
        a, b = p1.clone().requires_grad_(), p2.clone().requires_grad_()
        d, i = kt.knn_points_triton(a, b, K=K, norm=norm)
        w = torch.linspace(-1, 2, d.numel(), device="cuda").reshape(d.shape)
        runs.append(torch.autograd.grad((d * w).sum(), (a, b)))
    a, b = p1.double().requires_grad_(), p2.double().requires_grad_()
    diff = a[:, :, None] - torch.gather(b[:, None].expand(-1, P1, -1, -1), 2, i[..., None].expand(-1, -1, -1, 3))
    dd = (diff * diff).sum(-1) if norm == 2 else (diff * torch.where(diff > 0, 1.0, -1.0).double()).sum(-1)
    r1, r2 = torch.autograd.grad((dd * w.double()).sum(), (a, b))
    for got, ref in zip(runs[0], (r1, r2)):
        assert float((got.double() - ref).norm() / ref.norm()) < 1e-5
    assert all(torch.equal(x, y) for x, y in zip(*runs))
