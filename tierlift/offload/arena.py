"""GPU chunk arena: fixed slots allocated once, reused for the whole run.

Gathered chunks, shards and gradient buffers come and go every block; through the
caching allocator that churn fragments GPU memory (reserved grows while allocated
does not).  The arena takes one ``torch.empty`` per slot class up front and hands
out views, so the allocator never sees the churn: ``fragmentation()`` (reserved -
allocated, bytes) stays flat over a run, which is the proof.

Every slot start is 4 KiB aligned (sizes rounded up to 4 KiB, bases aligned) so a
slot can also be a GDS/O_DIRECT target.

Residency of a slot is an explicit state machine with asserted transitions::

    FREE --acquire--> IN_USE --release(event=None)--> FREE
                      IN_USE --release(event)-------> PENDING_EVENT --event done--> FREE
                                                      PENDING_EVENT --acquire-----> IN_USE

Event policy (chosen): ``acquire`` never blocks the host.  It prefers a FREE slot,
then a PENDING one whose event has completed, and otherwise takes the PENDING slot
released first and makes the caller's stream wait on its event
(``stream.wait_event``, a GPU-side dependency).  The slot must then be used on that
stream, or on streams ordered after it.  ``acquire`` raises only when every slot of
the class is IN_USE: the caller must release one (reshard, finish a copy) first.
On CPU there are no streams: a pending event is waited on the host
(``event.synchronize()``), and slots are CPU tensors.
"""

from __future__ import annotations

import enum
import threading
import warnings
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from tierlift.errors import TierliftError
from tierlift.offload.pinned import Event, _round_up  # one guarding-event protocol for host and GPU buffers

__all__ = ["SlotState", "SlotStateError", "ArenaExhaustedError", "Slot", "ArenaStats", "ChunkArena"]

ALIGN = 4096  # bytes: slot starts and sizes


class SlotState(enum.Enum):
    FREE = "free"
    IN_USE = "in_use"
    PENDING_EVENT = "pending_event"  # released, but GPU work recorded in its event may still touch it


_TRANSITIONS = {
    (SlotState.FREE, SlotState.IN_USE),
    (SlotState.IN_USE, SlotState.FREE),
    (SlotState.IN_USE, SlotState.PENDING_EVENT),
    (SlotState.PENDING_EVENT, SlotState.FREE),
    (SlotState.PENDING_EVENT, SlotState.IN_USE),
}


class SlotStateError(RuntimeError):
    """A slot was used against its state machine (double release, stale handle): a bug."""


class ArenaExhaustedError(TierliftError):
    """Every slot of the class that fits the request is in use."""


class _Record:
    """Arena-side state of one slot."""

    __slots__ = ("index", "capacity", "data", "state", "event", "lease", "tag", "nbytes", "seq")

    def __init__(self, index: int, capacity: int, data: torch.Tensor):
        self.index, self.capacity, self.data = index, capacity, data  # data: uint8 view of ``capacity`` bytes
        self.state = SlotState.FREE
        self.event: Event | None = None
        self.lease = 0  # bumped on every acquire; a Slot handle is valid only for its lease
        self.tag = ""
        self.nbytes = 0
        self.seq = 0  # release order, to wait on the oldest pending slot first

    def move(self, to: SlotState) -> None:
        if (self.state, to) not in _TRANSITIONS:
            raise SlotStateError(f"slot {self.index} ({self.tag or 'untagged'}): illegal transition "
                                 f"{self.state.name} -> {to.name}")
        self.state = to


class Slot:
    """A lease on one slot: ``tensor`` is a uint8 view of exactly the requested ``nbytes``."""

    __slots__ = ("index", "lease", "nbytes", "capacity", "tensor", "waited")

    def __init__(self, rec: _Record, waited: bool):
        self.index, self.lease, self.nbytes, self.capacity = rec.index, rec.lease, rec.nbytes, rec.capacity
        self.tensor = rec.data[:rec.nbytes]
        self.waited = waited  # the caller's stream was made to wait on the previous user's event

    @property
    def data_ptr(self) -> int:
        return self.tensor.data_ptr()

    def view(self, dtype: torch.dtype, numel: int | None = None, offset: int = 0) -> torch.Tensor:
        """``numel`` elements of ``dtype`` at byte ``offset`` (default: all that fit in ``nbytes``)."""
        item = dtype.itemsize
        if offset < 0 or offset % item:
            raise ValueError(f"slot {self.index}: byte offset {offset} is not a multiple of {dtype}'s {item} bytes")
        numel = (self.nbytes - offset) // item if numel is None else numel
        end = offset + numel * item
        if numel < 0 or end > self.nbytes:
            raise ValueError(f"slot {self.index}: {numel} x {dtype} at byte {offset} ends at {end}, "
                             f"beyond the {self.nbytes} bytes acquired")
        return self.tensor[offset:end].view(dtype)


