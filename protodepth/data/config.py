"""`DataConfig`: every option of the depth data path, validated on construction.

A wrong value raises `ValueError("data.<field>: <what is wrong>; <how to fix>")` so the top-level config
(`protodepth.config`) can pass the message through unchanged. See `docs/data.md` for the user-facing
description of each field.
"""
from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass

# SYNTHIA-SF's documented camera: focal length in pixels at the native 1920x1080 frame size.
SYNTHIA_FOCAL = 847.630211643
SYNTHIA_NATIVE_WIDTH = 1920

SOURCES = ("synthetic", "synthia")
FORMATS = ("png", "cache")
CACHE_DTYPES = ("float32", "float16")


def _fail(field: str, what: str, fix: str) -> None:
    raise ValueError(f"data.{field}: {what}; {fix}")


@dataclass
class DataConfig:
    # Where frames come from: "synthetic" (built-in procedural scenes, generated on first use) or "synthia"
    # (a SYNTHIA-SF root holding SEQ*/DepthLeft/*.png, one SEQ folder, or one folder of depth PNGs).
    source: str = "synthetic"
    # Dataset root. For "synthetic" it is where scenes are generated (default data_cache/synthetic under
    # the current directory); for "synthia" it is required.
    root: str | None = None
    # "png": decode depth PNGs every time; "cache": read the preprocessed form built by scripts/prepare_data.py.
    format: str = "png"
    # Location of the preprocessed form; None derives data_cache/prepared/<root name>-<hash of the config>.
    cache_dir: str | None = None
    cache_dtype: str = "float32"  # storage of network inputs in the cache; float16 halves it (abs err <= 5e-4)
    # 3: the input repeated to 3 channels (ResNet's stem); 1: a single channel, a third of the bytes each batch
    # moves from DataLoader workers to the GPU (the model must then repeat it to 3 channels on the device)
    image_channels: int = 3
    height: int = 480  # network input size (the original resized every frame to 640x480)
    width: int = 640
    keep_aspect: bool = False  # True: fit the frame inside height x width without distortion, zero-pad the rest
    num_bins: int = 5  # equal-width bins along Z for the target cloud
    points_per_bin: int = 2000  # at most this many random points per bin, redrawn every epoch
    # 0: every valid point of a bin is a candidate (the original); > 0: a fixed, seed-independent pool of at
    # most this many points per bin is kept per frame (same in both formats), making the cache far smaller.
    pool_per_bin: int = 0
    max_depth: float = 1000.0  # metres; depths >= this are sky and dropped
    depth_scale: float = 300.0  # network input = sqrt(clip(depth / depth_scale, 0, 1))
    # Focal length in pixels of the depth frames. None: 847.630211643 * frame width / 1920, exact for
    # SYNTHIA's native 1920x1080 and keeping the same horizontal field of view at other frame sizes.
    focal: float | None = None
    val_fraction: float = 0.1  # share of each sequence's frames (its last ones) used for validation
    val_sequences: list[str] | None = None  # if set: these whole sequences are the validation split
    skip_bad_frames: bool = False  # True: drop unreadable / all-sky frames with a warning and a count
    synthetic_num_scenes: int = 128
    synthetic_sequences: int = 4  # scenes are spread over SEQ1..SEQn so a split by sequence works
    synthetic_height: int = 240
    synthetic_width: int = 320
    synthetic_seed: int = 0
    num_workers: int = 2  # DataLoader worker processes (0: load in the main process)

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            _fail("source", f"got {self.source!r}", f"use one of {', '.join(map(repr, SOURCES))}")
        if self.format not in FORMATS:
            _fail("format", f"got {self.format!r}", f"use one of {', '.join(map(repr, FORMATS))}")
        if self.cache_dtype not in CACHE_DTYPES:
            _fail("cache_dtype", f"got {self.cache_dtype!r}", f"use one of {', '.join(map(repr, CACHE_DTYPES))}")
        if self.image_channels not in (1, 3):
            _fail("image_channels", f"got {self.image_channels!r}", "use 3 (repeated channel) or 1 (single channel)")
        if self.source == "synthia" and not self.root:
            _fail("root", "is required when data.source is 'synthia'",
                  "set it to the SYNTHIA-SF folder (holding SEQ*/DepthLeft/*.png) or to one DepthLeft folder")
        for name in ("root", "cache_dir"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, str) or not v):
                _fail(name, f"got {v!r}", "give a folder path or leave it unset (null)")
        for name in ("height", "width", "synthetic_height", "synthetic_width"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 8:
                _fail(name, f"got {v!r}", "use an integer number of pixels >= 8")
        for name, low in (("num_bins", 1), ("points_per_bin", 1), ("pool_per_bin", 0), ("synthetic_num_scenes", 1),
                          ("synthetic_sequences", 1), ("num_workers", 0), ("synthetic_seed", 0)):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < low:
                _fail(name, f"got {v!r}", f"use an integer >= {low}")
        if self.pool_per_bin and self.pool_per_bin < self.points_per_bin:
            _fail("pool_per_bin", f"got {self.pool_per_bin}, smaller than data.points_per_bin={self.points_per_bin}",
                  "use 0 (no pool cap) or a value >= points_per_bin (e.g. 8x it)")
        if self.synthetic_sequences > self.synthetic_num_scenes:
            _fail("synthetic_sequences", f"got {self.synthetic_sequences} > synthetic_num_scenes="
                  f"{self.synthetic_num_scenes}", "use at most one sequence per scene")
        for name in ("max_depth", "depth_scale"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                _fail(name, f"got {v!r}", "use a finite number of metres > 0")
        if self.focal is not None and (not isinstance(self.focal, (int, float)) or not math.isfinite(self.focal)
                                       or self.focal <= 0):
            _fail("focal", f"got {self.focal!r}", "use a focal length in pixels > 0, or null for SYNTHIA's camera")
        if not isinstance(self.val_fraction, (int, float)) or not 0.0 <= self.val_fraction < 1.0:
            _fail("val_fraction", f"got {self.val_fraction!r}", "use a number in [0, 1); 0 means no validation split")
        if self.val_sequences is not None:
            seqs = self.val_sequences
            if not isinstance(seqs, list) or not all(isinstance(s, str) and s for s in seqs):
                _fail("val_sequences", f"got {seqs!r}", "give a list of sequence folder names, e.g. [SEQ6]")

    # ------------------------------------------------------------------------------------------ derived

    def resolved_root(self) -> str:
        """The dataset root as an absolute path (synthetic default: `data_cache/synthetic` under cwd)."""
        root = self.root if self.root else os.path.join("data_cache", "synthetic")
        return os.path.abspath(os.path.expanduser(root))

    def focal_for(self, frame_width: int) -> float:
        """Focal length in pixels for a depth frame `frame_width` pixels wide."""
        if self.focal is not None:
            return float(self.focal)
        return SYNTHIA_FOCAL * frame_width / SYNTHIA_NATIVE_WIDTH

    def cache_fields(self) -> dict:
        """The values a preprocessed cache is built with; a cache whose manifest differs is refused."""
        return {
            "height": self.height, "width": self.width, "keep_aspect": self.keep_aspect,
            "num_bins": self.num_bins, "pool_per_bin": self.pool_per_bin, "max_depth": float(self.max_depth),
            "depth_scale": float(self.depth_scale), "focal": None if self.focal is None else float(self.focal),
            "cache_dtype": self.cache_dtype,
        }

    def resolved_cache_dir(self) -> str:
        """Absolute cache folder: `cache_dir`, or `data_cache/prepared/<root name>-<hash>` under cwd.

        The derived name hashes the root path and `cache_fields()`, so different settings get different
        folders and never overwrite each other."""
        if self.cache_dir:
            return os.path.abspath(os.path.expanduser(self.cache_dir))
        root = self.resolved_root()
        key = repr((root, sorted(self.cache_fields().items()))).encode()
        name = f"{os.path.basename(root.rstrip(os.sep)) or 'root'}-{hashlib.sha1(key).hexdigest()[:10]}"
        return os.path.abspath(os.path.join("data_cache", "prepared", name))
