"""Moving chunks through their residency states (``chunks.py``): gathers (from device
shards, or copied up from the host optimizer), waits, reshards, and the GPU chunk arena
their buffers come from.  One ``Gatherer`` per engine, shared by its groups
(``group.py``), as FSDP2's param groups share one comm context.

Sync points (GPU): all-gathers are issued async from the current (compute) stream,
so NCCL's stream waits only for work enqueued before the issue (prefetches issued
before a unit's compute overlap it); ``work.wait()`` makes the compute stream wait,
never the host.  With the optimizer on the host, a gather starts on the memory
owner's H2D stream (``offload/memory.py``): an ON_HOST chunk's host master is copied
in and cast there, then all-gathered from that stream; the ``ready`` event in the
chunk's ``InFlight`` makes the compute stream wait.  A host optimizer step still
running blocks the host in ``wait_chunk`` (counted in ``host_wait_s``).  On CPU
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
import torch.distributed as dist

from tierlift.offload.arena import ChunkArena
from tierlift.offload.memory import MemoryOwner
from tierlift.parallel.chunks import InFlight, Residency, RuntimeChunk
from tierlift.parallel.comm import all_gather_flat
from tierlift.parallel.sharded_param import ChunkGuard

__all__ = ["Gatherer", "keep_for_backward", "make_arena", "arena_stats"]

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


def make_arena(memory: MemoryOwner, plan, rank: int, kind: str) -> ChunkArena | None:
    """The GPU chunk arena (``offload/arena.py``), reserved by the memory owner with the slots
    the engine's ExecutionPlan planned (``plan.arena``); None on CPU or with ``zero.arena:
    shared``.  Built after the initial reshard, once the model's setup copies are released,
    so the pool is reserved from memory nothing else holds."""
    if not memory.cuda or kind == "shared":
        return None
    torch.cuda.empty_cache()  # the full model's setup copy, freed by the reshard before this call
    arena = memory.build_arena(plan.arena, rank)
    log.info("rank %d: GPU chunk arena %.2f GiB reserved (%s)", rank, arena.reserved_at_setup / 2**30,
             arena.plan.describe())
    return arena


def arena_stats(arena: ChunkArena | None, device: torch.device) -> dict[str, int]:
    """Per-step memory facts for metrics: arena bytes and device fragmentation (GPU only)."""
    if device.type != "cuda":
        return {}
    if arena is None:
        frag = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return {"gpu_frag_bytes": frag}
    st = arena.stats()
    return {"gpu_frag_bytes": st.device_fragmentation, "arena_reserved_bytes": st.reserved_bytes,
            "arena_growth_bytes": st.growth_bytes}


class Gatherer:
    """Moves chunks SHARDED / ON_HOST -> GATHERING -> GATHERED -> back (see ``chunks.py``):
    issues gathers, waits for them, reshards, and guards resharded parameters.  Its copies
    run on the memory owner's H2D stream and allocate in its arena (when one is built); it
    counts the host seconds spent waiting (read and reset per step by the trainer)."""

    def __init__(self, *, rank: int, world_size: int, device: torch.device, compute_dtype: torch.dtype,
                 host_opt, memory: MemoryOwner, guard: ChunkGuard, debug_sync: bool) -> None:
        self.rank, self.world_size, self.device, self.compute_dtype = rank, world_size, device, compute_dtype
        self.host_opt = host_opt
        self.memory = memory
        # Host -> device copies of parameters run on the H2D stream, beside compute (module doc).
        self.h2d = memory.stream("h2d") if host_opt is not None else None
        self.guard = guard
        self.debug_sync = debug_sync
        # Host seconds blocked on gathers still in flight (gloo; NCCL waits on the device and
        # does not block the host): what deeper prefetch can fix, the policy's input.  Waits for
        # host optimizer steps are counted apart (host_wait_s): with immediate steps the next
        # forward overlaps the optimizer by design, and deeper prefetch would not shorten them.
        self.stall_s = 0.0
        self.host_wait_s = 0.0

    def alloc(self):
        """Scope for allocating chunk buffers: inside the arena's pool when there is one."""
        arena = self.memory.arena
        return arena.scope() if arena is not None else contextlib.nullcontext()

    # -- SHARDED / ON_HOST -> GATHERING ----------------------------------------
    def issue(self, c: RuntimeChunk) -> None:
        """Start gathering ``c`` unless it is gathered or on its way (async)."""
        if not c.is_sharded:
            return
        with self.alloc():
            c.full.untyped_storage().resize_(c.bytes)
        if self.h2d is not None:
            self._gather_from_host(c)
            return
        if self.world_size == 1 and c.cast_from_master and c.state is Residency.SHARDED:
            c.transition(Residency.GATHERING)
            c.full.copy_(c.master)  # the cast straight into the gathered buffer
            c.inflight = InFlight()
            return
        shard = self._shard_for_gather(c)
        c.transition(Residency.GATHERING)
        if self.world_size == 1:
            c.full.copy_(shard, non_blocking=True)
            c.inflight = InFlight()
        else:
            source = None if shard is c.compute_shard else shard  # held until the gather is waited for
            c.inflight = InFlight(work=all_gather_flat(c.full, shard, async_op=True), source=source)

    def _shard_for_gather(self, c: RuntimeChunk) -> torch.Tensor:
        """This rank's compute-dtype shard (no host optimizer, or a CPU device).  ON_HOST:
        wait for the chunk's host step and cast its new parameters (fp32 master or
        compute-dtype copy) into the device shard, or a copy made for this gather."""
        if c.state is Residency.SHARDED:
            return c.device_shard()
        c.transition(Residency.H2D_INFLIGHT)
        src = self._wait_host_step(c)
        if c.compute_shard is None:
            out = src.to(self.compute_dtype, copy=True)
        else:
            out = c.compute_shard
            out.copy_(src)
        self.host_opt.release_source(c.spec.index)
        return out

    def _gather_from_host(self, c: RuntimeChunk) -> None:
        """GPU gather with the optimizer on the host, on the H2D stream: for an ON_HOST chunk
        copy the host parameters in (fp32 master: 4 B/elem over PCIe, so the host keeps no
        compute-dtype copy and the CPU casts nothing) and cast on the device; then
        all-gather.  World size 1 casts straight into the gathered buffer."""
        stream = self.h2d
        # The gathered storage was just (re)allocated from the default stream's pool:
        # kernels queued there may still use that memory.
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            shard, source = c.compute_shard, None
            if c.state is Residency.ON_HOST:
                c.transition(Residency.H2D_INFLIGHT)
                src = self._wait_host_step(c)
                if shard is None:
                    if self.world_size == 1:
                        shard = c.full
                    else:
                        with self.alloc():
                            shard = source = torch.empty(c.spec.shard_numel, dtype=self.compute_dtype,
                                                         device=self.device)
                shard.copy_(src.to(self.device, non_blocking=True))  # H2D, then the cast, both on this stream
                copied = self.memory.record(stream)
                self.host_opt.release_source(c.spec.index, copied)  # a slot read from NVMe is reusable after it
            c.transition(Residency.GATHERING)
            work = None
            if self.world_size == 1:
                if shard is not c.full:
                    c.full.copy_(shard)
            else:
                work = all_gather_flat(c.full, shard, async_op=True)
            c.inflight = InFlight(work=work, ready=self.memory.record(stream), source=source)

    def step_pending(self, c: RuntimeChunk) -> bool:
        """A gather of ``c`` would wait for a host optimizer step still running."""
        return c.state is Residency.ON_HOST and not self.host_opt.is_stepped(c.spec.index)

    def _wait_host_step(self, c: RuntimeChunk) -> torch.Tensor:
        t0 = time.perf_counter()
        out = self.host_opt.wait_chunk(c.spec.index)
        self.host_wait_s += time.perf_counter() - t0
        return out

    # -- GATHERING -> GATHERED -> SHARDED / ON_HOST ------------------------------
    def wait(self, c: RuntimeChunk) -> None:
        """Make the compute stream (CPU: the host) wait for ``c``'s gather in flight, if any."""
        if c.state is not Residency.GATHERING:
            return
        fl = c.inflight
        if fl.work is not None:
            t0 = time.perf_counter()
            fl.work.wait()
            self.stall_s += time.perf_counter() - t0
        if fl.ready is not None:  # copied in and gathered on the H2D stream
            current = torch.cuda.current_stream(self.device)
            current.wait_event(fl.ready)
            if fl.source is not None:  # NCCL read it: reusable once this stream gets here
                fl.source.record_stream(current)
        c.inflight = None
        c.transition(Residency.GATHERED)
        self.guard.set(c, False)  # readable again (sharded_param.py)
        if self.debug_sync:
            self.check_gathered(c)

    def gathered(self, chunks: list[RuntimeChunk]) -> None:
        """Issue every chunk's gather, then wait for each (the gathers overlap)."""
        for c in chunks:
            self.issue(c)
        for c in chunks:
            self.wait(c)

    def reshard(self, c: RuntimeChunk) -> None:
        """Free a gathered, non-persistent chunk's storage; an in-flight gather lands first."""
        self.wait(c)
        if c.spec.persistent or c.state is not Residency.GATHERED:
            return
        c.transition(c.resting)
        c.full.untyped_storage().resize_(0)
        self.guard.set(c, True)  # a read now is a clear error, not a read of freed memory

    def take_stall_ms(self) -> float:
        """Milliseconds the host waited for gathers in flight since the last call."""
        ms, self.stall_s = self.stall_s * 1e3, 0.0
        return ms

    def take_host_wait_ms(self) -> float:
        """Milliseconds the host waited for host optimizer steps since the last call."""
        ms, self.host_wait_s = self.host_wait_s * 1e3, 0.0
        return ms

    def check_gathered(self, c: RuntimeChunk) -> None:
        """debug_sync: this rank's slice of the gathered buffer is its own shard, and
        the gathered buffer is bit-identical across ranks (compared by checksum)."""
        lo, hi = c.spec.shard_range(self.rank)
        if c.on_device and not torch.equal(c.full[lo:hi], c.device_shard()):
            raise RuntimeError(f"[rank {self.rank}] debug_sync: gathered chunk {c.spec.index} ({c.spec.unit!r}) "
                               f"does not hold this rank's shard at [{lo}, {hi}).")
        s = c.full.double().sum().reshape(1)
        sums = [torch.zeros_like(s) for _ in range(self.world_size)]
        dist.all_gather(sums, s) if self.world_size > 1 else sums.__setitem__(0, s)
        if any(float(x) != float(s) for x in sums):
            raise RuntimeError(f"[rank {self.rank}] debug_sync: gathered chunk {c.spec.index} ({c.spec.unit!r}) "
                               f"differs across ranks: {[float(x) for x in sums]}")
