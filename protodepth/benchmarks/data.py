"""Data loading throughput: samples/s against DataLoader worker count, PNG path vs preprocessed (cache) path,
and the device path (the cache as tensors on the GPU, batches gathered there: `protodepth.data.DeviceBatches`).

    python scripts/benchmark.py data                      # 1080x1920 frames (SYNTHIA's size) -> 240x320 input,
                                                          # 5 bins x 4000 points, workers 0..16 up to the CPU count
    python scripts/benchmark.py data --workers 0,2 --frames 8 --seconds 2
    python scripts/benchmark.py data --paths device --frame-size 240x320 --frames 64   # the device path only

The frames are built-in synthetic scenes rendered at `--frame-size` into `--dir` (once), so the PNG path decodes
PNGs as large as SYNTHIA's; the cache is built from them with scripts/prepare_data.py's code. Each figure is
the median over `--repeats` runs of steady-state samples/s (from the first batch to the end, so worker
start-up is excluded; the start-up time is a column of its own).
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch
from torch.utils.data import DataLoader, RandomSampler

from protodepth.data import DataConfig, build_datasets, collate_depth
from protodepth.data.cache import open_cache
from protodepth.data.synthetic import ensure_synthetic


def _size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HxW such as 240x320, got {text!r}") from None
    return h, w


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="benchmark.py data", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, default=32, help="synthetic frames to render (default 32)")
    p.add_argument("--frame-size", type=_size, default=(1080, 1920), help="depth PNG size HxW (default 1080x1920)")
    p.add_argument("--input", type=_size, default=(240, 320), help="network input HxW (default 240x320)")
    p.add_argument("--num-bins", type=int, default=5, help="depth bins of the target cloud (data.num_bins)")
    p.add_argument("--points-per-bin", type=int, default=4000, help="target points drawn per bin (data.points_per_bin)")
    p.add_argument("--pool-per-bin", type=int, default=0,
                   help="data.pool_per_bin of both paths (default 0: all points)")
    p.add_argument("--batch-size", type=int, default=32, help="samples per batch")
    p.add_argument("--image-channels", type=int, default=3, choices=[1, 3],
                   help="data.image_channels: 3 (default, the trainer's contract) or 1 (a third of the image bytes)")
    p.add_argument("--workers", default=None,
                   help="comma-separated worker counts (default: those of 0,1,2,4,8,16 not above the CPU count)")
    p.add_argument("--paths", default="png,cache,device",
                   help="which paths to measure, comma-separated: png, cache (DataLoader workers), device (the cache "
                        "on --device, no workers)")
    p.add_argument("--device", default=None,
                   help="device of the device path (default cuda when available, else cpu)")
    p.add_argument("--seconds", type=float, default=4.0, help="steady-state time per measurement (default 4)")
    p.add_argument("--repeats", type=int, default=3, help="measurements per cell; the median is reported")
    p.add_argument("--pin-memory", choices=["auto", "yes", "no"], default="auto",
                   help="DataLoader pin_memory; auto: when CUDA is available, as the trainer does")
    p.add_argument("--dir", default=None, help="where frames and cache go (default data_cache/bench-<frame size>)")
    return p.parse_args(argv)


def measure(ds, workers: int, batch_size: int, seconds: float, pin: bool) -> tuple[float, float]:
    """(steady-state samples/s, seconds until the first batch) of one pass of a fresh DataLoader."""
    sampler = RandomSampler(ds, replacement=True, num_samples=10**9)
    dl = DataLoader(ds, batch_size=batch_size, sampler=sampler, num_workers=workers, collate_fn=collate_depth,
                    persistent_workers=False, prefetch_factor=4 if workers else None, pin_memory=pin)
    t0 = time.perf_counter()
    it = iter(dl)
    next(it)
    t1 = time.perf_counter()
    n, t = 0, t1
    while t - t1 < seconds or n < 2 * batch_size:
        n += next(it)["image"].shape[0]
        t = time.perf_counter()
    del it
    return n / (t - t1), t1 - t0


def measure_device(ds, batch_size: int, seconds: float, device: str) -> tuple[float, float]:
    """(steady-state samples/s, seconds until the first batch, including moving the data to the device) of the
    device path over `ds`, epoch after epoch; each timing waits for the device to finish its queued work."""
    from protodepth.data.loaders import DeviceBatches

    def sync():
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)
    ds.__dict__.pop("_frame_tensors", None)  # include the upload in the first-batch time, as a fresh run does
    ds.cache.__dict__.pop("_device_arrays", None)
    t0 = time.perf_counter()
    batches = DeviceBatches(ds, batch_size, seed=0, rank=0, world=1, device=device)
    epoch = 0
    it = batches.epoch(epoch)
    next(it)
    sync()
    t1 = time.perf_counter()
    n, t = 0, t1
    while t - t1 < seconds or n < 2 * batch_size:
        b = next(it, None)
        if b is None:
            epoch += 1
            it = batches.epoch(epoch)
            continue
        n += b["image"].shape[0]
        if n % (8 * batch_size) == 0:
            sync()
        t = time.perf_counter()
    sync()
    return n / (time.perf_counter() - t1), t1 - t0


def main(argv: list[str]) -> int:
    a = parse_args(argv)
    cpus = os.cpu_count() or 1
    workers = ([int(w) for w in a.workers.split(",")] if a.workers
               else [w for w in (0, 1, 2, 4, 8, 16) if w <= cpus])
    paths = [p.strip() for p in a.paths.split(",") if p.strip()]
    if not set(paths) <= {"png", "cache", "device"}:
        raise SystemExit(f"--paths: expected some of png, cache, device, got {a.paths!r}")
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    pin = torch.cuda.is_available() if a.pin_memory == "auto" else a.pin_memory == "yes"
    fh, fw = a.frame_size
    base = a.dir or os.path.join("data_cache", f"bench-{fh}x{fw}")
    common = dict(source="synthetic", root=os.path.join(base, "frames"), height=a.input[0], width=a.input[1],
                  num_bins=a.num_bins, points_per_bin=a.points_per_bin, pool_per_bin=a.pool_per_bin,
                  synthetic_num_scenes=a.frames, synthetic_sequences=1, synthetic_height=fh, synthetic_width=fw,
                  val_fraction=0.0, image_channels=a.image_channels)
    cfgs = {"png": DataConfig(**common),
            "cache": DataConfig(**common, format="cache",
                                cache_dir=os.path.join(base, f"cache-{a.input[0]}x{a.input[1]}"))}
    t = time.perf_counter()
    ensure_synthetic(cfgs["png"])
    if "cache" in paths or "device" in paths:
        open_cache(cfgs["cache"], cfgs["cache"].resolved_root())
    print(f"data ready in {time.perf_counter() - t:.1f} s")

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    print(f"\nCPU: {cpu}, {cpus} cores visible; torch {torch.__version__}; {a.frames} frames of {fh}x{fw} -> "
          f"{a.image_channels}x{a.input[0]}x{a.input[1]} input, {a.num_bins} bins x {a.points_per_bin} points, "
          f"batch {a.batch_size}, "
          f"pin_memory {pin}, median of {a.repeats} x {a.seconds:g} s\n")
    rows = ["| path | workers | samples/s | first batch (s) |", "| --- | ---: | ---: | ---: |"]
    print("\n".join(rows), flush=True)
    for path in paths:
        ds, _ = build_datasets(cfgs["cache" if path == "device" else path], seed=0, progress=False)
        if path == "device":
            runs = [measure_device(ds, a.batch_size, a.seconds, device) for _ in range(a.repeats)]
            row = (f"| device ({device}) | 0 | {statistics.median(r[0] for r in runs):,.0f} | "
                   f"{statistics.median(r[1] for r in runs):.2f} |")
            rows.append(row)
            print(row, flush=True)
            continue
        for w in workers:
            runs = [measure(ds, w, a.batch_size, a.seconds, pin) for _ in range(a.repeats)]
            rate = statistics.median(r[0] for r in runs)
            first = statistics.median(r[1] for r in runs)
            row = f"| {path} | {w} | {rate:,.0f} | {first:.2f} |"
            rows.append(row)
            print(row, flush=True)
    return 0
