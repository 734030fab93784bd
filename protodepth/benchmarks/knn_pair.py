"""The training step's two KNN searches, timed as the step runs them: `python -m protodepth.benchmarks.knn --step-pair`.

The hybrid Chamfer loss (protodepth/loss.py) searches, per image batch:
  slot direction:   knn_points(pred (B, K*S, 3), target (B, N, 3), lengths2=lengths, K=1)  on a side stream
  global direction: knn_points(target, pred, lengths1=lengths, K=3)                      on the main stream
then backpropagates into pred only (the target is data). This module times that pair, forward and backward, the
two directions on two CUDA streams, as a CUDA-graph replay (what the trainer's captured step pays) and eagerly,
and prints the GPU time per kernel of a replay (torch.profiler), for the step's two shapes:
  b32: B = 32, 16 slots x 200 samples = 3 200 predicted points, 20 000 targets;
  b2:  B = 2, 32 slots x 200 = 6 400 predicted points, 10 000 targets.
Clouds: targets on the surfaces of a street-like scene (ground, two facades, a few boxes; x, y in +-20 m, z in
-60..-3 m, denser near the camera like a back-projected depth map); predicted points on K small ellipsoids (slots,
0.5-1.5 m) inside that box.

Variants (`--variants`): `base` (an older knn_triton module given by --base, e.g. a copy of HEAD's), `plain` (this
tree's `knn_points`), `sorted` (this tree's `sort_cloud` + `knn_points_sorted`: each cloud sorted once, the target's
sort in the timed work on a third stream), `presorted` (the same with the target sorted outside the timed work:
what a step that sorts it beside the backbone pays), `sorted-force` (sort_cloud(sort=True): the sorted path also
where `sort_cloud` would keep small clouds unsorted; also `presorted-force`). Flags after a dash: `-grid` sorts the
pred on the target's Morton grid (`sort_cloud(pred, grid=target_sorted)`); `-t64` / `-p64` sorts the target / pred in
64-point tiles (query tiles of 2 warps where that cloud holds the queries); `-tc64` / `-tc32` the target as
candidates in 64- / 32-point tiles, as queries in 32 (`sort_cloud(target, lengths, candidate_tile=64)`; its default:
64 above 8 192 points per cloud; `-pc16`: the pred as candidates in 16-point tiles); `-slot` / `-global` runs only
that direction (its forward and backward: the profile of one direction); `-walkN` / `-leanN` set knn_triton's `_WALK3`
/ `_LEAN` while the variant runs (which walk kernel: 0, 1, 2; which insertion: 0, 1); `-old` runs a sorted
variant through `--base-geometry PACKAGE` (an older tree's geometry folder copied under another name with an empty
`__init__.py`), e.g. `presorted-grid-old`: the step's way at that tree, in the same process.
"""
from __future__ import annotations

import importlib
import json

import torch

SHAPES = {"b32": (32, 16, 200, 20000), "b2": (2, 32, 200, 10000)}  # B, slots, samples per slot, targets
K_GLOBAL = 3
# variant parts that set knn_triton's flags while the variant runs
FLAG_PARTS = {"walk": "_WALK3", "lean": "_LEAN"}


def street_targets(B: int, N: int, gen: torch.Generator, device) -> torch.Tensor:
    """(B, N, 3) points on a street-like scene's surfaces, camera frame (y up, looking down -z)."""
    u = torch.rand(B, N, 3, generator=gen, device=device)
    z = -3.0 - 57.0 * u[..., 2] ** 2  # denser near the camera, as a depth map's back-projection
    kind = torch.rand(B, N, generator=gen, device=device)
    x = 40.0 * u[..., 0] - 20.0
    y = 12.0 * u[..., 1] - 1.6
    ground = kind < 0.45
    y = torch.where(ground, -1.6 + 0.02 * u[..., 1], y)
    facade = (kind >= 0.45) & (kind < 0.8)
    x = torch.where(facade, torch.where(u[..., 0] < 0.5, -12.0, 12.0) + 0.05 * u[..., 1], x)
    # the rest on the faces of 6 boxes (cars, kiosks) per scene: snap one coordinate to a face
    box = ~(ground | facade)
    centre = torch.rand(B, 6, 3, generator=gen, device=device) * torch.tensor([18.0, 1.0, 50.0], device=device) \
        + torch.tensor([-9.0, -1.6, -55.0], device=device)
    which = torch.randint(0, 6, (B, N), generator=gen, device=device)
    c = torch.gather(centre, 1, which[..., None].expand(-1, -1, 3))
    local = (torch.rand(B, N, 3, generator=gen, device=device) - 0.5) * torch.tensor([4.0, 3.0, 2.0], device=device)
    face = torch.randint(0, 3, (B, N), generator=gen, device=device)
    half = torch.tensor([2.0, 1.5, 1.0], device=device)
    snapped = torch.where(local[..., :] >= 0, half, -half)
    local = torch.where(torch.nn.functional.one_hot(face, 3).bool(), snapped, local)
    pb = c + local + torch.tensor([0.0, 1.5, 0.0], device=device)
    pts = torch.stack([x, y, z], -1)
    return torch.where(box[..., None], pb, pts).contiguous()


