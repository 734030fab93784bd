"""capture_mode(): inside it the geometry ops and the loss make no host reads; what they do instead with
inputs that the eager checks would refuse (zero-area meshes, non-finite vertices, lengths out of range)."""
import pytest
import torch

from loss_inputs import small_loss_problem

from protodepth.geometry import (
    capture_mode,
    chamfer_distance,
    host_reads_allowed,
    ico_sphere,
    knn_points,
    sample_points_from_meshes,
)
from protodepth.loss import proto_depth_loss


def _no_host_reads(monkeypatch):
    """Make every host read of a tensor value fail, as it would while a CUDA graph is captured."""
    def refuse(*args, **kwargs):
        raise AssertionError("host read inside capture_mode")

    for name in ("__bool__", "item", "tolist", "__int__", "__float__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, refuse)


def test_capture_mode_is_a_context_and_restores_the_flag():
    assert host_reads_allowed()
    with capture_mode():
        assert not host_reads_allowed()
        with capture_mode():
            assert not host_reads_allowed()
        assert not host_reads_allowed()
    assert host_reads_allowed()
    with pytest.raises(RuntimeError):
        with capture_mode():
            raise RuntimeError("boom")
    assert host_reads_allowed()


def test_zero_area_mesh_raises_eagerly_and_is_sampled_on_its_collapsed_faces_in_capture_mode():
    verts, faces = ico_sphere(1)
    flat = torch.stack([verts, verts * 0 + torch.tensor([1.0, 2.0, 3.0])])  # mesh 1 collapsed to a point
    with pytest.raises(ValueError, match=r"faces: meshes \[1\] have zero total area"):
        sample_points_from_meshes(flat, faces, 20)
    with capture_mode():
        pts, normals = sample_points_from_meshes(flat, faces, 20, return_normals=True,
                                                 generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(pts[1], torch.tensor([1.0, 2.0, 3.0]).expand(20, 3))
    assert torch.equal(normals[1], torch.zeros(20, 3))
    torch.testing.assert_close(pts[0].norm(dim=-1), torch.ones(20), atol=0.1, rtol=0)


def test_non_finite_vertices_raise_eagerly_and_give_non_finite_points_in_capture_mode():
    verts, faces = ico_sphere(1)
    bad = verts[None].clone()
    bad[0, 3, 0] = float("nan")
    with pytest.raises(ValueError, match="Meshes contain nan or inf."):
        sample_points_from_meshes(bad, faces, 50)
    with capture_mode():
        pts = sample_points_from_meshes(bad, faces, 50, generator=torch.Generator().manual_seed(0))
    assert not torch.isfinite(pts).all()


def test_lengths_out_of_range_are_refused_eagerly_only():
    p = torch.rand(2, 5, 3)
    with pytest.raises(ValueError, match="lengths1"):
        knn_points(p, p, lengths1=torch.tensor([5, 6]))
    with capture_mode():
        knn_points(p, p, lengths1=torch.tensor([5, 6]))


def test_loss_and_ops_make_no_host_read_in_capture_mode(monkeypatch):
    slot_verts, protos, faces, target, lengths, cfg, level, g = small_loss_problem()

    def step():
        res = proto_depth_loss(slot_verts, protos, faces, target, lengths, cfg, level,
                               generator=torch.Generator().manual_seed(1))
        grads = torch.autograd.grad(res.total, (slot_verts, protos))
        cham = chamfer_distance(target, target.flip(1), x_lengths=lengths, y_lengths=lengths,
                                weights=torch.ones(2))[0]
        return res.total.detach(), grads, cham

    eager = step()  # the warm-up builds the cached mesh topology, as the trainer's eager steps do
    _no_host_reads(monkeypatch)
    with capture_mode():
        captured = step()
    monkeypatch.undo()
    torch.testing.assert_close(captured, eager)
