"""`accelerate launch [--config_file accelerate_configs/multi_gpu.yaml --num_processes N] scripts/benchmark.py scaling`

Data-parallel throughput of the full protodepth training step through Accelerate (DDP, or DeepSpeed with
its config): every process trains on its own random batch (`--batch` per process; default batch 32,
K = P = 16, 240x320, 20 000 targets, bf16), the median step time after warm-up is taken on every rank, and
the slowest rank's median gives samples/s. With `--results FILE` each run appends its figure to a JSON file
and the table printed at the end shows efficiency = samples/s at N / (N x samples/s at 1) for every N
recorded so far. Runs on the CPU too (tiny sizes, for tests): `--cpu-smoke`.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="benchmark.py scaling", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=32, help="per process")
    p.add_argument("--slots", type=int, default=16, help="K = P")
    p.add_argument("--height", type=int, default=240, help="input height")
    p.add_argument("--width", type=int, default=320, help="input width")
    p.add_argument("--targets", type=int, default=20_000, help="target points per image")
    p.add_argument("--ico-level", type=int, default=4, help="icosphere level of the prototypes")
    p.add_argument("--precision", default="bf16", choices=["no", "fp16", "bf16"], help="mixed precision")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (graph capture included)")
    p.add_argument("--repeats", type=int, default=20, help="timed steps; the median is reported")
    p.add_argument("--eager", action="store_true", help="no CUDA graphs (they are on where the run allows them)")
    p.add_argument("--grad-sync", default="overlap", choices=["overlap", "after"],
                   help="several processes without DDP's wrapper (graphed): all-reduce the flat gradient buffer "
                        "bucket by bucket during the backward (the trainer's way) or after it")
    p.add_argument("--results", default=None, help="JSON file to append this run's figure to")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU (tests)")
    args = p.parse_args(argv)
    if args.cpu_smoke:
        args.batch, args.slots, args.height, args.width, args.targets, args.ico_level = 2, 2, 32, 32, 200, 1
        args.precision, args.warmup, args.repeats = "no", 1, 2

    from protodepth.benchmarks.step import as_batch, make_inputs, shape_config, trainer_step
    from protodepth.cuda_graphs import blocker
    from protodepth.training.accel import build_accelerator

    cfg = shape_config(args.batch, args.slots, args.height, args.width, args.targets,
                       {"no": "fp32"}.get(args.precision, args.precision), args.ico_level)
    accelerator = build_accelerator(cfg, "disabled")
    device = accelerator.device
    why_not = blocker(cfg, device, accelerator.distributed_type.name == "DEEPSPEED", accelerator.num_processes)
    graphed = not args.eager and why_not is None
    torch.manual_seed(accelerator.process_index)
    step_fn, model = trainer_step(cfg, graphed, accelerator)
    flat = step_fn.grad_sync is not None
    if flat:
        step_fn.grad_sync.overlap = args.grad_sync == "overlap"  # before the first step: the capture follows it
    image, cloud, lengths = make_inputs(args.batch, args.height, args.width, args.targets, device,
                                        seed=accelerator.process_index)
    if device.type == "cuda":
        image = image.contiguous(memory_format=torch.channels_last)
        torch.backends.cudnn.benchmark = True
    batch = as_batch(image, cloud, lengths)
    counter = iter(range(10**9))

    def step():
        step_fn(batch, next(counter), 0)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(args.warmup):
        step()
    sync()
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    med = torch.tensor([statistics.median(times)], device=device)
    slowest = accelerator.gather(med).max().item()
    n = accelerator.num_processes
    sps = n * args.batch / slowest
    if accelerator.is_main_process:
        name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
        row = {"processes": n, "step_s": slowest, "samples_per_s": sps, "device": name,
               "distributed_type": str(accelerator.distributed_type), "batch_per_process": args.batch,
               "precision": args.precision, "cuda_graphs": graphed,
               "grad_sync": (args.grad_sync if flat else "wrapper") if n > 1 else "-"}
        print(json.dumps(row))
        if args.results:
            path = Path(args.results)
            rows = json.loads(path.read_text()) if path.is_file() else []
            def key(r):
                return r["processes"], r.get("cuda_graphs"), r["distributed_type"], r.get("grad_sync", "-")

            rows = [r for r in rows if key(r) != key(row)] + [row]
            path.write_text(json.dumps(rows, indent=1))
            # efficiency against the fastest one-process figure recorded (the graphed one when it ran)
            base = max((r["samples_per_s"] for r in rows if r["processes"] == 1), default=None)
            print("\n| processes | kind | graphs | gradient all-reduce | step s | samples/s | efficiency vs fastest "
                  "1 process |\n| --- | --- | --- | --- | --- | --- | --- |")
            for r in sorted(rows, key=lambda r: (r["processes"], r["distributed_type"], bool(r.get("cuda_graphs")),
                                                 r.get("grad_sync", "-"))):
                eff = f"{r['samples_per_s'] / (r['processes'] * base):.1%}" if base else "n/a (no 1-process run)"
                print(f"| {r['processes']} | {r['distributed_type']} | {'on' if r.get('cuda_graphs') else 'off'} | "
                      f"{r.get('grad_sync', '-')} | {r['step_s']:.4f} | {r['samples_per_s']:.0f} | {eff} |")
    accelerator.wait_for_everyone()
    step_fn.model = step_fn.optimizer = step_fn.graphed = None  # free the engine before the group ends
    del model
    accelerator.free_memory()
    accelerator.end_training()
    return 0
