"""SYNTHIA-SF depth frames: the PNG encoding, back-projection, and the per-frame processing shared by the
PNG and the preprocessed (cache) data paths.

Encoding: an 8-bit RGB PNG where depth in metres = (R + 256 G + 65536 B) / (2^24 - 1) * 1000, so one code
step is 1000 / (2^24 - 1) ~= 5.96e-5 m and the largest code (white) is exactly 1000 m, i.e. sky.

Camera: pinhole, focal f pixels for x and y, principal point (W/2, H/2), looking down -Z with x right, y up.
A pixel at column u, row v with depth d becomes X = (u - cx) / f * d, Y = -(v - cy) / f * d, Z = -d.

`process_depth` turns one depth map into what a sample needs: the network input (1, H, W) and the valid
points sorted by Z bin (with per-bin counts). Both data paths call it, so they agree bit for bit.
"""
from __future__ import annotations

import os
import struct
import zlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from protodepth.data.config import DataConfig
from protodepth.data.draw import DrawSeed, draw_indices  # noqa: F401  (draw_indices is part of this module's API)
from protodepth.errors import BadFrameError, DataSetupError

CODE_MAX = (1 << 24) - 1  # 16 777 215: the code of 1000 m
ENCODING_MAX_DEPTH = 1000.0  # metres at CODE_MAX
ENCODING_STEP = ENCODING_MAX_DEPTH / CODE_MAX  # metres per code step


class DataNotFoundError(DataSetupError, FileNotFoundError):
    """A dataset folder or file is missing; also a FileNotFoundError, so callers that catch that keep working."""


class FrameNotFoundError(BadFrameError, FileNotFoundError):
    """A listed depth frame is gone (deleted after the folder was listed); skipped like any bad frame."""


# ------------------------------------------------------------------------------------------------ encoding

def depth_to_codes(depth: np.ndarray) -> np.ndarray:
    """Depth in metres (H, W) -> integer codes (H, W) uint32, rounded to the nearest step, clipped to
    [0, CODE_MAX]: depths >= 1000 m (and +inf) become sky (CODE_MAX)."""
    d = np.asarray(depth, dtype=np.float64)
    if np.isnan(d).any():
        raise ValueError("depth: contains NaN; use +inf (or >= 1000) for sky")
    codes = np.rint(np.clip(d, 0.0, ENCODING_MAX_DEPTH) * (CODE_MAX / ENCODING_MAX_DEPTH))
    return codes.astype(np.uint32)


def codes_to_depth(codes: np.ndarray) -> np.ndarray:
    """Integer codes (H, W) -> depth in metres (H, W) float64. Multiplying before dividing keeps the sky
    code exactly 1000.0, so `depth >= max_depth` finds sky without a tolerance."""
    return codes.astype(np.float64) * ENCODING_MAX_DEPTH / CODE_MAX


def encode_depth_rgb(depth: np.ndarray) -> np.ndarray:
    """Depth in metres (H, W) -> SYNTHIA RGB pixels (H, W, 3) uint8 (R low byte, B high byte)."""
    codes = depth_to_codes(depth)
    return np.stack([codes & 0xFF, (codes >> 8) & 0xFF, (codes >> 16) & 0xFF], axis=-1).astype(np.uint8)


def decode_depth_rgb(rgb: np.ndarray) -> np.ndarray:
    """SYNTHIA RGB pixels (H, W, 3) uint8 -> depth in metres (H, W) float64."""
    c = rgb.astype(np.uint32)
    return codes_to_depth(c[..., 0] | (c[..., 1] << 8) | (c[..., 2] << 16))


def write_depth_png(path: str | os.PathLike, depth: np.ndarray, compress_level: int = 1) -> None:
    """Write depth in metres (H, W) as a SYNTHIA depth PNG (8-bit RGB)."""
    Image.fromarray(encode_depth_rgb(depth), mode="RGB").save(path, format="PNG", compress_level=compress_level)


