"""One training micro-step (forward, loss, backward) captured in a CUDA graph and replayed.

Why: the eager step is host-bound. At batch 32 it launches about 1 500 kernels from Python and the GPU sits idle
more than half of each step (BENCHMARKS.md). A replay launches the whole captured step with one call.

What a graph needs, and how this module provides it:
- Static shapes. Every input is copied into a fixed buffer. Target clouds are zero-padded to the largest cloud the
  data can give (`max_points`), and `lengths` says which points are real. The padding changes no result except
  one: while progressive sampling caps the targets, the random subset drawn from a padded cloud differs from the
  eager step's. Each mode is deterministic on its own.
- No host reads during capture. The capture runs inside `protodepth.geometry.capture_mode()`, in which the
  geometry's value checks that would read device values skip themselves. They run in the eager warm-up steps, and the trainer checks every step's loss and
  gradient norm for non-finite values after the replay.
- Random numbers. The point-sampling generator is registered with every graph. Re-seeding it before a replay gives
  the draws an eager step with that seed would make.
- Gradients. Each graph's backward writes its own static `.grad` tensors. After a replay they are put back on the
  parameters (a pointer assignment, no copy), and the optimizer step runs outside the graph, so the trainer can still
  skip a non-finite step, clip, and change the learning rate.
- Progressive sampling. There is one graph per distinct (samples_per_slot, max_targets). The ramps only go up,
  so capturing a new level drops the graphs of the others, and their memory returns to the shared pool.
- Cached geometry. The captured mesh losses read the cached topology tensors by address; the object keeps
  references to them, so that a cache eviction cannot free memory a replay still reads.

Data parallel: DDP's reducer hooks do not run inside a replay, so several processes pass a
`protodepth.grad_sync.FlatGrads` as `grad_sync`: the captured backward accumulates every gradient into one flat
buffer, and (with `grad_sync.overlap`) the capture also records each bucket's NCCL all-reduce where the backward
completed that bucket, so every replay averages the gradients while the rest of the backward runs. Without
`overlap` the trainer all-reduces the buffer after the replay. Limits: no DeepSpeed (its engine owns backward and step), no gradient
accumulation, no fp16 grad scaler; `blocker()` below is the one place that says which runs can use graphs.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Callable, NamedTuple

import torch
from torch.utils._pytree import tree_map

from protodepth.errors import GraphCaptureError


class _Captured(NamedTuple):
    graph: torch.cuda.CUDAGraph
    outputs: Any  # whatever step_fn returned during capture: static tensors that each replay overwrites
    grads: list  # the static .grad tensor of each parameter (None where the loss does not reach it)


class GraphedStep:
    """Run `step_fn` eagerly for `warmup` calls per shape key, then capture it once and replay it.

    step_fn(image, cloud, lengths, key, generator) -> (outputs, loss) runs the forward pass and the loss; this class
    calls `loss.backward()`. `key` is a hashable tuple of Python values that change the captured work (for the
    trainer, (samples_per_slot, max_targets)). Inputs: image (B, C, H, W) any float layout, cloud (B, N, 3) with
    N <= max_points, lengths (B,) int64; all on one CUDA device, B, C, H, W fixed for the life of the object.
    After each call every parameter's `.grad` holds this step's gradient (None for parameters the loss does not
    reach), exactly as after an eager `loss.backward()` from zeroed gradients.
    """

    def __init__(self, step_fn: Callable, params: list[torch.nn.Parameter], generator: torch.Generator,
                 max_points: int, warmup: int = 2, grad_sync=None):
        if generator.device.type != "cuda":
            raise ValueError(f"generator: CUDA graphs need a CUDA generator, got one on {generator.device}")
        if max_points < 1:
            raise ValueError(f"max_points: expected >= 1, got {max_points}")
        self.step_fn, self.params, self.gen = step_fn, list(params), generator
        self.max_points, self.warmup = max_points, warmup
        # grad_sync (FlatGrads, data parallel): every p.grad is a view into one flat buffer that the caller zeroes;
        # the captured backward accumulates into those views, and a replay writes them in place; otherwise each
        # graph's backward allocates its own static .grad tensors.
        self.grad_sync = grad_sync
        self.keep_grads = grad_sync is not None
        self.graphs: dict[tuple, _Captured] = {}
        self.eager_calls: dict[tuple, int] = {}
        self.pool = None
        self.keep_alive: list = []  # tensors the graphs read by address but nothing else may still hold
        self.static: dict[str, torch.Tensor] = {}
        self.side = torch.cuda.Stream(device=generator.device)

    def _load(self, image: torch.Tensor, cloud: torch.Tensor, lengths: torch.Tensor) -> None:
        """Copy this batch into the static buffers (made on the first call, with the first image's layout)."""
        n = cloud.shape[1]
        if n > self.max_points:
            raise ValueError(f"cloud: {n} points per image, more than the {self.max_points} the graph was sized for "
                             "(data.num_bins * data.points_per_bin)")
        if not self.static:
            self.static = {
                "image": torch.empty_like(image),
                "cloud": torch.zeros(cloud.shape[0], self.max_points, 3, dtype=cloud.dtype, device=cloud.device),
                "lengths": torch.empty_like(lengths),
            }
        s = self.static
        if image.shape != s["image"].shape or cloud.shape[0] != s["cloud"].shape[0]:
            raise ValueError(f"image: shape {tuple(image.shape)} differs from the captured {tuple(s['image'].shape)}; "
                             "a CUDA-graph step needs a fixed batch (drop_last) and image size")
        s["image"].copy_(image, non_blocking=True)
        s["cloud"][:, :n].copy_(cloud, non_blocking=True)
        if n < self.max_points:
            s["cloud"][:, n:].zero_()
        s["lengths"].copy_(lengths, non_blocking=True)

    def _run(self, key: tuple):
        s = self.static
        outputs, loss = self.step_fn(s["image"], s["cloud"], s["lengths"], key, self.gen)
        # captured with overlap: the all-reduces become part of the graph
        with nullcontext() if self.grad_sync is None else self.grad_sync.backward_block():
            loss.backward()
        # Detached: an output that still holds the autograd graph keeps its AccumulateGrad nodes alive, and a
        # node made on the warm-up stream then runs the next (captured) backward's accumulation on that stream.
        return tree_map(lambda x: x.detach() if isinstance(x, torch.Tensor) else x, outputs)

    def __call__(self, image: torch.Tensor, cloud: torch.Tensor, lengths: torch.Tensor, key: tuple, seed: int):
        """One micro-step on this batch; returns step_fn's outputs (static tensors, valid until the next call)."""
        self._load(image, cloud, lengths)
        if not self.keep_grads:
            for p in self.params:
                p.grad = None
        captured = self.graphs.get(key)
        if captured is None and self.eager_calls.get(key, 0) < self.warmup:
            # Warm-up on a side stream, as the CUDA-graph docs ask: cuDNN autotuning, Triton compilation and
            # the caching allocator's first allocations happen here, outside any capture.
            self.eager_calls[key] = self.eager_calls.get(key, 0) + 1
            self.side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.side):
                self.gen.manual_seed(seed)
                outputs = self._run(key)
            torch.cuda.current_stream().wait_stream(self.side)
            return outputs
        if captured is None:
            captured = self._capture(key, seed)
        self.gen.manual_seed(seed)
        captured.graph.replay()
        if not self.keep_grads:
            for p, g in zip(self.params, captured.grads):
                p.grad = g
        return captured.outputs

    def _capture(self, key: tuple, seed: int) -> _Captured:
        from protodepth.geometry import capture_mode
        from protodepth.geometry.mesh_losses import cached_topologies

        self.graphs.clear()  # a new level: the earlier ones are not replayed again (their memory goes to the pool)
        graph = torch.cuda.CUDAGraph()
        # a registered generator reads its seed and offset from device memory at every replay, so manual_seed
        # before replay() takes effect inside the graph
        graph.register_generator_state(self.gen)
        self.gen.manual_seed(seed)
        # thread_local: the DataLoader's pin-memory thread may allocate pinned memory while we capture
        try:
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"), capture_mode():
                outputs = self._run(key)
        except RuntimeError as e:
            # e.g. an op that reads a device value on the host; say how to keep training meanwhile
            raise GraphCaptureError(f"CUDA graph capture of the training step failed: {e}; "
                                    "train.cuda_graphs=false trains without graphs") from e
        # Later graphs may reuse this graph's freed temporaries, so replaying one graph can overwrite another's
        # outputs: only the outputs of the latest replay are valid, which is all a training step reads.
        self.pool = graph.pool()
        captured = _Captured(graph, outputs, [p.grad for p in self.params])
        self.graphs[key] = captured
        self.keep_alive = cached_topologies()
        return captured


