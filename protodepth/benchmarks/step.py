"""`python scripts/benchmark.py step`: full protodepth training step vs the ResNet-50-only step, same run.

For each shape and precision it times, after warm-up, the median of repeated optimizer steps (CUDA events):
  backbone: ResNet-50 + the slot head, a trivial loss on the head's output, backward, Adam;
  full:     the protodepth step: forward + posing, point sampling, hybrid Chamfer + regularisers, backward, Adam.
The ratio full / backbone is the overhead protodepth adds on top of the network it cannot avoid.
Inputs are random images and random target clouds (the step's cost does not depend on their content);
`--loader` adds the step fed by the real DataLoader over the preprocessed cache.
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
            profile(kinds[-1][1], f"{name}-{precision} graphed")
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


def profile(step_fn, label: str, top: int = 15) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    with tprofile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            step_fn()
        torch.cuda.synchronize()
    print(f"\n### profile {label}: top {top} CUDA kernels over 3 steps\n")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=top, max_name_column_width=60))


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="benchmark.py step", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
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
    if args.json:
        with open(args.json, "w") as fh:
            json.dump([r.__dict__ for r in rows], fh, indent=1)
    return 0
