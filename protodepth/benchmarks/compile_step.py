"""`python scripts/benchmark.py compile`: the training step through torch.compile against the hand-captured graph.

For each shape (step.py's SHAPES) it builds the trainer's own step on a fresh model (`step.trainer_step`) and times
one way of running its forward + loss + backward per mode, the optimizer tail (gradient norm, clipping, the
non-finite guard, fused Adam, the learning rate) staying the trainer's eager tail in every mode:
  graph:            the trainer's hand-captured CUDA graph (protodepth/cuda_graphs.py), what
                    `benchmark.py step --no-eager --cuda-graphs` times;
  default:          model(image) -> proto_depth_loss (prototype regularisers included) under
                    `torch.compile(fullgraph=True)`, the loss's random draws made outside the compiled region
                    (`draw_uniforms`, from the step's seeded generator), backward through AOT autograd's graph;
  reduce-overhead:  the same with mode="reduce-overhead" (Inductor records CUDA graphs of forward and backward);
  max-autotune-no-cudagraphs: the same with that mode (slow to compile: not in the default list).
Per mode: the first step's wall time (for the compiled modes the compile of forward and backward), the wall time
of the remaining warm-up steps (CUDA graph recording), compiled graphs, graph breaks, CUDA-graph skips, the median
step time after warm-up (CUDA events), samples/s, peak memory, the ratio to the graphed step, and the relative
difference between the compiled and the eager loss of one forward (same weights, same draws).
Exit 1 with one line if a compile took longer than --max-compile-s, broke the graph, or compiled again later.
"""
from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
import traceback
from dataclasses import dataclass

import torch

from protodepth.benchmarks.step import SHAPES, as_batch, make_inputs, shape_config, time_steps, trainer_step

MODES = ("graph", "default", "reduce-overhead", "max-autotune-no-cudagraphs")
COMPILED = MODES[1:]


