"""The chunked ZeRO engine, stages 1–3.

Every wrap unit's parameters live in one flat chunk (see ``tierlift/layout.py``).  Each rank
owns a shard of every chunk: the fp32 master, its gradient and the optimizer state.
Parameters of the model are views into a per-chunk *gathered* buffer in the compute
dtype, bound once at setup (``param.data = view``).  Stage 3 frees that buffer's
storage after a unit's forward (``untyped_storage().resize_(0)``) and refills it
with an all-gather before the unit runs again; because the storage object is kept,
every view autograd saved stays valid, so arbitrary models work unchanged.

Sync points (GPU): reduce-scatters are issued async from the compute stream and
waited for at most two behind; gathers and their streams are described in
``gather.py``.  This object owns the H2D stream and the GPU chunk arena.  On CPU
(gloo) the same code runs with gloo's background threads.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import math
import os
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from tierlift.errors import ConfigError
from tierlift.layout import ChunkLayout, plan_chunks
from tierlift.offload.activation_plan import ActivationConfig
from tierlift.offload.activations import ActivationExecutor
from tierlift.offload.optimizer import OffloadedOptimizer
from tierlift.offload.policy import NoOffload, NVMeOffload, OffloadConfig
from tierlift.offload.shard_optim import ShardOptimizer
from tierlift.parallel.chunks import Group, PostBackward, Residency, RuntimeChunk
from tierlift.parallel.comm import reduce_scatter_flat
from tierlift.parallel.config import OptimizerConfig, PrecisionConfig, ZeroConfig
from tierlift.parallel.gather import GatherMixin, keep_for_backward
from tierlift.parallel.optim import LossScaler, global_grad_norm
from tierlift.parallel.plan_exec import PlanMismatch, check_layout, plan_for_engine, verify
from tierlift.parallel.rendezvous import Rendezvous
from tierlift.parallel.unshard import UnshardMixin
from tierlift.parallel.zero_state import EngineStateMixin
from tierlift.parallel.units import default_wrap_classes, find_units

__all__ = ["ZeroEngine", "Residency", "StepStats"]

log = logging.getLogger("tierlift.zero")

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class Phase(enum.Enum):
    IDLE = "idle"
    FORWARD = "forward"
    BACKWARD = "backward"


class StepStats(dict):
    """grad_norm (pre-clip), skipped (fp16 overflow), loss_scale."""


class ZeroEngine(GatherMixin, EngineStateMixin, UnshardMixin):
    """Shards ``model`` (already built identically on every rank) over the default group."""

    def __init__(self, model: nn.Module, zero: ZeroConfig, precision: PrecisionConfig, optim: OptimizerConfig,
                 device: torch.device, activation_checkpointing: bool = False, offload=None, plan=None,
                 activations: ActivationConfig | None = None) -> None:
        self.offload = offload or OffloadConfig()
        host_opt = not isinstance(self.offload.optimizer, NoOffload)
        host_params = not isinstance(self.offload.param, NoOffload)
        if host_params and not host_opt:
            raise ConfigError("offloading parameters needs the optimizer offloaded too.", setting="offload.param",
                              value=type(self.offload.param).__name__,
                              fix="set offload.optimizer to cpu or nvme as well.")
        if isinstance(self.offload.param, NVMeOffload):
            opt = self.offload.optimizer
            if not isinstance(opt, NVMeOffload):
                raise ConfigError("parameters on NVMe need the optimizer state on NVMe too (they share its "
                                  "extent file).", setting="offload.optimizer.kind", value=type(opt).KIND,
                                  fix="set offload.optimizer: {kind: nvme, path: <the same path>}.")
            if os.path.abspath(self.offload.param.path) != os.path.abspath(opt.path):
                raise ConfigError(f"parameters and optimizer state share one extent file per rank, under "
                                  f"offload.optimizer.path ({opt.path!r}).", setting="offload.param.path",
                                  value=self.offload.param.path, fix=f"set offload.param.path to {opt.path!r}.")
        self.model = model
        self.cfg = zero
        self.precision = precision
        self.optim_cfg = optim
        self.device = device
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1
        self.compute_dtype = _DTYPES[precision.compute]
        self.reduce_dtype = _DTYPES[precision.reduce]
        wrap = list(zero.wrap) or default_wrap_classes(model)
        self.units = find_units(model, wrap)
        self.layout: ChunkLayout = plan_chunks([u.spec() for u in self.units], self.world_size,
                                               zero.chunk_align_bytes, zero.persistence_threshold)
        # The ExecutionPlan this engine executes (offload/execplan.py): given, or the config's.
        if plan is not None:
            check_layout(plan, self.layout)
        self.plan = plan or plan_for_engine(self.layout, zero, self.offload, optim.name, self.compute_dtype,
                                            self.reduce_dtype, device, self.rank)
        self.cfg = dataclasses.replace(zero, prefetch_units=self.plan.prefetch_units)  # own copy: re-plans change it
        unit_by_name = {u.name: u for u in self.units}
        self._move_buffers(model, device)
        self._record_model_dtypes(model)
        self.rendezvous = Rendezvous(self.rank, self.world_size, zero.rendezvous_timeout_s)
        self.chunks = [RuntimeChunk(c, unit_by_name[c.unit], self.rank, device, self.compute_dtype,
                                     host_optimizer=host_opt, host_params=host_params)
                       for c in self.layout]
        self.root = next((c for c in self.chunks if c.spec.unit == ""), None)
        # Host -> device copies of parameters run here, beside compute (see the module doc).
        self._h2d = torch.cuda.Stream(device) if device.type == "cuda" and host_opt else None
        self.groups = self._make_groups()
        self.host_opt = None
        if host_opt:
            deferred = optim.grad_clip > 0 or precision.compute == "fp16"
            masters = [c.master for c in self.chunks]
            for c in self.chunks:
                c.master = None  # the host optimizer takes them over, and drops each once copied
            self.host_opt = OffloadedOptimizer(list(self.layout), self.rank, masters, optim,
                                               self.offload, self.compute_dtype, device, deferred=deferred,
                                               placement=self.plan.optimizer_tiers)
            del masters
            self.optimizer = None
        else:
            self.optimizer = ShardOptimizer(optim, [c.master for c in self.chunks], [c.grad for c in self.chunks],
                                            [c.spec.segments(self.rank) for c in self.chunks],
                                            sub_group_size=zero.sub_group_size)
        self._micro = 0        # micro-batch index inside the current optimizer step
        self._last_micro = True
        self._lr_set = None
        self.scaler = LossScaler(precision, enabled=precision.compute == "fp16")
        self.phase = Phase.IDLE
        self._fwd_order: list[int] = []  # group order recorded on the previous micro-batch
        self._cur_order: list[int] = []
        self._bwd_order: list[int] = []
        self._keep: set[int] = set()  # groups that stay gathered from forward to backward (max_reuse_distance)
        self.reuse_distance = zero.max_reuse_distance if zero.max_reuse_distance is not None else \
            (10 ** 9 if isinstance(self.offload.param, NVMeOffload) else 0)  # elements; see ZeroConfig
        self._pending: list[tuple[RuntimeChunk, Any, torch.Tensor, torch.Tensor]] = []
        self.order_changes = 0
        # Host seconds spent blocked on gathers still in flight (gloo; NCCL waits on the
        # device and does not block the host): what deeper prefetch can fix, the policy's
        # input.  Waits for host optimizer steps are counted apart (host_wait_s): with
        # immediate steps the next forward overlaps the optimizer by design, and deeper
        # prefetch would not shorten them.  Both read and reset per step by the trainer.
        self.stall_s = 0.0
        self.host_wait_s = 0.0
        # Stage-3 gathers per step: issued ahead by prefetch; at use, a hit (already
        # gathered or in flight) or a miss (gathered on demand).  Telemetry events.
        self.prefetch_counts = {"issued": 0, "hit": 0, "miss": 0}
        # Saved activations: kept (no executor, no cost), or swapped / recomputed per the plan.
        act = activations or ActivationConfig(policy="recompute" if activation_checkpointing else "keep")
        self.activations: ActivationExecutor | None = None
        if act.policy != "keep":
            # PCIe bytes per step the offloaded optimizer already moves (fp32 master in, gradients
            # out): the activation plan's swaps share the link with them.
            pcie = self.layout.shard_numel() * 8 if host_opt else 0
            self.activations = ActivationExecutor(self.units, device, act, offload_pcie_bytes=pcie)
            self.activations.install()
        self._hooks = []
        self._attach_hooks()
        if zero.stage == 3:
            for g in self.groups:
                if not g.persistent:
                    self._reshard(g)
        self.arena = self._make_arena()
        log.info("rank %d: %d chunks in %d groups, %.1f M params, %.1f M shard elems/rank, stage %d",
                 self.rank, len(self.chunks), len(self.groups), self.layout.total_numel / 1e6,
                 self.layout.shard_numel() / 1e6, zero.stage)
        try:
            verify(self, "after construction")
        except PlanMismatch:
            self.close()  # the host optimizer's worker and its NVMe file go with the refused engine
            raise

    # -- setup ---------------------------------------------------------------
    @staticmethod
    def _move_buffers(model: nn.Module, device: torch.device) -> None:
        for mod in model.modules():
            for name, buf in list(mod._buffers.items()):
                if buf is not None and buf.device != device:
                    mod._buffers[name] = buf.to(device)

    def _make_groups(self) -> list[Group]:
        names = [u.name for u in self.units if u.name]
        top = [n for n in names if not any(n.startswith(o + ".") for o in names if o != n)]
        modules = {u.name: u.module for u in self.units}
        groups = []
        for n in top:
            chunks = [c for c in self.chunks if c.spec.unit == n or c.spec.unit.startswith(n + ".")]
            if chunks:
                groups.append(Group(len(groups), n, modules[n], chunks))
        return groups

    def _prefetch(self, order: list[int], pos: int) -> None:
        if self.cfg.stage != 3:
            return
        if self.host_opt is not None and self.host_opt.params_on_nvme:
            # Disk reads run two groups further ahead than the gathers that consume them.
            for idx in order[pos + 1: pos + 3 + self.cfg.prefetch_units]:
                for c in self.groups[idx].chunks:
                    if c.state is Residency.SHARDED and c.compute_shard is None:
                        self.host_opt.prefetch_source(c.spec.index)
        bound = self.cfg.max_live_params
        budget = self.cfg.prefetch_bytes or None  # bytes gathered ahead of use, at the compute dtype
        itemsize = torch.finfo(self.compute_dtype).bits // 8
        for idx in order[pos + 1: pos + 1 + self.cfg.prefetch_units]:
            g = self.groups[idx]
            if budget is not None:
                budget -= g.numel * itemsize
                if budget < 0:
                    return
            if self._is_sharded(g):
                if bound and self._live_numel() + g.numel > bound:
                    return
                if self._host_step_pending(g):  # a prefetch must not block on the host optimizer:
                    return                      # the unit's own pre-forward gathers it when due
                self._issue_gather(g)
                self.prefetch_counts["issued"] += 1

    # -- hooks ---------------------------------------------------------------
    def _pre_forward(self, g: Group, args, kwargs):
        if self.phase is Phase.FORWARD:
            self._cur_order.append(g.index)
            pos = len(self._cur_order) - 1
            self._count_use(g)
            self._wait_gathered(g)
            if pos < len(self._fwd_order) and self._fwd_order[pos] == g.index:
                self._prefetch(self._fwd_order, pos)
        else:  # recomputation in backward, or a forward outside forward_begin (which every rank must run)
            if self.phase is Phase.IDLE:
                self._check_ranks_present(g)
            self._wait_gathered(g)
        if self.phase is Phase.FORWARD and torch.is_grad_enabled():
            flat, spec = tree_flatten((args, kwargs))
            idx = [i for i, t in enumerate(flat) if torch.is_tensor(t) and t.requires_grad]
            if idx:
                outs = PostBackward.apply(self, g, *[flat[i] for i in idx])
                outs = outs if isinstance(outs, tuple) else (outs,)
                for i, t in zip(idx, outs):
                    flat[i] = t
                return tree_unflatten(flat, spec)
        return None

    def _post_forward(self, g: Group, output):
        if self.phase is not Phase.FORWARD:
            return None  # recomputation inside backward keeps the unit gathered for its backward
        if torch.is_grad_enabled():
            tensors = [t for t in tree_flatten(output)[0] if torch.is_tensor(t) and t.requires_grad]
            fired = [False]

            def pre_backward(grad, g=g, fired=fired):
                if not fired[0]:
                    fired[0] = True
                    self._pre_backward(g)
                return grad

            for t in tensors:
                t.register_hook(pre_backward)
        if self.cfg.stage == 3 and not g.persistent and not (torch.is_grad_enabled() and g.index in self._keep):
            self._reshard(g)
        return None

    def _count_use(self, g: Group) -> None:
        if self.cfg.stage == 3 and not g.persistent:
            self.prefetch_counts["miss" if self._is_sharded(g) else "hit"] += 1

    def take_prefetch_counts(self) -> dict[str, int]:
        """Gathers issued ahead, and hits / misses at use, since the last call."""
        out, self.prefetch_counts = self.prefetch_counts, {"issued": 0, "hit": 0, "miss": 0}
        return out

    def _pre_backward(self, g: Group) -> None:
        self._count_use(g)
        self._wait_gathered(g)
        if g.index in self._bwd_order:
            self._prefetch(self._bwd_order, self._bwd_order.index(g.index))

    def _post_backward(self, g: Group) -> None:
        if g.reduced:
            return
        g.reduced = True
        if self.cfg.stage >= 2:
            for c in g.chunks:
                self._reduce_chunk(c)
        if self.cfg.stage == 3 and not g.persistent:
            self._reshard(g)

    # -- gradients -----------------------------------------------------------
    def _reduce_chunk(self, c: RuntimeChunk) -> None:
        """Flatten the chunk's parameter grads (zeros where a parameter got none)
        and reduce-scatter them into the fp32 shard grad, averaged over ranks."""
        with self._alloc():
            flat = torch.zeros(c.spec.padded_numel, dtype=self.reduce_dtype, device=self.device)
        for slot, p in zip(c.spec.params, c.params):
            if p.grad is not None:
                flat[slot.offset:slot.end].copy_(p.grad.reshape(-1))
                p.grad = None
        if self.world_size == 1:
            self._land(c, flat[: c.spec.shard_numel])
            return
        with self._alloc():
            out = torch.empty(c.spec.shard_numel, dtype=self.reduce_dtype, device=self.device)
        work = reduce_scatter_flat(out, flat, async_op=True)
        self._pending.append((c, work, out, flat))
        # At most two reductions in flight: bounded memory, still overlapped with backward.
        while len(self._pending) > 2:
            self._finish_one()

    def _finish_one(self) -> None:
        c, work, out, _flat = self._pending.pop(0)
        work.wait()
        self._land(c, out.div_(self.world_size))

    def _land(self, c: RuntimeChunk, shard_grad: torch.Tensor) -> None:
        """An averaged gradient shard is final for this micro-batch: accumulate it."""
        if self.host_opt is not None:
            first = self._micro == 0 or self.cfg.stage == 1  # stage 1 reduces once per step
            self.host_opt.accept_grad(c.spec.index, shard_grad, first_micro=first, last_micro=self._last_micro)
        else:
            c.grad.add_(shard_grad.to(torch.float32))

    # -- public step API -----------------------------------------------------
    def forward_begin(self) -> None:
        """Call before each micro-batch's forward (and before an eval forward)."""
        self.rewrap()  # after unwrap_model(): parameters back on the engine's buffers
        self.phase = Phase.FORWARD
        self._cur_order = []
        if self.host_opt is not None:  # reads ahead no gather used: stale once their chunk stepped
            self.host_opt.drop_prefetched()
        for g in self.groups:
            g.reduced = False
        if self.root is not None:
            self._wait_gathered(self.root)

    def backward(self, loss: torch.Tensor, sync_grads: bool = True) -> None:
        """Backward of one micro-batch; ``sync_grads`` on its last micro-batch.

        Stage 1 accumulates full gradients locally and reduces them only when
        ``sync_grads``; stages 2–3 reduce-scatter every micro-batch as units finish."""
        if self._cur_order != self._fwd_order:
            if self._fwd_order:
                self.order_changes += 1
                log.info("rank %d: unit execution order changed (%d -> %d units); re-recorded for prefetch",
                         self.rank, len(self._fwd_order), len(self._cur_order))
            self._fwd_order = list(self._cur_order)
            if self.reuse_distance:
                keep = keep_for_backward([self.groups[i].numel for i in self._fwd_order], self.reuse_distance)
                self._keep = {i for i, k in zip(self._fwd_order, keep) if k}
        self._bwd_order = list(reversed(self._cur_order))
        if self.host_opt is not None:  # waiting gradients step in the next forward's order
            self.host_opt.set_step_order(self._step_order())
        if self.cfg.stage == 3:  # prefetched for a path not taken: release
            self._reshard_gathered(keep=set(self._cur_order))
            if self.host_opt is not None:
                self.host_opt.drop_prefetched()
        self.phase = Phase.BACKWARD
        self._last_micro = sync_grads
        try:
            (loss * self.scaler.scale if self.scaler.enabled else loss).backward()
            # Groups whose post-backward did not fire (inputs without grad, unused units),
            # in a fixed order so collectives match across ranks.
            for g in reversed(self.groups):
                self._post_backward(g)
            if self.root is not None and self.cfg.stage >= 2:
                self._reduce_chunk(self.root)
            if sync_grads and self.cfg.stage == 1:
                for c in self.chunks:
                    self._reduce_chunk(c)
            while self._pending:
                self._finish_one()
        finally:
            self.phase = Phase.IDLE
            self._micro = 0 if sync_grads else self._micro + 1

    def begin_step(self, lr: float) -> None:
        """The learning rate of the optimizer step about to be computed.  With the
        optimizer on the host and no clipping, chunks step as their gradients land
        during backward, so they need it before ``step``."""
        self._lr_set = lr
        if self.host_opt is not None:
            self.host_opt.begin_step(lr)

    def forward_end_eval(self) -> None:
        """After a forward no backward follows (evaluation)."""
        self.phase = Phase.IDLE
        if self.cfg.stage == 3:  # units kept for a backward (max_reuse_distance) that will not come
            self._reshard_gathered()

    @torch.no_grad()
    def step(self, lr: float) -> StepStats:
        """Unscale (fp16), clip to the exact global norm, step the shards, refresh params."""
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
        if not opt.deferred and self._lr_set != lr:
            raise RuntimeError(f"[rank {self.rank}] with the optimizer offloaded and no clipping, call "
                               f"begin_step({lr}) before the step's backward (got {self._lr_set}).")
        self._lr_set = None
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
            opt.step_deferred(lr, coef / scale, self._step_order())
        opt.finish_step()
        for c in self.chunks:
            c.stale = True
        self.refresh_params()
        return stats

    def _step_order(self) -> list[int]:
        """Chunks in the order the next forward needs them: root, then units."""
        order = [self.root.spec.index] if self.root is not None else []
        seen = set(order)
        for gi in self._fwd_order or range(len(self.groups)):
            for c in self.groups[gi].chunks:
                if c.spec.index not in seen:
                    order.append(c.spec.index)
                    seen.add(c.spec.index)
        order += [c.spec.index for c in self.chunks if c.spec.index not in seen]
        return order

    @torch.no_grad()
    def refresh_params(self) -> None:
        """Recompute compute-dtype shards from the masters; re-gather what stays gathered
        (stages 1–2, the root, persistent chunks).  Stage-3 units gather lazily."""
        keep = [c for c in self.chunks
                if self.cfg.stage < 3 or c.spec.persistent or c is self.root]
        if self.cfg.stage == 3:  # a unit kept for a backward that never came (max_reuse_distance) is stale now
            self._reshard_gathered()
        if self.host_opt is None:
            for c in self.chunks:
                if c.compute_shard is not c.master:
                    c.compute_shard.copy_(c.master)
        for c in keep:
            if c.state is Residency.GATHERED:
                c.transition(Residency.SHARDED)  # contents stale; storage is reused in place
            self._issue_gather(c)
        for c in keep:
            self._wait_gathered(c)
