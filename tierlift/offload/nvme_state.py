"""Optimizer state on NVMe, in fixed-size pieces, with read-ahead and write-behind.

Every chunk's fp32 master and moments have extents in the rank's file, split into
pieces of at most ``piece_numel`` elements (``split_pieces``, pure).  Stepping a
chunk streams it piece by piece through a few pinned *staging sets* (one buffer
per state kind, ``piece_numel`` elements each), so host memory for NVMe-resident
state is ``buffer_count x kinds x piece`` whatever the chunk sizes are, and the
disk sees a steady queue of piece-sized requests:

    read(piece k+1 .. k+buffer_count-1)  |  step(piece k)  |  write(piece k-1)

A set returns to the pool when its write completes; a read of a piece whose write
is still in flight waits for that write first (read-after-write).

Sync points: ``start_read`` and ``start_write`` return at once; ``wait_read``
blocks the caller (the optimizer's worker thread) until a piece's reads are done;
``acquire`` may block on the oldest write.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from tierlift.offload.extents import plan_extents, split_pieces
from tierlift.offload.nvme import NVMeFile, aligned_empty

__all__ = ["NVMeStateStore", "Staged", "DEFAULT_PIECE_NUMEL"]

# 16 Mi fp32 elements = 64 MiB per buffer: large requests for the disk, and a staging
# set (master + 2 moments) of 192 MiB whatever the chunk size.
DEFAULT_PIECE_NUMEL = 16 << 20


@dataclass
class Staged:
    """One piece in flight: its staging set, views of the piece's length, I/O handles."""

    chunk: int
    lo: int
    hi: int
    bufs: list[torch.Tensor]
    views: list[torch.Tensor]           # one per state kind (fp32)
    handles: list = field(default_factory=list)
    param_view: torch.Tensor | None = None  # compute-dtype parameters of the piece (parameters on NVMe)


