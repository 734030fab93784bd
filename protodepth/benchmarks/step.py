"""`python scripts/benchmark.py step`: full protodepth training step vs the ResNet-50-only step, same run.

For each shape and precision it times, after warm-up, the median of repeated optimizer steps (CUDA events):
  backbone: ResNet-50 + the slot head, a trivial loss on the head's output, backward, Adam;
  full:     the protodepth step: forward + posing, point sampling, hybrid Chamfer + regularisers, backward, Adam.
The ratio full / backbone is the overhead protodepth adds on top of the network it cannot avoid.
Inputs are random images and random target clouds (the step's cost does not depend on their content);
`--cuda-graphs` adds both steps replayed from CUDA graphs (the trainer's `train.cuda_graphs`), `--profile` the top
kernels of the B=32 step and, with graphs, what the full step adds to the backbone kernel by kernel, `--loader` the
step fed by the real DataLoader over the preprocessed cache (does the GPU wait?), `--tail` the optimizer tail of the
graphed step eager against captured in a CUDA graph (protodepth/benchmarks/step_tail.py).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass

import torch

SHAPES = {
    # name: (batch, K=P, H, W, targets)
    "b2": (2, 32, 480, 640, 10_000),
    "b8": (8, 32, 480, 640, 10_000),
    "b32": (32, 16, 240, 320, 20_000),
}


@dataclass
class Result:
    shape: str
    precision: str
    kind: str
    median_s: float
    samples_per_s: float
    peak_gib: float


def make_inputs(B: int, H: int, W: int, N: int, device, seed: int = 0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    image = torch.rand(B, 3, H, W, generator=g)
    # targets spread like a street scene in front of the camera: x, y in +-20 m, z in -60..-3 m
    cloud = torch.rand(B, N, 3, generator=g) * torch.tensor([40.0, 20.0, 57.0]) - torch.tensor([20.0, 10.0, 60.0])
    lengths = torch.full((B,), N, dtype=torch.int64)
    return image.to(device), cloud.to(device), lengths.to(device)


def shape_config(B: int, K: int, H: int, W: int, N: int, precision: str, level: int, compile_model: bool = False):
    """A trainer config for one benchmark shape: batch B, K = P slots, H x W input, N target points."""
    from protodepth.config import load_config

    return load_config(None, {
        "model.num_slots": K, "model.num_prototypes": K, "model.ico_level": level, "model.channels_last": True,
        "data.height": H, "data.width": W, "data.num_bins": 1, "data.points_per_bin": N,
        "train.batch_size": B, "train.mixed_precision": {"fp32": "no"}.get(precision, precision),
        "train.compile": compile_model, "train.wandb": "disabled",
    })


def trainer_step(cfg, graphed: bool, accelerator=None):
    """The trainer's own TrainStep on a fresh model: what every full-step figure times. `accelerator`: the
    launched run's (several processes, DeepSpeed); None makes a fresh one-process Accelerator.
    -> (step, model); step(batch, i, 0) runs forward, loss, backward, sync, clipping and Adam as in training."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState, PartialState

    from protodepth.training.nonfinite import NonFiniteGuard
    from protodepth.training.run import model_and_optimizer, prepare_for_training
    from protodepth.training.step import TrainStep

    acc = accelerator
    if acc is None:
        AcceleratorState._reset_state(True)  # a fresh Accelerator per precision
        GradientState._reset_state()
        PartialState._reset_state()
        acc = Accelerator(mixed_precision=cfg.train.mixed_precision)
    deepspeed = acc.distributed_type.name == "DEEPSPEED"
    model, opt = model_and_optimizer(cfg, deepspeed=deepspeed)
    model, opt, _, sync = prepare_for_training(cfg, acc, model, opt, [], flat=graphed and acc.num_processes > 1)
    guard = NonFiniteGuard.for_run(cfg, acc, opt, deepspeed=deepspeed)
    faces = acc.unwrap_model(model).faces.to(acc.device)
    step = TrainStep(cfg, acc, model, opt, faces, graphed=graphed, grad_sync=sync, guard=guard, deepspeed=deepspeed)
    return step, model


