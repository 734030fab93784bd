"""The validation pass: the same loss as training on the validation split, with a fixed point draw."""
from __future__ import annotations

import torch

from protodepth.loss import proto_depth_loss


@torch.no_grad()
def validate(accelerator, model, faces: torch.Tensor, batches, cfg) -> dict[str, float]:
    """Mean of every loss term over the validation split (or its first `train.val_batches` batches), all
    ranks together -> {"val/total": ..., "val/chamfer": ..., ...}; {} when there is nothing to validate."""
    t = cfg.train
    model.eval()
    gen = torch.Generator(device=accelerator.device).manual_seed(t.seed + 1)  # same samples every time
    sums: dict[str, torch.Tensor] = {}
    n = torch.zeros((), device=accelerator.device)
    for i, batch in enumerate(batches):
        if t.val_batches and i >= t.val_batches:
            break
        with accelerator.autocast():
            scene = model(batch["image"])
        res = proto_depth_loss(scene.slot_verts, scene.prototypes, faces, batch["cloud"], batch["lengths"],
                               cfg.loss, generator=gen)
        bs = batch["image"].shape[0]
        for k, v in {"total": res.total, **res.terms}.items():
            sums[k] = sums.get(k, 0) + v.float() * bs
        n += bs
    model.train()
    if not sums:
        return {}
    keys = sorted(sums)
    stacked = accelerator.reduce(torch.stack([sums[k] for k in keys] + [n]), reduction="sum")
    return {f"val/{k}": (stacked[i] / stacked[-1]).item() for i, k in enumerate(keys)}
