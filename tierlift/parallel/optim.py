"""The engine's side of the optimizer step: exact global-norm clipping (one all-reduce)
and dynamic loss scaling.  The step itself (AdamW/SGD over flat shards) is
``tierlift.offload.shard_optim``, shared with the host optimizer.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from tierlift.parallel.config import PrecisionConfig

__all__ = ["global_grad_norm", "LossScaler", "is_finite"]


def global_grad_norm(grads: list[torch.Tensor], group=None) -> torch.Tensor:
    """L2 norm of the full gradient from this rank's shards (padding is zero).

    One all-reduce of a scalar; returns a 0-d fp32 tensor on the grads' device."""
    device = grads[0].device if grads else torch.device("cpu")
    if grads:
        sq = torch.stack([torch.linalg.vector_norm(g, 2, dtype=torch.float32) for g in grads]).square().sum()
    else:
        sq = torch.zeros((), dtype=torch.float32, device=device)
    sq = sq.to(torch.float64)
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(sq, group=group)
    return sq.sqrt().to(torch.float32)


class LossScaler:
    """Dynamic loss scaling for fp16 compute (DeepSpeed's knobs: initial scale
    power, window, hysteresis, minimum)."""

    def __init__(self, cfg: PrecisionConfig, enabled: bool) -> None:
        self.enabled = enabled
        self.cfg = cfg
        self.scale = float(2 ** cfg.initial_scale_power) if enabled else 1.0
        self.good_steps = 0
        self.hysteresis_left = cfg.hysteresis

    def update(self, overflow: bool) -> None:
        if not self.enabled:
            return
        if overflow:
            self.good_steps = 0
            if self.hysteresis_left > 1:
                self.hysteresis_left -= 1
            else:
                self.scale = max(self.cfg.min_loss_scale, self.scale / 2)
                self.hysteresis_left = self.cfg.hysteresis
            return
        self.good_steps += 1
        if self.good_steps % self.cfg.loss_scale_window == 0:
            self.scale *= 2
            self.hysteresis_left = self.cfg.hysteresis

    def state_dict(self) -> dict:
        return {"scale": self.scale, "good_steps": self.good_steps, "hysteresis_left": self.hysteresis_left}

    def load_state_dict(self, d: dict) -> None:
        self.scale = float(d["scale"])
        self.good_steps = int(d["good_steps"])
        self.hysteresis_left = int(d["hysteresis_left"])


def is_finite(total_norm: torch.Tensor) -> bool:
    return math.isfinite(float(total_norm))