def slot_points(B: int, K: int, S: int, gen: torch.Generator, device) -> torch.Tensor:
    """(B, K*S, 3) points on K ellipsoids (semi-axes 0.25-0.75 m) per image inside the target box."""
    centre = torch.rand(B, K, 1, 3, generator=gen, device=device) * torch.tensor([30.0, 4.0, 45.0], device=device) \
        + torch.tensor([-15.0, -1.5, -50.0], device=device)
    axes = 0.25 + 0.5 * torch.rand(B, K, 1, 3, generator=gen, device=device)
    d = torch.randn(B, K, S, 3, generator=gen, device=device)
    d = d / d.norm(dim=-1, keepdim=True)
    return (centre + axes * d).reshape(B, K * S, 3).contiguous()


def make_inputs(shape: str, device="cuda", seed=0):
    B, K, S, N = SHAPES[shape]
    gen = torch.Generator(device=device).manual_seed(seed)
    target = street_targets(B, N, gen, device)
    pred = slot_points(B, K, S, gen, device)
    lengths = torch.full((B,), N, dtype=torch.int64, device=device)
    return pred, target, lengths


class Pair:
    """One variant's step: forward of both directions (slot on a side stream), loss, gradient w.r.t. pred."""

    def __init__(self, variant: str, pred, target, lengths, base=None, base_geometry=None):
        self.variant, self.target, self.lengths, self.base = variant, target, lengths, base
        # "-old": the sorted variants through base_geometry (an older tree's geometry package) instead of this tree's
        self.geometry = base_geometry if "old" in variant.split("-") else None
        if self.geometry is None and "old" in variant.split("-"):
            raise ValueError(f"{variant}: -old needs --base-geometry")
        self.pred = pred.clone().requires_grad_()
        dev = pred.device
        self.side, self.third = torch.cuda.Stream(dev), torch.cuda.Stream(dev)
        self.full1 = torch.full((pred.shape[0],), pred.shape[1], dtype=torch.int64, device=dev)
        self.tgt_sorted = None
        # "-tNN" / "-pNN": the target's / pred's tile size in the sorted variants (default 32)
        parts = variant.split("-")
        self.tiles = {p[:-2]: int(p[-2:]) for p in parts[1:] if p[:-2] in ("t", "p", "tc", "pc") and p[-2:].isdigit()}
        self.kind, self.force = parts[0], (True if "force" in parts else None)
        self.grid = "grid" in parts  # pred sorted on the target's Morton grid
        # "-slot" / "-global": only that direction (forward and backward), to split the profile
        self.only = "slot" if "slot" in parts else ("global" if "global" in parts else None)
        # "-walkN" / "-leanN": knn_triton's _WALK3 / _LEAN (walk kernel, insertion) while this variant runs
        self.flags = {}
        for p in parts[1:]:
            for prefix, attr in FLAG_PARTS.items():
                if p.startswith(prefix) and p[len(prefix):].isdigit():
                    self.flags[attr] = int(p[len(prefix):])
        if self.kind == "presorted":
            sort_cloud = self.sorted_module().sort_cloud
            self.tgt_sorted = sort_cloud(target, lengths, sort=self.force, tile=self.tiles.get("t"),
                                         candidate_tile=self.tiles.get("tc"))

    def sorted_module(self):
        """The knn_sorted module the sorted variants use (this tree's, or base_geometry's with -old)."""
        return importlib.import_module((self.geometry or "protodepth.geometry") + ".knn_sorted")

    def capture_mode(self):
        """The geometry's capture_mode (no host reads) for this variant's package."""
        import contextlib

        from protodepth.geometry import capture_mode

        if self.geometry is None:
            return capture_mode()
        stack = contextlib.ExitStack()
        stack.enter_context(capture_mode())
        stack.enter_context(importlib.import_module(self.geometry + "._mode").capture_mode())
        return stack

    def _directions(self):
        """(slot fn, global fn, target sort or None): the two searches of this variant as closures."""
        v, pred, target, lengths = self.kind, self.pred, self.target, self.lengths
        if v == "base":
            f = self.base.knn_points_validated
            return (lambda: f(pred, target, self.full1, lengths, 1, 2)[0],
                    lambda: f(target, pred, lengths, self.full1, K_GLOBAL, 2)[0], None)
        if v == "plain":
            from protodepth.geometry.knn import knn_points

            return (lambda: knn_points(pred, target, lengths2=lengths, K=1).dists,
                    lambda: knn_points(target, pred, lengths1=lengths, K=K_GLOBAL).dists, None)
        mod = self.sorted_module()
        knn_points_sorted, sort_cloud = mod.knn_points_sorted, mod.sort_cloud
        force = self.force
        box = {}

        def sort_target():
            box["t"] = self.tgt_sorted or sort_cloud(target, lengths, sort=force, tile=self.tiles.get("t"),
                                                     candidate_tile=self.tiles.get("tc"))

        def slot():
            return knn_points_sorted(box["p"], box["t"], K=1).dists

        def glob():
            return knn_points_sorted(box["t"], box["p"], K=K_GLOBAL).dists

        def sort_pred():
            box["p"] = sort_cloud(pred, sort=force, tile=self.tiles.get("p"), grid=box["t"] if self.grid else None,
                                  candidate_tile=self.tiles.get("pc"))

        self._sort_pred = sort_pred
        return slot, glob, sort_target

    def step(self):
        """(slot dists, global dists, grad_pred) of one forward + backward."""
        if not self.flags:
            return self._step()
        from protodepth.geometry import knn_triton as kt

        saved = {k: getattr(kt, k) for k in self.flags}
        try:
            for k, v in self.flags.items():
                setattr(kt, k, v)
            return self._step()
        finally:
            for k, v in saved.items():
                setattr(kt, k, v)

    def _step(self):
        slot, glob, sort_target = self._directions()
        main = torch.cuda.current_stream()
        if sort_target is not None:
            # the target's sort does not depend on pred: a third stream, beside the pred's sort
            self.third.wait_stream(main)
            with torch.cuda.stream(self.third):
                sort_target()
            if self.grid:  # the pred's sort reads the target's grid
                main.wait_stream(self.third)
            self._sort_pred()
            main.wait_stream(self.third)
        if self.only is not None:
            d = slot() if self.only == "slot" else glob()
            (grad,) = torch.autograd.grad(d.mean(), self.pred)
            return d, d, grad
        self.side.wait_stream(main)
        with torch.cuda.stream(self.side):
            s = slot()
            s_loss = s.squeeze(-1).mean()
        g = glob()
        main.wait_stream(self.side)
        loss = s_loss + g.mean()
        (grad,) = torch.autograd.grad(loss, self.pred)
        return s, g, grad


