"""The host optimizer's step: fused CPU AdamW/SGD (``shard_optim.ShardOptimizer``) over a
chunk's fp32 master and moments, wherever they live.

Host-tier chunks step whole, in place in their pinned slabs.  NVMe-tier chunks step a
piece at a time through the store's staging sets, pipelined

    read(piece k+1 .. k+buffer_count-1)  |  step(piece k)  |  write(piece k-1)

and the first piece of a chunk can be read while an earlier chunk steps
(``read_ahead``, when its gradient is staged).  After each piece the compute-dtype copy
a gather reads is refreshed: the host copy, or the piece's parameters on NVMe, written
with the state.

Runs on the worker thread only (``host_worker.py``).  Sync points: ``wait_read`` on the
pieces it steps; writes complete in the background (the next read of the same extent
is ordered after them by the file).
"""

from __future__ import annotations

import dataclasses
import time

import torch

from tierlift.offload.optimizer_state import ChunkPhase, StateTiers, Tier
from tierlift.offload.nvme_state import Staged
from tierlift.offload.shard_optim import OptimizerConfig, ShardOptimizer

__all__ = ["HostStep"]


class HostStep:
    """Steps chunks of ``tiers`` with ``optim``; adds seconds to ``busy["step"]`` / ``busy["cast"]``."""

    def __init__(self, tiers: StateTiers, optim: OptimizerConfig, busy: dict[str, float]) -> None:
        self.tiers, self.optim, self.busy = tiers, optim, busy
        self._early: dict[tuple[int, int], Staged] = {}  # (chunk, piece lo) -> reads issued at staging

    def read_ahead(self, i: int) -> None:
        """Start reading the first piece of NVMe-tier chunk ``i`` (if a staging set is free)."""
        t = self.tiers
        if t.chunks[i].tier is Tier.NVME and t.nvme.free_sets:
            lo, hi = t.nvme.pieces[i][0]
            if (i, lo) not in self._early:
                self._early[(i, lo)] = t.nvme.start_read(i, lo, hi)

    def _piece_segments(self, i: int, lo: int, hi: int):
        """Chunk ``i``'s shard segments clipped to ``[lo, hi)`` and rebased to ``lo``."""
        if lo == 0 and hi >= self.tiers.chunks[i].shard_numel:
            return self.tiers.segments[i]
        out = []
        for sg in self.tiers.segments[i]:
            a, b = max(sg.shard_lo, lo), min(sg.shard_hi, hi)
            if a < b:
                out.append(dataclasses.replace(sg, shard_lo=a - lo, shard_hi=b - lo,
                                               param_lo=sg.param_lo + a - sg.shard_lo,
                                               param_hi=sg.param_lo + b - sg.shard_lo))
        return out

    @torch.no_grad()
    def run(self, order: list[int], lr: float, coef: float, step_count: int,
            grad: torch.Tensor | None = None) -> None:
        """Step ``order``'s chunks; ``grad``: the (single) chunk's gradient when it is not
        the chunk's own buffer (a ring slot).  Each chunk's ``done`` is set after its last piece."""
        t = self.tiers
        work = []  # (chunk, lo, hi, last piece of the chunk)
        for i in order:
            hc = t.chunks[i]
            pieces = t.nvme.pieces[i] if hc.tier is Tier.NVME else [(0, hc.shard_numel)]
            work += [(i, lo, hi, k == len(pieces) - 1) for k, (lo, hi) in enumerate(pieces)]
        disk = [(i, lo, hi) for i, lo, hi, _ in work if t.chunks[i].tier is Tier.NVME]
        pos = {w: n for n, w in enumerate(disk)}
        reads: dict[tuple[int, int], Staged] = {}
        lookahead = max(1, t.nvme.buffer_count - 1) if t.nvme is not None else 1
        for i, lo, hi, last in work:
            hc = t.chunks[i]
            staged = None
            if hc.tier is Tier.NVME:
                n = pos[(i, lo, hi)]
                for j, jlo, jhi in disk[n:n + lookahead]:
                    if (j, jlo) not in reads:
                        reads[(j, jlo)] = self._early.pop((j, jlo), None) or t.nvme.start_read(j, jlo, jhi)
                staged = reads.pop((i, lo))
                views = t.nvme.wait_read(staged)
                master, states = views[0], dict(zip(t.kinds, views[1:]))
            else:
                master, states = hc.master, hc.states
            g = (grad if grad is not None else t.grad_buf(hc))[lo:hi]
            if coef != 1.0:
                g.mul_(coef)
            t0 = time.perf_counter()
            ShardOptimizer(self.optim, [master], [g], [self._piece_segments(i, lo, hi)], states=[states],
                           step_count=step_count).step(lr)
            t1 = time.perf_counter()
            if hc.param16 is not None:
                hc.param16[lo:hi].copy_(master)
            elif staged is not None and staged.param_view is not None:
                staged.param_view.copy_(master)  # written with the state below
            self.busy["step"] += t1 - t0
            self.busy["cast"] += time.perf_counter() - t1
            if grad is None:
                g.zero_()
            if staged is not None:
                t.nvme.start_write(staged)
            if last:
                hc.enter(ChunkPhase.IDLE)
                hc.done.set()
