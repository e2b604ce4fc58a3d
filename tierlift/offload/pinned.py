"""Pinned host slab pool: exact-size page-locked buffers under one budget.

Why not ``torch.empty(..., pin_memory=True)`` for big buffers: it goes through
torch's CachingHostAllocator, which rounds every request up to a power of two
(1.1 GiB pins 2 GiB) and keeps freed blocks cached for the life of the process --
two causes of host OOM under DeepSpeed's offload.  Here every slab is exactly
the request rounded up to 4 KiB (the O_DIRECT alignment), and ``close()`` gives
the pages back to the OS.

Methods (both end in page-locked memory that ``copy_(non_blocking=True)`` DMAs from):

* ``"register"`` (default): anonymous ``mmap`` (page aligned, ``munmap`` really
  returns it) with transparent huge pages requested, every page touched from torch's
  thread pool so the page faults run in parallel, then ``cudaHostRegister``.
  25-29 GiB/s for 1 GiB on the H200 machine (14 without huge pages).
* ``"hostalloc"``: torch's pinned allocator (``cudaHostAlloc``), ~2.4 GiB/s there.
  Accepted only where its power-of-two rounding wastes < 2 %; refused otherwise.
  A view that outlives ``close()`` keeps its block pinned in torch's host cache.

Without CUDA (CI, or ``device="cpu"``) slabs are the same aligned pageable
mappings and report ``pinned=False``, so every CPU path is testable.

Sub-allocation: ``Slab.alloc``/``Region.free`` keep an address-ordered free list
with coalescing.  A region freed with an event (the copy that last read or wrote
it) is reused only once that event has completed.  One lock per pool guards all of
it, because NVMe I/O threads allocate and free concurrently with the main thread.

Sync points: ``Slab.release()`` and ``PinnedPool.close()`` wait for pending events
and, for pinned slabs, ``torch.cuda.synchronize(device)`` before ``cudaHostUnregister``
(unpinning under an in-flight DMA is undefined behaviour).
"""

from __future__ import annotations

import bisect
import threading
import warnings
import weakref
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch

from tierlift._configbase import check_choice
from tierlift.offload.host_alloc import (  # noqa: F401  (re-exported: the pool's public API)
    _BUDGET, MAX_ROUNDING_WASTE, PAGE, Event, MemlockReport, PinnedMemoryError, SlabFullError, _allocate,
    _Backing, _empty_host_cache, _fmt, _round_up, check_memlock, hostalloc_pinned_bytes)

__all__ = ["PAGE", "PinnedMemoryError", "SlabFullError", "MemlockReport", "check_memlock", "PinnedPool",
           "Slab", "Region", "PoolStats", "hostalloc_pinned_bytes"]

def _typed_view(base: torch.Tensor, limit: int, dtype: torch.dtype, numel: int | None, offset: int,
                what: str) -> torch.Tensor:
    item = dtype.itemsize
    if offset < 0 or offset % item:
        raise ValueError(f"{what}: byte offset {offset} is not a non-negative multiple of {dtype}'s {item} bytes")
    if numel is None:
        numel = (limit - offset) // item
    end = offset + numel * item
    if numel < 0 or end > limit:
        raise ValueError(f"{what}: {numel} x {dtype} at byte offset {offset} ends at byte {end}, "
                         f"beyond its {limit} bytes")
    return base[offset:end].view(dtype)


# -- slabs and regions ----------------------------------------------------------------------------
class Region:
    """One sub-allocation of a slab: ``nbytes`` requested at byte ``offset``, ``reserved_bytes``
    (4 KiB-rounded) held.  Free it with ``free(event)``."""

    __slots__ = ("slab", "offset", "nbytes", "reserved_bytes", "live")

    def __init__(self, slab: Slab, offset: int, nbytes: int, reserved: int):
        self.slab, self.offset, self.nbytes, self.reserved_bytes, self.live = slab, offset, nbytes, reserved, True

    @property
    def data_ptr(self) -> int:
        return self.slab.data_ptr + self.offset

    @property
    def tensor(self) -> torch.Tensor:
        return self.view(torch.uint8)

    def view(self, dtype: torch.dtype, numel: int | None = None, offset: int = 0) -> torch.Tensor:
        """``numel`` elements of ``dtype`` at byte ``offset`` inside the region (default: all that fit)."""
        base = self.slab._base()[self.offset:self.offset + self.nbytes]
        what = f"region @{self.offset} of slab {self.slab.name!r}"
        return _typed_view(base, self.nbytes, dtype, numel, offset, what)

    def free(self, event: Event | None = None) -> None:
        self.slab.free(self, event)


