"""The targets' sort for the loss's KNN searches, started before the backbone (`start_target_sort`, on a side stream
on CUDA): the loss with it equals the loss that sorts inside, and a sort of another tensor is refused."""
import pytest
import torch

from loss_inputs import small_loss_problem
from protodepth.config import LossConfig
from protodepth.geometry import ico_sphere
from protodepth.loss import SamplingLevel, proto_depth_loss, start_target_sort


def _loss(slot_verts, protos, faces, target, lengths, cfg, level, early: bool, seed: int = 3):
    slot_verts = slot_verts.detach().requires_grad_()
    gen = torch.Generator(device=target.device).manual_seed(seed)
    sort = start_target_sort(target, lengths, level) if early else None
    res = proto_depth_loss(slot_verts, protos, faces, target, lengths, cfg, level=level, generator=gen,
                           target_sort=sort)
    res.total.backward()
    return res, slot_verts.grad


def test_loss_with_the_early_target_sort_equals_the_loss_sorting_inside():
    slot_verts, protos, faces, target, lengths, cfg, _, _ = small_loss_problem()
    level = SamplingLevel(8, None)
    (a, ga), (b, gb) = (_loss(slot_verts, protos, faces, target, lengths, cfg, level, e) for e in (False, True))
    assert torch.equal(a.total, b.total) and torch.equal(ga, gb)


def test_no_early_sort_where_the_level_subsamples_the_targets_and_a_sort_of_another_tensor_is_refused():
    slot_verts, protos, faces, target, lengths, cfg, level, _ = small_loss_problem()
    assert level.max_targets < target.shape[1] and start_target_sort(target, lengths, level) is None
    other = start_target_sort(target.clone(), lengths, SamplingLevel(8, None))
    with pytest.raises(ValueError, match="target_sort"):
        proto_depth_loss(slot_verts, protos, faces, target, lengths, cfg, level=SamplingLevel(8, None),
                         generator=torch.Generator().manual_seed(0), target_sort=other)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_early_target_sort_on_a_side_stream_gives_the_inline_loss_on_cuda_eager_and_replayed():
    """Clouds large enough for the sorted search (2 x 40 000 targets): eager with and without the early sort,
    then the early sort inside a captured graph, replayed."""
    from protodepth.geometry import capture_mode

    verts, faces = ico_sphere(3, device="cuda")
    g = torch.Generator(device="cuda").manual_seed(0)
    slot_verts = verts[None, None] * 0.7 + torch.randn(2, 4, 1, 3, device="cuda", generator=g) * 4
    protos = verts[None].repeat(2, 1, 1)
    target = torch.rand(2, 40_000, 3, device="cuda", generator=g) * 20 - 10
    lengths = torch.tensor([40_000, 31_000], device="cuda")
    cfg, level = LossConfig(samples_per_slot=64), SamplingLevel(64, None)
    (a, ga), (b, gb) = (_loss(slot_verts, protos, faces, target, lengths, cfg, level, e) for e in (False, True))
    assert torch.equal(a.total, b.total)
    torch.testing.assert_close(ga, gb, rtol=1e-6, atol=1e-7)

    sv = slot_verts.detach().requires_grad_()
    gen = torch.Generator(device="cuda")

    def step():
        sv.grad = None
        res = proto_depth_loss(sv, protos, faces, target, lengths, cfg, level=level, generator=gen,
                               target_sort=start_target_sort(target, lengths, level))
        res.total.backward()
        return res.total.detach(), sv.grad

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        gen.manual_seed(3)
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    graph.register_generator_state(gen)
    with torch.cuda.graph(graph), capture_mode():
        total, grad = step()
    gen.manual_seed(3)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(total, a.total.detach())
    torch.testing.assert_close(grad, ga, rtol=1e-6, atol=1e-7)
