"""torch.compile(fullgraph=True) traces the geometry ops and the whole loss with no graph break, and the compiled
functions match eager ones (values and gradients), on the CPU.

The backend is "aot_eager": it runs dynamo's full trace (fullgraph turns any graph break into an error), the fake
(meta) implementations of the custom ops and AOT autograd's joint forward/backward graph, which is what the
geometry has to get through; inductor's C++ code generation on top of that adds about a minute per function
on a 2-core CPU and nothing that concerns the geometry ops. One small shape each keeps the tests fast."""
import pytest
import torch

from loss_inputs import small_loss_problem

from protodepth.geometry import (
    chamfer_distance,
    ico_sphere,
    knn_points,
    mesh_edge_loss,
    mesh_laplacian_smoothing,
    mesh_normal_consistency,
)
from protodepth.loss import draw_uniforms, proto_depth_loss


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _compiled(fn):
    return torch.compile(fn, fullgraph=True, backend="aot_eager")


def _assert_same(fn, *inputs):
    """fn compiled == fn eager: outputs and the gradients of their sum with respect to every input."""
    want = fn(*inputs)
    want_grads = torch.autograd.grad(sum(w.sum() for w in want), inputs)
    got = _compiled(fn)(*inputs)
    got_grads = torch.autograd.grad(sum(g.sum() for g in got), inputs)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_grads, want_grads)


def _clouds():
    g = torch.Generator().manual_seed(0)
    p1 = torch.rand(2, 30, 3, generator=g).requires_grad_()
    p2 = torch.rand(2, 40, 3, generator=g).requires_grad_()
    return p1, p2, torch.tensor([30, 12]), torch.tensor([40, 25])


def test_knn_points_compiles_fullgraph_and_matches_eager():
    p1, p2, l1, l2 = _clouds()

    def fn(a, b):
        out = knn_points(a, b, l1, l2, K=3, return_nn=True)
        return out.dists, out.knn, out.idx.float()

    _assert_same(fn, p1, p2)


def test_chamfer_distance_compiles_fullgraph_and_matches_eager():
    p1, p2, l1, l2 = _clouds()

    def fn(a, b):
        loss, _ = chamfer_distance(a, b, x_lengths=l1, y_lengths=l2, weights=torch.tensor([1.0, 0.5]))
        return (loss, chamfer_distance(a, b, norm=1, batch_reduction=None, point_reduction="max")[0])

    _assert_same(fn, p1, p2)


def test_mesh_losses_compile_fullgraph_and_match_eager():
    verts, faces = ico_sphere(1)
    g = torch.Generator().manual_seed(0)
    v = (verts[None].repeat(2, 1, 1) + 0.05 * torch.randn(2, verts.shape[0], 3, generator=g)).requires_grad_()

    def fn(x):
        return (mesh_edge_loss(x, faces, 0.1), mesh_normal_consistency(x, faces),
                mesh_laplacian_smoothing(x, faces, "uniform"), mesh_laplacian_smoothing(x, faces, "cot"),
                mesh_laplacian_smoothing(x, faces, "cotcurv"))

    _assert_same(fn, v)


def test_whole_loss_compiles_fullgraph_with_draws_as_tensors_and_matches_eager():
    slot_verts, protos, faces, target, lengths, cfg, level, g = small_loss_problem()
    draws = draw_uniforms(2, 3, 40, level, generator=g)
    assert draws.target_keys is not None

    def fn(sv, pr):
        res = proto_depth_loss(sv, pr, faces, target, lengths, cfg, level, draws=draws)
        return res.total, res.pred_points

    _assert_same(fn, slot_verts, protos)