class CompiledForward:
    """The forward, loss and backward of a `TrainStep` with forward + loss under torch.compile(fullgraph=True).

    Installed in place of the step's `_forward_backward(batch, level, seed) -> (scene, loss output)` by
    `compiled_trainer_step`; the step's __call__ (guard, clipping, Adam, learning rate) stays the trainer's.
    mode: "eager" (the same function uncompiled: the reference the tests compare with) or one of COMPILED.
    One process only (no DDP wrapper, no FlatGrads, no DeepSpeed)."""

    def __init__(self, step, mode: str, backend: str = "inductor"):
        if mode != "eager" and mode not in COMPILED:
            raise ValueError(f"mode: expected 'eager' or one of {COMPILED}, got {mode!r}")
        self.step, self.mode = step, mode
        self.primed = False  # reduce-overhead: the geometry's kept buffers made outside the graph pool (_prime)
        module = step.module
        # Accelerate patches forward with its autocast and an fp32 cast of the outputs; the autocast is entered
        # here instead (the same context), and the outputs the loss reads are float32 already
        self.forward = getattr(module, "_original_forward", module.forward)
        precision = step.cfg.train.mixed_precision
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        if mode == "eager":
            self.fn = self.forward_loss
            return
        if step.faces.is_cuda:
            # a static address: reduce-overhead's graphs then read it in place instead of copying it to a
            # placeholder, and the mesh losses' topology cache (keyed by the faces tensor) hits at recording
            torch._dynamo.mark_static_address(step.faces)
        self.fn = torch.compile(self.forward_loss, fullgraph=True, backend=backend,
                                mode=None if mode == "default" else mode)

    def forward_loss(self, image, cloud, lengths, level, draws):
        """TrainStep.forward_loss with the draws as tensors -> (SceneOutput, LossOutput)."""
        from protodepth.loss import proto_depth_loss, start_prototype_terms

        step = self.step
        # under compile the regularisers run inline (no side stream inside a traced graph)
        early = start_prototype_terms(step.module.prototypes(), step.faces, step.cfg.loss)
        with torch.autocast(image.device.type, dtype=self.autocast_dtype or torch.float32,
                            enabled=self.autocast_dtype is not None):
            scene = self.forward(image)
        res = proto_depth_loss(scene.slot_verts, scene.prototypes, step.faces, cloud, lengths, step.cfg.loss,
                               level=level, draws=draws, proto_terms=early)
        return scene, res

    def _prime(self, batch: dict, level) -> None:
        """Make the geometry's kept buffers before Inductor's CUDA-graph trees first run the step.

        The trees' first (warm-up) run allocates from their private memory pool, on their own stream, and then
        checks that every live allocation in the pool is one of the outputs. The mesh losses' topology (cached per
        faces tensor on first use) and the KNN's ticket buffer (kept per stream) would be made there and kept, which
        fails that check ("Detected 15 tensor(s) in the cudagraph pool not tracked as outputs", torch 2.11). One
        eager forward and backward on the trees' stream, outside the pool, makes them first, as the hand-captured
        graph's eager warm-up steps do before its capture."""
        from torch._inductor import cudagraph_trees

        from protodepth.geometry import capture_mode

        device = batch["image"].device
        stream = cudagraph_trees.get_manager(device.index).stream
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream), capture_mode():
            draws = self.draws(batch, level, seed=0)
            _, res = self.forward_loss(batch["image"], batch["cloud"], batch["lengths"], level, draws)
            res.total.backward()
        torch.cuda.current_stream(device).wait_stream(stream)
        self.step.zero_grad()
        self.primed = True

    def draws(self, batch: dict, level, seed: int):
        """This micro-batch's random draws, from the step's generator seeded as the trainer seeds it."""
        from protodepth.loss import draw_uniforms

        step = self.step
        step.gen.manual_seed(seed)
        B, N = batch["cloud"].shape[:2]
        return draw_uniforms(B, step.cfg.model.num_slots, N, level, device=batch["cloud"].device, generator=step.gen)

    def __call__(self, batch: dict, level, seed: int):
        """TrainStep._forward_backward: forward, loss and backward of one micro-batch -> (scene, loss output)."""
        from protodepth.geometry import capture_mode

        if self.mode == "reduce-overhead" and not self.primed and batch["image"].is_cuda:
            self._prime(batch, level)
        draws = self.draws(batch, level, seed)
        if self.mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()  # the previous step's graph outputs are no longer read
        # no host reads in the geometry, as in the hand-captured graph: Inductor's CUDA-graph recording runs the
        # custom ops' bodies, which must not sync (the trainer checks the loss for non-finite values instead)
        with capture_mode():
            scene, res = self.fn(batch["image"], batch["cloud"], batch["lengths"], level, draws)
            self.step.accelerator.backward(res.total)
        return scene, res


def compiled_trainer_step(cfg, mode: str, backend: str = "inductor"):
    """The trainer's eager TrainStep on a fresh one-process model with forward + loss + backward replaced by
    CompiledForward(mode) -> (step, model); step(batch, i, 0) runs one optimizer step as the trainer does."""
    step, model = trainer_step(cfg, graphed=False)
    step._forward_backward = CompiledForward(step, mode, backend)
    return step, model


def needs_cumsum_fallback(version: str) -> bool:
    """Whether this torch's Inductor crashes on the point sampling's face-area cumsum: a split scan (over more than
    128 elements, here 5 120 faces) of a broadcasting input fails in codegen with "list indices must be integers or
    slices, not NoneType" (pytorch#180221, fixed in April 2026; seen with torch 2.11). 2.13 and later have the fix."""
    major, minor = (int(x) for x in version.split("+")[0].split(".")[:2])
    return (major, minor) < (2, 13)


def cumsum_to_aten() -> None:
    """Inductor calls ATen's cumsum (one kernel) instead of generating its own, for this process."""
    from torch._inductor import lowering

    lowering.make_fallback(torch.ops.aten.cumsum.default, warn=False)


