"""The engine's module hooks: when each group is gathered, prefetched, reduced and resharded.

Per top-level unit (docs/zero.md, "Hooks"):

- forward pre-hook: wait for the unit's gather, issue the next ``zero.prefetch_units``
  gathers, and wrap the unit's inputs in ``PostBackward`` (whose backward marks the end
  of the unit's backward);
- forward post-hook: register a pre-backward hook on the outputs and (stage 3)
  reshard, unless the unit stays gathered for its backward (``max_reuse_distance``);
- pre-backward: gather again, prefetch in reverse order;
- post-backward: reduce the unit's gradients (``reduce.py``), reshard.

The unit order is recorded during each forward and compared with the last; backward
prefetch follows the exact reverse of the current forward.  This object is the
engine's phase (idle / forward / backward) and the owner of those orders, as FSDP2's
``FSDPState`` is of its hooks and its param groups' order.

Sync points: none of their own; the waits are the ``Gatherer``'s and ``GradReducer``'s.
"""

from __future__ import annotations

import enum
import logging

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from tierlift.parallel.chunks import Residency, RuntimeChunk
from tierlift.parallel.gather import keep_for_backward
from tierlift.parallel.group import Group
from tierlift.parallel.reduce import GradReducer
from tierlift.parallel.rendezvous import Rendezvous

__all__ = ["Phase", "UnitHooks", "PostBackward"]

log = logging.getLogger("tierlift.zero")


class Phase(enum.Enum):
    IDLE = "idle"
    FORWARD = "forward"
    BACKWARD = "backward"


class PostBackward(torch.autograd.Function):
    """Identity on a unit's inputs whose backward runs once the unit's whole
    backward is done (AccumulateGrad nodes run first, so its grads are final)."""

    @staticmethod
    def forward(ctx, hooks, group, *inputs):
        ctx.hooks, ctx.group = hooks, group
        return inputs if len(inputs) > 1 else inputs[0]

    @staticmethod
    def backward(ctx, *grads):
        ctx.hooks.post_backward(ctx.group)
        return (None, None) + grads


