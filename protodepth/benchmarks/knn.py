"""KNN benchmark: `python scripts/benchmark.py knn [--dtypes fp32 bf16] [--shapes ...] [--no-torch] [--out FILE]`.

Times `knn_points_triton` and the blocked PyTorch fallback (`knn._knn_points_torch`) in the same run, forward and
forward+backward (gradients of dists.sum() w.r.t. both clouds), as the median of `triton.testing.do_bench` repeats
(CUDA events, L2 flushed between repeats), on random normal clouds; also the kernel's forward+backward captured in
a CUDA graph and replayed (what the trainer's captured step pays: no launch or Python cost). Prints a markdown
table beside PyTorch3D's anchors (`knn_points`, float32, one H100, from the original system's measurements) and,
with --out, writes JSON. `--profile`: device work items per call and per-kernel times; `--host`: cProfile.
`--step-pair`: the training step's two searches as the step runs them (knn_pair.py).
`--compare --impl LABEL=module:function ...`: several implementations timed in one process on the same inputs
(eager fwd, eager fwd+bwd, graphed fwd+bwd) with their agreement (indices that differ where distances do not tie,
gradients); any importable knn with PyTorch3D's `knn_points` call convention can be the reference.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys

import torch

# name -> (N, P1, P2, K, PyTorch3D fwd ms, PyTorch3D fwd+bwd ms) measured on one H100 (original-system.md)
SHAPES = {
    "1x10000x6400": (1, 10000, 6400, 1, 0.82, 0.89),
    "64x200x10000": (64, 200, 10000, 1, 1.24, 1.40),
    "8x50000x16000": (8, 50000, 16000, 1, 13.5, 13.5),
    "32x20000x16000": (32, 20000, 16000, 1, 19.5, 20.0),
    "32x20000x3200-K3": (32, 20000, 3200, 3, None, None),  # global loss: targets -> predictions, k = 3
    "32x3200x20000": (32, 3200, 20000, 1, None, None),  # the other Chamfer direction: predictions -> targets
    # small shapes of issue 17, where eager calls are bound by host time
    "4x5000x5000-K8": (4, 5000, 5000, 8, None, None),
    "2x3000x3000-K1": (2, 3000, 3000, 1, None, None),
    "2x3000x3000-K8": (2, 3000, 3000, 8, None, None),
    "2x3000x3000-K16": (2, 3000, 3000, 16, None, None),
    "2x3000x3000-K32": (2, 3000, 3000, 32, None, None),
}
# `--compare` default: the seven shapes of issue 17 and K = 1..32 on the smallest
COMPARE = ["1x10000x6400", "64x200x10000", "8x50000x16000", "32x20000x16000", "32x20000x3200-K3", "4x5000x5000-K8",
           "2x3000x3000-K32", "2x3000x3000-K1", "2x3000x3000-K8", "2x3000x3000-K16"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _bench(fn, rep_ms: float) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=max(10.0, rep_ms / 4), rep=rep_ms, return_mode="median"))


def agreement(N, P1, P2, K, dtype, seed=0):
    """Fraction of idx equal between the kernel and the torch path, and their max |dists| difference."""
    from protodepth.geometry.knn import _knn_points_torch
    from protodepth.geometry.knn_triton import knn_points_triton

    g = torch.Generator(device="cuda").manual_seed(seed + 1)
    p1 = torch.randn(N, P1, 3, device="cuda", generator=g).to(dtype)
    p2 = torch.randn(N, P2, 3, device="cuda", generator=g).to(dtype)
    l1 = torch.full((N,), P1, dtype=torch.int64, device="cuda")
    l2 = torch.full((N,), P2, dtype=torch.int64, device="cuda")
    with torch.no_grad():
        d1, i1 = knn_points_triton(p1, p2, l1, l2, K, 2)
        d2, i2 = _knn_points_torch(p1, p2, l1, l2, K, 2)
    return float((i1 == i2).double().mean()), float((d1.double() - d2.double()).abs().max())


def time_one(impl, N, P1, P2, K, dtype, rep_ms=200.0, seed=0, fwd_only=False):
    """Median ms of forward and of forward+backward for impl(p1, p2, lengths1, lengths2, K, norm, sorted)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    p1 = torch.randn(N, P1, 3, device="cuda", generator=g).to(dtype)
    p2 = torch.randn(N, P2, 3, device="cuda", generator=g).to(dtype)
    l1 = torch.full((N,), P1, dtype=torch.int64, device="cuda")
    l2 = torch.full((N,), P2, dtype=torch.int64, device="cuda")

    def fwd():
        impl(p1, p2, l1, l2, K, 2)

    a = p1.clone().requires_grad_()
    b = p2.clone().requires_grad_()

    def fwd_bwd():
        d, _ = impl(a, b, l1, l2, K, 2)
        torch.autograd.grad(d.sum(), (a, b))

    with torch.no_grad():
        t_fwd = _bench(fwd, rep_ms)
    if fwd_only:
        return t_fwd, None
    t_fb = _bench(fwd_bwd, rep_ms)
    return t_fwd, t_fb


