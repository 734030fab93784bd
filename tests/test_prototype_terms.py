"""The prototype regularisers started early (`start_prototype_terms`, on a side stream on CUDA) give the loss and
gradients of the inline computation, eagerly and replayed from a CUDA graph."""
import pytest
import torch

from loss_inputs import small_loss_problem
from protodepth.loss import proto_depth_loss, prototype_terms, start_prototype_terms


def _loss_and_grads(device: str, early: bool):
    slot_verts, protos, faces, target, lengths, cfg, level, _ = small_loss_problem()
    slot_verts, protos = (t.detach().to(device).requires_grad_() for t in (slot_verts, protos))
    faces, target, lengths = faces.to(device), target.to(device), lengths.to(device)
    gen = torch.Generator(device=device).manual_seed(3)
    terms = start_prototype_terms(protos, faces, cfg) if early else None
    res = proto_depth_loss(slot_verts, protos, faces, target, lengths, cfg, level=level, generator=gen,
                           proto_terms=terms)
    res.total.backward()
    return res, slot_verts.grad, protos.grad


def test_early_prototype_terms_on_cpu_equal_the_inline_loss_bit_for_bit():
    (res_a, gs_a, gp_a), (res_b, gs_b, gp_b) = _loss_and_grads("cpu", False), _loss_and_grads("cpu", True)
    assert torch.equal(res_a.total, res_b.total)
    for k in res_a.terms:
        assert torch.equal(res_a.terms[k], res_b.terms[k]), k
    assert torch.equal(gs_a, gs_b) and torch.equal(gp_a, gp_b)


def test_prototype_terms_are_the_three_regularisers_and_join_returns_them_with_their_weighted_summands():
    _, protos, faces, *_, cfg, _, _ = small_loss_problem()
    cfg.w_edge, cfg.w_normal, cfg.w_laplacian = 0.5, 2.0, 3.0
    terms = prototype_terms(protos, faces, cfg)
    assert set(terms) == {"edge", "normal", "laplacian"} and all(t.shape == () for t in terms.values())
    joined, weighted = start_prototype_terms(protos, faces, cfg).join()
    assert all(torch.equal(joined[k], terms[k]) for k in terms)
    assert torch.equal(torch.stack(weighted), torch.stack([0.5 * terms["edge"], 2.0 * terms["normal"],
                                                           3.0 * terms["laplacian"]]))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_side_stream_prototype_terms_equal_the_inline_loss_on_cuda():
    (res_a, gs_a, gp_a), (res_b, gs_b, gp_b) = _loss_and_grads("cuda", False), _loss_and_grads("cuda", True)
    assert torch.equal(res_a.total, res_b.total)
    torch.testing.assert_close(gs_a, gs_b, rtol=1e-6, atol=1e-7)  # index_add's atomics: summation order
    torch.testing.assert_close(gp_a, gp_b, rtol=1e-6, atol=1e-7)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_side_stream_prototype_terms_replay_from_a_cuda_graph():
    """Fork and join inside a capture: the replayed loss and prototype gradient equal an eager step's."""
    from protodepth.geometry import capture_mode

    slot_verts, protos, faces, target, lengths, cfg, level, _ = small_loss_problem()
    slot_verts, protos = (t.detach().cuda().requires_grad_() for t in (slot_verts, protos))
    faces, target, lengths = faces.cuda(), target.cuda(), lengths.cuda()
    gen = torch.Generator(device="cuda")

    def step():
        slot_verts.grad, protos.grad = None, None
        terms = start_prototype_terms(protos, faces, cfg)
        res = proto_depth_loss(slot_verts, protos, faces, target, lengths, cfg, level=level, generator=gen,
                               proto_terms=terms)
        res.total.backward()
        return res.total.detach(), protos.grad

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        gen.manual_seed(5)
        want_total, want_grad = (t.clone() for t in step())
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    graph.register_generator_state(gen)
    gen.manual_seed(5)
    with torch.cuda.graph(graph), capture_mode():
        total, grad = step()
    gen.manual_seed(5)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(total, want_total)
    torch.testing.assert_close(grad, want_grad, rtol=1e-6, atol=1e-7)


def test_early_gradients_give_the_regularisers_values_and_their_gradient_under_any_upstream_weights():
    """terms_with_early_gradients (what the CUDA side stream runs): the same values, and a backward that scales
    each precomputed gradient by whatever reaches it (loss weights, an fp16 loss scale) like the inline chain."""
    from protodepth.loss import terms_with_early_gradients

    _, protos, faces, *_, cfg, _, _ = small_loss_problem()
    base = protos.detach().requires_grad_()
    upstream = {"edge": 0.5, "normal": -2.0, "laplacian": 3.7}
    (got, fill_gradients), want = terms_with_early_gradients(base * 1.0, faces, cfg), prototype_terms(base * 1.0, faces, cfg)
    assert all(torch.equal(got[k], want[k]) for k in want)
    fill_gradients()
    (g_got,) = torch.autograd.grad(sum(upstream[k] * got[k] for k in got), base)
    (g_want,) = torch.autograd.grad(sum(upstream[k] * want[k] for k in want), base)
    assert g_want.abs().max() > 0
    torch.testing.assert_close(g_got, g_want, rtol=1e-5, atol=1e-7)
    with torch.no_grad():  # validation: values only, nothing to differentiate
        values, fill_gradients = terms_with_early_gradients(base, faces, cfg)
        fill_gradients()
        assert all(torch.equal(v, want[k]) and not v.requires_grad for k, v in values.items())