class Slab:
    """One exact-size host buffer (created by :meth:`PinnedPool.slab`).

    Use it whole through ``view`` at offsets you manage, or sub-allocate with
    ``alloc``/``free``; mixing the two on one slab is the caller's lookout."""

    def __init__(self, st: _PoolState, backing: _Backing, nbytes: int, name: str):
        self._st, self._b, self.name, self.nbytes = st, backing, name, nbytes
        self.reserved_bytes = backing.nbytes
        self.pinned_bytes = backing.pinned_bytes
        self.data_ptr = backing.ptr
        self._free: list[list[int]] = [[0, backing.nbytes]]  # [offset, bytes], address order, never adjacent
        self._pending: list[tuple[Event, int, int]] = []  # freed under an event not yet complete
        self._live: dict[int, Region] = {}
        self.released = False

    @property
    def pinned(self) -> bool:
        return self.pinned_bytes > 0

    def _base(self) -> torch.Tensor:
        if self.released or self._b.tensor is None:
            raise RuntimeError(f"slab {self.name!r} was released")
        return self._b.tensor

    @property
    def tensor(self) -> torch.Tensor:
        return self._base()[:self.nbytes]

    def view(self, dtype: torch.dtype, numel: int | None = None, offset: int = 0) -> torch.Tensor:
        return _typed_view(self._base(), self.nbytes, dtype, numel, offset, f"slab {self.name!r}")

    def alloc(self, nbytes: int, *, align: int = PAGE) -> Region:
        """First fit in address order; start aligned to ``align`` (a power of two, at least 4 KiB)."""
        nbytes = int(nbytes)
        if nbytes <= 0 or align <= 0 or align & (align - 1):
            raise ValueError(f"alloc(nbytes={nbytes}, align={align}): need nbytes > 0 and align a power of two")
        size, align = _round_up(nbytes, PAGE), max(align, PAGE)
        with self._st.lock:
            self._base()
            self._reap()
            for i, (start, length) in enumerate(self._free):
                a = _round_up(self.data_ptr + start, align) - self.data_ptr  # align the address, not the offset
                if a + size <= start + length:
                    pieces = ([[start, a - start]] if a > start else []) + \
                        ([[a + size, start + length - a - size]] if a + size < start + length else [])
                    self._free[i:i + 1] = pieces
                    self._live[a] = r = Region(self, a, nbytes, size)
                    return r
            pend = sum(p[2] for p in self._pending)
            raise SlabFullError(
                f"slab {self.name!r} ({_fmt(self.reserved_bytes)}) has no free extent of {size:,} bytes: "
                f"{self.free_bytes:,} bytes free in {len(self._free)} extents (largest "
                f"{self.largest_free_bytes:,}), {pend:,} bytes waiting on events, {len(self._live)} regions live.",
                fix="free regions sooner (or wait on their events), or size the slab for the peak "
                    "(PinnedPool.carve with every slot).")

    def free(self, region: Region, event: Event | None = None) -> None:
        """Return a region; with ``event`` it is reused only after the event completes."""
        with self._st.lock:
            if region.slab is not self or self._live.get(region.offset) is not region:
                raise RuntimeError(f"region @{region.offset} is not live in slab {self.name!r} (double free?)")
            del self._live[region.offset]
            region.live = False
            if event is not None and not event.query():
                self._pending.append((event, region.offset, region.reserved_bytes))
            else:
                self._insert_free(region.offset, region.reserved_bytes)

    def _reap(self) -> None:
        keep = []
        for ev, off, size in self._pending:
            if ev.query():
                self._insert_free(off, size)
            else:
                keep.append((ev, off, size))
        self._pending = keep

    def _insert_free(self, off: int, size: int) -> None:
        fl = self._free
        i = bisect.bisect_left(fl, [off, 0])
        if (i < len(fl) and off + size > fl[i][0]) or (i > 0 and sum(fl[i - 1]) > off):
            raise AssertionError(f"slab {self.name!r}: freed extent [{off}, {off + size}) overlaps the free list")
        if i < len(fl) and off + size == fl[i][0]:  # coalesce with the next extent
            size += fl.pop(i)[1]
        if i > 0 and sum(fl[i - 1]) == off:  # ... and with the previous one
            fl[i - 1][1] += size
        else:
            fl.insert(i, [off, size])

    @property
    def free_bytes(self) -> int:
        return sum(e[1] for e in self._free)

    @property
    def largest_free_bytes(self) -> int:
        return max((e[1] for e in self._free), default=0)

    @property
    def allocated_bytes(self) -> int:
        return sum(r.reserved_bytes for r in self._live.values())

    def release(self) -> None:
        """Give this slab's memory back now (sync point, see module doc).  All regions must be free."""
        with self._st.lock:
            if self.released:
                return
            if self._live:
                raise RuntimeError(f"slab {self.name!r} still has {len(self._live)} live regions "
                                   f"({self.allocated_bytes:,} bytes); free them before release()")
            if self._st.slabs.pop(id(self), None) is None:  # the pool is closing it
                return
        _retire(self._st, [self])


