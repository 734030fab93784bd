"""`StepPlan`: what happens after optimizer step `step`, decided in one place."""
from __future__ import annotations

from typing import NamedTuple


class Actions(NamedTuple):
    log: bool
    pictures: bool
    validate: bool
    checkpoint: bool
    last: bool

    @property
    def any(self) -> bool:
        """Something reads this step's results: its finite check must be settled first."""
        return self.log or self.pictures or self.validate or self.checkpoint or self.last


class StepPlan:
    """Every `log_every` steps a log line, every `viz_every` pictures, every `val_every` validation (when there
    is a validation split), every `ckpt_every` a checkpoint; the last step does all of them."""

    def __init__(self, train_cfg, has_val: bool):
        self.t, self.has_val = train_cfg, has_val

    def __call__(self, step: int) -> Actions:
        t = self.t
        last = step >= t.max_steps
        return Actions(
            log=last or step % t.log_every == 0,
            pictures=last or bool(t.viz_every and step % t.viz_every == 0),
            validate=self.has_val and bool(t.val_every) and (last or step % t.val_every == 0),
            checkpoint=last or bool(t.ckpt_every and step % t.ckpt_every == 0),
            last=last,
        )
