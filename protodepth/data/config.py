"""`DataConfig`: every option of the depth data path, validated on construction.

A wrong value raises `protodepth.errors.ConfigError("data.<field>: got <value>, <what is expected>")` through
`require` / `require_one_of`, the one validation style of every config section. See `docs/data.md` for the
user-facing description of each field.
"""
from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass

from protodepth.errors import require, require_one_of

# SYNTHIA-SF's documented camera: focal length in pixels at the native 1920x1080 frame size.
SYNTHIA_FOCAL = 847.630211643
SYNTHIA_NATIVE_WIDTH = 1920

SOURCES = ("synthetic", "synthia")
FORMATS = ("png", "cache")
CACHE_DTYPES = ("float32", "float16")
DEVICES = ("auto", "cpu", "cuda")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


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
    # DataLoader worker processes per training process (0: load in the main process); "auto": from the cores
    # per process, max(1, min(8, cpu_count // processes_on_this_machine - 1)) (see `workers_per_process`)
    num_workers: int | str = "auto"
    # Where batches are assembled: "cuda" keeps the whole preprocessed cache on the GPU (gathers and point
    # draws on the device, no workers); "cpu" uses DataLoader workers; "auto" picks "cuda" for a cache (or the
    # synthetic source) that fits in a quarter of the free GPU memory (see `protodepth.data.loaders`)
    device: str = "auto"

    def __post_init__(self) -> None:
        require_one_of(self.source, "data.source", SOURCES)
        require_one_of(self.format, "data.format", FORMATS)
        require_one_of(self.cache_dtype, "data.cache_dtype", CACHE_DTYPES)
        require_one_of(self.image_channels, "data.image_channels", (3, 1))
        require_one_of(self.device, "data.device", DEVICES)
        require(self.source != "synthia" or bool(self.root), "data.root",
                "is required when data.source is 'synthia'; set it to the SYNTHIA-SF folder (holding "
                "SEQ*/DepthLeft/*.png) or to one DepthLeft folder")
        for name in ("root", "cache_dir"):
            v = getattr(self, name)
            require(v is None or (isinstance(v, str) and bool(v)), f"data.{name}",
                    f"got {v!r}, must be a folder path or unset (null)")
        for name in ("height", "width", "synthetic_height", "synthetic_width"):
            v = getattr(self, name)
            require(_is_int(v) and v >= 8, f"data.{name}", f"got {v!r}, must be an integer number of pixels >= 8")
        for name, low in (("num_bins", 1), ("points_per_bin", 1), ("pool_per_bin", 0), ("synthetic_num_scenes", 1),
                          ("synthetic_sequences", 1), ("synthetic_seed", 0)):
            v = getattr(self, name)
            require(_is_int(v) and v >= low, f"data.{name}", f"got {v!r}, must be an integer >= {low}")
        require(self.num_workers == "auto" or (_is_int(self.num_workers) and self.num_workers >= 0),
                "data.num_workers", f"got {self.num_workers!r}, must be an integer >= 0 or 'auto'")
        require(not self.pool_per_bin or self.pool_per_bin >= self.points_per_bin, "data.pool_per_bin",
                f"got {self.pool_per_bin}, smaller than data.points_per_bin={self.points_per_bin}; use 0 (no pool "
                "cap) or a value >= points_per_bin (e.g. 8x it)")
        require(self.synthetic_sequences <= self.synthetic_num_scenes, "data.synthetic_sequences",
                f"got {self.synthetic_sequences} > synthetic_num_scenes={self.synthetic_num_scenes}, must be at most "
                "one sequence per scene")
        for name in ("max_depth", "depth_scale"):
            v = getattr(self, name)
            require(_is_number(v) and v > 0, f"data.{name}", f"got {v!r}, must be a finite number of metres > 0")
        require(self.focal is None or (_is_number(self.focal) and self.focal > 0), "data.focal",
                f"got {self.focal!r}, must be a focal length in pixels > 0, or null for SYNTHIA's camera")
        require(_is_number(self.val_fraction) and 0.0 <= self.val_fraction < 1.0, "data.val_fraction",
                f"got {self.val_fraction!r}, must be a number in [0, 1); 0 means no validation split")
        seqs = self.val_sequences
        require(seqs is None or (isinstance(seqs, list) and all(isinstance(s, str) and s for s in seqs)),
                "data.val_sequences", f"got {seqs!r}, must be a list of sequence folder names, e.g. [SEQ6]")

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