# -- the pool -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PoolStats:
    """Byte counts of the slabs alive now.  ``reserved_bytes``: host memory held (pinned or not);
    ``pinned_bytes``: of that, page-locked; ``overhead_ratio`` = reserved / requested."""

    method: str
    pinned: bool
    budget_bytes: int
    slabs: int
    requested_bytes: int
    reserved_bytes: int
    pinned_bytes: int
    peak_reserved_bytes: int
    allocated_bytes: int  # held by live sub-allocations

    @property
    def overhead_ratio(self) -> float:
        return self.reserved_bytes / self.requested_bytes if self.requested_bytes else 1.0


class _PoolState:
    """Everything the finalizer needs, kept apart from the pool so ``weakref.finalize`` can run."""

    def __init__(self, budget: int, method: str, pinning: bool, device: torch.device):
        self.lock = threading.RLock()
        self.budget, self.method, self.pinning, self.device = budget, method, pinning, device
        self.slabs: dict[int, Slab] = {}
        self.held = 0  # bytes charged to the budget, including allocations in flight
        self.peak = 0
        self.closed = False


def _retire(st: _PoolState, slabs: Sequence[Slab]) -> int:
    """Unpin and unmap ``slabs`` (already removed from ``st.slabs``); returns bytes still mapped
    because views outlive them."""
    for s in slabs:
        s.released = True
        for ev, _, _ in s._pending:
            ev.synchronize()
        s._pending = []
    if any(s.pinned for s in slabs) and torch.cuda.is_available():
        torch.cuda.synchronize(st.device)  # no DMA may still touch pages we are about to unpin
    kept = 0
    for s in slabs:
        if not s._b.release():
            kept += s.reserved_bytes
        with st.lock:
            st.held -= max(s.pinned_bytes, s.reserved_bytes)
    if st.method == "hostalloc" and any(s.pinned for s in slabs):
        _empty_host_cache()  # torch's host cache would otherwise keep the pages pinned forever
    return kept


def _close_state(st: _PoolState) -> None:
    with st.lock:
        if st.closed:
            return
        st.closed = True
        slabs = list(st.slabs.values())
        st.slabs.clear()
    kept = _retire(st, slabs)
    if kept:
        warnings.warn(f"PinnedPool closed with tensor views alive: {kept:,} bytes stay mapped (unpinned) "
                      "until the last view is dropped.", ResourceWarning)


