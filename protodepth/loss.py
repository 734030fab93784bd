"""Proto-Depth's "hybrid Chamfer" loss and the prototype-mesh regularisers.

Knows nothing of data files or Accelerate. All geometry runs in float32 even under autocast: squared
distances of points hundreds of metres away, summed over 10^4 points, lose everything in bf16.
"""
from __future__ import annotations

import contextlib
from typing import Callable, NamedTuple

import torch

from protodepth.config import LossConfig
from protodepth.geometry import (
    mesh_edge_loss,
    mesh_laplacian_smoothing,
    mesh_normal_consistency,
    sample_points_from_meshes,
)
from protodepth.geometry.knn_sorted import SortedCloud, knn_points_sorted, sort_cloud
from protodepth.geometry.sampling import sample_points_from_uniforms
from protodepth.geometry import host_reads_allowed


class SamplingLevel(NamedTuple):
    """How densely one step samples: points drawn on each slot's mesh, and target points kept per cloud
    (None = the whole cloud). Progressive schedules step through these; the CUDA-graph step keeps one
    graph per level."""

    samples_per_slot: int
    max_targets: int | None


class LossDraws(NamedTuple):
    """The loss's random draws given as tensors, all uniform in [0, 1): what lets torch.compile trace the whole
    loss (no generator in the graph) and an eager and a compiled call draw the same points. Made by `draw_uniforms`."""

    face_u: torch.Tensor  # (B*K, S) picks each sample's face (by inverse cumulative area)
    bary_uv: torch.Tensor  # (2, B*K, S) places each sample inside its face
    target_keys: torch.Tensor | None  # (B, N) ranks the target points for the max_targets subset; None: no subset


def draw_uniforms(batch: int, slots: int, num_targets: int, level: SamplingLevel, device=None,
                  generator: torch.Generator | None = None) -> LossDraws:
    """The draws of one loss evaluation with `level` on a batch of `batch` images of `slots` slots and target
    clouds padded to `num_targets` points."""
    m, s = batch * slots, level.samples_per_slot
    face_u = torch.rand(m, s, device=device, generator=generator)
    bary_uv = torch.rand(2, m, s, device=device, generator=generator)
    keys = None
    if level.max_targets is not None and level.max_targets < num_targets:
        keys = torch.rand(batch, num_targets, device=device, generator=generator)
    return LossDraws(face_u, bary_uv, keys)


class LossOutput(NamedTuple):
    total: torch.Tensor  # () the training objective
    terms: dict[str, torch.Tensor]  # () each, detached, for logging
    pred_points: torch.Tensor  # (B, K, S, 3) the sampled predicted points (detached), for pictures


def repulsion(centroids: torch.Tensor, min_distance: float, sharpness: float) -> torch.Tensor:
    """(B, K, 3) slot centroids -> (B,) mean over ordered pairs i != j of exp(sharpness * relu(min_d - |c_i - c_j|))."""
    B, K, _ = centroids.shape
    if K < 2:
        return centroids.new_zeros(B)
    diff = centroids[:, :, None, :] - centroids[:, None, :, :]
    # sqrt of a clamped square keeps the gradient finite on the diagonal (masked out below anyway)
    dist = diff.pow(2).sum(-1).clamp_min(1e-12).sqrt()  # (B, K, K)
    pen = torch.exp(sharpness * torch.relu(min_distance - dist))
    return (pen * _constant("off_diag", K, centroids.device)).sum(dim=(1, 2)) / (K * (K - 1))


_CONSTANTS: dict[tuple, torch.Tensor] = {}


def _constant(kind: str, n: int, device: torch.device) -> torch.Tensor:
    """Index-only tensors made once per (kind, n, device) rather than by a kernel every step: "off_diag" (n, n)
    bool, ~eye; "arange" (n,) int64. Never evicted: a captured CUDA graph reads them by address (few shapes)."""
    def make():
        if kind == "off_diag":
            return ~torch.eye(n, dtype=torch.bool, device=device)
        return torch.arange(n, device=device)

    if torch.compiler.is_compiling():  # traced code makes its own (no global state in the graph)
        return make()
    key = (kind, n, device)
    if key not in _CONSTANTS:
        with torch.inference_mode(False):  # a normal tensor even if first made under inference_mode
            _CONSTANTS[key] = make()
    return _CONSTANTS[key]


