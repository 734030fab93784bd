"""How batches reach the training step: the batch order shared by both paths, the device path, and the choices
the trainer makes about them.

- `EpochShuffleSampler`: the order of one epoch, a function of (seed, epoch) only.
- `DeviceBatches`: the device path. The whole dataset (a preprocessed cache, or PNG frames processed once) lives
  as tensors on the training device; a batch is an index gather plus the per-epoch point draw (`draw.py`) made
  there. No worker processes, no host-to-device copy per batch. It yields exactly the batches of the DataLoader
  path (`DataLoader(dataset, sampler=EpochShuffleSampler, batch_size, drop_last, collate_fn=collate_depth)`
  sharded by Accelerate) for the same seed and epoch, on every rank.
- `choose_data_device(cfg, dataset, device)`: applies `data.device` ("auto" | "cpu" | "cuda").
- `workers_per_process(cfg, local_world_size)`: applies `data.num_workers` ("auto" or a count).

The trainer's use:

    choice = choose_data_device(cfg.data, train_ds, accelerator.device); log(choice.reason)
    if choice == "cuda":
        batches = DeviceBatches(train_ds, batch_size, seed, rank, world, accelerator.device)
        for batch in batches.epoch(epoch, start=batch_in_epoch): ...
    else:
        DataLoader(train_ds, sampler=EpochShuffleSampler(len(train_ds), seed), drop_last=True,
                   num_workers=workers_per_process(cfg.data, local_world_size), ...)
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import BatchSampler, Sampler

from protodepth.data.config import DataConfig
from protodepth.data.draw import DrawSeed, draw_batch, ranges, to_device
from protodepth.errors import BadFrameError, ConfigError, DataSetupError


class EpochShuffleSampler(Sampler[int]):
    """A permutation of range(n) that depends only on (seed, epoch) (`shuffle=False`: range(n) in order).

    Accelerate shards the batches of this order across ranks, and `skip_first_batches` resumes inside an
    epoch, so a resumed run sees exactly the batches an uninterrupted one would. `DeviceBatches` uses the same
    order."""

    def __init__(self, n: int, seed: int, shuffle: bool = True):
        self.n, self.seed, self.shuffle, self.epoch = n, seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        if not self.shuffle:
            return iter(range(self.n))
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


def rank_batches(n: int, batch_size: int, seed: int, epoch: int, rank: int, world: int, drop_last: bool = True,
                 shuffle: bool = True) -> list[list[int]]:
    """This rank's batches (lists of dataset indices) of `epoch`, as the trainer's DataLoader yields them after
    `accelerator.prepare`: batches of the epoch's order, then, on several processes, Accelerate's
    `BatchSamplerShard` with its defaults (split_batches=False, even_batches=True): rank r takes global batches
    r, r + world, ...; with drop_last a last round that does not give every rank a batch is dropped. Built with
    those very classes, so the rule is Accelerate's own."""
    sampler = EpochShuffleSampler(n, seed, shuffle)
    sampler.set_epoch(epoch)
    batches = BatchSampler(sampler, batch_size, drop_last)
    if world > 1:
        from accelerate.data_loader import BatchSamplerShard
        batches = BatchSamplerShard(batches, num_processes=world, process_index=rank)
    return [list(b) for b in batches]


# ------------------------------------------------------------------------------------------- device tensors

@dataclass
class FrameTensors:
    """A dataset as tensors. images (F, H, W) in the storage dtype and points (P, 3) float32 on the device;
    offsets (F, num_bins + 1) int64 host (bin b of row f is points[offsets[f, b]:offsets[f, b + 1]]), keys (F,)
    the frames' draw keys; rows (n,) and paths (n,): the row and the file of dataset index j."""

    images: torch.Tensor
    points: torch.Tensor
    offsets: np.ndarray
    keys: np.ndarray
    rows: np.ndarray
    paths: list[str]


def _cache_tensors(ds, device) -> FrameTensors:
    cache = ds.cache
    store = cache.__dict__.setdefault("_device_arrays", {})  # the whole cache once per device (train + val share it)
    dev = str(torch.device(device))
    if dev not in store:
        maps = cache.maps()
        # np.array: a private, writable copy (the maps are read-only); the device copy is made from it
        store[dev] = (torch.from_numpy(np.array(maps["images"])).to(device),
                      torch.from_numpy(np.array(maps["points"])).to(device))
    images, points = store[dev]
    return FrameTensors(images, points, cache.offsets, np.asarray(cache.keys, dtype=np.int64),
                        np.asarray(ds.indices, dtype=np.int64), [ds._describe(j) for j in range(len(ds))])


