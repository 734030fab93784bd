"""`python scripts/benchmark.py step --ablate VARIANT ...`: what each part of the geometry costs on the graphed
step's critical path.

A replayed step overlaps work on several CUDA streams, so a kernel profile's GPU time per part does not say what
the step would lose without it. Each variant here replaces parts of the loss by trivial differentiable stand-ins
and times the graphed full step against the graphed backbone step (the step benchmark's `bench_shape`):
  noknn       both KNN searches (dists from a cheap expression of the same points; gradients still flow)
  onlyslot    the global search replaced, the slot search kept; onlyglobal: the converse
  nosample    the area-weighted sampling (the first S vertices of each slot instead)
  noproto     the prototype regularisers (zeros tied to the prototypes)
  norep       the repulsion term
Join variants with "+" (e.g. noknn+noproto); "full" is the step as it is. The stand-ins change the loss, not the
shapes: what a variant saves is what that part costs on the critical path. `--ablate alone` times the prototype
regularisers by themselves (forward and backward, graphed), the length of their chain.
"""
from __future__ import annotations

import statistics
import types

import torch

import protodepth.loss as L
import protodepth.training.step as TS
from protodepth.geometry.knn import KNN

VARIANTS = ("full", "noknn", "onlyslot", "onlyglobal", "nosample", "noproto", "norep")
_REAL = {"knn_points_sorted": L.knn_points_sorted, "repulsion": L.repulsion,
         "sample_points_from_uniforms": L.sample_points_from_uniforms,
         "sample_points_from_meshes": L.sample_points_from_meshes}
_REAL_START = TS.start_prototype_terms


def _cheap_knn(p1, p2, K):
    d = (p1.square().sum(-1, keepdim=True) + p2.mean(1, keepdim=True).square().sum(-1, keepdim=True)).expand(-1, -1, K)
    return KNN(d, torch.zeros(d.shape, dtype=torch.int64, device=d.device), None)


def _sorted_stand_in(keep: str | None):
    """knn_points_sorted that searches for real only in direction `keep` ("slot": predicted -> targets)."""
    def knn(p1, p2, K=1, **kw):
        slot = p1.points.shape[1] < p2.points.shape[1]  # the step's predicted clouds are the smaller ones
        if keep is not None and (keep == "slot") == slot:
            return _REAL["knn_points_sorted"](p1, p2, K=K, **kw)
        return _cheap_knn(p1.points, p2.points, K)
    return knn


def _no_proto(prototypes, faces, cfg):
    zero = prototypes.float().sum() * 0
    return L.PrototypeTerms({"edge": zero, "normal": zero, "laplacian": zero}, cfg, None)


def apply(variant: str) -> None:
    """Restore the real loss, then put the stand-ins of `variant` ("+"-joined names of VARIANTS) in place."""
    for name, fn in _REAL.items():
        setattr(L, name, fn)
    TS.start_prototype_terms = _REAL_START
    for part in variant.split("+"):
        if part not in VARIANTS:
            raise SystemExit(f"--ablate: unknown variant {part!r}, expected one of {', '.join(VARIANTS)} joined by +")
        if part in ("noknn", "onlyslot", "onlyglobal"):
            L.knn_points_sorted = _sorted_stand_in({"noknn": None, "onlyslot": "slot", "onlyglobal": "global"}[part])
        elif part == "nosample":
            L.sample_points_from_uniforms = lambda verts, faces, face_u, uv: verts[:, : face_u.shape[1]] * 1.0
            L.sample_points_from_meshes = lambda verts, faces, n, generator=None, **kw: verts[:, :n] * 1.0
        elif part == "noproto":
            TS.start_prototype_terms = _no_proto
        elif part == "norep":
            L.repulsion = lambda centroids, min_distance, sharpness: centroids.sum(dim=(1, 2)) * 0


def prototype_chain(device) -> None:
    """The prototype regularisers alone (level-4 spheres, P = 16 and 32), forward + backward replayed from a graph."""
    from protodepth.benchmarks.step import time_steps
    from protodepth.config import load_config
    from protodepth.geometry.icosphere import ico_sphere

    cfg = load_config(None, {})
    verts, faces = ico_sphere(4, device=device)
    for P in (16, 32):
        offsets = torch.zeros(P, verts.shape[0], 3, device=device, requires_grad=True)

        def run():
            sum(L.prototype_terms(verts[None] + offsets, faces, cfg.loss).values()).backward()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                run()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            run()
        ms = statistics.median(time_steps(graph.replay, 5, 50)) * 1e3
        print(f"| prototype regularisers alone, P = {P}, level 4 | forward + backward, graphed | {ms:.3f} ms |")


def run_ablation(variants: list[str], args, device) -> None:
    from protodepth.benchmarks.step import bench_shape

    if variants == ["alone"]:
        print("\n| what | how | GPU ms |\n| --- | --- | --- |")
        prototype_chain(device)
        return
    opts = types.SimpleNamespace(**{**vars(args), "no_eager": True, "cuda_graphs": True, "profile": False})
    print("\n| shape | variant | graphed backbone ms | graphed full ms | full / backbone |\n| --- | --- | --- | --- | --- |")
    for name in args.shapes:
        for variant in variants:
            apply(variant)
            try:
                by = {r.kind: r for r in bench_shape(name, "bf16", opts, device)}
            finally:
                apply("full")
            b, f = by["backbone-graph"], by["full-graph"]
            print(f"| {name} | {variant} | {b.median_s * 1e3:.2f} | {f.median_s * 1e3:.2f} | "
                  f"{f.median_s / b.median_s:.3f} |", flush=True)
