"""Residency of gathered chunks: gathers (from device shards or the host optimizer),
waits, reshards, and the GPU chunk arena their buffers come from.

Sync points (GPU): all-gathers are issued async from the current (compute) stream,
so NCCL's stream waits only for work enqueued before the issue (prefetches issued
before a unit's compute overlap it); ``work.wait()`` makes the compute stream wait,
never the host.  With the optimizer on the host, a gather starts on the engine's
H2D stream: the host master is copied in and cast there, then all-gathered from
that stream; the chunk's ``ready`` event makes the compute stream wait.  On CPU
(gloo) the same code runs with gloo's background threads.

Allocation: a stage-3 chunk keeps one storage object for the whole run, resized to
zero when resharded and back when gathered (autograd's saved views of weights stay
valid).  With ``zero.arena: pool`` on a GPU, every such resize, the device shards a
gather reads and the gradient buffers are allocated in the arena's private pool
(``offload/arena.py``); by default, from torch's shared caching allocator.
"""

from __future__ import annotations

import contextlib
import logging
import time

import torch

from tierlift.offload.arena import ChunkArena
from tierlift.parallel.chunks import Group, Residency, RuntimeChunk
from tierlift.parallel.comm import all_gather_flat

__all__ = ["GatherMixin", "keep_for_backward"]

log = logging.getLogger("tierlift.zero")


def keep_for_backward(numels: list[int], max_reuse_distance: int) -> list[bool]:
    """For units in forward order with ``numels`` elements each: which stay gathered from their
    forward to their backward (pure).  Between the two, every later unit is gathered in forward
    and again in backward, so unit k's reuse distance is twice the elements after it; it is kept
    when that is below ``max_reuse_distance``.  The last units, whose backward comes first, are
    the ones kept."""
    keep, after = [False] * len(numels), 0
    for k in range(len(numels) - 1, -1, -1):
        keep[k] = max_reuse_distance > 0 and 2 * after < max_reuse_distance
        after += numels[k]
    return keep