def _png_header_size(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) as written in a PNG's IHDR chunk (bytes 16..24), without Pillow; (0, 0) if unreadable."""
    with open(path, "rb") as f:
        head = f.read(24)
    if len(head) < 24 or not head.startswith(b"\x89PNG"):
        return 0, 0
    return struct.unpack(">II", head[16:24])


def check_png_header(path: str | os.PathLike) -> tuple[int, int]:
    """Open only the header of a depth PNG; returns (H, W). Raises `BadFrameError` naming the file when it
    is not a PNG or not 8-bit RGB (grayscale, 16-bit, palette, RGBA...)."""
    try:
        with Image.open(path) as im:
            fmt, mode, (w, h) = im.format, im.mode, im.size
            # Pillow opens a 16-bit-per-channel RGB PNG as mode "RGB", dropping the low bytes; its raw mode
            # ("RGB;16B") is the only sign of it
            rawmode = str(im.tile[0][3]) if im.tile else ""
    except FileNotFoundError:
        raise FrameNotFoundError(f"depth frame {path}: file not found") from None
    except Image.DecompressionBombError:
        # Pillow refuses a header claiming more than 2x Image.MAX_IMAGE_PIXELS pixels before decoding anything
        w, h = _png_header_size(path)
        raise BadFrameError(f"depth frame {path}: its header claims {w}x{h} pixels, more than Pillow's safety limit "
                            f"of {2 * Image.MAX_IMAGE_PIXELS} (a corrupt or hostile file); SYNTHIA depth frames are "
                            "1920x1080") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise BadFrameError(f"depth frame {path}: not a readable PNG image ({e.__class__.__name__}); "
                            "SYNTHIA depth frames are 8-bit RGB PNGs") from None
    if fmt != "PNG":
        raise BadFrameError(f"depth frame {path}: is a {fmt} image, not a PNG; "
                            "SYNTHIA depth frames are 8-bit RGB PNGs")
    if mode != "RGB":
        kind = {"L": "8-bit grayscale", "LA": "grayscale with alpha", "I": "16/32-bit grayscale",
                "I;16": "16-bit grayscale", "I;16B": "16-bit grayscale", "RGBA": "RGBA (with alpha)",
                "P": "palette", "1": "1-bit", "F": "float"}.get(mode, f"mode {mode}")
        raise BadFrameError(f"depth frame {path}: is a {kind} image; SYNTHIA depth frames are 8-bit RGB "
                            "(depth = (R + 256 G + 65536 B) / (2^24 - 1) * 1000 m)")
    if "16" in rawmode:
        raise BadFrameError(f"depth frame {path}: is a 16-bit-per-channel RGB image; SYNTHIA depth frames are "
                            "8-bit RGB (depth = (R + 256 G + 65536 B) / (2^24 - 1) * 1000 m)")
    return h, w


def read_depth_png(path: str | os.PathLike) -> np.ndarray:
    """Read a SYNTHIA depth PNG -> depth in metres (H, W) float64. Raises `BadFrameError` naming the file for
    a truncated or non-PNG file or a pixel format other than 8-bit RGB; `FrameNotFoundError` (a BadFrameError)
    if missing."""
    check_png_header(path)
    try:
        with Image.open(path) as im:
            im.load()
            rgb = np.asarray(im)
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise BadFrameError(f"depth frame {path}: PNG data is truncated or corrupt ({e}); "
                            "re-download or re-export the file, or set data.skip_bad_frames=true") from None
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise BadFrameError(f"depth frame {path}: decoded to {rgb.dtype} {rgb.shape}, expected 8-bit RGB (H, W, 3)")
    return decode_depth_rgb(rgb)


# -------------------------------------------------------------------------------------- back-projection

def backproject(depth: np.ndarray, focal: float, max_depth: float = 1000.0) -> tuple[np.ndarray, np.ndarray]:
    """Back-project a depth map (H, W) metres with the SYNTHIA camera (principal point (W/2, H/2)).

    Returns `points` (N, 3) float64 in the camera frame (x right, y up, looking down -Z) for the N pixels with
    depth < max_depth, in raster order (row by row), and their flat pixel indices (N,) int64."""
    h, w = depth.shape
    flat = depth.reshape(-1)
    idx = np.flatnonzero(flat < max_depth)
    d = flat[idx]
    v, u = np.divmod(idx, w)
    pts = np.empty((idx.size, 3), dtype=np.float64)
    pts[:, 0] = (u - w / 2.0) / focal * d
    pts[:, 1] = -(v - h / 2.0) / focal * d
    pts[:, 2] = -d
    return pts, idx