class NVMeStateStore:
    """Extents, staging sets and the piece pipeline of one rank's NVMe-resident state."""

    def __init__(self, path: str, rank: int, shard_numels: list[int], kinds: tuple[str, ...], aio,
                 alloc: Callable, buffer_count: int, piece_numel: int, setting: str,
                 param_dtype: torch.dtype | None = None, verify: bool = True) -> None:
        """``kinds``: state names per chunk, the master first; ``alloc(sizes)`` returns
        (byte buffers, release callable) -- pinned when the caller pins.  ``param_dtype``:
        also keep every chunk's compute-dtype parameters here (extents ``(i, "param", lo)``),
        written with the state after each step and read by gathers; pieces must then
        start 4 KiB-aligned in that dtype too (``piece_numel`` a multiple of 4096 / itemsize).
        ``verify``: every read is checked against the CRC-32C of its last write (on the I/O
        threads); a mismatch raises ``nvme.ChecksumError`` from the read's ``wait()``."""

        self.kinds = kinds
        self.piece_numel = piece_numel
        self.param_dtype = param_dtype
        self._param_item = torch.empty((), dtype=param_dtype).element_size() if param_dtype else 0
        if param_dtype is not None and (piece_numel * self._param_item) % 4096:
            raise ValueError(f"piece_numel {piece_numel} x {self._param_item} B is not 4 KiB-aligned")
        self.pieces = [split_pieces(n, piece_numel) for n in shard_numels]
        items = [((i, k, lo), (hi - lo) * 4) for i, ps in enumerate(self.pieces) for k in kinds for lo, hi in ps]
        if param_dtype is not None:
            items += [((i, "param", lo), (hi - lo) * self._param_item) for i, ps in enumerate(self.pieces)
                      for lo, hi in ps]
        self.file = NVMeFile(path, rank, plan_extents(items), aio, setting=setting, verify=verify)
        self._alloc = alloc
        self.buffer_count = buffer_count
        self._free: list[list[torch.Tensor]] = []
        self._release: list[Callable] = []
        self._inflight: list[Staged] = []  # writes in flight, oldest first
        self.staging_numel = 0
        self.read_wait_s = 0.0

    # -- staging sets -----------------------------------------------------------------
    @property
    def free_sets(self) -> int:
        return len(self._free)

    def ensure_staging(self, numel: int) -> None:
        """Staging sets for pieces of up to ``numel`` elements; (re)allocated only when that
        grows.  Caller: nothing in flight on the worker."""
        need = min(numel, self.piece_numel)
        if need <= self.staging_numel:
            return
        self.drain()
        for release in self._release:
            release()
        sizes = [need * 4] * len(self.kinds) + ([need * self._param_item] if self.param_dtype else [])
        sets = [self._alloc(sizes) for _ in range(self.buffer_count)]
        self._free = [bufs for bufs, _ in sets]
        self._release = [release for _, release in sets]
        self.staging_numel = need

    def _acquire(self) -> list[torch.Tensor]:
        if self._free:
            return self._free.pop()
        if not self._inflight:
            raise RuntimeError(f"NVMe staging: all {self.buffer_count} sets are held by reads; "
                               "a piece must be stepped and written before more are read.")
        oldest = self._inflight.pop(0)
        for h in oldest.handles:
            h.wait()
        return oldest.bufs

    def _settle_writes_of(self, chunk: int, lo: int) -> None:
        """Read-after-write: a piece still being written must land before it is read."""
        for s in [s for s in self._inflight if s.chunk == chunk and s.lo == lo]:
            for h in s.handles:
                h.wait()
            self._inflight = [x for x in self._inflight if x is not s]
            self._free.append(s.bufs)

    # -- the piece pipeline ------------------------------------------------------------
    def start_read(self, chunk: int, lo: int, hi: int) -> Staged:
        self._settle_writes_of(chunk, lo)
        st = self._staged(chunk, lo, hi, self._acquire())
        st.handles = [self.file.read((chunk, k, lo), v) for k, v in zip(self.kinds, st.views)]
        return st

    def _staged(self, chunk: int, lo: int, hi: int, bufs: list[torch.Tensor]) -> Staged:
        n = len(self.kinds)
        views = [b.view(torch.float32)[:hi - lo] for b in bufs[:n]]
        param = bufs[n].view(self.param_dtype)[:hi - lo] if self.param_dtype is not None else None
        return Staged(chunk, lo, hi, bufs, views, param_view=param)

    def fresh(self, chunk: int, lo: int, hi: int) -> Staged:
        """A staging set for a piece whose contents the caller writes from scratch."""
        self._settle_writes_of(chunk, lo)
        return self._staged(chunk, lo, hi, self._acquire())

    def wait_read(self, st: Staged) -> list[torch.Tensor]:
        import time

        t0 = time.perf_counter()
        for h in st.handles:
            h.wait()
        self.read_wait_s += time.perf_counter() - t0
        return st.views

    def start_write(self, st: Staged) -> None:
        """Write the piece back (and its compute-dtype parameters, when kept here); its set
        returns to the pool when the write is done.  A later read of the same extent --
        from any thread -- is ordered after this write by the file itself."""
        st.handles = [self.file.write((st.chunk, k, st.lo), v) for k, v in zip(self.kinds, st.views)]
        if st.param_view is not None:
            st.handles.append(self.file.write((st.chunk, "param", st.lo), st.param_view))
        self._inflight.append(st)

    # -- parameters (only with param_dtype) ------------------------------------------------
    def write_params(self, chunk: int, lo: int, src: torch.Tensor) -> None:
        """Write one piece's compute-dtype parameters (``src``: 4 KiB-aligned host tensor)."""
        self.file.write((chunk, "param", lo), src).wait()

    def read_params(self, chunk: int, out: torch.Tensor) -> None:
        """Read a chunk's compute-dtype parameters into ``out`` (a 4 KiB-aligned host tensor of
        at least the chunk's elements), piece by piece; safe from any thread."""
        handles = [self.file.read((chunk, "param", lo), out[lo:hi]) for lo, hi in self.pieces[chunk]]
        for h in handles:
            h.wait()

    def drain(self) -> None:
        while self._inflight:
            s = self._inflight.pop(0)
            for h in s.handles:
                h.wait()
            self._free.append(s.bufs)

    # -- whole chunks (setup, moves, checkpoints) ------------------------------------------
    def write_chunk(self, chunk: int, views: list[torch.Tensor]) -> None:
        """Write full-length ``views`` (one per kind) of ``chunk``; returns when durable in the file."""
        self._whole_chunk(self.file.write, chunk, views)

    def read_chunk(self, chunk: int, views: list[torch.Tensor]) -> None:
        """Read ``chunk``'s state into full-length ``views`` (one per kind)."""
        self._whole_chunk(self.file.read, chunk, views)

    def _whole_chunk(self, op: Callable, chunk: int, views: list[torch.Tensor]) -> None:
        self.drain()
        handles = [op((chunk, k, lo), v[lo:hi]) for lo, hi in self.pieces[chunk] for k, v in zip(self.kinds, views)]
        for h in handles:
            h.wait()

    def close(self) -> None:
        self.drain()
        self.file.close()
        for release in self._release:
            release()
        self._release, self._free = [], []


