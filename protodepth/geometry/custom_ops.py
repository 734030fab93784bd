"""The geometry ops as `torch.library` custom ops, so that `torch.compile(..., fullgraph=True)` traces through them.

What breaks a trace inside the plain ops: the KNN search walks blocks in Python loops and launches Triton kernels
with host-side heuristics; the mesh losses look their topology up in a cache keyed by the faces tensor's identity
(data-dependent shapes: unique edges, face pairs). Behind a custom op boundary the tracer sees one opaque op with
a fake (meta) implementation that gives the output shapes, and runs the real code at run time.

- `protodepth::knn_points(p1, p2, lengths1, lengths2, K, norm) -> (dists, idx)`: on CUDA the Triton kernels
  (the blocked PyTorch search when Triton is disabled or K > 128 / D > 16), elsewhere the PyTorch search.
  Its backward is `protodepth::knn_points_backward`, on CUDA the Triton backward.
- `protodepth::mesh_loss(verts, faces, kind, target_length) -> ()`: kind one of "edge", "normal", "uniform",
  "cot", "cotcurv" (the Laplacians). Its backward `protodepth::mesh_loss_backward` re-evaluates the loss under
  autograd (the mesh losses are a few cheap gathers; recomputing them saves storing their intermediates).

The public functions (`knn_points`, `mesh_edge_loss`, ...) call these ops only while torch.compile traces
(`torch.compiler.is_compiling()`); eagerly they call the same implementations directly, which saves the custom
op's dispatch cost (tens of microseconds a call) on the eager path. Input validation stays in the public
functions, outside the ops; under compile it makes no host reads (see `_mode.py`).
"""
import torch

from . import knn as _knn
from . import mesh_losses as _mesh


def _knn_impl_torch(p1: torch.Tensor, p2: torch.Tensor, lengths1: torch.Tensor, lengths2: torch.Tensor,
                    K: int, norm: int) -> tuple[torch.Tensor, torch.Tensor]:
    # autocast would run the ranking matmul in bf16/fp16, far too coarse to rank neighbours
    with torch.autocast(device_type=p1.device.type, enabled=False):
        return _knn._knn_forward(p1, p2, lengths1, lengths2, K, norm)


@torch.library.custom_op("protodepth::knn_points", mutates_args=())
def knn_points_op(p1: torch.Tensor, p2: torch.Tensor, lengths1: torch.Tensor, lengths2: torch.Tensor,
                  K: int, norm: int) -> tuple[torch.Tensor, torch.Tensor]:
    """p1 (N, P1, D), p2 (N, P2, D), lengths int64 (N,) -> dists (N, P1, K) (float32 for half inputs),
    idx (N, P1, K) int64; knn.py's padding rules."""
    return _knn_impl_torch(p1, p2, lengths1, lengths2, K, norm)


@knn_points_op.register_kernel("cuda")
def _knn_points_cuda(p1, p2, lengths1, lengths2, K, norm):
    if not _knn._use_triton():
        return _knn_impl_torch(p1, p2, lengths1, lengths2, K, norm)
    from . import knn_triton

    if K > knn_triton.MAX_K or p1.shape[2] > knn_triton.MAX_D:  # beyond one program's registers
        return _knn_impl_torch(p1, p2, lengths1, lengths2, K, norm)
    return knn_triton._knn_forward(p1, p2, lengths1, lengths2, K, norm)


@knn_points_op.register_fake
def _knn_points_fake(p1, p2, lengths1, lengths2, K, norm):
    n, p1_len, _ = p1.shape
    dtype = _knn._compute_dtype(p1.dtype)
    return p1.new_empty((n, p1_len, K), dtype=dtype), p1.new_empty((n, p1_len, K), dtype=torch.int64)


