"""Learning-rate and progressive-sampling schedules: pure functions of the optimizer step."""
from __future__ import annotations

import math
from dataclasses import dataclass

SHAPES = ("constant", "linear", "step", "cosine")


def lr_factor(step: int, schedule: str, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> float:
    """Multiplier of the base learning rate at optimizer step `step` (0-based).

    "constant": 1 after an optional linear warmup; "cosine": linear warmup over `warmup_steps`, then cosine
    decay from 1 to `min_lr_ratio` at `max_steps`.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        span = max(1, max_steps - warmup_steps)
        t = min(1.0, (step - warmup_steps) / span)
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))
    raise ValueError(f"schedule: unknown {schedule!r}, expected 'constant' or 'cosine'")


@dataclass
class Ramp:
    """An integer that moves from `start` to `end` over `steps` optimizer steps.

    shape: "constant" (always `end`), "linear", "step" (`num_levels` equal plateaus, start..end),
    "cosine" (slow start and end). `steps` = 0 means `end` from the first step.
    """

    start: int
    end: int
    steps: int = 0
    shape: str = "constant"
    num_levels: int = 4

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"shape: got {self.shape!r}, expected one of {', '.join(SHAPES)}")
        if self.start < 1 or self.end < 1:
            raise ValueError(f"start/end: got {self.start}/{self.end}, both must be >= 1")
        if self.steps < 0:
            raise ValueError(f"steps: got {self.steps}, must be >= 0")
        if self.num_levels < 2:
            raise ValueError(f"num_levels: got {self.num_levels}, must be >= 2")

    def __call__(self, step: int) -> int:
        if self.shape == "constant" or self.steps == 0 or step >= self.steps:
            return self.end
        t = max(0.0, step / self.steps)
        if self.shape == "linear":
            f = t
        elif self.shape == "step":
            f = math.floor(t * self.num_levels) / (self.num_levels - 1)
        else:  # cosine
            f = 0.5 * (1 - math.cos(math.pi * t))
        f = min(1.0, f)
        return int(round(self.start + (self.end - self.start) * f))


class SamplingSchedule:
    """The sampling level at every optimizer step: few points early, all later (`progressive` config).

    level(step) -> SamplingLevel(samples_per_slot, max_targets), max_targets None once the whole cloud
    (data.num_bins x data.points_per_bin, the largest the data can give) is used."""

    def __init__(self, cfg):
        from protodepth.loss import SamplingLevel

        self._level = SamplingLevel
        pg, spl = cfg.progressive, cfg.loss.samples_per_slot
        self.full_targets = cfg.data.num_bins * cfg.data.points_per_bin
        self.samples = Ramp(min(pg.samples_start, spl), spl, pg.steps, pg.shape, pg.num_levels)
        self.targets = Ramp(min(pg.targets_start, self.full_targets), self.full_targets, pg.steps, pg.shape,
                            pg.num_levels)

    def __call__(self, step: int):
        n = self.targets(step)
        return self._level(self.samples(step), n if n < self.full_targets else None)
