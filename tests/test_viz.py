"""protodepth.viz (with .pictures and .meshes): colours, camera projection, pictures, PLY / GLB export, training
snapshots, W&B payloads. Files are read back with trimesh, as a viewer would."""
from __future__ import annotations

from collections import namedtuple

import numpy as np
import pytest
import torch
from PIL import Image

from protodepth import viz
from protodepth.data import DataConfig, backproject, collate_depth, process_depth, render_scene

Scene = namedtuple("Scene", "slot_verts prototypes")

NATIVE_H, NATIVE_W = 48, 64


def small_cfg(**kw) -> DataConfig:
    base = dict(source="synthia", root="/nonexistent", height=24, width=40, num_bins=2, points_per_bin=300)
    base.update(kw)
    return DataConfig(**base)


def frame(cfg: DataConfig, seed: int = 0) -> dict:
    """One sample the way the data layer makes it, from a rendered synthetic depth map (NATIVE_H x NATIVE_W)."""
    depth = render_scene(np.random.default_rng(seed), NATIVE_H, NATIVE_W, cfg.focal_for(NATIVE_W))
    p = process_depth(depth, cfg, f"f{seed}.png")
    return {"image": torch.from_numpy(p.image).expand(3, -1, -1).contiguous(),
            "cloud": torch.from_numpy(p.points[:: max(1, len(p.points) // 500)]), "path": f"/nowhere/f{seed}.png"}


def tetra_scene(B: int, K: int, P: int):
    """A tiny closed mesh (tetrahedron) posed K times per image: slot_verts (B, K, 4, 3), prototypes (P, 4, 3)."""
    base = torch.tensor([[1.0, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1]])
    faces = torch.tensor([[0, 1, 2], [0, 3, 1], [0, 2, 3], [1, 3, 2]])
    offs = torch.stack([torch.tensor([2.0 * k - K, 0.0, -10.0]) for k in range(K)])
    slot_verts = base[None, None] * 0.5 + offs[None, :, None, :] + torch.zeros(B, 1, 1, 1)
    protos = base[None] * (1 + 0.1 * torch.arange(P, dtype=torch.float32))[:, None, None]
    return Scene(slot_verts, protos), faces


# ---------------------------------------------------------------------------------------------- colours

def test_slot_colors_fixed_and_distinct_up_to_64():
    c = viz.slot_colors(64)
    assert c.shape == (64, 3) and c.dtype == np.uint8
    assert np.array_equal(c[:10], viz.slot_colors(10))  # a prefix: slot k keeps its colour whatever K is
    d = np.linalg.norm(c[:, None, :].astype(float) - c[None].astype(float), axis=-1)
    np.fill_diagonal(d, np.inf)
    assert d.min() > 40, f"two slot colours are nearly the same (min RGB distance {d.min():.1f})"
    with pytest.raises(ValueError, match="k:"):
        viz.slot_colors(-1)


def test_colormap_ends_and_order():
    c = viz.colormap(np.array([0.0, 0.5, 1.0, np.nan, 7.0]))
    assert c.shape == (5, 3) and c.dtype == np.uint8
    assert np.array_equal(c[3], c[0]) and np.array_equal(c[4], c[2])  # NaN -> 0, out of range clipped
    ramp = viz.colormap(np.linspace(0, 1, 256))
    assert len({tuple(x) for x in ramp}) > 150  # a smooth map, not a few bands
    assert ramp[0, 2] > ramp[0, 0] and ramp[-1, 0] > ramp[-1, 2]  # blue near, red far


# ---------------------------------------------------------------------------------------------- camera

@pytest.mark.parametrize("keep_aspect", [False, True])
def test_camera_projects_backprojected_pixels_onto_the_input(keep_aspect):
    """Pixels back-projected by the data layer at native size land where the resize puts them in the input."""
    cfg = small_cfg(keep_aspect=keep_aspect)
    rng = np.random.default_rng(1)
    depth = rng.uniform(2, 80, size=(NATIVE_H, NATIVE_W))
    pts, idx = backproject(depth, cfg.focal_for(NATIVE_W))
    v0, u0 = np.divmod(idx, NATIVE_W)
    cam = viz.Camera.for_input(cfg, (NATIVE_H, NATIVE_W))
    u, v, d = cam.project(pts)
    if keep_aspect:
        s = min(cfg.height / NATIVE_H, cfg.width / NATIVE_W)
        sx = sy = s
    else:
        sx, sy = cfg.width / NATIVE_W, cfg.height / NATIVE_H
    np.testing.assert_allclose(u, (u0 - NATIVE_W / 2) * sx + cfg.width / 2, atol=1e-6)
    np.testing.assert_allclose(v, (v0 - NATIVE_H / 2) * sy + cfg.height / 2, atol=1e-6)
    np.testing.assert_allclose(d, depth.reshape(-1)[idx], rtol=1e-9)


def test_camera_defaults_to_synthia_and_skips_points_behind():
    cam = viz.Camera.for_input(DataConfig(source="synthia", root="/x"))  # 1920 x 1080 native -> 640 x 480
    assert cam.fx == pytest.approx(847.630211643 / 3) and cam.fy == pytest.approx(847.630211643 * 480 / 1080)
    u, v, d = cam.project(np.array([[0.0, 0.0, -5.0], [1.0, 1.0, 3.0]]))
    assert (u[0], v[0]) == (320, 240) and np.isnan(u[1]) and np.isnan(v[1])
    with pytest.raises(ValueError, match="native_hw"):
        viz.Camera.for_input(small_cfg(), (0, 10))


# ---------------------------------------------------------------------------------------------- pictures

def test_colormap_is_matplotlibs_turbo():
    from matplotlib import colormaps

    v = np.linspace(0, 1, 11)
    assert np.array_equal(viz.colormap(v), colormaps["turbo"](v, bytes=True)[:, :3])


def slot_points(cam, us, row: float, d: float, S: int) -> np.ndarray:
    """(K, S, 3): slot k is S copies of one point d metres ahead of input pixel (us[k], row)."""
    pred = np.zeros((len(us), S, 3), np.float32)
    for k, u in enumerate(us):
        pred[k, :] = [(u - cam.cx) / cam.fx * d, -(row - cam.cy) / cam.fy * d, -d]
    return pred


def test_scene_picture_readable_and_points_where_expected(tmp_path):
    cfg = small_cfg()
    s = frame(cfg)
    cam = viz.Camera.for_input(cfg, (NATIVE_H, NATIVE_W))
    us = [8.0, 20.0, 32.0]
    pred = slot_points(cam, us, 12.0, 10.0, 5)
    pic = viz.scene_picture(s["image"], s["cloud"], pred, cam, title="step 7 | loss 0.5")
    path = tmp_path / "p.png"
    pic.save(path)
    arr = np.asarray(Image.open(path).convert("RGB"))
    assert arr.shape[1] >= 2 * 480  # two panels per row, each enlarged to >= 480 px
    assert arr.astype(float).var() > 500, "picture is nearly blank"
    assert len(np.unique(arr.reshape(-1, 3), axis=0)) > 50
    x, y, pw, ph = pic.info["panels"]["pred"]
    f = pw / cfg.width
    pal = viz.slot_colors(3)
    for k, u in enumerate(us):
        px, py = int(x + u * f), int(y + 12 * f)  # the marker is centred on the projection
        assert tuple(arr[py, px]) == tuple(pal[k]), f"slot {k} not drawn at its projected pixel"
    assert pic.info["pred_in_view"] == 15
    # the target panel shows the cloud: many lit pixels
    x, y, pw, ph = pic.info["panels"]["target"]
    target_panel = arr[y:y + ph, x:x + pw]
    assert (target_panel.max(axis=-1) > 40).mean() > 0.05
    # the input panel is the input through turbo (pixel centres, enlarged with nearest neighbour)
    x, y, pw, ph = pic.info["panels"]["input"]
    img = s["image"][0].numpy()
    for r, c in [(3, 5), (20, 30), (12, 12)]:
        got = arr[y + int((r + 0.5) * f), x + int((c + 0.5) * f)]
        assert np.abs(got.astype(int) - viz.colormap(img[r, c]).astype(int)).max() <= 3
    # the colour bar holds the colour map's far end
    assert any((arr.reshape(-1, 3) == viz.colormap(1.0)).all(axis=1))


def test_nearer_points_cover_farther_ones():
    """Two slots on one pixel ray: the nearer one is what the predicted panel shows, whatever the slot order."""
    cfg = small_cfg()
    s = frame(cfg)
    cam = viz.Camera.for_input(cfg, (NATIVE_H, NATIVE_W))
    for near in (0, 1):
        pred = np.concatenate([slot_points(cam, [20.0], 12.0, 10.0 if k == near else 40.0, 4) for k in (0, 1)])
        pic = viz.scene_picture(s["image"], s["cloud"], pred, cam)
        arr = np.asarray(pic)
        x, y, pw, ph = pic.info["panels"]["pred"]
        f = pw / cfg.width
        assert tuple(arr[int(y + 12 * f), int(x + 20 * f)]) == tuple(viz.slot_colors(2)[near])


def test_a_picture_does_not_keep_the_previous_scene():
    """Pictures of one geometry share a drawn template: a scene drawn after another equals it drawn first."""
    from protodepth import pictures

    cfg = small_cfg()
    a, b = frame(cfg, 0), frame(cfg, 1)
    cam = viz.Camera.for_input(cfg, (NATIVE_H, NATIVE_W))
    pa, pb = slot_points(cam, [8.0, 30.0], 6.0, 5.0, 3), slot_points(cam, [20.0, 12.0], 18.0, 30.0, 3)
    viz.scene_picture(a["image"], a["cloud"], pa, cam, title="scene a")
    after = np.asarray(viz.scene_picture(b["image"], b["cloud"], pb, cam, title="b"))
    pictures._template.cache_clear()
    fresh = np.asarray(viz.scene_picture(b["image"], b["cloud"], pb, cam, title="b"))
    assert np.array_equal(after, fresh)


def test_pictures_drawn_from_threads_equal_sequential_ones():
    """Inference draws from writer threads; matplotlib is not thread-safe, so drawing is serialised."""
    from concurrent.futures import ThreadPoolExecutor

    cfg = small_cfg()
    cam = viz.Camera.for_input(cfg, (NATIVE_H, NATIVE_W))
    frames = [frame(cfg, i) for i in range(4)]
    preds = [slot_points(cam, [4.0 + 8 * i, 30.0], 10.0, 8.0 + i, 3) for i in range(4)]

    def draw(i):
        return np.asarray(viz.scene_picture(frames[i]["image"], frames[i]["cloud"], preds[i], cam, title=str(i)))

    sequential = [draw(i) for i in range(4)]
    with ThreadPoolExecutor(4) as pool:
        threaded = list(pool.map(draw, [0, 1, 2, 3] * 2))
    for i, arr in enumerate(threaded):
        assert np.array_equal(arr, sequential[i % 4])


def test_top_view_pins_far_predictions_to_the_edge_in_their_direction():
    cfg = small_cfg()
    s = frame(cfg)
    cam = viz.Camera.for_input(cfg, (NATIVE_H, NATIVE_W))
    pred = np.zeros((2, 4, 3), np.float32)
    pred[0] = [900.0, 0.0, -10.0]  # far to the right, nearly level with the camera
    pred[1] = [-5.0, 0.0, 400.0]  # far behind the camera
    pic = viz.scene_picture(s["image"], s["cloud"], pred, cam)
    arr = np.asarray(pic)
    x, y, pw, ph = pic.info["panels"]["top"]
    top = arr[y:y + ph, x:x + pw]
    pal = viz.slot_colors(2)
    right = (top[:, -6:] == pal[0]).all(axis=-1)
    bottom = (top[-6:] == pal[1]).all(axis=-1)
    assert right.any(), "slot 0 (far right) not marked on the right edge"
    assert bottom.any(), "slot 1 (behind the camera) not marked on the bottom edge"
    assert np.nonzero(right)[0].mean() > ph / 2  # level with the camera, which sits at the bottom centre


def test_scene_picture_rejects_bad_input():
    cfg = small_cfg()
    cam = viz.Camera.for_input(cfg, (NATIVE_H, NATIVE_W))
    img = torch.zeros(3, cfg.height, cfg.width)
    with pytest.raises(ValueError, match="pred"):
        viz.scene_picture(img, torch.zeros(5, 3), torch.zeros(4, 3), cam)
    with pytest.raises(ValueError, match="target"):
        viz.scene_picture(img, torch.zeros(5, 2), torch.zeros(2, 4, 3), cam)
    with pytest.raises(ValueError, match="camera"):
        viz.scene_picture(torch.zeros(3, 10, 10), torch.zeros(5, 3), torch.zeros(2, 4, 3), cam)


# ---------------------------------------------------------------------------------------------- PLY, GLB

def load_mesh(path):
    """A file read back with trimesh, as a viewer would (no merging or reordering of vertices)."""
    import trimesh

    return trimesh.load(path, process=False)


@pytest.mark.parametrize("binary", [True, False])
def test_write_ply_round_trip(tmp_path, binary):
    scene, faces = tetra_scene(1, 3, 2)
    verts = scene.slot_verts[0]  # (3, 4, 3)
    path = viz.write_ply(tmp_path / "m.ply", verts, faces, binary=binary)
    text = path.read_bytes()[:200]
    assert (b"binary_little_endian" in text) == binary and (b"format ascii" in text) != binary
    got = load_mesh(path)
    np.testing.assert_allclose(got.vertices, verts.reshape(-1, 3).numpy(), atol=1e-5)
    assert got.faces.shape == (12, 3)
    assert np.array_equal(got.faces[4:8], faces.numpy() + 4)  # second mesh's faces point at its own vertices
    assert np.array_equal(got.visual.vertex_colors[4, :3], viz.slot_colors(3)[1])
    assert not list(tmp_path.glob("*.part"))
    pts = np.random.default_rng(0).normal(size=(10, 3))
    pts[3] = np.nan  # dropped
    got = load_mesh(viz.write_point_ply(tmp_path / "c.ply", pts, (1.0, 0.0, 0.0), binary=binary))
    assert got.vertices.shape == (9, 3) and (got.colors[:, :3] == [255, 0, 0]).all()
    np.testing.assert_allclose(got.vertices, np.delete(pts, 3, axis=0), atol=1e-5)
    assert not hasattr(got, "faces") or len(got.faces) == 0


def test_write_glb_keeps_meshes_and_colours(tmp_path):
    scene, faces = tetra_scene(1, 3, 2)
    path = viz.write_glb(tmp_path / "m.glb", scene.slot_verts[0], faces)
    assert path.read_bytes()[:4] == b"glTF"
    mesh = load_mesh(path).to_geometry()  # a glTF file holds a scene
    np.testing.assert_allclose(mesh.vertices, scene.slot_verts[0].reshape(-1, 3).numpy(), atol=1e-6)
    assert np.array_equal(mesh.faces[4:8], faces.numpy() + 4)
    assert np.array_equal(mesh.visual.vertex_colors[:, :3], np.repeat(viz.slot_colors(3), 4, axis=0))
    glb = viz.ply_to_glb(viz.write_ply(tmp_path / "s.ply", scene.slot_verts[0], faces))
    assert glb == tmp_path / "s.glb"
    again = load_mesh(glb).to_geometry()
    assert np.array_equal(again.vertices, mesh.vertices) and np.array_equal(again.faces, mesh.faces)
    assert np.array_equal(again.visual.vertex_colors, mesh.visual.vertex_colors)


def test_write_ply_rejects_bad_input(tmp_path):
    scene, faces = tetra_scene(1, 2, 1)
    with pytest.raises(ValueError, match="faces"):
        viz.write_ply(tmp_path / "m.ply", scene.slot_verts[0], faces + 4)
    with pytest.raises(ValueError, match="colors"):
        viz.write_ply(tmp_path / "m.ply", scene.slot_verts[0], faces, colors=np.zeros((5, 3)))
    with pytest.raises(ValueError, match="verts"):
        viz.write_ply(tmp_path / "m.ply", torch.full((4, 3), float("nan")), faces)
    with pytest.raises(ValueError, match="points: no finite point"):
        viz.write_point_ply(tmp_path / "c.ply", np.full((3, 3), np.nan))


# ---------------------------------------------------------------------------------------------- snapshot

def test_snapshot_writes_pictures_meshes_and_prototypes(tmp_path):
    cfg = small_cfg()
    batch = collate_depth([frame(cfg, 0), frame(cfg, 1), frame(cfg, 2)])
    B, K, S, P = 3, 4, 20, 2
    scene, faces = tetra_scene(B, K, P)
    pred = scene.slot_verts.mean(dim=2, keepdim=True) + 0.1 * torch.randn(B, K, S, 3)
    paths = viz.snapshot(tmp_path, 1234, batch, scene, pred, faces, loss=0.25, data_cfg=cfg, max_images=2)
    folder = tmp_path / "viz" / "step_00001234"
    assert [p.name for p in paths["pictures"]] == ["image_0.png", "image_1.png"]
    assert [p.name for p in paths["scenes"]] == ["scene_0.ply", "scene_1.ply"]
    assert paths["prototypes"] == [folder / "prototypes.ply"]
    for p in paths["pictures"]:
        arr = np.asarray(Image.open(p).convert("RGB"))
        assert arr.astype(float).var() > 500 and len(np.unique(arr.reshape(-1, 3), axis=0)) > 50
    mesh = load_mesh(paths["scenes"][1])
    assert mesh.vertices.shape == (K * 4, 3) and mesh.faces.shape == (K * 4, 3)
    assert len({tuple(c) for c in mesh.visual.vertex_colors}) == K
    cloud = load_mesh(paths["points"][0])
    assert cloud.vertices.shape[0] == int(batch["lengths"][0]) + K * S  # target (padding dropped) + predictions
    protos = load_mesh(paths["prototypes"][0])
    assert protos.vertices.shape == (P * 4, 3)
    # laid out side by side: the two prototypes do not overlap
    a, b = protos.vertices[:4], protos.vertices[4:]
    assert a[:, 0].max() < b[:, 0].min()
    with pytest.raises(ValueError, match="batch sizes differ"):
        viz.snapshot(tmp_path, 1, batch, scene, pred[:2], faces, 0.0, cfg)


def test_snapshot_with_the_real_model_and_loss(tmp_path):
    """The exact call the trainer makes, on a tiny ProtoDepth and proto_depth_loss output."""
    from protodepth.config import LossConfig, ModelConfig
    from protodepth.loss import proto_depth_loss
    from protodepth.model import ProtoDepth

    cfg = small_cfg()
    batch = collate_depth([frame(cfg, 0), frame(cfg, 1)])
    torch.manual_seed(0)
    model = ProtoDepth(ModelConfig(num_slots=3, num_prototypes=2, ico_level=1, channels_last=False)).eval()
    with torch.no_grad():
        scene = model(batch["image"])
        res = proto_depth_loss(scene.slot_verts, scene.prototypes, model.faces, batch["cloud"], batch["lengths"],
                               LossConfig(samples_per_slot=16))
    paths = viz.snapshot(tmp_path, 3, batch, scene, res.pred_points, model.faces, float(res.total), cfg)
    assert len(paths["pictures"]) == 2 and all(p.stat().st_size > 1000 for p in paths["pictures"])
    mesh = load_mesh(paths["scenes"][0])
    assert mesh.vertices.shape == (3 * 42, 3) and mesh.faces.shape == (3 * 80, 3)


def test_wandb_payload(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "disabled")
    cfg = small_cfg()
    batch = collate_depth([frame(cfg, 0), frame(cfg, 1)])
    scene, faces = tetra_scene(2, 3, 2)
    pred = scene.slot_verts[:, :, :2, :]  # (B, K, 2, 3)
    paths = viz.snapshot(tmp_path, 5, batch, scene, pred, faces, 1.0, cfg)
    payload = viz.wandb_payload(paths, batch, pred, prototypes=scene.prototypes)
    assert set(payload) == {"viz/picture_0", "viz/picture_1", "viz/cloud_0", "viz/cloud_1", "viz/mesh_0", "viz/mesh_1",
                            "viz/prototypes"}
    assert isinstance(payload["viz/picture_0"], wandb.Image)
    assert isinstance(payload["viz/cloud_1"], wandb.Object3D) and isinstance(payload["viz/mesh_1"], wandb.Object3D)
    glb = tmp_path / "viz" / "step_00000005" / "scene_1.glb"  # the posed slot meshes, for W&B's viewer
    assert load_mesh(glb).to_geometry().vertices.shape == (3 * 4, 3)
    arr = viz.cloud_array(batch["cloud"][1, : batch["lengths"][1]], pred[1])
    assert arr.shape == (int(batch["lengths"][1]) + 6, 6)
    np.testing.assert_array_equal(arr[-6:, 3:], np.repeat(viz.slot_colors(3), 2, axis=0))
