"""The picture of one scene, drawn with matplotlib (Agg canvas, no display), and what it needs: the camera of
the network input, the slot colours and the depth colour map.

- `slot_colors(K)` (K, 3) uint8: a fixed palette, distinct up to K = 64.
- `colormap(values)` matplotlib's "turbo" as uint8 RGB, values in [0, 1].
- `Camera`: the pinhole camera of the network input; `Camera.for_input(data_cfg, native_hw)`.
- `scene_picture(image, target, pred, camera, title, depth_scale)` -> PIL image with four panels: input depth
  (colour bar in metres), predicted points coloured by slot over the input in grey, the target cloud coloured
  by depth, and a top view of target and predictions; slot colour strip.

Camera convention (as the data layer): x right, y up, looking down -Z; a point (X, Y, Z) with d = -Z > 0 lands
at column u = fx X / d + cx, row v = cy - fy Y / d (pixel i spans [i, i + 1)).
"""
from __future__ import annotations

import colorsys
import functools
import math
import os
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

SYNTHIA_NATIVE_HW = (1080, 1920)  # frame size when a frame's own can't be read (its PNG moved or was cached)

TARGET_GREY = np.array([170, 170, 170], dtype=np.uint8)  # target points next to slot-coloured predictions

_DPI = 100
_PT = 72 / _DPI  # matplotlib sizes are in points; the layout below is in pixels
_DARK = (16 / 255, 16 / 255, 16 / 255)
# Matplotlib's text and font caches are not thread-safe; inference draws from writer threads. The lock covers
# drawing only: PNG compression (PIL, releases the GIL) runs outside it.
_DRAW_LOCK = threading.Lock()


# ------------------------------------------------------------------------------------------------ helpers

def as_array(x: Any, name: str, dtype=np.float32) -> np.ndarray:
    """Tensor / array / list -> numpy array (CPU, detached); names the argument on failure."""
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy() if x.dtype.is_floating_point else x.detach().cpu().numpy()
    try:
        return np.asarray(x, dtype=dtype)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name}: cannot convert {type(x).__name__} to a numeric array ({e})") from None


def check_shape(name: str, a: np.ndarray, ndims: tuple[int, ...], last: int | None, doc: str) -> None:
    if a.ndim not in ndims or (last is not None and a.shape[-1] != last):
        raise ValueError(f"{name}: expected shape {doc}, got {tuple(a.shape)}")


# ------------------------------------------------------------------------------------------------ colours

@functools.lru_cache(maxsize=1)
def _palette64() -> np.ndarray:
    """64 colours picked greedily (farthest point first) from saturated, bright HSV candidates under the
    "redmean" RGB distance. Kept rather than a matplotlib palette: its qualitative maps stop at 20 distinct
    colours (tab20b / tab20c hold pairs 16 RGB units apart), and K = 32 slots is the default. Greys and dark
    colours are not candidates: they are the pictures' backgrounds and the target cloud's colour."""
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


