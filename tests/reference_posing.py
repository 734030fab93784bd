"""The original research code's per-slot, per-prototype posing loop: the reference that the vectorised
`protodepth.model.pose_slots` is tested against (tests/test_model.py). Slow on purpose; tests only."""
import torch

from protodepth.geometry import euler_angles_to_matrix
from protodepth.model import SlotParams


def pose_slots_loop(params: SlotParams, prototypes: torch.Tensor) -> torch.Tensor:
    """Posed slot vertices (B, K, V, 3) from SlotParams and prototypes (P, V, 3), one prototype at a time:
    slot_k = sum_p w_kp (R(e_kp) proto_p * s_k + t_kp)."""
    scale, trans, euler, weights = params
    B, K, P, _ = trans.shape
    out = []
    for b in range(B):
        slots = []
        for k in range(K):
            acc = torch.zeros_like(prototypes[0])
            for p in range(P):
                R = euler_angles_to_matrix(euler[b, k, p], "XYZ")
                v = (prototypes[p] @ R.T) * scale[b, k] + trans[b, k, p]
                acc = acc + weights[b, k, p] * v
            slots.append(acc)
        out.append(torch.stack(slots))
    return torch.stack(out)
