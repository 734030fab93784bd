"""`TrainStep`: the one training step that the trainer, the graph tests and the benchmarks all run.

It is the only code that runs forward, loss, backward, gradient synchronisation, clipping and the optimizer
step. One call consumes one micro-batch; at the end of an accumulation window (Accelerate's
`sync_gradients`) it also steps the optimizer. Two ways to run forward + loss + backward:
- eager: Python launches every kernel;
- graphed (`train.cuda_graphs`): replayed from a CUDA graph per sampling level (protodepth/cuda_graphs.py).
Gradients are averaged across ranks by DDP (eager, Accelerate's wrapper), by DeepSpeed's engine, or by
`FlatGrads` (one flat buffer, all-reduced bucket by bucket during the backward, or after it when
`grad_sync.overlap` is off; what a replayed backward needs, since DDP's reducer hooks do not run inside a
replay, while the graph can hold FlatGrads' all-reduces).
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import NamedTuple

import torch

from protodepth.config import Config
from protodepth.loss import LossOutput, SamplingLevel, proto_depth_loss, start_prototype_terms, start_target_sort
from protodepth.model import SceneOutput
from protodepth.schedules import SamplingSchedule, lr_factor
from protodepth.training.nonfinite import NonFiniteGuard, NonFiniteOutput, output_error


class StepOutput(NamedTuple):
    scene: SceneOutput  # slot_verts (B, K, V, 3), prototypes (P, V, 3); static tensors under graphs
    loss: LossOutput
    grad_norm: torch.Tensor | None  # () fp64, set when the optimizer stepped (None under DeepSpeed)
    synced: bool  # the optimizer stepped: the end of an accumulation window


def grad_norm(params: list[torch.nn.Parameter]) -> torch.Tensor:
    """Global L2 norm of the gradients, accumulated in float64: 1e19-sized fp32 gradients (a diverging
    step) square past float32's range, and the norm must then say inf only if it truly is."""
    grads = [p.grad for p in params if p.grad is not None]
    norms = torch._foreach_norm(grads, 2, dtype=torch.float64)
    return torch.linalg.vector_norm(torch.stack(norms))


def micro_seed(seed: int, step: int, micro: int, rank: int) -> int:
    """The sampling seed of one micro-batch: a function of (seed, step, micro-batch, rank) only, so a resumed
    run samples exactly what an uninterrupted one did, whatever else consumed random numbers in between."""
    return (((seed * 1_000_003 + step) * 64 + micro) * 4096 + rank) % 2**63


