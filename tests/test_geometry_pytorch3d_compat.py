"""Behaviours that PyTorch3D's own unit tests pin, reproduced: empty meshes give a zero loss with a gradient,
icospheres above level 8, and the error texts that PyTorch3D's tests match (with the same exception type)."""
import pytest
import torch

from protodepth.geometry import (
    chamfer_distance,
    ico_sphere,
    knn_points,
    mesh_edge_loss,
    mesh_laplacian_smoothing,
    mesh_normal_consistency,
    sample_points_from_meshes,
)

LOSSES = {
    "edge": lambda v, f: mesh_edge_loss(v, f, target_length=0.0),
    "normal": mesh_normal_consistency,
    "uniform": lambda v, f: mesh_laplacian_smoothing(v, f, "uniform"),
    "cot": lambda v, f: mesh_laplacian_smoothing(v, f, "cot"),
    "cotcurv": lambda v, f: mesh_laplacian_smoothing(v, f, "cotcurv"),
}
EMPTY = {
    "no faces": (torch.rand(4, 10, 3), torch.zeros(0, 3, dtype=torch.int64)),
    "no faces per mesh": (torch.rand(4, 10, 3), torch.zeros(4, 0, 3, dtype=torch.int64)),
    "no meshes": (torch.rand(0, 12, 3), ico_sphere(0)[1]),
}


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("case", EMPTY)
def test_mesh_losses_of_an_empty_batch_are_zero_with_a_gradient(loss, case):
    verts, faces = EMPTY[case]
    out = LOSSES[loss](verts, faces)
    assert out.shape == (1,) and out.item() == 0.0 and out.requires_grad
    v = verts.clone().requires_grad_()
    v.data[..., 0] = float("nan")  # never reaches the zero
    out = LOSSES[loss](v, faces)
    out.backward()
    assert out.item() == 0.0 and torch.equal(v.grad, torch.zeros_like(v))


def test_sampling_an_empty_batch_says_meshes_are_empty():
    for verts, faces in EMPTY.values():
        with pytest.raises(ValueError, match="Meshes are empty."):
            sample_points_from_meshes(verts, faces, 10)


def test_ico_sphere_builds_level_9_like_pytorch3d_and_bounds_larger_levels():
    verts, faces = ico_sphere(9)
    assert verts.shape == (10 * 4**9 + 2, 3) and faces.shape == (20 * 4**9, 3)
    torch.testing.assert_close(verts.norm(dim=1), torch.ones(verts.shape[0]))
    assert int(faces.max()) == verts.shape[0] - 1
    with pytest.raises(ValueError, match="level: expected at most 10"):
        ico_sphere(11)
    with pytest.raises(ValueError, match="level must be >= 0"):
        ico_sphere(-1)


def test_error_texts_that_pytorch3d_tests_match():
    p1, p2 = torch.rand(7, 10, 3), torch.rand(7, 18, 3)
    for norm in (0, 3):
        with pytest.raises(ValueError, match="Support for 1 or 2 norm."):
            knn_points(p1, p2, norm=norm)
        with pytest.raises(ValueError, match="Support for 1 or 2 norm."):
            chamfer_distance(p1, p2, norm=norm)
    with pytest.raises(ValueError, match="batch_reduction must be one of"):
        chamfer_distance(p1, p2, batch_reduction="max")
    with pytest.raises(ValueError, match="point_reduction must be one of"):
        chamfer_distance(p1, p2, point_reduction="min")
    with pytest.raises(ValueError, match="Expected normals to be of shape"):
        chamfer_distance(p1, p2, x_normals=torch.rand(7, 10, 3)[None])
    with pytest.raises(ValueError, match="Expected points to be of shape"):
        chamfer_distance(p1[None], p2)
    with pytest.raises(ValueError, match="Expected lengths to be of shape"):
        chamfer_distance(p1, p2, x_lengths=torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="Pointclouds objects or torch.Tensor"):
        chamfer_distance(x=[1, 1, 1], y=[1, 1, 1])
    verts, faces = ico_sphere(1)
    verts[3, 1] = float("nan")
    with pytest.raises(ValueError, match="Meshes contain nan or inf."):
        sample_points_from_meshes(verts[None], faces, 100, return_normals=True)