def colormap(values: Any) -> np.ndarray:
    """values (...) in [0, 1] (clipped; NaN -> 0) -> (..., 3) uint8 colours of matplotlib's "turbo" (dark blue
    at 0, dark red at 1), the map of the depth panels."""
    from matplotlib import colormaps

    v = np.clip(np.nan_to_num(np.asarray(values, dtype=np.float64), nan=0.0), 0.0, 1.0)
    return np.asarray(colormaps["turbo"](v, bytes=True), dtype=np.uint8)[..., :3]  # (a scalar gives a tuple)


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
            sx = sy = min(h_in / h0, w_in / w0)
        else:
            sx, sy = w_in / w0, h_in / h0
        return cls(focal * sx, focal * sy, w_in / 2.0, h_in / 2.0, w_in, h_in)

    def project(self, points: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """points (N, 3) camera frame -> (u (N,), v (N,), depth d = -Z (N,)), pixel coordinates as floats.
        Points with d <= 0 (behind the camera) get u = v = NaN."""
        p = as_array(points, "points", np.float64).reshape(-1, 3)
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


# ------------------------------------------------------------------------------------------------ panels

def _zsorted(x: np.ndarray, y: np.ndarray, depth: np.ndarray, colors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, 2) offsets and (N, 3) colours in [0, 1], farthest first, so nearer markers cover farther ones (what
    a z-buffer would show)."""
    order = np.argsort(-depth, kind="stable")
    return np.stack([x[order], y[order]], axis=1), colors[order] / 255.0


def _set_points(coll, x: np.ndarray, y: np.ndarray, depth: np.ndarray, colors: np.ndarray) -> None:
    xy, c = _zsorted(x, y, depth, colors)
    coll.set_offsets(xy)
    coll.set_facecolors(c)


def _in_image(u: np.ndarray, v: np.ndarray, W: int, H: int) -> np.ndarray:
    return np.isfinite(u) & np.isfinite(v) & (u >= 0) & (u < W) & (v >= 0) & (v < H)


def _pin_to_box(x: np.ndarray, y: np.ndarray, xr: float, y_lo: float, y_hi: float,
                margin: float) -> tuple[np.ndarray, ...]:
    """Points outside the box [-xr, xr] x [y_lo, y_hi] (top view, metres; the camera at 0, 0 inside it) moved
    along the ray from the camera onto the box shrunk by `margin`. Returns (x, y, outside mask)."""
    out = (np.abs(x) > xr) | (y < y_lo) | (y > y_hi)
    xr, y_lo, y_hi = xr - margin, y_lo + margin, y_hi - margin
    with np.errstate(divide="ignore", invalid="ignore"):
        tx = np.where(x != 0, xr / np.abs(x), np.inf)
        ty = np.where(y > 0, y_hi / y, np.where(y < 0, y_lo / y, np.inf))
    t = np.where(out, np.minimum(np.minimum(tx, ty), 1.0), 1.0)
    return x * t, y * t, out


def _colour_bar(fig, cax, depth_scale: float, width_px: int) -> None:
    """Horizontal turbo bar labelled in metres at sqrt-spaced positions, as the input encodes depth."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    bar = fig.colorbar(ScalarMappable(Normalize(0, 1), "turbo"), cax=cax, orientation="horizontal")
    ticks, labels = [], []
    metres = [m for m in (0, 1, 2, 5, 10, 20, 50, 100, 200, 300, 500, 1000) if m < depth_scale]
    for m in metres + [depth_scale]:
        pos = math.sqrt(m / depth_scale)
        if ticks and (pos - ticks[-1]) * width_px < 34:  # labels too close: the later (farther) one wins
            if m != depth_scale:
                continue
            ticks.pop(), labels.pop()
        ticks.append(pos), labels.append(f">={m:g}" if m == depth_scale else f"{m:g}")
    bar.set_ticks(ticks, labels=labels)
    bar.ax.tick_params(labelsize=8)
    texts = bar.ax.get_xticklabels()  # the end labels stay inside the picture
    texts[0].set_horizontalalignment("left")
    texts[-1].set_horizontalalignment("right")
    bar.set_label(f"depth (m); sky and everything beyond {depth_scale:g} m share the last colour", fontsize=8)


def _slot_strip(ax, K: int, width_px: int) -> None:
    """The slot colours as a strip, slot numbers below (every n-th when crowded)."""
    ax.imshow(slot_colors(K)[None], aspect="auto", interpolation="nearest", extent=(-0.5, K - 0.5, 0.5, -0.5))
    step = max(1, math.ceil(K * 22 / width_px))
    ax.set_xticks(range(0, K, step))
    ax.set_yticks([])
    ax.tick_params(labelsize=8)
    ax.set_xlabel("slot colours", fontsize=8)


def _layout(pw: int, ph: int, K: int) -> dict:
    """Pixel boxes (x, y, w, h), top-left origin, of the four panels, the colour bar and the slot strip; the
    title bar's height and the picture's size."""
    pad, title_h, label_h, strip_h, block_h = 12, 34, 22, 14, 62
    row_h = label_h + ph + pad
    width = 2 * pw + 3 * pad
    y_bar = title_h + 2 * row_h
    y_strip = y_bar + block_h
    height = y_strip + (block_h if K else 0) + 4
    panels = {}
    for i, key in enumerate(("input", "pred", "target", "top")):
        r, c = divmod(i, 2)
        panels[key] = (pad + c * (pw + pad), title_h + r * row_h + label_h, pw, ph)
    return {"size": (width, height), "title_h": title_h, "panels": panels,
            "bar": (pad, y_bar, width - 2 * pad, strip_h), "strip": (pad, y_strip, width - 2 * pad, strip_h)}


def _upscale_factor(w: int, min_width: int, max_width: int) -> float:
    if w < min_width:
        return float(math.ceil(min_width / w))  # integer factor: crisp nearest-neighbour pixels
    if w > max_width:
        return max_width / w
    return 1.0


class _Template:
    """A figure laid out once for one picture geometry (input W x H, panel size, K, depth scale); `render`
    swaps in one scene's data and draws. Building the axes, ticks and colour bar costs most of a matplotlib
    figure's time, and every picture of a run has the same geometry, so it is done once."""

    def __init__(self, W: int, H: int, pw: int, ph: int, K: int, depth_scale: float):
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.patches import Rectangle

        self.W, self.H, self.pw, self.ph = W, H, pw, ph
        lay = self.layout = _layout(pw, ph, K)
        width, height = lay["size"]
        self.fig = fig = Figure(figsize=(width / _DPI, height / _DPI), dpi=_DPI, facecolor="white")
        self.canvas = FigureCanvasAgg(fig)

        def axes(box, facecolor="white"):
            x, y, w, h = box
            ax = fig.add_axes((x / width, 1 - (y + h) / height, w / width, h / height), facecolor=facecolor)
            return ax

        fig.add_artist(Rectangle((0, 1 - lay["title_h"] / height), 1, lay["title_h"] / height,
                                 transform=fig.transFigure, facecolor=(0.125, 0.125, 0.16), edgecolor="none"))
        self.title = fig.text(12 / width, 1 - lay["title_h"] / 2 / height, "", color="white", fontsize=11,
                              va="center")
        self.captions = {k: fig.text(x / width, 1 - (y - 5) / height, "", fontsize=9, va="bottom",
                                     color=(0.08, 0.08, 0.08)) for k, (x, y, _, _) in lay["panels"].items()}
        interp = "nearest" if pw >= W else "antialiased"  # enlarged pixels stay sharp
        blank = np.zeros((H, W), np.float32)
        px = 5.0 if pw >= 4 * W or pw >= 900 else 3.0  # marker width in picture pixels: bigger on big panels
        size = (px * _PT) ** 2  # matplotlib's marker size: points squared

        def points(ax, s=size):
            return ax.scatter(np.zeros(0), np.zeros(0), s=s, marker="s", linewidths=0, antialiased=False)

        self.ax = {k: axes(b, "white" if k == "input" else _DARK) for k, b in lay["panels"].items()}
        self.input = self.ax["input"].imshow(blank, cmap="turbo", vmin=0, vmax=1, interpolation=interp,
                                             extent=(0, W, H, 0))
        self.grey = self.ax["pred"].imshow(blank, cmap="gray", vmin=-40 / 150, vmax=215 / 150,
                                           interpolation=interp, extent=(0, W, H, 0))
        self.pred, self.target = points(self.ax["pred"]), points(self.ax["target"])
        top = self.ax["top"]
        self.fov = [top.plot([], [], color=(0.43, 0.43, 0.43), linewidth=1)[0] for _ in range(2)]
        self.top_target = points(top, ((px - 1) * _PT) ** 2)
        self.top_pred, self.top_pinned = points(top), points(top, ((px + 2) * _PT) ** 2)
        for key, ax in self.ax.items():
            ax.set_xticks([])
            ax.set_yticks([])
            if key != "top":
                ax.set_xlim(0, W)
                ax.set_ylim(H, 0)
        _colour_bar(fig, axes(lay["bar"]), depth_scale, lay["bar"][2])
        if K:
            _slot_strip(axes(lay["strip"]), K, lay["strip"][2])
        # what changes from scene to scene, in drawing order; the rest (colour bar, slot strip, panel
        # backgrounds: most of the text) is drawn once and restored from a saved background ("blitting")
        self.dynamic = [self.title, *self.captions.values(), self.input, self.grey, self.pred, self.target,
                        *self.fov, self.top_target, self.top_pred, self.top_pinned,
                        *(sp for ax in self.ax.values() for sp in ax.spines.values())]
        for artist in self.dynamic:
            artist.set_animated(True)
        self.background = None

    def _top_view(self, target: np.ndarray, pred: np.ndarray, pred_colors: np.ndarray,
                  camera: Camera) -> tuple[int, float]:
        """Bird's-eye panel: x across, distance in front of the camera (-Z) upwards, equal scales; target grey,
        predictions in their colours, the field of view in grey lines. The extent is the target's (98th
        percentile of distance, so one far outlier does not shrink the scene). Returns (number of predicted
        points pinned to the edge, extent in metres)."""
        ref = target if target.shape[0] else pred
        if ref.shape[0] == 0:
            return 0, 0.0
        dmax = max(float(np.percentile(-ref[:, 2], 98)) * 1.1, 1e-3)
        half_fov = camera.width / 2 / camera.fx  # tan of the half horizontal field of view
        xr = max(float(np.percentile(np.abs(ref[:, 0]), 98)) * 1.1, dmax * half_fov, 1e-3)
        scale = min(self.pw / (2 * xr), self.ph / dmax)  # pixels per metre, equal on both axes
        x_half, y_lo = self.pw / scale / 2, -6 / scale  # the camera sits 6 px above the bottom edge
        y_hi = y_lo + self.ph / scale
        self.ax["top"].set_xlim(-x_half, x_half)
        self.ax["top"].set_ylim(y_lo, y_hi)
        for sgn, line in zip((-1, 1), self.fov):
            line.set_data([0, sgn * dmax * half_fov], [0, dmax])
        # seen from above, the highest point (largest y) is the one in front
        _set_points(self.top_target, target[:, 0], -target[:, 2], -target[:, 1],
                    np.broadcast_to(TARGET_GREY, target.shape))
        # an untrained model puts slots hundreds of metres away: they are pinned to the border in their
        # direction, so the panel still says where every slot went
        x, y, out = _pin_to_box(pred[:, 0], -pred[:, 2], x_half, y_lo, y_hi, 3 / scale)  # marker inside
        _set_points(self.top_pred, x[~out], y[~out], -pred[~out, 1], pred_colors[~out])
        _set_points(self.top_pinned, x[out], y[out], np.zeros(int(out.sum())), pred_colors[out])
        return int(out.sum()), dmax

    def render(self, img: np.ndarray, tgt: np.ndarray, prd: np.ndarray, camera: Camera,
               title: str, depth_scale: float) -> tuple[np.ndarray, dict]:
        """One scene -> ((height, width, 3) uint8 picture, info); shapes as `scene_picture`'s."""
        W, H = self.W, self.H
        K, S = prd.shape[:2]
        self.title.set_text(title or "protodepth scene")
        self.input.set_data(img)
        self.grey.set_data(img)
        colors = np.repeat(slot_colors(K), S, axis=0)
        flat = prd.reshape(-1, 3)
        u, v, d = camera.project(flat)
        seen = _in_image(u, v, W, H)
        _set_points(self.pred, u[seen], v[seen], d[seen], colors[seen])
        far = f", median {np.median(np.linalg.norm(flat, axis=1)):.0f} m away" if flat.size else ""
        self.captions["pred"].set_text(f"predicted: {K} slots x {S} points, "
                                       f"{seen.mean() if seen.size else 0:.0%} in view{far}")
        tu, tv, td = camera.project(tgt)
        ok = _in_image(tu, tv, W, H)
        _set_points(self.target, tu[ok], tv[ok], td[ok], colormap(np.sqrt(np.clip(td[ok] / depth_scale, 0, 1))))
        outside, extent = self._top_view(tgt, flat, colors, camera)
        self.captions["input"].set_text("input depth (network input, colour bar below)")
        self.captions["target"].set_text(f"target cloud: {tgt.shape[0]} points, coloured by depth")
        self.captions["top"].set_text(f"top view, {extent:.3g} m deep, target grey"
                                      + (f"; {outside} pred. beyond: at the edge" if outside else ""))
        if self.background is None:
            self.canvas.draw()  # everything but the animated artists
            self.background = self.canvas.copy_from_bbox(self.fig.bbox)
        self.canvas.restore_region(self.background)
        for artist in self.dynamic:
            self.fig.draw_artist(artist)
        rgb = np.asarray(self.canvas.buffer_rgba())[..., :3].copy()
        return rgb, {"panels": dict(self.layout["panels"]), "pred_in_view": int(seen.sum())}


@functools.lru_cache(maxsize=4)
def _template(W: int, H: int, pw: int, ph: int, K: int, depth_scale: float) -> _Template:
    return _Template(W, H, pw, ph, K, depth_scale)


def _checked_inputs(image, target, pred, camera, depth_scale, max_target_points):
    """Validated numpy views: image (H, W), target (N, 3) finite and thinned, pred (K, S, 3)."""
    img = as_array(image, "image")
    if img.ndim == 3:
        if img.shape[0] not in (1, 3):
            raise ValueError(f"image: expected shape (3, H, W) or (H, W), got {tuple(img.shape)}")
        img = img[0]
    check_shape("image", img, (2,), None, "(3, H, W) or (H, W)")
    tgt = as_array(target, "target")
    check_shape("target", tgt, (2,), 3, "(N, 3)")
    prd = as_array(pred, "pred")
    check_shape("pred", prd, (3,), 3, "(K, S, 3)")
    if not isinstance(camera, Camera):
        raise ValueError(f"camera: expected a protodepth.viz.Camera, got {type(camera).__name__}")
    if not depth_scale > 0:
        raise ValueError(f"depth_scale: expected metres > 0, got {depth_scale}")
    H, W = img.shape
    if (camera.height, camera.width) != (H, W):
        raise ValueError(f"camera: is for {camera.width}x{camera.height} images, the image is {W}x{H}")
    if tgt.shape[0] > max_target_points:  # a fixed stride keeps the picture deterministic
        tgt = tgt[:: math.ceil(tgt.shape[0] / max_target_points)]
    return img, tgt[np.isfinite(tgt).all(axis=1)], prd


def scene_picture(image: Any, target: Any, pred: Any, camera: Camera, title: str = "",
                  depth_scale: float = 300.0, min_width: int = 480, max_width: int = 640,
                  max_target_points: int = 50_000) -> Image.Image:
    """One readable picture of one scene.

    image:  (3, H, W) or (H, W) network input in [0, 1] = sqrt(clip(depth / depth_scale, 0, 1)).
    target: (N, 3) target cloud, camera frame, metres (padding already removed).
    pred:   (K, S, 3) predicted points, S per slot, camera frame.
    camera: the camera of `image` (H x W pixels), e.g. `Camera.for_input(data_cfg, native_hw)`.
    title:  text of the title bar, e.g. "step 120 | loss 0.432 | 000003.png".

    Four panels in a 2 x 2 grid, each scaled to at least `min_width` px wide (at most `max_width`): the input
    depth through matplotlib's turbo | the input in grey with the predicted points projected, coloured by
    slot; the target cloud projected and coloured by depth | a top view (x across, distance up) of target
    (grey) and predictions (slot colours), which shows depth errors the projections hide. Nearer points are
    drawn over farther ones. Below: a colour bar in metres (sqrt-spaced like the input, so the near range
    gets more colours) and the slot colours.
    Returns an RGB `PIL.Image`; `img.info["panels"]` holds each panel's (x, y, w, h) pixel box in the picture
    (a panel's data coordinates are input pixels for the three image panels) and `img.info["pred_in_view"]`
    the number of predicted points that project inside the image.
    """
    img, tgt, prd = _checked_inputs(image, target, pred, camera, depth_scale, max_target_points)
    H, W = img.shape
    f = _upscale_factor(W, min_width, max_width)
    pw, ph = max(1, round(W * f)), max(1, round(H * f))
    with _DRAW_LOCK:  # the templates are shared
        tpl = _template(W, H, pw, ph, prd.shape[0], float(depth_scale))
        rgb, info = tpl.render(img, tgt, prd, camera, title, float(depth_scale))
    pic = Image.fromarray(rgb)
    pic.info.update(info)
    return pic
