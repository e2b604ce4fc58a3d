"""Learning-rate schedules: warmup (linear or log) then cosine, linear or constant."""

from __future__ import annotations

import math
from dataclasses import dataclass

from tierlift._configbase import check, check_choice

__all__ = ["SchedulerConfig", "lr_at"]


@dataclass
class SchedulerConfig:
    """kind: "cosine", "linear" (straight decay, DeepSpeed's WarmupDecayLR) or
    "constant"; warmup_steps: ramp length in optimizer steps; min_lr_ratio: the
    decay floor as a fraction of the peak lr; total_steps: the step where the
    decay reaches its floor (0 = the run's max_steps).
    warmup_type: "linear" or "log" (lr grows with log(step), DeepSpeed's default);
    warmup_min_ratio: the warmup starts from this fraction of the peak lr."""

    kind: str = "cosine"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    total_steps: int = 0
    warmup_type: str = "linear"
    warmup_min_ratio: float = 0.0

    def __post_init__(self) -> None:
        check_choice("scheduler.kind", self.kind, ["cosine", "linear", "constant"])
        check(self.warmup_steps >= 0, "scheduler.warmup_steps", self.warmup_steps, "must be >= 0.", "use 0.")
        check(0 <= self.min_lr_ratio <= 1, "scheduler.min_lr_ratio", self.min_lr_ratio,
              "must be in [0, 1].", "use 0.1.")
        check(self.total_steps >= 0, "scheduler.total_steps", self.total_steps, "must be >= 0.",
              "use 0 to follow the run's max_steps.")
        check(self.kind == "constant" or self.total_steps == 0 or self.total_steps > self.warmup_steps,
              "scheduler.total_steps", self.total_steps,
              f"must exceed warmup_steps={self.warmup_steps}, or nothing is left to decay.",
              "raise total_steps, lower warmup_steps, or use 0 to follow the run's max_steps.")
        check_choice("scheduler.warmup_type", self.warmup_type, ["linear", "log"])
        check(0 <= self.warmup_min_ratio <= 1, "scheduler.warmup_min_ratio", self.warmup_min_ratio,
              "must be in [0, 1].", "use 0 to warm up from zero.")


def lr_at(step: int, peak_lr: float, cfg: SchedulerConfig, total_steps: int) -> float:
    """Learning rate for optimizer step ``step`` (0-based).  Pure."""
    total = cfg.total_steps or total_steps
    if cfg.warmup_steps and step < cfg.warmup_steps:
        # Step warmup_steps - 1 reaches the peak; step 0 is never trained at lr 0.
        if cfg.warmup_type == "linear" and cfg.warmup_min_ratio == 0.0:
            return peak_lr * (step + 1) / cfg.warmup_steps
        if cfg.warmup_type == "log":
            frac = math.log(step + 2) / math.log(cfg.warmup_steps + 1)
        else:
            frac = (step + 1) / cfg.warmup_steps
        return peak_lr * (cfg.warmup_min_ratio + (1.0 - cfg.warmup_min_ratio) * frac)
    if cfg.kind == "constant":
        return peak_lr
    span = max(1, total - cfg.warmup_steps)
    progress = min(1.0, max(0.0, (step - cfg.warmup_steps) / span))
    floor = peak_lr * cfg.min_lr_ratio
    if cfg.kind == "linear":
        return floor + (peak_lr - floor) * (1.0 - progress)
    return floor + (peak_lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
