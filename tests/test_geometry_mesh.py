"""ico_sphere structure, Euler rotations for all 12 conventions, and the mesh regularisers against
loop references written here (cot Laplacians from angles, normal consistency from an edge map)."""
import itertools
import math

import pytest
import torch

from protodepth.geometry import (
    euler_angles_to_matrix,
    ico_sphere,
    matrix_to_euler_angles,
    mesh_edge_loss,
    mesh_laplacian_smoothing,
    mesh_normal_consistency,
)

CONVENTIONS = ["".join(c) for c in itertools.product("XYZ", repeat=3) if c[1] != c[0] and c[1] != c[2]]


# ---------------------------------------------------------------- icosphere
@pytest.mark.parametrize("level", [0, 1, 2, 3])
def test_ico_sphere_is_a_closed_outward_unit_sphere(level):
    verts, faces = ico_sphere(level)
    assert verts.shape == (10 * 4**level + 2, 3) and faces.shape == (20 * 4**level, 3)
    if level > 0:
        torch.testing.assert_close(verts.norm(dim=1), torch.ones(len(verts)))
    edges = {}
    for f in faces.tolist():
        for a, b in ((f[0], f[1]), (f[1], f[2]), (f[2], f[0])):
            edges.setdefault((min(a, b), max(a, b)), []).append((a, b))
    assert all(len(v) == 2 and v[0] != v[1] for v in edges.values())  # closed, consistently oriented
    assert len(verts) - len(edges) + len(faces) == 2
    v = verts[faces]
    normal = torch.linalg.cross(v[:, 1] - v[:, 0], v[:, 2] - v[:, 0], dim=-1)
    assert ((normal * v.mean(1)).sum(-1) > 0).all()


def test_ico_sphere_returns_copies_and_checks_level():
    v1, f1 = ico_sphere(1)
    v1.mul_(0)
    f1.zero_()
    v2, f2 = ico_sphere(1, device="cpu")
    assert v2.abs().sum() > 0 and f2.max() == 41
    for bad in (-1, 1.5, True, 11):
        with pytest.raises(ValueError, match="level"):
            ico_sphere(bad)


# ---------------------------------------------------------------- rotations
def _rodrigues(axis, angle):
    """Rotation about a unit axis by angle (right-handed), from the axis-angle formula."""
    k = torch.tensor(axis, dtype=torch.float64)
    kx = torch.tensor([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]], dtype=torch.float64)
    return torch.eye(3, dtype=torch.float64) + math.sin(angle) * kx + (1 - math.cos(angle)) * kx @ kx


@pytest.mark.parametrize("convention", CONVENTIONS)
def test_euler_matches_composed_axis_rotations_and_round_trips(convention):
    assert len(CONVENTIONS) == 12
    g = torch.Generator().manual_seed(0)
    angles = (torch.rand(20, 3, generator=g, dtype=torch.float64) * 2 - 1) * math.pi
    # keep the middle angle away from gimbal lock so the inverse is unique
    if convention[0] == convention[2]:
        angles[:, 1] = torch.rand(20, generator=g, dtype=torch.float64) * 2.8 + 0.17
    else:
        angles[:, 1] = (torch.rand(20, generator=g, dtype=torch.float64) * 2 - 1) * 1.4
    mats = euler_angles_to_matrix(angles, convention)
    axes = {"X": (1.0, 0.0, 0.0), "Y": (0.0, 1.0, 0.0), "Z": (0.0, 0.0, 1.0)}
    for i in range(20):
        want = torch.eye(3, dtype=torch.float64)
        for c, a in zip(convention, angles[i].tolist()):
            want = want @ _rodrigues(axes[c], a)
        torch.testing.assert_close(mats[i], want)
    torch.testing.assert_close(matrix_to_euler_angles(mats, convention), angles)
    torch.testing.assert_close(mats @ mats.transpose(-1, -2), torch.eye(3, dtype=torch.float64).expand(20, 3, 3))


def test_euler_batched_shapes_and_gradients():
    angles = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)
    assert euler_angles_to_matrix(angles, "ZYX").shape == (2, 5, 3, 3)
    assert torch.autograd.gradcheck(lambda a: euler_angles_to_matrix(a, "XYZ"), (angles,))


def test_rotations_reject_bad_input():
    for bad in ("XXY", "XYW", "XY", "xyz", 3):
        with pytest.raises(ValueError, match="convention"):
            euler_angles_to_matrix(torch.zeros(3), bad)
        with pytest.raises(ValueError, match="convention"):
            matrix_to_euler_angles(torch.eye(3), bad)
    with pytest.raises(ValueError, match="euler_angles"):
        euler_angles_to_matrix(torch.zeros(4, 2), "XYZ")
    with pytest.raises(ValueError, match="matrix"):
        matrix_to_euler_angles(torch.zeros(3, 4), "XYZ")


# ---------------------------------------------------------------- mesh regularisers
def _meshes(level=1, M=3, seed=0, dtype=torch.float64):
    verts, faces = ico_sphere(level)
    g = torch.Generator().manual_seed(seed)
    V = verts[None].to(dtype) * torch.linspace(0.5, 2.0, M, dtype=dtype)[:, None, None]
    return V + 0.1 * torch.randn(V.shape, generator=g, dtype=dtype), faces


def _edge_map(faces):
    """unique edge (a < b) -> list of third vertices of its faces."""
    out = {}
    for f in faces.tolist():
        for i in range(3):
            a, b, c = f[i], f[(i + 1) % 3], f[(i + 2) % 3]
            out.setdefault((min(a, b), max(a, b)), []).append(c)
    return out


