"""`NonFiniteGuard`: decides, once per optimizer step, whether the step was finite, and what happens if not.

Three flags per optimizer step, summed over micro-batches and agreed across ranks:
  0 loss not finite, 1 gradient norm not finite, 2 model output (slot vertices) not finite.
- Non-finite model output means the weights themselves overflowed: skipping steps cannot help, so the run
  stops in both `train.on_nonfinite` modes.
- A non-finite loss or gradient norm stops the run (`error`) or drops the step (`skip`). fp16's infinite
  gradients are the grad scaler's business (it skips the step and lowers the scale).

On a GPU with fused Adam the host does not wait for the flags: Adam reads `found_inf` on the device and skips
a bad step itself (as under a grad scaler), and the host reads the flags one step late from pinned memory
(`DeferredCheck`), raising or counting then. Elsewhere the flags are read at once (one host sync per step).
"""
from __future__ import annotations

import torch

from protodepth.errors import NonFiniteError


class NonFiniteOutput(Exception):
    """Raised inside the step when the geometry refuses non-finite vertices; reported with the batch files."""


def _files(paths: list[str]) -> str:
    return f"{', '.join(paths[:8])}{' ...' if len(paths) > 8 else ''}"


def output_error(step: int, epoch: int, rank: int, paths: list[str]) -> NonFiniteError:
    return NonFiniteError(
        f"non-finite model output (slot vertices) at step {step} (epoch {epoch}): the weights overflowed at an "
        f"earlier step; batch files on rank {rank}: {_files(paths)}. No checkpoint was written for this step; "
        "lower optim.lr or set optim.grad_clip")


class DeferredCheck:
    """The finite check of the latest optimizer step, read by the host one step late.

    push() starts copying the step's flags to pinned host memory and records an event; resolve() waits for
    that event only, not for the GPU work queued since, and hands the flags to `check`."""

    def __init__(self, check, n_flags: int):
        self.check = check
        self.host = torch.zeros(n_flags, pin_memory=True)  # one buffer: push() resolves the previous step first
        self.pending = None

    def push(self, flags: torch.Tensor, step: int, epoch: int, paths: list[str]) -> None:
        self.resolve()
        self.host.copy_(flags.float(), non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self.pending = (event, step, epoch, list(paths))

    def resolve(self) -> None:
        if self.pending is None:
            return
        event, step, epoch, paths = self.pending
        self.pending = None
        event.synchronize()
        self.check(self.host.tolist(), step, epoch, paths)


class NonFiniteGuard:
    """Collects a step's flags, agrees on them across ranks, and gates the optimizer step."""

    def __init__(self, mode: str, fp16: bool, rank: int, device: torch.device, deferred: bool):
        self.mode, self.fp16, self.rank = mode, fp16, rank
        self.local = torch.zeros(3, device=device)  # this rank's flags since the last optimizer step
        self.skipped = 0
        self.deferred = DeferredCheck(self.check, n_flags=3) if deferred else None

    @classmethod
    def for_run(cls, cfg, accelerator, optimizer, deepspeed: bool) -> "NonFiniteGuard":
        """The deferred check needs an optimizer that can skip a step on the device: fused Adam (CUDA) reads
        `found_inf` as under a grad scaler. fp16 has the scaler itself; DeepSpeed steps its own optimizer."""
        t = cfg.train
        deferred = (accelerator.device.type == "cuda" and not deepspeed and t.mixed_precision != "fp16"
                    and getattr(optimizer, "optimizer", optimizer).defaults.get("fused"))  # DeepSpeed's has none
        return cls(t.on_nonfinite, t.mixed_precision == "fp16", accelerator.process_index, accelerator.device,
                   deferred=bool(deferred))

    def observe(self, loss: torch.Tensor, slot_verts: torch.Tensor) -> None:
        """A micro-batch's loss and model output (no host sync: device-side sums)."""
        self.local[0] += (~torch.isfinite(loss.detach())).float().reshape(())
        # eagerly the geometry refuses non-finite vertices; a replayed graph cannot raise, so it is a flag too
        self.local[2] += (~torch.isfinite(slot_verts.detach())).any().float()

    def check(self, flags: list[float], step: int, epoch: int, paths: list[str]) -> bool:
        """Act on a step's flags; True if the step is dropped (skip mode). Raises NonFiniteError otherwise."""
        if flags[2] > 0:
            raise output_error(step, epoch, self.rank, paths)
        if not (flags[0] > 0 or (flags[1] > 0 and not self.fp16)):
            return False
        what = "loss" if flags[0] > 0 else "gradient norm"
        if self.mode == "error":
            raise NonFiniteError(
                f"non-finite {what} at step {step} (epoch {epoch}); batch files on rank {self.rank}: "
                f"{_files(paths)}. No checkpoint was written for this step; set train.on_nonfinite=skip to drop "
                "such steps instead")
        self.skipped += 1  # no optimizer step; its gradients are dropped
        return True

    def gate(self, accelerator, grad_norm, inner_optimizer, step: int, epoch: int, paths: list[str]) -> bool:
        """Agree on this optimizer step's flags; True if the optimizer should step. With the deferred check the
        answer is always True and fused Adam's `found_inf` skips a bad step on the device."""
        if grad_norm is not None:
            self.local[1] += (~torch.isfinite(grad_norm)).float().to(self.local.device)
        flags = accelerator.reduce(self.local.clone(), reduction="sum")
        self.local.zero_()
        if self.deferred is None:
            return not self.check(flags.tolist(), step, epoch, paths)  # one host sync per optimizer step
        self.deferred.resolve()  # the previous step's flags: it finished while this step was being queued
        inner_optimizer.found_inf = (flags.sum() > 0).float()
        self.deferred.push(flags, step, epoch, paths)  # before Adam's kernels: resolves sooner
        return True

    def settle(self) -> None:
        """Read any pending deferred flags now (before logging, drawing or saving a step)."""
        if self.deferred is not None:
            self.deferred.resolve()
