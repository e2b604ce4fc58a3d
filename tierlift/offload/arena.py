"""GPU chunk arena: a private, pre-reserved pool for the engine's chunk buffers.

Gathered chunks, the device shards a gather reads and the gradient buffers of
the reduce-scatter come and go every unit.  Through torch's shared caching
allocator that churn interleaves with activations of every size: segments get
split, and reserved - allocated (fragmentation) grows over a run until an
allocation fails with memory free but in pieces.  The arena gives these buffers
their own pool, sized by a pure plan (``plan_arena``) and reserved when the
engine is built, so the churn reuses the same fixed-size blocks every step and
never meets an activation.

Why a ``torch.cuda.MemPool`` and not fixed tensor slots handed out as views:
autograd keeps views of weights (``w.t()`` saved for backward).  A gathered chunk
must therefore keep *one storage object* for the whole run, freed and refilled in
place (``untyped_storage().resize_``), or a saved view would read whatever the
next unit put in a reused slot.  torch has no public way to point an existing
storage at memory we own; it does have MemPool, which routes the storage's own
allocation into a private pool.  With ``no_split`` (where torch offers it) every
block is a fixed slot: never split, never merged.  Blocks are also per stream in
torch's allocator, so each slot class is reserved on the stream that will ask
for it (the compute stream, or the engine's H2D stream for gather shards).

Sync points: none added.  Freed blocks follow the allocator's usual stream rules
(the engine records streams / waits works exactly as without the arena).
``scope()`` routes only the calling thread's allocations, so the engine enters
it around each allocation, in whichever thread (forward: main; backward:
autograd's device thread) makes it.  On CPU there is no caching allocator and no
arena: ``ChunkArena`` is only built for CUDA devices.
"""

from __future__ import annotations

import contextlib
import enum
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from tierlift.errors import TierliftError

__all__ = ["SlotKind", "SlotClass", "ArenaPlan", "ChunkShape", "plan_arena", "ArenaStats", "ChunkArena"]


class SlotKind(enum.Enum):
    GATHERED = "gathered"          # a unit's gathered parameters, compute dtype (stage 3)
    GATHER_SHARD = "gather_shard"  # this rank's compute-dtype shard copied in from the host (world > 1)
    GRAD_FLAT = "grad_flat"        # a chunk's flattened full gradient, reduce dtype
    GRAD_SHARD = "grad_shard"      # the reduce-scatter's output shard, reduce dtype (world > 1)


@dataclass(frozen=True)
class SlotClass:
    kind: SlotKind
    nbytes: int   # bytes of one block as requested (the allocator rounds up to 512 B)
    count: int    # blocks reserved
    stream: str   # "compute" (the stream the engine's hooks run on) or "h2d" (the engine's copy stream)


@dataclass(frozen=True)
class ArenaPlan:
    classes: tuple[SlotClass, ...]

    @property
    def total_bytes(self) -> int:
        return sum(c.nbytes * c.count for c in self.classes)

    def describe(self) -> str:
        return ", ".join(f"{c.count} x {c.nbytes / 2**20:.1f} MiB {c.kind.value}" for c in self.classes) or "empty"


@dataclass(frozen=True)
class ChunkShape:
    """What the plan needs of one chunk."""

    group: int          # index of the group (top-level unit) that gathers it, in forward order
    padded_numel: int   # elements of the gathered chunk
    shard_numel: int    # elements of one rank's shard
    persistent: bool    # stays gathered for the whole run (the root, small chunks): never churns


def _max_in_windows(sizes_by_group: list[list[int]], window: int) -> dict[int, int]:
    """{size: most blocks of that size alive at once} over every ``window`` consecutive groups."""
    best: dict[int, int] = {}
    n = len(sizes_by_group)
    for start in range(max(1, n - window + 1)):
        counts: dict[int, int] = {}
        for sizes in sizes_by_group[start:start + window]:
            for s in sizes:
                counts[s] = counts.get(s, 0) + 1
        for s, k in counts.items():
            best[s] = max(best.get(s, 0), k)
    return best


def plan_arena(chunks: Sequence[ChunkShape], *, world_size: int, stage: int, prefetch_units: int,
               compute_itemsize: int, reduce_itemsize: int, gather_shards_from_host: bool,
               grad_window: int = 3) -> ArenaPlan:
    """Slot classes the engine's steady state needs (pure).

    Gathered chunks (stage 3): the unit running, ``prefetch_units`` gathered ahead, and one more,
    because backward may gather the next unit before the current one's post-backward reshards it;
    so the most of each size over any ``prefetch_units + 2`` consecutive groups.  Gather shards
    (parameters on the host, world > 1) live as long as their gather: the same windows.  Gradient
    buffers: ``grad_window`` chunks (the engine keeps two reduce-scatters in flight while it
    flattens the next).  Gradients the host optimizer has not yet taken (its backlog) are not
    reserved: they grow the pool on the first step, in the same fixed sizes.
    """
    if world_size < 1 or prefetch_units < 0 or grad_window < 1:
        raise ValueError(f"plan_arena: world_size={world_size}, prefetch_units={prefetch_units}, "
                         f"grad_window={grad_window}")
    classes: list[SlotClass] = []
    if stage == 3:
        n_groups = max((c.group for c in chunks), default=-1) + 1
        gathered: list[list[int]] = [[] for _ in range(n_groups)]
        shards: list[list[int]] = [[] for _ in range(n_groups)]
        for c in chunks:
            if not c.persistent:
                gathered[c.group].append(c.padded_numel * compute_itemsize)
                if gather_shards_from_host and world_size > 1:
                    shards[c.group].append(c.shard_numel * compute_itemsize)
        window = prefetch_units + 2
        for kind, per_group, stream in ((SlotKind.GATHERED, gathered, "compute"),
                                        (SlotKind.GATHER_SHARD, shards, "h2d")):
            for nbytes, count in sorted(_max_in_windows(per_group, window).items()):
                classes.append(SlotClass(kind, nbytes, count, stream))
    if stage >= 1 and chunks:
        # Backward reduces chunks in reverse order; any grad_window consecutive ones may be alive.
        rev = [[c.padded_numel * reduce_itemsize] for c in reversed(chunks)]
        for nbytes, count in sorted(_max_in_windows(rev, grad_window).items()):
            classes.append(SlotClass(SlotKind.GRAD_FLAT, nbytes, count, "compute"))
        if world_size > 1:
            rev = [[c.shard_numel * reduce_itemsize] for c in reversed(chunks)]
            for nbytes, count in sorted(_max_in_windows(rev, grad_window).items()):
                classes.append(SlotClass(SlotKind.GRAD_SHARD, nbytes, count, "compute"))
    return ArenaPlan(tuple(classes))


