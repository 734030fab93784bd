"""Data-parallel gradient averaging without DDP's wrapper, for a step whose backward is replayed from a CUDA graph.

Why not DDP: DDP averages gradients from autograd hooks (its C++ reducer fills buckets as gradients become
ready and launches an all-reduce per full bucket). A CUDA-graph replay runs the recorded kernels without
autograd, so those hooks never fire and DDP would average nothing. Here every parameter's `.grad` is a view
into one flat buffer per (device, dtype); the graphed backward accumulates into those views in place (so the
capture records writes into the buffer), and the buffer is averaged in a few large bucketed all-reduces, with no
copy in or out. Two ways:
- `reduce_during_backward()` (what the trainer uses): post-accumulate-grad hooks launch each bucket's
  all-reduce as soon as the backward has written every gradient in it, so communication overlaps the rest of
  the backward, as DDP's reducer does. Inside a CUDA-graph capture the hooks run once and the graph records
  the NCCL all-reduces where they were launched, so every replay overlaps them the same way.
- `all_reduce_mean_()` after the backward (or the replay): simpler, nothing overlapped.

Backends: gloo on the CPU, NCCL on GPUs. NCCL collectives can be captured in a CUDA graph (NCCL >= 2.9.6) once
the communicator exists: the graph's eager warm-up steps make their all-reduces first.

Typical use (one process per GPU, process group already started, e.g. by Accelerate):

    broadcast_params_(list(model.parameters()) + list(model.buffers()))   # start from rank 0's weights
    grads = FlatGrads(model.parameters())
    for batch in loader:
        grads.zero_()                  # NOT optimizer.zero_grad(): set_to_none=True would detach the views
        with grads.reduce_during_backward():
            loss_fn(model, batch).backward()   # or capture this block once and graph.replay() it
        optimizer.step()

Unlike DDP, buffers (BatchNorm running statistics) are not synchronised at every forward: each rank keeps
statistics of its own data. Call `broadcast_params_(model.buffers())` before validating or saving to get
rank 0's, which is what DDP (broadcast_buffers=True) leaves.
"""
from __future__ import annotations

import bisect
import contextlib
from typing import Iterable, Iterator

import torch
import torch.distributed as dist

# Every view starts on a multiple of this many bytes, so vectorised kernels (fused Adam, foreach norms) see
# aligned addresses, as with a separately allocated gradient.
_ALIGN_BYTES = 64


def _is_dense(t: torch.Tensor) -> bool:
    """True when `t` covers exactly numel() consecutive elements in some dimension order (contiguous,
    channels-last, any permutation), so it fits a flat slice of that length."""
    dims = sorted((s, n) for s, n in zip(t.stride(), t.shape) if n != 1)
    expected = 1
    for stride, size in dims:
        if stride != expected:
            return False
        expected *= size
    return True


