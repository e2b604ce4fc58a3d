"""Offload policies: where optimizer state and parameters live outside the GPU.

Typed policies, not flags: ``NoOffload()``, ``CPUOffload(pin_memory=True)``,
``NVMeOffload(path="/nvme/run1")``.  In YAML a policy is a mapping tagged by
``kind: none | cpu | nvme``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Union

from tierlift._configbase import check

__all__ = ["NoOffload", "CPUOffload", "NVMeOffload", "AioConfig", "OffloadPolicy", "OffloadConfig"]


@dataclass
class NoOffload:
    """State stays on the compute device."""

    KIND = "none"


@dataclass
class CPUOffload:
    """State lives in host memory; pinned (page-locked) for fast DMA by default."""

    KIND = "cpu"
    pin_memory: bool = True


@dataclass
class AioConfig:
    """NVMe I/O engine knobs (DeepSpeed's top-level ``aio`` maps here).

    block_size: bytes per request (>= 1 MiB recommended, multiple of 4096);
    queue_depth: requests in flight per thread; threads: I/O worker threads;
    backend: "threads" (pure Python, default) or "libaio" (DeepSpeed's op)."""

    block_size: int = 8 << 20
    queue_depth: int = 8
    threads: int = 4
    backend: str = "threads"
    single_submit: bool = False
    overlap_events: bool = True

    def __post_init__(self) -> None:
        check(self.block_size >= 4096 and self.block_size % 4096 == 0, "offload.aio.block_size",
              self.block_size, "must be a positive multiple of 4096 bytes.", "use 8388608 (8 MiB).")
        check(self.queue_depth >= 1, "offload.aio.queue_depth", self.queue_depth, "must be >= 1.", "use 8.")
        check(self.threads >= 1, "offload.aio.threads", self.threads, "must be >= 1.", "use 4.")
        check(self.backend in ("threads", "libaio"), "offload.aio.backend", self.backend,
              "must be 'threads' or 'libaio'.", "use 'threads' unless DeepSpeed's aio op is installed.")


@dataclass
class NVMeOffload:
    """State lives in one preallocated extent file per rank under ``path``.

    buffer_count: pinned staging buffers per rank; max_in_cpu: elements that may
    stay in host memory before spilling to NVMe (0 = none)."""

    KIND = "nvme"
    path: str = ""
    pin_memory: bool = True
    buffer_count: int = 4
    max_in_cpu: int = 0
    aio: AioConfig = field(default_factory=AioConfig)

    def __post_init__(self) -> None:
        check(bool(self.path), "offload.*.path", self.path, "an NVMe offload needs a directory.",
              "set path to a directory on a fast local disk, e.g. /tmp/tierlift-nvme.")
        parent = self.path
        while parent and not os.path.exists(parent):
            parent = os.path.dirname(parent.rstrip("/")) or ""
        check(bool(parent) and os.access(parent, os.W_OK), "offload.*.path", self.path,
              "is not writable.", "choose a directory you can write to.")
        check(self.buffer_count >= 2, "offload.*.buffer_count", self.buffer_count,
              "must be >= 2 (double buffering).", "use 4.")
        check(self.max_in_cpu >= 0, "offload.*.max_in_cpu", self.max_in_cpu, "must be >= 0.", "use 0.")


OffloadPolicy = Union[NoOffload, CPUOffload, NVMeOffload]


@dataclass
class OffloadConfig:
    """Where optimizer state (fp32 master, m, v) and parameters live, plus budgets
    per tier in bytes (0 = no explicit budget)."""

    optimizer: OffloadPolicy = field(default_factory=NoOffload)
    param: OffloadPolicy = field(default_factory=NoOffload)
    host_budget_bytes: int = 0
    gpu_budget_bytes: int = 0
    nvme_budget_bytes: int = 0

    def __post_init__(self) -> None:
        for name in ("host_budget_bytes", "gpu_budget_bytes", "nvme_budget_bytes"):
            v = getattr(self, name)
            check(v >= 0, f"offload.{name}", v, "must be >= 0.", "use 0 for no explicit budget.")

    @property
    def enabled(self) -> bool:
        return not (isinstance(self.optimizer, NoOffload) and isinstance(self.param, NoOffload))
