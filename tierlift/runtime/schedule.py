"""Learning-rate schedules: linear warmup then cosine (or constant) decay."""

from __future__ import annotations

import math
from dataclasses import dataclass

from tierlift._configbase import check, check_choice

__all__ = ["SchedulerConfig", "lr_at"]


@dataclass
class SchedulerConfig:
    """kind: "cosine" or "constant"; warmup_steps: linear ramp from 0;
    min_lr_ratio: the cosine floor as a fraction of the peak lr; total_steps: the
    step where the cosine reaches its floor (0 = the run's max_steps)."""

    kind: str = "cosine"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    total_steps: int = 0

    def __post_init__(self) -> None:
        check_choice("scheduler.kind", self.kind, ["cosine", "constant"])
        check(self.warmup_steps >= 0, "scheduler.warmup_steps", self.warmup_steps, "must be >= 0.", "use 0.")
        check(0 <= self.min_lr_ratio <= 1, "scheduler.min_lr_ratio", self.min_lr_ratio,
              "must be in [0, 1].", "use 0.1.")
        check(self.total_steps >= 0, "scheduler.total_steps", self.total_steps, "must be >= 0.",
              "use 0 to follow the run's max_steps.")


def lr_at(step: int, peak_lr: float, cfg: SchedulerConfig, total_steps: int) -> float:
    """Learning rate for optimizer step ``step`` (0-based).  Pure."""
    total = cfg.total_steps or total_steps
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return peak_lr * (step + 1) / cfg.warmup_steps
    if cfg.kind == "constant":
        return peak_lr
    span = max(1, total - cfg.warmup_steps)
    progress = min(1.0, max(0.0, (step - cfg.warmup_steps) / span))
    floor = peak_lr * cfg.min_lr_ratio
    return floor + (peak_lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
