"""The engine's optimizer step: unscale (fp16), clip to the exact global norm, step the
shards (on the device with ``ShardOptimizer``, or on the host optimizer), then bring
the compute-dtype parameters up to date (``refresh_params``).

Sync points: ``step`` reads the global norm on the host (one all-reduce, then a host
sync: an fp16 overflow skips the step on every rank alike).  With the optimizer on
the host the norm's all-reduce is a CPU tensor (gloo); the chunks' steps run on the
host optimizer's worker and each chunk's next gather waits for its own step only.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from tierlift.parallel.chunks import Residency, RuntimeChunk
from tierlift.parallel.gather import Gatherer
from tierlift.parallel.group import Group
from tierlift.parallel.hooks import UnitHooks
from tierlift.parallel.optim import LossScaler, global_grad_norm

__all__ = ["StepStats", "OptimizerStep"]


class StepStats(dict):
    """grad_norm (pre-clip), skipped (fp16 overflow), loss_scale."""


class OptimizerStep:
    """One optimizer step over this rank's shards (see module doc)."""

    def __init__(self, *, chunks: list[RuntimeChunk], root: RuntimeChunk | None, groups: list[Group],
                 hooks: UnitHooks, gatherer: Gatherer, host_opt, optimizer, scaler: LossScaler, optim_cfg,
                 stage: int, rank: int, world_size: int) -> None:
        self.chunks, self.root, self.groups, self.hooks, self.gatherer = chunks, root, groups, hooks, gatherer
        self.host_opt, self.optimizer, self.scaler, self.optim_cfg = host_opt, optimizer, scaler, optim_cfg
        self.stage, self.rank, self.world_size = stage, rank, world_size
        self.lr_set: float | None = None  # the lr ``begin_step`` announced for the step under way

    def begin_step(self, lr: float) -> None:
        self.lr_set = lr
        if self.host_opt is not None:
            self.host_opt.begin_step(lr)

    @torch.no_grad()
    def step(self, lr: float) -> StepStats:
        if self.host_opt is not None:
            return self._step_host(lr)
        grads = [c.grad for c in self.chunks]
        if self.scaler.enabled:
            torch._foreach_mul_(grads, 1.0 / self.scaler.scale)
        norm = global_grad_norm(grads)
        norm_f = float(norm)  # host sync: the step is skipped on overflow, decided on every rank alike
        overflow = self.scaler.enabled and not math.isfinite(norm_f)
        stats = StepStats(grad_norm=norm_f, skipped=overflow, loss_scale=self.scaler.scale)
        self.scaler.update(overflow)
        if not overflow:
            clip = self.optim_cfg.grad_clip
            if clip > 0:
                torch._foreach_mul_(grads, torch.clamp(clip / (norm + 1e-6), max=1.0))
            self.optimizer.step(lr)
            self.refresh_params()
        torch._foreach_zero_(grads)
        return stats

    def _step_host(self, lr: float) -> StepStats:
        """Offloaded optimizer: one all-reduce of the squared norm (CPU tensor: gloo),
        then the deferred steps are queued in the next forward's order; immediate
        steps already ran while backward was going on."""
        opt = self.host_opt
        if not opt.deferred and self.lr_set != lr:
            raise RuntimeError(f"[rank {self.rank}] with the optimizer offloaded and no clipping, call "
                               f"begin_step({lr}) before the step's backward (got {self.lr_set}).")
        self.lr_set = None
        sq = torch.tensor([sum(opt.flush_grads())], dtype=torch.float64)
        if self.world_size > 1:
            dist.all_reduce(sq)
        scale = self.scaler.scale if self.scaler.enabled else 1.0
        norm_f = math.sqrt(float(sq)) / scale
        overflow = self.scaler.enabled and not math.isfinite(norm_f)
        stats = StepStats(grad_norm=norm_f, skipped=overflow, loss_scale=self.scaler.scale)
        self.scaler.update(overflow)
        if overflow:
            opt.skip_step()
            return stats
        if opt.deferred:
            clip = self.optim_cfg.grad_clip
            coef = min(1.0, clip / (norm_f + 1e-6)) if clip > 0 else 1.0
            opt.step_deferred(lr, coef / scale, self.step_order())
        opt.finish_step()
        self.refresh_params()
        return stats

    def step_order(self) -> list[int]:
        """Chunks in the order the next forward needs them: root, then units."""
        order = [self.root.spec.index] if self.root is not None else []
        seen = set(order)
        for gi in self.hooks.fwd_order or range(len(self.groups)):
            for c in self.groups[gi].chunks:
                if c.spec.index not in seen:
                    order.append(c.spec.index)
                    seen.add(c.spec.index)
        order += [c.spec.index for c in self.chunks if c.spec.index not in seen]
        return order

    @torch.no_grad()
    def refresh_params(self) -> None:
        """The masters changed (a step, a checkpoint load): bring the compute-dtype parameters
        up to date.  Without a host optimizer each device shard is recast from its master;
        with one every chunk goes ON_HOST and its next gather copies the new values up.
        Re-gathers what stays gathered (stages 1-2, the root, persistent chunks); stage-3
        units gather lazily."""
        if self.stage == 3:  # a unit kept for a backward that never came (max_reuse_distance): stale now
            self.hooks.reshard_gathered()
        keep = [c for c in self.chunks if self.stage < 3 or c.spec.persistent or c is self.root]
        if self.host_opt is None:
            for c in self.chunks:  # a device-stepped chunk's gathers cast from its master: nothing to copy
                if c.compute_shard is not None and c.compute_shard is not c.master:
                    c.compute_shard.copy_(c.master)
            for c in keep:
                if c.state is Residency.GATHERED:
                    c.transition(Residency.SHARDED)  # contents stale; storage is refilled in place
        else:
            for c in self.chunks:
                c.mark_stepped()
        self.gatherer.gathered(keep)
