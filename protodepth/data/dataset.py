"""Datasets of depth samples, the collate function, and `build_datasets` (the trainer's entry point).

A sample is `{"image": (C, H, W) float32, "cloud": (N_i, 3) float32, "path": str}` with C = data.image_channels
(3 by default). The choice of at most `points_per_bin` points per Z bin is redrawn every epoch from a hash of
(seed, epoch, frame, point) only (`draw.py`), never from worker RNG state, so the same seed gives the same
batches with any number of DataLoader workers, on the device path, and after a resume. The PNG path
(`PngDepthDataset`) and the preprocessed path (`CachedDepthDataset`) see the same bin-sorted point lists and
draw the same indices, so they return the same samples.
"""
from __future__ import annotations

import abc
import warnings

import numpy as np
import torch
from torch.utils.data import Dataset

from protodepth.data.config import DataConfig
from protodepth.errors import ConfigError
from protodepth.data.synthia import (BadFrameError, Frame, check_png_header, draw_indices, frame_key, list_frames,
                                     process_depth, read_depth_png, sample_rng)


# --------------------------------------------------------------------------------------------------- split

def split_indices(sequences: list[str], cfg: DataConfig) -> tuple[list[int], list[int]]:
    """Train / validation frame indices from each frame's sequence name (frames in sorted order).

    `cfg.val_sequences` set: those whole sequences are validation. Otherwise the last round(val_fraction * n)
    frames of every sequence of n frames (neighbouring video frames are near duplicates, so a tail keeps the
    two splits apart better than a random pick); at least one frame when val_fraction > 0."""
    n = len(sequences)
    if cfg.val_sequences is not None:
        have = sorted(set(sequences))
        unknown = [s for s in cfg.val_sequences if s not in have]
        if unknown:
            raise ConfigError(f"data.val_sequences: {unknown} not found; the data has sequences {have}")
        val_set = set(cfg.val_sequences)
        val = [i for i, s in enumerate(sequences) if s in val_set]
        train = [i for i, s in enumerate(sequences) if s not in val_set]
        if not train:
            raise ConfigError(f"data.val_sequences: {cfg.val_sequences} is every sequence; leave some for training")
        return train, val
    groups: dict[str, list[int]] = {}
    for i, s in enumerate(sequences):
        groups.setdefault(s, []).append(i)
    val: list[int] = []
    for idx in groups.values():
        k = min(int(np.floor(cfg.val_fraction * len(idx) + 0.5)), len(idx) - 1)
        val += idx[len(idx) - k:] if k > 0 else []
    if not val and cfg.val_fraction > 0 and n >= 2:
        largest = max(groups.values(), key=len)
        val = [largest[-1]]
    val_set = set(val)
    return [i for i in range(n) if i not in val_set], sorted(val)


# ------------------------------------------------------------------------------------------------ datasets

def gray_to_rgb(image: np.ndarray, channels: int = 3) -> torch.Tensor:
    """(H, W) network input -> (C, H, W) float32 tensor, the channel repeated C times (C = 3 for ResNet, or 1).
    A numpy copy: torch's threaded copy of an expanded view was 50x slower on a busy machine."""
    out = np.empty((channels,) + image.shape, dtype=np.float32)
    out[:] = image
    return torch.from_numpy(out)


