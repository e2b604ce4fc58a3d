"""Chunk layout: pure functions from wrap units to flat, padded, sharded chunks.

A *chunk* is the contiguous flat buffer holding the parameters of one wrap unit
(a transformer block, an MoE expert, or the "root": everything outside units).
Parameters are packed back to back in registration order; only the chunk's tail is
padded, so a parameter's offset inside its chunk does not depend on the world size
(checkpoints stay resharding-friendly).  The padded length splits evenly across
ranks and every rank's shard is a multiple of ``align_bytes`` at the smallest
dtype used (bf16, 2 bytes), so shards of every dtype start 4 KiB-aligned for
O_DIRECT.  No process group, no tensors: unit-tested on its own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Sequence

__all__ = ["ParamSlot", "Segment", "Chunk", "ChunkLayout", "UnitSpec", "plan_chunks"]

_MIN_ITEMSIZE = 2  # bf16/fp16: the smallest dtype a shard is stored in


@dataclass(frozen=True)
class UnitSpec:
    """A wrap unit as the planner sees it: its module path and its parameters
    (fully-qualified names as in ``model.state_dict()``, and shapes)."""

    name: str
    params: tuple[tuple[str, tuple[int, ...]], ...]


@dataclass(frozen=True)
class ParamSlot:
    name: str
    shape: tuple[int, ...]
    offset: int  # first element inside the chunk
    numel: int

    @property
    def end(self) -> int:
        return self.offset + self.numel

    @property
    def decay(self) -> bool:
        """Weight decay applies to matrices, not to biases and norm weights."""
        return len(self.shape) >= 2


@dataclass(frozen=True)
class Segment:
    """The part of one parameter that lies in one rank's shard.

    ``shard_lo:shard_hi`` index the rank's shard; ``param_lo:param_hi`` index the
    flattened parameter.  Both ranges have the same length."""

    chunk: int
    param: ParamSlot
    shard_lo: int
    shard_hi: int
    param_lo: int
    param_hi: int

    @property
    def numel(self) -> int:
        return self.shard_hi - self.shard_lo


@dataclass(frozen=True)
class Chunk:
    index: int
    unit: str  # module path of the wrap unit; "" for the root chunk
    params: tuple[ParamSlot, ...]
    numel: int  # unpadded
    padded_numel: int
    world_size: int
    persistent: bool  # stays gathered for the whole step (below the persistence threshold)

    @property
    def shard_numel(self) -> int:
        return self.padded_numel // self.world_size

    def shard_range(self, rank: int) -> tuple[int, int]:
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} outside world of size {self.world_size}")
        lo = rank * self.shard_numel
        return lo, lo + self.shard_numel

    def segments(self, rank: int) -> list[Segment]:
        """Parameter pieces inside ``rank``'s shard, in chunk order."""
        lo, hi = self.shard_range(rank)
        out = []
        for p in self.params:
            a, b = max(lo, p.offset), min(hi, p.end)
            if a < b:
                out.append(Segment(self.index, p, a - lo, b - lo, a - p.offset, b - p.offset))
        return out


@dataclass(frozen=True)
class ChunkLayout:
    chunks: tuple[Chunk, ...]
    world_size: int
    align_elems: int

    def __iter__(self) -> Iterator[Chunk]:
        return iter(self.chunks)

    def __len__(self) -> int:
        return len(self.chunks)

    @property
    def total_numel(self) -> int:
        return sum(c.numel for c in self.chunks)

    @property
    def total_padded_numel(self) -> int:
        return sum(c.padded_numel for c in self.chunks)

    def shard_numel(self) -> int:
        """Elements one rank holds over all chunks (padding included)."""
        return sum(c.shard_numel for c in self.chunks)

    def param_index(self) -> dict[str, tuple[int, ParamSlot]]:
        return {p.name: (c.index, p) for c in self.chunks for p in c.params}

    def segments(self, rank: int) -> list[Segment]:
        return [s for c in self.chunks for s in c.segments(rank)]


def _round_up(n: int, m: int) -> int:
    return ((n + m - 1) // m) * m


def plan_chunks(units: Sequence[UnitSpec], world_size: int, align_bytes: int = 4096,
                persistence_threshold: int = 0) -> ChunkLayout:
    """One chunk per unit that owns parameters, in the given order.

    A parameter name listed by several units (tied weights) belongs to the first.
    Units with no (remaining) parameters get no chunk.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if align_bytes < _MIN_ITEMSIZE or align_bytes % _MIN_ITEMSIZE:
        raise ValueError(f"align_bytes must be a positive multiple of {_MIN_ITEMSIZE}, got {align_bytes}")
    align_elems = align_bytes // _MIN_ITEMSIZE
    seen: set[str] = set()
    chunks: list[Chunk] = []
    for unit in units:
        slots, offset = [], 0
        for name, shape in unit.params:
            if name in seen:
                continue
            seen.add(name)
            numel = math.prod(shape)
            slots.append(ParamSlot(name, tuple(shape), offset, numel))
            offset += numel
        if not slots:
            continue
        padded = _round_up(max(offset, 1), world_size * align_elems)
        chunks.append(Chunk(len(chunks), unit.name, tuple(slots), offset, padded, world_size,
                            persistent=offset < persistence_threshold))
    return ChunkLayout(tuple(chunks), world_size, align_elems)
