"""The optimizer step over this rank's flat fp32 shards, wherever they live, and its config.

The optimizer sees one *segment* per (parameter ∩ shard): views into the flat fp32
master, gradient and state buffers of each chunk, so state stays flat per chunk
(what checkpoints, CPU and NVMe tiers move) while weight decay can still skip
some parameters (``OptimizerConfig.decay_1d``, ``no_decay``).  AdamW runs torch's
fused kernel (CPU and CUDA); SGD follows ``torch.optim.SGD`` (coupled weight decay,
dampening 0) with foreach ops.

It lives in offload, below the ZeRO engine (docs/architecture.md): the engine steps
GPU-resident shards with it, the host optimizer steps host and NVMe pieces with it.
Global-norm clipping and loss scaling need collectives and stay with the engine
(``parallel/optim.py``).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Literal

import torch

from tierlift._configbase import check, check_choice
from tierlift.layout import ParamSlot, Segment

__all__ = ["OptimizerConfig", "ShardOptimizer", "SegmentGroup", "decays"]


@dataclass
class OptimizerConfig:
    """Optimizer applied to the fp32 shards.  grad_clip: max global L2 norm, 0 = off.

    Which parameters weight decay applies to: those with 2 or more dimensions,
    plus the 1-D ones (biases, norm weights) when ``decay_1d``, minus every
    parameter whose name (as in ``model.state_dict()``) matches one of the
    ``no_decay`` glob patterns (e.g. ``["*.bias", "*norm*"]``, Hugging Face
    Trainer's exclusion).  The tierlift-YAML default, ``decay_1d: false``, is the
    GPT-training convention; ``torch.optim.AdamW`` and DeepSpeed decay every
    parameter they are given, so a DeepSpeed JSON config loads with
    ``decay_1d: true`` and ``decay_1d: true`` matches a plain AdamW reference.
    """

    name: Literal["adamw", "sgd"] = "adamw"
    lr: float = 3e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.1
    momentum: float = 0.9
    grad_clip: float = 1.0
    decay_1d: bool = False
    no_decay: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        check_choice("optimizer.name", self.name, ["adamw", "sgd"])
        check(isinstance(self.decay_1d, bool), "optimizer.decay_1d", self.decay_1d, "must be true or false.",
              "write true to decay biases and norm weights too (as torch.optim.AdamW does) or false.")
        check(all(isinstance(p, str) and p for p in self.no_decay), "optimizer.no_decay", self.no_decay,
              "must be a list of non-empty glob patterns over parameter names.", "write e.g. ['*.bias', '*norm*'].")
        check(self.lr > 0, "optimizer.lr", self.lr, "must be > 0.", "use e.g. 3e-4.")
        check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "optimizer.betas",
              self.betas, "must be two numbers in [0, 1).", "use [0.9, 0.95].")
        check(self.eps > 0, "optimizer.eps", self.eps, "must be > 0.", "use 1e-8.")
        check(self.weight_decay >= 0, "optimizer.weight_decay", self.weight_decay, "must be >= 0.", "use 0.1.")
        check(0 <= self.momentum < 1, "optimizer.momentum", self.momentum, "must be in [0, 1).", "use 0.9.")
        check(self.grad_clip >= 0, "optimizer.grad_clip", self.grad_clip, "must be >= 0.",
              "use 0 to disable clipping or a positive max norm such as 1.0.")


def decays(cfg: OptimizerConfig, param: ParamSlot) -> bool:
    """Whether weight decay applies to ``param`` under ``cfg`` (see OptimizerConfig)."""
    if len(param.shape) < 2 and not cfg.decay_1d:
        return False
    return not any(fnmatch.fnmatchcase(param.name, pat) for pat in cfg.no_decay)


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
                decay = decays(cfg, s.param)
                g, used = open_group.get(decay, (None, 0))
                if g is None or (sub_group_size and used + s.numel > sub_group_size and g.params):
                    g, used = SegmentGroup(), 0
                    self.groups.append((decay, g))
                open_group[decay] = (g, used + s.numel)
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