def _bench(fn, rep_ms: float) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=max(10.0, rep_ms / 4), rep=rep_ms, return_mode="median"))


def _capture(pair: Pair):
    """(graph, static outputs) of pair.step() captured after a warm-up on a side stream, in the geometry's
    capture_mode (no host reads: the lengths checks are skipped, as in the trainer's captured step)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            pair.step()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with pair.capture_mode(), torch.cuda.graph(graph):
        out = pair.step()
    return graph, out


def kernel_table(graph, replays: int = 10, top: int = 16) -> list[tuple[str, float, float]]:
    """[(kernel name, GPU ms per replay, calls per replay)] of graph replays, largest first (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    graph.replay()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            graph.replay()
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None)
        if t is None:
            t = e.cuda_time_total
        if t > 0 and e.count > 0:
            rows.append((e.key, t / 1e3 / replays, e.count / replays))
    rows.sort(key=lambda r: -r[1])
    return rows[:top]


def _agree(ref, out) -> dict:
    s0, g0, gr0 = ref
    s1, g1, gr1 = out
    d = max(float((s0.double() - s1.double()).abs().max()), float((g0.double() - g1.double()).abs().max()))
    return dict(max_dist_diff=d, grad_max_rel=float((gr0 - gr1).abs().max() / gr0.abs().max().clamp_min(1e-30)))