def as_batch(image, cloud, lengths) -> dict:
    return {"image": image, "cloud": cloud, "lengths": lengths, "paths": ["benchmark"] * image.shape[0]}


def time_steps(step_fn, warmup: int, repeats: int) -> list[float]:
    for _ in range(warmup):
        step_fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step_fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return times


def bench_shape(name: str, precision: str, args, device) -> list[Result]:
    B, K, H, W, N = SHAPES[name]
    dtype = {"fp32": None, "bf16": torch.bfloat16}[precision]
    image, cloud, lengths = make_inputs(B, H, W, N, device)
    batch = as_batch(image.contiguous(memory_format=torch.channels_last), cloud, lengths)
    cfg = shape_config(B, K, H, W, N, precision, args.ico_level, args.compile)
    results, kinds = [], []
    for graphed in _step_modes(args):
        step, model = trainer_step(cfg, graphed)
        core = model._orig_mod if hasattr(model, "_orig_mod") else model
        counter = iter(range(10**9))
        suffix = "-graph" if graphed else ""
        kinds += [(f"backbone{suffix}", backbone_step(core, step.optimizer, batch["image"], dtype, graphed)),
                  (f"full{suffix}", lambda step=step, counter=counter: step(batch, next(counter), 0))]
    for kind, fn in kinds:
        torch.cuda.reset_peak_memory_stats()
        times = time_steps(fn, args.warmup, args.repeats)
        med = statistics.median(times)
        results.append(Result(name, precision, kind, med, B / med, torch.cuda.max_memory_allocated() / 2**30))
    if args.profile and name == "b32":
        by_kind = dict(kinds)
        if "full" in by_kind:
            profile(by_kind["full"], f"{name}-{precision}")
        if args.cuda_graphs or args.no_eager:
            kernel_diff(by_kind["full-graph"], by_kind["backbone-graph"], f"{name}-{precision}")
    torch.cuda.empty_cache()
    return results


def _step_modes(args) -> list[bool]:
    """graphed? for each way of running the steps: eager, graphed (--cuda-graphs), or graphed alone (--no-eager)."""
    if args.no_eager:
        return [True]
    return [False, True] if args.cuda_graphs else [False]


def kernel_diff(full_step, backbone_step_fn, label: str) -> None:
    full_k = profile(full_step, f"{label} graphed")
    back_k = kernel_times(backbone_step_fn)
    print(f"\n### what the full step adds to the backbone-only step ({label}, both graphed): "
          "GPU ms per step by kernel, largest first\n")
    print("| kernel | full ms | backbone ms | added ms |\n| --- | --- | --- | --- |")
    diff = sorted(set(full_k) | set(back_k), key=lambda k: back_k.get(k, 0) - full_k.get(k, 0))
    for k in diff[:20]:
        print(f"| {k[:80]} | {full_k.get(k, 0):.3f} | {back_k.get(k, 0):.3f} | {full_k.get(k, 0) - back_k.get(k, 0):+.3f} |")
    print(f"| total | {sum(full_k.values()):.3f} | {sum(back_k.values()):.3f} | "
          f"{sum(full_k.values()) - sum(back_k.values()):+.3f} |")


