"""Where the pinned pool's host memory comes from, and whether it may be page-locked.

Split out of ``pinned.py`` (which keeps the slab/region sub-allocator and the pool) so
each file holds one concept: this one is the OS and CUDA side -- RLIMIT_MEMLOCK checks,
anonymous mappings faulted in parallel, ``cudaHostRegister``/``cudaHostAlloc`` -- and
``pinned_bench.py`` measures exactly these functions.

Sync points: ``_Backing.release()`` calls ``cudaHostUnregister``; callers must have
waited for every DMA touching the pages first (``Slab.release`` does).
"""

from __future__ import annotations

import mmap
import os
import resource
import warnings
import weakref
from dataclasses import dataclass
from typing import Protocol

import torch

from tierlift.errors import TierliftError

__all__ = ["PAGE", "PinnedMemoryError", "MemlockReport", "check_memlock", "hostalloc_pinned_bytes"]

PAGE = 4096  # bytes: x86 page and O_DIRECT alignment; every slab and region starts on one
MAX_ROUNDING_WASTE = 0.02  # hostalloc is refused when torch's rounding pins more than 2 % extra
_HOST_REGISTER_PORTABLE = 1  # cudaHostRegisterPortable: pinned for every CUDA context, as torch's own util does
_CAP_IPC_LOCK = 14  # capability bit that lifts RLIMIT_MEMLOCK
_BUDGET = "offload.host_budget_bytes"


class PinnedMemoryError(TierliftError):
    """Pinned host memory cannot be provided within the budget or the memlock limit."""


class SlabFullError(PinnedMemoryError):
    """A slab has no free extent large enough for a sub-allocation."""


class Event(Protocol):
    """What a guarding event must offer (``torch.cuda.Event`` does)."""

    def query(self) -> bool: ...
    def synchronize(self) -> None: ...


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _fmt(n: int) -> str:
    return f"{n:,} bytes ({n / 2**30:.3f} GiB)"


def hostalloc_pinned_bytes(nbytes: int) -> int:
    """Bytes torch's CachingHostAllocator pins for ``nbytes`` (default config: next power of two)."""
    return 1 << max(0, (int(nbytes) - 1).bit_length())


# -- memlock --------------------------------------------------------------------------------------
def _has_cap_ipc_lock() -> bool:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool((int(line.split()[1], 16) >> _CAP_IPC_LOCK) & 1)
    except (OSError, ValueError, IndexError):
        pass
    return False


@dataclass(frozen=True)
class MemlockReport:
    """RLIMIT_MEMLOCK as it bears on a pool.  ``soft_bytes``/``hard_bytes`` None = unlimited;
    ``privileged``: root or CAP_IPC_LOCK, for whom the kernel does not enforce the limit;
    ``applies``: the pool page-locks memory at all (False for a pageable pool)."""

    budget_bytes: int
    soft_bytes: int | None
    hard_bytes: int | None
    privileged: bool
    applies: bool

    @property
    def ok(self) -> bool:
        if not self.applies or self.privileged or self.soft_bytes is None:
            return True
        return 0 < self.budget_bytes <= self.soft_bytes

    def describe(self) -> str:
        lim = "unlimited" if self.soft_bytes is None else _fmt(self.soft_bytes)
        if not self.applies:
            return f"memlock limit {lim}; not applicable (pool is pageable)"
        if self.privileged and self.soft_bytes is not None:
            return f"memlock limit {lim}, not enforced (root or CAP_IPC_LOCK)"
        return f"memlock limit {lim}"


def check_memlock(budget_bytes: int, *, pinning: bool = True) -> MemlockReport:
    """Compare the pinned budget with RLIMIT_MEMLOCK before anything is allocated.

    cudaHostRegister may count against the limit (mlock semantics), so a budget above
    it is refused up front instead of failing halfway through a run.  Root or
    CAP_IPC_LOCK bypasses the limit: that case is reported, not refused."""
    soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    inf = resource.RLIM_INFINITY
    rep = MemlockReport(int(budget_bytes), None if soft == inf else int(soft), None if hard == inf else int(hard),
                        os.geteuid() == 0 or _has_cap_ipc_lock(), pinning)
    if not rep.ok:
        what = "no budget (0 = unbounded)" if budget_bytes == 0 else f"budget {_fmt(budget_bytes)}"
        raise PinnedMemoryError(
            f"pinned host memory: {what} exceeds the memlock limit {_fmt(rep.soft_bytes)} "
            f"(hard limit {'unlimited' if rep.hard_bytes is None else _fmt(rep.hard_bytes)}); "
            "page-locking would fail partway through the run.",
            setting=_BUDGET, value=budget_bytes,
            fix=f"raise the limit (`ulimit -l unlimited`; containers: `--ulimit memlock=-1`) or set "
                f"{_BUDGET} to at most {rep.soft_bytes}.")
    return rep


