"""The memory owner: one per engine, the only place tierlift creates CUDA streams and
events, and the holder of the memory every tier shares -- the pinned host pool and the
GPU chunk arena.

Who uses it: the engine (its H2D stream for parameters copied up from the host, the
arena its gathers allocate in), the host optimizer (its D2H stream for gradients,
pinned slots and state slabs) and the activation swapper (its own D2H / H2D streams,
pinned slabs for swapped tensors).  All pinned memory comes from one ``PinnedPool``
under one budget (``offload.host_budget_bytes``), so ``pinned_bytes`` is the whole
process's and one budget error names everything pinned.

Streams are named by role (``STREAMS``) and created once, on first use: two users of
one role share it (ordering within a role is what they rely on); different roles never
share (an activation swap must not queue behind a parameter copy).  On a CPU device
every stream is None and every event None: the same code runs with plain copies.

A buffer travels with the event that guards it (``Guarded``): the last copy into or
out of it on some stream; the buffer may be reused, or freed, once that event has
completed.

Sync points: none here.  ``Guarded.wait`` blocks the calling host thread on the event;
``close`` synchronizes the device before unpinning (``PinnedPool.close``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from tierlift.offload.arena import ArenaPlan, ChunkArena
from tierlift.offload.nvme import aligned_empty
from tierlift.offload.pinned import PinnedPool

__all__ = ["STREAMS", "Guarded", "MemoryOwner"]

# Copy streams by role: "h2d" the engine's parameter copies up (and the arena's gather
# shards), "d2h" the host optimizer's gradients down, "act_d2h" / "act_h2d" swapped
# activations (their own pair, so a swap never waits behind the optimizer's copies).
STREAMS = ("h2d", "d2h", "act_d2h", "act_h2d")


@dataclass
class Guarded:
    """A buffer and the event that guards it: the last device copy that touched it
    (None: nothing in flight, usable now)."""

    tensor: torch.Tensor
    event: Any = None  # torch.cuda.Event or None

    def ready(self) -> bool:
        """True when no copy touching the buffer is still in flight (never blocks)."""
        return self.event is None or self.event.query()

    def wait(self) -> None:
        """Block the calling thread until the guarding copy completed; the buffer is then free."""
        if self.event is not None:
            self.event.synchronize()
            self.event = None


class MemoryOwner:
    """Streams, events, the pinned pool and the GPU arena of one engine (see module doc).

    ``host_budget_bytes``: the pinned pool's budget (0 = none).  The pool is created on
    first use, on CUDA devices only; CPU runs allocate pageable, 4 KiB-aligned buffers."""

    def __init__(self, device: torch.device | str, host_budget_bytes: int = 0) -> None:
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.host_budget_bytes = int(host_budget_bytes)
        self._streams: dict[str, Any] = {}
        self._pool: PinnedPool | None = None
        self.arena: ChunkArena | None = None
        self.closed = False

    # -- streams and events ---------------------------------------------------------------
    def stream(self, role: str):
        """The copy stream of ``role`` (one of ``STREAMS``), created on first use; None on CPU."""
        if role not in STREAMS:
            raise ValueError(f"unknown stream role {role!r}; one of {', '.join(STREAMS)}")
        if not self.cuda:
            return None
        s = self._streams.get(role)
        if s is None:
            s = self._streams[role] = torch.cuda.Stream(self.device)
        return s

    def event(self, *, timing: bool = False):
        """A fresh CUDA event (``timing``: with timing enabled); None on CPU."""
        return torch.cuda.Event(enable_timing=timing) if self.cuda else None

    def record(self, stream) -> Any:
        """A fresh event recorded on ``stream`` (None: the current stream); None on CPU."""
        ev = self.event()
        if ev is not None:
            ev.record(stream) if stream is not None else ev.record()
        return ev

    # -- pinned host memory ------------------------------------------------------------------
    @property
    def pool(self) -> PinnedPool | None:
        """The one pinned pool (CUDA only; created on first use, which checks memlock)."""
        if not self.cuda or self.closed:
            return None
        if self._pool is None:
            self._pool = PinnedPool(self.host_budget_bytes, device=self.device)
        return self._pool

    def host_buffers(self, sizes: list[int], pinned: bool = True) -> tuple[list[torch.Tensor], Callable[[], None]]:
        """Byte buffers of ``sizes`` in one allocation, 4 KiB aligned (O_DIRECT reads land in
        them), and the callable that gives the allocation back.  Pinned (one slab of the
        pool) when ``pinned`` on a CUDA device; else pageable, freed with the last reference."""
        pool = self.pool if pinned else None
        if pool is None:
            return [aligned_empty(s) for s in sizes], lambda: None
        regions = pool.carve(sizes)
        slab = regions[0].slab

        def release() -> None:
            for r in regions:
                r.free()
            slab.release()
        return [r.view(torch.uint8) for r in regions], release

    @property
    def pinned_bytes(self) -> int:
        """Page-locked bytes held now by every user of the pool."""
        return self._pool.stats().pinned_bytes if self._pool is not None and not self._pool.closed else 0

    # -- GPU arena ----------------------------------------------------------------------------
    def build_arena(self, plan: ArenaPlan, rank: int = 0) -> ChunkArena:
        """Reserve the GPU chunk arena of ``plan`` (CUDA only); gather-shard slots on the
        ``h2d`` stream, where the engine allocates them."""
        if self.arena is not None:
            raise RuntimeError("the GPU chunk arena was already built for this engine")
        h2d = self.stream("h2d") if any(c.stream == "h2d" for c in plan.classes) else None  # only when used
        self.arena = ChunkArena(plan, self.device, h2d, rank)
        return self.arena

    def close(self) -> None:
        """Unpin and unmap the pool (users have released their slabs first).  Idempotent."""
        self.closed = True
        if self._pool is not None:
            if self.cuda:
                torch.cuda.synchronize(self.device)  # no DMA may touch pages about to be unpinned
            self._pool.close()
            self._pool = None
