"""Micro-benchmark of page-locking host memory: the pool's methods side by side
(what ``benchmarks/bench_pinned.py`` and ``tierlift doctor`` report)."""

from __future__ import annotations

import os
import statistics
import time
from typing import Iterable, Sequence

import torch

from tierlift._configbase import check_choice
from tierlift.offload.host_alloc import (MAX_ROUNDING_WASTE, PAGE, _allocate, _Backing, _empty_host_cache,
                                     _has_cap_ipc_lock, _map_and_touch, _memlock_text, _register, _round_up,
                                     hostalloc_pinned_bytes)

__all__ = ["benchmark_pinning", "BENCH_METHODS"]


BENCH_METHODS = ("register", "register_4k", "hostalloc")


def benchmark_pinning(sizes: Iterable[int], *, methods: Sequence[str] = BENCH_METHODS,
                      device: torch.device | str | int | None = None, repeats: int = 3) -> dict:
    """Seconds and GiB/s (requested bytes / seconds, median of ``repeats``) to make ``size``
    bytes of page-locked host memory, per method.

    "register" is the pool's default path (map with huge pages + touch, then cudaHostRegister,
    phases timed apart), "register_4k" the same without huge pages, "hostalloc" torch's pinned
    allocator at the exact size on a cold cache -- even where the pool would refuse it, so the
    rounding shows in ``pinned_bytes``.  Without CUDA only map + touch is measured and
    ``pinned`` is false.  One warm-up registration first, so CUDA's lazy start is not timed."""
    pinning = torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda")
    dev = torch.device(device) if device is not None else torch.device("cuda" if pinning else "cpu")
    if pinning and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    for method in methods:
        check_choice("benchmark_pinning.methods", method, list(BENCH_METHODS))
    if pinning:
        _allocate(2 << 20, "register", True, dev, 0).release()
    rows = []
    for size in (int(s) for s in sizes):
        reserved = _round_up(size, PAGE)
        for method in methods:
            if method == "hostalloc" and not pinning:
                continue
            phases: dict[str, list[float]] = {}
            for _ in range(repeats):
                t0 = time.perf_counter()
                if method == "hostalloc":
                    _empty_host_cache()
                    t0 = time.perf_counter()
                    b = _allocate(size, method, True, dev, 0)
                else:
                    mm, t = _map_and_touch(reserved, hugepages=method == "register")
                    t1 = time.perf_counter()
                    if pinning:
                        _register(t, dev, 0)
                    b = _Backing(t, mm, reserved if pinning else 0, dev)
                    del mm, t
                    phases.setdefault("map_touch_s", []).append(t1 - t0)
                    phases.setdefault("register_s", []).append(time.perf_counter() - t1)
                phases.setdefault("total_s", []).append(time.perf_counter() - t0)
                t2 = time.perf_counter()
                b.release()
                if method == "hostalloc":
                    _empty_host_cache()
                phases.setdefault("release_s", []).append(time.perf_counter() - t2)
            med = {k: statistics.median(v) for k, v in phases.items()}
            held = hostalloc_pinned_bytes(size) if method == "hostalloc" else reserved
            rows.append(dict(method=method, bytes=size, pinned=pinning, repeats=repeats, **med,
                             gib_per_s=size / 2**30 / max(med["total_s"], 1e-9),
                             reserved_bytes=held, pinned_bytes=held if pinning else 0,
                             overhead_ratio=held / size,
                             pool_accepts=held <= size * (1 + MAX_ROUNDING_WASTE) or method != "hostalloc"))
    return dict(device=str(dev), pinned=pinning, torch=torch.__version__, memlock=_memlock_text(),
                root=os.geteuid() == 0, cap_ipc_lock=_has_cap_ipc_lock(), results=rows)