def ref_edge(v, faces, target):
    edges = _edge_map(faces)
    return sum(((v[a] - v[b]).norm() - target) ** 2 for (a, b) in edges) / len(edges)


def ref_normal(v, faces):
    terms = []
    for (a, b), thirds in _edge_map(faces).items():
        ns = [torch.linalg.cross(v[b] - v[a], v[c] - v[a], dim=0) for c in thirds]
        for i in range(len(ns)):
            for j in range(i + 1, len(ns)):
                terms.append(1 - torch.nn.functional.cosine_similarity(ns[i], -ns[j], dim=0))
    return sum(terms) / len(terms)


def ref_laplacian(v, faces, method):
    """Dense-matrix Laplacians; cot weights from angles (atan2), detached as PyTorch3D does."""
    n = v.shape[0]
    if method == "uniform":
        A = torch.zeros(n, n, dtype=v.dtype)
        for a, b in _edge_map(faces):
            A[a, b] = A[b, a] = 1
        lap = A @ v / A.sum(1, keepdim=True) - v
        return lap.norm(dim=1).mean()
    W = torch.zeros(n, n, dtype=v.dtype)
    area = torch.zeros(n, dtype=v.dtype)
    vd = v.detach()
    for f in faces.tolist():
        e1, e2 = vd[f[1]] - vd[f[0]], vd[f[2]] - vd[f[0]]
        area[f] += 0.5 * torch.linalg.cross(e1, e2, dim=0).norm()
        for i in range(3):
            o, a, b = f[i], f[(i + 1) % 3], f[(i + 2) % 3]  # angle at o is opposite edge (a, b)
            u, w = vd[a] - vd[o], vd[b] - vd[o]
            cot = (u @ w) / torch.linalg.cross(u, w, dim=0).norm()
            W[a, b] += cot
            W[b, a] += cot
    rows = W.sum(1, keepdim=True)
    if method == "cot":
        lap = W @ v / rows - v
    else:
        lap = (W @ v - rows * v) * 0.25 / area[:, None]
    return lap.norm(dim=1).mean()


@pytest.mark.parametrize("per_mesh_faces", [False, True])
def test_mesh_losses_match_loop_references(per_mesh_faces):
    V, faces = _meshes()
    f = faces[None].repeat(3, 1, 1) if per_mesh_faces else faces
    torch.testing.assert_close(mesh_edge_loss(V, f, target_length=0.3),
                               torch.stack([ref_edge(V[m], faces, 0.3) for m in range(3)]).mean())
    torch.testing.assert_close(mesh_normal_consistency(V, f), torch.stack([ref_normal(V[m], faces) for m in range(3)]).mean())
    for method in ("uniform", "cot", "cotcurv"):
        want = torch.stack([ref_laplacian(V[m], faces, method) for m in range(3)]).mean()
        torch.testing.assert_close(mesh_laplacian_smoothing(V, f, method=method), want, msg=method)


def test_mesh_losses_weight_each_mesh_by_its_own_element_count():
    """Per-mesh faces with different topologies: a mesh with repeated faces has fewer unique
    edges, and each mesh's mean uses its own count (PyTorch3D's weighting)."""
    V, faces = _meshes(M=2)
    faces2 = faces.clone()
    faces2[-10:] = faces[0]  # 10 duplicates of face 0: fewer unique edges, a non-manifold edge
    f = torch.stack([faces, faces2])
    want_edge = (ref_edge(V[0], faces, 0.0) + ref_edge(V[1], faces2, 0.0)) / 2
    torch.testing.assert_close(mesh_edge_loss(V, f), want_edge)
    want_normal = (ref_normal(V[0], faces) + ref_normal(V[1], faces2)) / 2
    torch.testing.assert_close(mesh_normal_consistency(V, f), want_normal)


def test_mesh_loss_gradients():
    V, faces = _meshes(level=0, M=2)
    V.requires_grad_()
    assert torch.autograd.gradcheck(lambda v: mesh_edge_loss(v, faces, 0.2), (V,))
    assert torch.autograd.gradcheck(lambda v: mesh_normal_consistency(v, faces), (V,))
    assert torch.autograd.gradcheck(lambda v: mesh_laplacian_smoothing(v, faces, "uniform"), (V,))
    for method in ("cot", "cotcurv"):
        # weights are constants for autograd (as in PyTorch3D): compare with the detached reference
        (got,) = torch.autograd.grad(mesh_laplacian_smoothing(V, faces, method), V)
        (want,) = torch.autograd.grad(torch.stack([ref_laplacian(V[m], faces, method) for m in range(2)]).mean(), V)
        torch.testing.assert_close(got, want, msg=method)


def test_topology_cache_follows_in_place_face_edits():
    V, faces = _meshes(level=1, M=1)
    faces = faces.clone()
    before = mesh_edge_loss(V, faces)
    faces[0] = torch.tensor([0, 1, 2])  # in place: same tensor object, new version
    after = mesh_edge_loss(V, faces)
    torch.testing.assert_close(after, ref_edge(V[0], faces, 0.0))
    assert not torch.equal(before, after)


def test_mesh_losses_reject_bad_input():
    V, faces = _meshes(level=0, M=2)
    with pytest.raises(ValueError, match="method"):
        mesh_laplacian_smoothing(V, faces, method="cotan")
    with pytest.raises(ValueError, match="faces.*int64"):
        mesh_edge_loss(V, faces.int())
    with pytest.raises(ValueError, match="faces.*indices"):
        mesh_normal_consistency(V, faces + 100)
    with pytest.raises(ValueError, match="faces.*batch"):
        mesh_edge_loss(V, faces[None].repeat(3, 1, 1))
    with pytest.raises(ValueError, match="verts"):
        mesh_edge_loss(V[0], faces)
