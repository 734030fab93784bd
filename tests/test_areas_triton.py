"""The Triton kernel behind the sampling weights (`protodepth.geometry.areas_triton`) against PyTorch's face areas.

The interpreter test runs the real kernel on CPU tensors under TRITON_INTERPRET=1, in a subprocess (the variable
must be set before triton is first imported, and this pytest process has imported it already)."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from protodepth.geometry import ico_sphere
from protodepth.geometry.sampling import face_areas
from triton_markers import HAVE_TRITON

REPO = Path(__file__).resolve().parents[1]


def _meshes(device="cpu"):
    """5 perturbed level-2 icospheres (320 faces: not a multiple of the kernel's block), contiguous."""
    v, f = ico_sphere(2)
    g = torch.Generator().manual_seed(0)
    verts = v[None] * torch.rand(5, 1, 3, generator=g) * 4 + torch.randn(5, v.shape[0], 3, generator=g) * 0.1
    return verts.to(device), f.to(device)


@pytest.mark.skipif(not HAVE_TRITON, reason="triton is not importable on this machine")
def test_interpreted_kernel_gives_twice_pytorchs_face_areas_for_any_vertex_layout():
    code = textwrap.dedent("""
        import os
        import sys
        os.environ["TRITON_INTERPRET"] = "1"
        sys.path.insert(0, "tests")  # the test module imports its sibling triton_markers
        import torch
        from protodepth.geometry.areas_triton import doubled_face_areas
        from protodepth.geometry.sampling import face_areas
        from tests.test_areas_triton import _meshes
        verts, faces = _meshes()
        planar = verts.transpose(1, 2).contiguous().transpose(1, 2)  # the posed slots' layout
        for x in (verts, planar, verts[:0]):
            torch.testing.assert_close(doubled_face_areas(x, faces), 2 * face_areas(x, faces), rtol=1e-6, atol=1e-7)
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


@pytest.mark.cuda
@pytest.mark.skipif(not (HAVE_TRITON and torch.cuda.is_available()), reason="needs a CUDA GPU and triton")
def test_cuda_kernel_gives_twice_pytorchs_face_areas():
    from protodepth.geometry.areas_triton import doubled_face_areas

    verts, faces = _meshes("cuda")
    planar = verts.transpose(1, 2).contiguous().transpose(1, 2)
    for x in (verts, planar):
        torch.testing.assert_close(doubled_face_areas(x, faces), 2 * face_areas(x, faces), rtol=1e-6, atol=1e-6)


@pytest.mark.cuda
@pytest.mark.skipif(not (HAVE_TRITON and torch.cuda.is_available()), reason="needs a CUDA GPU and triton")
def test_sampling_weights_on_cuda_come_from_the_kernel(monkeypatch):
    from protodepth.geometry import areas_triton, sample_points_from_meshes

    calls = []
    real = areas_triton.doubled_face_areas
    monkeypatch.setattr(areas_triton, "doubled_face_areas", lambda v, f: calls.append(1) or real(v, f))
    verts, faces = _meshes("cuda")
    points = sample_points_from_meshes(verts, faces, 100, generator=torch.Generator("cuda").manual_seed(0))
    assert calls and points.shape == (5, 100, 3) and torch.isfinite(points).all()
