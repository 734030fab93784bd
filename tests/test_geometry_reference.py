"""Every key of tests/data/pytorch3d_reference.npz (made with PyTorch3D 0.7.9) reproduced within
the README's tolerances; the largest difference per op is printed in pytest's terminal summary."""
from pathlib import Path

import numpy as np
import pytest
import torch

from protodepth.geometry import (
    chamfer_distance,
    euler_angles_to_matrix,
    ico_sphere,
    knn_points,
    mesh_edge_loss,
    mesh_laplacian_smoothing,
    mesh_normal_consistency,
)

REF = np.load(Path(__file__).parent / "data" / "pytorch3d_reference.npz")


def _record(report, key, got, want, rtol, atol):
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, (key, got.shape, want.shape)
    abs_d = float(np.abs(got - want).max()) if got.size else 0.0
    rel_d = float((np.abs(got - want) / np.maximum(np.abs(want), 1e-12)).max()) if got.size else 0.0
    report[key] = (abs_d, rel_d)
    np.testing.assert_allclose(got, want, rtol=rtol, atol=atol, err_msg=key)


def _clouds():
    x = torch.from_numpy(REF["cd_x"]).float()
    y = torch.from_numpy(REF["cd_y"]).float()
    return x, y, torch.from_numpy(REF["cd_xl"]), torch.from_numpy(REF["cd_yl"])


@pytest.mark.parametrize("level", range(5))
def test_ico_sphere_matches_reference(level, reference_report):
    verts, faces = ico_sphere(level)
    assert verts.dtype == torch.float32 and faces.dtype == torch.int64
    _record(reference_report, f"ico{level}_verts", verts.numpy(), REF[f"ico{level}_verts"], 1e-6, 1e-6)
    assert np.array_equal(faces.numpy(), REF[f"ico{level}_faces"]), f"ico{level}_faces order differs"
    reference_report[f"ico{level}_faces (mismatches)"] = (float((faces.numpy() != REF[f"ico{level}_faces"]).sum()), 0.0)


def test_euler_xyz_matches_reference(reference_report):
    mats = euler_angles_to_matrix(torch.from_numpy(REF["euler_in"]), "XYZ")
    assert mats.dtype == torch.float64
    _record(reference_report, "euler_XYZ", mats.numpy(), REF["euler_XYZ"], 1e-12, 1e-12)


@pytest.mark.parametrize(
    "key, point_reduction, batch_reduction, single, norm, rtol",
    [
        ("cd_mean_mean_bi_L2", "mean", "mean", False, 2, 1e-5),
        ("cd_sum_sum_bi_L2", "sum", "sum", False, 2, 1e-4),
        ("cd_mean_mean_single_L2", "mean", "mean", True, 2, 1e-5),
        ("cd_mean_sum_bi_L1", "mean", "sum", False, 1, 1e-5),
    ],
)
def test_chamfer_matches_reference(key, point_reduction, batch_reduction, single, norm, rtol, reference_report):
    x, y, xl, yl = _clouds()
    loss, loss_normals = chamfer_distance(
        x, y, xl, yl, point_reduction=point_reduction, batch_reduction=batch_reduction,
        single_directional=single, norm=norm)
    assert loss_normals is None
    _record(reference_report, key, loss.item(), REF[key], rtol, 0.0)


def test_knn_matches_reference(reference_report):
    x, y, xl, yl = _clouds()
    res = knn_points(x, y, xl, yl, K=3)
    _record(reference_report, "knn3_dists", res.dists.numpy(), REF["knn3_dists"], 1e-5, 1e-6)
    want_idx = REF["knn3_idx"]
    got_idx = res.idx.numpy()
    mismatch = got_idx != want_idx
    reference_report["knn3_idx (mismatches)"] = (float(mismatch.sum()), 0.0)
    if mismatch.any():
        # only allowed where the two candidates are equally far in float32
        n, i, k = np.nonzero(mismatch)
        d_got = ((x[n, i] - y[n, got_idx[n, i, k]]) ** 2).sum(-1)
        d_want = ((x[n, i] - y[n, want_idx[n, i, k]]) ** 2).sum(-1)
        torch.testing.assert_close(d_got, d_want, rtol=1e-6, atol=1e-7)


def _reg_verts():
    verts, faces = ico_sphere(3)
    return verts[None] + torch.from_numpy(REF["reg_offsets"]).float(), faces


@pytest.mark.parametrize("packed", [False, True], ids=["shared_faces", "per_mesh_faces"])
def test_mesh_regularisers_match_reference(packed, reference_report):
    verts, faces = _reg_verts()
    if packed:
        faces = faces[None].expand(verts.shape[0], -1, -1).contiguous()
    tag = " (M,F,3 faces)" if packed else ""
    _record(reference_report, "reg_edge" + tag, mesh_edge_loss(verts, faces).item(), REF["reg_edge"], 1e-5, 0.0)
    _record(reference_report, "reg_normal" + tag, mesh_normal_consistency(verts, faces).item(), REF["reg_normal"], 1e-5, 0.0)
    _record(reference_report, "reg_lap_uniform" + tag,
            mesh_laplacian_smoothing(verts, faces, method="uniform").item(), REF["reg_lap_uniform"], 1e-5, 0.0)