def z_bins(z: np.ndarray, num_bins: int) -> np.ndarray:
    """Bin index (N,) int64 of each Z value (N,) among `num_bins` equal-width bins spanning [min z, max z]."""
    if z.size == 0:
        return np.zeros(0, dtype=np.int64)
    lo, hi = float(z.min()), float(z.max())
    if hi <= lo:
        return np.zeros(z.shape, dtype=np.int64)
    b = np.floor((z - lo) * (num_bins / (hi - lo))).astype(np.int64)
    return np.minimum(b, num_bins - 1)  # the maximum lands exactly on the upper edge: it belongs to the last bin


def frame_key(rel_path: str) -> int:
    """Stable 32-bit id of a frame from its path relative to the dataset root (seeds its random draws)."""
    return zlib.crc32(rel_path.replace(os.sep, "/").encode())


@dataclass
class ProcessedFrame:
    image: np.ndarray  # (1, H, W) float32 network input at its final size
    raster_points: np.ndarray  # (N0, 3) float64 every valid point, raster order
    order: np.ndarray  # (N,) int64 indices into raster_points: sorted by Z bin, raster order inside a bin
    counts: np.ndarray  # (num_bins,) int64 points per bin; sum = N

    @property
    def points(self) -> np.ndarray:
        """(N, 3) float32 candidate points sorted by Z bin (what the cache stores)."""
        return self.raster_points[self.order].astype(np.float32)

    def take(self, idx: np.ndarray) -> np.ndarray:
        """(M, 3) float32 rows `idx` (M,) of `points`, without building the whole sorted array."""
        return self.raster_points[self.order[idx]].astype(np.float32)


def network_input(depth: np.ndarray, cfg: DataConfig) -> np.ndarray:
    """Depth (H0, W0) metres -> network input (1, H, W) float32 = sqrt(clip(d / depth_scale, 0, 1)) resized
    bilinearly (antialiased) to cfg.height x cfg.width; with keep_aspect the frame is fitted inside without
    distortion, centred, and the border is zero."""
    x = np.sqrt(np.clip(depth / cfg.depth_scale, 0.0, 1.0), dtype=np.float32)
    t = torch.from_numpy(x)[None, None]
    h0, w0 = depth.shape
    if not cfg.keep_aspect:
        if (h0, w0) != (cfg.height, cfg.width):
            t = F.interpolate(t, size=(cfg.height, cfg.width), mode="bilinear", align_corners=False, antialias=True)
        return t[0].numpy()
    s = min(cfg.height / h0, cfg.width / w0)
    hh, ww = max(1, round(h0 * s)), max(1, round(w0 * s))
    if (hh, ww) != (h0, w0):
        t = F.interpolate(t, size=(hh, ww), mode="bilinear", align_corners=False, antialias=True)
    out = np.zeros((1, cfg.height, cfg.width), dtype=np.float32)
    top, left = (cfg.height - hh) // 2, (cfg.width - ww) // 2
    out[:, top:top + hh, left:left + ww] = t[0].numpy()
    return out