class TrainStep:
    def __init__(self, cfg: Config, accelerator, model, optimizer, faces: torch.Tensor, *,
                 graphed: bool = False, grad_sync=None, guard: NonFiniteGuard | None = None,
                 deepspeed: bool = False):
        self.cfg, self.accelerator, self.model, self.optimizer = cfg, accelerator, model, optimizer
        self.faces, self.grad_sync = faces, grad_sync
        self.deepspeed = deepspeed  # the engine owns backward, clipping and the optimizer step
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.module = accelerator.unwrap_model(model)  # the ProtoDepth inside DDP / torch.compile wrappers
        self.inner_optimizer = getattr(optimizer, "optimizer", optimizer)
        self.guard = guard or NonFiniteGuard(cfg.train.on_nonfinite, cfg.train.mixed_precision == "fp16",
                                             accelerator.process_index, accelerator.device, deferred=False)
        self.levels = SamplingSchedule(cfg)
        self.gen = torch.Generator(device=accelerator.device)  # point sampling; re-seeded every micro-batch
        self.micro, self.paths = 0, []
        self.graphed = None
        if graphed:
            from protodepth.cuda_graphs import GraphedStep

            self.graphed = GraphedStep(self.forward_loss, self.params, self.gen, max_points=self.levels.full_targets,
                                       grad_sync=grad_sync)

    def forward_loss(self, image, cloud, lengths, level: SamplingLevel, generator):
        """Forward pass and loss of one micro-batch -> ((scene, loss output), total loss)."""
        # The prototype regularisers do not read the image: on CUDA they run on a side stream beside the backbone.
        # Not under DeepSpeed, whose engine should see its parameters used inside its own forward only.
        early = None if self.deepspeed else start_prototype_terms(self.module.prototypes(), self.faces, self.cfg.loss)
        # The targets' sort for the KNN searches does not read the model either: on CUDA it runs beside the backbone.
        targets = start_target_sort(cloud, lengths, level)
        with self.accelerator.autocast():
            scene = self.model(image)  # slot_verts (B, K, V, 3), prototypes (P, V, 3)
        try:
            res = proto_depth_loss(scene.slot_verts, scene.prototypes, self.faces, cloud, lengths, self.cfg.loss,
                                   level=level, generator=generator, proto_terms=early, target_sort=targets)
        except ValueError:
            # the geometry refuses non-finite vertices; then the weights themselves have overflowed
            if bool(torch.isfinite(scene.slot_verts.detach()).all()):
                raise
            raise NonFiniteOutput() from None
        return (scene, res), res.total

    def _forward_backward(self, batch: dict, level: SamplingLevel, seed: int) -> tuple[SceneOutput, LossOutput]:
        if self.graphed is not None:  # forward, loss and backward in one replay; grads land in p.grad
            return self.graphed(batch["image"], batch["cloud"], batch["lengths"], level, seed)
        self.gen.manual_seed(seed)
        (scene, res), total = self.forward_loss(batch["image"], batch["cloud"], batch["lengths"], level, self.gen)
        # FlatGrads averages during the accumulation window's last backward (or after it, without overlap)
        sync = self.grad_sync is not None and self.accelerator.sync_gradients
        with self.grad_sync.backward_block() if sync else nullcontext():
            self.accelerator.backward(total)
        return scene, res

    def __call__(self, batch: dict, step: int, epoch: int) -> StepOutput:
        """One micro-batch of optimizer step `step + 1` (`step` steps done)."""
        acc = self.accelerator
        self.paths.extend(batch["paths"])
        with acc.accumulate(self.model):
            seed = micro_seed(self.cfg.train.seed, step, self.micro, acc.process_index)
            self.micro = 0 if acc.sync_gradients else self.micro + 1
            try:
                scene, res = self._forward_backward(batch, self.levels(step), seed)
            except NonFiniteOutput:
                raise output_error(step + 1, epoch, acc.process_index, self.paths) from None
            self.guard.observe(res.total, scene.slot_verts)
            if not acc.sync_gradients:
                return StepOutput(scene, res, None, False)
            norm = self._sync_and_clip()
            if self.guard.gate(acc, norm, self.inner_optimizer, step + 1, epoch, self.paths):
                self.optimizer.step()
            elif acc.scaler is not None:  # a dropped fp16 step: the scaler still closes this step's unscale_()
                acc.scaler.update()
            self.zero_grad()
            self.paths = []
            self.set_lr(step + 1)
            return StepOutput(scene, res, norm, True)

    def _sync_and_clip(self) -> torch.Tensor | None:
        """Average gradients across ranks (FlatGrads), unscale (fp16), clip; the norm before clipping."""
        if self.deepspeed:  # the engine clipped (optim.grad_clip, on its plugin) and stepped inside backward
            norm = self.model.get_global_grad_norm()
            return None if norm is None else torch.as_tensor(float(norm), dtype=torch.float64)
        if self.grad_sync is not None:
            self.grad_sync.after_backward()
        if self.accelerator.scaler is not None:
            self.accelerator.unscale_gradients()
        norm = grad_norm(self.params)
        clip = self.cfg.optim.grad_clip
        if clip > 0:
            coef = (clip / (norm + 1e-6)).clamp(max=1.0).float()
            torch._foreach_mul_([p.grad for p in self.params if p.grad is not None], coef)
        return norm

    def sync_buffers(self) -> None:
        """Without DDP's wrapper each rank keeps batch-norm statistics of its own data; before validating or
        saving, take rank 0's, which is what DDP (broadcast_buffers) leaves."""
        if self.grad_sync is not None:
            from protodepth.grad_sync import broadcast_params_

            broadcast_params_(list(self.model.buffers()))

    def zero_grad(self) -> None:
        if self.grad_sync is not None:
            self.grad_sync.zero_()  # keep p.grad as views of the flat buffer
        else:
            self.optimizer.zero_grad(set_to_none=True)

    def set_lr(self, step: int) -> float:
        """The learning rate for optimizer step `step + 1`: the configured base rate times the schedule. The base
        comes from the config, never from the optimizer, which after a resume already holds a scheduled rate."""
        o = self.cfg.optim
        lr = o.lr * lr_factor(step, o.schedule, o.warmup_steps, self.cfg.train.max_steps, o.min_lr_ratio)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        return lr

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