def _aligned(numel: int, elem_size: int) -> int:
    per = max(1, _ALIGN_BYTES // elem_size)
    return (numel + per - 1) // per * per


class FlatGrads:
    """One contiguous gradient buffer per (device, dtype); each parameter's `.grad` is a view of it.

    `params`: the parameters to synchronise (those without requires_grad are left out; a parameter given twice
    counts once). Each must be dense (contiguous or channels-last, see `_is_dense`). Its view has the
    parameter's shape, dtype and strides (a channels-last conv weight of shape (O, I, kH, kW) gets strides
    (I*kH*kW, 1, kW*I, I)), so a backward accumulates into it in place in the parameter's own layout.
    `bucket_mb`: size of one all-reduce, in MiB (25 like DDP's default); buckets are contiguous slices of a
    buffer, so they need no packing.
    `tail_bucket_mb`: the size of each buffer's first bucket, the last one launched. It holds the first
    layers, whose gradients a backward writes last, so its all-reduce is the part no backward work overlaps:
    small, like DDP's 1 MiB bucket (there the first one reduced, for the same reason at the other end).
    `overlap`: whether the owner averages inside the backward (`reduce_during_backward`, True) or after it
    (`all_reduce_mean_`, False); a flag for the trainer and the benchmarks, FlatGrads itself serves both.
    """

    def __init__(self, params: Iterable[torch.Tensor], bucket_mb: float = 25.0, overlap: bool = True,
                 tail_bucket_mb: float = 1.0):
        if bucket_mb <= 0 or tail_bucket_mb <= 0:
            raise ValueError(f"bucket_mb, tail_bucket_mb: got {bucket_mb}, {tail_bucket_mb}; both must be > 0")
        seen: set[int] = set()
        self.params: list[torch.Tensor] = []
        for p in params:
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                self.params.append(p)
        self.buffers: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
        self._views: list[torch.Tensor] = []
        self._offsets: list[int] = []  # each parameter's element offset in its buffer
        self._layout(self.params)
        self.bucket_bytes = int(bucket_mb * 2**20)
        self.tail_bytes = min(self.bucket_bytes, int(tail_bucket_mb * 2**20))
        self.overlap = overlap
        self.buckets: list[torch.Tensor] = []
        self._param_buckets: list[list[int]] = []  # the buckets each parameter's view overlaps
        # parameters the last backward under reduce_during_backward did not reach (None: none seen yet); later
        # backwards launch their buckets without waiting for them, as DDP does after find_unused_parameters
        self._unreached: set[int] | None = None
        self._bucket_layout()
        self.attach()

    def _layout(self, params: list[torch.Tensor]) -> None:
        """Give every parameter an aligned offset in its (device, dtype) buffer, allocate the zeroed buffers and
        make the strided views."""
        offsets, sizes = self._offsets, {}
        for p in params:
            if not _is_dense(p):
                raise ValueError(f"FlatGrads: a parameter of shape {tuple(p.shape)} with strides {p.stride()} "
                                 "is not dense (make it contiguous or channels-last)")
            key = (p.device, p.dtype)
            offsets.append(sizes.get(key, 0))
            sizes[key] = offsets[-1] + _aligned(p.numel(), p.element_size())
        for key, n in sizes.items():
            self.buffers[key] = torch.zeros(n, device=key[0], dtype=key[1])
        for p, off in zip(params, offsets):
            buf = self.buffers[(p.device, p.dtype)]
            self._views.append(buf.as_strided(p.shape, p.stride(), buf.storage_offset() + off))

    def _bucket_layout(self) -> None:
        """Split every buffer into a `tail_bytes` bucket, then buckets of `bucket_bytes`, and note which buckets
        each view overlaps."""
        first: dict[tuple, int] = {}
        starts: dict[tuple, list[int]] = {}  # element offset where each bucket of a buffer begins
        for key, buf in self.buffers.items():
            size = max(1, self.bucket_bytes // buf.element_size())
            begin = [0] + list(range(max(1, self.tail_bytes // buf.element_size()), buf.numel(), size))
            first[key], starts[key] = len(self.buckets), begin
            self.buckets.extend(buf.split([b - a for a, b in zip(begin, begin[1:] + [buf.numel()])]))
        for p, off in zip(self.params, self._offsets):
            key = (p.device, p.dtype)
            if p.numel() == 0:  # writes nothing: holds up no bucket
                self._param_buckets.append([])
                continue
            lo = bisect.bisect_right(starts[key], off) - 1
            hi = bisect.bisect_right(starts[key], off + p.numel() - 1) - 1
            self._param_buckets.append(list(range(first[key] + lo, first[key] + hi + 1)))

    def attach(self) -> None:
        """Point every parameter's `.grad` at its view again (after something set it to None or replaced it)."""
        for p, v in zip(self.params, self._views):
            # the identity test first: the .grad setter's checks cost ~2 us per parameter (0.3 ms for ResNet-50's
            # 161 on a CPU), which a host-bound step would pay every iteration
            if p.grad is not v:
                p.grad = v

    def zero_(self) -> None:
        """Zero all gradients (one fill per buffer) and re-attach the views."""
        for buf in self.buffers.values():
            buf.zero_()
        self.attach()

    def all_reduce_mean_(self, group: dist.ProcessGroup | None = None) -> None:
        """Average the gradients over the ranks of `group` (default: the whole world), in place.

        NCCL averages in the reduction; gloo has no AVG, so there it scales by 1/world first, then sums; all buckets are
        launched asynchronously, then waited on. A no-op without a process group or with one rank."""
        if not _world_above_one(group):
            return
        launcher = _BucketLauncher(self, group)
        launcher.finish()

    @contextlib.contextmanager
    def reduce_during_backward(self, group: dist.ProcessGroup | None = None) -> Iterator[None]:
        """Average the gradients over the ranks of `group` while the backward inside this block runs.

        Each bucket's all-reduce starts once the backward has accumulated every parameter that overlaps it (a
        post-accumulate-grad hook per parameter). Buckets start in one fixed order on every rank, as collectives
        must (the last bucket first: a backward produces the last layers' gradients first); a ready bucket waits
        for the buckets before it in that order. On leaving the block the buckets the backward never completed
        (parameters the loss does not reach) start too, and all are waited on; on an exception nothing more is
        launched. A parameter that one backward leaves unreached is not waited for in the next ones (until it is
        reached again); were it reached after its bucket had left, the hook raises instead of averaging a partial
        bucket. A plain block without a process group or with one rank."""
        if not _world_above_one(group):
            yield
            return
        launcher = _BucketLauncher(self, group)
        handles = [p.register_post_accumulate_grad_hook(launcher.hook(i)) for i, p in enumerate(self.params)]
        try:
            yield
        finally:
            for h in handles:
                h.remove()
        launcher.finish()
        launcher.note_reached()

    def backward_block(self, group: dist.ProcessGroup | None = None):
        """The block to run a backward in: `reduce_during_backward` with `overlap`, else a plain block (the
        owner then calls `after_backward`). The one place that reads `overlap`."""
        return self.reduce_during_backward(group) if self.overlap else contextlib.nullcontext()

    def after_backward(self, group: dist.ProcessGroup | None = None) -> None:
        """Average now, unless the backward already did (`overlap`)."""
        if not self.overlap:
            self.all_reduce_mean_(group)

    def numel(self) -> int:
        """Elements in all buffers, alignment padding included."""
        return sum(b.numel() for b in self.buffers.values())


def _world_above_one(group) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


class _BucketLauncher:
    """The all-reduces of one averaging of a FlatGrads: launched bucket by bucket as they become ready, in one
    order on every rank (descending bucket index), then waited on."""

    def __init__(self, grads: FlatGrads, group):
        self.grads, self.group = grads, group
        self.world = dist.get_world_size(group)
        # NCCL averages inside the reduction; gloo has no AVG: scale by 1/world, then sum
        self.op = dist.ReduceOp.AVG if dist.get_backend(group) == "nccl" else dist.ReduceOp.SUM
        self.skip = grads._unreached or set()  # not waited for: the last backward did not reach them
        self.missing = [0] * len(grads.buckets)  # parameters not yet accumulated, per bucket
        for i, buckets in enumerate(grads._param_buckets):
            for b in buckets:
                self.missing[b] += i not in self.skip
        self.reached: set[int] = set()
        self.next = len(grads.buckets) - 1  # the next bucket to launch, counting down
        self.works: list = []

    def hook(self, index: int):
        view = self.grads._views[index]

        def ready(param: torch.Tensor) -> None:
            if param.grad is not view:  # the sum would miss this gradient; say so rather than average stale zeros
                raise RuntimeError("FlatGrads: the backward replaced a parameter's .grad instead of accumulating "
                                   "into its flat-buffer view (was the view detached, e.g. by zero_grad(set_to_none"
                                   "=True), without FlatGrads.zero_() or attach() after it?)")
            self.reached.add(index)
            if index in self.skip:
                if any(b > self.next for b in self.grads._param_buckets[index]):
                    raise RuntimeError("FlatGrads: a parameter the previous backward did not reach has a gradient "
                                       "now, after its bucket's all-reduce started; the model's graph changes "
                                       "between steps, which the overlapped all-reduce does not support (set "
                                       "FlatGrads.overlap=False)")
                return
            for b in self.grads._param_buckets[index]:
                self.missing[b] -= 1
            self._launch_ready()
        return ready

    def _launch_ready(self) -> None:
        while self.next >= 0 and self.missing[self.next] == 0:
            self._launch(self.next)

    def _launch(self, b: int) -> None:
        bucket = self.grads.buckets[b]
        if self.op == dist.ReduceOp.SUM:
            bucket.mul_(1.0 / self.world)
        self.works.append(dist.all_reduce(bucket, op=self.op, group=self.group, async_op=True))
        self.next = b - 1

    def finish(self) -> None:
        while self.next >= 0:
            self._launch(self.next)
        for w in self.works:
            w.wait()

    def note_reached(self) -> None:
        """After a backward: remember which parameters it left unreached, for the next one."""
        self.grads._unreached = set(range(len(self.grads.params))) - self.reached


def broadcast_params_(tensors: Iterable[torch.Tensor], src: int = 0, group: dist.ProcessGroup | None = None) -> None:
    """Overwrite `tensors` (parameters, buffers, any tensors of equal shapes on every rank) with rank `src`'s
    values, as DDP does at construction. One broadcast per (device, dtype) of a packed copy, so channels-last
    tensors need no special handling. A no-op without a process group or with one rank."""
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size(group) == 1:
        return
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.device, t.dtype), []).append(t)
    with torch.no_grad():
        for ts in groups.values():
            flat = torch.cat([t.reshape(-1) for t in ts])
            dist.broadcast(flat, src=src, group=group)
            for t, part in zip(ts, flat.split([t.numel() for t in ts])):
                t.copy_(part.view(t.shape))
