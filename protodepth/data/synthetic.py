"""Built-in synthetic depth scenes: ground plane, boxes, spheres and cylinders at random poses under an open
sky, ray-cast with the SYNTHIA camera and written in the SYNTHIA depth PNG encoding and folder layout
(`<root>/SEQ<k>/DepthLeft/<frame>.png`), so the SYNTHIA reader loads them unchanged.

Every scene is a pure function of (seed, scene index), so a set is reproducible bit for bit. A small JSON
file (`protodepth_synthetic.json`) records generator version, seed and sizes; `ensure_synthetic` regenerates
the folder when they no longer match the config, under a file lock and through an atomic rename, so several
processes (DDP ranks) may call it at once.
"""
from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager

import numpy as np
from filelock import FileLock
from tqdm.auto import tqdm

from protodepth.data.config import DataConfig
from protodepth.data.synthia import write_depth_png
from protodepth.errors import DataSetupError

GENERATOR_VERSION = 2
META_NAME = "protodepth_synthetic.json"


# --------------------------------------------------------------------------------------------- geometry

def _rot_x(a: float) -> np.ndarray:
    c, s = np.cos(a), np.sin(a)
    return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])


def _rot_y(a: float) -> np.ndarray:
    c, s = np.cos(a), np.sin(a)
    return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])