def config_blocker(cfg) -> str | None:
    """Why the config alone rules out CUDA graphs (None: it allows them). Config validation (`true`) and the
    runtime (`auto`, through `blocker`) both ask here, so each reason has one wording."""
    t = cfg.train
    if t.grad_accum > 1:
        return ("needs train.grad_accum=1: one process's captured backward assigns its gradients instead of adding "
                "to them")
    if t.mixed_precision == "fp16":
        return "does not work with fp16's grad scaler; bf16 does"
    if t.compile:
        return "is not combined with train.compile (both cut launch overhead; choose one)"
    if cfg.progressive.shape in ("linear", "cosine"):
        # every new (samples, targets) pair is a new capture with its own memory: plateaus only
        return (f"progressive.shape={cfg.progressive.shape} changes the point counts every step; "
                "progressive.shape=step (num_levels plateaus, one graph each) works with graphs")
    return None


def blocker(cfg, device: torch.device, deepspeed: bool, world: int = 1) -> str | None:
    """Why this run cannot replay its step from CUDA graphs (None: it can)."""
    if device.type != "cuda":
        return f"needs a CUDA GPU, this run is on {device}"
    if deepspeed:
        return "does not run under DeepSpeed: its engine owns the backward and the optimizer step"
    if world > 1 and cfg.train.data_parallel == "ddp":
        return ("train.data_parallel=ddp averages gradients from autograd hooks, which do not run inside a replay; "
                "train.data_parallel=auto (or flat) works with graphs")
    why = config_blocker(cfg)
    if why:
        return why
    from protodepth.geometry.knn import _use_triton

    if not _use_triton():
        return ("needs the Triton KNN (PROTODEPTH_DISABLE_TRITON is set or triton is missing); its torch "
                "fallback copies values to the GPU on every call, which a capture does not allow")
    return None