def backbone_step(core, opt, image, dtype, graphed: bool):
    """The reference: ResNet-50 + slot head with a trivial loss, backward and Adam; eager or graphed like the
    trainer's step (its own step: there is no geometry to share)."""
    from protodepth.cuda_graphs import GraphedStep

    def fn(img, cl, ln, key, g):
        with torch.autocast("cuda", dtype=dtype, enabled=dtype is not None):
            out = core.head(core.backbone(img))
        loss = out.float().square().mean()
        return loss.detach(), loss

    graph = GraphedStep(fn, list(core.parameters()), torch.Generator(device=image.device), max_points=1) \
        if graphed else None
    dummy_cloud = torch.zeros(image.shape[0], 1, 3, device=image.device)
    dummy_len = torch.ones(image.shape[0], dtype=torch.int64, device=image.device)

    def step():
        if graph is not None:
            graph(image, dummy_cloud, dummy_len, (), seed=0)
        else:
            fn(image, None, None, (), None)[1].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def bench_loader(args, device) -> None:
    """The trainer's step on configs/throughput_b32.yaml fed by its data paths.

    Times `args.loader_steps` steps, wall clock: the step on one batch already on the GPU (the ceiling), the
    step fed by DataLoader workers over the preprocessed cache, the step fed by the on-GPU data path
    (data.device=cuda), the step fed by that path's batches made beforehand (what assembling costs the step), and
    each source alone; then the GPU time of one on-GPU assembly. Once eager and once with CUDA graphs (only graphed with
    --no-eager; the graphed "on one GPU batch" rate is the ceiling the trainer on that config is held to)."""
    from protodepth.config import load_config
    from protodepth.data import build_datasets
    from protodepth.data.loaders import DeviceBatches, workers_per_process
    from protodepth.training.batches import data_loader

    cfg = load_config(args.loader_config, {})
    train_ds, _ = build_datasets(cfg.data, seed=0)
    workers = workers_per_process(cfg.data, 1)
    dl = data_loader(train_ds, cfg, workers, shuffle=True, train=True)
    on_gpu = DeviceBatches(train_ds, cfg.train.batch_size, 0, 0, 1, device)
    assembled = list(on_gpu.epoch(0))  # one epoch's batches made beforehand: the step fed without assembling
    sources = {"workers": lambda: _forever(lambda: (_to_gpu(b, device) for b in dl)),
               "on-GPU data": lambda: _forever(lambda: on_gpu.epoch(0)),
               "on-GPU data, assembled beforehand": lambda: _forever(lambda: iter(assembled))}
    n, B = args.loader_steps, cfg.train.batch_size
    print(f"\n### the trainer's step fed by its data paths ({args.loader_config}: B={B}, {cfg.data.height}x"
          f"{cfg.data.width}, {cfg.data.image_channels}-channel, {workers} workers, {len(train_ds)} frames, "
          f"{n} steps each)\n")
    print("| step | source | on one GPU batch, samples/s | fed by the source, samples/s | source alone, samples/s |"
          " fed / on one batch |\n| --- | --- | --- | --- | --- | --- |")
    for graphed in (True,) if args.no_eager else (False, True):
        step, _ = trainer_step(cfg, graphed)
        for name, make in sources.items():
            it = make()
            fixed = next(it)
            for i in range(5):  # warm-up (graph capture included)
                step(fixed, i, 0)
            rates = [_rate(lambda i: step(fixed, i, 0), n, B), _rate(lambda i: step(next(it), i, 0), n, B),
                     _rate(lambda i: next(it), n, B)]
            print(f"| {'CUDA graphs' if graphed else 'eager'} | {name} | {rates[0]:.0f} | {rates[1]:.0f} | "
                  f"{rates[2]:.0f} | {rates[1] / rates[0]:.0%} |", flush=True)
    # what assembling a batch on the GPU costs the step beside which it runs: its kernels' device time
    batches = _forever(lambda: on_gpu.epoch(0))
    kernels = kernel_times(lambda: next(batches), steps=10)
    top = sorted(kernels.items(), key=lambda kv: -kv[1])[:3]
    print(f"\none on-GPU batch assembled: {sum(kernels.values()):.3f} GPU ms of kernels; largest: "
          + "; ".join(f"{ms:.3f} {name[:60]}" for name, ms in top))


def _rate(fn, n: int, batch: int) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(n):
        fn(i)
    torch.cuda.synchronize()
    return n * batch / (time.perf_counter() - t0)


def _forever(make_iter):
    while True:
        yield from make_iter()


def _to_gpu(b: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in b.items()}


def _profile_steps(step_fn, steps: int):
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    with tprofile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step_fn()
        torch.cuda.synchronize()
    return prof


def _kernel_ms(prof, steps: int) -> dict[str, float]:
    """GPU kernel name -> ms per step (self CUDA time of device-side events only: no double count via CPU ops)."""
    out: dict[str, float] = {}
    for e in prof.key_averages():
        if e.device_type == torch.autograd.DeviceType.CUDA and e.self_device_time_total > 0:
            out[e.key] = out.get(e.key, 0.0) + e.self_device_time_total / 1000 / steps
    return out