@dataclass(frozen=True)
class ArenaStats:
    slots: int
    classes: dict[int, int]  # slot bytes -> slot count
    reserved_bytes: int  # what the arena took from torch's allocator, alignment slack included
    in_use_slots: int
    in_use_bytes: int  # capacity of IN_USE slots
    requested_in_use_bytes: int  # what their holders asked for (difference: internal waste)
    pending_slots: int
    peak_in_use_slots: int
    peak_in_use_bytes: int
    acquires: int
    stream_waits: int  # acquires that made a stream (or, on CPU, the host) wait on an event


def _parse_slots(slot_bytes: Sequence[int] | tuple[int, int] | Mapping[int, int]) -> dict[int, int]:
    """{rounded slot bytes: count} from [bytes, ...], (bytes, n_slots) or {bytes: n_slots}."""
    if isinstance(slot_bytes, Mapping):
        pairs = list(slot_bytes.items())
    elif isinstance(slot_bytes, tuple):
        if len(slot_bytes) != 2:
            raise ValueError(f"a tuple means (slot_bytes, n_slots); got {slot_bytes!r} (pass a list of sizes)")
        pairs = [slot_bytes]
    else:
        pairs = [(b, 1) for b in slot_bytes]
    classes: dict[int, int] = {}
    for b, n in pairs:
        if int(b) <= 0 or int(n) <= 0:
            raise ValueError(f"slot bytes and counts must be > 0, got {b} x {n}")
        size = _round_up(int(b), ALIGN)
        classes[size] = classes.get(size, 0) + int(n)
    if not classes:
        raise ValueError("an arena needs at least one slot")
    return dict(sorted(classes.items()))


