"""The per-epoch random choice of target points, identical on every device.

A frame's candidate points are sorted by Z bin (`process_depth`). Each epoch keeps every point of a bin with at
most `cap` points, and `cap` distinct random ones (in ascending order) of a bigger bin. The choice is not drawn
from a random generator: every candidate gets a key from a counter-based hash of (seed, epoch, frame, point
index), computed in int64 torch arithmetic, and a bin keeps its `cap` smallest keys. Integer arithmetic and a sort
of distinct keys give the same answer on the CPU and on a GPU, one frame at a time (DataLoader workers) or a whole
batch at once (the device path), in any order.

Hash: per frame, two 32-bit salts from a splitmix64 of (seed, epoch, frame key) in Python integers; per point,
key = mix32(mix32(index ^ salt_a) ^ salt_b), where mix32 is xor-shift / odd-multiply (a bijection of 32-bit
values, so keys of one frame never tie). Values stay below 2^59 in int64, so nothing overflows.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

_MASK32 = 0xFFFFFFFF
_MASK64 = (1 << 64) - 1
_MUL32 = 0x045D9F3B  # < 2^27: a 32-bit value times it stays < 2^59, exact in int64 on every device


def _mix64(x: int) -> int:
    """splitmix64's finaliser on a Python int (exact, no device involved)."""
    x &= _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A bijection of int64 tensors holding values in [0, 2^32) onto the same range."""
    x = x ^ (x >> 16)
    x = (x * _MUL32) & _MASK32
    x = x ^ (x >> 16)
    x = (x * _MUL32) & _MASK32
    return x ^ (x >> 16)


@dataclass(frozen=True)
class DrawSeed:
    """What one frame's draw depends on: training seed, epoch and the frame's key (`frame_key` of its path)."""

    seed: int
    epoch: int
    key: int

    def salts(self) -> tuple[int, int]:
        h = _mix64(_mix64(_mix64(int(self.seed) & _MASK64) ^ (int(self.epoch) & _MASK64)) ^ (int(self.key) & _MASK64))
        return h & _MASK32, h >> 32


def to_device(a: np.ndarray, device) -> torch.Tensor:
    """A small host array on `device` without waiting for the device: a copy from pageable memory would wait for
    the stream (the training step queued before it), so it goes through pinned memory, asynchronously."""
    t = torch.from_numpy(np.ascontiguousarray(a))
    if torch.device(device).type != "cuda":
        return t
    return t.pin_memory().to(device, non_blocking=True)


def ranges(starts: np.ndarray, lens: np.ndarray, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenated aranges: (values (sum lens,) int64 = starts[k] + 0..lens[k]-1 for k in order, and the k of
    each value). Sizes come from the host arrays, so nothing waits on the device."""
    lens = np.asarray(lens, dtype=np.int64)
    total = int(lens.sum())
    if total == 0:
        empty = torch.zeros(0, dtype=torch.int64, device=device)
        return empty, empty
    ends = np.cumsum(lens)
    pos = torch.arange(total, device=device)
    # the segment of each position = how many segments end at or before it (empty ones included). A binary search
    # per position: repeat_interleave writes each segment from one GPU thread (0.16 ms per batch of the device data
    # path at 32 x 5 bins of ~15 000 candidates, against ~0.01 ms)
    seg = torch.searchsorted(to_device(ends, device), pos, right=True)
    shift = to_device(np.asarray(starts, dtype=np.int64) - (ends - lens), device)
    return pos + shift[seg], seg


def draw_batch(counts: np.ndarray, salts: np.ndarray, cap: int, device) -> tuple[torch.Tensor, np.ndarray]:
    """The draw of B frames: `draw_batch_sorted` on a GPU, frame by frame with the host draw (`draw_indices`,
    faster there than sorts) on the CPU. Same arguments and results as `draw_batch_sorted`."""
    if torch.device(device).type != "cpu":
        return draw_batch_sorted(counts, salts, cap, device)
    counts = np.asarray(counts, dtype=np.int64)
    parts = [draw_indices(c, cap, None, salt) for c, salt in zip(counts, np.asarray(salts, dtype=np.int64))]
    return torch.from_numpy(np.concatenate(parts)), np.minimum(counts, cap).sum(axis=1)


