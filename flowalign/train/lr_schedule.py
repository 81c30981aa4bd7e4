"""The trained weights' learning-rate schedule: linear warmup over optimizer steps, times a decay over the
run's iterations.

``lr = optim.lr * min(1, (k + 1) / optim.warmup_steps) * decay(i / train.steps)`` at optimizer step ``k``
of iteration ``i``, with ``decay`` (``optim.schedule``) constant 1, ``linear`` from 1 to
``optim.min_lr_ratio``, or ``cosine`` (half a cosine, Loshchilov & Hutter 2017, SGDR, without restarts)
between the same ends. Warmup counts optimizer steps, as before; the decay counts iterations, because the
optimizer steps an iteration takes vary with the algorithm and, under Flow-GRPO's informative-group
filter, with the iteration, while ``train.steps`` is what a user sets. The iteration is part of the
scheduler's state, so a resumed run continues the schedule exactly.
"""

from __future__ import annotations

import math

import torch

SCHEDULES = ("constant", "linear", "cosine")
CONFIG_KEYS = {"warmup_steps": "optim.warmup_steps", "schedule": "optim.schedule",
               "min_ratio": "optim.min_lr_ratio", "total": "train.steps", "base_lrs": "optim.lr"}  # fmt: skip


def decay_factor(schedule: str, progress: float, min_ratio: float) -> float:
    """The decay at ``progress`` = iteration / train.steps in [0, 1): 1 at 0, approaching ``min_ratio``."""
    if schedule == "constant":
        return 1.0
    if schedule == "linear":
        return 1.0 - (1.0 - min_ratio) * progress
    if schedule == "cosine":
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown schedule {schedule!r}; one of {', '.join(SCHEDULES)}")


class RunSchedule(torch.optim.lr_scheduler.LRScheduler):
    """Warmup per optimizer step (``step()``), decay per iteration (``at_iteration(i)``, called by the
    training loop before each iteration)."""

    def __init__(
        self, optimizer: torch.optim.Optimizer, warmup_steps: int, schedule: str, min_ratio: float, total: int
    ) -> None:
        self.warmup_steps, self.schedule = warmup_steps, schedule
        self.min_ratio, self.total = min_ratio, total
        self.iteration = 0
        self.resume_note: str | None = None
        super().__init__(optimizer)

    def load_state_dict(self, state_dict: dict) -> None:
        """The step counts come from the checkpoint; the shape (warmup, schedule, ends, ``train.steps``)
        from this run's config, so a run resumed with a larger ``train.steps`` decays over the new length
        from the resumed step on. A change that alters the rates is left in ``resume_note`` (one line)."""
        own = {key: getattr(self, key) for key in CONFIG_KEYS}
        # a LambdaLR's state (checkpoints before the schedule) has lr_lambdas, and its own shape nowhere
        saved = {key: value for key, value in state_dict.items() if key not in ("lr_lambdas", "resume_note")}
        changed = [CONFIG_KEYS[key] for key in own if key in saved and saved[key] != own[key]]
        super().load_state_dict({**saved, **own})
        if changed and not (changed == ["train.steps"] and self.schedule == "constant"):
            self.resume_note = (
                f"note: resumed with another LR schedule ({', '.join(changed)} changed): from the resumed step "
                "on, the rate follows this run's settings"
            )

    def factor(self) -> float:
        warm = min(1.0, (self.last_epoch + 1) / self.warmup_steps) if self.warmup_steps else 1.0
        return warm * decay_factor(self.schedule, self.iteration / self.total, self.min_ratio)

    def get_lr(self) -> list[float]:
        return [base * self.factor() for base in self.base_lrs]

    def at_iteration(self, iteration: int) -> float:
        """Set the learning rate of iteration ``iteration`` (without counting an optimizer step); returns
        the rate its first optimizer step uses (of the first parameter group)."""
        self.iteration = iteration
        self._last_lr = self.get_lr()
        for group, lr in zip(self.optimizer.param_groups, self._last_lr):
            group["lr"] = lr
        return self._last_lr[0]
