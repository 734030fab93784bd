"""Tests of `protodepth.geometry.knn_sorted`: a cloud sorted once, searched in both Chamfer directions.

The Triton kernels of the sorted path run under the interpreter in tests/test_knn_triton.py's background job
(`presorted/...` entries, read here); CUDA tests (marked `cuda`) compare with `knn_points` on a GPU, including a
CUDA-graph capture of the two directions on two streams, as the training step runs them.
"""
from __future__ import annotations

import pytest
import torch

from protodepth.geometry.knn import knn_points
from protodepth.geometry.knn_sorted import knn_points_sorted, sort_cloud
from triton_markers import HAVE_TRITON, needs_cuda


if HAVE_TRITON:  # the interpreter job of tests/test_knn_triton.py (shared: one run per session) holds our cases
    from test_knn_triton import _interpreter_run

    BACKGROUND_JOBS = {"interp_report": _interpreter_run}


def _clouds(device="cpu", B=3, P1=40, P2=57, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    a = torch.randn(B, P1, 3, generator=g).to(device)
    b = torch.randn(B, P2, 3, generator=g).to(device)
    lb = torch.tensor([P2, 9, 2][:B]).to(device)
    return a, b, lb


def test_cpu_sorted_search_is_knn_points_in_both_directions_with_gradients_and_padding():
    a, b, lb = _clouds()
    sa, sb = sort_cloud(a.requires_grad_()), sort_cloud(b, lb)
    assert not sa.is_sorted and not sb.is_sorted  # nothing to sort with on the CPU
    s = knn_points_sorted(sa, sb, K=1)
    g = knn_points_sorted(sb, sa, K=3, return_nn=True)
    s_ref = knn_points(a, b, lengths2=lb, K=1)
    g_ref = knn_points(b, a, lengths1=lb, K=3, return_nn=True)
    for got, want in ((s, s_ref), (g, g_ref)):
        assert torch.equal(got.idx, want.idx) and torch.equal(got.dists, want.dists)
    assert torch.equal(g.knn, g_ref.knn)
    (grad,) = torch.autograd.grad(s.dists.sum() + g.dists.sum(), a)
    (grad_ref,) = torch.autograd.grad(s_ref.dists.sum() + g_ref.dists.sum(), a)
    assert torch.equal(grad, grad_ref)
    # padded queries of the global direction: zeros, as knn_points
    assert float(g.dists[1, 9:].abs().max()) == 0.0


def test_sort_cloud_refuses_a_cloud_that_is_not_n_p_d():
    with pytest.raises(ValueError, match="points"):
        sort_cloud(torch.randn(5, 3))


def test_sort_cloud_refuses_tile_sizes_the_search_has_no_kernel_for():
    with pytest.raises(ValueError, match="^tile"):
        sort_cloud(torch.randn(2, 5, 3), tile=48)
    with pytest.raises(ValueError, match="candidate_tile"):
        sort_cloud(torch.randn(2, 5, 3), candidate_tile=128)


def test_knn_points_sorted_checks_like_knn_points():
    a, b, lb = _clouds()
    with pytest.raises(ValueError, match="K"):
        knn_points_sorted(sort_cloud(a), sort_cloud(b, lb), K=0)
    with pytest.raises(ValueError):
        knn_points_sorted(sort_cloud(a), sort_cloud(torch.randn(2, 5, 3)), K=1)


@pytest.fixture(scope="module")
def interp_report():
    if not HAVE_TRITON:
        pytest.skip("triton is not importable on this machine")
    from trainer_utils import background_json_report

    return background_json_report("interp_report", _interpreter_run)


def test_interpreter_presorted_clouds_equal_two_plain_calls(interp_report):
    """The Triton sorted path (sort_tiles once per cloud, both directions) against knn_points_triton's own sort:
    same indices and distances, bit-identical gradients, padding of both clouds, K = 1 and 3; through
    _knn_fwd_kernel and through the latency-arranged _knn_walk3_kernel and _knn_walk3p_kernel."""
    rows = {k: v for k, v in interp_report.items() if k.startswith("presorted/")}
    assert len(rows) == 5, sorted(interp_report)
    for name, r in rows.items():
        assert r["sorted"], f"{name}: sort_cloud(sort=True) kept the cloud unsorted under the interpreter"
        assert r["idx_equal"] and r["dists_equal"], f"{name}: {r}"
        assert r["grads_identical"], f"{name}: {r}"


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("sort,ctile", [(False, None), (True, None), (True, 16)])
def test_cuda_sorted_pair_equals_knn_points(sort, ctile):
    from protodepth.benchmarks.knn_pair import make_inputs

    pred, target, lengths = make_inputs("b2", seed=3)
    lengths[1] = 7001
    a = pred.clone().requires_grad_()
    st = sort_cloud(target, lengths, sort=sort, candidate_tile=ctile)
    sp = sort_cloud(a, sort=sort, grid=st, candidate_tile=ctile)
    assert sp.is_sorted == sort and st.is_sorted == sort
    s = knn_points_sorted(sp, st, K=1)
    g = knn_points_sorted(st, sp, K=3)
    s_ref = knn_points(pred, target, lengths2=lengths, K=1)
    g_ref = knn_points(target, pred, lengths1=lengths, K=3)
    assert torch.equal(s.dists, s_ref.dists) and torch.equal(g.dists, g_ref.dists)
    # indices may differ only between candidates at exactly equal distance
    assert int((s.idx != s_ref.idx).sum()) <= 2 and int((g.idx != g_ref.idx).sum()) <= 6
    assert float(g.dists[1, 7001:].detach().abs().max()) == 0.0
    (grad,) = torch.autograd.grad(s.dists.mean() + g.dists.mean(), a)
    b = pred.clone().requires_grad_()
    s2 = knn_points(b, target, lengths2=lengths, K=1)
    g2 = knn_points(target, b, lengths1=lengths, K=3)
    (grad_ref,) = torch.autograd.grad(s2.dists.mean() + g2.dists.mean(), b)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-6, atol=1e-9)


@pytest.mark.cuda
@needs_cuda
def test_cuda_graph_of_the_pair_on_two_streams_replays_eager_results():
    """The training step's use: the target sorted on a third stream, pred on the main one, the slot direction on a
    side stream; captured in one CUDA graph, replayed after the inputs change in place."""
    from protodepth.benchmarks.knn_pair import Pair, make_inputs
    from protodepth.geometry import capture_mode

    pred, target, lengths = make_inputs("b32", seed=1)
    pair = Pair("sorted-force-grid", pred[:4].contiguous(), target[:4].contiguous(), lengths[:4].clone())
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        pair.step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with capture_mode(), torch.cuda.graph(graph):  # as the trainer captures: no host reads (lengths checks)
        static = pair.step()
    pair.pred.data.add_(0.25)
    pair.target.copy_(pair.target.flip(1))
    eager = [t.detach().clone() for t in pair.step()]
    graph.replay()
    torch.cuda.synchronize()
    for got, want in zip(static, eager):
        assert torch.equal(got, want)