def draw_batch_sorted(counts: np.ndarray, salts: np.ndarray, cap: int, device) -> tuple[torch.Tensor, np.ndarray]:
    """The draw of B frames at once, in torch (one sort; every size comes from the host, so nothing waits for
    the device).

    counts: (B, num_bins) int64 host array, candidates per bin of each frame (bins are contiguous in the frame's
    bin-sorted list); salts: (B, 2) int64 host array (`DrawSeed.salts`); cap: points_per_bin.
    Returns (idx, lengths): idx (M,) int64 on `device`, the chosen indices into each frame's candidate list,
    ascending within a frame, frames one after another; lengths (B,) int64 host array, M = lengths.sum()."""
    counts = np.asarray(counts, dtype=np.int64)
    b, nb = counts.shape
    n = counts.reshape(-1)
    seg_start = (np.cumsum(counts, axis=1) - counts).reshape(-1)  # first candidate of each bin within its frame
    take = np.minimum(n, cap)
    out_start = np.cumsum(take) - take
    lengths = take.reshape(b, nb).sum(axis=1)
    out = torch.empty(int(take.sum()), dtype=torch.int64, device=device)
    full = n <= cap
    if full.any():
        local, _ = ranges(seg_start[full], n[full], device)
        out[ranges(out_start[full], n[full], device)[0]] = local
    over = np.flatnonzero(~full)
    if len(over):
        local, seg = ranges(seg_start[over], n[over], device)
        # two 1-D gathers, not one of (N, 2) rows: PyTorch gathers 16-byte rows with one 32-thread block per row
        # (0.78 ms per batch of the device data path, competing with the training step for the GPU)
        salt = np.asarray(salts, dtype=np.int64)[over // nb]  # (bins over the cap, 2)
        salt_a, salt_b = (to_device(np.ascontiguousarray(salt[:, j]), device)[seg] for j in (0, 1))
        key = _mix32(_mix32(local ^ salt_a) ^ salt_b)
        # one sort groups the bins (high bits) and orders each bin by key (low bits, distinct within a bin)
        order = torch.sort((seg << 32) | key).indices
        first, _ = ranges(np.cumsum(n[over]) - n[over], np.full(len(over), cap), device)
        chosen = local[order[first]].view(len(over), cap).sort(dim=1).values
        out[ranges(out_start[over], np.full(len(over), cap), device)[0]] = chosen.reshape(-1)
    return out, lengths


def _mix32_np(x: np.ndarray) -> np.ndarray:
    """`_mix32` in numpy uint32, in place: uint32 products wrap modulo 2^32, which is what `& _MASK32` does to
    the exact int64 products on the torch side, so the results are the same integers."""
    x ^= x >> np.uint32(16)
    x *= np.uint32(_MUL32)
    x ^= x >> np.uint32(16)
    x *= np.uint32(_MUL32)
    x ^= x >> np.uint32(16)
    return x


def _smallest(key: np.ndarray, cap: int) -> np.ndarray:
    """Positions of the `cap` smallest of distinct uint32 `key` (n > cap), ascending. The keys are uniform, so
    the cap smallest lie below about cap / n of the range: a cut a little above that leaves few to partition
    (if fewer than `cap` pass the cut, every key is partitioned; the answer is the same either way)."""
    n = len(key)
    cut = min(1 << 32, int((cap + 8 * cap ** 0.5 + 64) / n * (1 << 32)))
    pos = np.flatnonzero(key < cut) if cut < (1 << 32) else np.arange(n)
    if len(pos) < cap:
        pos = np.arange(n)
    if len(pos) > cap:
        pos = pos[np.argpartition(key[pos], cap - 1)[:cap]]
    pos.sort()
    return pos


def draw_indices(counts: np.ndarray, cap: int, seed: DrawSeed | None, salts: tuple[int, int] | None = None
                 ) -> np.ndarray:
    """One frame's draw on the host (DataLoader workers): indices (M,) int64 into its bin-sorted candidate list
    with per-bin `counts` (num_bins,): every point of a bin with at most `cap` points, else the `cap` points of
    smallest key, ascending. M = sum(min(counts, cap)). The same indices as that frame's part of `draw_batch`:
    the set of the `cap` smallest of distinct keys is unique, so a partial selection here (numpy, much faster on
    a CPU than a full sort) and a full sort on a GPU agree."""
    a, b = (np.uint32(v) for v in (seed.salts() if salts is None else salts))
    parts, start = [], 0
    for n in np.asarray(counts, dtype=np.int64).tolist():
        if n <= cap:
            parts.append(np.arange(start, start + n, dtype=np.int64))
        else:
            key = np.arange(start, start + n, dtype=np.uint32)
            key ^= a
            key = _mix32_np(key)
            key ^= b
            parts.append(_smallest(_mix32_np(key), cap).astype(np.int64) + start)
        start += n
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
