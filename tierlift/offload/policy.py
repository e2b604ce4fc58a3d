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
from tierlift.errors import ConfigError

__all__ = ["NoOffload", "CPUOffload", "NVMeOffload", "AioConfig", "OffloadPolicy", "OffloadConfig",
           "params_offload_error"]


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
    backend: "threads" (pure Python, default) or "libaio" (DeepSpeed's op);
    single_submit: submit requests one at a time instead of in batches;
    overlap_events: overlap request submission with completion polling;
    use_gds: move data NVMe <-> GPU directly with GPUDirect Storage (needs a CUDA
    device and the libaio backend's GDS op), skipping the pinned host bounce."""

    block_size: int = 8 << 20
    queue_depth: int = 8
    threads: int = 8  # reads, writes and their CRC-32C share these; 4 left reads waiting behind writes
    backend: str = "threads"
    single_submit: bool = False
    overlap_events: bool = True
    use_gds: bool = False

    def __post_init__(self) -> None:
        check(self.block_size >= 4096 and self.block_size % 4096 == 0, "offload.aio.block_size",
              self.block_size, "must be a positive multiple of 4096 bytes.", "use 8388608 (8 MiB).")
        check(self.queue_depth >= 1, "offload.aio.queue_depth", self.queue_depth, "must be >= 1.", "use 8.")
        check(self.threads >= 1, "offload.aio.threads", self.threads, "must be >= 1.", "use 8.")
        check(self.backend in ("threads", "libaio"), "offload.aio.backend", self.backend,
              "must be 'threads' or 'libaio'.", "use 'threads' unless DeepSpeed's aio op is installed.")
        check(not self.use_gds or self.backend == "libaio", "offload.aio.use_gds", self.use_gds,
              f"needs backend 'libaio' (backend is {self.backend!r}); the threads backend reads "
              "through host memory.", "set backend: libaio, or use_gds: false.")


@dataclass
class NVMeOffload:
    """State lives in one preallocated extent file per rank under ``path``.

    buffer_count: pinned staging sets per rank (a set holds one piece of master and
    moments); buffer_size: elements per piece -- chunks are stepped through the
    sets piece by piece, so NVMe-resident state costs ``buffer_count x 12 B x
    buffer_size`` of host memory whatever the model size (0 = 16 Mi elements;
    rounded down to a multiple of 1024 so pieces start 4 KiB-aligned); max_in_cpu: elements whose state may stay in
    host memory before the rest goes to NVMe (0 = none); verify: check every read of the
    extent file against the CRC-32C recorded when it was written (computed on the I/O
    threads; a mismatch stops the run with an error naming file and extent);
    keep_files: leave the extent files (scratch: checkpoints hold the resumable state)
    in ``path`` when the process exits; by default they, and ``path`` itself when
    tierlift created it and it is empty, are removed (``offload/scratch.py``)."""

    KIND = "nvme"
    path: str = ""
    pin_memory: bool = True
    buffer_count: int = 8  # 8 x 192 MiB: enough read-ahead to keep a virtio disk busy (benchmarks/results/nvme_l1b_h100.md)
    buffer_size: int = 0
    max_in_cpu: int = 0
    verify: bool = True
    keep_files: bool = False
    aio: AioConfig = field(default_factory=AioConfig)

    def __post_init__(self) -> None:
        check(self.buffer_count >= 2, "offload.*.buffer_count", self.buffer_count,
              "must be >= 2 (double buffering).", "use 8.")
        check(self.buffer_size >= 0, "offload.*.buffer_size", self.buffer_size, "must be >= 0.",
              "use 0 for 16 Mi elements per piece.")
        check(self.max_in_cpu >= 0, "offload.*.max_in_cpu", self.max_in_cpu, "must be >= 0.", "use 0.")
        # The path last, after the numbers: so a tool that collects every error (deepspeed_compat)
        # reports bad numbers alongside a bad path instead of stopping at the path.
        check(bool(self.path), "offload.*.path", self.path, "an NVMe offload needs a directory.",
              "set path to a directory on a fast local disk, e.g. /tmp/tierlift-nvme.")
        check(not os.path.exists(self.path) or os.path.isdir(self.path), "offload.*.path", self.path,
              "exists and is not a directory.", "give a directory (it is created if missing).")
        # The directory is created at launch, so the nearest existing ancestor must be writable.
        parent = os.path.abspath(self.path)
        while not os.path.exists(parent):
            parent = os.path.dirname(parent)
        check(os.path.isdir(parent) and os.access(parent, os.W_OK | os.X_OK), "offload.*.path",
              self.path, f"is not writable (nearest existing directory: {parent}).",
              "choose a directory you can write to, on a fast local disk.")


OffloadPolicy = Union[NoOffload, CPUOffload, NVMeOffload]


def params_offload_error(param_kind: str, optimizer_kind: str) -> tuple[str, str, str] | None:
    """The parameter-offload rule, stated once (pure): why parameters on ``param_kind``
    cannot go with the optimizer state on ``optimizer_kind``, as (setting, message, fix),
    or None when they can.  Offloaded parameters are refreshed from the host optimizer's
    master (there is no device master to cast from), and parameters on NVMe live in the
    optimizer's extent file.  ``OffloadConfig`` checks it; the planner skips what it refuses."""
    if param_kind != "none" and optimizer_kind == "none":
        return ("offload.param", "offloading parameters needs the optimizer offloaded too.",
                "set offload.optimizer to cpu or nvme as well.")
    if param_kind == "nvme" and optimizer_kind != "nvme":
        return ("offload.optimizer.kind", "parameters on NVMe need the optimizer state on NVMe too (they share "
                "its extent file).", "set offload.optimizer: {kind: nvme, path: <offload.param.path>}.")
    return None


@dataclass
class OffloadConfig:
    """Where optimizer state (fp32 master, m, v) and parameters live, plus budgets
    per tier in bytes (0 = no explicit budget).

    grad_backlog_bytes: with the optimizer offloaded and no clipping, gradients wait
    on the device for their host step; backward blocks once this many bytes wait
    (one chunk's gradient is always admitted).  It is device memory: lower it when
    the GPU is tight, raise it when backward stalls on it (telemetry:
    ``hostopt_backlog_blocked_s``)."""

    optimizer: OffloadPolicy = field(default_factory=NoOffload)
    param: OffloadPolicy = field(default_factory=NoOffload)
    host_budget_bytes: int = 0
    gpu_budget_bytes: int = 0
    nvme_budget_bytes: int = 0
    grad_backlog_bytes: int = 4 << 30

    def __post_init__(self) -> None:
        for name in ("host_budget_bytes", "gpu_budget_bytes", "nvme_budget_bytes", "grad_backlog_bytes"):
            v = getattr(self, name)
            check(v >= 0, f"offload.{name}", v, "must be >= 0.", "use 0 for no explicit budget.")
        why = params_offload_error(self.param.KIND, self.optimizer.KIND)
        if why is not None:
            setting, msg, fix = why
            value = self.param.KIND if setting == "offload.param" else self.optimizer.KIND
            raise ConfigError(msg, setting=setting, value=value, fix=fix)
        if isinstance(self.param, NVMeOffload):
            check(os.path.abspath(self.param.path) == os.path.abspath(self.optimizer.path), "offload.param.path",
                  self.param.path, f"differs from offload.optimizer.path ({self.optimizer.path!r}): parameters "
                  "and optimizer state share one extent file per rank.",
                  f"set offload.param.path to {self.optimizer.path!r}.")
        if isinstance(self.optimizer, NVMeOffload) and isinstance(self.param, NVMeOffload):
            check(self.param.verify == self.optimizer.verify, "offload.param.verify", self.param.verify,
                  f"differs from offload.optimizer.verify ({self.optimizer.verify}); parameters on NVMe live in "
                  "the optimizer's extent file, whose reads one setting checks.", "set both to the same value.")

    @property
    def enabled(self) -> bool:
        return not (isinstance(self.optimizer, NoOffload) and isinstance(self.param, NoOffload))
