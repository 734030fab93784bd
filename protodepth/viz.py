"""See the scenes: pictures of depth inputs with projected slot points, PLY mesh and point-cloud export, and
W&B payloads. numpy + PIL only (no matplotlib); torch tensors are accepted and moved to the CPU.

Entry points:
- `slot_colors(K)` (K, 3) uint8: a fixed palette, distinct up to K = 64.
- `colormap(values)` the "turbo"-like colour map used for depth, values in [0, 1].
- `Camera`: the pinhole camera of the network input; `Camera.for_input(data_cfg, native_hw)`.
- `scene_picture(image, target, pred, camera, title, depth_scale)` -> PIL image with four panels:
  input depth (colour-mapped, colour bar in metres), predicted points coloured by slot over the input in grey,
  the target cloud projected and coloured by depth, and a top view of target and predictions; slot legend.
- `write_ply(path, verts, faces, colors)` / `write_point_ply(path, points, colors)` / `read_ply(path)`.
- `snapshot(out_dir, step, batch, scene, pred_points, faces, loss, data_cfg)` writes pictures, posed scene
  meshes, point clouds and the prototypes under `out_dir/viz/step_XXXXXXXX/`.
- `wandb_payload(paths, batch, pred_points, ...)` -> {key: wandb.Image | wandb.Object3D} for `accelerator.log`.

Camera convention (as the data layer): x right, y up, looking down -Z; a point (X, Y, Z) with d = -Z > 0 lands
at column u = fx X / d + cx, row v = cy - fy Y / d.
"""
from __future__ import annotations

import colorsys
import functools
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

SYNTHIA_NATIVE_HW = (1080, 1920)  # frame size when a frame's own can't be read (its PNG moved or was cached)

TARGET_GREY = np.array([170, 170, 170], dtype=np.uint8)  # target points next to slot-coloured predictions


# ------------------------------------------------------------------------------------------------ helpers

def _np(x: Any, name: str, dtype=np.float32) -> np.ndarray:
    """Tensor / array / list -> numpy array (CPU, detached); names the argument on failure."""
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy() if x.dtype.is_floating_point else x.detach().cpu().numpy()
    try:
        return np.asarray(x, dtype=dtype)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name}: cannot convert {type(x).__name__} to a numeric array ({e})") from None


def _check_shape(name: str, a: np.ndarray, ndims: tuple[int, ...], last: int | None, doc: str) -> None:
    if a.ndim not in ndims or (last is not None and a.shape[-1] != last):
        raise ValueError(f"{name}: expected shape {doc}, got {tuple(a.shape)}")


# ------------------------------------------------------------------------------------------------ colours