def _rot_z(a: float) -> np.ndarray:
    c, s = np.cos(a), np.sin(a)
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q = rng.normal(size=4)
    q /= np.linalg.norm(q)
    w, x, y, z = q
    return np.array([[1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
                     [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
                     [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)]])


def camera_rays(height: int, width: int, focal: float) -> np.ndarray:
    """Ray directions (H*W, 3) float64 of the SYNTHIA camera, raster order, scaled so that the z component
    is -1: the ray parameter t of a hit is then its depth d (the Z-depth SYNTHIA stores), not its range."""
    v, u = np.meshgrid(np.arange(height, dtype=np.float64), np.arange(width, dtype=np.float64), indexing="ij")
    return np.stack([(u - width / 2.0) / focal, -(v - height / 2.0) / focal, -np.ones_like(u)], -1).reshape(-1, 3)


def _hit_plane(dirs, normal, offset, far):
    """Rays from the origin against the plane normal . p = offset, kept only up to depth `far`."""
    den = dirs @ normal
    with np.errstate(divide="ignore", invalid="ignore"):
        t = offset / den
    return np.where((t > 0) & (t <= far), t, np.inf)


def _hit_sphere(dirs, center, radius):
    a = np.einsum("ij,ij->i", dirs, dirs)
    b = dirs @ center  # rays start at the origin: |t d - c|^2 = r^2
    c = center @ center - radius * radius
    disc = b * b - a * c
    with np.errstate(invalid="ignore"):
        t = (b - np.sqrt(disc)) / a
    return np.where((disc >= 0) & (t > 0), t, np.inf)


def _local(dirs, center, rot):
    """Ray origin (3,) and directions (N, 3) in an object's frame (rot: object -> camera)."""
    return rot.T @ (-center), dirs @ rot


def _hit_box(dirs, center, rot, half):
    o, d = _local(dirs, center, rot)
    with np.errstate(divide="ignore", invalid="ignore"):
        t1 = (-half - o) / d
        t2 = (half - o) / d
    tmin = np.nanmax(np.minimum(t1, t2), axis=1)
    tmax = np.nanmin(np.maximum(t1, t2), axis=1)
    return np.where((tmax >= tmin) & (tmin > 0), tmin, np.inf)


def _hit_cylinder(dirs, center, rot, radius, half_height):
    """Capped cylinder whose axis is the object's y axis."""
    o, d = _local(dirs, center, rot)
    a = d[:, 0] ** 2 + d[:, 2] ** 2
    b = o[0] * d[:, 0] + o[2] * d[:, 2]
    c = o[0] ** 2 + o[2] ** 2 - radius * radius
    disc = b * b - a * c
    with np.errstate(divide="ignore", invalid="ignore"):
        ts = (-b - np.sqrt(disc)) / a
        side_ok = (disc >= 0) & (ts > 0) & (np.abs(o[1] + ts * d[:, 1]) <= half_height)
        best = np.where(side_ok, ts, np.inf)
        for cap in (-half_height, half_height):
            tc = (cap - o[1]) / d[:, 1]
            x, z = o[0] + tc * d[:, 0], o[2] + tc * d[:, 2]
            ok = (tc > 0) & (x * x + z * z <= radius * radius)
            best = np.minimum(best, np.where(ok, tc, np.inf))
    return best


def _pixel_window(center: np.ndarray, radius: float, height: int, width: int, focal: float):
    """Conservative (row, column) slices of the pixels whose rays can meet a ball (center (3,), radius);
    the whole image when the ball reaches the camera plane."""
    dmin, dmax = -center[2] - radius, -center[2] + radius
    if dmin <= 0.05:
        return slice(0, height), slice(0, width)
    xs = [(center[0] + sx * radius) / d for sx in (-1, 1) for d in (dmin, dmax)]
    ys = [(center[1] + sy * radius) / d for sy in (-1, 1) for d in (dmin, dmax)]
    u0, u1 = width / 2 + focal * min(xs), width / 2 + focal * max(xs)
    v0, v1 = height / 2 - focal * max(ys), height / 2 - focal * min(ys)
    rows = slice(int(np.clip(np.floor(v0) - 1, 0, height)), int(np.clip(np.ceil(v1) + 2, 0, height)))
    cols = slice(int(np.clip(np.floor(u0) - 1, 0, width)), int(np.clip(np.ceil(u1) + 2, 0, width)))
    return rows, cols


def render_scene(rng: np.random.Generator, height: int, width: int, focal: float) -> np.ndarray:
    """Ray-cast one random scene -> depth (H, W) float64 metres, +inf where a ray meets nothing (sky).

    The camera stands 1.2-2.0 m above a slightly tilted ground plane that ends 50-90 m ahead; 4-12 objects
    (boxes, spheres, capped cylinders) stand on it or float, 4-60 m in front of the camera, inside the view.
    Each object is only ray-cast in the image window of its bounding ball, which makes large frames cheap."""
    grid = camera_rays(height, width, focal).reshape(height, width, 3)
    cam_h = rng.uniform(1.2, 2.0)
    ground_rot = _rot_x(np.deg2rad(rng.uniform(-4, 4))) @ _rot_z(np.deg2rad(rng.uniform(-3, 3)))
    up = ground_rot @ np.array([0.0, 1.0, 0.0])
    depth = _hit_plane(grid.reshape(-1, 3), up, -cam_h, rng.uniform(50.0, 90.0)).reshape(height, width)
    tan_half = width / 2.0 / focal
    for _ in range(int(rng.integers(4, 13))):
        zc = 4.0 + 56.0 * rng.random() ** 1.5  # 4-60 m, denser near the camera where objects look bigger
        xc = rng.uniform(-0.9, 0.9) * tan_half * zc
        # the ground point below (xc, ., -zc): solve up . p = -cam_h for its y
        yg = (-cam_h - up[0] * xc + up[2] * zc) / up[1]
        base = np.array([xc, yg, -zc])
        kind = rng.integers(3)
        tumble = rng.random() < 0.3  # a random 3D orientation, lifted off the ground
        rot = ground_rot @ _rot_y(rng.uniform(0, 2 * np.pi))
        if tumble:
            rot = rot @ _random_rotation(rng)
        lift = rng.uniform(0.5, 3.0) if tumble else 0.0
        if kind == 0:
            half = np.array([rng.uniform(0.3, 2.5), rng.uniform(0.3, 2.0), rng.uniform(0.3, 2.5)])
            center = base + up * ((np.linalg.norm(half) if tumble else half[1]) + lift)
            bound = float(np.linalg.norm(half))
            hit = lambda dirs: _hit_box(dirs, center, rot, half)  # noqa: E731
        elif kind == 1:
            r = rng.uniform(0.3, 2.0)
            center, bound = base + up * (r + lift), r
            hit = lambda dirs: _hit_sphere(dirs, center, r)  # noqa: E731
        else:
            r, hh = rng.uniform(0.15, 1.0), rng.uniform(0.5, 3.0)
            bound = float(np.hypot(r, hh))
            center = base + up * ((bound if tumble else hh) + lift)
            hit = lambda dirs: _hit_cylinder(dirs, center, rot, r, hh)  # noqa: E731
        rows, cols = _pixel_window(center, bound, height, width, focal)
        win = grid[rows, cols]
        if win.size:
            depth[rows, cols] = np.minimum(depth[rows, cols], hit(win.reshape(-1, 3)).reshape(win.shape[:2]))
    return depth


# ------------------------------------------------------------------------------------------------ folders

def synthetic_meta(cfg: DataConfig) -> dict:
    """What a generated folder must record to be reused for `cfg`."""
    return {"generator": "protodepth.data.synthetic", "version": GENERATOR_VERSION, "seed": cfg.synthetic_seed,
            "num_scenes": cfg.synthetic_num_scenes, "sequences": cfg.synthetic_sequences,
            "height": cfg.synthetic_height, "width": cfg.synthetic_width,
            "focal": cfg.focal_for(cfg.synthetic_width)}


def scene_layout(num_scenes: int, sequences: int) -> list[tuple[str, str]]:
    """(sequence name, file name) of every scene: consecutive blocks of scenes per sequence SEQ1..SEQn."""
    out = []
    for i in range(num_scenes):
        k = i * sequences // num_scenes
        first = -(-k * num_scenes // sequences)  # first scene index of sequence k
        out.append((f"SEQ{k + 1}", f"{i - first:06d}.png"))
    return out


def generate_synthetic(out_dir: str, cfg: DataConfig, progress: bool = True) -> None:
    """Write cfg.synthetic_num_scenes scenes into `out_dir` (created) plus the metadata file (written last)."""
    meta = synthetic_meta(cfg)
    layout = scene_layout(cfg.synthetic_num_scenes, cfg.synthetic_sequences)
    for seq in sorted({s for s, _ in layout}):
        os.makedirs(os.path.join(out_dir, seq, "DepthLeft"), exist_ok=True)
    for i, (seq, name) in enumerate(tqdm(layout, desc="generating synthetic scenes", unit="scene",
                                         disable=not progress, dynamic_ncols=True)):
        rng = np.random.default_rng([cfg.synthetic_seed, i])
        depth = render_scene(rng, cfg.synthetic_height, cfg.synthetic_width, meta["focal"])
        write_depth_png(os.path.join(out_dir, seq, "DepthLeft", name), depth)
    with open(os.path.join(out_dir, META_NAME), "w") as f:
        json.dump(meta, f, indent=1)


def read_meta(root: str) -> dict | None:
    try:
        with open(os.path.join(root, META_NAME)) as f:
            return json.load(f)
    except (FileNotFoundError, json.JSONDecodeError, NotADirectoryError):
        return None


@contextmanager
def folder_lock(path: str):
    """An exclusive inter-process lock on `path + '.lock'` held for the block (waits for other holders).

    A folder we cannot create or lock (read-only disk, no permission) is a DataSetupError naming it."""
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        lock = FileLock(path + ".lock")
        lock.acquire()
    except OSError as e:
        raise DataSetupError(f"{path}: cannot create or lock this data folder ({e.strerror or e}); point the "
                             "data settings at a writable folder") from None
    try:
        yield
    finally:
        lock.release()


def replace_folder(tmp: str, final: str) -> None:
    """Move the finished folder `tmp` to `final`, replacing an old one, with renames only (atomic per step)."""
    old = None
    if os.path.exists(final):
        old = f"{final}.old-{os.getpid()}"
        os.rename(final, old)
    os.rename(tmp, final)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def ensure_synthetic(cfg: DataConfig, progress: bool = True) -> str:
    """Make sure the synthetic scenes for `cfg` exist under `cfg.resolved_root()`; returns that folder.

    Generates them (with a progress bar) if the folder is missing, or regenerates it if its metadata records
    other settings. Refuses (DataSetupError) to replace a non-empty folder that protodepth did not generate."""
    root = cfg.resolved_root()
    want = synthetic_meta(cfg)
    if read_meta(root) == want:  # the common case, without touching the lock
        return root
    with folder_lock(root):
        have = read_meta(root)
        if have == want:  # another process generated it while we waited
            return root
        if have is None and os.path.isdir(root) and os.listdir(root):
            raise DataSetupError(f"data.root {root}: exists and is not a protodepth synthetic folder (no {META_NAME}); "
                             "for data.source=synthetic point data.root at a new or empty folder")
        if have is not None and progress:
            changed = sorted(k for k in want if have.get(k) != want[k])
            tqdm.write(f"synthetic scenes in {root} were made with other settings ({', '.join(changed)}); regenerating")
        tmp = f"{root}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            generate_synthetic(tmp, cfg, progress=progress)
            replace_folder(tmp, root)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return root
