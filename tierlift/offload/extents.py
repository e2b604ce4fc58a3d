"""Extent planning: where each piece of a rank's offloaded state lives in its NVMe file.

Pure: no I/O, no tensors.  One file per rank holds every offloaded item of that
rank (for example ``(chunk index, "exp_avg")`` -> bytes of the rank's shard),
each in one contiguous *extent*.  Extents are laid out back to back in the
order given -- so a caller that lists a chunk's states together gets them
adjacent on disk -- and every extent starts and ends on an ``align`` boundary,
because O_DIRECT needs the file offset, the length and the buffer address of
every request aligned to the device's logical block (512 B or 4 KiB; we always
use 4 KiB, which satisfies both).

``requests(key, block_size)`` splits an extent into the requests the I/O engine
issues: consecutive, aligned, at most ``block_size`` bytes each, the last one
padded to the alignment.  The plan (with per-extent checksums) round-trips
through JSON for the sidecar file the engine writes on flush.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Hashable, Iterable, Iterator, Sequence

__all__ = ["IO_ALIGN", "Extent", "ExtentPlan", "plan_extents", "key_to_json", "key_from_json", "split_pieces"]

IO_ALIGN = 4096  # bytes: the O_DIRECT alignment we guarantee (covers 512 B and 4 KiB sectors)


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


@dataclass(frozen=True)
class Extent:
    """One item's place in the file.  All numbers are bytes."""

    key: Hashable
    offset: int  # from the start of the file; a multiple of the plan's align
    nbytes: int  # payload: what the caller reads and writes
    padded: int  # reserved on disk: nbytes rounded up to the plan's align

    @property
    def end(self) -> int:
        return self.offset + self.padded


