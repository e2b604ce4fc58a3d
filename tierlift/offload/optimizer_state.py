"""The tiers of the offloaded optimizer's state: per chunk, its fp32 master and moments
in host memory (one pinned slab per chunk, from the memory owner's pool) or on NVMe
(``nvme_state.NVMeStateStore``, a piece at a time), the compute-dtype copy a gather
reads, moves between tiers (a policy decision), and what checkpoints and consolidated
weights read and write -- host-tier chunks as views of their buffers, NVMe-tier chunks
streamed a piece at a time (``nvme_state.PieceCursor``).

Composed into :class:`tierlift.offload.optimizer.OffloadedOptimizer` with the worker
(``host_worker.py``) and the step (``host_step.py``).  Tier moves and checkpoint access
run at a step boundary with the worker idle (``quiesce``, the optimizer's ``wait_all``,
runs first).

Sync points: ``quiesce`` before moves and checkpoint reads; NVMe whole-chunk reads and
writes block until the file has them.
"""

from __future__ import annotations

import enum
import os
import threading
from dataclasses import dataclass, field
from typing import Callable

import torch

from tierlift.layout import Chunk
from tierlift.offload.execplan import nvme_piece_numel
from tierlift.offload.memory import MemoryOwner
from tierlift.offload.nvme import aligned_empty
from tierlift.offload.nvme_state import NVMeStateStore, PieceCursor
from tierlift.offload.param_slots import ParamSlots
from tierlift.offload.policy import NVMeOffload
from tierlift.offload.scratch import release_at_exit
from tierlift.state import StreamedTensor

__all__ = ["Tier", "ChunkPhase", "HostChunk", "StateTiers"]


class Tier(enum.Enum):
    HOST = "host"
    NVME = "nvme"


class ChunkPhase(enum.Enum):
    IDLE = "idle"          # state at rest in its tier, parameters current
    GRAD = "grad"          # gradient of this step landing / landed
    STEPPING = "stepping"  # queued or running in the worker
    # back to IDLE when the step and the compute-dtype copy are done (or the step is skipped)


# The only moves a chunk's step phase and tier make; anything else is a bug in the
# protocol between the training thread and the worker, and fails at once (``HostChunk.enter``).
_PHASE_MOVES = {ChunkPhase.IDLE: {ChunkPhase.GRAD},
                ChunkPhase.GRAD: {ChunkPhase.STEPPING, ChunkPhase.IDLE},
                ChunkPhase.STEPPING: {ChunkPhase.IDLE}}
_TIER_MOVES = {Tier.HOST: {Tier.NVME}, Tier.NVME: set()}


@dataclass
class HostChunk:
    index: int
    tier: Tier
    shard_numel: int
    grad: torch.Tensor | None = None     # fp32, host; allocated on first need
    param16: torch.Tensor | None = None  # compute dtype, host (NVMe tier only): what goes back to the GPU
    master: torch.Tensor | None = None   # fp32 host (None when on NVMe)
    states: dict[str, torch.Tensor] = field(default_factory=dict)
    done: threading.Event = field(default_factory=threading.Event)  # set: no step queued or running
    phase: ChunkPhase = ChunkPhase.IDLE
    sumsq: float = 0.0
    release_state: Callable | None = None  # gives the master/moments allocation back (host tier)

    def enter(self, phase: ChunkPhase) -> None:
        """Move to ``phase``; an illegal move (``_PHASE_MOVES``) raises.  The training thread
        moves IDLE -> GRAD -> STEPPING, the worker STEPPING -> IDLE; ``done`` orders them."""
        if phase not in _PHASE_MOVES[self.phase]:
            raise RuntimeError(f"host optimizer chunk {self.index}: phase {self.phase.value} -> {phase.value} "
                               "is not a legal move (idle -> grad -> stepping -> idle)")
        self.phase = phase

    def move_tier(self, tier: Tier) -> None:
        """Move the state to ``tier`` (host -> NVMe only), at rest: no step queued or running."""
        if tier not in _TIER_MOVES[self.tier] or self.phase is not ChunkPhase.IDLE or not self.done.is_set():
            raise RuntimeError(f"host optimizer chunk {self.index}: tier {self.tier.value} -> {tier.value} "
                               f"in phase {self.phase.value} is not a legal move (host -> nvme, at rest)")
        self.tier = tier