@dataclass(frozen=True)
class ArenaStats:
    planned_bytes: int          # what the plan asked for
    reserved_at_setup: int      # what the pool held once reserved (allocator rounding included;
                                # and blocks an earlier engine of this process left in it)
    reserved_bytes: int         # what the pool holds now
    active_bytes: int           # of which in use now
    segments: int
    device_fragmentation: int   # device-wide reserved - allocated, bytes (not just the arena)

    @property
    def growth_bytes(self) -> int:
        """Bytes the pool took beyond its reservation (the host optimizer's gradient backlog, or a
        schedule the plan did not foresee).  Flat after the first step is the arena's promise."""
        return self.reserved_bytes - self.reserved_at_setup


_POOLS: dict[int, "torch.cuda.MemPool"] = {}  # device index -> this process's arena pool


def _pool_for(device: torch.device) -> "torch.cuda.MemPool":
    """This process's arena pool on ``device``, created once and never destroyed.

    Why never: the model's parameters are views of chunk storages allocated in the pool, and
    they outlive the engine (a user keeps the model; a test builds several engines).  torch
    aborts the process if a MemPool is destroyed while blocks in it are still allocated.  A
    later engine on the same device reuses the pool and its free blocks.

    The pool's blocks are never split, and an allocation outside it that runs out of memory
    may use its free blocks as a last resort, where torch offers those options."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _POOLS:
        with torch.cuda.device(index):  # a MemPool belongs to the device current at its creation
            for kwargs in ({"use_on_oom": True, "no_split": True}, {"use_on_oom": True}, {}):
                try:
                    _POOLS[index] = torch.cuda.MemPool(**kwargs)
                    break
                except TypeError:
                    continue
    return _POOLS[index]


class ChunkArena:
    """The pool, reserved per ``plan`` on ``device``.  ``h2d_stream``: the engine's copy stream,
    where gather-shard blocks are reserved (they are allocated there)."""

    def __init__(self, plan: ArenaPlan, device: torch.device, h2d_stream: torch.cuda.Stream | None = None,
                 rank: int = 0) -> None:
        if device.type != "cuda":
            raise ValueError(f"ChunkArena is for CUDA devices (got {device}); CPU has no caching allocator")
        self.plan, self.device, self.rank = plan, device, rank
        self.pool = _pool_for(device)
        self._reserve(h2d_stream)
        self.reserved_at_setup = self._pool_bytes()[0]

    def _reserve(self, h2d_stream: torch.cuda.Stream | None) -> None:
        """Allocate every planned block inside the pool, then free them: the pool keeps them as
        cached blocks, tagged with the stream that will ask for them."""
        held = []
        try:
            for cls in self.plan.classes:
                stream = h2d_stream if cls.stream == "h2d" and h2d_stream is not None else \
                    torch.cuda.current_stream(self.device)
                with torch.cuda.stream(stream), self.scope():
                    held += [torch.empty(cls.nbytes, dtype=torch.uint8, device=self.device)
                             for _ in range(cls.count)]
        except torch.OutOfMemoryError as exc:
            free, total = torch.cuda.mem_get_info(self.device)
            raise TierliftError(
                f"the GPU chunk arena needs {self.plan.total_bytes / 2**30:.2f} GiB "
                f"({self.plan.describe()}) and the GPU ran out at {len(held)} blocks "
                f"({free / 2**30:.2f} of {total / 2**30:.2f} GiB free).", setting="zero.arena", value="pool",
                rank=self.rank, fix="lower zero.prefetch_units (fewer gathered units alive), offload parameters "
                    "(offload.param), or set zero.arena: shared to allocate on demand.") from exc
        finally:
            del held
        torch.cuda.current_stream(self.device).synchronize()  # frees above are stream-ordered

    @contextlib.contextmanager
    def scope(self) -> Iterator[None]:
        """Route this thread's CUDA allocations into the arena while inside."""
        with torch.cuda.use_mem_pool(self.pool, self.device):
            yield

    def _pool_bytes(self) -> tuple[int, int, int]:
        """(reserved, active, segments) of the pool, from the allocator's snapshot."""
        try:
            segs = self.pool.snapshot(include_traces=False)
        except TypeError:  # torch without the include_traces argument
            segs = self.pool.snapshot()
        return (sum(s["total_size"] for s in segs), sum(s.get("active_size", s.get("allocated_size", 0))
                                                          for s in segs), len(segs))

    def stats(self) -> ArenaStats:
        reserved, active, segments = self._pool_bytes()
        frag = torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
        return ArenaStats(self.plan.total_bytes, self.reserved_at_setup, reserved, active, segments, frag)