def hybrid_chamfer(
    slot_verts: torch.Tensor,
    faces: torch.Tensor,
    target: torch.Tensor,
    lengths: torch.Tensor,
    cfg: LossConfig,
    samples_per_slot: int,
    generator: torch.Generator | None = None,
    draws: LossDraws | None = None,
    sorted_target: SortedCloud | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """Chamfer part of the loss, with S = samples_per_slot points drawn on each slot (from `draws` when given,
    else with `generator`).

    slot_verts (B, K, V, 3), faces (F, 3), target (B, N, 3) zero-padded with lengths (B,).
    sorted_target: `sort_cloud(target, lengths)` made earlier (`start_target_sort`); None sorts it here.
    Returns (chamfer (), {global, slot, repulsion} each (), pred (B, K, S, 3)).
    """
    B, K, V, _ = slot_verts.shape
    S = samples_per_slot
    # the repulsion reads only the slots: on CUDA it runs on a side stream beside the sampling and the searches
    side = _fork(slot_verts.device, "repulsion", (slot_verts,))
    with _on(side):
        r_img = repulsion(slot_verts.mean(dim=2), cfg.repulsion_min_distance, cfg.repulsion_sharpness)  # (B,)
        r_part, r_mean = cfg.w_repulsion * r_img, r_img.mean()
    flat_verts = slot_verts.reshape(B * K, V, 3)
    if draws is None:
        pred = sample_points_from_meshes(flat_verts, faces, S, generator=generator)
    else:
        pred = sample_points_from_uniforms(flat_verts, faces, draws.face_u, draws.bary_uv)
    pred = pred.view(B, K, S, 3)
    pred_flat = pred.reshape(B, K * S, 3)
    # Both searches read the same two clouds: each is sorted once (on CUDA, for the pruned search; elsewhere
    # this keeps them as they are), the predicted points on the targets' Morton grid.
    tgt = sorted_target if sorted_target is not None else sort_cloud(target, lengths)
    prd = sort_cloud(pred_flat, grid=tgt)

    # per slot: every predicted sample -> nearest target point; mean over samples, then over slots. The two
    # searches are independent given pred: on CUDA this one runs on a side stream, beside the global one
    # (each is a chain of small launches at small batches); its backward runs there too.
    side_s = _fork(pred_flat.device, "knn", (*prd.tensors(), *tgt.tensors()))
    with _on(side_s):
        s = knn_points_sorted(prd, tgt, K=1).dists.squeeze(-1)  # (B, K*S); a view in backward
        s_img = s.view(B, K, S).mean(dim=(1, 2))  # (B,)
        s_part, s_mean = cfg.w_slot * s_img, s_img.mean()

    # global: every target point -> its k nearest predicted points (any slot)
    g = knn_points_sorted(tgt, prd, K=cfg.k_nearest).dists  # (B, N, k)
    valid = _constant("arange", target.shape[1], target.device)[None, :] < lengths[:, None]  # (B, N)
    g_img = (g.mean(-1) * valid).sum(1) / lengths.clamp_min(1).to(g.dtype)  # (B,)

    _join(side, (r_part, r_mean))
    _join(side_s, (s_part, s_mean))
    per_img = cfg.w_global * g_img + s_part + r_part
    terms = {"global": g_img.mean(), "slot": s_mean, "repulsion": r_mean}
    return per_img.mean(), terms, pred


def _on(side: "torch.cuda.Stream | None"):
    """`with _on(side):` runs the block on `side`, or where it is when side is None (CPU, torch.compile)."""
    return torch.cuda.stream(side) if side is not None else contextlib.nullcontext()


def prototype_terms(prototypes: torch.Tensor, faces: torch.Tensor, cfg: LossConfig) -> dict[str, torch.Tensor]:
    """prototypes (P, V, 3), faces (F, 3) -> {edge, normal, laplacian}, each () averaged over the P meshes."""
    return {
        "edge": mesh_edge_loss(prototypes, faces, target_length=0.0),
        "normal": mesh_normal_consistency(prototypes, faces),
        "laplacian": mesh_laplacian_smoothing(prototypes, faces, method=cfg.laplacian_method),
    }


def _weighted(terms: dict[str, torch.Tensor], cfg: LossConfig) -> tuple[torch.Tensor, ...]:
    """The regularisers' summands of the total loss: (w_edge * edge, w_normal * normal, w_laplacian * laplacian)."""
    return cfg.w_edge * terms["edge"], cfg.w_normal * terms["normal"], cfg.w_laplacian * terms["laplacian"]


class PrototypeTerms:
    """The prototype regularisers of one step, started early: `start_prototype_terms` launches them, `join()`
    hands them over to the caller's stream. Made by `start_prototype_terms`; passed to `proto_depth_loss`."""

    def __init__(self, terms: dict[str, torch.Tensor], cfg: LossConfig, stream: "torch.cuda.Stream | None"):
        self._terms, self._weighted, self._stream = terms, _weighted(terms, cfg), stream
        self._ready = None
        if stream is not None:  # what join() waits for: these values, not the side stream's later work
            self._ready = torch.cuda.Event()
            self._ready.record(stream)

    def join(self) -> tuple[dict[str, torch.Tensor], tuple[torch.Tensor, ...]]:
        """({edge, normal, laplacian} each (), their weighted summands of the total), safe to use on the
        current stream."""
        if self._stream is not None:
            current = torch.cuda.current_stream(self._stream.device)
            current.wait_event(self._ready)
            for t in (*self._terms.values(), *self._weighted):
                t.record_stream(current)
        self._stream = None
        return self._terms, self._weighted


_SIDE_STREAMS: dict[tuple, "torch.cuda.Stream"] = {}


def _fork(device: torch.device, name: str, reads: tuple[torch.Tensor, ...]) -> "torch.cuda.Stream | None":
    """A side stream (one per device and name) that has waited for the current stream's work so far, for work
    that does not depend on what the current stream does next; None on the CPU and under torch.compile (run
    inline). `reads`: tensors made on the current stream that the side work reads (kept from reuse until it has)."""
    if device.type != "cuda" or torch.compiler.is_compiling():
        return None
    if (device, name) not in _SIDE_STREAMS:
        _SIDE_STREAMS[(device, name)] = torch.cuda.Stream(device=device)
    side = _SIDE_STREAMS[(device, name)]
    side.wait_stream(torch.cuda.current_stream(device))
    for t in reads:
        t.record_stream(side)
    return side


def _join(side: "torch.cuda.Stream | None", made: tuple[torch.Tensor, ...]) -> None:
    """The current stream waits for `side`'s work; `made` (tensors made there, read here) are kept from reuse
    until the current stream's work has read them. Fork and join are stream waits, which a CUDA-graph capture
    records as graph edges; autograd runs each op's backward on the stream of its forward."""
    if side is None:
        return
    current = torch.cuda.current_stream(side.device)
    current.wait_stream(side)
    for t in made:
        t.record_stream(current)


def start_prototype_terms(prototypes: torch.Tensor, faces: torch.Tensor, cfg: LossConfig) -> PrototypeTerms:
    """Start the prototype regularisers (prototypes (P, V, 3), faces (F, 3)) before the backbone runs.

    They do not depend on the image, so on CUDA they run on a side stream, concurrently with the backbone's
    forward, and their gradients are computed there too, right away (`terms_with_early_gradients`): a few
    hundred small kernels off the step's critical path. (Left to the step's backward, their gradients cost the
    graphed step 0.3 ms at B = 32 and 0.45 ms at B = 2 on an H200: `scripts/benchmark.py step --ablate`.)
    On the CPU, and while torch.compile traces, they are computed here, inline. The values are identical either
    way; the gradients differ in summation order only.
    """
    side = _fork(prototypes.device, "prototypes", (prototypes,))
    with _on(side), torch.autocast(device_type=prototypes.device.type, enabled=False):
        protos = prototypes.float()
        if side is None:
            return PrototypeTerms(prototype_terms(protos, faces, cfg), cfg, None)
        terms, fill_gradients = terms_with_early_gradients(protos, faces, cfg)
        early = PrototypeTerms(terms, cfg, side)  # the loss waits for these values only ...
        fill_gradients()  # ... not for their gradients, which the side stream computes beside the rest of the step
        return early


class TargetSort:
    """The target clouds sorted for the loss's searches, started early: `start_target_sort` launches the sort,
    `join()` hands the SortedCloud over to the caller's stream. Passed to `proto_depth_loss`."""

    def __init__(self, cloud: SortedCloud, stream: "torch.cuda.Stream | None"):
        self._cloud, self._stream = cloud, stream

    def join(self) -> SortedCloud:
        _join(self._stream, self._cloud.tensors())
        self._stream = None
        return self._cloud


def start_target_sort(target: torch.Tensor, lengths: torch.Tensor, level: SamplingLevel | None) -> TargetSort | None:
    """Sort the target clouds (B, N, 3), lengths (B,) for the loss's KNN searches before the backbone runs.

    The targets do not depend on the model, so on CUDA the sort runs on a side stream, beside the backbone's
    forward, instead of between the sampling and the searches. None where this step's `level` subsamples the
    targets: the loss then sorts the subset itself."""
    if level is not None and level.max_targets is not None and level.max_targets < target.shape[1]:
        return None
    side = _fork(target.device, "targets", (target, lengths))
    with _on(side):
        return TargetSort(sort_cloud(target.float(), lengths), side)


class _EarlyGradients(torch.autograd.Function):
    """Values whose gradients are computed outside the caller's backward: forward returns `values` (T,); backward
    returns sum_t grad_out[t] * grads[t] for prototypes, grads (T, P, V, 3) holding the gradient of each value
    by then (filled after this forward, on the same stream; kept unversioned for that reason)."""

    @staticmethod
    def forward(ctx, prototypes, values, grads):
        ctx.grads = grads
        return values.clone()

    @staticmethod
    def backward(ctx, grad_out):
        return torch.tensordot(grad_out, ctx.grads, dims=1), None, None


def terms_with_early_gradients(prototypes: torch.Tensor, faces: torch.Tensor,
                               cfg: LossConfig) -> tuple[dict[str, torch.Tensor], "Callable[[], None]"]:
    """`prototype_terms` of prototypes (P, V, 3) whose gradients are computed where this runs rather than in the
    caller's backward, which then only scales and sums them (one small kernel).

    -> (terms, fill_gradients): the values now; fill_gradients() then computes their gradients, and must run
    before the caller's backward, on the same stream (so a caller can hand the values over first)."""
    if not (prototypes.requires_grad and torch.is_grad_enabled()):
        return prototype_terms(prototypes, faces, cfg), lambda: None
    leaf = prototypes.detach().requires_grad_()
    terms = prototype_terms(leaf, faces, cfg)
    grads = prototypes.new_empty((len(terms), *prototypes.shape))
    values = _EarlyGradients.apply(prototypes, torch.stack([t.detach() for t in terms.values()]), grads)

    def fill_gradients() -> None:
        last = len(terms) - 1
        torch.stack([torch.autograd.grad(t, leaf, retain_graph=i < last, allow_unused=True,
                                         materialize_grads=True)[0] for i, t in enumerate(terms.values())], out=grads)

    return dict(zip(terms, values.unbind(0))), fill_gradients


def subsample_targets(target: torch.Tensor, lengths: torch.Tensor, n: int,
                      generator: torch.Generator | None = None,
                      keys: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A uniform random subset of at most n valid points per cloud: (B, N, 3), (B,) -> (B, min(n, N), 3), (B,).

    keys (B, N) uniform in [0, 1) rank the points (the n smallest valid ones are kept); None: drawn here with
    `generator`. Returns the inputs unchanged when every cloud already has <= n points."""
    B, N, _ = target.shape
    if n >= N:
        return target, lengths
    if keys is None:
        keys = torch.rand(B, N, device=target.device, generator=generator)
    keys = keys.masked_fill(torch.arange(N, device=target.device)[None] >= lengths[:, None], 2.0)  # padding last
    idx = keys.topk(n, dim=1, largest=False, sorted=False).indices  # (B, n)
    new_len = lengths.clamp(max=n)
    # put the valid picks first so the padding rule (valid prefix of length new_len) holds
    valid_first = torch.gather(keys, 1, idx).argsort(dim=1)
    idx = torch.gather(idx, 1, valid_first)
    sub = torch.gather(target, 1, idx[..., None].expand(-1, -1, 3))
    sub = sub * (torch.arange(n, device=target.device)[None, :, None] < new_len[:, None, None])
    return sub, new_len


def proto_depth_loss(
    slot_verts: torch.Tensor,
    prototypes: torch.Tensor,
    faces: torch.Tensor,
    target: torch.Tensor,
    lengths: torch.Tensor,
    cfg: LossConfig,
    level: SamplingLevel | None = None,
    generator: torch.Generator | None = None,
    draws: LossDraws | None = None,
    proto_terms: PrototypeTerms | None = None,
    target_sort: TargetSort | None = None,
) -> LossOutput:
    """Total loss = w_chamfer * hybrid Chamfer + w_edge * edge + w_normal * normal + w_laplacian * laplacian.

    slot_verts (B, K, V, 3), prototypes (P, V, 3), faces (F, 3), target (B, N, 3), lengths (B,).
    level: the sampling level of this step (progressive sampling); None = SamplingLevel(cfg.samples_per_slot, None).
    generator: for the random draws (samples on the slots, the target subset). draws: those draws given as
    tensors instead (`draw_uniforms(B, K, N, level)`), the form that `torch.compile(fullgraph=True)` traces;
    the samples then differ from the generator's for the same seed (faces picked by inverse cumulative area).
    proto_terms: the prototype regularisers started earlier (`start_prototype_terms(prototypes, faces, cfg)`,
    on a side stream on CUDA); None computes them here. prototypes is then not read.
    target_sort: the targets sorted earlier (`start_target_sort(target, lengths, level)`, the same tensors); None
    sorts them here.
    """
    if level is None:
        level = SamplingLevel(cfg.samples_per_slot, None)
    if target.shape[0] != slot_verts.shape[0]:
        raise ValueError(f"target: batch {target.shape[0]} does not match slot_verts batch {slot_verts.shape[0]}")
    # (a host read: skipped in capture_mode and under torch.compile; the data layer never yields an empty
    # cloud, it rejects frames without a valid depth pixel)
    if host_reads_allowed() and bool((lengths < 1).any()):
        raise ValueError("lengths: every target cloud needs at least one point (an empty cloud has no Chamfer)")
    with torch.autocast(device_type=slot_verts.device.type, enabled=False):
        slot_verts, target = slot_verts.float(), target.float()
        if level.max_targets is not None:
            keys = None if draws is None else draws.target_keys
            target, lengths = subsample_targets(target, lengths, level.max_targets, generator, keys)
        sorted_target = None if target_sort is None else target_sort.join()
        if sorted_target is not None and sorted_target.points is not target:
            raise ValueError("target_sort: sorts another tensor than target (start_target_sort(target, lengths, "
                             "level) with this step's level: None where the level subsamples the targets)")
        chamfer, terms, pred = hybrid_chamfer(slot_verts, faces, target, lengths, cfg, level.samples_per_slot,
                                              generator, draws, sorted_target)
        if proto_terms is None:
            proto_terms = PrototypeTerms(prototype_terms(prototypes.float(), faces, cfg), cfg, None)
        reg, (w_edge, w_normal, w_laplacian) = proto_terms.join()
        total = cfg.w_chamfer * chamfer + w_edge + w_normal + w_laplacian
    terms = {"chamfer": chamfer, **terms, **reg}
    return LossOutput(total, {k: v.detach() for k, v in terms.items()}, pred.detach())