def _png_tensors(ds, device) -> FrameTensors:
    """Every frame of a PNG dataset processed once. A bad frame stops with its BadFrameError, or with
    skip_bad_frames stands for the next good one, as `DepthDataset.__getitem__` does."""
    from protodepth.data.synthia import frame_key, process_depth, read_depth_png
    images, points, offsets, good, total = [], [], [], [], 0
    for j, fr in enumerate(ds.frames):
        try:
            p = process_depth(read_depth_png(fr.path), ds.cfg, fr.rel, fr.path)
        except BadFrameError:
            if not ds.skip_bad:
                raise
            continue
        images.append(torch.from_numpy(p.image[0]))
        points.append(torch.from_numpy(p.points))
        offsets.append(total + np.concatenate([[0], np.cumsum(p.counts)]))
        total += int(p.counts.sum())
        good.append(j)
    if not good:
        raise BadFrameError(f"every one of the {len(ds.frames)} depth frames of this dataset failed to load "
                            f"(first: {ds.frames[0].path})")
    n = len(ds.frames)
    # dataset index j -> the first good frame at or after j (cyclically), and that frame's row
    nxt = {j: k for k, j in enumerate(good)}
    rows, paths = np.zeros(n, dtype=np.int64), []
    for j in range(n):
        k = next(nxt[(j + s) % n] for s in range(n) if (j + s) % n in nxt)
        rows[j] = k
        paths.append(ds.frames[good[k]].path)
    keys = np.asarray([frame_key(ds.frames[j].rel) for j in good], dtype=np.int64)
    return FrameTensors(torch.stack(images).to(device), torch.cat(points).to(device), np.stack(offsets), keys,
                        rows, paths)


def frame_tensors(ds, device) -> FrameTensors:
    """The tensors of a `CachedDepthDataset` or `PngDepthDataset` on `device` (made once per dataset)."""
    store = ds.__dict__.setdefault("_frame_tensors", {})
    dev = str(torch.device(device))
    if dev not in store:
        store[dev] = _cache_tensors(ds, device) if hasattr(ds, "cache") else _png_tensors(ds, device)
    return store[dev]


# ---------------------------------------------------------------------------------------------- the batches

class DeviceBatches:
    """This rank's batches of each epoch, assembled on `device` from tensors that live there.

    `batch_size` per process, `seed` the shuffle seed (the trainer's train.seed; the point draws use the
    dataset's own seed), `rank` / `world` the process index and count. The dataset's `vary_per_epoch=False`
    (validation) freezes the draw at epoch 0, as in the DataLoader path. `shuffle=False` keeps index order."""

    def __init__(self, dataset, batch_size: int, seed: int, rank: int, world: int, device, drop_last: bool = True,
                 shuffle: bool = True):
        self.dataset, self.batch_size, self.seed = dataset, int(batch_size), int(seed)
        self.rank, self.world, self.drop_last, self.shuffle = int(rank), int(world), drop_last, shuffle
        self.device = torch.device(device)
        self.tensors = frame_tensors(dataset, self.device)
        self.cap = dataset.cfg.points_per_bin
        self.channels = dataset.cfg.image_channels

    def _batches(self, epoch: int) -> list[list[int]]:
        return rank_batches(len(self.dataset), self.batch_size, self.seed, epoch, self.rank, self.world,
                            self.drop_last, self.shuffle)

    @property
    def batches_per_epoch(self) -> int:
        """Batches per epoch on this rank (the same every epoch)."""
        return len(self._batches(0))

    def __len__(self) -> int:
        return self.batches_per_epoch

    def epoch(self, epoch: int, start: int = 0) -> Iterator[dict]:
        """This rank's batches of `epoch` from batch `start` on (to resume inside an epoch): dicts like
        `collate_depth`'s, image (B, C, H, W) float32, cloud (B, N_max, 3) float32 zero-padded, lengths (B,)
        int64, paths list[str]; tensors on the device."""
        draw_epoch = epoch if self.dataset.vary_per_epoch else 0
        batches = self._batches(epoch)[start:]
        if self.device.type != "cuda":
            for idx in batches:
                yield self.batch(idx, draw_epoch)
            return
        yield from self._prefetched(batches, draw_epoch)

    def _prefetched(self, batches: list[list[int]], epoch: int) -> Iterator[dict]:
        """On a GPU, batch k+1 is assembled on a side stream while the consumer's step k runs: the gathers and
        the draw's sort overlap the training step instead of queueing behind it on one stream."""
        side, main = torch.cuda.Stream(self.device), torch.cuda.current_stream(self.device)

        def assemble(idx):
            side.wait_stream(main)  # what it reads is final (the dataset's first copies to the device were on main)
            with torch.cuda.stream(side):
                b = self.batch(idx, epoch)
                ready = torch.cuda.Event()
                ready.record(side)
            return b, ready

        nxt = assemble(batches[0]) if batches else None
        for k in range(len(batches)):
            cur, ready = nxt
            nxt = assemble(batches[k + 1]) if k + 1 < len(batches) else None
            main.wait_event(ready)
            for v in cur.values():
                if torch.is_tensor(v):
                    v.record_stream(main)  # made on the side stream, used on the main one
            yield cur

    def batch(self, indices: list[int], epoch: int) -> dict:
        """The batch of dataset indices `indices` with the point draw of `epoch`."""
        t, dev = self.tensors, self.device
        rows = t.rows[np.asarray(indices, dtype=np.int64)]
        off = t.offsets[rows]
        seed = self.dataset.seed
        salts = np.array([DrawSeed(seed, epoch, int(k)).salts() for k in t.keys[rows]], dtype=np.int64)
        local, lengths = draw_batch(np.diff(off, axis=1), salts, self.cap, dev)
        b, n_max = len(rows), int(lengths.max())
        # drawn point k of frame i goes to padded row i * n_max + k and comes from that frame's first point + local
        dest, seg = ranges(np.arange(b, dtype=np.int64) * n_max, lengths, dev)
        src = local + to_device(off[:, 0], dev)[seg]
        cloud = torch.zeros(b * n_max, 3, dtype=torch.float32, device=dev)
        cloud[dest] = t.points[src]
        image = t.images[to_device(rows, dev)].to(torch.float32).unsqueeze(1)
        image = image.expand(-1, self.channels, -1, -1).contiguous()
        return {"image": image, "cloud": cloud.view(b, n_max, 3),
                "lengths": to_device(lengths.astype(np.int64), dev),
                "paths": [t.paths[j] for j in indices]}


