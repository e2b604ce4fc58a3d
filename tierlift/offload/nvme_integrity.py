"""Integrity of an NVMe extent file: a CRC-32C per block of every extent written, kept in
memory, saved in the file's sidecar, and checked against every verified read.

Why CRC-32C through the ``crc32c`` package (ICRAR's, hardware SSE4.2/ARMv8 CRC
instructions) and not ``zlib.crc32``: measured on this project's 2-core CI machine, 64 MiB
buffers, 13.3 GiB/s per thread against zlib's 2.1 GiB/s, and it releases the GIL as zlib
does, so the I/O threads checksum in parallel.  With zlib, verifying every optimizer-state
read cost 1.065x the L1B step on an H200 (`benchmarks/results/nvme_verify_l1b_h200.md`);
CRC-32C is the checksum storage systems standardised on (iSCSI, ext4 metadata, RocksDB)
for the same reason.  A CRC (not a hash) detects every burst error up to 32 bits.

``ExtentChecksums`` is composed into ``NVMeFile`` (``nvme.py``); it owns the table and
the mismatch error, the file owns the I/O.  Thread safety: every method takes the lock it
is given (the file's), except ``compute``, which touches only the caller's bytes.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Hashable, Mapping

import crc32c

from tierlift.offload.extents import describe_extent
from tierlift.offload.nvme_io import FIX_DISK, ChecksumError, IOHandle

__all__ = ["ALGORITHM", "checksum", "ExtentChecksums"]

ALGORITHM = "crc32c"


def checksum(buf) -> int:
    """CRC-32C of a bytes-like object (a memoryview slice of a tensor's bytes); GIL released."""
    return crc32c.crc32c(buf)


class ExtentChecksums:
    """key -> (granule bytes, one CRC-32C per granule of the extent's payload) for the
    extents of one file (module doc).  ``stats``: the file's ``NVMeStats`` (its
    ``checksum_s`` counts thread-seconds spent here)."""

    def __init__(self, path: str, setting: str, value: str, lock: threading.Lock, stats: Any) -> None:
        self.path, self.setting, self.value = path, setting, value
        self._lock, self._stats = lock, stats
        self._crc: dict[Hashable, tuple[int, list[int]]] = {}

    # -- computing -------------------------------------------------------------------------
    def compute(self, mv: memoryview, nbytes: int, granule: int) -> list[int]:
        """One checksum per ``granule`` bytes of ``mv[:nbytes]`` (the last may be short)."""
        t0 = time.perf_counter()
        out = [checksum(mv[lo:min(lo + granule, nbytes)]) for lo in range(0, nbytes, granule)]
        self.count_seconds(time.perf_counter() - t0)
        return out

    def count_seconds(self, seconds: float) -> None:
        with self._lock:
            self._stats.checksum_s += seconds

    # -- the table (callers hold the file's lock) ---------------------------------------------
    def record(self, key: Hashable, granule: int, crcs: list[int] | None) -> None:
        """A write finished: its checksums (None: failed or unchecked, nothing to trust)."""
        if crcs is None:
            self._crc.pop(key, None)
        else:
            self._crc[key] = (granule, [int(c or 0) for c in crcs])

    def get(self, key: Hashable) -> tuple[int, list[int]] | None:
        return self._crc.get(key)

    # -- the sidecar ---------------------------------------------------------------------------
    def to_sidecar(self) -> dict[str, dict[str, Any]]:
        """Per key: {"granule": bytes, "crc32c": [...]} (the caller holds the lock)."""
        return {k: {"granule": g, ALGORITHM: c} for k, (g, c) in self._crc.items()}

    def load_sidecar(self, sums: Mapping[Hashable, Mapping[str, Any]]) -> None:
        """The table of a reopened file; KeyError/TypeError/ValueError on a malformed entry."""
        self._crc = {k: (int(v["granule"]), [int(c) for c in v[ALGORITHM]]) for k, v in sums.items()}

    # -- verifying -----------------------------------------------------------------------------
    def verify(self, h: IOHandle, got_per_block: list[int | None], block_size: int, n_blocks: int) -> None:
        """Raise ChecksumError unless the bytes ``h`` read match the checksums of the extent's
        last write.  ``got_per_block``: the checksums the I/O threads computed per
        ``block_size`` request; recomputed here when the write used another granule."""
        stored = self.get(h.key)
        if stored is None:
            raise ChecksumError(f"extent {h.key!r} of {self.path} has no checksum: it was never written "
                                "(or its last write failed or ran without checksums).",
                                fix="write the extent before reading it with verify=True.")
        granule, want = stored
        got = got_per_block[:n_blocks] if granule == block_size else self.compute(h._mv, h.nbytes, granule)
        if len(got) != len(want):
            raise ChecksumError(f"extent {h.key!r} of {self.path}: {len(want)} checksums stored for "
                                f"{h.nbytes} bytes in {granule}-byte granules; the sidecar is inconsistent.",
                                fix=FIX_DISK.format(setting=self.setting))
        for i, (a, b) in enumerate(zip(got, want)):
            if a != b:
                lo = i * granule
                hi = min(lo + granule, h.nbytes)
                raise ChecksumError(
                    f"checksum mismatch reading {self.path}, {describe_extent(h.extent)}: its bytes [{lo}, {hi}) "
                    f"(file offset {h.extent.offset + lo}) read back with {ALGORITHM} {a:#010x}, expected "
                    f"{b:#010x} as written; the data on disk is corrupt and was not used.",
                    setting=self.setting, value=self.value,
                    fix=FIX_DISK.format(setting=self.setting) + " Then resume from the last checkpoint "
                        "(its NVMe-resident state was verified when it was saved).")