class DepthDataset(Dataset, abc.ABC):
    """Shared sample logic; subclasses provide `_frame_count`, `_load(j, rng)` and `_describe(j)`.

    `vary_per_epoch=False` freezes the point draw at epoch 0 (validation: a stable score between evaluations).
    With `skip_bad` a frame that fails to load is replaced by the next good one (one warning per process;
    `num_skipped` counts them), so every index still yields a valid sample."""

    def __init__(self, cfg: DataConfig, seed: int, vary_per_epoch: bool = True, skip_bad: bool = False):
        self.cfg = cfg
        self.seed = int(seed)
        # In shared memory: DataLoader workers that persist across epochs (started once, not every epoch)
        # see the trainer's set_epoch through it.
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()
        self.vary_per_epoch = vary_per_epoch
        self.skip_bad = skip_bad
        self.num_skipped = 0
        self._bad: set[int] = set()
        self._warned = False

    def __getstate__(self):
        state = dict(self.__dict__)
        state.pop("_frame_tensors", None)  # the device path's tensors never travel to DataLoader workers
        return state

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose point draw `__getitem__` returns (ignored when vary_per_epoch is False).

        Takes effect in running DataLoader workers too (shared memory); call it between epochs, before the
        loader's next iterator is made, as a sampler's set_epoch."""
        self._epoch.fill_(int(epoch))

    def __len__(self) -> int:
        return self._frame_count()

    def __getitem__(self, i: int) -> dict:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"sample index {i} out of range for a dataset of {n} frames")
        i %= n
        epoch = self.epoch if self.vary_per_epoch else 0
        for step in range(n):
            j = (i + step) % n
            if j in self._bad:
                continue
            try:
                return self._load(j, epoch)
            except BadFrameError as e:
                if not self.skip_bad:
                    raise
                self._bad.add(j)
                self.num_skipped += 1
                if not self._warned:
                    warnings.warn(f"skipping unreadable depth frame ({e}); later ones are skipped silently and "
                                  "counted in dataset.num_skipped", RuntimeWarning, stacklevel=2)
                    self._warned = True
        raise BadFrameError(f"every one of the {n} depth frames of this dataset failed to load "
                            f"(first: {self._describe(i)})")

    @abc.abstractmethod
    def _frame_count(self) -> int:
        ...

    @abc.abstractmethod
    def _load(self, j: int, epoch: int) -> dict:
        ...

    @abc.abstractmethod
    def _describe(self, j: int) -> str:
        ...


class PngDepthDataset(DepthDataset):
    """Decodes each SYNTHIA depth PNG on every access: frames (list of `Frame`) -> samples."""

    def __init__(self, frames: list[Frame], cfg: DataConfig, seed: int, vary_per_epoch: bool = True,
                 skip_bad: bool = False):
        super().__init__(cfg, seed, vary_per_epoch, skip_bad)
        self.frames = list(frames)

    def _frame_count(self) -> int:
        return len(self.frames)

    def _describe(self, j: int) -> str:
        return self.frames[j].path

    def _load(self, j: int, epoch: int) -> dict:
        fr = self.frames[j]
        p = process_depth(read_depth_png(fr.path), self.cfg, fr.rel, fr.path)
        idx = draw_indices(p.counts, self.cfg.points_per_bin, sample_rng(self.seed, epoch, frame_key(fr.rel)))
        return {"image": gray_to_rgb(p.image[0], self.cfg.image_channels), "cloud": torch.from_numpy(p.take(idx)),
                "path": fr.path}


# ------------------------------------------------------------------------------------------------- collate

def collate_depth(samples: list[dict]) -> dict:
    """Samples -> batch: image (B, C, H, W) float32 (C = data.image_channels), cloud (B, N_max, 3) float32
    zero-padded past each cloud's length, lengths (B,) int64, paths list[str] of B."""
    if not samples:
        raise ValueError("collate_depth: got an empty list of samples")
    # numpy copies: single-threaded memcpy, which is what a DataLoader worker runs anyway; torch's threaded
    # copies in the main process (num_workers=0) were up to 15x slower on a busy machine
    images = torch.from_numpy(np.stack([s["image"].numpy() for s in samples]))
    lengths = torch.tensor([s["cloud"].shape[0] for s in samples], dtype=torch.int64)
    cloud = np.zeros((len(samples), int(lengths.max()), 3), dtype=np.float32)
    for b, s in enumerate(samples):
        cloud[b, : s["cloud"].shape[0]] = s["cloud"].numpy()
    cloud = torch.from_numpy(cloud)
    return {"image": images, "cloud": cloud, "lengths": lengths, "paths": [s["path"] for s in samples]}


# ------------------------------------------------------------------------------------------------- builder

def scan_frames(frames: list[Frame], skip_bad: bool) -> list[Frame]:
    """Check every frame's PNG header (cheap: no pixel decode). Bad ones raise `BadFrameError` naming the
    first file and the count, or with `skip_bad` are dropped with one warning. Truncated pixel data and
    all-sky frames are only found when a frame is loaded."""
    good, bad = [], []
    for fr in frames:
        try:
            check_png_header(fr.path)
            good.append(fr)
        except BadFrameError as e:
            bad.append(e)
    if bad and not skip_bad:
        more = f" (and {len(bad) - 1} more bad frames)" if len(bad) > 1 else ""
        raise BadFrameError(f"{bad[0]}{more}; set data.skip_bad_frames=true to skip them")
    if bad:
        warnings.warn(f"skipped {len(bad)} of {len(frames)} depth frames that are not 8-bit RGB PNGs; first: {bad[0]}",
                      RuntimeWarning, stacklevel=2)
    if not good:
        raise BadFrameError(f"no usable depth frame: all {len(frames)} PNGs are bad (first: {bad[0]})")
    return good


def build_datasets(cfg: DataConfig, seed: int, progress: bool = True) -> tuple[DepthDataset, DepthDataset]:
    """(train, val) datasets for `cfg`; `seed` seeds the per-epoch point draws.

    For the synthetic source the scenes are generated on first use (progress bar), and for `format="cache"`
    with the synthetic source the preprocessed form is built on first use too; both under a file lock, so
    several processes may call this at once. The validation dataset ignores `set_epoch` (a fixed draw) and
    may be empty when `val_fraction` is 0."""
    from protodepth.data.cache import open_cache  # cache imports this module

    if cfg.source == "synthetic":
        from protodepth.data.synthetic import ensure_synthetic
        root = ensure_synthetic(cfg, progress=progress)
    else:
        root = cfg.resolved_root()
    if cfg.format == "cache":
        from protodepth.data.cache import CachedDepthDataset
        cache = open_cache(cfg, root, progress=progress)
        train, val = split_indices(cache.sequences, cfg)
        return (CachedDepthDataset(cache, train, cfg, seed, True),
                CachedDepthDataset(cache, val, cfg, seed, False))
    frames = scan_frames(list_frames(root), cfg.skip_bad_frames)
    train, val = split_indices([f.sequence for f in frames], cfg)
    return (PngDepthDataset([frames[i] for i in train], cfg, seed, True, cfg.skip_bad_frames),
            PngDepthDataset([frames[i] for i in val], cfg, seed, False, cfg.skip_bad_frames))

