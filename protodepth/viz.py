"""See the scenes: training snapshots (pictures, PLY meshes and point clouds of a batch) and W&B payloads.
The drawing lives in `protodepth.pictures` (matplotlib), the files in `protodepth.meshes` (trimesh); their
entry points are re-exported here. torch tensors are accepted and moved to the CPU.

Entry points:
- `slot_colors(K)`, `colormap(values)`, `Camera`, `scene_picture(...)`: see `protodepth.pictures`.
- `write_ply(path, verts, faces, colors)` / `write_point_ply(path, points, colors)` / `write_glb(...)`: see
  `protodepth.meshes`.
- `snapshot(out_dir, step, batch, scene, pred_points, faces, loss, data_cfg)` writes pictures, posed scene
  meshes, point clouds and the prototypes under `out_dir/viz/step_XXXXXXXX/`.
- `wandb_payload(paths, batch, pred_points, ...)` -> {key: wandb.Image | wandb.Object3D} for `accelerator.log`.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from protodepth.meshes import ply_to_glb, write_glb, write_ply, write_point_ply
from protodepth.pictures import (SYNTHIA_NATIVE_HW, TARGET_GREY, Camera, as_array, check_shape, colormap,
                                 default_native_hw, native_hw_of, scene_picture, slot_colors)

__all__ = ["SYNTHIA_NATIVE_HW", "TARGET_GREY", "Camera", "colormap", "default_native_hw", "native_hw_of",
           "scene_picture", "slot_colors", "ply_to_glb", "write_glb", "write_ply", "write_point_ply", "prototype_grid",
           "snapshot", "cloud_array", "wandb_payload"]


# ------------------------------------------------------------------------------------------------ meshes

def prototype_grid(prototypes: Any, spacing: float | None = None) -> np.ndarray:
    """prototypes (P, V, 3) -> (P, V, 3) laid out side by side on a grid in the x-y plane (centred each), so
    all P can be seen at once in one file. spacing: grid step (default 1.5 x the largest extent)."""
    pr = as_array(prototypes, "prototypes")
    check_shape("prototypes", pr, (3,), 3, "(P, V, 3)")
    P = pr.shape[0]
    centred = pr - pr.mean(axis=1, keepdims=True)
    ext = float(np.abs(centred).max()) * 2 if centred.size else 1.0
    step = spacing or max(1e-6, 1.5 * ext)
    cols = max(1, math.ceil(math.sqrt(P)))
    r, c = np.divmod(np.arange(P), cols)
    offs = np.stack([c * step, -r * step, np.zeros(P)], axis=1).astype(np.float32)
    return centred + offs[:, None, :]


# ------------------------------------------------------------------------------------------------ snapshot

def _batch_items(batch: dict) -> tuple[Any, Any, Any, list]:
    for key in ("image", "cloud", "lengths"):
        if key not in batch:
            raise ValueError(f"batch: missing field {key!r} (expected collate_depth's image, cloud, lengths, paths)")
    return batch["image"], batch["cloud"], batch["lengths"], list(batch.get("paths") or [])


def snapshot(out_dir: str | os.PathLike, step: int, batch: dict, scene: Any, pred_points: Any, faces: Any,
             loss: float | None, data_cfg, max_images: int = 4, binary: bool = True) -> dict[str, list[Path]]:
    """Write what a run looks like at `step` into `out_dir/viz/step_XXXXXXXX/` (main process only):

    - `image_{i}.png`: `scene_picture` of batch image i (input, predicted points by slot, target cloud);
    - `scene_{i}.ply`: the K posed slot meshes of image i, one colour per slot (the pictures' colours);
    - `points_{i}.ply`: target cloud (grey) and predicted points (slot colours) of image i, to compare;
    - `prototypes.ply`: the P prototype meshes side by side, one colour each.

    batch: `collate_depth` output — image (B, 3, H, W), cloud (B, N, 3) zero-padded, lengths (B,), paths.
    scene: `SceneOutput` (or anything with slot_verts (B, K, V, 3) and prototypes (P, V, 3)).
    pred_points: (B, K, S, 3) sampled predicted points (`LossOutput.pred_points`).
    faces: (F, 3) shared faces (`model.faces`). loss: shown in the titles (None: omitted).
    data_cfg: `DataConfig` (camera and depth scale). At most `max_images` of the batch are written.
    Returns {"pictures": [...], "scenes": [...], "points": [...], "prototypes": [path]}.
    """
    if max_images < 1:
        raise ValueError(f"max_images: expected >= 1, got {max_images}")
    image, cloud, lengths, paths = _batch_items(batch)
    img = as_array(image, "batch['image']")
    check_shape("batch['image']", img, (4,), None, "(B, 3, H, W)")
    cl = as_array(cloud, "batch['cloud']")
    check_shape("batch['cloud']", cl, (3,), 3, "(B, N, 3)")
    ln = as_array(lengths, "batch['lengths']", np.int64)
    slot_verts = as_array(scene.slot_verts, "scene.slot_verts")
    check_shape("scene.slot_verts", slot_verts, (4,), 3, "(B, K, V, 3)")
    protos = as_array(scene.prototypes, "scene.prototypes")
    pp = as_array(pred_points, "pred_points")
    check_shape("pred_points", pp, (4,), 3, "(B, K, S, 3)")
    B = img.shape[0]
    if not (cl.shape[0] == ln.shape[0] == slot_verts.shape[0] == pp.shape[0] == B):
        raise ValueError(f"batch/scene/pred_points: batch sizes differ (image {B}, cloud {cl.shape[0]}, lengths "
                         f"{ln.shape[0]}, slot_verts {slot_verts.shape[0]}, pred_points {pp.shape[0]})")
    K = slot_verts.shape[1]
    pal = slot_colors(K)
    folder = Path(out_dir) / "viz" / f"step_{int(step):08d}"
    folder.mkdir(parents=True, exist_ok=True)
    out: dict[str, list[Path]] = {"pictures": [], "scenes": [], "points": [], "prototypes": []}
    loss_txt = "" if loss is None else f"  |  loss {float(loss):.4g}"
    for i in range(min(B, max_images)):
        path = paths[i] if i < len(paths) else None
        cam = Camera.for_input(data_cfg, native_hw_of(path, data_cfg))
        tgt = cl[i, : int(ln[i])]
        name = "/".join(Path(path).parts[-3:]) if path else f"image {i}"  # SEQ/DepthLeft/frame: unique in SYNTHIA
        title = f"step {int(step)}{loss_txt}  |  {name}"
        pic = scene_picture(img[i], tgt, pp[i], cam, title, depth_scale=float(data_cfg.depth_scale))
        p = folder / f"image_{i}.png"
        pic.save(p, compress_level=1)  # ~2x faster than the default, about the same size for these pictures
        out["pictures"].append(p)
        out["scenes"].append(write_ply(folder / f"scene_{i}.ply", slot_verts[i], faces, pal, binary))
        S = pp.shape[2]
        pts = np.concatenate([tgt, pp[i].reshape(-1, 3)])
        col = np.concatenate([np.broadcast_to(TARGET_GREY, tgt.shape), np.repeat(pal, S, axis=0)])
        out["points"].append(write_point_ply(folder / f"points_{i}.ply", pts, col, binary))
    out["prototypes"].append(write_ply(folder / "prototypes.ply", prototype_grid(protos), faces,
                                       slot_colors(protos.shape[0]), binary))
    return out


def cloud_array(target: Any, pred: Any, max_target_points: int = 20_000) -> np.ndarray:
    """(N + K S, 6) float32 xyz + rgb (0..255) for `wandb.Object3D`: the target cloud (N, 3) in grey, then the
    predicted points (K, S, 3) in slot colours. The target is thinned by a fixed stride to at most
    `max_target_points` (W&B's viewer slows down on big clouds)."""
    tgt = as_array(target, "target").reshape(-1, 3)
    prd = as_array(pred, "pred")
    check_shape("pred", prd, (3,), 3, "(K, S, 3)")
    if tgt.shape[0] > max_target_points:
        tgt = tgt[:: math.ceil(tgt.shape[0] / max_target_points)]
    K, S = prd.shape[:2]
    xyz = np.concatenate([tgt, prd.reshape(-1, 3)])
    rgb = np.concatenate([np.broadcast_to(TARGET_GREY, tgt.shape), np.repeat(slot_colors(K), S, axis=0)])
    return np.concatenate([xyz, rgb.astype(np.float32)], axis=1).astype(np.float32)


def wandb_payload(snapshot_paths: dict[str, Sequence[Path]], batch: dict, pred_points: Any,
                  prototypes: Any = None, max_images: int = 4, prefix: str = "viz") -> dict:
    """W&B objects for `accelerator.log(payload, step=step)`: `{prefix}/picture_{i}` (wandb.Image of the
    snapshot PNGs), `{prefix}/cloud_{i}` (wandb.Object3D of an (N, 6) xyz+rgb array: target grey, predicted
    points in slot colours), `{prefix}/mesh_{i}` (wandb.Object3D of the posed slot meshes: `scene_{i}.ply`
    converted to `scene_{i}.glb` beside it), and with `prototypes` (P, V, 3) `{prefix}/prototypes` (their vertices on a grid,
    one colour each). batch: `collate_depth` output; pred_points (B, K, S, 3). wandb is imported here only."""
    import wandb

    _, cloud, lengths, paths = _batch_items(batch)
    cl = as_array(cloud, "batch['cloud']")
    ln = as_array(lengths, "batch['lengths']", np.int64)
    pp = as_array(pred_points, "pred_points")
    check_shape("pred_points", pp, (4,), 3, "(B, K, S, 3)")
    payload: dict[str, Any] = {}
    for i, p in enumerate(list(snapshot_paths.get("pictures", []))[:max_images]):
        cap = Path(paths[i]).name if i < len(paths) else f"image {i}"
        payload[f"{prefix}/picture_{i}"] = wandb.Image(str(p), caption=cap)
    for i in range(min(pp.shape[0], max_images)):
        payload[f"{prefix}/cloud_{i}"] = wandb.Object3D(cloud_array(cl[i, : int(ln[i])], pp[i]))
    for i, p in enumerate(list(snapshot_paths.get("scenes", []))[:max_images]):
        # GLB only here, beside the PLY: W&B's viewer does not take PLY, and runs without W&B need no copy
        payload[f"{prefix}/mesh_{i}"] = wandb.Object3D(str(ply_to_glb(p)))
    if prototypes is not None:
        grid = prototype_grid(prototypes)
        P, V = grid.shape[:2]
        rgb = np.repeat(slot_colors(P), V, axis=0).astype(np.float32)
        payload[f"{prefix}/prototypes"] = wandb.Object3D(np.concatenate([grid.reshape(-1, 3), rgb], axis=1))
    return payload