class StateTiers:
    """Where each chunk's optimizer state lives, and the buffers it lives in (module doc).

    ``masters``: each chunk's initial fp32 master (host); entries are dropped (set None)
    as soon as they are copied in.  ``pin``: host buffers from the owner's pinned pool."""

    def __init__(self, chunks: list[Chunk], rank: int, masters: list, kinds: tuple[str, ...], tiers: list[Tier],
                 compute_dtype: torch.dtype, policy, params_on_nvme: bool, memory: MemoryOwner, pin: bool,
                 quiesce: Callable[[], None], on_exit: Callable[[], None]) -> None:
        self.kinds, self.compute_dtype, self.policy = kinds, compute_dtype, policy
        self.params_on_nvme, self.memory, self.pin = params_on_nvme, memory, pin
        self._quiesce = quiesce
        self.host_bytes = sum(self._host_bytes(c, t) for c, t in zip(chunks, tiers))
        self.chunks: list[HostChunk] = []
        for j, (c, tier) in enumerate(zip(chunks, tiers)):
            # grad: allocated on first need (accumulation or deferred steps); an
            # immediate step reads its gradient straight from a ring slot instead.
            hc = HostChunk(c.index, tier, c.shard_numel)
            if tier is Tier.NVME and not params_on_nvme:
                self.alloc_param16(hc)
                hc.param16.copy_(masters[j])
            hc.done.set()
            if tier is Tier.HOST:
                self._alloc_state(hc)
                hc.master.copy_(masters[j])
                masters[j] = None  # the caller's fp32 copy goes now, not after every chunk is in
            self.chunks.append(hc)
        self.segments = [c.segments(rank) for c in chunks]
        self.nvme: NVMeStateStore | None = None
        self.slots: ParamSlots | None = None
        self._cursor: PieceCursor | None = None
        if isinstance(policy, NVMeOffload):  # extents for every chunk, so any chunk can move later
            self._open_nvme(chunks, masters, rank, on_exit)

    # -- host memory -------------------------------------------------------------
    def _host_bytes(self, c: Chunk, tier: Tier) -> int:
        n = c.shard_numel
        if tier is Tier.HOST:
            return n * 4 * (1 + len(self.kinds))
        return 0 if self.params_on_nvme else n * self.compute_dtype.itemsize

    def alloc(self, sizes: list[int]):
        """Byte buffers of ``sizes`` in one allocation and the callable that gives it back
        (``MemoryOwner.host_buffers``; pinned when the policy pins)."""
        return self.memory.host_buffers(sizes, pinned=self.pin)

    def _alloc_state(self, hc: HostChunk) -> None:
        """Host buffers for a chunk's fp32 master and moments (zeroed), in their own slab
        so that moving the chunk to NVMe gives the memory back."""
        bufs, hc.release_state = self.alloc([hc.shard_numel * 4] * (1 + len(self.kinds)))
        hc.master = bufs[0].view(torch.float32)
        hc.states = {k: b.view(torch.float32).zero_() for k, b in zip(self.kinds, bufs[1:])}

    def alloc_param16(self, hc: HostChunk) -> None:
        (buf,), _ = self.alloc([hc.shard_numel * self.compute_dtype.itemsize])
        hc.param16 = buf.view(self.compute_dtype)

    def grad_buf(self, hc: HostChunk) -> torch.Tensor:
        """The chunk's own fp32 gradient buffer (accumulation, deferred steps)."""
        if hc.grad is None:
            (buf,), _ = self.alloc([hc.shard_numel * 4])
            hc.grad = buf.view(torch.float32).zero_()
        return hc.grad

    def _open_nvme(self, chunks: list[Chunk], masters: list, rank: int, on_exit: Callable[[], None]) -> None:
        policy = self.policy
        piece = nvme_piece_numel(policy.buffer_size, self.params_on_nvme, self.compute_dtype.itemsize)
        fresh_dir = not os.path.isdir(policy.path)
        self.nvme = NVMeStateStore(policy.path, rank, [c.shard_numel for c in chunks], ("master",) + self.kinds,
                                   policy.aio, self.alloc, max(2, policy.buffer_count), piece,
                                   setting="offload.optimizer.path", verify=policy.verify,
                                   param_dtype=self.compute_dtype if self.params_on_nvme else None)
        release_at_exit(self.nvme.file, keep=policy.keep_files, created_dir=fresh_dir,
                        setting="offload.optimizer.path", close=on_exit)
        if self.params_on_nvme:
            self.slots = ParamSlots(self.nvme, self.compute_dtype, self.alloc)
        self._ensure_staging()
        # Initial state of NVMe-tier chunks: master from the model, zero moments, a piece
        # at a time through one staging set.
        for j, (hc, m) in enumerate(zip(self.chunks, masters)):
            if hc.tier is not Tier.NVME:
                continue
            for lo, hi in self.nvme.pieces[hc.index]:
                staged = self.nvme.fresh(hc.index, lo, hi)
                staged.views[0].copy_(m[lo:hi])
                for v in staged.views[1:]:
                    v.zero_()
                if staged.param_view is not None:
                    staged.param_view.copy_(m[lo:hi])
                self.nvme.start_write(staged)
            masters[j] = None
        self.nvme.drain()

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
        self._quiesce()
        moved = []
        for i in indices:
            hc = self.chunks[i]
            self.nvme.write_chunk(i, [hc.master] + [hc.states[k] for k in self.kinds])
            if self.params_on_nvme:  # gathers now read the compute-dtype parameters from NVMe
                self._write_params(i, hc.master)
            elif hc.param16 is None:  # the engine now gathers from a compute-dtype host copy
                self.alloc_param16(hc)
                hc.param16.copy_(hc.master)
            hc.move_tier(Tier.NVME)
            hc.master, hc.states = None, {}
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

    # -- parameters a gather reads ----------------------------------------------------
    def params(self, hc: HostChunk) -> torch.Tensor:
        """A stepped chunk's parameters on the host: the fp32 master (host tier), its
        compute-dtype copy, or a pinned slot read from NVMe (held until ``ParamSlots.release``)."""
        if hc.tier is Tier.HOST:
            return hc.master
        if hc.param16 is not None:
            return hc.param16
        self.slots.ensure(self._nvme_max_numel())
        return self.slots.read(hc.index, hc.shard_numel)

    def prefetch_params(self, index: int) -> None:
        """Start reading a stepped chunk's parameters from NVMe into a free slot (``ParamSlots``)."""
        self.slots.ensure(self._nvme_max_numel())
        self.slots.prefetch(index)

    def reads_params_from_nvme(self, index: int) -> bool:
        hc = self.chunks[index]
        return self.params_on_nvme and hc.tier is Tier.NVME and hc.param16 is None

    def _nvme_max_numel(self) -> int:
        return max((c.shard_numel for c in self.chunks if c.tier is Tier.NVME), default=0)

    # -- state access (checkpoints, consolidated weights) ----------------------------
    def chunk_state(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """fp32 master and optimizer state of one chunk, as host tensors.  Host-tier
        chunks give views of the live buffers; NVMe-tier chunks are read into fresh
        buffers (write them back with ``commit_chunk_state`` after changing them)."""
        self._quiesce()
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
        if self._cursor is None:
            self._quiesce()
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
        cur, self._cursor = self._cursor, None
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

    def close(self) -> None:
        """Close the NVMe store and the parameter slots, give the host slabs back."""
        if self.slots is not None:
            self.slots.close()
        if self.nvme is not None:
            self.nvme.close()
        for hc in self.chunks:
            if hc.release_state is not None:
                hc.release_state()
                hc.release_state = None