class PieceCursor:
    """Element ranges of NVMe-resident state, read and written through one cached piece
    per kind: what checkpoints stream through (``tierlift.state.StreamedTensor``), so
    saving or resuming holds ``kinds x piece`` bytes of it, never a whole chunk.

    Ranges must come in ascending order per kind for each piece to be read once.
    ``flush`` writes back pieces that were written to (read-modify-write: elements a
    checkpoint does not cover, e.g. padding, keep their values)."""

    def __init__(self, store: NVMeStateStore) -> None:

        self.store = store
        self._bufs = {k: aligned_empty(store.piece_numel * 4).view(torch.float32) for k in store.kinds}
        self._cur: dict[str, list] = {}  # kind -> [chunk, piece lo, piece hi, dirty]

    def _piece(self, chunk: int, kind: str, pos: int) -> tuple[int, int, torch.Tensor]:
        lo = pos - pos % self.store.piece_numel
        cur = self._cur.get(kind)
        if cur is None or cur[0] != chunk or cur[1] != lo:
            self.flush(kind)
            hi = next(h for pl, h in self.store.pieces[chunk] if pl == lo)
            buf = self._bufs[kind][:hi - lo]
            self.store.file.read((chunk, kind, lo), buf).wait()
            cur = self._cur[kind] = [chunk, lo, hi, False]
        return cur[1], cur[2], self._bufs[kind][:cur[2] - cur[1]]

    def read(self, chunk: int, kind: str, lo: int, hi: int) -> torch.Tensor:
        out = torch.empty(hi - lo, dtype=torch.float32)
        pos = lo
        while pos < hi:
            p_lo, p_hi, buf = self._piece(chunk, kind, pos)
            end = min(hi, p_hi)
            out[pos - lo:end - lo].copy_(buf[pos - p_lo:end - p_lo])
            pos = end
        return out

    def write(self, chunk: int, kind: str, lo: int, src: torch.Tensor) -> None:
        pos, hi = lo, lo + src.numel()
        while pos < hi:
            p_lo, p_hi, buf = self._piece(chunk, kind, pos)
            end = min(hi, p_hi)
            buf[pos - p_lo:end - p_lo].copy_(src[pos - lo:end - lo])
            self._cur[kind][3] = True
            pos = end

    def flush(self, kind: str | None = None) -> None:
        for k in [kind] if kind else list(self._cur):
            cur = self._cur.pop(k, None)
            if cur and cur[3]:
                chunk, lo, hi, _ = cur
                self.store.file.write((chunk, k, lo), self._bufs[k][:hi - lo]).wait()