def kernel_times(step_fn, steps: int = 3) -> dict[str, float]:
    """GPU kernel name -> ms per step over `steps` profiled steps."""
    return _kernel_ms(_profile_steps(step_fn, steps), steps)


def profile(step_fn, label: str, top: int = 15) -> dict[str, float]:
    """Print the top CUDA kernels of 3 steps; return kernel_times of the same profile."""
    prof = _profile_steps(step_fn, 3)
    print(f"\n### profile {label}: top {top} CUDA kernels over 3 steps\n")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=top, max_name_column_width=60))
    return _kernel_ms(prof, 3)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="benchmark.py step", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES), help="shapes to time (none: only --loader)")
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"], help="precisions to time")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (graph capture included)")
    p.add_argument("--repeats", type=int, default=20, help="timed steps; the median is reported")
    p.add_argument("--ico-level", type=int, default=4, help="icosphere level of the prototypes")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--adam", default="fused", choices=["fused", "foreach"], help="Adam implementation")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="also time both steps replayed from CUDA graphs (the trainer's train.cuda_graphs)")
    p.add_argument("--no-eager", action="store_true", help="time only the graphed steps (implies --cuda-graphs)")
    p.add_argument("--tail", action="store_true",
                   help="also time the graphed step's optimizer tail (norm, clipping, flags, Adam) eager against "
                        "captured in a CUDA graph")
    p.add_argument("--profile", action="store_true", help="print the top CUDA kernels of the b32 full step")
    p.add_argument("--ablate", nargs="+", default=None, metavar="VARIANT",
                   help="instead of the tables above: the graphed step (bf16) with parts of the geometry replaced "
                        "by stand-ins, e.g. full noknn noproto noknn+noproto; 'alone': the prototype regularisers "
                        "by themselves (protodepth/benchmarks/step_ablation.py)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("--loader", action="store_true",
                   help="also time the step fed by the real DataLoader over the preprocessed cache")
    p.add_argument("--loader-config", default="configs/throughput_b32.yaml", help="config of the --loader run")
    p.add_argument("--loader-steps", type=int, default=50, help="steps per way of the --loader run")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmark.py step needs a CUDA GPU")
        return 2
    device = torch.device("cuda")
    torch.backends.cudnn.benchmark = True
    print(f"GPU: {torch.cuda.get_device_name()}  torch {torch.__version__}  ico level {args.ico_level}"
          f"  compile {args.compile}  adam {args.adam}")
    if args.ablate:
        from protodepth.benchmarks.step_ablation import run_ablation

        run_ablation(args.ablate, args, device)
        return 0
    rows: list[Result] = []
    t0 = time.time()
    for name in args.shapes:
        for prec in args.precisions:
            rows.extend(bench_shape(name, prec, args, device))
            print(f"  {name} {prec} done ({time.time() - t0:.0f} s)", flush=True)
    print("\n| shape | precision | step | backbone ms/step | full ms/step | full / backbone | full samples/s | "
          "backbone peak GiB | full peak GiB |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    by = {(r.shape, r.precision, r.kind): r for r in rows}
    for name in args.shapes:
        B, K, H, W, N = SHAPES[name]
        for prec in args.precisions:
            graph = [("graph", "backbone-graph", "full-graph")]
            pairs = graph if args.no_eager else [("eager", "backbone", "full")]
            if args.cuda_graphs and not args.no_eager:
                pairs += graph + [("graph vs eager backbone", "backbone", "full-graph")]
            for label, bk, fk in pairs:
                b, f = by[(name, prec, bk)], by[(name, prec, fk)]
                print(f"| B={B} K=P={K} {H}x{W} N={N} | {prec} | {label} | {b.median_s * 1e3:.2f} | {f.median_s * 1e3:.2f} | "
                      f"{f.median_s / b.median_s:.3f} | {f.samples_per_s:.0f} | {b.peak_gib:.2f} | {f.peak_gib:.2f} |")
    if args.loader:
        bench_loader(args, device)
    if args.tail:
        from protodepth.benchmarks.step_tail import bench_tail

        bench_tail(args, device)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump([r.__dict__ for r in rows], fh, indent=1)
    return 0