def process_depth(depth: np.ndarray, cfg: DataConfig, rel_path: str, path: str | None = None) -> ProcessedFrame:
    """One depth map (H0, W0) metres -> `ProcessedFrame`: network input, valid points sorted by Z bin and
    the per-bin counts. With cfg.pool_per_bin > 0 each bin keeps a fixed random pool (seeded by the frame's
    path, not by the training seed) of at most that many points, still in raster order.

    Raises `BadFrameError` naming the file if no pixel is closer than cfg.max_depth (an all-sky frame)."""
    pts, _ = backproject(depth, cfg.focal_for(depth.shape[1]), cfg.max_depth)
    if pts.shape[0] == 0:
        raise BadFrameError(f"depth frame {path or rel_path}: every pixel is sky (depth >= data.max_depth="
                            f"{cfg.max_depth}); there is no point to fit; remove the frame or set "
                            "data.skip_bad_frames=true")
    b = z_bins(pts[:, 2], cfg.num_bins)
    # a stable sort of small integers is a radix sort in numpy: much faster than sorting int64 keys
    order = np.argsort(b.astype(np.int16) if cfg.num_bins < 2**15 else b, kind="stable")
    counts = np.bincount(b, minlength=cfg.num_bins).astype(np.int64)
    if cfg.pool_per_bin and (counts > cfg.pool_per_bin).any():
        rng = np.random.default_rng(frame_key(rel_path))
        keep, start = [], 0
        for n in counts:
            if n > cfg.pool_per_bin:
                sel = np.sort(rng.choice(n, cfg.pool_per_bin, replace=False))
                keep.append(order[start + sel])
            else:
                keep.append(order[start:start + n])
            start += n
        order = np.concatenate(keep)
        counts = np.minimum(counts, cfg.pool_per_bin)
    return ProcessedFrame(network_input(depth, cfg), pts, order, counts)


def sample_rng(seed: int, epoch: int, key: int) -> DrawSeed:
    """What one sample's point draw depends on: (seed, epoch, frame key) only, so the draw does not depend on
    worker count, worker RNG state, the device or the order in which samples are loaded (see `draw.py`)."""
    return DrawSeed(int(seed), int(epoch), int(key))


# ------------------------------------------------------------------------------------------ frame lists

@dataclass(frozen=True)
class Frame:
    path: str  # absolute path of the PNG
    rel: str  # path relative to the dataset root ("SEQ1/DepthLeft/000000.png"), with "/" separators
    sequence: str  # sequence (folder) name the split uses


def list_frames(root: str) -> list[Frame]:
    """Depth PNGs under `root`, sorted by sequence then file name. Accepted layouts: `root/*/DepthLeft/*.png`
    (the SYNTHIA-SF root, any number of sequences), `root/DepthLeft/*.png` (one sequence), `root/*.png`
    (one folder). Raises `DataNotFoundError` (a DataSetupError and FileNotFoundError) naming the folder if it
    is missing or holds no PNG."""
    if not os.path.exists(root):
        raise DataNotFoundError(f"data.root {root}: folder not found; point data.root at the SYNTHIA-SF folder "
                                "(holding SEQ*/DepthLeft/*.png) or at one DepthLeft folder")
    if not os.path.isdir(root):
        raise DataNotFoundError(f"data.root {root}: is a file, not a folder; point it at the folder holding the PNGs")

    def pngs(folder: str) -> list[str]:
        return sorted(n for n in os.listdir(folder) if n.lower().endswith(".png")
                      and os.path.isfile(os.path.join(folder, n)))

    frames: list[Frame] = []
    for seq in sorted(os.listdir(root)):
        dl = os.path.join(root, seq, "DepthLeft")
        if os.path.isdir(dl):
            frames += [Frame(os.path.join(dl, n), f"{seq}/DepthLeft/{n}", seq) for n in pngs(dl)]
    if not frames:
        name = os.path.basename(os.path.normpath(root))
        if os.path.isdir(os.path.join(root, "DepthLeft")):
            frames = [Frame(os.path.join(root, "DepthLeft", n), f"DepthLeft/{n}", name)
                      for n in pngs(os.path.join(root, "DepthLeft"))]
        else:
            if name == "DepthLeft":  # a DepthLeft folder: its sequence is the parent folder
                name = os.path.basename(os.path.dirname(os.path.normpath(root))) or name
            frames = [Frame(os.path.join(root, n), n, name) for n in pngs(root)]
    if not frames:
        raise DataNotFoundError(f"data.root {root}: no depth PNG found (looked for */DepthLeft/*.png, "
                                "DepthLeft/*.png and *.png); check the path")
    return frames