@dataclass
class Row:
    shape: str
    mode: str
    first_s: float  # wall time of the first step (compile of forward and backward for the compiled modes)
    warmup_s: float  # wall time of the other warm-up steps (CUDA graph capture / recording)
    graphs: int  # graphs dynamo compiled (1 = no recompile); 0 for the hand graph
    breaks: int  # graph breaks (fullgraph=True makes any an error)
    cudagraph_skips: int  # Inductor's reasons for not recording CUDA graphs (reduce-overhead)
    median_s: float
    samples_per_s: float
    peak_gib: float
    late_graphs: int = 0  # graphs compiled during the timed steps (recompiles)
    loss_rel_diff: float | None = None  # |compiled loss - eager loss| / |eager loss|, same weights and draws


def _dynamo_counts() -> tuple[int, int, int]:
    from torch._dynamo.utils import counters

    return (counters["stats"]["unique_graphs"], sum(counters["graph_break"].values()),
            counters["inductor"].get("cudagraph_skips", 0))


def _synced_wall(fn) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def bench_mode(name: str, mode: str, args, device) -> Row:
    """Build the trainer's step for shape `name` and time it in `mode` (one of MODES)."""
    B, K, H, W, N = SHAPES[name]
    image, cloud, lengths = make_inputs(B, H, W, N, device)
    batch = as_batch(image.contiguous(memory_format=torch.channels_last), cloud, lengths)
    cfg = shape_config(B, K, H, W, N, args.precision, args.ico_level)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    step, _ = trainer_step(cfg, graphed=True) if mode == "graph" else compiled_trainer_step(cfg, mode, args.backend)
    counter = iter(range(10**9))

    def one():
        step(batch, next(counter), 0)

    torch.cuda.reset_peak_memory_stats()
    first = _synced_wall(one)
    print(f"  {name} {mode}: first step {first:.1f} s", flush=True)  # what a run cut short still says
    warm = _synced_wall(lambda: [one() for _ in range(args.warmup - 1)])
    print(f"  {name} {mode}: {args.warmup - 1} more warm-up steps {warm:.1f} s", flush=True)
    graphs, breaks, skips = _dynamo_counts()
    times = time_steps(one, 0, args.repeats)
    med = statistics.median(times)
    row = Row(name, mode, first, warm, graphs, breaks, skips, med, B / med,
              torch.cuda.max_memory_allocated() / 2**30, _dynamo_counts()[0] - graphs)
    if mode != "graph":
        try:  # a diagnostic: its failure must not cost the timings above
            row.loss_rel_diff = loss_against_eager(step, batch)
        except Exception:
            traceback.print_exc(file=sys.stdout)
            row.loss_rel_diff = float("nan")
    if args.compile_times and mode != "graph":
        print(torch._dynamo.utils.compile_times(repr="str", aggregate=True), flush=True)
    del step, batch
    gc.collect()
    torch._dynamo.reset()  # frees reduce-overhead's graph pools before the next mode
    torch.cuda.empty_cache()
    return row


def loss_against_eager(step, batch: dict) -> float:
    """|compiled - eager| / |eager| of the total loss of one forward on `batch`, same weights, same draws (batch
    norm normalises by the batch in training mode, so its running statistics, updated by both, do not matter)."""
    from protodepth.geometry import capture_mode

    cf = step._forward_backward
    level = step.levels(0)
    draws = cf.draws(batch, level, seed=0)
    args = (batch["image"], batch["cloud"], batch["lengths"], level, draws)
    if cf.mode == "reduce-overhead":
        torch.compiler.cudagraph_mark_step_begin()
    with capture_mode():
        got = float(cf.fn(*args)[1].total.detach())
        want = float(cf.forward_loss(*args)[1].total.detach())
    return abs(got - want) / abs(want)


def problems(row: Row, max_compile_s: float) -> list[str]:
    """What makes a compiled mode's row a failure: too slow a compile, a graph break, a later recompile."""
    if row.mode == "graph":
        return []
    out = []
    if row.first_s > max_compile_s:
        out.append(f"{row.shape} {row.mode}: the first step (compile) took {row.first_s:.0f} s, over "
                   f"--max-compile-s {max_compile_s:.0f}")
    if row.breaks:
        out.append(f"{row.shape} {row.mode}: {row.breaks} graph breaks")
    if row.graphs != 1 or row.late_graphs:
        out.append(f"{row.shape} {row.mode}: {row.graphs} graphs compiled in warm-up, {row.late_graphs} more "
                   "while timed (recompiles)")
    return out