@torch.library.custom_op("protodepth::knn_points_backward", mutates_args=())
def knn_points_backward_op(p1: torch.Tensor, p2: torch.Tensor, lengths1: torch.Tensor, lengths2: torch.Tensor,
                           idx: torch.Tensor, grad_dists: torch.Tensor, norm: int, want_p1: bool,
                           want_p2: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (grad_p1 (N, P1, D), grad_p2 (N, P2, D)); an unwanted one is an empty (0,) tensor (an op can't return
    None)."""
    with torch.autocast(device_type=p1.device.type, enabled=False):
        g1, g2 = _knn._knn_backward_torch(p1, p2, lengths1, lengths2, idx, grad_dists, norm, want_p1, want_p2)
    return _or_empty(g1, p1), _or_empty(g2, p2)


@knn_points_backward_op.register_kernel("cuda")
def _knn_points_backward_cuda(p1, p2, lengths1, lengths2, idx, grad_dists, norm, want_p1, want_p2):
    from . import knn_triton

    if not _knn._use_triton() or idx.shape[2] > knn_triton.MAX_K or p1.shape[2] > knn_triton.MAX_D:
        g1, g2 = _knn._knn_backward_torch(p1, p2, lengths1, lengths2, idx, grad_dists, norm, want_p1, want_p2)
    else:
        g1, g2 = knn_triton._knn_backward(p1, p2, lengths1, lengths2, idx, grad_dists, norm, want_p1, want_p2)
    return _or_empty(g1, p1), _or_empty(g2, p2)


@knn_points_backward_op.register_fake
def _knn_points_backward_fake(p1, p2, lengths1, lengths2, idx, grad_dists, norm, want_p1, want_p2):
    return (torch.empty_like(p1) if want_p1 else p1.new_empty(0),
            torch.empty_like(p2) if want_p2 else p2.new_empty(0))


def _or_empty(grad, like: torch.Tensor) -> torch.Tensor:
    return like.new_empty(0) if grad is None else grad


def _knn_setup_context(ctx, inputs, output):
    p1, p2, lengths1, lengths2, K, norm = inputs
    ctx.save_for_backward(p1, p2, lengths1, lengths2, output[1])
    ctx.norm = norm
    ctx.mark_non_differentiable(output[1])


def _knn_backward(ctx, grad_dists, grad_idx):
    p1, p2, lengths1, lengths2, idx = ctx.saved_tensors
    want_p1, want_p2 = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    g1, g2 = knn_points_backward_op(p1, p2, lengths1, lengths2, idx, grad_dists.contiguous(), ctx.norm,
                                    want_p1, want_p2)
    return (g1 if want_p1 else None), (g2 if want_p2 else None), None, None, None, None


knn_points_op.register_autograd(_knn_backward, setup_context=_knn_setup_context)


MESH_LOSS_KINDS = ("edge", "normal", "uniform", "cot", "cotcurv")


_mesh_loss_eager = _mesh.eager_mesh_loss


@torch.library.custom_op("protodepth::mesh_loss", mutates_args=())
def mesh_loss_op(verts: torch.Tensor, faces: torch.Tensor, kind: str, target_length: float) -> torch.Tensor:
    """verts (M, V, 3), faces (F, 3) or (M, F, 3) int64, a non-empty batch -> () the mesh loss `kind`."""
    return _mesh_loss_eager(verts, faces, kind, target_length)


@mesh_loss_op.register_fake
def _mesh_loss_fake(verts, faces, kind, target_length):
    return verts.new_empty(())


@torch.library.custom_op("protodepth::mesh_loss_backward", mutates_args=())
def mesh_loss_backward_op(grad: torch.Tensor, verts: torch.Tensor, faces: torch.Tensor, kind: str,
                          target_length: float) -> torch.Tensor:
    """grad () -> grad_verts (M, V, 3), by evaluating the loss again under autograd."""
    # torch.func, not torch.autograd.grad: a custom op's body runs below the autograd dispatch key, where
    # requires_grad records nothing; functorch's transform brings its own autograd layer
    _, vjp = torch.func.vjp(lambda v: _mesh_loss_eager(v, faces, kind, target_length), verts)
    return vjp(grad)[0]


@mesh_loss_backward_op.register_fake
def _mesh_loss_backward_fake(grad, verts, faces, kind, target_length):
    return torch.empty_like(verts)


def _mesh_setup_context(ctx, inputs, output):
    verts, faces, kind, target_length = inputs
    ctx.save_for_backward(verts, faces)
    ctx.kind, ctx.target_length = kind, target_length


def _mesh_backward(ctx, grad):
    verts, faces = ctx.saved_tensors
    return mesh_loss_backward_op(grad, verts, faces, ctx.kind, ctx.target_length), None, None, None


mesh_loss_op.register_autograd(_mesh_backward, setup_context=_mesh_setup_context)
