"""Swapped activations: the pinned host slabs and the two copy streams they travel on.

``SwapStore`` uses the engine's memory owner (``memory.py``): its ``act_d2h`` / ``act_h2d``
streams and slabs of its pinned pool (sub-allocated per tensor, freed with the event of
the copy that last read them).  A ``Swapped`` record
is one saved tensor whose leading ``k`` elements live on the host; it carries the event
that guards those bytes at every moment (the D2H that wrote them, then the H2D that
read them back).

Sync points: none, except ``wait`` when backward needs a tensor whose H2D has not
finished -- that host wait is the stall the activation plan predicts, and is returned.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import torch

from tierlift.offload.activation_profile import nbytes
from tierlift.offload.memory import MemoryOwner
from tierlift.offload.pinned import PinnedMemoryError, SlabFullError

__all__ = ["Swapped", "SwapStore"]

log = logging.getLogger("tierlift.activations")

@dataclass
class Swapped:
    """A saved tensor whose leading ``k`` elements live in host memory.  Travels with the
    event of the copy that last touched its host bytes."""

    shape: torch.Size
    dtype: torch.dtype
    numel: int
    k: int
    host: torch.Tensor  # k elements (a pinned region's view on a GPU run)
    region: Any  # the pool region behind ``host`` (None on CPU)
    kept: torch.Tensor | None  # elements [k:] on the device
    event: Any  # D2H done (GPU) / None
    ready: torch.Tensor | None = None  # the whole tensor back on the device, once fetched
    ready_event: Any = None


class SwapStore:
    """Pinned host memory for swapped activations, and the D2H / H2D streams (see module doc).

    Slabs are sized from ``planned_bytes``, a larger one added when they fill, never more
    than ``host_budget_bytes`` in all (0: no bound of its own); ``to_host`` returns None
    once the budget is spent.  ``memory``:
    the engine's memory owner (its pool and streams); None: one of its own, closed with it."""

    def __init__(self, device: torch.device, host_budget_bytes: int = 0, memory: MemoryOwner | None = None):
        self.device = device
        self.cuda = device.type == "cuda"
        self.host_budget_bytes = host_budget_bytes
        self._own = memory is None
        self.memory = memory or MemoryOwner(device, host_budget_bytes)
        self.d2h = self.memory.stream("act_d2h")
        self.h2d = self.memory.stream("act_h2d")
        self._slabs: list = []
        self._overflow_warned = False
        self.planned_bytes = 0  # what the plan swaps per step: the first slab's size

    def to_host(self, src: torch.Tensor):
        """(host view, region, D2H event) holding a copy of ``src``, or (None, None, None) when the
        host budget is full.  ``src``'s block goes back to the allocator only after the copy."""
        size = nbytes(src)
        if not self.cuda:
            return src.to("cpu", copy=True), None, None
        region = self._host_region(size)
        if region is None:
            return None, None, None
        host = region.view(src.dtype, src.numel())
        self.d2h.wait_stream(torch.cuda.current_stream(self.device))  # src is written on the compute stream
        with torch.cuda.stream(self.d2h):
            host.copy_(src, non_blocking=True)
            ev = self.memory.record(self.d2h)
        src.record_stream(self.d2h)  # its block is reused only after the copy
        return host, region, ev

    def _host_region(self, nbytes: int):
        """A pinned region for ``nbytes``.  Under an explicit host budget: one slab of that
        size, and None once it is full (the tensor stays on the GPU and the metrics count
        it).  Without one: slabs sized from the plan, a larger one added when they fill."""
        for slab in self._slabs:
            try:
                return slab.alloc(nbytes)
            except SlabFullError:
                continue
        # Slabs grow with what the plan swaps (pinning costs ~1 s per 25 GiB and the pages are
        # the node's), never past the host budget in total.
        held = sum(s.nbytes for s in self._slabs)
        size = max(int(self.planned_bytes * 1.25), 2 * held, nbytes, 64 << 20)
        if self.host_budget_bytes:
            size = min(size, (self.host_budget_bytes - held) // 4096 * 4096)
            if size < nbytes:
                if not self._overflow_warned:
                    self._overflow_warned = True
                    log.warning("activation swap: train.activations.host_budget_bytes=%d is full; further "
                                "tensors stay on the GPU (act_swap_overflow_bytes)", self.host_budget_bytes)
                return None
        try:
            self._slabs.append(self.memory.pool.slab(size, name=f"activations-{len(self._slabs)}"))
        except PinnedMemoryError as e:  # the pool is shared: offload.host_budget_bytes is spent
            if not self._overflow_warned:
                self._overflow_warned = True
                log.warning("activation swap: no pinned memory left for a %d-byte slab (%s); further "
                            "tensors stay on the GPU (act_swap_overflow_bytes)", size, e)
            return None
        return self._slabs[-1].alloc(nbytes)

    def fetch(self, h: Swapped) -> None:
        """Start bringing ``h`` back: H2D of its host part on the H2D stream, its kept part joined."""
        out = torch.empty(h.numel, dtype=h.dtype, device=self.device)
        if self.cuda:
            cur = torch.cuda.current_stream(self.device)
            self.h2d.wait_stream(cur)  # ``out``'s block may still be read by queued compute
            with torch.cuda.stream(self.h2d):
                self.h2d.wait_event(h.event)  # its D2H has finished writing the host bytes
                out[:h.k].copy_(h.host, non_blocking=True)
                h.ready_event = self.memory.record(self.h2d)
        else:
            out[:h.k].copy_(h.host)
        if h.kept is not None:
            out[h.k:].copy_(h.kept)
            h.kept = None
        h.ready = out

    def wait(self, h: Swapped) -> tuple[torch.Tensor, float]:
        """The whole tensor back on the device, ordered before the compute stream's next work,
        and the seconds the host waited for its copy (0 when the prefetch was in time)."""
        if h.ready is None:
            self.fetch(h)
        stall = 0.0
        if self.cuda:
            if not h.ready_event.query():
                t0 = time.perf_counter()
                h.ready_event.synchronize()  # exposed H2D: the stall the plan predicts
                stall = time.perf_counter() - t0
            torch.cuda.current_stream(self.device).wait_event(h.ready_event)
        out, h.ready = h.ready, None
        if h.region is not None:
            h.region.free(h.ready_event)
        h.host = h.region = None
        return out.view(h.shape), stall

    def close(self) -> None:
        """Drop the slabs; a memory owner of its own is closed (the engine's closes with the engine)."""
        self._slabs = []
        if self._own:
            self.memory.close()