class ChunkArena:
    """Fixed-size slots on ``device``: ``slot_bytes`` is a list of slot sizes, a
    ``(slot_bytes, n_slots)`` tuple or a ``{slot_bytes: n_slots}`` mapping (bytes,
    rounded up to 4 KiB).  Thread-safe."""

    def __init__(self, slot_bytes: Sequence[int] | tuple[int, int] | Mapping[int, int],
                 device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self._cuda = self.device.type == "cuda"
        self._lock = threading.Lock()
        self._classes = _parse_slots(slot_bytes)
        self._bases: list[torch.Tensor] = []
        self._by_class: dict[int, list[_Record]] = {}
        self._records: list[_Record] = []
        for size, count in self._classes.items():
            # One allocation per class; +ALIGN slack so the first slot can start on a 4 KiB boundary
            # (the caching allocator guarantees only 512 bytes, the CPU allocator 64).
            base = torch.empty(size * count + ALIGN, dtype=torch.uint8, device=self.device)
            skip = (-base.data_ptr()) % ALIGN
            self._bases.append(base)
            recs = [_Record(len(self._records) + i, size, base[skip + i * size: skip + (i + 1) * size])
                    for i in range(count)]
            self._records += recs
            self._by_class[size] = recs
        self._in_use_slots = self._in_use_bytes = self._requested = self._peak_bytes = self._peak_slots = 0
        self._acquires = self._waits = self._seq = 0
        self._closed = False

    # -- acquire / release --------------------------------------------------------------------
    def acquire(self, nbytes: int, *, stream: torch.cuda.Stream | None = None, tag: str = "",
                spill: bool = False) -> Slot:
        """A slot of the smallest class that holds ``nbytes`` (with ``spill``, larger classes too).

        May enqueue ``stream.wait_event`` (default: the current stream) -- see module doc."""
        nbytes = int(nbytes)
        if nbytes <= 0:
            raise ValueError(f"acquire needs nbytes > 0, got {nbytes}")
        fitting = [s for s in self._classes if s >= nbytes]
        if not fitting:
            raise ArenaExhaustedError(
                f"no slot class holds {nbytes:,} bytes (classes: {self._class_text()}).",
                setting="ChunkArena.slot_bytes", value=list(self._classes),
                fix="size the arena's slots from the chunk layout's largest chunk / shard (bytes).")
        with self._lock:
            if self._closed:
                raise RuntimeError("ChunkArena is closed")
            rec = None
            for size in fitting if spill else fitting[:1]:
                rec = self._pick(self._by_class[size])
                if rec is not None:
                    break
            if rec is None:
                busy = [r for s in (fitting if spill else fitting[:1]) for r in self._by_class[s]]
                raise ArenaExhaustedError(
                    f"all {len(busy)} slots of {fitting[0]:,} bytes{' or more' if spill else ''} are in use "
                    f"(holders: {', '.join(r.tag or f'#{r.index}' for r in busy)}); request of "
                    f"{nbytes:,} bytes{f' for {tag}' if tag else ''}.",
                    setting="ChunkArena.slot_bytes", value=self._class_text(),
                    fix="release a slot first (reshard the gathered chunk / finish its copy), lower the "
                        "prefetch depth, or give the arena more slots of this class.")
            event, waited = rec.event, False
            if rec.state is SlotState.PENDING_EVENT and event is not None and not event.query():
                waited = True
                self._waits += 1
            rec.move(SlotState.IN_USE)
            rec.event, rec.lease, rec.tag, rec.nbytes = None, rec.lease + 1, tag, nbytes
            self._acquires += 1
            self._in_use_slots += 1
            self._in_use_bytes += rec.capacity
            self._requested += nbytes
            self._peak_bytes = max(self._peak_bytes, self._in_use_bytes)
            self._peak_slots = max(self._peak_slots, self._in_use_slots)
            slot = Slot(rec, waited)
        if waited:  # outside the lock: the host wait on CPU may take a while
            if self._cuda:
                (stream or torch.cuda.current_stream(self.device)).wait_event(event)
            else:
                event.synchronize()
        return slot

    def _pick(self, recs: list[_Record]) -> _Record | None:
        """FREE first, then a PENDING slot whose event is done, then the oldest PENDING one."""
        pending = []
        for r in recs:
            if r.state is SlotState.FREE:
                return r
            if r.state is SlotState.PENDING_EVENT:
                if r.event is None or r.event.query():
                    r.move(SlotState.FREE)
                    r.event = None
                    return r
                pending.append(r)
        return min(pending, key=lambda r: r.seq, default=None)

    def release(self, slot: Slot, event: Event | None = None) -> None:
        """Return a slot.  ``event``: recorded (by the caller) on the stream that last used the
        slot, after that use; the slot is not reused before it completes.  Without an event the
        caller guarantees no queued GPU work still touches the slot."""
        with self._lock:
            rec = self._record(slot)
            self._in_use_slots -= 1
            self._in_use_bytes -= rec.capacity
            self._requested -= rec.nbytes
            self._seq += 1
            rec.seq = self._seq
            if event is None:
                rec.move(SlotState.FREE)
            else:
                rec.move(SlotState.PENDING_EVENT)
                rec.event = event
            rec.tag, rec.nbytes = "", 0

    def _record(self, slot: Slot) -> _Record:
        if not 0 <= slot.index < len(self._records):
            raise SlotStateError(f"slot {slot.index} does not belong to this arena")
        rec = self._records[slot.index]
        if rec.data.data_ptr() != slot.tensor.data_ptr() or rec.lease != slot.lease or \
                rec.state is not SlotState.IN_USE:
            raise SlotStateError(f"slot {slot.index}: stale handle (lease {slot.lease}, current lease "
                                 f"{rec.lease}, state {rec.state.name}) -- released twice?")
        return rec

    def state(self, slot: Slot | int) -> SlotState:
        return self._records[slot if isinstance(slot, int) else slot.index].state

    # -- accounting ----------------------------------------------------------------------------
    def stats(self) -> ArenaStats:
        with self._lock:
            states = [r.state for r in self._records]
            return ArenaStats(len(self._records), dict(self._classes), sum(b.numel() for b in self._bases),
                              states.count(SlotState.IN_USE), self._in_use_bytes, self._requested,
                              states.count(SlotState.PENDING_EVENT), self._peak_slots, self._peak_bytes,
                              self._acquires, self._waits)

    def fragmentation(self) -> int:
        """Bytes torch's caching allocator holds but has not handed out (reserved - allocated) on
        this device; 0 on CPU, which has no caching allocator.  Process-wide, not just the arena."""
        if not self._cuda:
            return 0
        return torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)

    def _class_text(self) -> str:
        return ", ".join(f"{n} x {s:,} B" for s, n in self._classes.items())

    def close(self) -> None:
        """Drop the slots (memory returns to torch's allocator once no view is left).  Waits for
        pending events first: the allocator does not know our events and might reuse the memory."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            pending = [r.event for r in self._records if r.state is SlotState.PENDING_EVENT and r.event]
            busy = sum(r.state is SlotState.IN_USE for r in self._records)
            self._records, self._by_class, self._bases = [], {}, []
        for ev in pending:
            ev.synchronize()
        if busy:
            warnings.warn(f"ChunkArena closed with {busy} slots in use; their views keep the memory alive",
                          ResourceWarning)

    def __enter__(self) -> ChunkArena:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
