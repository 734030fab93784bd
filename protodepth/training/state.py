"""`TrainState`: everything beyond model / optimizer / RNG that a resume needs; saved with every checkpoint."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches of `epoch` already consumed (per process)
    samples: int = 0  # samples seen, all processes
    skipped_steps: int = 0
    wall_s: float = 0.0  # training time of every earlier session of this run (a resume adds its own)
    history: list = field(default_factory=list)  # (step, loss) at every log point, for the summary and tests
    val_history: list = field(default_factory=list)  # (step, {name: value}) at every validation
    final: dict = field(default_factory=dict)  # the loss terms of the last log point
    wandb_run_id: str | None = None  # a resumed run continues the same W&B run

    def state_dict(self) -> dict:
        return dict(self.__dict__)

    def load_state_dict(self, d: dict) -> None:
        self.__dict__.update(d)