def time_graph(impl, N, P1, P2, K, dtype, rep_ms=200.0, seed=0):
    """Median ms of one replay of forward+backward captured in a CUDA graph, as the trainer runs it: launch and
    Python costs gone, only the device work left. None when impl cannot be captured (it syncs with the host)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    a = torch.randn(N, P1, 3, device="cuda", generator=g).to(dtype).requires_grad_()
    b = torch.randn(N, P2, 3, device="cuda", generator=g).to(dtype).requires_grad_()
    l1 = torch.full((N,), P1, dtype=torch.int64, device="cuda")
    l2 = torch.full((N,), P2, dtype=torch.int64, device="cuda")

    def fwd_bwd():
        d, _ = impl(a, b, l1, l2, K, 2)
        return torch.autograd.grad(d.sum(), (a, b))

    return _graph_ms(fwd_bwd, rep_ms)


def launches(impl, N, P1, P2, K, dtype, calls=5):
    """(device work items per forward, per forward+backward, host wall ms per synchronised fwd+bwd call)."""
    import time

    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    a = torch.randn(N, P1, 3, device="cuda").to(dtype).requires_grad_()
    b = torch.randn(N, P2, 3, device="cuda").to(dtype).requires_grad_()
    l1 = torch.full((N,), P1, dtype=torch.int64, device="cuda")
    l2 = torch.full((N,), P2, dtype=torch.int64, device="cuda")

    def fwd():
        with torch.no_grad():
            impl(a, b, l1, l2, K, 2)

    def fwd_bwd():
        d, _ = impl(a, b, l1, l2, K, 2)
        torch.autograd.grad(d.sum(), (a, b))

    counts = []
    for fn in (fwd, fwd_bwd):
        fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(calls):
                fn()
            torch.cuda.synchronize()
        counts.append(sum(e.device_type == DeviceType.CUDA for e in prof.events()) / calls)
    t0 = time.perf_counter()
    for _ in range(20):
        fwd_bwd()
        torch.cuda.synchronize()
    return counts[0], counts[1], 1e3 * (time.perf_counter() - t0) / 20


SWEEP = [
    dict(block_q=32, block_c=32, num_warps=1, spatial_sort=True),
    dict(block_q=64, block_c=32, num_warps=2, spatial_sort=True),
    dict(block_q=32, block_c=16, num_warps=1, spatial_sort=True),
    dict(block_q=32, block_c=64, num_warps=1, spatial_sort=True),
    dict(block_q=128, block_c=32, num_warps=4, spatial_sort=False),
    dict(block_q=64, block_c=64, num_warps=2, spatial_sort=False),
]


def _sweep(args, knn_points_triton) -> int:
    """Forward-only times of several tilings per shape and dtype: the data behind the heuristics."""
    import functools

    print("| shape | dtype | tiling | fwd ms |")
    print("| --- | --- | --- | --- |")
    for name in args.shapes:
        N, P1, P2, K = SHAPES[name][:4]
        for dt in args.dtypes:
            for kw in SWEEP:
                impl = functools.partial(knn_points_triton, **kw)
                try:
                    t = f"{time_one(impl, N, P1, P2, K, DTYPES[dt], args.rep_ms, fwd_only=True)[0]:.4g}"
                except Exception as exc:  # a tiling may exceed registers/shared memory: report, go on
                    t = f"failed: {type(exc).__name__}"
                print(f"| {name} | {dt} | {kw} | {t} |", flush=True)
    return 0


def _profile(args, knn_points_triton) -> int:
    """Where the time goes: CUDA time per kernel over 10 forward+backward calls, and the wall time per call."""
    import time

    from torch.profiler import ProfilerActivity, profile

    print("| shape | dtype | device items per fwd | per fwd+bwd | wall ms per synced fwd+bwd |")
    print("| --- | --- | --- | --- | --- |")
    for name in args.shapes:
        N, P1, P2, K = SHAPES[name][:4]
        for dt in args.dtypes:
            c = launches(knn_points_triton, N, P1, P2, K, DTYPES[dt])
            print(f"| {name} | {dt} | {c[0]:g} | {c[1]:g} | {c[2]:.3f} |", flush=True)
    N, P1, P2, K = SHAPES[args.shapes[0]][:4]
    dtype = DTYPES[args.dtypes[0]]
    p1 = torch.randn(N, P1, 3, device="cuda").to(dtype).requires_grad_()
    p2 = torch.randn(N, P2, 3, device="cuda").to(dtype).requires_grad_()
    l1 = torch.full((N,), P1, dtype=torch.int64, device="cuda")
    l2 = torch.full((N,), P2, dtype=torch.int64, device="cuda")

    def step():
        d, _ = knn_points_triton(p1, p2, l1, l2, K, 2)
        torch.autograd.grad(d.sum(), (p1, p2))

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(10):
        step()
    torch.cuda.synchronize()
    print(f"{args.shapes[0]} {args.dtypes[0]}: wall {1e3 * (time.perf_counter() - t0) / 10:.3f} ms per fwd+bwd")
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60))
    return 0


def _host(args, knn_points_triton) -> int:
    """Host-side cost: cProfile of 50 forward+backward calls of the first shape, per dtype (top functions)."""
    import cProfile
    import pstats

    N, P1, P2, K = SHAPES[args.shapes[0]][:4]
    for dt in args.dtypes:
        a = torch.randn(N, P1, 3, device="cuda").to(DTYPES[dt]).requires_grad_()
        b = torch.randn(N, P2, 3, device="cuda").to(DTYPES[dt]).requires_grad_()
        l1 = torch.full((N,), P1, dtype=torch.int64, device="cuda")
        l2 = torch.full((N,), P2, dtype=torch.int64, device="cuda")

        def step():
            d, _ = knn_points_triton(a, b, l1, l2, K, 2)
            torch.autograd.grad(d.sum(), (a, b))

        for _ in range(5):
            step()
        torch.cuda.synchronize()
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(50):
            step()
        torch.cuda.synchronize()
        prof.disable()
        print(f"== {args.shapes[0]} {dt}: 50 fwd+bwd calls")
        pstats.Stats(prof).sort_stats("tottime").print_stats(18)
    return 0


# implementations `--compare` knows by label; others come as LABEL=module:function
BUILTIN_IMPLS = {
    "protodepth": "protodepth.geometry.knn:knn_points",
    "protodepth-triton": "protodepth.geometry.knn_triton:knn_points_triton",
    # the same as protodepth, every Triton launch through Triton's ordinary per-call binding (_triton_launch off)
    "protodepth-slowlaunch": "protodepth.geometry.knn:knn_points",
}


def load_impl(spec: str):
    """'LABEL=module:function' (or a built-in label) -> (label, call(p1, p2, K) -> (dists, idx), context to time
    it in).

    The function is called as function(p1, p2, None, None, K=K) and must return dists and idx first
    (PyTorch3D's knn_points contract); any importable module works, e.g. a reference built elsewhere.
    """
    import importlib

    label, _, target = spec.partition("=")
    target = target or BUILTIN_IMPLS.get(label, "")
    mod, _, name = target.partition(":")
    if not mod or not name:
        raise SystemExit(f"--impl {spec}: expected LABEL=module:function or one of {', '.join(BUILTIN_IMPLS)}")
    fn = getattr(importlib.import_module(mod), name)

    def call(p1, p2, K):
        out = fn(p1, p2, None, None, K=K)
        return out[0], out[1]

    return label, call, (_slow_launches if label == "protodepth-slowlaunch" else contextlib.nullcontext)


@contextlib.contextmanager
def _slow_launches():
    from protodepth.geometry import _triton_launch

    prev = _triton_launch.set_enabled(False)
    try:
        yield
    finally:
        _triton_launch.set_enabled(prev)


def _graph_ms(step, rep_ms: float):
    """Median ms of a CUDA-graph replay of step(), or None when step cannot be captured (a host sync)."""
    try:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            step()
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
    except Exception as exc:  # host syncs are illegal while capturing
        print(f"graph capture failed: {type(exc).__name__}: {str(exc)[:200]}", file=sys.stderr)
        torch.cuda.synchronize()
        return None
    return _bench(graph.replay, rep_ms)


def _agreement(ref, out):
    """Outputs (dists, idx, grad_p1, grad_p2) of an implementation against the first one's."""
    d0, i0, g10, g20 = ref
    d1, i1, g11, g21 = out
    differ = i0 != i1
    # an index may differ only where the two distances tie exactly (then either neighbour is right)
    not_tie = differ & (d0.double() != d1.double())
    gscale = max(float(g10.abs().max()), float(g20.abs().max()), 1e-30)
    gdiff = max(float((g10.double() - g11.double()).abs().max()), float((g20.double() - g21.double()).abs().max()))
    return dict(idx_differ=int(differ.sum()), idx_differ_not_tie=int(not_tie.sum()),
                max_dist_diff=float((d0.double() - d1.double()).abs().max()), max_grad_rel_diff=gdiff / gscale)


def _compare_impl(label: str, fn, name: str, shape: tuple, tensors: tuple, rep_ms: float, graphs: bool):
    """One implementation's row (times) and outputs (dists, idx, grad_p1, grad_p2) on one shape."""
    N, P1, P2, K = shape
    p1, p2, a, b = tensors

    def fwd():
        with torch.no_grad():
            fn(p1, p2, K)

    def fwd_bwd():
        d, _ = fn(a, b, K)
        return torch.autograd.grad(d.sum(), (a, b))

    d, i = fn(a, b, K)
    out = (d.detach(), i) + tuple(torch.autograd.grad(d.sum(), (a, b)))
    row = dict(shape=name, N=N, P1=P1, P2=P2, K=K, impl=label, fwd=_bench(fwd, rep_ms),
               fwd_bwd=_bench(fwd_bwd, rep_ms), graph_fwd_bwd=_graph_ms(fwd_bwd, rep_ms) if graphs else None)
    return row, out


def compare_shape(impls, name: str, rep_ms: float, graphs: bool) -> list[dict]:
    """Eager fwd, eager fwd+bwd (autograd.grad of dists.sum() w.r.t. both clouds) and graphed fwd+bwd of every
    implementation on the same fp32 inputs, in this process, plus their agreement with the first one."""
    N, P1, P2, K = SHAPES[name][:4]
    g = torch.Generator(device="cuda").manual_seed(0)
    p1 = torch.randn(N, P1, 3, device="cuda", generator=g)
    p2 = torch.randn(N, P2, 3, device="cuda", generator=g)
    tensors = (p1, p2, p1.clone().requires_grad_(), p2.clone().requires_grad_())
    rows, ref = [], None
    for label, fn, context in impls:
        with context():
            row, out = _compare_impl(label, fn, name, (N, P1, P2, K), tensors, rep_ms, graphs)
        ref = ref or out
        row.update(_agreement(ref, out))
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    return rows


def _compare(args) -> int:
    """Same-process comparison of implementations (see --impl), printed as a table, rows as JSON with --out."""
    impls = [load_impl(spec) for spec in args.impl]
    base = args.ratio_to or impls[-1][0]
    rows = []
    for name in args.shapes:
        rows += compare_shape(impls, name, args.rep_ms, not args.no_graphs)

    def f(x):
        return "-" if x is None else f"{x:.3g}"

    print(f"\nGPU: {torch.cuda.get_device_name()}; torch {torch.__version__}; fp32; median ms (do_bench, rep "
          f"{args.rep_ms:g} ms); speed-up = {base}'s time / this one's\n")
    print("| shape | K | impl | fwd | fwd+bwd | fwd+bwd graphed | fwd speed-up | fwd+bwd speed-up | idx differ "
          "(not ties) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        ref = next((x for x in rows if x["shape"] == r["shape"] and x["impl"] == base), None)
        s1 = "-" if ref is None else f"{ref['fwd'] / r['fwd']:.2f}x"
        s2 = "-" if ref is None else f"{ref['fwd_bwd'] / r['fwd_bwd']:.2f}x"
        print(f"| {r['shape'].split('-')[0]} | {r['K']} | {r['impl']} | {f(r['fwd'])} | {f(r['fwd_bwd'])} | "
              f"{f(r['graph_fwd_bwd'])} | {s1} | {s2} | {r['idx_differ']} ({r['idx_differ_not_tie']}) |")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, rep_ms=args.rep_ms,
                           ratio_to=base, rows=rows), fh, indent=1)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="benchmark.py knn", description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES), help="shapes to time (default: all)")
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES), help="point dtypes")
    ap.add_argument("--no-torch", action="store_true", help="skip the PyTorch fallback (slow on large shapes)")
    ap.add_argument("--rep-ms", type=float, default=200.0, help="do_bench repetition budget per measurement (ms)")
    ap.add_argument("--sweep", action="store_true", help="time forward tilings (block_q, block_c, warps, splits)")
    ap.add_argument("--profile", action="store_true",
                    help="per-kernel CUDA times (torch.profiler) of forward+backward for the first shape and dtype")
    ap.add_argument("--host", action="store_true", help="cProfile of the host side of forward+backward")
    ap.add_argument("--out", default=None, help="also write the rows as JSON to this file")
    ap.add_argument("--compare", action="store_true",
                    help="time the --impl implementations against each other in this process (fp32; default shapes: "
                         "issue 17's)")
    ap.add_argument("--impl", action="append", default=None, metavar="LABEL[=module:function]",
                    help="an implementation for --compare: a built-in label (" + ", ".join(BUILTIN_IMPLS) + ") or "
                         "LABEL=module:function, called as function(p1, p2, None, None, K=K) -> (dists, idx, ...); "
                         "repeat for several (default: protodepth)")
    ap.add_argument("--ratio-to", default=None, metavar="LABEL",
                    help="--compare: speed-ups relative to this implementation (default: the last --impl)")
    ap.add_argument("--no-graphs", action="store_true", help="--compare: skip the CUDA-graph replays")
    from protodepth.benchmarks import knn_pair

    knn_pair.add_arguments(ap)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmark.py knn: needs a CUDA GPU (none visible)", file=sys.stderr)
        return 2
    from protodepth.geometry.knn import _knn_points_torch
    from protodepth.geometry.knn_triton import knn_points_triton

    gpu = torch.cuda.get_device_name()
    if args.step_pair:
        return knn_pair.main(args)
    if args.compare:
        args.impl = args.impl or ["protodepth"]
        if args.shapes == list(SHAPES):
            args.shapes = COMPARE
        return _compare(args)
    if args.sweep:
        return _sweep(args, knn_points_triton)
    if args.profile:
        return _profile(args, knn_points_triton)
    if args.host:
        return _host(args, knn_points_triton)
    rows = []
    for name in args.shapes:
        N, P1, P2, K, ref_f, ref_fb = SHAPES[name]
        for dt in args.dtypes:
            tri = time_one(knn_points_triton, N, P1, P2, K, DTYPES[dt], args.rep_ms)
            tor = (None, None) if args.no_torch else time_one(_knn_points_torch, N, P1, P2, K, DTYPES[dt], args.rep_ms)
            agree = (None, None) if args.no_torch else agreement(N, P1, P2, K, DTYPES[dt])
            graph = time_graph(knn_points_triton, N, P1, P2, K, DTYPES[dt], args.rep_ms)
            row = dict(shape=name, N=N, P1=P1, P2=P2, K=K, dtype=dt, triton_fwd=tri[0], triton_fwd_bwd=tri[1],
                       triton_graph_fwd_bwd=graph,
                       torch_fwd=tor[0], torch_fwd_bwd=tor[1], idx_agree=agree[0], max_abs_dist_diff=agree[1],
                       pytorch3d_fwd=ref_f if dt == "fp32" else None,
                       pytorch3d_fwd_bwd=ref_fb if dt == "fp32" else None)
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)

    def f(x, nd=3):
        return "-" if x is None else f"{x:.{nd}g}"

    print(f"\nGPU: {gpu}; torch {torch.__version__}; median ms of do_bench repeats (rep {args.rep_ms:g} ms)\n")
    print("| shape (N x P1 x P2) | K | dtype | Triton fwd | Triton fwd+bwd | Triton fwd+bwd, CUDA graph | torch fwd "
          "| torch fwd+bwd | PyTorch3D fwd / fwd+bwd (H100) | fwd vs PyTorch3D | fwd+bwd vs PyTorch3D "
          "| idx = torch path |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        p3 = "-" if r["pytorch3d_fwd"] is None else f"{r['pytorch3d_fwd']} / {r['pytorch3d_fwd_bwd']}"
        s1 = "-" if r["pytorch3d_fwd"] is None else f"{r['pytorch3d_fwd'] / r['triton_fwd']:.1f}x"
        s2 = "-" if r["pytorch3d_fwd"] is None else f"{r['pytorch3d_fwd_bwd'] / r['triton_fwd_bwd']:.1f}x"
        agree = "-" if r["idx_agree"] is None else f"{100 * r['idx_agree']:.4f}%"
        print(f"| {r['shape'].split('-')[0]} | {r['K']} | {r['dtype']} | {f(r['triton_fwd'])} | "
              f"{f(r['triton_fwd_bwd'])} | {f(r['triton_graph_fwd_bwd'])} | {f(r['torch_fwd'])} | "
              f"{f(r['torch_fwd_bwd'])} | {p3} | {s1} | {s2} | {agree} |")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(dict(gpu=gpu, torch=torch.__version__, rep_ms=args.rep_ms, rows=rows), fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
