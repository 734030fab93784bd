"""A small loss problem shared by the compile and capture-mode tests: 2 images, 3 slots of a level-1 icosphere."""
import torch

from protodepth.config import LossConfig
from protodepth.geometry import ico_sphere
from protodepth.loss import SamplingLevel


def small_loss_problem(seed: int = 0):
    """-> (slot_verts (2, 3, V, 3), prototypes (2, V, 3), both requiring grad, faces (F, 3), target (2, 40, 3),
    lengths (2,), LossConfig, SamplingLevel(8, 30), generator after the draws)."""
    verts, faces = ico_sphere(1)
    g = torch.Generator().manual_seed(seed)
    slot_verts = (verts[None, None] * 0.5 + torch.randn(2, 3, 1, 3, generator=g)).requires_grad_()
    protos = (verts[None].repeat(2, 1, 1) + 0.05 * torch.randn(2, verts.shape[0], 3, generator=g)).requires_grad_()
    target = torch.randn(2, 40, 3, generator=g)
    return slot_verts, protos, faces, target, torch.tensor([40, 17]), LossConfig(samples_per_slot=8), \
        SamplingLevel(8, 30), g