class UnitHooks:
    """Registers the hooks on every group's module and runs them (see module doc).
    ``cfg`` is the engine's own ZeroConfig: a new plan changes its ``prefetch_units``."""

    def __init__(self, *, groups: list[Group], chunks: list[RuntimeChunk], cfg, reducer: GradReducer,
                 rendezvous: Rendezvous, host_opt, compute_dtype: torch.dtype, reuse_distance: int,
                 rank: int) -> None:
        self.groups = groups
        self.chunks = chunks
        self.cfg = cfg
        self.reducer = reducer
        self.rendezvous = rendezvous
        self.host_opt = host_opt
        self.itemsize = torch.finfo(compute_dtype).bits // 8
        self.reuse_distance = reuse_distance  # elements; see ZeroConfig.max_reuse_distance
        self.rank = rank
        self.phase = Phase.IDLE
        self.fwd_order: list[int] = []  # group order recorded on the previous micro-batch
        self.cur_order: list[int] = []  # ... and on the current one
        self.bwd_order: list[int] = []
        self.keep: set[int] = set()  # groups that stay gathered from forward to backward (max_reuse_distance)
        self.order_changes = 0
        # Stage-3 gathers per step: issued ahead by prefetch; at use, a hit (already
        # gathered or in flight) or a miss (gathered on demand).  Telemetry events.
        self.prefetch_counts = {"issued": 0, "hit": 0, "miss": 0}
        self._handles: list = []

    # -- registration ---------------------------------------------------------
    def attach(self) -> None:
        for g in self.groups:
            self._handles.append(g.module.register_forward_pre_hook(
                lambda m, a, k, g=g: self.pre_forward(g, a, k), with_kwargs=True))
            self._handles.append(g.module.register_forward_hook(lambda m, a, o, g=g: self.post_forward(g, o)))

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    # -- phases, driven by the engine -------------------------------------------
    def forward_begin(self) -> None:
        self.phase = Phase.FORWARD
        self.cur_order = []
        for g in self.groups:
            g.reduced = False

    def backward_begin(self) -> None:
        """Before a micro-batch's backward: record this forward's order (and what stays
        gathered for backward), release prefetches of units that did not run."""
        if self.cur_order != self.fwd_order:
            if self.fwd_order:
                self.order_changes += 1
                log.info("rank %d: unit execution order changed (%d -> %d units); re-recorded for prefetch",
                         self.rank, len(self.fwd_order), len(self.cur_order))
            self.fwd_order = list(self.cur_order)
            if self.reuse_distance:
                keep = keep_for_backward([self.groups[i].numel for i in self.fwd_order], self.reuse_distance)
                self.keep = {i for i, k in zip(self.fwd_order, keep) if k}
        self.bwd_order = list(reversed(self.cur_order))
        if self.cfg.stage == 3:  # prefetched for a path not taken: release
            self.reshard_gathered(keep=set(self.cur_order))
        self.phase = Phase.BACKWARD

    def backward_end(self) -> None:
        """After ``loss.backward()``: groups whose post-backward did not fire (inputs without
        grad, unused units), in a fixed order so collectives match across ranks."""
        for g in reversed(self.groups):
            self.post_backward(g)

    def idle(self) -> None:
        self.phase = Phase.IDLE

    def forward_end_eval(self) -> None:
        self.phase = Phase.IDLE
        if self.cfg.stage == 3:  # units kept for a backward (max_reuse_distance) that will not come
            self.reshard_gathered()

    def reshard_gathered(self, keep: set[int] = frozenset()) -> None:
        """Reshard every non-persistent group still gathered, but those in ``keep`` (stage 3)."""
        for g in self.groups:
            if g.index not in keep and not g.persistent and not g.is_sharded():
                g.reshard()

    def take_prefetch_counts(self) -> dict[str, int]:
        """Gathers issued ahead, and hits / misses at use, since the last call."""
        out, self.prefetch_counts = self.prefetch_counts, {"issued": 0, "hit": 0, "miss": 0}
        return out

    # -- the hooks ------------------------------------------------------------
    def pre_forward(self, g: Group, args, kwargs):
        if self.phase is Phase.FORWARD:
            self.cur_order.append(g.index)
            pos = len(self.cur_order) - 1
            self._count_use(g)
            g.wait_for_unshard()
            if pos < len(self.fwd_order) and self.fwd_order[pos] == g.index:
                self._prefetch(self.fwd_order, pos)
        else:  # recomputation in backward, or a forward outside forward_begin (which every rank must run)
            if self.phase is Phase.IDLE and self.cfg.stage == 3 and g.is_sharded():
                # Before a gather outside the step loop: fail fast unless every rank runs it too.
                self.rendezvous.check("forward", f"a forward of unit {g.name!r} outside fit()")
            g.wait_for_unshard()
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

    def post_forward(self, g: Group, output):
        if self.phase is not Phase.FORWARD:
            return None  # recomputation inside backward keeps the unit gathered for its backward
        if torch.is_grad_enabled():
            tensors = [t for t in tree_flatten(output)[0] if torch.is_tensor(t) and t.requires_grad]
            fired = [False]

            def pre_backward(grad, g=g, fired=fired):
                if not fired[0]:
                    fired[0] = True
                    self.pre_backward(g)
                return grad

            for t in tensors:
                t.register_hook(pre_backward)
        if self.cfg.stage == 3 and not g.persistent and not (torch.is_grad_enabled() and g.index in self.keep):
            g.reshard()
        return None

    def pre_backward(self, g: Group) -> None:
        self._count_use(g)
        g.wait_for_unshard()
        if g.index in self.bwd_order:
            self._prefetch(self.bwd_order, self.bwd_order.index(g.index))

    def post_backward(self, g: Group) -> None:
        if g.reduced:
            return
        g.reduced = True
        if self.cfg.stage >= 2:
            for c in g.chunks:
                self.reducer.reduce_chunk(c)
        if self.cfg.stage == 3 and not g.persistent:
            g.reshard()

    # -- prefetch -------------------------------------------------------------
    def _count_use(self, g: Group) -> None:
        if self.cfg.stage == 3 and not g.persistent:
            self.prefetch_counts["miss" if g.is_sharded() else "hit"] += 1

    def _live_numel(self) -> int:
        return sum(c.spec.padded_numel for c in self.chunks if not c.is_sharded)

    def _prefetch(self, order: list[int], pos: int) -> None:
        if self.cfg.stage != 3:
            return
        if self.host_opt is not None and self.host_opt.params_on_nvme:
            # Disk reads run two groups further ahead than the gathers that consume them.
            for idx in order[pos + 1: pos + 3 + self.cfg.prefetch_units]:
                for c in self.groups[idx].chunks:
                    if c.state is Residency.ON_HOST and c.compute_shard is None:
                        self.host_opt.prefetch_source(c.spec.index)
        bound = self.cfg.max_live_params
        budget = self.cfg.prefetch_bytes or None  # bytes gathered ahead of use, at the compute dtype
        for idx in order[pos + 1: pos + 1 + self.cfg.prefetch_units]:
            g = self.groups[idx]
            if budget is not None:
                budget -= g.numel * self.itemsize
                if budget < 0:
                    return
            if g.is_sharded():
                if bound and self._live_numel() + g.numel > bound:
                    return
                if g.step_pending():  # a prefetch must not block on the host optimizer:
                    return            # the unit's own pre-forward gathers it when due
                g.unshard()
                self.prefetch_counts["issued"] += 1