class PinnedPool:
    """Exact-size host slabs under one budget (bytes; 0 = no explicit budget).

    ``method``: "register" or "hostalloc" (module doc).  ``device``: the CUDA device
    whose context pins (default: current device if CUDA is available, else a
    pageable pool); ``"cpu"`` forces a pageable pool.  ``hugepages``: ask for
    transparent huge pages on "register" slabs (about 2x faster pinning, see
    ``_map_and_touch``); turn off where THP compaction stalls are a concern."""

    def __init__(self, budget_bytes: int, *, method: str = "register",
                 device: torch.device | str | int | None = None, hugepages: bool = True):
        check_choice("PinnedPool.method", method, ["register", "hostalloc"])
        budget_bytes = int(budget_bytes)
        if budget_bytes < 0:
            raise PinnedMemoryError("must be >= 0.", setting=_BUDGET, value=budget_bytes,
                                    fix="use 0 for no explicit budget.")
        if device is None:
            pinning = torch.cuda.is_available()
            dev = torch.device("cuda", torch.cuda.current_device()) if pinning else torch.device("cpu")
        else:
            dev = torch.device(device) if not isinstance(device, int) else torch.device("cuda", device)
            pinning = dev.type == "cuda"
            if dev.type not in ("cpu", "cuda") or (pinning and not torch.cuda.is_available()):
                raise PinnedMemoryError("cannot pin for this device.", setting="PinnedPool.device",
                                        value=str(dev), fix="pass a CUDA device on a machine with CUDA, "
                                                            "or 'cpu' for a pageable pool.")
            if pinning and dev.index is None:
                dev = torch.device("cuda", torch.cuda.current_device())
        self.memlock = check_memlock(budget_bytes, pinning=pinning)  # before anything is allocated
        self.method, self.pinned, self.device, self.budget_bytes = method, pinning, dev, budget_bytes
        self.hugepages = hugepages
        self._st = _PoolState(budget_bytes, method, pinning, dev)
        self._finalizer = weakref.finalize(self, _close_state, self._st)

    def slab(self, nbytes: int, *, name: str = "") -> Slab:
        """Reserve one slab of ``nbytes`` (rounded up to 4 KiB).  Allocation and pinning run outside
        the lock (they take ~0.1 s per GiB) after the budget has been charged under it."""
        nbytes, st = int(nbytes), self._st
        if nbytes <= 0:
            raise ValueError(f"slab size must be > 0 bytes, got {nbytes}")
        name = name or f"slab{nbytes}"
        reserved = _round_up(nbytes, PAGE)
        charge = reserved
        if self.method == "hostalloc":
            charge = hostalloc_pinned_bytes(reserved)
            if charge > nbytes * (1 + MAX_ROUNDING_WASTE):
                raise PinnedMemoryError(
                    f"slab {name!r} of {_fmt(nbytes)} would pin {_fmt(charge)} through torch's power-of-two "
                    f"host allocator ({charge / nbytes - 1:.0%} waste, limit {MAX_ROUNDING_WASTE:.0%}).",
                    setting="PinnedPool.method", value=self.method,
                    fix="use method='register' (exact-size slabs), or request a power-of-two size.")
        with st.lock:
            if st.closed:
                raise RuntimeError("PinnedPool is closed")
            if st.budget and st.held + charge > st.budget:
                raise PinnedMemoryError(
                    f"pinned host memory budget exceeded: slab {name!r} requests {_fmt(nbytes)} "
                    f"(holds {_fmt(charge)} after rounding); already pinned {_fmt(st.held)} in "
                    f"{len(st.slabs)} slabs; budget {_fmt(st.budget)}.", setting=_BUDGET, value=st.budget,
                    fix=f"raise {_BUDGET} to at least {st.held + charge}, or move optimizer state or "
                        "parameters to NVMe (offload.optimizer/offload.param kind: nvme) so less stays pinned.")
            st.held += charge
        try:
            backing = _allocate(reserved, self.method, self.pinned, self.device, st.budget, self.hugepages)
        except BaseException:
            with st.lock:
                st.held -= charge
            raise
        slab = Slab(st, backing, nbytes, name)
        with st.lock:
            st.held += max(backing.pinned_bytes, backing.nbytes) - charge
            st.peak = max(st.peak, st.held)
            if not st.closed:
                st.slabs[id(slab)] = slab
                return slab
        _retire(st, [slab])
        raise RuntimeError("PinnedPool was closed while a slab was being allocated")

    def carve(self, sizes: Iterable[int], *, name: str = "") -> list[Region]:
        """One slab holding every size (each rounded to 4 KiB), returned as regions in order."""
        sizes = [int(s) for s in sizes]
        if not sizes or min(sizes) <= 0:
            raise ValueError(f"carve needs positive sizes, got {sizes}")
        slab = self.slab(sum(_round_up(s, PAGE) for s in sizes), name=name)
        return [slab.alloc(s) for s in sizes]

    def stats(self) -> PoolStats:
        with self._st.lock:
            slabs = list(self._st.slabs.values())
            return PoolStats(self.method, self.pinned, self.budget_bytes, len(slabs),
                             sum(s.nbytes for s in slabs), sum(s.reserved_bytes for s in slabs),
                             sum(s.pinned_bytes for s in slabs), self._st.peak,
                             sum(s.allocated_bytes for s in slabs))

    @property
    def closed(self) -> bool:
        return self._st.closed

    def close(self) -> None:
        """Unpin and unmap every slab (sync point).  Idempotent; also runs when the pool is collected."""
        self._finalizer()

    def __enter__(self) -> PinnedPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
