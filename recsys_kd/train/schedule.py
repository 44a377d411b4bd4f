"""Learning-rate schedules of a training phase, and the cadence of its evaluations.

Every learning rate of the run (the dense optimizer's and the sharded tables' fused one) is its
configured value times one *scale*, a pure function of the loop position (:func:`lr_scale`):

- ``constant``: 1.
- ``plateau``: ``factor ** reductions``; a reduction happens after ``patience`` evaluations in a row
  without improvement of the monitored metric (FuxiCTR's rule: x0.1 after every epoch without
  improvement, then early stopping), optionally continuing from the best checkpoint
  (``reload_best``). The early-stopping ``patience`` of the run counts on independently, so with
  schedule patience 1 and run patience 2 the first stall lowers the rate and the second stops.
- ``step``: ``factor ** (step // step_every)``.
- ``cosine``: from 1 down to 0 over the run's steps, ``(1 + cos(pi * step / total)) / 2``.

and, with ``warmup_steps``, times ``(step + 1) / warmup_steps`` for the first steps. No rate goes
below ``min_lr`` (unless configured below it). The scale's state (the number of plateau reductions)
is part of the loop state every checkpoint holds, so a resumed run continues the same sequence.

Evaluation cadence: ``every_epochs`` (a fraction of an epoch) or ``every_samples`` say when to
evaluate in units that mean the same on a dataset ten times larger, where a step count would not
(:func:`steps_between_evaluations`); the run's ``patience`` is counted in those evaluations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Literal

from torch.optim import Optimizer


@dataclass
class ScheduleConfig:
    """The ``schedule`` section of a training phase (``train:``, ``distill:``, ``finetune:``)."""

    kind: Literal["constant", "plateau", "step", "cosine"] = "constant"
    factor: float = 0.1
    patience: int = 1
    reload_best: bool = False
    step_every: int = 0
    warmup_steps: int = 0
    min_lr: float = 1e-6

    def validate(self) -> None:
        if not 0.0 < self.factor <= 1.0:
            raise ValueError(f"factor must be in (0, 1], got {self.factor}")
        if self.patience < 1 or self.warmup_steps < 0 or self.step_every < 0 or not self.min_lr >= 0.0:
            raise ValueError("patience must be >= 1; warmup_steps, step_every and min_lr >= 0")
        if self.kind == "step" and self.step_every < 1:
            raise ValueError("kind 'step' needs step_every >= 1")


def lr_scale(config: ScheduleConfig, step: int, total_steps: int, reductions: int) -> float:
    """The factor on every configured learning rate for training step ``step`` (0-based) of a run of
    ``total_steps`` steps, after ``reductions`` plateau reductions."""
    if config.kind == "plateau":
        scale = config.factor ** reductions
    elif config.kind == "step":
        scale = config.factor ** (step // config.step_every)
    elif config.kind == "cosine":
        scale = 0.5 * (1.0 + math.cos(math.pi * min(step / max(total_steps, 1), 1.0)))
    else:
        scale = 1.0
    if step < config.warmup_steps:
        scale *= (step + 1) / config.warmup_steps
    return scale


class LearningRates:
    """Sets every parameter group's learning rate to its configured value times a scale.

    The configured values are read from the optimizer when it is built, before a resume loads the
    saved (scaled) ones over them. The groups themselves are looked up at every use: loading an
    optimizer's state may replace its group objects."""

    def __init__(self, optimizer: Optimizer, min_lr: float) -> None:
        self.optimizer = optimizer
        self.base: List[float] = [float(group["lr"]) for group in optimizer.param_groups]
        self.min_lr = min_lr

    def apply(self, scale: float) -> None:
        for group, base in zip(self.optimizer.param_groups, self.base):
            group["lr"] = max(base * scale, min(base, self.min_lr))

    @property
    def current(self) -> List[float]:
        return [float(group["lr"]) for group in self.optimizer.param_groups]


def validate_cadence(every_steps: int, every_epochs: float, every_samples: int) -> None:
    """At most one evaluation cadence: steps, a fraction of an epoch in [0, 1], or rows."""
    named = {"eval_every_steps": every_steps, "eval_every_epochs": every_epochs, "eval_every_samples": every_samples}
    cadences = [key for key, value in named.items() if value]
    if len(cadences) > 1:
        raise ValueError(f"set one evaluation cadence, got {', '.join(cadences)}")
    if every_steps < 0 or every_samples < 0 or not 0.0 <= every_epochs <= 1.0:
        raise ValueError("eval_every_steps and eval_every_samples must be >= 0, eval_every_epochs in [0, 1]")


def steps_between_evaluations(every_steps: int, every_epochs: float, every_samples: int, steps_per_epoch: int,
                              samples_per_step: int) -> int:
    """Steps between two evaluations (0: only at epoch ends) from whichever cadence is set."""
    if every_epochs:
        return max(1, round(every_epochs * steps_per_epoch))
    if every_samples:
        return max(1, round(every_samples / max(samples_per_step, 1)))
    return every_steps
