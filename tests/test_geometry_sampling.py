"""sample_points_from_meshes: points on the surface, area-proportional face counts (chi-square),
uniform barycentrics, normals, reproducibility, gradients, per-mesh faces, bad input."""
import pytest
import torch

from protodepth.geometry import ico_sphere, sample_points_from_meshes
from protodepth.geometry.sampling import points_from_barycentrics


def box_mesh(sx=1.0, sy=2.0, sz=3.0):
    """Axis-aligned box centred at the origin, 8 verts, 12 triangles of 3 different areas."""
    corners = torch.tensor([[x, y, z] for x in (-0.5, 0.5) for y in (-0.5, 0.5) for z in (-0.5, 0.5)])
    verts = corners * torch.tensor([sx, sy, sz])
    faces = torch.tensor([
        [0, 1, 3], [0, 3, 2], [4, 6, 7], [4, 7, 5],  # x = -/+
        [0, 4, 5], [0, 5, 1], [2, 3, 7], [2, 7, 6],  # y = -/+
        [0, 2, 6], [0, 6, 4], [1, 5, 7], [1, 7, 3],  # z = -/+
    ])
    return verts, faces


def test_points_lie_on_the_box_surface():
    verts, faces = box_mesh()
    half = torch.tensor([0.5, 1.0, 1.5])
    pts = sample_points_from_meshes(verts[None].repeat(2, 1, 1), faces, 5000, generator=torch.Generator().manual_seed(0))
    assert pts.shape == (2, 5000, 3)
    rel = pts.abs() / half
    assert (rel <= 1 + 1e-6).all()
    assert ((rel.max(-1).values - 1).abs() < 1e-6).all()  # one coordinate on a face plane


def test_face_counts_are_area_proportional_chi_square():
    verts, faces = box_mesh()
    S = 60000
    _, face_idx, bary = sample_points_from_meshes(verts[None], faces, S, return_face_info=True,
                                                  generator=torch.Generator().manual_seed(1))
    v = verts[faces]
    areas = 0.5 * torch.linalg.cross(v[:, 1] - v[:, 0], v[:, 2] - v[:, 0], dim=-1).norm(dim=-1)
    expected = areas / areas.sum() * S
    counts = torch.bincount(face_idx[0], minlength=12).double()
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 31.26, chi2  # chi-square, 11 degrees of freedom, p = 0.001
    # uniform inside each triangle: barycentrics are valid, average 1/3, and the corner sub-triangle
    # (w0 > 1/2, a quarter of the area) holds a quarter of the samples
    assert (bary >= 0).all() and torch.allclose(bary.sum(-1), torch.ones(1, S))
    torch.testing.assert_close(bary.mean(1)[0], torch.full((3,), 1 / 3), atol=6e-3, rtol=0)
    assert abs(float((bary[0, :, 0] > 0.5).float().mean()) - 0.25) < 0.01


def test_same_seed_same_points_and_other_seed_differs():
    verts, faces = ico_sphere(2)
    V = verts[None].repeat(3, 1, 1)
    a = sample_points_from_meshes(V, faces, 100, generator=torch.Generator().manual_seed(7))
    b = sample_points_from_meshes(V, faces, 100, generator=torch.Generator().manual_seed(7))
    c = sample_points_from_meshes(V, faces, 100, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_normals_are_outward_unit_face_normals_on_the_sphere():
    verts, faces = ico_sphere(3)
    pts, normals, face_idx, bary = sample_points_from_meshes(
        verts[None], faces, 2000, return_normals=True, return_face_info=True, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(normals.norm(dim=-1), torch.ones(1, 2000))
    assert ((normals * pts).sum(-1) > 0.99).all()  # outward, nearly radial
    fv = verts[faces[face_idx[0]]]
    torch.testing.assert_close((normals[0, :, None] * (fv - pts[0, :, None])).sum(-1), torch.zeros(2000, 3), atol=1e-6, rtol=0)
    assert ((pts.norm(dim=-1) - 1).abs() < 1e-2).all()  # inside the sphere by at most the chord sag


def test_points_are_barycentric_combinations_and_gradients_match():
    verts, faces = ico_sphere(1)
    V = (verts[None] + 0.05 * torch.randn(2, *verts.shape, generator=torch.Generator().manual_seed(3))).double()
    V.requires_grad_()
    pts, face_idx, bary = sample_points_from_meshes(V, faces, 50, return_face_info=True, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(pts, points_from_barycentrics(V, faces, face_idx, bary))
    w = torch.randn_like(pts)
    (g_sample,) = torch.autograd.grad((pts * w).sum(), V)
    assert torch.autograd.gradcheck(lambda v: points_from_barycentrics(v, faces, face_idx, bary), (V,))
    # d(sum w * p)/dV accumulates bary * w on each chosen face's vertices
    want = torch.zeros_like(V)
    for m in range(2):
        for s in range(50):
            for c in range(3):
                want[m, faces[face_idx[m, s], c]] += bary[m, s, c] * w[m, s]
    torch.testing.assert_close(g_sample, want)


def test_per_mesh_faces_equal_shared_faces():
    verts, faces = ico_sphere(2)
    V = verts[None].repeat(2, 1, 1) * torch.tensor([1.0, 2.0])[:, None, None]
    a = sample_points_from_meshes(V, faces, 300, return_normals=True, generator=torch.Generator().manual_seed(0))
    b = sample_points_from_meshes(V, faces[None].repeat(2, 1, 1), 300, return_normals=True,
                                  generator=torch.Generator().manual_seed(0))
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y)


def test_sampling_rejects_bad_input():
    verts, faces = ico_sphere(0)
    V = verts[None]
    with pytest.raises(ValueError, match="verts"):
        sample_points_from_meshes(verts, faces, 10)
    with pytest.raises(ValueError, match="verts.*last dimension"):
        sample_points_from_meshes(V[..., :2], faces, 10)
    with pytest.raises(ValueError, match="faces"):
        sample_points_from_meshes(V, faces[:, :2], 10)
    with pytest.raises(ValueError, match="faces.*int64"):
        sample_points_from_meshes(V, faces.int(), 10)
    with pytest.raises(ValueError, match="faces.*indices"):
        sample_points_from_meshes(V, faces + 1, 10)
    with pytest.raises(ValueError, match="faces.*batch"):
        sample_points_from_meshes(V, faces[None].repeat(2, 1, 1), 10)
    with pytest.raises(ValueError, match="num_samples"):
        sample_points_from_meshes(V, faces, 0)
    with pytest.raises(ValueError, match="Meshes contain nan or inf."):
        sample_points_from_meshes(V * float("nan"), faces, 10)
    with pytest.raises(ValueError, match="zero total area"):
        sample_points_from_meshes(V * 0, faces, 10)
