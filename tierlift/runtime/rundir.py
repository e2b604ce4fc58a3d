"""The run directory, per-step metrics in Parquet, memory readings and the progress bar.

Layout of a run directory::

    config.yaml            resolved config (every default shown)
    train.log              rank 0's log
    metrics/part-*.parquet one row per optimizer step (appended in parts: a crash loses
                           at most the rows since the last flush, never earlier parts)
    checkpoints/step-*     sharded checkpoints (see checkpoint.py)
    summary.json           what fit() returned
"""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Any

import psutil
import torch

from tierlift.parallel.env import RANK_PREFIX_ENV
from tierlift.runtime.metrics_parts import latest_rows

__all__ = ["MetricsWriter", "MemoryMeter", "Progress", "setup_logging", "write_json_atomic"]

log = logging.getLogger("tierlift")


class RunLogHandler(logging.FileHandler):
    """``train.log``.  A record it cannot write (a full disk) costs one warning on
    stderr and turns the file off, instead of logging's traceback per record; the
    console handler still gets every warning and error."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.failed = False

    def emit(self, record: logging.LogRecord) -> None:
        if not self.failed:
            super().emit(record)

    def handleError(self, record: logging.LogRecord) -> None:
        if self.failed:
            return
        self.failed = True
        exc = sys.exc_info()[1]
        why = getattr(exc, "strerror", None) or exc
        sys.stderr.write(f"tierlift: warning: cannot write {self.baseFilename} ({why}); "
                         "the log continues on the console only.\n")

    def close(self) -> None:
        try:
            super().close()
        except OSError:  # bytes still buffered for the full disk: already warned about, or moot now
            pass


class _ConsoleHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record arrives.  Logging is set up once
    per process, and a caller may replace stderr afterwards (pytest's capture, a notebook,
    a launcher's tee): a handler holding the old stream would write to a closed file."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns it; the property decides
        pass


def setup_logging(run_dir: str | None, rank: int) -> None:
    """rank 0 logs INFO to the console and to run_dir/train.log; other ranks warn only."""
    root = logging.getLogger("tierlift")
    if getattr(root, "_tierlift_configured", False):
        return
    root.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    fmt = logging.Formatter(f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s")
    # Under a tierlift launcher with several ranks every console line already starts with
    # "[rank N] " (launch/local.py), so the console format leaves the rank out.
    console_fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s") \
        if os.environ.get(RANK_PREFIX_ENV) == "1" else fmt
    if run_dir and rank == 0:
        os.makedirs(run_dir, exist_ok=True)
        fh = RunLogHandler(os.path.join(run_dir, "train.log"))
        fh.setFormatter(fmt)
        root.addHandler(fh)
    sh = _ConsoleHandler()
    sh.setFormatter(console_fmt)
    sh.setLevel(logging.WARNING)  # the progress bar carries the per-step numbers on the console
    root.addHandler(sh)
    root.propagate = False
    root._tierlift_configured = True


def write_json_atomic(path: str, obj: Any) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class MetricsWriter:
    """Buffers per-step rows and appends them to ``metrics/part-NNNNN.parquet``."""

    def __init__(self, run_dir: str | None) -> None:
        self.dir = os.path.join(run_dir, "metrics") if run_dir else None
        self.rows: list[dict[str, Any]] = []
        if self.dir:
            os.makedirs(self.dir, exist_ok=True)
            self.part = len([n for n in os.listdir(self.dir) if n.endswith(".parquet")])

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append(row)

    def flush(self) -> None:
        if not self.dir or not self.rows:
            self.rows = []
            return
        import pyarrow as pa
        import pyarrow.parquet as pq
        table = pa.Table.from_pylist(self.rows)
        path = os.path.join(self.dir, f"part-{self.part:05d}.parquet")
        pq.write_table(table, path + ".tmp")
        os.replace(path + ".tmp", path)
        self.part += 1
        self.rows = []


def read_metrics(run_dir: str):
    """All metric rows of a run as a pyarrow Table (parts concatenated in order); after a
    resume, the re-run steps' rows replace the earlier ones (``metrics_parts.latest_rows``)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = os.path.join(run_dir, "metrics")
    parts = sorted(n for n in os.listdir(d) if n.endswith(".parquet"))
    tables = latest_rows([pq.read_table(os.path.join(d, n)) for n in parts])
    # Parts written by different versions or runs may differ in columns: missing ones read as null.
    return pa.concat_tables(tables, promote_options="default")


class MemoryMeter:
    """Peak memory per tier: GPU (allocator), host RSS (this process), pinned bytes."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.proc = psutil.Process()
        self.peak_rss = 0
        self.pinned_bytes = 0  # reported by the pinned pool once host tiers are in use

    def sample(self) -> dict[str, int]:
        rss = self.proc.memory_info().rss
        self.peak_rss = max(self.peak_rss, rss)
        out = {"host_rss_bytes": rss, "pinned_bytes": self.pinned_bytes}
        if self.device.type == "cuda":
            out["gpu_alloc_bytes"] = torch.cuda.memory_allocated(self.device)
            out["gpu_reserved_bytes"] = torch.cuda.memory_reserved(self.device)
        return out

    def peaks(self) -> dict[str, int]:
        out = {"peak_host_rss_bytes": self.peak_rss, "pinned_bytes": self.pinned_bytes}
        if self.device.type == "cuda":
            out["peak_gpu_alloc_bytes"] = torch.cuda.max_memory_allocated(self.device)
            out["peak_gpu_reserved_bytes"] = torch.cuda.max_memory_reserved(self.device)
        return out


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f}G"


class Progress:
    """tqdm bar on rank 0: loss, tokens/s and memory per tier."""

    def __init__(self, total: int, initial: int, enabled: bool) -> None:
        self.bar = None
        if enabled:
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, file=sys.stderr,
                            mininterval=0.5)

    def update(self, loss: float, tokens_per_s: float, mem: dict[str, int]) -> None:
        if self.bar is None:
            return
        post = {"loss": f"{loss:.4f}", "tok/s": f"{tokens_per_s:,.0f}", "rss": _gib(mem["host_rss_bytes"])}
        if "gpu_alloc_bytes" in mem:
            post["gpu"] = _gib(mem["gpu_alloc_bytes"])
        if mem.get("pinned_bytes"):
            post["pinned"] = _gib(mem["pinned_bytes"])
        self.bar.set_postfix(post, refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