# -- one slab's host memory -----------------------------------------------------------------------
class _Backing:
    """The host memory under one slab and how to give it back."""

    def __init__(self, tensor: torch.Tensor, mm: mmap.mmap | None, pinned_bytes: int, device: torch.device):
        self.tensor: torch.Tensor | None = tensor  # uint8, the whole mapping
        self.ptr = tensor.data_ptr()
        self.nbytes = tensor.numel()
        self.pinned_bytes = pinned_bytes  # page-locked bytes this slab costs (0 = pageable)
        self.registered = mm is not None and pinned_bytes > 0
        self._mm = mm
        self._device = device

    def release(self) -> bool:
        """Unpin and drop our references.  True when the pages went back to the OS now; False when
        tensor views handed out earlier are still alive (they go when the last view dies).
        Never ``mmap.close()``: torch.frombuffer keeps a reference to the mmap but no buffer
        export, so closing would unmap under a live view."""
        if self.registered:
            with torch.cuda.device(self._device):
                err = int(torch.cuda.cudart().cudaHostUnregister(self.ptr))
            if err:
                warnings.warn(f"cudaHostUnregister({self.ptr:#x}) failed: {_cuda_error(err)}")
            self.registered = False
        self.tensor = None
        if self._mm is None:  # hostalloc: the block returns to torch's cache; PinnedPool empties it
            return True
        gone = weakref.ref(self._mm)
        self._mm = None  # CPython frees (munmaps) it right here unless a view still holds it
        return gone() is None


def _cuda_error(err: int) -> str:
    try:
        return str(torch.cuda.CudaError(err))
    except Exception:
        return f"cudaError {err}"


def _map_and_touch(nbytes: int, hugepages: bool = True) -> tuple[mmap.mmap, torch.Tensor]:
    """Anonymous private mapping, page aligned, every page faulted in before pinning.

    Measured on the H200 machine, 1 GiB, mmap + touch + cudaHostRegister: no touch (the
    driver faults pages in serially) 3 GiB/s; 1 byte per page 9 GiB/s (fewer pages than
    torch's parallel grain, so one thread faults them); 64 bytes per page 14 GiB/s
    (parallel); with MADV_HUGEPAGE 25-29 GiB/s (512x fewer faults, 2 MiB TLB entries)."""
    mm = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    if hasattr(mmap, "MADV_DONTFORK"):
        # A forked child (DataLoader worker) must not share or copy-on-write DMA-pinned pages.
        mm.madvise(mmap.MADV_DONTFORK)
    if hugepages and hasattr(mmap, "MADV_HUGEPAGE"):
        mm.madvise(mmap.MADV_HUGEPAGE)  # a hint: THP "never" or no free huge pages -> 4 KiB pages
    t = torch.frombuffer(mm, dtype=torch.uint8)
    t.view(-1, PAGE)[:, :64].zero_()  # 64 bytes per page: enough elements for torch to fault in parallel
    return mm, t


def _memlock_text() -> str:
    soft = resource.getrlimit(resource.RLIMIT_MEMLOCK)[0]
    return "memlock limit " + ("unlimited" if soft == resource.RLIM_INFINITY else _fmt(soft))


def _register(t: torch.Tensor, device: torch.device, budget: int) -> None:
    with torch.cuda.device(device):
        err = int(torch.cuda.cudart().cudaHostRegister(t.data_ptr(), t.numel(), _HOST_REGISTER_PORTABLE))
    if err:
        raise PinnedMemoryError(
            f"cudaHostRegister of {_fmt(t.numel())} failed: {_cuda_error(err)}; "
            f"{_memlock_text()}.", setting=_BUDGET, value=budget,
            fix="lower offload.host_budget_bytes (move state to NVMe), or raise the memlock limit "
                "(`ulimit -l unlimited`; containers: `--ulimit memlock=-1`).")


def _allocate(nbytes: int, method: str, pinning: bool, device: torch.device, budget: int,
              hugepages: bool = True) -> _Backing:
    if pinning and method == "hostalloc":
        with torch.cuda.device(device):
            t = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        if t.data_ptr() % PAGE:  # cudaHostAlloc is page aligned; a host-cache sub-allocation might not be
            raise RuntimeError(f"torch's pinned allocator returned {t.data_ptr():#x}, not 4 KiB aligned; "
                               "use PinnedPool(method='register')")
        return _Backing(t, None, hostalloc_pinned_bytes(nbytes), device)
    mm, t = _map_and_touch(nbytes, hugepages)
    if pinning:
        try:
            _register(t, device, budget)
        except BaseException:
            del t
            mm.close()
            raise
    return _Backing(t, mm, nbytes if pinning else 0, device)


def _empty_host_cache() -> None:
    fn = getattr(torch._C, "_accelerator_emptyHostCache", None) or getattr(torch._C, "_host_emptyCache", None)
    if fn is not None:
        fn()
