"""Optimizers that step this rank's fp32 shards, exact global-norm clipping, and
dynamic loss scaling.

The optimizer sees one *segment* per (parameter ∩ shard): views into the flat fp32
master, gradient and state buffers of each chunk, so state stays flat per chunk
(what checkpoints, CPU and NVMe tiers move) while weight decay can still skip
1-D parameters.  AdamW runs torch's fused kernel (CPU and CUDA); SGD follows
``torch.optim.SGD`` (coupled weight decay, dampening 0) with foreach ops.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from tierlift.parallel.config import OptimizerConfig, PrecisionConfig
from tierlift.parallel.layout import Segment

__all__ = ["ShardOptimizer", "SegmentGroup", "global_grad_norm", "LossScaler"]


@dataclass
class SegmentGroup:
    """Views over one chunk's shard, split by weight decay."""

    params: list[torch.Tensor] = field(default_factory=list)
    grads: list[torch.Tensor] = field(default_factory=list)
    states: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    steps: list[torch.Tensor] = field(default_factory=list)


class ShardOptimizer:
    """AdamW or SGD over flat shard buffers.

    ``state[kind][chunk]`` is a flat fp32 buffer shaped like the chunk's shard
    (``exp_avg``/``exp_avg_sq`` for AdamW, ``momentum`` for SGD)."""

    def __init__(self, cfg: OptimizerConfig, masters: list[torch.Tensor], grads: list[torch.Tensor],
                 segments: list[list[Segment]], sub_group_size: int = 0,
                 states: list[dict[str, torch.Tensor]] | None = None, step_count: int = 0) -> None:
        """``states``: existing per-chunk state buffers (host/NVMe staging); default zeros.
        ``step_count``: optimizer steps already taken (bias correction)."""
        self.cfg = cfg
        self.kinds = ("exp_avg", "exp_avg_sq") if cfg.name == "adamw" else ("momentum",)
        if states is None:
            self.state = {k: [torch.zeros_like(m) for m in masters] for k in self.kinds}
        else:
            self.state = {k: [st[k] for st in states] for k in self.kinds}
        self.step_count = step_count
        # Groups of views built once (buffers are persistent), split by weight decay and
        # into sub-groups of at most sub_group_size elements (0 = no limit): one fused
        # call per sub-group bounds the kernel's working set (DeepSpeed's sub_group_size).
        self.groups: list[tuple[bool, SegmentGroup]] = []
        open_group: dict[bool, tuple[SegmentGroup, int]] = {}
        for ci, segs in enumerate(segments):
            for s in segs:
                g, used = open_group.get(s.param.decay, (None, 0))
                if g is None or (sub_group_size and used + s.numel > sub_group_size and g.params):
                    g, used = SegmentGroup(), 0
                    self.groups.append((s.param.decay, g))
                open_group[s.param.decay] = (g, used + s.numel)
                g.params.append(masters[ci][s.shard_lo:s.shard_hi])
                g.grads.append(grads[ci][s.shard_lo:s.shard_hi])
                for k in self.kinds:
                    g.states.setdefault(k, []).append(self.state[k][ci][s.shard_lo:s.shard_hi])
                # fused AdamW takes one step tensor per tensor it updates.
                g.steps.append(torch.full((), float(step_count), dtype=torch.float32, device=masters[ci].device))

    @torch.no_grad()
    def step(self, lr: float) -> None:
        self.step_count += 1
        for decay, g in self.groups:
            wd = self.cfg.weight_decay if decay else 0.0
            if self.cfg.name == "adamw":
                beta1, beta2 = self.cfg.betas
                torch._foreach_add_(g.steps, 1.0)  # the fused kernel reads, not bumps, the step count
                torch._fused_adamw_(g.params, g.grads, g.states["exp_avg"], g.states["exp_avg_sq"], [],
                                    g.steps, lr=lr, beta1=beta1, beta2=beta2, weight_decay=wd,
                                    eps=self.cfg.eps, amsgrad=False, maximize=False)
            else:
                d_p = g.grads
                if wd:
                    d_p = torch._foreach_add(g.grads, g.params, alpha=wd)
                bufs = g.states["momentum"]
                torch._foreach_mul_(bufs, self.cfg.momentum)
                torch._foreach_add_(bufs, d_p)
                torch._foreach_add_(g.params, bufs, alpha=-lr)

    def sync_step_tensors(self) -> None:
        """Set every per-segment step counter to ``step_count`` (after a load)."""
        for _, g in self.groups:
            for t in g.steps:
                t.fill_(float(self.step_count))


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
