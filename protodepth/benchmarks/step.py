"""`python scripts/benchmark.py step`: full protodepth training step vs the ResNet-50-only step, same run.

For each shape and precision it times, after warm-up, the median of repeated optimizer steps (CUDA events):
  backbone: ResNet-50 + the slot head, a trivial loss on the head's output, backward, Adam;
  full:     the protodepth step: forward + posing, point sampling, hybrid Chamfer + regularisers, backward, Adam.
The ratio full / backbone is the overhead protodepth adds on top of the network it cannot avoid.
Inputs are random images and random target clouds (the step's cost does not depend on their content);
`--cuda-graphs` adds both steps replayed from CUDA graphs (the trainer's `train.cuda_graphs`), `--profile` the top
kernels of the B=32 step and, with graphs, what the full step adds to the backbone kernel by kernel, `--loader` the
step fed by the real DataLoader over the preprocessed cache (does the GPU wait?).
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


def build(K: int, level: int, compile_model: bool, device, fused: bool = True):
    from protodepth.config import LossConfig, ModelConfig
    from protodepth.model import ProtoDepth

    cfg = ModelConfig(num_slots=K, num_prototypes=K, ico_level=level)
    model = ProtoDepth(cfg).to(device).to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4, fused=device.type == "cuda" if fused else None)
    if compile_model:
        model = torch.compile(model)
    return model, opt, LossConfig()


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
    from protodepth.loss import proto_depth_loss

    B, K, H, W, N = SHAPES[name]
    dtype = {"fp32": None, "bf16": torch.bfloat16}[precision]
    image, cloud, lengths = make_inputs(B, H, W, N, device)
    image = image.contiguous(memory_format=torch.channels_last)
    results = []

    model, opt, loss_cfg = build(K, args.ico_level, args.compile, device, fused=args.adam == "fused")
    core = model._orig_mod if hasattr(model, "_orig_mod") else model
    faces = core.faces

    def backbone_step():
        with torch.autocast("cuda", dtype=dtype, enabled=dtype is not None):
            out = core.head(core.backbone(image))
        loss = out.float().square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def full_step():
        with torch.autocast("cuda", dtype=dtype, enabled=dtype is not None):
            scene = model(image)
        res = proto_depth_loss(scene.slot_verts, scene.prototypes, faces, cloud, lengths, loss_cfg)
        res.total.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    kinds = [("backbone", backbone_step), ("full", full_step)]
    if args.cuda_graphs:
        kinds += graphed_steps(core, model, opt, faces, loss_cfg, image, cloud, lengths, dtype)
    for kind, fn in kinds:
        torch.cuda.reset_peak_memory_stats()
        times = time_steps(fn, args.warmup, args.repeats)
        med = statistics.median(times)
        results.append(Result(name, precision, kind, med, B / med, torch.cuda.max_memory_allocated() / 2**30))
    if args.profile and name == "b32":
        profile(full_step, f"{name}-{precision}")
        if args.cuda_graphs:
            full_k = profile(kinds[-1][1], f"{name}-{precision} graphed")
            back_k = kernel_times(kinds[-2][1])
            print(f"\n### what the full step adds to the backbone-only step ({name}-{precision}, both graphed): "
                  "GPU ms per step by kernel, largest first\n")
            print("| kernel | full ms | backbone ms | added ms |\n| --- | --- | --- | --- |")
            diff = sorted(set(full_k) | set(back_k), key=lambda k: back_k.get(k, 0) - full_k.get(k, 0))
            for k in diff[:20]:
                print(f"| {k[:80]} | {full_k.get(k, 0):.3f} | {back_k.get(k, 0):.3f} | "
                      f"{full_k.get(k, 0) - back_k.get(k, 0):+.3f} |")
            print(f"| total | {sum(full_k.values()):.3f} | {sum(back_k.values()):.3f} | "
                  f"{sum(full_k.values()) - sum(back_k.values()):+.3f} |")
    del model, opt
    torch.cuda.empty_cache()
    return results


def graphed_steps(core, model, opt, faces, loss_cfg, image, cloud, lengths, dtype):
    """The backbone-only and the full step with forward + loss + backward replayed from CUDA graphs (the trainer's
    `train.cuda_graphs`); the optimizer step stays eager, as in the trainer."""
    from protodepth.cuda_graphs import GraphedStep
    from protodepth.loss import proto_depth_loss

    gen = torch.Generator(device=image.device)
    params = list(model.parameters())

    def backbone_fn(img, cl, ln, key, g):
        with torch.autocast("cuda", dtype=dtype, enabled=dtype is not None):
            out = core.head(core.backbone(img))
        loss = out.float().square().mean()
        return loss, loss

    def full_fn(img, cl, ln, key, g):
        with torch.autocast("cuda", dtype=dtype, enabled=dtype is not None):
            scene = model(img)
        res = proto_depth_loss(scene.slot_verts, scene.prototypes, faces, cl, ln, loss_cfg, generator=g)
        return res.total, res.total

    steps = []
    for kind, fn in (("backbone-graph", backbone_fn), ("full-graph", full_fn)):
        graphed = GraphedStep(fn, params, gen, max_points=cloud.shape[1])

        def step(graphed=graphed):
            graphed(image, cloud, lengths, (), seed=0)
            opt.step()
            opt.zero_grad(set_to_none=True)

        steps.append((kind, step))
    return steps


def bench_loader(args, device) -> None:
    """The B=32 step of configs/throughput_b32.yaml fed by the real DataLoader over the preprocessed cache.

    Times `args.loader_steps` steps three ways, wall clock: the step on one batch already on the GPU (the ceiling),
    the step fed by the loader (what training gets), and the loader alone (next() + copy to the GPU). The GPU
    waits when the loader alone is slower than the step. Each way once eager and once with CUDA graphs.
    """
    from torch.utils.data import DataLoader

    from protodepth.config import load_config
    from protodepth.cuda_graphs import GraphedStep
    from protodepth.data import build_datasets, collate_depth
    from protodepth.loss import proto_depth_loss
    from protodepth.model import ProtoDepth

    cfg = load_config(args.loader_config, {})
    train_ds, _ = build_datasets(cfg.data, seed=0)
    dl = DataLoader(train_ds, batch_size=cfg.train.batch_size, shuffle=True, drop_last=True, collate_fn=collate_depth,
                    num_workers=cfg.data.num_workers, pin_memory=True, persistent_workers=True, prefetch_factor=4)
    model = ProtoDepth(cfg.model).to(device).to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.optim.lr, fused=True)
    dtype = torch.bfloat16 if cfg.train.mixed_precision == "bf16" else None
    full_points = cfg.data.num_bins * cfg.data.points_per_bin
    gen = torch.Generator(device=device)

    def fn(image, cloud, lengths, key, g):
        with torch.autocast("cuda", dtype=dtype, enabled=dtype is not None):
            scene = model(image)
        res = proto_depth_loss(scene.slot_verts, scene.prototypes, model.faces, cloud, lengths, cfg.loss, generator=g)
        return res.total.detach(), res.total

    graphed = GraphedStep(fn, list(model.parameters()), gen, max_points=full_points)

    def step(batch, use_graph: bool, i: int):
        if use_graph:
            loss = graphed(batch["image"], batch["cloud"], batch["lengths"], (), seed=i)
        else:
            gen.manual_seed(i)
            loss, total = fn(batch["image"], batch["cloud"], batch["lengths"], (), gen)
            total.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    def to_gpu(b):
        return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in b.items()}

    def batches():
        while True:
            yield from dl

    it = batches()
    fixed = to_gpu(next(it))
    n = args.loader_steps
    print(f"\n### step fed by the DataLoader ({args.loader_config}: B={cfg.train.batch_size}, "
          f"{cfg.data.height}x{cfg.data.width}, {cfg.data.image_channels}-channel, {cfg.data.num_workers} workers, "
          f"{len(train_ds)} frames, {n} steps each)\n")
    print("| step | on one GPU batch, samples/s | fed by the loader, samples/s | loader alone, samples/s | "
          "GPU waits? |\n| --- | --- | --- | --- | --- |")
    for use_graph in (False, True):
        for i in range(5):  # warm-up (graph capture included)
            step(fixed, use_graph, i)
        rates = []
        for mode in ("fixed", "loader", "loader-only"):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for i in range(n):
                batch = fixed if mode == "fixed" else to_gpu(next(it))
                if mode != "loader-only":
                    step(batch, use_graph, i)
            torch.cuda.synchronize()
            rates.append(n * cfg.train.batch_size / (time.perf_counter() - t0))
        waits = "yes" if rates[1] < 0.95 * rates[0] else "no"
        print(f"| {'CUDA graphs' if use_graph else 'eager'} | {rates[0]:.0f} | {rates[1]:.0f} | {rates[2]:.0f} | "
              f"{waits} ({rates[1] / rates[0]:.0%} of the ceiling) |", flush=True)


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
    p.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--ico-level", type=int, default=4)
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--adam", default="fused", choices=["fused", "foreach"], help="Adam implementation")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="also time both steps replayed from CUDA graphs (the trainer's train.cuda_graphs)")
    p.add_argument("--profile", action="store_true", help="print the top CUDA kernels of the b32 full step")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("--loader", action="store_true",
                   help="also time the step fed by the real DataLoader over the preprocessed cache")
    p.add_argument("--loader-config", default="configs/throughput_b32.yaml", help="config of the --loader run")
    p.add_argument("--loader-steps", type=int, default=50)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmark.py step needs a CUDA GPU")
        return 2
    device = torch.device("cuda")
    torch.backends.cudnn.benchmark = True
    print(f"GPU: {torch.cuda.get_device_name()}  torch {torch.__version__}  ico level {args.ico_level}"
          f"  compile {args.compile}  adam {args.adam}")
    rows: list[Result] = []
    t0 = time.time()
    for name in args.shapes:
        for prec in args.precisions:
            rows.extend(bench_shape(name, prec, args, device))
            print(f"  {name} {prec} done ({time.time() - t0:.0f} s)", flush=True)
    print("\n| shape | precision | step | backbone s/step | full s/step | full / backbone | full samples/s | "
          "backbone peak GiB | full peak GiB |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    by = {(r.shape, r.precision, r.kind): r for r in rows}
    for name in args.shapes:
        B, K, H, W, N = SHAPES[name]
        for prec in args.precisions:
            pairs = [("eager", "backbone", "full")]
            if args.cuda_graphs:
                pairs += [("graph", "backbone-graph", "full-graph"), ("graph vs eager backbone", "backbone", "full-graph")]
            for label, bk, fk in pairs:
                b, f = by[(name, prec, bk)], by[(name, prec, fk)]
                print(f"| B={B} K=P={K} {H}x{W} N={N} | {prec} | {label} | {b.median_s:.4f} | {f.median_s:.4f} | "
                      f"{f.median_s / b.median_s:.2f} | {f.samples_per_s:.0f} | {b.peak_gib:.2f} | {f.peak_gib:.2f} |")
    if args.loader:
        bench_loader(args, device)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump([r.__dict__ for r in rows], fh, indent=1)
    return 0
