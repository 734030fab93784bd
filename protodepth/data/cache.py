"""The preprocessed (cache) form of a depth dataset, built once by `scripts/prepare_data.py`.

Layout of a cache folder:
- `manifest.json`: format version, the config values it was built with (`DataConfig.cache_fields()`) and the
  frame list (path relative to the root, sequence). Checked on every load.
- `images.npy`: network inputs (F, H, W) in `cache_dtype`, already at their final size.
- `points.npy`: (P_total, 3) float32, every frame's valid points (or its per-bin pool) sorted by Z bin.
- `offsets.npy`: (F, num_bins + 1) int64; bin b of frame i is points[offsets[i, b]:offsets[i, b + 1]].
All three are plain NumPy files, written through `np.lib.format.open_memmap` and read with
`np.load(mmap_mode="r")`, so their shapes and dtypes travel inside them.

A sample then costs one image slice and one gather of the drawn point rows from memory-mapped files: no PNG
decode, no resize, no back-projection. The point lists and the draw are those of the PNG path
(`process_depth`, `draw_indices`), so both paths give the same samples (bitwise with float32 images).
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
import warnings

import numpy as np
import torch
from tqdm.auto import tqdm

from protodepth.data.config import DataConfig
from protodepth.data.dataset import DepthDataset, gray_to_rgb, scan_frames
from protodepth.data.synthia import (BadFrameError, Frame, DataNotFoundError, check_png_header, draw_indices,
                                     frame_key, list_frames, process_depth, read_depth_png, sample_rng)
from protodepth.data.synthetic import folder_lock, read_meta, replace_folder
from protodepth.errors import DataSetupError

CACHE_FORMAT = "protodepth-depth-cache"
CACHE_VERSION = 3  # 3: .npy arrays (2: raw .bin files with shapes in the manifest)
MANIFEST = "manifest.json"


# ------------------------------------------------------------------------------------------------ building

def _worker_init() -> None:
    torch.set_num_threads(1)  # one frame per process already fills the cores; more threads only contend


def _process_one(args):
    cfg, fr = args
    try:
        p = process_depth(read_depth_png(fr.path), cfg, fr.rel, fr.path)
        return p.image, p.points, p.counts, None
    except BadFrameError as e:
        return None, None, None, str(e)


def _point_bound(frames: list[Frame], cfg: DataConfig) -> int:
    """An upper bound on the candidate points of `frames` (from the PNG headers): every pixel, or the pool cap."""
    total = 0
    for fr in frames:
        h, w = check_png_header(fr.path)
        total += min(h * w, cfg.num_bins * cfg.pool_per_bin) if cfg.pool_per_bin else h * w
    return total


def _shrink_npy(path: str, rows: int, chunk_rows: int = 1 << 22) -> None:
    """Replace the .npy at `path` by its first `rows` rows (copied in chunks, never all in memory at once)."""
    src = np.load(path, mmap_mode="r")
    if src.shape[0] == rows:
        return
    part = path + ".part.npy"
    dst = np.lib.format.open_memmap(part, mode="w+", dtype=src.dtype, shape=(rows,) + src.shape[1:])
    for a in range(0, rows, chunk_rows):
        b = min(rows, a + chunk_rows)
        dst[a:b] = src[a:b]
    dst.flush()
    del src, dst
    os.replace(part, path)


def _write_frames(frames, results, cfg: DataConfig, tmp: str, progress: bool, desc: str):
    """Stream processed frames into tmp/images.npy and tmp/points.npy (sized for every frame and the point
    bound; cut to what was written afterwards). Returns (kept frames, offsets rows, skipped (rel, message))."""
    h, w = cfg.height, cfg.width
    images = np.lib.format.open_memmap(os.path.join(tmp, "images.npy"), mode="w+", dtype=np.dtype(cfg.cache_dtype),
                                       shape=(len(frames), h, w))
    # sized for the bound: pages never written stay holes in the file until it is cut to size below
    points = np.lib.format.open_memmap(os.path.join(tmp, "points.npy"), mode="w+", dtype=np.float32,
                                       shape=(max(1, _point_bound(frames, cfg)), 3))
    kept, offsets, skipped, total = [], [], [], 0
    bar = tqdm(results, total=len(frames), desc=desc, unit="frame", disable=not progress, dynamic_ncols=True)
    for fr, (image, pts, counts, err) in zip(frames, bar):
        if err is not None:
            if not cfg.skip_bad_frames:
                raise BadFrameError(f"{err}; set data.skip_bad_frames=true to leave such frames out")
            skipped.append((fr.rel, err))
            continue
        images[len(kept)] = image[0]
        points[total:total + len(pts)] = pts
        offsets.append(total + np.concatenate([[0], np.cumsum(counts)]))
        total += int(counts.sum())
        kept.append(fr)
    images.flush()
    points.flush()
    del images, points
    _shrink_npy(os.path.join(tmp, "images.npy"), len(kept))
    _shrink_npy(os.path.join(tmp, "points.npy"), total)
    return kept, offsets, skipped


def build_cache(cfg: DataConfig, root: str, out_dir: str, workers: int = 0, progress: bool = True,
                source_meta: dict | None = None) -> dict:
    """Convert every depth PNG under `root` into a cache folder at `out_dir` (replaced atomically when done).

    `workers` > 0 decodes frames in that many processes. `source_meta` (the synthetic generator's metadata)
    is stored so a cache of regenerated scenes is recognised as stale. Bad frames raise `BadFrameError` naming
    the file, or with cfg.skip_bad_frames are left out with one warning and a count. Returns the manifest."""
    frames = scan_frames(list_frames(root), cfg.skip_bad_frames)
    tmp = f"{out_dir.rstrip(os.sep)}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    pool = mp.get_context("fork").Pool(workers, initializer=_worker_init) if workers > 0 else None
    try:
        jobs = ((cfg, fr) for fr in frames)
        results = pool.imap(_process_one, jobs, chunksize=4) if pool else map(_process_one, jobs)
        kept, offsets, skipped = _write_frames(frames, results, cfg, tmp, progress,
                                               f"preparing {os.path.basename(out_dir)}")
        if not kept:
            raise BadFrameError(f"data.root {root}: no usable depth frame ({len(skipped)} bad, first: {skipped[0][1]})")
        if skipped:
            warnings.warn(f"left {len(skipped)} of {len(frames)} frames out of the cache; first: {skipped[0][1]}",
                          RuntimeWarning, stacklevel=2)
        np.save(os.path.join(tmp, "offsets.npy"), np.stack(offsets).astype(np.int64))
        manifest = {
            "format": CACHE_FORMAT, "version": CACHE_VERSION, "config": cfg.cache_fields(), "root": root,
            "num_points": int(offsets[-1][-1]), "frames": [{"rel": f.rel, "sequence": f.sequence} for f in kept],
            "skipped": [r for r, _ in skipped], "source_meta": source_meta,
        }
        with open(os.path.join(tmp, MANIFEST), "w") as f:
            json.dump(manifest, f, indent=1)
        replace_folder(tmp, out_dir)
    finally:
        if pool:
            pool.terminate()
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest


# ------------------------------------------------------------------------------------------------- reading

def read_manifest(cache_dir: str) -> dict:
    path = os.path.join(cache_dir, MANIFEST)
    try:
        with open(path) as f:
            m = json.load(f)
    except FileNotFoundError:
        raise DataNotFoundError(f"preprocessed data {path}: not found; build it with `python scripts/prepare_data.py "
                                "--config <your config>` or use data.format=png") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataSetupError(f"preprocessed data {path}: manifest is not valid JSON ({e}); rebuild it with "
                         "scripts/prepare_data.py") from None
    if not isinstance(m, dict) or m.get("format") != CACHE_FORMAT:
        raise DataSetupError(f"preprocessed data {path}: not a protodepth cache manifest; point data.cache_dir at a "
                         "folder written by scripts/prepare_data.py")
    if m.get("version") != CACHE_VERSION:
        raise DataSetupError(f"preprocessed data {path}: cache version {m.get('version')}, this protodepth reads "
                         f"version {CACHE_VERSION}; rebuild it with scripts/prepare_data.py")
    return m


def check_manifest(m: dict, cfg: DataConfig, cache_dir: str) -> None:
    """Raise DataSetupError naming the first field where the cache's build settings differ from `cfg`."""
    path = os.path.join(cache_dir, MANIFEST)
    built = m.get("config", {})
    for field, want in cfg.cache_fields().items():
        if built.get(field) != want:
            raise DataSetupError(f"data.{field}: the config says {want!r} but the preprocessed data {path} was built "
                                 f"with {built.get(field)!r}; rebuild it (python scripts/prepare_data.py with this "
                                 "config) or point data.cache_dir elsewhere")


class DepthCache:
    """A cache folder opened for reading: frame list plus lazily opened memory maps (re-opened in each
    process after pickling, so DataLoader workers never copy the arrays).

    Arrays: `images` (F, H, W) in cache_dtype, `points` (P, 3) float32, `offsets` (F, num_bins + 1) int64."""

    def __init__(self, cache_dir: str, cfg: DataConfig):
        self.cache_dir = cache_dir
        self.manifest = m = read_manifest(cache_dir)
        check_manifest(m, cfg, cache_dir)
        self.rels = [f["rel"] for f in m["frames"]]
        self.sequences = [f["sequence"] for f in m["frames"]]
        self.keys = [frame_key(r) for r in self.rels]
        self.root = m["root"]
        n = len(self.rels)
        self.offsets = self._open("offsets", None, (n, cfg.num_bins + 1), np.int64)
        self._want = {"images": ((n, cfg.height, cfg.width), np.dtype(cfg.cache_dtype)),
                      "points": ((int(self.offsets[-1, -1]) if n else 0, 3), np.dtype(np.float32))}
        self._maps = None
        self.maps()  # checks shapes and dtypes now, in the process that opens the cache

    def _open(self, name: str, mmap_mode, shape: tuple, dtype) -> np.ndarray:
        path = os.path.join(self.cache_dir, f"{name}.npy")
        try:
            a = np.load(path, mmap_mode=mmap_mode, allow_pickle=False)
        except FileNotFoundError:
            raise DataSetupError(f"preprocessed data {path}: missing; the cache is incomplete, rebuild it with "
                                 "scripts/prepare_data.py") from None
        except (ValueError, OSError, EOFError) as e:
            raise DataSetupError(f"preprocessed data {path}: unreadable ({e}); the cache is incomplete or damaged, "
                                 "rebuild it with scripts/prepare_data.py") from None
        if a.shape != shape or a.dtype != dtype:
            raise DataSetupError(f"preprocessed data {path}: {a.dtype} {a.shape}, expected {np.dtype(dtype)} {shape}; "
                                 "the cache is damaged, rebuild it with scripts/prepare_data.py")
        return a

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_maps"] = None
        state.pop("_device_arrays", None)  # the device path's tensors never travel to DataLoader workers
        return state

    def maps(self) -> dict:
        """{"images": (F, H, W), "points": (P, 3)} read-only memory maps of this process."""
        if self._maps is None:
            self._maps = {name: self._open(name, "r", shape, dt) for name, (shape, dt) in self._want.items()}
        return self._maps

    @property
    def nbytes(self) -> int:
        """Bytes of images + points + offsets (what moving the whole cache to a device costs)."""
        return sum(int(np.prod(s)) * dt.itemsize for s, dt in self._want.values()) + self.offsets.nbytes


class CachedDepthDataset(DepthDataset):
    """Samples from a `DepthCache`, restricted to the frame indices `indices` (a split)."""

    def __init__(self, cache: DepthCache, indices: list[int], cfg: DataConfig, seed: int, vary_per_epoch: bool = True):
        super().__init__(cfg, seed, vary_per_epoch, skip_bad=False)  # bad frames were left out when building
        self.cache = cache
        self.indices = np.asarray(indices, dtype=np.int64)
        self._root = cfg.resolved_root() if cfg.root or cfg.source == "synthetic" else cache.root

    def _frame_count(self) -> int:
        return len(self.indices)

    def _describe(self, j: int) -> str:
        return os.path.join(self._root, self.cache.rels[self.indices[j]])

    def _load(self, j: int, epoch: int) -> dict:
        f = int(self.indices[j])
        maps = self.cache.maps()
        off = self.cache.offsets[f]
        idx = draw_indices(np.diff(off), self.cfg.points_per_bin, sample_rng(self.seed, epoch, self.cache.keys[f]))
        cloud = torch.from_numpy(maps["points"][idx + off[0]])
        image = gray_to_rgb(maps["images"][f], self.cfg.image_channels)
        return {"image": image, "cloud": cloud, "path": self._describe(j)}


def open_cache(cfg: DataConfig, root: str, progress: bool = True) -> DepthCache:
    """Open the cache for `cfg` (checking its manifest). For the synthetic source a missing or outdated cache
    is (re)built here under a file lock; for SYNTHIA a missing one raises DataNotFoundError saying how to build
    it, and one built with other settings raises DataSetupError naming the field."""
    cache_dir = cfg.resolved_cache_dir()
    if cfg.source == "synthetic":
        meta = read_meta(root)

        def usable() -> bool:
            try:
                m = read_manifest(cache_dir)
                check_manifest(m, cfg, cache_dir)
                return m.get("source_meta") == meta
            except DataSetupError:
                return False
        if not usable():
            with folder_lock(cache_dir):
                if not usable():
                    build_cache(cfg, root, cache_dir, progress=progress, source_meta=meta)
    return DepthCache(cache_dir, cfg)


def prepare_cache(cfg: DataConfig, workers: int = 0, progress: bool = True) -> tuple[str, dict]:
    """Build the preprocessed form for `cfg` (what scripts/prepare_data.py runs), replacing any old one at
    `cfg.resolved_cache_dir()`; for the synthetic source the scenes are generated first if needed.
    Returns (cache folder, manifest)."""
    if cfg.source == "synthetic":
        from protodepth.data.synthetic import ensure_synthetic
        root = ensure_synthetic(cfg, progress=progress)
        meta = read_meta(root)
    else:
        root, meta = cfg.resolved_root(), None
    cache_dir = cfg.resolved_cache_dir()
    with folder_lock(cache_dir):
        manifest = build_cache(cfg, root, cache_dir, workers=workers, progress=progress, source_meta=meta)
    return cache_dir, manifest


__all__ = ["prepare_cache", "build_cache", "open_cache", "DepthCache", "CachedDepthDataset", "read_manifest",
           "check_manifest",
           "Frame"]
