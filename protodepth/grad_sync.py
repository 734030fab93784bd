"""Data-parallel gradient averaging without DDP's wrapper, for a step whose backward is replayed from a CUDA graph.

Why not DDP: DDP averages gradients from autograd hooks (its C++ reducer fills buckets as gradients become
ready and launches an all-reduce per full bucket). A CUDA-graph replay runs the recorded kernels without
autograd, so those hooks never fire and DDP would average nothing. Here every parameter's `.grad` is a view
into one flat buffer per (device, dtype); the graphed backward accumulates into those views in place (so the
capture records writes into the buffer), and after the replay `FlatGrads.all_reduce_mean_` averages the buffer
in a few large bucketed all-reduces, with no copy in or out.

Backends: gloo on the CPU, NCCL on GPUs. With NCCL the all-reduce can itself be captured inside the graph
(NCCL >= 2.9.6; see PyTorch's CUDA-graph notes: `TORCH_NCCL_ASYNC_ERROR_HANDLING=0` before the process group
starts, eager warm-up iterations first); calling it outside the graph, right after the replay, needs nothing
special.

Typical use (one process per GPU, process group already started, e.g. by Accelerate):

    broadcast_params_(list(model.parameters()) + list(model.buffers()))   # start from rank 0's weights
    grads = FlatGrads(model.parameters())
    for batch in loader:
        grads.zero_()                  # NOT optimizer.zero_grad(): set_to_none=True would detach the views
        loss_fn(model, batch).backward()   # or graph.replay()
        grads.all_reduce_mean_()
        optimizer.step()

Unlike DDP, buffers (BatchNorm running statistics) are not synchronised at every forward: each rank keeps
statistics of its own data. Call `broadcast_params_(model.buffers())` before validating or saving to get
rank 0's, which is what DDP (broadcast_buffers=True) leaves.
"""
from __future__ import annotations

from typing import Iterable

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
    """

    def __init__(self, params: Iterable[torch.Tensor], bucket_mb: float = 25.0):
        if bucket_mb <= 0:
            raise ValueError(f"bucket_mb: got {bucket_mb}, must be > 0")
        seen: set[int] = set()
        self.params: list[torch.Tensor] = []
        for p in params:
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                self.params.append(p)
        self.buffers: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
        self._views: list[torch.Tensor] = []
        self._layout(self.params)
        self.bucket_bytes = int(bucket_mb * 2**20)
        self.buckets: list[torch.Tensor] = [
            b for buf in self.buffers.values() for b in buf.split(max(1, self.bucket_bytes // buf.element_size()))]
        self.attach()

    def _layout(self, params: list[torch.Tensor]) -> None:
        """Give every parameter an aligned offset in its (device, dtype) buffer, allocate the zeroed buffers and
        make the strided views."""
        offsets, sizes = [], {}
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
        if not dist.is_available() or not dist.is_initialized():
            return
        world = dist.get_world_size(group)
        if world == 1:
            return
        if dist.get_backend(group) == "nccl":  # NCCL averages inside the reduction: no extra pass over the buffer
            op = dist.ReduceOp.AVG
        else:
            op = dist.ReduceOp.SUM
            for buf in self.buffers.values():
                buf.mul_(1.0 / world)
        works = [dist.all_reduce(b, op=op, group=group, async_op=True) for b in self.buckets]
        for w in works:
            w.wait()

    def numel(self) -> int:
        """Elements in all buffers, alignment padding included."""
        return sum(b.numel() for b in self.buffers.values())


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
