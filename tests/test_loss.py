"""The hybrid Chamfer loss against a dense reference, padding rules, weights and precision."""
import math

import pytest
import torch

from protodepth.config import LossConfig
from protodepth.geometry import ico_sphere
from protodepth.loss import proto_depth_loss, repulsion, subsample_targets


def dense_reference(pred, target, lengths, centroids, cfg):
    """pred (B,K,S,3), target (B,N,3): the three Chamfer terms with cdist, one image at a time."""
    B, K, S, _ = pred.shape
    g, s, r = [], [], []
    for b in range(B):
        t = target[b, : lengths[b]].double()
        p = pred[b].reshape(K * S, 3).double()
        d = torch.cdist(t, p) ** 2  # (N_b, K*S)
        g.append(d.topk(cfg.k_nearest, dim=1, largest=False).values.mean(1).mean())
        s.append(d.min(0).values.view(K, S).mean())
        c = centroids[b].double()
        pen = [math.exp(cfg.repulsion_sharpness * max(0.0, cfg.repulsion_min_distance - (c[i] - c[j]).norm().item()))
               for i in range(K) for j in range(K) if i != j]
        r.append(torch.tensor(sum(pen) / len(pen), dtype=torch.float64))
    return torch.stack(g), torch.stack(s), torch.stack(r)


def make_scene(B=2, K=3, N=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    verts, faces = ico_sphere(1)
    slot_verts = verts[None, None] * 0.5 + torch.randn(B, K, 1, 3, generator=g) * 0.6
    target = torch.randn(B, N, 3, generator=g)
    lengths = torch.tensor([N, N // 3][:B])
    target[1, lengths[1]:] = 0.0  # padding is zeros and must never be read
    protos = verts[None].repeat(2, 1, 1) + 0.05 * torch.randn(2, verts.shape[0], 3, generator=g)
    return slot_verts, protos, faces, target, lengths


def test_chamfer_terms_match_dense_reference_with_padding():
    cfg = LossConfig(samples_per_slot=20, k_nearest=3)
    slot_verts, protos, faces, target, lengths = make_scene()
    res = proto_depth_loss(slot_verts, protos, faces, target, lengths, cfg)
    g, s, r = dense_reference(res.pred_points, target, lengths, slot_verts.mean(2), cfg)
    torch.testing.assert_close(res.terms["global"].double(), g.mean(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(res.terms["slot"].double(), s.mean(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(res.terms["repulsion"].double(), r.mean(), rtol=1e-5, atol=1e-6)
    chamfer = (0.7 * g + 0.2 * s + 0.1 * r).mean()
    torch.testing.assert_close(res.terms["chamfer"].double(), chamfer, rtol=1e-5, atol=1e-6)
    reg = 0.3 * (res.terms["edge"] + res.terms["normal"] + res.terms["laplacian"])
    torch.testing.assert_close(res.total.double(), chamfer + reg.double(), rtol=1e-5, atol=1e-6)


def test_padding_values_do_not_change_the_loss():
    cfg = LossConfig(samples_per_slot=10)
    slot_verts, protos, faces, target, lengths = make_scene()
    torch.manual_seed(3)
    a = proto_depth_loss(slot_verts, protos, faces, target, lengths, cfg).total
    target[1, lengths[1]:] = 1e6
    torch.manual_seed(3)
    b = proto_depth_loss(slot_verts, protos, faces, target, lengths, cfg).total
    assert torch.equal(a, b)


def test_weights_are_configurable_and_each_term_is_reported():
    slot_verts, protos, faces, target, lengths = make_scene()
    only_global = LossConfig(samples_per_slot=10, w_slot=0, w_repulsion=0, w_edge=0, w_normal=0, w_laplacian=0,
                             w_global=1.0)
    torch.manual_seed(0)
    res = proto_depth_loss(slot_verts, protos, faces, target, lengths, only_global)
    assert set(res.terms) == {"chamfer", "global", "slot", "repulsion", "edge", "normal", "laplacian"}
    torch.testing.assert_close(res.total, res.terms["global"])


def test_loss_is_float32_and_differentiable_under_bf16_autocast():
    cfg = LossConfig(samples_per_slot=10)
    slot_verts, protos, faces, target, lengths = make_scene()
    slot_verts = slot_verts.bfloat16().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        res = proto_depth_loss(slot_verts, protos, faces, target, lengths, cfg)
    assert res.total.dtype == torch.float32 and torch.isfinite(res.total)
    res.total.backward()
    assert slot_verts.grad is not None and torch.isfinite(slot_verts.grad).all()


def test_repulsion_is_one_when_slots_are_far_and_grows_when_close():
    far = torch.tensor([[[0.0, 0, 0], [10, 0, 0], [0, 10, 0]]])
    assert repulsion(far, 0.5, 5.0).item() == pytest.approx(1.0)
    near = torch.tensor([[[0.0, 0, 0], [0.1, 0, 0]]])
    assert repulsion(near, 0.5, 5.0).item() == pytest.approx(math.exp(5 * 0.4), rel=1e-5)


def test_empty_target_cloud_is_refused():
    slot_verts, protos, faces, target, lengths = make_scene()
    lengths[0] = 0
    with pytest.raises(ValueError, match="lengths"):
        proto_depth_loss(slot_verts, protos, faces, target, lengths, LossConfig(samples_per_slot=5))


def test_sampling_level_sets_samples_per_slot_and_target_subset():
    from protodepth.loss import SamplingLevel

    slot_verts, protos, faces, target, lengths = make_scene(N=50)
    cfg = LossConfig(samples_per_slot=10)
    assert proto_depth_loss(slot_verts, protos, faces, target, lengths, cfg).pred_points.shape[2] == 10
    res = proto_depth_loss(slot_verts, protos, faces, target, lengths, cfg, SamplingLevel(7, None))
    assert res.pred_points.shape[2] == 7
    # max_targets keeps a random subset of each cloud: the same as subsampling first with the same draws
    sub = proto_depth_loss(slot_verts, protos, faces, target, lengths, cfg, SamplingLevel(7, 4),
                           generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    t4, l4 = subsample_targets(target, lengths, 4, generator=g)
    assert t4.shape[1] == 4
    ref = proto_depth_loss(slot_verts, protos, faces, t4, l4, cfg, SamplingLevel(7, None), generator=g)
    assert torch.equal(sub.total, ref.total)


def test_loss_keeps_its_gradient_after_a_first_call_under_inference_mode():
    """The loss caches small index tensors (repulsion's mask, the target arange) on first use; one first made
    under inference_mode must still serve a later differentiable call."""
    from protodepth.loss import repulsion

    with torch.inference_mode():
        repulsion(torch.randn(2, 7, 3), 1.0, 2.0)
    centroids = torch.randn(2, 7, 3, requires_grad=True)
    repulsion(centroids, 1.0, 2.0).sum().backward()
    assert centroids.grad is not None and torch.isfinite(centroids.grad).all()