def run_variant(variant: str, shape: str, rep_ms: float, base=None, profile=True, ref=None, base_geometry=None):
    pred, target, lengths = make_inputs(shape)
    pair = Pair(variant, pred, target, lengths, base, base_geometry)
    graph, out = _capture(pair)
    graph.replay()
    torch.cuda.synchronize()
    out = tuple(t.detach().clone() for t in out)
    row = dict(shape=shape, variant=variant, graph_ms=_bench(graph.replay, rep_ms), eager_ms=_bench(pair.step, rep_ms))
    if pair.only is not None:
        ref = None  # one direction: nothing to compare with the pair's outputs
    if ref is not None:
        row.update(_agree(ref, out))
    if profile:
        row["kernels"] = kernel_table(graph)
    return row, out


def main(args) -> int:
    """--step-pair: every variant on every shape; a table of graph / eager ms and the per-kernel profiles."""
    base = None
    if args.base:
        try:
            base = importlib.import_module(args.base)
        except ImportError as exc:  # the comparison without it rather than nothing
            print(f"--base {args.base}: not importable ({exc}); timing without it", flush=True)
    variants = [v for v in args.variants if v.split("-")[0] != "base" or base is not None]
    rows = []
    for shape in args.pair_shapes:
        ref = None
        for v in variants:
            try:
                row, out = run_variant(v, shape, args.rep_ms, base, not args.no_profile, ref, args.base_geometry)
            except Exception as exc:  # report and go on: one broken variant must not hide the others
                print(f"{shape} {v}: failed: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
                continue
            if "slot" not in v.split("-") and "global" not in v.split("-"):
                ref = ref or out
            rows.append(row)
            print(json.dumps({k: x for k, x in row.items() if k != "kernels"}), flush=True)
            for name, ms, calls in row.get("kernels", []):
                print(f"    {ms:8.4f} ms  x{calls:4.1f}  {name[:90]}")
    print(f"\nGPU: {torch.cuda.get_device_name()}; torch {torch.__version__}; median ms (do_bench, rep "
          f"{args.rep_ms:g} ms); the KNN pair of one step: both directions, fwd + bwd, two streams\n")
    print("| shape | variant | graph replay ms | eager ms | max dist diff | grad max rel diff |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['shape']} | {r['variant']} | {r['graph_ms']:.4f} | {r['eager_ms']:.4f} | "
              f"{r.get('max_dist_diff', 0.0):.3g} | {r.get('grad_max_rel', 0.0):.3g} |")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(dict(gpu=torch.cuda.get_device_name(), rows=rows), fh, indent=1)
    return 0


def add_arguments(ap) -> None:
    ap.add_argument("--step-pair", action="store_true", help="time the training step's KNN pair (see knn_pair.py)")
    ap.add_argument("--pair-shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES),
                    help="--step-pair: the step shapes to time (b32: 32 x 3 200 x 20 000, b2: 2 x 6 400 x 10 000)")
    ap.add_argument("--variants", nargs="+", default=["base", "plain", "sorted", "presorted"],
                    help="base, plain, sorted, presorted; the sorted ones may end in -force (sort small clouds too), "
                         "-grid (pred on the target's grid) and -tNN / -pNN: the target's / pred's tile size")
    ap.add_argument("--base", default=None, metavar="MODULE",
                    help="--step-pair: a knn_triton module to time as `base` (e.g. a copy of an older tree's)")
    ap.add_argument("--base-geometry", default=None, metavar="PACKAGE",
                    help="--step-pair: an older tree's geometry package (a copy of protodepth/geometry under another "
                         "name, with an empty __init__.py) that variants ending in -old run through")
    ap.add_argument("--no-profile", action="store_true", help="--step-pair: skip the per-kernel profile")

