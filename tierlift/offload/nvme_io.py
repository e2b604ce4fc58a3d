"""What the NVMe engine and its backends share: one handle per extent in flight, counters,
the error types and 4 KiB-aligned host buffers."""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

from tierlift.errors import TierliftError
from tierlift.offload.extents import IO_ALIGN, Extent

__all__ = ["IOHandle", "NVMeStats", "NVMeError", "ChecksumError", "aligned_empty", "FIX_DISK"]

FIX_DISK = "check `dmesg` and the disk's health (smartctl/nvme smart-log) and move {setting} to a healthy disk."


class NVMeError(TierliftError):
    """The extent file cannot be created, read or written."""


class ChecksumError(NVMeError):
    """Data read back differs from what was written: the read buffer must not be used."""


def aligned_empty(nbytes: int, align: int = IO_ALIGN) -> torch.Tensor:
    """Uninitialised uint8 host tensor of ``nbytes`` whose data starts ``align``-aligned.

    Over-allocates by ``align`` bytes and slices at the first aligned address (the
    view keeps the allocation alive).  Not page-locked: pin it (cudaHostRegister)
    or take a slab of the pinned pool where H2D speed matters."""
    if nbytes < 0 or align <= 0 or align & (align - 1):
        raise ValueError(f"aligned_empty: need nbytes >= 0 and a power-of-two align, got {nbytes}, {align}")
    base = torch.empty(nbytes + align, dtype=torch.uint8)
    skip = -base.data_ptr() % align
    return base[skip:skip + nbytes]


@dataclass
class NVMeStats:
    """Counters since the file was opened.  Bytes are what the disk moved (padding
    included); busy seconds are wall time with at least one request in flight."""

    bytes_read: int = 0
    bytes_written: int = 0
    reads: int = 0  # extents completed
    writes: int = 0
    requests: int = 0
    errors: int = 0
    bounce_bytes: int = 0  # tail bytes staged through the bounce buffer
    read_busy_s: float = 0.0
    write_busy_s: float = 0.0
    busy_s: float = 0.0  # either direction
    checksum_s: float = 0.0  # thread-seconds in CRC-32C

    @property
    def read_gbps(self) -> float:
        return self.bytes_read / self.read_busy_s / 1e9 if self.read_busy_s else 0.0

    @property
    def write_gbps(self) -> float:
        return self.bytes_written / self.write_busy_s / 1e9 if self.write_busy_s else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "read_gbps": self.read_gbps, "write_gbps": self.write_gbps}


class IOHandle:
    """One extent moving between a host buffer and the file.  ``wait()`` blocks until
    it is done and raises its error (NVMeError / ChecksumError), if any."""

    def __init__(self, op: str, extent: Extent, tensor: torch.Tensor, verify: bool) -> None:
        self.op, self.extent, self.key, self.verify = op, extent, extent.key, verify
        self.nbytes = extent.nbytes
        self._u8 = tensor.detach().reshape(-1).view(torch.uint8)  # keeps the caller's memory alive
        self._mv = memoryview(self._u8.numpy())
        n = len(self._mv)
        # Bytes of the caller's buffer usable straight for O_DIRECT: all of it when it
        # covers the padded extent, else its whole 4 KiB pages (the rest is bounced).
        self._cover = n if n >= extent.padded else n - n % IO_ALIGN
        self._reqs: list[tuple[int, int, int]] = []
        self._crcs: list[int | None] = []
        self._remaining = 0
        self.error: BaseException | None = None
        self._event = threading.Event()
        self._t0 = time.perf_counter()
        self.seconds: float | None = None  # submit -> completion

    def done(self) -> bool:
        return self._event.is_set()

    def wait(self, timeout: float | None = None) -> None:
        if not self._event.wait(timeout):
            raise TimeoutError(f"NVMe {self.op} of extent {self.key!r} not done after {timeout} s")
        if self.error is not None:
            raise self.error

    def __repr__(self) -> str:
        state = "error" if self.error else "done" if self.done() else "pending"
        return f"IOHandle({self.op} {self.key!r}, {self.nbytes} bytes, {state})"
