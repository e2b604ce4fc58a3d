"""Pinned slots that gathers read NVMe-resident parameters into (``offload.param: nvme``).

A slot is a ``Guarded`` buffer: its event guards the last copy out of it (the engine's
H2D).  Slots are free, held by a chunk (read ahead by ``prefetch``, or handed out by
``read`` until ``release``), or free again once released; a free slot is reused only
after its event completed.  Reads run ahead of the gathers (prefetch window + 2) while
the copies out of the others finish, hence ``PARAM_SLOTS``.

Sync points: ``read`` waits for the chunk's disk reads; taking a slot whose last copy
out is still in flight blocks on its event (``Guarded.wait``).  Training thread only.
"""

from __future__ import annotations

from typing import Callable

import torch

from tierlift.offload.memory import Guarded
from tierlift.offload.nvme_state import NVMeStateStore

__all__ = ["PARAM_SLOTS", "ParamSlots"]

PARAM_SLOTS = 6


class ParamSlots:
    """``PARAM_SLOTS`` compute-dtype slots of ``slot_numel`` elements, allocated on first use
    through ``alloc(sizes) -> (byte buffers, release)``."""

    def __init__(self, store: NVMeStateStore, dtype: torch.dtype, alloc: Callable) -> None:
        self.store, self.dtype, self._alloc = store, dtype, alloc
        self.slots: list[Guarded] = []
        self.held: dict[int, Guarded] = {}   # chunk -> its slot
        self.reads: dict[int, list] = {}     # chunk -> disk reads in flight into its slot
        self._release: list[Callable] = []

    def ensure(self, slot_numel: int) -> None:
        if not self.slots:
            for _ in range(PARAM_SLOTS):
                (buf,), release = self._alloc([slot_numel * self.dtype.itemsize])
                self.slots.append(Guarded(buf.view(self.dtype)))
                self._release.append(release)

    def _free_slot(self, block: bool) -> Guarded | None:
        held = {id(s) for s in self.held.values()}
        for slot in self.slots:
            if id(slot) in held:
                continue
            if not block and not slot.ready():
                continue
            slot.wait()  # the previous copy out of this slot has finished
            return slot
        if block:
            raise RuntimeError(f"all {PARAM_SLOTS} parameter slots are held: release_source() each chunk's "
                               "source after its copy is enqueued.")
        return None

    def prefetch(self, index: int) -> None:
        """Start reading chunk ``index``'s parameters into a free slot, without waiting (the
        caller checked the chunk has stepped, so the file orders the read after its write)."""
        if index in self.held:
            return
        slot = self._free_slot(block=False)
        if slot is None:
            return
        self.held[index] = slot
        self.reads[index] = [self.store.file.read((index, "param", lo), slot.tensor[lo:hi])
                             for lo, hi in self.store.pieces[index]]

    def drop_prefetched(self) -> None:
        """Give back slots read ahead for chunks no gather used (a path not taken)."""
        for index in list(self.reads):
            for h in self.reads.pop(index):
                h.wait()
            self.held.pop(index, None)

    def read(self, index: int, numel: int) -> torch.Tensor:
        """Chunk ``index``'s parameters in a slot handed out until ``release``: read ahead by
        ``prefetch``, or read now."""
        if index in self.reads:
            for h in self.reads.pop(index):
                h.wait()
            return self.held[index].tensor[:numel]
        slot = self._free_slot(block=True)
        self.store.read_params(index, slot.tensor)
        self.held[index] = slot
        return slot.tensor[:numel]

    def release(self, index: int, event=None) -> None:
        """The caller enqueued its copy out of chunk ``index``'s slot; ``event`` completes with it."""
        slot = self.held.pop(index, None)
        if slot is not None:
            slot.event = event

    def close(self) -> None:
        self.drop_prefetched()  # no disk read may still land in a slab about to go
        for s in self.slots:
            s.wait()
        for release in self._release:
            release()
        self.slots, self.held, self.reads, self._release = [], {}, {}, []
