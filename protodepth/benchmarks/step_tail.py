"""`python scripts/benchmark.py step --tail`: the optimizer tail of the graphed step, eager against captured.

The trainer replays forward + loss + backward from a CUDA graph, then runs the tail eagerly: float64 gradient
norm, clipping, finite flags, fused Adam, the learning rate. This measures, on the B=32 bf16 shape:
- the trainer's step as it is: GPU time of the replay and of the tail (CUDA events around each), host time
  spent launching each, and the wall time per step of 50 steps back to back (no sync between steps): if that
  equals the GPU time per step, the host tail is hidden behind the replay;
- the same tail captured in a second CUDA graph (fused, capturable Adam with the learning rate as a tensor).
"""
from __future__ import annotations

import statistics
import time

import torch


class _MarkAfter:
    """Wraps the step's GraphedStep: records a CUDA event and a host time right after each replay is launched."""

    def __init__(self, inner):
        self.inner, self.event, self.host = inner, None, 0.0

    def __call__(self, *args, **kwargs):
        out = self.inner(*args, **kwargs)
        self.host = time.perf_counter()
        self.event = torch.cuda.Event(enable_timing=True)
        self.event.record()
        return out


def _split_times(run, mark: _MarkAfter, repeats: int) -> dict[str, float]:
    """Median ms of: GPU replay, GPU tail, host launching the replay, host running the tail."""
    rows = []
    for i in range(repeats):
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        t0 = time.perf_counter()
        run(i)
        t1 = time.perf_counter()
        end.record()
        end.synchronize()
        rows.append((start.elapsed_time(mark.event), mark.event.elapsed_time(end), (mark.host - t0) * 1e3,
                     (t1 - mark.host) * 1e3))
    names = ("gpu_replay_ms", "gpu_tail_ms", "host_replay_ms", "host_tail_ms")
    return {n: statistics.median(r[j] for r in rows) for j, n in enumerate(names)}


def _back_to_back_ms(run, steps: int = 50) -> float:
    """Wall ms per step of `steps` steps queued without a sync between them."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(steps):
        run(i)
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3 / steps


class CapturedTail:
    """Gradient norm (float64), clipping, the finite flag and a fused capturable Adam step, in one CUDA graph.

    params: the parameters whose `.grad` are the graphed step's static gradients (the same tensors each replay).
    """

    def __init__(self, params: list[torch.nn.Parameter], lr: float, betas, weight_decay: float, clip: float):
        from protodepth.training.step import grad_norm

        self.params = [p for p in params if p.grad is not None]
        dev = self.params[0].device
        self.lr = torch.tensor(lr, device=dev)
        self.opt = torch.optim.Adam(self.params, lr=self.lr, betas=tuple(betas), weight_decay=weight_decay,
                                    fused=True, capturable=True)
        self.opt.found_inf = torch.zeros((), device=dev)  # fused Adam skips the step where it is 1
        self.norm = torch.zeros((), dtype=torch.float64, device=dev)

        def tail():
            grads = [p.grad for p in self.params]
            self.norm.copy_(grad_norm(self.params))
            if clip > 0:
                torch._foreach_mul_(grads, (clip / (self.norm + 1e-6)).clamp(max=1.0).float())
            self.opt.found_inf.copy_((~torch.isfinite(self.norm)).float())
            self.opt.step()

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: Adam's state exists before the capture
            for _ in range(3):
                tail()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            tail()

    def __call__(self, lr: float) -> None:
        self.lr.fill_(lr)  # the schedule's rate for this step: one tiny kernel outside the graph
        self.graph.replay()


def bench_tail(args, device) -> dict:
    """Print and return the eager-tail and captured-tail figures of the b32 bf16 graphed step."""
    from protodepth.benchmarks.step import SHAPES, as_batch, make_inputs, shape_config, trainer_step

    B, K, H, W, N = SHAPES["b32"]
    cfg = shape_config(B, K, H, W, N, "bf16", args.ico_level)
    image, cloud, lengths = make_inputs(B, H, W, N, device)
    batch = as_batch(image.contiguous(memory_format=torch.channels_last), cloud, lengths)
    step, _ = trainer_step(cfg, graphed=True)
    for i in range(args.warmup):
        step(batch, i, 0)
    mark = _MarkAfter(step.graphed)
    step.graphed = mark
    eager = _split_times(lambda i: step(batch, i, 0), mark, args.repeats)
    eager["back_to_back_ms"] = _back_to_back_ms(lambda i: step(batch, i, 0))

    level, o = step.levels(0), cfg.optim
    mark(batch["image"], batch["cloud"], batch["lengths"], level, seed=0)  # the static gradients are on the params
    tail = CapturedTail(step.params, o.lr, o.betas, o.weight_decay, o.grad_clip)

    def graphed_step(i):
        mark(batch["image"], batch["cloud"], batch["lengths"], level, seed=i)
        tail(o.lr)

    captured = _split_times(graphed_step, mark, args.repeats)
    captured["back_to_back_ms"] = _back_to_back_ms(graphed_step)
    print(f"\n### the optimizer tail of the graphed step (B={B} K=P={K} {H}x{W} bf16, median of {args.repeats})\n")
    print("| tail | GPU replay ms | GPU tail ms | host: launch replay ms | host: tail ms | back to back, ms/step |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, r in (("eager (the trainer's)", eager), ("captured (capturable fused Adam)", captured)):
        print(f"| {name} | {r['gpu_replay_ms']:.3f} | {r['gpu_tail_ms']:.3f} | {r['host_replay_ms']:.3f} | "
              f"{r['host_tail_ms']:.3f} | {r['back_to_back_ms']:.3f} |")
    return {"eager": eager, "captured": captured}
