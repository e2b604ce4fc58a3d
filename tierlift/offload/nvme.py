"""NVMe engine: one preallocated extent file per rank, asynchronous aligned I/O.

``NVMeFile`` executes an :class:`~tierlift.offload.extents.ExtentPlan`: it
creates ``tierlift-rank{r:05d}.extents`` (mode 0600) under the configured
directory, preallocates it (``posix_fallocate``: no ENOSPC halfway through a
run, no fragmentation from sparse growth), keeps one descriptor open with
O_DIRECT (the page cache would only double host RSS for data we stage in our
own pinned slots) and moves whole extents with ``write(key, tensor)`` /
``read(key, out)``, which return an :class:`IOHandle` to ``wait()`` on.

Why plain ``pwrite``/``preadv`` threads (backend "threads"): the syscalls (and
the CRC-32C of ``nvme_integrity.py``) release the GIL, so blocking workers keep the device busy with no
compiled extension, no libaio and no JIT build of DeepSpeed's op.  A blocking
call has exactly one request in flight, so the pool runs ``threads x
queue_depth`` workers: the same device queue depth as DeepSpeed's handle with
intra_op_parallelism=threads and the same queue_depth, so a DeepSpeed ``aio``
config means the same concurrency here (with one request in flight, writes ran
at half of DeepSpeed's speed on the H200 machine's disk).  ``single_submit`` and
``overlap_events`` only matter to the "libaio" backend, which hands the same
extents to DeepSpeed's ``aio_handle``.

O_DIRECT needs the buffer address, the file offset and the length of every
request aligned.  The plan aligns offsets and lengths (4 KiB); the caller's
buffer must start 4 KiB-aligned (``aligned_empty`` or a slab of the pinned pool),
which is checked on every call, buffered mode included, so code that works on
tmpfs works on NVMe.  A buffer may hold just the item's ``nbytes``: the unaligned
tail then goes through a small aligned bounce buffer.

Integrity (``nvme_integrity.ExtentChecksums``, composed here): a CRC-32C per block
(``block_size`` bytes of payload) of every extent written, computed in the I/O threads,
kept in memory and saved by ``flush()`` in a sidecar JSON; ``verify=True`` (what optimizer state uses unless
``offload.optimizer.verify: false``) checks every read against it on the same I/O
thread that read the bytes, and a mismatch raises :class:`ChecksumError` from ``wait()``.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import queue
import threading
import time
from collections import deque
from dataclasses import asdict
from typing import Any, Hashable

import torch

from tierlift.offload.extents import IO_ALIGN, ExtentPlan
from tierlift.offload.nvme_aio import LibaioBackend, load_deepspeed_aio
from tierlift.offload.nvme_exit import stop_workers_at_exit
from tierlift.offload.nvme_integrity import ExtentChecksums, checksum
from tierlift.offload.nvme_io import FIX_DISK, ChecksumError, IOHandle, NVMeError, NVMeStats, aligned_empty
from tierlift.offload.policy import AioConfig

__all__ = ["NVMeError", "ChecksumError", "NVMeStats", "IOHandle", "NVMeFile", "aligned_empty",
           "extent_file_name"]

log = logging.getLogger(__name__)

_SIDECAR_FORMAT = "tierlift-extents/2"  # 2: CRC-32C (1 held zlib's crc32)


def extent_file_name(rank: int) -> str:
    return f"tierlift-rank{rank:05d}.extents"


def _fmt_bytes(n: int) -> str:
    return f"{n / (1 << 30):.2f} GiB ({n} bytes)"


def _probe_direct(fd: int, file_bytes: int) -> None:
    """Switch ``fd`` to O_DIRECT and read one aligned block; raises OSError if refused."""
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_DIRECT)
    try:
        if file_bytes:  # some filesystems accept the flag and refuse the I/O (EINVAL)
            os.preadv(fd, [memoryview(aligned_empty(IO_ALIGN).numpy())], 0)
    except OSError:
        fcntl.fcntl(fd, fcntl.F_SETFL, flags)
        raise


class NVMeFile(LibaioBackend):
    """One rank's extent file.  ``direct``: None tries O_DIRECT and falls back to
    buffered I/O (with a warning) where the filesystem refuses it, True requires it,
    False never uses it.  ``existing=True`` reopens a kept file and its sidecar
    checksums (checkpoint load).  ``keep`` (default: keep only reopened files)
    leaves file and sidecar on close.  ``setting`` names the directory's config key
    in error messages."""

    def __init__(self, path_dir: str, rank: int, plan: ExtentPlan, aio: AioConfig | None = None, *,
                 direct: bool | None = None, verify: bool = False, checksum: bool = True,
                 keep: bool | None = None, existing: bool = False,
                 setting: str = "offload.optimizer.path") -> None:
        self.aio = aio or AioConfig()
        self.plan, self.rank, self.setting, self.dir = plan, rank, setting, path_dir
        self.verify, self.checksum = verify, checksum
        self.keep = existing if keep is None else keep
        self.block_size = self.aio.block_size
        self.path = os.path.join(path_dir, extent_file_name(rank))
        self.sidecar_path = self.path + ".json"
        if self.aio.use_gds:
            raise NVMeError("GPUDirect Storage is not supported by tierlift's NVMe engine yet.",
                            setting="offload.aio.use_gds", value=True,
                            fix="set use_gds: false (data is staged through pinned host memory).")
        if verify and not checksum:
            raise NVMeError("verify=True needs checksums, but checksum=False.", setting="checksum",
                            value=False, fix="enable checksums or drop verify.")
        self._aio_op = load_deepspeed_aio() if self.aio.backend == "libaio" else None
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._stats = NVMeStats()
        self.sums = ExtentChecksums(self.path, setting, path_dir, self._lock, self._stats)
        self._busy_keys: dict[Hashable, deque[IOHandle]] = {}  # key -> jobs waiting behind the running one
        self._pending = 0
        self._inflight = {"read": 0, "write": 0}
        self._t_busy = {"read": 0.0, "write": 0.0, "any": 0.0}
        self._closed = False
        self._fd = -1
        self._open(direct, existing)
        if self._aio_op is not None:
            try:
                self._aio_setup()
            except BaseException:
                self._abandon(existing)
                raise
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        n = 1 if self._aio_op is not None else self.aio.threads * self.aio.queue_depth  # requests in flight
        loop = self._aio_loop if self._aio_op is not None else self._worker_loop
        self._workers = [threading.Thread(target=loop, name=f"tierlift-nvme-r{rank}-{i}", daemon=True)
                         for i in range(n)]
        for t in self._workers:
            t.start()
        stop_workers_at_exit(self)  # none may be inside a torch op when Python finalizes

    # ------------------------------------------------------------------ open
    def _open(self, direct: bool | None, existing: bool) -> None:
        try:
            os.makedirs(self.dir, exist_ok=True)
            flags = os.O_RDWR | os.O_CLOEXEC | (0 if existing else os.O_CREAT)
            self._fd = os.open(self.path, flags, 0o600)
        except OSError as e:
            raise NVMeError(f"cannot open {self.path}: {e.strerror}.", setting=self.setting, value=self.dir,
                            fix="give a writable directory on a local disk.") from e
        try:  # a second job pointed at the same directory would corrupt this rank's state
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)  # the file is the other process's: leave it alone
            raise NVMeError(f"{self.path} is in use by another process.", setting=self.setting,
                            value=self.dir, fix="give each job its own directory.") from None
        try:
            os.fchmod(self._fd, 0o600)  # umask or an old file must not widen or narrow it
            if existing:
                self._load_sidecar()
            else:
                os.ftruncate(self._fd, 0)  # a stale file of a crashed run: its data is meaningless
                if os.path.exists(self.sidecar_path):
                    os.unlink(self.sidecar_path)
                self._preallocate()
            self.direct = self._enable_direct(direct)
            if self._aio_op is not None and not self.direct:
                raise NVMeError(f"backend 'libaio' needs O_DIRECT, which the filesystem of {self.dir} refuses.",
                                setting="offload.aio.backend", value="libaio",
                                fix=f"point {self.setting} at a local disk (ext4, xfs), or use backend: threads.")
        except BaseException:
            self._abandon(existing)
            raise

    def _abandon(self, existing: bool) -> None:
        """Undo a half-done open: close, and delete the file unless it was there before."""
        os.close(self._fd)
        if not existing:
            self._unlink()

    def _preallocate(self) -> None:
        need = self.plan.file_bytes
        if need == 0:
            return
        try:
            os.posix_fallocate(self._fd, 0, need)
        except OSError as e:
            st = os.statvfs(self.dir)
            free = st.f_bavail * st.f_frsize
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise NVMeError(
                    f"not enough disk space for {self.path}: it needs {_fmt_bytes(need)}, the disk has "
                    f"{_fmt_bytes(free)} free.", setting=self.setting, value=self.dir,
                    fix=f"free space there, point {self.setting} at a disk with at least {_fmt_bytes(need)} "
                        "free, or keep more state in host memory (offload kind: cpu, or max_in_cpu).") from e
            raise NVMeError(f"cannot preallocate {_fmt_bytes(need)} for {self.path}: {e.strerror}.",
                            setting=self.setting, value=self.dir,
                            fix="use a directory on a local disk (ext4, xfs).") from e

    def _enable_direct(self, want: bool | None) -> bool:
        if want is False:
            return False
        try:
            if not hasattr(os, "O_DIRECT"):
                raise OSError(errno.EINVAL, "this OS has no O_DIRECT")
            _probe_direct(self._fd, self.plan.file_bytes)
            return True
        except OSError as e:
            reason = e.strerror or str(e)
        if want:
            raise NVMeError(f"the filesystem of {self.dir} refuses O_DIRECT ({reason}).", setting=self.setting,
                            value=self.dir, fix="use a directory on a local disk (ext4, xfs) or allow buffered I/O.")
        log.warning("%s: the filesystem refuses O_DIRECT (%s); using buffered I/O through the page cache "
                    "(slower, and the cache takes host memory). Point %s at a local disk for O_DIRECT.",
                    self.path, reason, self.setting)
        return False

    def _load_sidecar(self) -> None:
        size = os.fstat(self._fd).st_size
        if size < self.plan.file_bytes:
            raise NVMeError(f"{self.path} has {size} bytes but the plan needs {self.plan.file_bytes}.",
                            setting=self.setting, value=self.dir, fix="reopen it with the plan it was written with.")
        try:
            with open(self.sidecar_path, encoding="utf-8") as f:
                d = json.load(f)
            if d.get("format") != _SIDECAR_FORMAT:
                raise ValueError(f"format {d.get('format')!r}, expected {_SIDECAR_FORMAT!r}")
            plan, sums = ExtentPlan.from_json(d["plan"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise NVMeError(f"cannot read the checksum sidecar {self.sidecar_path}: {e}.", setting=self.setting,
                            value=self.dir, fix="the extent file was not flushed; it cannot be trusted.") from e
        if not plan.same_layout(self.plan):
            raise NVMeError(f"{self.path} was written with a different extent plan.", setting=self.setting,
                            value=self.dir, fix="reopen it with the plan (items and align) it was written with.")
        try:
            self.sums.load_sidecar(sums)
        except (KeyError, TypeError, ValueError) as e:
            raise NVMeError(f"the checksum sidecar {self.sidecar_path} has a malformed entry ({e!r}).",
                            setting=self.setting, value=self.dir,
                            fix="the extent file cannot be trusted; resume from a checkpoint.") from e

    # ------------------------------------------------------------- public API
    def write(self, key: Hashable, tensor: torch.Tensor) -> IOHandle:
        """Start writing ``tensor`` (the item's bytes) to the extent of ``key``."""
        return self._submit(self._handle("write", key, tensor, False))

    def read(self, key: Hashable, out: torch.Tensor, *, verify: bool | None = None) -> IOHandle:
        """Start reading the extent of ``key`` into ``out``; ``verify`` defaults to the file's."""
        verify = self.verify if verify is None else verify
        if verify and not self.checksum:
            raise NVMeError("verify=True needs checksums.", setting="checksum", value=False,
                            fix="open the file with checksum=True.")
        return self._submit(self._handle("read", key, out, verify))

    def wait_all(self) -> None:
        """Block until every submitted operation has finished (errors stay with their handles)."""
        with self._idle:
            self._idle.wait_for(lambda: self._pending == 0)

    def flush(self) -> str:
        """Wait for all I/O, make the data durable and write the checksum sidecar; returns its path."""
        self._check_open()
        self.wait_all()
        os.fsync(self._fd)  # O_DIRECT skips the cache, not the metadata of preallocated extents
        with self._lock:
            sums = self.sums.to_sidecar()
        doc = {"format": _SIDECAR_FORMAT, "file": os.path.basename(self.path), "rank": self.rank,
               "plan": self.plan.to_json(sums)}
        tmp = self.sidecar_path + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(doc, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.sidecar_path)  # a crash leaves the old sidecar or the new one, never half
        return self.sidecar_path

    def close(self) -> None:
        """Finish pending I/O, stop the workers, close the file; delete it unless ``keep``."""
        if self._closed:
            return
        try:
            self.wait_all()
            if self.keep:
                self.flush()
        finally:
            self._closed = True
            for _ in self._workers:
                self._q.put(None)
            for t in self._workers:
                t.join()
            os.close(self._fd)
            if not self.keep:
                self._unlink()

    def __enter__(self) -> "NVMeFile":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def stats(self) -> NVMeStats:
        with self._lock:
            return NVMeStats(**asdict(self._stats))

    def checksum_of(self, key: Hashable) -> tuple[int, list[int]] | None:
        """(granule bytes, CRC-32C per granule) recorded for ``key``'s last successful write."""
        with self._lock:
            return self.sums.get(key)

    # ------------------------------------------------------------ scheduling
    def _check_open(self) -> None:
        if self._closed:
            raise NVMeError(f"{self.path} is closed.", fix="open a new NVMeFile.")

    def _handle(self, op: str, key: Hashable, t: torch.Tensor, verify: bool) -> IOHandle:
        self._check_open()
        if key not in self.plan:
            raise NVMeError(f"no extent for key {key!r} in {self.path}.", fix="use a key from the extent plan.")
        e = self.plan[key]
        what = f"buffer for {op} of extent {key!r}"
        if not isinstance(t, torch.Tensor) or t.device.type != "cpu" or not t.is_contiguous():
            raise NVMeError(f"{what} must be a contiguous host (CPU) tensor.",
                            fix="stage device data in a pinned host slot first.")
        n = t.numel() * t.element_size()
        if n not in (e.nbytes, e.padded):
            raise NVMeError(f"{what} has {n} bytes; the extent holds {e.nbytes} (padded {e.padded}).",
                            fix="pass a buffer of exactly the item's bytes or of its padded size.")
        if n and t.data_ptr() % IO_ALIGN:
            raise NVMeError(f"{what} starts at address {t.data_ptr():#x}, not {IO_ALIGN}-byte aligned; "
                            "O_DIRECT needs aligned buffer addresses.",
                            fix="allocate it with tierlift.offload.nvme.aligned_empty() or take a pinned slab.")
        h = IOHandle(op, e, t, verify)
        h._reqs = self.plan.requests(key, self.block_size)
        h._crcs = [None] * len(h._reqs)
        return h

    def _submit(self, h: IOHandle) -> IOHandle:
        with self._lock:
            self._pending += 1
            waiting = self._busy_keys.get(h.key)
            if waiting is not None:  # same extent busy: run after it (read-after-write order)
                waiting.append(h)
                return h
            self._busy_keys[h.key] = deque()
        self._start(h)
        return h

    def _start(self, h: IOHandle) -> None:
        h._remaining = len(h._reqs)
        if self._aio_op is not None:
            self._q.put(h)
        elif not h._reqs:
            self._finish(h)
        else:
            for i in range(len(h._reqs)):
                self._q.put((h, i))

    def _finish(self, h: IOHandle) -> None:
        if h.error is None and h.op == "read" and h.verify:
            try:
                self._verify(h)
            except Exception as e:  # noqa: BLE001 -- a waiter must always wake up
                h.error = e
        with self._lock:
            s = self._stats
            if h.op == "write":
                ok = h.error is None and self.checksum  # a failed or unchecked write leaves nothing to trust
                self.sums.record(h.key, self.block_size, h._crcs[:_granules(h)] if ok else None)
            s.errors += h.error is not None
            s.reads += h.op == "read" and h.error is None
            s.writes += h.op == "write" and h.error is None
            waiting = self._busy_keys[h.key]
            nxt = waiting.popleft() if waiting else None
            if nxt is None:
                del self._busy_keys[h.key]
            self._pending -= 1
            h.seconds = time.perf_counter() - h._t0
            h._u8 = h._mv = None  # type: ignore[assignment]  # the caller's buffer is theirs again
            h._event.set()
            self._idle.notify_all()
        if nxt is not None:
            self._start(nxt)

    def _verify(self, h: IOHandle) -> None:
        self.sums.verify(h, h._crcs, self.block_size, _granules(h))

    def _io_begin(self, op: str) -> None:
        with self._lock:
            now = time.perf_counter()
            if self._inflight[op] == 0:
                self._t_busy[op] = now
            if self._inflight["read"] + self._inflight["write"] == 0:
                self._t_busy["any"] = now
            self._inflight[op] += 1

    def _io_end(self, op: str, nbytes: int, bounced: int) -> None:
        with self._lock:
            now, s = time.perf_counter(), self._stats
            self._inflight[op] -= 1
            if self._inflight[op] == 0:
                setattr(s, f"{op}_busy_s", getattr(s, f"{op}_busy_s") + now - self._t_busy[op])
            if self._inflight["read"] + self._inflight["write"] == 0:
                s.busy_s += now - self._t_busy["any"]
            if op == "read":
                s.bytes_read += nbytes
            else:
                s.bytes_written += nbytes
            s.requests += 1
            s.bounce_bytes += bounced

    # ----------------------------------------------------- threads backend
    def _worker_loop(self) -> None:
        bounce: torch.Tensor | None = None  # this worker's aligned staging for unaligned tails
        while (item := self._q.get()) is not None:
            h, i = item
            try:
                if h.error is None:  # the rest of a failed extent is skipped
                    bounce = self._request(h, i, bounce)
            except Exception as e:  # noqa: BLE001 -- reported through the handle
                h.error = h.error or e
            with self._lock:
                h._remaining -= 1
                last = h._remaining == 0
            if last:
                self._finish(h)

    def _request(self, h: IOHandle, i: int, bounce: torch.Tensor | None) -> torch.Tensor | None:
        fo, lo, n = h._reqs[i]
        hi, mv = lo + n, h._mv
        mid = min(hi, max(lo, h._cover))  # [lo, mid) straight from/into the caller's buffer
        if hi > mid and (bounce is None or bounce.numel() < hi - mid):
            bounce = aligned_empty(max(hi - mid, IO_ALIGN))
        bmv = memoryview(bounce.numpy())[:hi - mid] if hi > mid else None
        valid = max(0, min(hi, h.nbytes) - mid)  # payload bytes inside the bounced part
        self._io_begin(h.op)
        try:
            if h.op == "write":
                if mid > lo:
                    self._pwrite(mv[lo:mid], fo, h)
                if bmv is not None:
                    bmv[:valid] = mv[mid:mid + valid]
                    bounce[valid:hi - mid].zero_()  # type: ignore[index]
                    self._pwrite(bmv, fo + mid - lo, h)
            else:
                if mid > lo:
                    self._pread(mv[lo:mid], fo, h)
                if bmv is not None:
                    self._pread(bmv, fo + mid - lo, h)
                    mv[mid:mid + valid] = bmv[:valid]
        finally:
            self._io_end(h.op, n, hi - mid)
        if lo < h.nbytes and ((h.op == "write" and self.checksum) or h.verify):  # crc of this request's payload
            t0 = time.perf_counter()
            h._crcs[i] = checksum(mv[lo:min(hi, h.nbytes)])
            self.sums.count_seconds(time.perf_counter() - t0)
        return bounce

    def _pwrite(self, view: memoryview, off: int, h: IOHandle) -> None:
        self._transfer(lambda v, o: os.pwrite(self._fd, v, o), view, off, h)

    def _pread(self, view: memoryview, off: int, h: IOHandle) -> None:
        self._transfer(lambda v, o: os.preadv(self._fd, [v], o), view, off, h)

    def _transfer(self, call: Any, view: memoryview, off: int, h: IOHandle) -> None:
        """Move all of ``view``, retrying short transfers; OSErrors become NVMeErrors."""
        done, stalls = 0, 0
        while done < len(view):
            try:
                n = call(view[done:], off + done)
                if n == 0 and h.op == "read":
                    raise OSError(errno.EIO, "unexpected end of file (was it truncated?)")
                new = done + n
                if self.direct:  # O_DIRECT resumes only at an aligned offset: redo the partial block
                    new -= new % IO_ALIGN
                stalls = stalls + 1 if new <= done else 0
                if stalls > 8:
                    raise OSError(errno.EIO, f"{h.op} makes no progress")
            except OSError as e:
                raise self._io_error(e, h, off + done, len(view) - done) from e
            done = max(done, new)

    def _io_error(self, e: OSError, h: IOHandle, off: int, n: int) -> NVMeError:
        where = f"{h.op} of {n} bytes at file offset {off} of {self.path} (extent {h.key!r})"
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            fix = (f"free space on the disk of {self.setting}; on copy-on-write or thin-provisioned "
                   "filesystems preallocation does not reserve blocks: use ext4/xfs.")
        elif e.errno == errno.EINVAL and self.direct:
            fix = "the device's logical block may exceed 4096 bytes; open the file with direct=False."
        else:
            fix = FIX_DISK.format(setting=self.setting)
        name = errno.errorcode.get(e.errno or 0, "error")
        return NVMeError(f"{name} ({e.strerror}) in {where}.", setting=self.setting, value=self.dir, fix=fix)

    def _unlink(self) -> None:
        for p in (self.path, self.sidecar_path):
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass


def _granules(h: IOHandle) -> int:
    """Checksummed blocks of an extent's payload (requests wholly in the padding have none)."""
    return sum(1 for _, lo, _ in h._reqs if lo < h.nbytes)