class GatherMixin:
    """Gather / reshard of chunks for ``ZeroEngine`` (which owns the state these methods use)."""

    def _make_arena(self):
        """The GPU chunk arena (``offload/arena.py``) with the slots the engine's ExecutionPlan
        planned; None on CPU or with ``zero.arena: shared``.  Built after the initial reshard,
        once the model's setup copies are released, so the pool is reserved from memory
        nothing else holds."""
        if self.device.type != "cuda" or self.cfg.arena == "shared":
            return None
        torch.cuda.empty_cache()  # the full model's setup copy, freed by the reshard above
        arena = ChunkArena(self.plan.arena, self.device, self._h2d, self.rank)
        log.info("rank %d: GPU chunk arena %.2f GiB reserved (%s)", self.rank, arena.reserved_at_setup / 2**30,
                 arena.plan.describe())
        return arena

    def _alloc(self):
        """Scope for allocating chunk buffers: inside the arena's pool when there is one."""
        return self.arena.scope() if self.arena is not None else contextlib.nullcontext()

    def arena_stats(self) -> dict[str, int]:
        """Per-step memory facts for metrics: arena bytes and device fragmentation (GPU only)."""
        if self.device.type != "cuda":
            return {}
        if self.arena is None:
            frag = torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
            return {"gpu_frag_bytes": frag}
        st = self.arena.stats()
        return {"gpu_frag_bytes": st.device_fragmentation, "arena_reserved_bytes": st.reserved_bytes,
                "arena_growth_bytes": st.growth_bytes}

    # -- residency -----------------------------------------------------------
    def _issue_gather(self, g: Group | RuntimeChunk) -> None:
        for c in getattr(g, "chunks", [g]):
            if c.state is not Residency.SHARDED:
                continue
            c.transition(Residency.GATHERING)
            with self._alloc():
                c.full.untyped_storage().resize_(c.bytes)
            if self._h2d is not None:
                self._gather_from_host(c)
                continue
            shard = self._shard_for_gather(c)
            if self.world_size == 1:
                c.full.copy_(shard, non_blocking=True)
                c.work = None
            else:
                c.work = all_gather_flat(c.full, shard, async_op=True)

    def _shard_for_gather(self, c: RuntimeChunk) -> torch.Tensor:
        """This rank's compute-dtype shard (no host optimizer, or a CPU device).  With
        the optimizer on the host, wait for the chunk's step and cast its new
        parameters (fp32 master or compute-dtype copy) into the shard."""
        if self.host_opt is None:
            return c.compute_shard
        if c.compute_shard is None:  # parameters live on the host: a compute-dtype copy for this gather
            out = self._wait_host_step(c).to(self.compute_dtype, copy=True)
            self.host_opt.release_source(c.spec.index)
            return out
        if c.stale:
            c.compute_shard.copy_(self._wait_host_step(c))
            self.host_opt.release_source(c.spec.index)
            c.stale = False
        return c.compute_shard

    def _gather_from_host(self, c: RuntimeChunk) -> None:
        """GPU gather of a chunk whose parameters come from the host optimizer, on the
        H2D stream: copy the host parameters in (fp32 master: 4 B/elem over PCIe, so
        the host keeps no compute-dtype copy and the CPU casts nothing), cast on the
        device, all-gather.  World size 1 casts straight into the gathered buffer."""
        stream = self._h2d
        # The gathered storage was just (re)allocated from the default stream's pool:
        # kernels queued there may still use that memory.
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            shard = c.compute_shard
            if shard is None or c.stale:
                src = self._wait_host_step(c)
                if shard is None:
                    if self.world_size == 1:
                        shard = c.full
                    else:
                        with self._alloc():
                            shard = torch.empty(c.spec.shard_numel, dtype=self.compute_dtype, device=self.device)
                    c.gather_tmp = None if shard is c.full else shard
                shard.copy_(src.to(self.device, non_blocking=True))  # H2D, then the cast, both on this stream
                copied = torch.cuda.Event()
                copied.record(stream)
                self.host_opt.release_source(c.spec.index, copied)  # a slot read from NVMe is reusable after it
                c.stale = False
            if self.world_size == 1:
                if shard is not c.full:
                    c.full.copy_(shard)
                c.work = None
            else:
                c.work = all_gather_flat(c.full, shard, async_op=True)
            c.ready = torch.cuda.Event()
            c.ready.record(stream)

    def _host_step_pending(self, g: Group) -> bool:
        """A gather of ``g`` would wait for a host optimizer step still running."""
        return self.host_opt is not None and any(
            (c.compute_shard is None or c.stale) and not self.host_opt.is_stepped(c.spec.index) for c in g.chunks)

    def _wait_host_step(self, c: RuntimeChunk) -> torch.Tensor:
        t0 = time.perf_counter()
        out = self.host_opt.wait_chunk(c.spec.index)
        self.host_wait_s += time.perf_counter() - t0
        return out

    def take_stall_ms(self) -> float:
        """Milliseconds the host waited for gathers in flight since the last call."""
        ms, self.stall_s = self.stall_s * 1e3, 0.0
        return ms

    def take_host_wait_ms(self) -> float:
        """Milliseconds the host waited for host optimizer steps since the last call."""
        ms, self.host_wait_s = self.host_wait_s * 1e3, 0.0
        return ms

    def _wait_gathered(self, g: Group | RuntimeChunk) -> None:
        self._issue_gather(g)
        for c in getattr(g, "chunks", [g]):
            if c.state is Residency.GATHERING:
                if c.work is not None:
                    t0 = time.perf_counter()
                    c.work.wait()
                    self.stall_s += time.perf_counter() - t0
                    c.work = None
                if c.ready is not None:  # copied in on the H2D stream
                    current = torch.cuda.current_stream(self.device)
                    current.wait_event(c.ready)
                    c.ready = None
                    if c.gather_tmp is not None:  # NCCL read it: reusable once this stream gets here
                        c.gather_tmp.record_stream(current)
                        c.gather_tmp = None
                c.transition(Residency.GATHERED)
                self._set_guard(c, False)  # readable again (unshard.py)
                if self.cfg.debug_sync:
                    self._check_gathered(c)

    def _reshard(self, g: Group) -> None:
        self._wait_gathered(g)  # an in-flight gather must land before its storage goes
        for c in g.chunks:
            if not c.spec.persistent:
                c.transition(Residency.SHARDED)
                c.full.untyped_storage().resize_(0)
                self._set_guard(c, True)  # a read now is a clear error, not a read of freed memory

    def _reshard_gathered(self, keep: set[int] = frozenset()) -> None:
        """Reshard every non-persistent group still gathered, but those in ``keep`` (stage 3)."""
        for g in self.groups:
            if g.index not in keep and not g.persistent and not self._is_sharded(g):
                self._reshard(g)

    def _is_sharded(self, g: Group) -> bool:
        return any(c.state is Residency.SHARDED for c in g.chunks)

    def _live_numel(self) -> int:
        return sum(c.spec.padded_numel for c in self.chunks if c.state is not Residency.SHARDED)
