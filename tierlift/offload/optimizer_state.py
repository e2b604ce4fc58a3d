"""State access of the offloaded optimizer, apart from its step machinery: moving
chunks between tiers (a policy decision) and what checkpoints and consolidated
weights read and write -- host-tier chunks as views of their pinned buffers,
NVMe-tier chunks streamed a piece at a time (``nvme_state.PieceCursor``) -- and the
pinned slots that gathers read NVMe-resident parameters into.

A mixin of :class:`tierlift.offload.optimizer.OffloadedOptimizer`.  Tier moves and
checkpoint access run at a step boundary with the worker idle (they call
``wait_all`` first); the parameter slots serve the training thread's gathers.
"""

from __future__ import annotations

import enum

import torch

from tierlift.offload.nvme import aligned_empty
from tierlift.offload.nvme_state import PieceCursor
from tierlift.state import StreamedTensor

__all__ = ["Tier", "HostStateMixin"]

# Pinned slots for parameters read from NVMe: reads run ahead of the gathers (prefetch
# window + 2) while copies out of the others (H2D, guarded by their events) finish.
_PARAM_SLOTS = 6


class Tier(enum.Enum):
    HOST = "host"
    NVME = "nvme"


class HostStateMixin:
    def move_to_nvme(self, indices: list[int]) -> list[int]:
        """Write the state of host-tier chunks ``indices`` to their extents and free their
        host buffers (a policy decision under host-memory pressure).  At a step boundary
        only; returns the chunks that moved.  A chunk that is not in host memory is an
        error, not a no-op: the decision was taken on a wrong view of the placement."""
        if self.nvme is None:
            raise RuntimeError("move_to_nvme needs offload.optimizer of kind nvme")
        wrong = [(i, self.chunks[i].tier.value) for i in indices if self.chunks[i].tier is not Tier.HOST]
        if wrong:
            raise ValueError(f"move_to_nvme({list(indices)}): chunk {wrong[0][0]}'s optimizer state is in "
                             f"{wrong[0][1]}, not in host memory; only host-tier chunks can move")
        self.wait_all()
        moved = []
        for i in indices:
            hc = self.chunks[i]
            self.nvme.write_chunk(i, [hc.master] + [hc.states[k] for k in self.kinds])
            if self.params_on_nvme:  # gathers now read the compute-dtype parameters from NVMe
                self._write_params(i, hc.master)
            elif hc.param16 is None:  # the engine now gathers from a compute-dtype host copy
                self._alloc_param16(hc)
                hc.param16.copy_(hc.master)
            hc.master, hc.states, hc.tier = None, {}, Tier.NVME
            hc.release_state()
            hc.release_state = None
            moved.append(i)
        self._ensure_staging()
        return moved

    def placement(self) -> tuple[tuple[str, str], ...]:
        """Per chunk, where its optimizer state is and where a gather finds its parameters
        on this side of PCIe: host memory (the master or a compute-dtype copy) or NVMe."""
        return tuple((hc.tier.value, "nvme" if hc.tier is Tier.NVME and self.params_on_nvme and hc.param16 is None
                      else "host") for hc in self.chunks)

    def _ensure_staging(self) -> None:
        self.nvme.ensure_staging(max((hc.shard_numel for hc in self.chunks if hc.tier is Tier.NVME), default=0))

    @property
    def host_state_bytes(self) -> int:
        """Host bytes held by fp32 masters and moments (a move to NVMe frees them and
        adds a compute-dtype copy)."""
        return sum(hc.shard_numel * 4 * (1 + len(self.kinds)) for hc in self.chunks if hc.tier is Tier.HOST)

    # -- state access (checkpoints, consolidated weights) ----------------------------
    def chunk_state(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """fp32 master and optimizer state of one chunk, as host tensors.  Host-tier
        chunks give views of the live buffers; NVMe-tier chunks are read into fresh
        buffers (write them back with ``commit_chunk_state`` after changing them)."""
        self.wait_all()
        hc = self.chunks[index]
        if hc.tier is Tier.HOST:
            return hc.master, hc.states
        views = [aligned_empty(hc.shard_numel * 4).view(torch.float32) for _ in range(1 + len(self.kinds))]
        self.nvme.read_chunk(index, views)
        return views[0], dict(zip(self.kinds, views[1:]))

    def streamed_state(self, index: int, lo: int, hi: int) -> dict[str, object]:
        """Elements [lo, hi) of an NVMe-tier chunk's master ("param") and moments as
        ``StreamedTensor``s reading and writing the extents through one cached piece
        per kind (checkpoints stream NVMe-resident state; see nvme_state.PieceCursor).
        Call ``finish_streamed`` after the last use."""
        assert self.chunks[index].tier is Tier.NVME, f"chunk {index} is not on NVMe"
        if getattr(self, "_cursor", None) is None:
            self.wait_all()
            self.nvme.drain()
            self._cursor = PieceCursor(self.nvme)
        cur = self._cursor
        out = {}
        for kind in ("master",) + self.kinds:
            out["param" if kind == "master" else kind] = StreamedTensor(
                torch.float32, hi - lo, lambda a, b, k=kind: cur.read(index, k, lo + a, lo + b),
                lambda a, src, k=kind: cur.write(index, k, lo + a, src))
        return out

    def finish_streamed(self, changed: list[int]) -> None:
        """Write back what streamed writes changed and rebuild the compute-dtype copies of
        the ``changed`` NVMe-tier chunks from their masters, a piece at a time."""
        cur, self._cursor = getattr(self, "_cursor", None), None
        if cur is None:
            return
        cur.flush()
        for i in changed:
            hc = self.chunks[i]
            if self.params_on_nvme:
                self._write_params(i, None, cur)
                continue
            for lo, hi in self.nvme.pieces[i]:
                hc.param16[lo:hi].copy_(cur.read(i, "master", lo, hi))

    def commit_chunk_state(self, index: int, master: torch.Tensor, states: dict[str, torch.Tensor]) -> None:
        """After ``master``/``states`` of a chunk were overwritten (checkpoint load): store
        NVMe-tier state back to its extents and refresh the compute-dtype copy."""
        hc = self.chunks[index]
        if hc.tier is Tier.NVME:
            self.nvme.write_chunk(index, [master] + [states[k] for k in self.kinds])
            if self.params_on_nvme:
                self._write_params(index, master)
            else:
                hc.param16.copy_(master)

    def _write_params(self, index: int, master: torch.Tensor | None, cursor=None) -> None:
        """Write chunk ``index``'s compute-dtype parameters to NVMe from ``master`` (host
        fp32), or from the master on NVMe through ``cursor``, a piece at a time."""
        buf = aligned_empty(self.nvme.piece_numel * self.compute_dtype.itemsize).view(self.compute_dtype)
        for lo, hi in self.nvme.pieces[index]:
            src = master[lo:hi] if master is not None else cursor.read(index, "master", lo, hi)
            buf[:hi - lo].copy_(src)
            self.nvme.write_params(index, lo, buf[:hi - lo])

    # -- parameters read from NVMe (offload.param: nvme) ---------------------------------
    # A slot is [tensor, event]: the event guards the last copy out of it (H2D).  Slots
    # are free, held by a chunk (read ahead, or handed out by wait_chunk until
    # release_source), or free again once released.  Training thread only.
    def _slots(self) -> dict:
        if not self._pslots:
            n = max((c.shard_numel for c in self.chunks if c.tier is Tier.NVME), default=0)
            self._pslots = [[self._alloc([n * self.compute_dtype.itemsize])[0][0].view(self.compute_dtype), None]
                            for _ in range(_PARAM_SLOTS)]
            self._pslot_of: dict[int, list] = {}   # chunk -> its slot
            self._pread_of: dict[int, list] = {}   # chunk -> reads in flight into its slot
        return self._pslot_of

    def _free_slot(self, block: bool):
        held = {id(s) for s in self._slots().values()}
        for slot in self._pslots:
            if id(slot) in held:
                continue
            if slot[1] is not None:
                if not block and not slot[1].query():
                    continue
                slot[1].synchronize()  # the previous copy out of this slot has finished
                slot[1] = None
            return slot
        if block:
            raise RuntimeError(f"all {_PARAM_SLOTS} parameter slots are held: release_source() each chunk's "
                               "source after its copy is enqueued.")
        return None

    def prefetch_source(self, index: int) -> None:
        """Start reading chunk ``index``'s parameters from NVMe into a free slot, without
        waiting, when it has stepped (so the file orders the read after the step's write)
        and a slot is free; ``wait_chunk`` then only waits for the read."""
        hc = self.chunks[index]
        if not (self.params_on_nvme and hc.tier is Tier.NVME and hc.param16 is None) or not hc.done.is_set():
            return
        if index in self._slots():
            return
        slot = self._free_slot(block=False)
        if slot is None:
            return
        self._pslot_of[index] = slot
        self._pread_of[index] = [self.nvme.file.read((index, "param", lo), slot[0][lo:hi])
                                 for lo, hi in self.nvme.pieces[index]]

    def drop_prefetched(self) -> None:
        """Give back slots read ahead for chunks no gather used (a path not taken):
        their contents go stale at the chunk's next step."""
        for index in list(getattr(self, "_pread_of", {})):
            for h in self._pread_of.pop(index):
                h.wait()
            self._pslot_of.pop(index, None)

    def _read_params(self, hc) -> torch.Tensor:
        """Parameters on NVMe: the chunk's, in a pinned slot handed out until
        ``release_source`` -- read ahead by ``prefetch_source`` or read now."""
        self._slots()
        if hc.index in self._pread_of:
            for h in self._pread_of.pop(hc.index):
                h.wait()
            return self._pslot_of[hc.index][0][:hc.shard_numel]
        slot = self._free_slot(block=True)
        self.nvme.read_params(hc.index, slot[0])
        self._pslot_of[hc.index] = slot
        return slot[0][:hc.shard_numel]

    def release_source(self, index: int, event=None) -> None:
        """The caller has enqueued its copy out of ``wait_chunk(index)``'s tensor; ``event``
        (CUDA) completes when that copy has.  Only parameters read from NVMe hold a slot."""
        slot = getattr(self, "_pslot_of", {}).pop(index, None)
        if slot is not None:
            slot[1] = event