HEADER = ("| shape | mode | first step s (compile) | other warm-up s | graphs | breaks | cudagraph skips | "
          "median ms/step | samples/s | peak GiB | step / graph step | loss vs eager |\n"
          "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")


def format_row(row: Row, reference: Row | None) -> str:
    B, K, H, W, N = SHAPES[row.shape]
    ratio = f"{row.median_s / reference.median_s:.2f}" if reference is not None else "-"
    diff = "-" if row.loss_rel_diff is None else f"{row.loss_rel_diff:.1e}"
    return (f"| B={B} K=P={K} {H}x{W} N={N} | {row.mode} | {row.first_s:.1f} | {row.warmup_s:.1f} | {row.graphs} | "
            f"{row.breaks} | {row.cudagraph_skips} | {row.median_s * 1e3:.2f} | {row.samples_per_s:.0f} | "
            f"{row.peak_gib:.2f} | {ratio} | {diff} |")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="benchmark.py compile", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=["b32", "b2"], choices=list(SHAPES), help="shapes to time")
    p.add_argument("--modes", nargs="+", default=list(MODES[:3]), choices=list(MODES),
                   help="ways of running the step, in this order (the ratio column needs graph)")
    p.add_argument("--precision", default="bf16", choices=["fp32", "bf16"], help="autocast precision")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first, the first one included (>= 3: "
                   "reduce-overhead records its graphs on its second and third calls)")
    p.add_argument("--repeats", type=int, default=20, help="timed steps; the median is reported")
    p.add_argument("--ico-level", type=int, default=4, help="icosphere level of the prototypes")
    p.add_argument("--max-compile-s", type=float, default=120.0,
                   help="fail when a compiled mode's first step (its compile) takes longer (the issue's 2 minutes)")
    p.add_argument("--backend", default="inductor", help="torch.compile backend of the compiled modes (inductor; "
                   "aot_eager isolates tracing problems from Inductor's)")
    p.add_argument("--compile-times", action="store_true", help="print dynamo's compile-time breakdown per mode")
    args = p.parse_args(argv)
    if args.warmup < 3:
        p.error("--warmup must be >= 3")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmark.py compile needs a CUDA GPU")
        return 2
    device = torch.device("cuda")
    torch.backends.cudnn.benchmark = True
    print(f"GPU: {torch.cuda.get_device_name()}  torch {torch.__version__}  backend {args.backend}  {args.precision}"
          f"  ico level {args.ico_level}  warm-up {args.warmup}  repeats {args.repeats}", flush=True)
    if args.backend == "inductor" and needs_cumsum_fallback(torch.__version__):
        cumsum_to_aten()
        print(f"torch {torch.__version__}: cumsum through ATen (Inductor's split-scan codegen bug, pytorch#180221)")
    failures, t0 = [], time.time()
    print(HEADER, flush=True)
    for name in args.shapes:
        reference = None
        for mode in args.modes:
            try:
                row = bench_mode(name, mode, args, device)
            except Exception as e:  # a graph break under fullgraph=True, a failed recording: the table goes on
                msg = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
                failures.append(f"{name} {mode}: {type(e).__name__}: {msg}")
                traceback.print_exc(file=sys.stdout)  # the log is all a remote run leaves
                print(f"| {name} | {mode} | failed after {time.time() - t0:.0f} s: {type(e).__name__} | "
                      "| | | | | | | | |", flush=True)
                gc.collect()
                torch._dynamo.reset()
                torch.cuda.empty_cache()
                continue
            reference = row if mode == "graph" else reference
            failures += problems(row, args.max_compile_s)
            print(format_row(row, reference), flush=True)
    print(f"\n({time.time() - t0:.0f} s in all)", flush=True)
    if failures:
        print(f"compile benchmark FAILED: {'; '.join(failures)}", file=sys.stderr)
        return 1
    return 0