# ------------------------------------------------------------------------------------------------- choices

class DataDevice(str):
    """"cpu" or "cuda" (compares and prints as that string), with `.reason`: one line for the trainer's log."""

    reason: str

    def __new__(cls, value: str, reason: str):
        obj = super().__new__(cls, value)
        obj.reason = reason
        return obj


def estimate_bytes(cfg: DataConfig, dataset) -> int:
    """Bytes the dataset takes as device tensors: the whole cache, or for PNG frames their input images plus
    an upper bound on their candidate points (every pixel, or the pool cap)."""
    if hasattr(dataset, "cache"):
        return dataset.cache.nbytes
    from protodepth.data.synthia import check_png_header
    total = 0
    for fr in dataset.frames:
        h, w = check_png_header(fr.path)
        pts = min(h * w, cfg.num_bins * cfg.pool_per_bin) if cfg.pool_per_bin else h * w
        total += 4 * cfg.height * cfg.width + 12 * pts + 8 * (cfg.num_bins + 1)
    return total


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def choose_data_device(cfg: DataConfig, dataset, device) -> DataDevice:
    """Apply `data.device` for training on `device`: "cuda" (the device path, `DeviceBatches`) or "cpu" (the
    DataLoader path). "auto" picks the device path for a preprocessed cache or the synthetic source when the
    data takes less than a quarter of the GPU's free memory. The result's `.reason` says why, in one line."""
    device = torch.device(device)
    on_gpu = device.type == "cuda"
    if cfg.device == "cpu":
        return DataDevice("cpu", "data.device=cpu: batches come from DataLoader workers")
    if not on_gpu:
        if cfg.device == "cuda":
            raise ConfigError(f"data.device: got 'cuda' but training runs on {device.type}; use 'auto' or 'cpu'")
        return DataDevice("cpu", f"data: training on {device.type}, batches come from DataLoader workers")
    if cfg.device == "auto" and cfg.format != "cache" and cfg.source != "synthetic":
        return DataDevice("cpu", "data.device=auto: PNG folders are decoded by DataLoader workers "
                                 "(data.format=cache moves the data to the GPU)")
    need = estimate_bytes(cfg, dataset)
    free, _ = torch.cuda.mem_get_info(device)
    if cfg.device == "cuda":
        if need > free:
            raise DataSetupError(f"data.device: the data needs {_gib(need)} on the GPU, which has {_gib(free)} free; "
                                 "use data.device=auto or cpu")
        return DataDevice("cuda", f"data.device=cuda: the data ({_gib(need)}) lives on the GPU, no worker processes")
    if need * 4 > free:
        return DataDevice("cpu", f"data.device=auto: the data ({_gib(need)}) is more than a quarter of the GPU's free "
                                 f"memory ({_gib(free)}), batches come from DataLoader workers")
    return DataDevice("cuda", f"data.device=auto: the data ({_gib(need)}) lives on the GPU, batches are gathered "
                              "there, no worker processes")


def usable_cpus() -> int:
    """CPU cores this process may run on (its affinity mask, which job schedulers set), else the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def workers_per_process(cfg: DataConfig, local_world_size: int) -> int:
    """DataLoader workers for each training process: `data.num_workers` if a number; "auto": the cores per
    process on this machine less one (for the training process itself), at least 1 and at most 8 (more only
    contend for memory bandwidth: BENCHMARKS.md, data loading)."""
    if cfg.num_workers != "auto":
        return int(cfg.num_workers)
    return max(1, min(8, usable_cpus() // max(1, int(local_world_size)) - 1))