@functools.lru_cache(maxsize=1)
def _palette64() -> np.ndarray:
    """64 colours picked greedily (farthest point first) from saturated, bright HSV candidates under the
    "redmean" RGB distance, which follows perceived difference better than plain RGB. Greys and dark colours
    are not candidates: they are the pictures' backgrounds and the target cloud's colour."""
    cands = [colorsys.hsv_to_rgb(h / 360, s, v) for h in range(0, 360, 4) for s in (1.0, 0.7, 0.45)
             for v in (1.0, 0.75, 0.55)]
    c = np.round(np.array(cands) * 255)

    def dist(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        rm = (a[..., 0] + b[..., 0]) / 2
        d = a - b
        return np.sqrt((2 + rm / 256) * d[..., 0] ** 2 + 4 * d[..., 1] ** 2 + (2 + (255 - rm) / 256) * d[..., 2] ** 2)

    chosen = [0]  # pure red first
    nearest = dist(c, c[0])
    for _ in range(63):
        j = int(np.argmax(nearest))
        chosen.append(j)
        nearest = np.minimum(nearest, dist(c, c[j]))
    return c[chosen].astype(np.uint8)


def slot_colors(k: int) -> np.ndarray:
    """(k, 3) uint8 slot colours from a fixed palette: slot i has the same colour whatever k is, and the first
    64 are pairwise distinct (min RGB distance > 50). Beyond 64 the palette repeats (a deterministic cycle)."""
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 0:
        raise ValueError(f"k: expected a number of slots >= 0, got {k!r}")
    pal = _palette64()
    return pal[np.arange(k) % len(pal)].copy()


# Anchors of a perceptually ordered blue -> cyan -> green -> yellow -> red map (the shape of Google's "turbo");
# interpolated linearly, 11 anchors keep it smooth without a 256-entry table.
_CMAP_ANCHORS = np.array([
    [48, 18, 59], [65, 69, 171], [70, 117, 237], [57, 162, 252], [27, 207, 212], [36, 236, 166],
    [97, 252, 108], [164, 252, 59], [209, 232, 52], [243, 198, 58], [254, 155, 45], [243, 99, 21],
    [217, 56, 6], [177, 25, 1], [122, 4, 3],
], dtype=np.float64)


def colormap(values: Any) -> np.ndarray:
    """values (...) in [0, 1] (clipped; NaN -> 0) -> (..., 3) uint8 colours, dark blue (0) to dark red (1)."""
    v = np.nan_to_num(np.asarray(values, dtype=np.float64), nan=0.0)
    x = np.clip(v, 0.0, 1.0) * (len(_CMAP_ANCHORS) - 1)
    i0 = np.minimum(np.floor(x).astype(np.int64), len(_CMAP_ANCHORS) - 2)
    f = (x - i0)[..., None]
    rgb = _CMAP_ANCHORS[i0] * (1 - f) + _CMAP_ANCHORS[i0 + 1] * f
    return np.round(rgb).astype(np.uint8)


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)  # scalable font: Pillow >= 10.1 with FreeType
    except TypeError:
        return ImageFont.load_default()


# ------------------------------------------------------------------------------------------------ camera

