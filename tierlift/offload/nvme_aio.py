"""DeepSpeed's libaio op as a backend of the NVMe engine (``offload.aio.backend:
libaio``): a mixin of :class:`tierlift.offload.nvme.NVMeFile`, kept apart because it
is optional and only loads where DeepSpeed's async_io op builds (libaio + a
compiler).  It issues the same 4 KiB-aligned extents as the threads backend through
``aio_handle.async_pread/async_pwrite`` from one dispatcher thread (its ``wait()``
waits for everything in flight) and checksums on a small thread pool."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from tierlift.offload.extents import IO_ALIGN
from tierlift.offload.nvme_integrity import checksum
from tierlift.offload.nvme_io import FIX_DISK, NVMeError, aligned_empty

__all__ = ["LibaioBackend", "load_deepspeed_aio"]


class LibaioBackend:
    def _aio_setup(self) -> None:
        a, op = self.aio, self._aio_op
        # DeepSpeed splits one call evenly over intra_op_parallelism threads, so the part of
        # an extent given to the main handle is a multiple of threads x 4 KiB; the rest goes
        # through a one-thread handle.
        self._aio_main = op.aio_handle(a.block_size, a.queue_depth, a.single_submit, a.overlap_events, a.threads)
        self._aio_tail = op.aio_handle(a.block_size, a.queue_depth, a.single_submit, a.overlap_events, 1)
        self._aio_bounce = aligned_empty(self.plan.align)  # the unaligned tail is at most one align unit

    def _aio_loop(self) -> None:
        pool = ThreadPoolExecutor(self.aio.threads, thread_name_prefix="tierlift-nvme-crc")
        while (h := self._q.get()) is not None:
            try:
                if h._reqs:
                    self._aio_extent(h, self._aio_main, self._aio_tail, pool, self._aio_bounce)
            except Exception as e:  # noqa: BLE001 -- reported through the handle
                h.error = h.error or e
            self._finish(h)
        pool.shutdown()

    def _aio_extent(self, h, main: Any, tail: Any, pool: ThreadPoolExecutor, bounce: torch.Tensor) -> None:
        e, u8, write = h.extent, h._u8, h.op == "write"
        unit = IO_ALIGN * self.aio.threads
        m = h._cover - h._cover % unit
        pieces = [(main, u8[:m], e.offset)] if m else []
        if h._cover > m:
            pieces.append((tail, u8[m:h._cover], e.offset + m))
        nb = e.padded - h._cover
        valid = max(0, h.nbytes - h._cover)
        if nb:
            if write:
                bounce[:valid].copy_(u8[h._cover:h.nbytes])
                bounce[valid:nb].zero_()
            pieces.append((tail, bounce[:nb], e.offset + h._cover))
        counts: dict[int, list] = {}
        self._io_begin(h.op)
        try:
            for handle, t, off in pieces:
                rc = (handle.async_pwrite if write else handle.async_pread)(t, self.path, off)
                if rc != 0:
                    raise NVMeError(f"DeepSpeed aio refused a {h.op} of {t.numel()} bytes at offset {off} of "
                                    f"{self.path} (extent {h.key!r}).", setting="offload.aio.backend",
                                    value="libaio", fix="see the aio message above, or use backend: threads.")
                counts.setdefault(id(handle), [handle, 0])[1] += 1
            if write and self.checksum:  # overlaps the I/O: the buffer is stable while it is written
                h._crcs = self._crcs_parallel(pool, h)
        finally:
            for handle, k in counts.values():  # never leave the handle with ops in flight on our buffer
                if handle.wait() != k and h.error is None:
                    h.error = NVMeError(f"DeepSpeed aio completed fewer {h.op}s than submitted for extent "
                                        f"{h.key!r} of {self.path}.", fix=FIX_DISK.format(setting=self.setting))
            self._io_end(h.op, e.padded, nb)
        if not write:
            if valid:
                u8[h._cover:h.nbytes].copy_(bounce[:valid])
            if h.verify:
                h._crcs = self._crcs_parallel(pool, h)

    def _crcs_parallel(self, pool: ThreadPoolExecutor, h) -> list[int]:
        g, mv = self.block_size, h._mv
        t0 = time.perf_counter()
        out = list(pool.map(lambda lo: checksum(mv[lo:min(lo + g, h.nbytes)]), range(0, h.nbytes, g)))
        self.sums.count_seconds(time.perf_counter() - t0)
        return out



def load_deepspeed_aio() -> Any:
    """DeepSpeed's async_io op module (built just in time on first use)."""
    try:
        from deepspeed.ops.op_builder import AsyncIOBuilder

        builder = AsyncIOBuilder()
        if not builder.is_compatible(verbose=False):
            raise RuntimeError("AsyncIOBuilder().is_compatible() is False: libaio headers or library not found")
        return builder.load(verbose=False)
    except Exception as e:  # ImportError, build failures
        raise NVMeError(f"backend 'libaio' needs DeepSpeed's async_io op, which is unavailable: "
                        f"{type(e).__name__}: {e}", setting="offload.aio.backend", value="libaio",
                        fix="install libaio (apt-get install libaio-dev) and "
                            "`pip install --no-build-isolation deepspeed`, or set backend: threads.") from e