@dataclass(frozen=True)
class ExtentPlan:
    """Extents of one rank's file, in file order."""

    extents: tuple[Extent, ...]
    align: int

    def __post_init__(self) -> None:
        index: dict[Hashable, int] = {}
        for i, e in enumerate(self.extents):
            if e.key in index:
                raise ValueError(f"duplicate extent key {e.key!r}")
            index[e.key] = i
        object.__setattr__(self, "_index", index)

    # -- lookups -----------------------------------------------------------
    def __len__(self) -> int:
        return len(self.extents)

    def __iter__(self) -> Iterator[Extent]:
        return iter(self.extents)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._index  # type: ignore[attr-defined]

    def __getitem__(self, key: Hashable) -> Extent:
        try:
            return self.extents[self._index[key]]  # type: ignore[attr-defined]
        except KeyError:
            raise KeyError(f"no extent for key {key!r} in this plan ({len(self)} extents)") from None

    def keys(self) -> list[Hashable]:
        return [e.key for e in self.extents]

    @property
    def file_bytes(self) -> int:
        """Size of the file that holds every extent (bytes)."""
        return self.extents[-1].end if self.extents else 0

    @property
    def payload_bytes(self) -> int:
        return sum(e.nbytes for e in self.extents)

    # -- requests ----------------------------------------------------------
    def requests(self, key: Hashable, block_size: int) -> list[tuple[int, int, int]]:
        """``(file_offset, buf_offset, nbytes)`` requests covering the extent of ``key``.

        Every request starts at an aligned file offset and an aligned buffer
        offset (``buf_offset`` counts from the start of the item), is at most
        ``block_size`` bytes and a multiple of IO_ALIGN; the last one ends at the
        extent's padded end, so it may reach past the payload (``nbytes``) into
        the padding.  An empty item has no requests.
        """
        if block_size < IO_ALIGN or block_size % IO_ALIGN:
            raise ValueError(f"block_size must be a positive multiple of {IO_ALIGN} bytes, got {block_size}")
        e = self[key]
        return [(e.offset + lo, lo, min(block_size, e.padded - lo)) for lo in range(0, e.padded, block_size)]

    # -- JSON (sidecar) ----------------------------------------------------
    def to_json(self, checksums: dict[Hashable, Any] | None = None) -> dict[str, Any]:
        """A JSON-able dict of the plan; ``checksums[key]`` (any JSON value) is
        stored with its extent.  Keys must be str, int or (nested) tuples of them."""
        checksums = checksums or {}
        return {
            "align": self.align,
            "file_bytes": self.file_bytes,
            "extents": [{"key": key_to_json(e.key), "offset": e.offset, "nbytes": e.nbytes,
                         "padded": e.padded, "checksum": checksums.get(e.key)} for e in self.extents],
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> tuple["ExtentPlan", dict[Hashable, Any]]:
        """Inverse of :meth:`to_json`: the plan and the stored checksums (missing ones left out)."""
        extents, sums = [], {}
        for row in d["extents"]:
            key = key_from_json(row["key"])
            extents.append(Extent(key, int(row["offset"]), int(row["nbytes"]), int(row["padded"])))
            if row.get("checksum") is not None:
                sums[key] = row["checksum"]
        plan = cls(tuple(extents), int(d["align"]))
        _check_layout(plan)
        return plan, sums

    def same_layout(self, other: "ExtentPlan") -> bool:
        return self.align == other.align and self.extents == other.extents


def key_to_json(key: Hashable) -> Any:
    """Tuples become lists (JSON has no tuples); str and int stay."""
    if isinstance(key, tuple):
        return [key_to_json(k) for k in key]
    if isinstance(key, (str, int)) and not isinstance(key, bool):
        return key
    raise TypeError(f"extent key {key!r} cannot go to JSON: use str, int or tuples of them")


def describe_extent(e: Extent) -> str:
    """Where an extent is, for error messages: what it holds, its file offset and length.
    Keys of optimizer state are ``(chunk, kind, first element)``."""
    k = e.key
    if isinstance(k, tuple) and len(k) == 3 and isinstance(k[0], int) and isinstance(k[2], int):
        what = f"chunk {k[0]} {k[1]} from element {k[2]}"
    else:
        what = f"key {k!r}"
    return f"extent {what} (file offset {e.offset}, {e.nbytes} bytes)"


def key_from_json(v: Any) -> Hashable:
    return tuple(key_from_json(x) for x in v) if isinstance(v, list) else v


def _check_layout(plan: ExtentPlan) -> None:
    """Aligned, in order, no overlap: the invariants the engine relies on."""
    if plan.align < IO_ALIGN or plan.align % IO_ALIGN:
        raise ValueError(f"align must be a positive multiple of {IO_ALIGN} bytes (O_DIRECT), got {plan.align}")
    pos = 0
    for e in plan.extents:
        if e.offset % plan.align or e.padded % plan.align:
            raise ValueError(f"extent {e.key!r} [{e.offset}, {e.end}) is not {plan.align}-byte aligned")
        if e.offset < pos:
            raise ValueError(f"extent {e.key!r} at {e.offset} overlaps the previous one (ends at {pos})")
        if e.nbytes < 0 or e.padded != _round_up(e.nbytes, plan.align):
            raise ValueError(f"extent {e.key!r}: padded {e.padded} is not nbytes {e.nbytes} rounded up "
                             f"to {plan.align}")
        pos = e.end


def plan_extents(items: Sequence[tuple[Hashable, int]] | Iterable[tuple[Hashable, int]],
                 align: int = IO_ALIGN) -> ExtentPlan:
    """Lay out ``(key, nbytes)`` items back to back, each extent ``align``-aligned.

    ``align`` must be a multiple of 4096 bytes (O_DIRECT); a larger one (e.g. 1 MiB)
    keeps every extent on an erase-block or stripe boundary at the cost of padding.
    Keys must be hashable and distinct; an item of 0 bytes gets an empty extent.
    """
    if not isinstance(align, int) or align < IO_ALIGN or align % IO_ALIGN:
        raise ValueError(f"align must be a positive multiple of {IO_ALIGN} bytes (O_DIRECT), got {align!r}")
    extents, offset = [], 0
    for key, nbytes in items:
        if not isinstance(nbytes, int) or isinstance(nbytes, bool) or nbytes < 0:
            raise ValueError(f"item {key!r}: nbytes must be an int >= 0, got {nbytes!r}")
        padded = _round_up(nbytes, align)
        extents.append(Extent(key, offset, nbytes, padded))
        offset += padded
    plan = ExtentPlan(tuple(extents), align)
    _check_layout(plan)
    return plan


def split_pieces(numel: int, piece_numel: int) -> list[tuple[int, int]]:
    """``[lo, hi)`` element ranges that tile ``0..numel`` in pieces of ``piece_numel``
    (the last may be shorter); one empty-free list, ``[]`` for ``numel == 0``.

    Piece starts are multiples of ``piece_numel``: with 4-byte elements and
    ``piece_numel`` a multiple of 1024 every piece starts 4 KiB-aligned (O_DIRECT)."""
    if piece_numel < 1:
        raise ValueError(f"piece_numel must be >= 1, got {piece_numel}")
    if numel < 0:
        raise ValueError(f"numel must be >= 0, got {numel}")
    return [(lo, min(lo + piece_numel, numel)) for lo in range(0, numel, piece_numel)]