@dataclass(frozen=True)
class Camera:
    """Pinhole camera of an image `width` x `height` pixels: focal lengths fx, fy and principal point cx, cy
    (pixels), looking down -Z with x right and y up."""

    fx: float
    fy: float
    cx: float
    cy: float
    width: int
    height: int

    @classmethod
    def for_input(cls, data_cfg, native_hw: tuple[int, int] | None = None) -> "Camera":
        """The camera of the network input (data_cfg.height x data_cfg.width) for depth frames of native size
        `native_hw` = (H0, W0) (default: SYNTHIA's 1080 x 1920, or the synthetic size for data.source
        'synthetic'). The focal is data_cfg.focal, or SYNTHIA's scaled by W0 / 1920; the resize to the input
        scales x by W / W0 and y by H / H0 (keep_aspect: both by the fitted scale, centred)."""
        h_in, w_in = int(data_cfg.height), int(data_cfg.width)
        if native_hw is None:
            native_hw = default_native_hw(data_cfg)
        h0, w0 = (int(x) for x in native_hw)
        if h0 < 1 or w0 < 1:
            raise ValueError(f"native_hw: expected positive (height, width), got {native_hw}")
        focal = float(data_cfg.focal_for(w0))  # the data layer's rule: data.focal, or SYNTHIA's scaled by W0
        if getattr(data_cfg, "keep_aspect", False):
            s = min(h_in / h0, w_in / w0)
            sx = sy = s
        else:
            sx, sy = w_in / w0, h_in / h0
        return cls(focal * sx, focal * sy, w_in / 2.0, h_in / 2.0, w_in, h_in)

    def project(self, points: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """points (N, 3) camera frame -> (u (N,), v (N,), depth d = -Z (N,)), pixel coordinates as floats.
        Points with d <= 0 (behind the camera) get u = v = NaN."""
        p = _np(points, "points", np.float64).reshape(-1, 3)
        d = -p[:, 2]
        with np.errstate(divide="ignore", invalid="ignore"):
            ok = d > 1e-6
            u = np.where(ok, self.fx * p[:, 0] / np.where(ok, d, 1.0) + self.cx, np.nan)
            v = np.where(ok, self.cy - self.fy * p[:, 1] / np.where(ok, d, 1.0), np.nan)
        return u, v, d


def default_native_hw(data_cfg) -> tuple[int, int]:
    if getattr(data_cfg, "source", "synthia") == "synthetic":
        return int(data_cfg.synthetic_height), int(data_cfg.synthetic_width)
    return SYNTHIA_NATIVE_HW


def native_hw_of(path: str | os.PathLike | None, data_cfg) -> tuple[int, int]:
    """(H0, W0) of the depth frame at `path` from its PNG header; the config's default when it can't be read
    (a cache built elsewhere, a moved dataset)."""
    if path:
        try:
            with Image.open(path) as im:
                w, h = im.size
            return h, w
        except (OSError, ValueError):
            pass
    return default_native_hw(data_cfg)


def splat(canvas: np.ndarray, u: np.ndarray, v: np.ndarray, depth: np.ndarray, colors: np.ndarray,
          radius: int = 1) -> np.ndarray:
    """Draw points as (2 radius + 1)^2 squares into canvas (H, W, 3) uint8, in place; the nearest point
    (smallest depth) wins each pixel (a z-buffer, so far slots never paint over near ones).

    u, v, depth (N,) floats (NaN = skip), colors (N, 3) uint8. Returns a (H, W) bool mask of painted pixels."""
    H, W = canvas.shape[:2]
    ok = np.isfinite(u) & np.isfinite(v)
    ui = np.floor(u[ok]).astype(np.int64)
    vi = np.floor(v[ok]).astype(np.int64)
    dz, col = depth[ok], colors[ok]
    us, vs, ds, cs = [], [], [], []
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            us.append(ui + dx), vs.append(vi + dy), ds.append(dz), cs.append(col)
    uu, vv, dd, cc = (np.concatenate(a) for a in (us, vs, ds, cs))
    inside = (uu >= 0) & (uu < W) & (vv >= 0) & (vv < H)
    flat = vv[inside] * W + uu[inside]
    dd, cc = dd[inside], cc[inside]
    order = np.lexsort((dd, flat))  # by pixel, nearest first
    flat, cc = flat[order], cc[order]
    first = np.ones(flat.shape[0], dtype=bool)
    first[1:] = flat[1:] != flat[:-1]
    mask = np.zeros(H * W, dtype=bool)
    mask[flat[first]] = True
    canvas.reshape(-1, 3)[flat[first]] = cc[first]
    return mask.reshape(H, W)


# ------------------------------------------------------------------------------------------------ pictures

def _upscale_factor(w: int, h: int, min_width: int, max_width: int) -> float:
    if w < min_width:
        return float(math.ceil(min_width / w))  # integer factor: crisp nearest-neighbour pixels
    if w > max_width:
        return max_width / w
    return 1.0


def _resize(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    if (rgb.shape[1], rgb.shape[0]) == size:
        return rgb
    img = Image.fromarray(rgb)
    method = Image.NEAREST if size[0] >= rgb.shape[1] else Image.BILINEAR
    return np.asarray(img.resize(size, method))


def _top_view(target: np.ndarray, pred: np.ndarray, pred_colors: np.ndarray, camera: Camera, pw: int, ph: int,
              radius: int) -> tuple[np.ndarray, int, float]:
    """Bird's-eye panel (ph, pw, 3): x to the right, distance in front of the camera (-Z) upwards, equal
    scales; target grey, predictions in their colours, camera frustum in white. The extent is the target's
    (2nd..98th percentile of distance, so one far outlier does not shrink the scene). Returns the panel,
    the number of predicted points outside it, and the extent in metres (for the caption)."""
    canvas = np.full((ph, pw, 3), 16, dtype=np.uint8)
    ref = target if target.shape[0] else pred.reshape(-1, 3)
    if ref.shape[0] == 0:
        return canvas, 0, 0.0
    d = -ref[:, 2]
    dmax = float(np.percentile(d, 98)) * 1.1 if d.size else 1.0
    dmax = max(dmax, 1e-3)
    half_fov = camera.width / 2 / camera.fx  # tan of the half horizontal field of view
    xr = max(float(np.percentile(np.abs(ref[:, 0]), 98)) * 1.1, dmax * half_fov, 1e-3)
    margin = 6
    s = min((pw - 2 * margin) / (2 * xr), (ph - 2 * margin) / dmax)
    cx, base = pw / 2.0, ph - margin

    def to_px(p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return cx + p[:, 0] * s, base - (-p[:, 2]) * s

    img = Image.fromarray(canvas)
    draw = ImageDraw.Draw(img)
    for sgn in (-1, 1):  # the frustum's horizontal edges
        draw.line([cx, base, cx + sgn * dmax * half_fov * s, base - dmax * s], fill=(110, 110, 110))
    canvas = np.array(img)
    tu, tv = to_px(target)
    height_order = target[:, 1]  # seen from above: the highest point wins a pixel
    splat(canvas, tu, tv, -height_order, np.broadcast_to(TARGET_GREY, target.shape), max(1, radius - 1))
    p = pred.reshape(-1, 3)
    pu, pv = to_px(p)
    off = ~((pu >= 0) & (pu < pw) & (pv >= 0) & (pv < ph))
    # off-panel predictions (an untrained model puts slots hundreds of metres away) are pinned to the border
    # in their direction, so the panel still says where every slot went
    if off.any():
        du, dv = pu[off] - cx, pv[off] - base
        with np.errstate(divide="ignore", invalid="ignore"):
            tu = np.where(du > 0, (pw - 2 - cx) / du, np.where(du < 0, (1 - cx) / du, np.inf))
            tv = np.where(dv > 0, (ph - 2 - base) / dv, np.where(dv < 0, (1 - base) / dv, np.inf))
        t = np.clip(np.minimum(tu, tv), 0, 1)  # along the ray from the camera to the panel's edge
        pu, pv = pu.copy(), pv.copy()
        pu[off], pv[off] = cx + t * du, base + t * dv
        splat(canvas, pu[off], pv[off], np.zeros(int(off.sum())), pred_colors[off], radius + 1)
    splat(canvas, pu[~off], pv[~off], -p[~off, 1], pred_colors[~off], radius)
    return canvas, int(off.sum()), dmax


def scene_picture(image: Any, target: Any, pred: Any, camera: Camera, title: str = "",
                  depth_scale: float = 300.0, min_width: int = 480, max_width: int = 640,
                  max_target_points: int = 50_000) -> Image.Image:
    """One readable picture of one scene.

    image:  (3, H, W) or (H, W) network input in [0, 1] = sqrt(clip(depth / depth_scale, 0, 1)).
    target: (N, 3) target cloud, camera frame, metres (padding already removed).
    pred:   (K, S, 3) predicted points, S per slot, camera frame.
    camera: the camera of `image` (H x W pixels), e.g. `Camera.for_input(data_cfg, native_hw)`.
    title:  text of the title bar, e.g. "step 120 | loss 0.432 | 000003.png".

    Four panels in a 2 x 2 grid, each upscaled to at least `min_width` px wide (at most `max_width`):
    the input depth colour-mapped | the input in grey with the predicted points projected, coloured by slot;
    the target cloud projected and coloured by depth | a top view (x across, distance up) of target (grey) and
    predictions (slot colours), which shows depth errors the projections hide. Below: a colour bar in metres
    (sqrt-spaced like the input, so the near range gets more colours) and the slot colour legend.
    Returns an RGB `PIL.Image`; `img.info["panels"]` holds each panel's (x, y, w, h) box in the picture and
    `img.info["pred_pixels"]` the count of pixels painted by predicted points in the projected panel.
    """
    img = _np(image, "image")
    if img.ndim == 3:
        if img.shape[0] not in (1, 3):
            raise ValueError(f"image: expected shape (3, H, W) or (H, W), got {tuple(img.shape)}")
        img = img[0]
    _check_shape("image", img, (2,), None, "(3, H, W) or (H, W)")
    tgt = _np(target, "target")
    _check_shape("target", tgt, (2,), 3, "(N, 3)")
    prd = _np(pred, "pred")
    _check_shape("pred", prd, (3,), 3, "(K, S, 3)")
    if not isinstance(camera, Camera):
        raise ValueError(f"camera: expected a protodepth.viz.Camera, got {type(camera).__name__}")
    if not depth_scale > 0:
        raise ValueError(f"depth_scale: expected metres > 0, got {depth_scale}")
    H, W = img.shape
    if (camera.height, camera.width) != (H, W):
        raise ValueError(f"camera: is for {camera.width}x{camera.height} images, the image is {W}x{H}")
    K, S = prd.shape[:2]
    if tgt.shape[0] > max_target_points:  # a fixed stride keeps the picture deterministic
        tgt = tgt[:: math.ceil(tgt.shape[0] / max_target_points)]
    tgt = tgt[np.isfinite(tgt).all(axis=1)]

    f = _upscale_factor(W, H, min_width, max_width)
    pw, ph = max(1, round(W * f)), max(1, round(H * f))
    cam = Camera(camera.fx * pw / W, camera.fy * ph / H, camera.cx * pw / W, camera.cy * ph / H, pw, ph)
    radius = 2 if f >= 4 or pw >= 900 else 1

    # input, colour-mapped (its values are already sqrt-spaced depth)
    depth_rgb = _resize(colormap(img), (pw, ph))
    # predicted points by slot over the input in grey
    grey = (np.clip(img, 0, 1) * 150 + 40).astype(np.uint8)
    pred_rgb = _resize(np.repeat(grey[..., None], 3, axis=2), (pw, ph)).copy()
    colors = np.repeat(slot_colors(K), S, axis=0)
    u, v, d = cam.project(prd.reshape(-1, 3))
    pred_mask = splat(pred_rgb, u, v, d, colors, radius)
    in_view = float(np.mean((u >= 0) & (u < pw) & (v >= 0) & (v < ph))) if u.size else 0.0
    # target cloud coloured by depth on black
    tgt_rgb = np.full((ph, pw, 3), 16, dtype=np.uint8)
    tu, tv, td = cam.project(tgt)
    splat(tgt_rgb, tu, tv, td, colormap(np.sqrt(np.clip(td / depth_scale, 0, 1))), radius)
    top_rgb, outside, extent = _top_view(tgt, prd, colors, camera, pw, ph, radius)

    # layout
    fs = max(12, min(20, pw // 32))
    font, small = _font(fs + 2), _font(fs)
    pad, label_h = 8, fs + 8
    title_h = fs + 18
    width = 2 * pw + 3 * pad
    bar_h = 3 * fs + 24
    cell = fs * 3 + 8
    legend_cols = max(1, (width - 2 * pad) // cell)
    legend_h = (math.ceil(K / legend_cols) * (fs + 8) + fs + 12) if K else 0
    row_h = label_h + ph + pad
    height = title_h + 2 * row_h + bar_h + legend_h + pad
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    draw.rectangle([0, 0, width, title_h], fill=(32, 32, 40))
    draw.text((pad, (title_h - fs - 2) // 2), title or "protodepth scene", fill=(255, 255, 255), font=font)

    panels = {
        "input": (depth_rgb, "input depth (network input, colour bar below)"),
        "pred": (pred_rgb, f"predicted: {K} slots x {S} points, {in_view:.0%} in view"
                           + (f", median {np.median(np.linalg.norm(prd.reshape(-1, 3), axis=1)):.0f} m away"
                              if prd.size else "")),
        "target": (tgt_rgb, f"target cloud: {tgt.shape[0]} points, coloured by depth"),
        "top": (top_rgb, f"top view, {extent:.3g} m deep, target grey"
                         + (f"; {outside} pred. beyond: at the edge" if outside else "")),
    }
    boxes = {}
    for i, (key, (arr, cap)) in enumerate(panels.items()):
        r, c = divmod(i, 2)
        x, y = pad + c * (pw + pad), title_h + r * row_h + label_h
        canvas.paste(Image.fromarray(arr), (x, y))
        draw.rectangle([x - 1, y - 1, x + pw, y + ph], outline=(90, 90, 90))
        draw.text((x, y - label_h + 3), cap, fill=(20, 20, 20), font=small)
        boxes[key] = (x, y, pw, ph)

    # colour bar: depth in metres at sqrt-spaced positions, as the input encodes it
    by = title_h + 2 * row_h
    bx, bw = pad, width - 2 * pad
    ramp = colormap(np.linspace(0, 1, bw))[None].repeat(fs, axis=0)
    canvas.paste(Image.fromarray(ramp), (bx, by))
    draw.rectangle([bx - 1, by - 1, bx + bw, by + fs], outline=(60, 60, 60))
    ticks = [m for m in (0, 1, 2, 5, 10, 20, 50, 100, 200, 300, 500, 1000) if m < depth_scale] + [depth_scale]
    last_x = -1e9
    for m in ticks:
        tx = bx + (bw - 1) * math.sqrt(m / depth_scale)
        label = f">={m:g}" if m == depth_scale else f"{m:g}"
        tw = draw.textlength(label, font=small)
        if tx - tw / 2 - last_x < fs and m != depth_scale:
            continue
        draw.line([tx, by + fs, tx, by + fs + 4], fill=(0, 0, 0))
        lx = min(max(bx, tx - tw / 2), width - pad - tw)
        draw.text((lx, by + fs + 5), label, fill=(0, 0, 0), font=small)
        last_x = lx + tw
    draw.text((bx, by + 2 * fs + 9), f"depth (m); sky and everything beyond {depth_scale:g} m share the last colour",
              fill=(60, 60, 60), font=small)

    if K:  # slot legend
        ly = by + bar_h
        draw.text((pad, ly), "slot colours", fill=(20, 20, 20), font=small)
        pal = slot_colors(K)
        for k in range(K):
            r, c = divmod(k, legend_cols)
            x, y = pad + c * cell, ly + fs + 8 + r * (fs + 8)
            draw.rectangle([x, y, x + fs, y + fs], fill=tuple(int(t) for t in pal[k]), outline=(40, 40, 40))
            draw.text((x + fs + 3, y), str(k), fill=(20, 20, 20), font=small)
    canvas.info["panels"] = boxes
    canvas.info["pred_pixels"] = int(pred_mask.sum())
    return canvas


# ------------------------------------------------------------------------------------------------ PLY

def _colors_for(colors: Any, m: int, v: int, name: str) -> np.ndarray:
    """Per-mesh (M, 3), one (3,), or per-vertex (M, V, 3) colours -> (M, V, 3) uint8."""
    if colors is None:
        return np.broadcast_to(slot_colors(max(m, 1))[:m, None, :], (m, v, 3))
    c = np.asarray(colors.detach().cpu().numpy() if hasattr(colors, "detach") else colors)
    if c.dtype.kind == "f":  # floats in [0, 1]
        c = np.clip(np.round(c * 255), 0, 255)
    c = c.astype(np.uint8)
    if c.shape == (3,):
        return np.broadcast_to(c, (m, v, 3))
    if c.shape == (m, 3):
        return np.broadcast_to(c[:, None, :], (m, v, 3))
    if c.shape == (m, v, 3) or (m == 1 and c.shape == (v, 3)):
        return c.reshape(m, v, 3)
    raise ValueError(f"{name}: expected (3,), ({m}, 3) per mesh or ({m}, {v}, 3) per vertex, got {c.shape}")


def _write_ply(path: Path, verts: np.ndarray, colors: np.ndarray, faces: np.ndarray | None, binary: bool) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n, nf = verts.shape[0], 0 if faces is None else faces.shape[0]
    header = ["ply", f"format {'binary_little_endian' if binary else 'ascii'} 1.0", "comment written by protodepth",
              f"element vertex {n}", "property float x", "property float y", "property float z",
              "property uchar red", "property uchar green", "property uchar blue"]
    if faces is not None:
        header += [f"element face {nf}", "property list uchar int vertex_indices"]
    header.append("end_header")
    tmp = path.with_name(path.name + ".part")  # a reader never sees half a file
    with open(tmp, "wb") as f:
        f.write(("\n".join(header) + "\n").encode("ascii"))
        if binary:
            vrec = np.empty(n, dtype=[("p", "<f4", 3), ("c", "u1", 3)])
            vrec["p"], vrec["c"] = verts, colors
            f.write(vrec.tobytes())
            if faces is not None:
                frec = np.empty(nf, dtype=[("n", "u1"), ("i", "<i4", 3)])
                frec["n"], frec["i"] = 3, faces
                f.write(frec.tobytes())
        else:
            lines = [f"{x:.6g} {y:.6g} {z:.6g} {r} {g} {b}" for (x, y, z), (r, g, b) in zip(verts.tolist(), colors.tolist())]
            if faces is not None:
                lines += [f"3 {a} {b} {c}" for a, b, c in faces.tolist()]
            f.write(("\n".join(lines) + ("\n" if lines else "")).encode("ascii"))
    os.replace(tmp, path)
    return path


def write_ply(path: str | os.PathLike, verts: Any, faces: Any, colors: Any = None, binary: bool = True) -> Path:
    """Write M meshes sharing one topology as one PLY with vertex colours.

    verts (M, V, 3) or (V, 3) float; faces (F, 3) int indices into V (shared by every mesh; offset per mesh
    here); colors: None (slot palette, one colour per mesh), (3,) for all, (M, 3) per mesh, or (M, V, 3) per
    vertex, uint8 or floats in [0, 1]. Binary little-endian by default (a level-4 scene of 32 slots is
    ~80 k vertices: 1.3 MB binary, ~3x that in ASCII). Returns the path.
    """
    v = _np(verts, "verts")
    if v.ndim == 2:
        v = v[None]
    _check_shape("verts", v, (3,), 3, "(M, V, 3) or (V, 3)")
    fc = _np(faces, "faces", np.int64)
    _check_shape("faces", fc, (2,), 3, "(F, 3)")
    M, V, _ = v.shape
    if fc.size and (fc.min() < 0 or fc.max() >= V):
        raise ValueError(f"faces: indices must lie in [0, {V}), got [{fc.min()}, {fc.max()}]")
    if not np.isfinite(v).all():
        raise ValueError("verts: contains NaN or inf")
    col = _colors_for(colors, M, V, "colors")
    all_faces = (fc[None] + (np.arange(M) * V)[:, None, None]).reshape(-1, 3)
    return _write_ply(Path(path), v.reshape(-1, 3), col.reshape(-1, 3), all_faces, binary)


def write_point_ply(path: str | os.PathLike, points: Any, colors: Any = None, binary: bool = True) -> Path:
    """Write a coloured point cloud: points (N, 3), colors (N, 3) or (3,) (uint8 or floats in [0, 1]; None:
    grey). Non-finite points are dropped. Returns the path."""
    p = _np(points, "points").reshape(-1, 3) if np.size(points) else np.zeros((0, 3), np.float32)
    c = TARGET_GREY if colors is None else colors
    col = _colors_for(c, 1, p.shape[0], "colors")[0]
    ok = np.isfinite(p).all(axis=1)
    return _write_ply(Path(path), p[ok], col[ok], None, binary)


def read_ply(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a PLY written by `write_ply` / `write_point_ply` (x y z red green blue, optional triangle list):
    {"verts": (N, 3) float32, "colors": (N, 3) uint8, "faces": (F, 3) int64}. For checks and round trips."""
    path = Path(path)
    data = path.read_bytes()
    end = data.find(b"end_header\n")
    if not data.startswith(b"ply") or end < 0:
        raise ValueError(f"{path}: not a PLY file")
    header = data[:end].decode("ascii").splitlines()
    body = data[end + len(b"end_header\n"):]
    binary = any(l.startswith("format binary_little_endian") for l in header)
    n = next((int(l.split()[2]) for l in header if l.startswith("element vertex")), 0)
    nf = next((int(l.split()[2]) for l in header if l.startswith("element face")), 0)
    if binary:
        vrec = np.frombuffer(body, dtype=[("p", "<f4", 3), ("c", "u1", 3)], count=n)
        frec = np.frombuffer(body, dtype=[("n", "u1"), ("i", "<i4", 3)], count=nf, offset=vrec.nbytes)
        return {"verts": vrec["p"].copy(), "colors": vrec["c"].copy(), "faces": frec["i"].astype(np.int64)}
    rows = body.decode("ascii").split("\n")
    vv = np.array([r.split() for r in rows[:n]], dtype=np.float64).reshape(n, 6)
    ff = np.array([r.split()[1:4] for r in rows[n:n + nf]], dtype=np.int64).reshape(nf, 3)
    return {"verts": vv[:, :3].astype(np.float32), "colors": vv[:, 3:].astype(np.uint8), "faces": ff}


def prototype_grid(prototypes: Any, spacing: float | None = None) -> np.ndarray:
    """prototypes (P, V, 3) -> (P, V, 3) laid out side by side on a grid in the x-y plane (centred each), so
    all P can be seen at once in one file. spacing: grid step (default 1.5 x the largest extent)."""
    pr = _np(prototypes, "prototypes")
    _check_shape("prototypes", pr, (3,), 3, "(P, V, 3)")
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
    img = _np(image, "batch['image']")
    _check_shape("batch['image']", img, (4,), None, "(B, 3, H, W)")
    cl = _np(cloud, "batch['cloud']")
    _check_shape("batch['cloud']", cl, (3,), 3, "(B, N, 3)")
    ln = _np(lengths, "batch['lengths']", np.int64)
    slot_verts = _np(scene.slot_verts, "scene.slot_verts")
    _check_shape("scene.slot_verts", slot_verts, (4,), 3, "(B, K, V, 3)")
    protos = _np(scene.prototypes, "scene.prototypes")
    pp = _np(pred_points, "pred_points")
    _check_shape("pred_points", pp, (4,), 3, "(B, K, S, 3)")
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
    tgt = _np(target, "target").reshape(-1, 3)
    prd = _np(pred, "pred")
    _check_shape("pred", prd, (3,), 3, "(K, S, 3)")
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
    points in slot colours), and with `prototypes` (P, V, 3) `{prefix}/prototypes` (their vertices on a grid,
    one colour each). batch: `collate_depth` output; pred_points (B, K, S, 3). wandb is imported here only."""
    import wandb

    _, cloud, lengths, paths = _batch_items(batch)
    cl = _np(cloud, "batch['cloud']")
    ln = _np(lengths, "batch['lengths']", np.int64)
    pp = _np(pred_points, "pred_points")
    _check_shape("pred_points", pp, (4,), 3, "(B, K, S, 3)")
    payload: dict[str, Any] = {}
    for i, p in enumerate(list(snapshot_paths.get("pictures", []))[:max_images]):
        cap = Path(paths[i]).name if i < len(paths) else f"image {i}"
        payload[f"{prefix}/picture_{i}"] = wandb.Image(str(p), caption=cap)
    for i in range(min(pp.shape[0], max_images)):
        payload[f"{prefix}/cloud_{i}"] = wandb.Object3D(cloud_array(cl[i, : int(ln[i])], pp[i]))
    if prototypes is not None:
        grid = prototype_grid(prototypes)
        P, V = grid.shape[:2]
        rgb = np.repeat(slot_colors(P), V, axis=0).astype(np.float32)
        payload[f"{prefix}/prototypes"] = wandb.Object3D(np.concatenate([grid.reshape(-1, 3), rgb], axis=1))
    return payload
