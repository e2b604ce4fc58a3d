"""Per-rank telemetry: a daemon thread that samples the node and records runtime events.

Files, in ``RUN_DIR/telemetry/`` (append-only parts; a part, once written, is never
rewritten, so a crash loses at most ``flush_interval_s`` of rows)::

    rank-{r}-part-{n:05d}.parquet         one row per sample (SAMPLE_SCHEMA)
    events-rank-{r}-part-{n:05d}.parquet  one row per event  (EVENT_SCHEMA)

Event kinds the report understands (``value`` unit in brackets; other fields go to
the ``detail`` JSON string): ``step_end`` [s] (step_time_s, loss), ``checkpoint`` [s],
``prefetch_issued`` / ``prefetch_hit`` / ``prefetch_miss`` [count], ``prefetch_stall``
[ms], ``swap`` [bytes] (tier, direction), ``optimizer_overlap`` [fraction of the
optimizer step hidden under backward], ``policy`` [-] (decision, reason),
``telemetry_overhead`` [fraction].  Any other kind is stored and tabulated as is.

Overhead is the sampler's CPU time (``time.thread_time``) over wall time: that is
what it takes from training (cores and the GIL).  NVML's PCIe counters block ~20 ms
in the driver per query, but ctypes releases the GIL there, so that wait is not
charged.  Prometheus (optional) serves the latest sample on
``prometheus_host:prometheus_port + local_rank`` -- one port per rank of a node.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import psutil

from tierlift._configbase import check
from tierlift.errors import LaunchError

__all__ = ["TelemetryConfig", "TelemetrySampler", "SAMPLE_SCHEMA", "EVENT_SCHEMA"]

log = logging.getLogger("tierlift.telemetry")

_MAX_BUFFERED = 100_000  # rows kept in memory if parts cannot be written (disk full): drop beyond
_CHILDREN_REFRESH_S = 10.0  # seconds between re-listing child processes (data loader workers)


@dataclass
class TelemetryConfig:
    """interval_s: seconds between samples; flush_interval_s: seconds between Parquet
    parts; prometheus_port: 0 = no endpoint, else rank r serves on port + local rank;
    prometheus_host: bind address (loopback unless you mean to expose it)."""

    enabled: bool = True
    interval_s: float = 0.5
    flush_interval_s: float = 30.0
    prometheus_port: int = 0
    prometheus_host: str = "127.0.0.1"

    def __post_init__(self) -> None:
        check(self.interval_s >= 0.01, "telemetry.interval_s", self.interval_s, "must be >= 0.01 s.",
              "use 0.5 (the default); sampling faster costs CPU and adds nothing at step granularity.")
        check(self.flush_interval_s > 0, "telemetry.flush_interval_s", self.flush_interval_s, "must be > 0.",
              "use 30 (seconds between Parquet parts).")
        check(0 <= self.prometheus_port < 65536, "telemetry.prometheus_port", self.prometheus_port,
              "must be a TCP port or 0.", "use 0 to disable the endpoint, or a free port such as 9400.")
        check(bool(self.prometheus_host), "telemetry.prometheus_host", self.prometheus_host,
              "must be an address.", "use 127.0.0.1 (the default) or 0.0.0.0 to expose the endpoint.")


def _schemas():
    import pyarrow as pa
    # Explicit schemas: a column that is null in one part (no GPU yet) keeps its type,
    # so parts concatenate.
    sample = pa.schema([
        ("time", pa.float64()),                  # unix seconds
        ("rank", pa.int32()),
        ("step", pa.int64()),                    # last optimizer step reported by an event
        ("host_rss_bytes", pa.int64()),          # this process + its children
        ("cpu_percent", pa.float64()),           # this process, 100 = one core
        ("sys_cpu_percent", pa.float64()),       # whole node, 100 = all cores
        ("disk_read_bytes_per_s", pa.float64()),   # node-wide, all disks
        ("disk_write_bytes_per_s", pa.float64()),
        ("pinned_bytes", pa.int64()),            # page-locked host bytes held by tierlift's pools
        ("gpu_alloc_bytes", pa.int64()),         # torch allocator, this rank's device
        ("gpu_mem_used_bytes", pa.int64()),      # NVML: whole device, every process
        ("gpu_util_percent", pa.float64()),      # NVML SM utilisation
        ("pcie_rx_kb_per_s", pa.float64()),      # NVML, KB/s into the GPU (H2D)
        ("pcie_tx_kb_per_s", pa.float64()),      # NVML, KB/s out of the GPU (D2H)
        ("overhead_fraction", pa.float64()),     # sampler CPU s / wall s so far
    ])
    event = pa.schema([("time", pa.float64()), ("step", pa.int64()), ("kind", pa.string()),
                       ("value", pa.float64()), ("detail", pa.string())])
    return sample, event


SAMPLE_SCHEMA, EVENT_SCHEMA = _schemas()


class _Nvml:
    """NVML handle for one CUDA device; every reading is None when NVML is unusable."""

    def __init__(self, device) -> None:
        self.h = None
        if device is None or getattr(device, "type", None) != "cuda":
            return
        try:
            import pynvml
            import torch
            pynvml.nvmlInit()
            self.nv = pynvml
            idx = device.index if device.index is not None else torch.cuda.current_device()
            try:
                # torch indexes visible devices, NVML all of them: match by UUID.
                uuid = str(torch.cuda.get_device_properties(idx).uuid)
                self.h = pynvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith("GPU-") else f"GPU-{uuid}")
            except Exception:
                visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
                ids = [v for v in visible.split(",") if v.strip()]
                phys = int(ids[idx]) if idx < len(ids) and ids[idx].strip().isdigit() else idx
                self.h = pynvml.nvmlDeviceGetHandleByIndex(phys)
        except Exception as exc:  # no driver, no pynvml, MIG without access...
            log.warning("telemetry: NVML unavailable (%s); GPU columns stay empty.", exc)
            self.h = None

    def read(self) -> dict[str, Any]:
        if self.h is None:
            return {}
        nv, out = self.nv, {}
        for key, fn in (("gpu_mem_used_bytes", lambda: int(nv.nvmlDeviceGetMemoryInfo(self.h).used)),
                        ("gpu_util_percent", lambda: float(nv.nvmlDeviceGetUtilizationRates(self.h).gpu)),
                        ("pcie_rx_kb_per_s", lambda: float(nv.nvmlDeviceGetPcieThroughput(
                            self.h, nv.NVML_PCIE_UTIL_RX_BYTES))),
                        ("pcie_tx_kb_per_s", lambda: float(nv.nvmlDeviceGetPcieThroughput(
                            self.h, nv.NVML_PCIE_UTIL_TX_BYTES)))):
            try:
                out[key] = fn()
            except Exception:  # e.g. NVML_ERROR_NOT_SUPPORTED for PCIe counters on some SKUs
                out[key] = None
        return out

    def close(self) -> None:
        if self.h is not None:
            try:
                self.nv.nvmlShutdown()
            except Exception:
                pass
            self.h = None


class _Prometheus:
    """Gauges in a private registry (several samplers may live in one process)."""

    def __init__(self, host: str, port: int, rank: int) -> None:
        try:
            from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server
        except ImportError:
            raise LaunchError("needs prometheus-client for the metrics endpoint.", setting="telemetry.prometheus_port",
                              value=port, fix="pip install 'tierlift[telemetry]', or set the port to 0.") from None
        self.reg = CollectorRegistry()
        self.gauges = {name: Gauge(f"tierlift_{name}", help_, ["rank"], registry=self.reg).labels(str(rank))
                       for name, help_ in _PROM_GAUGES.items()}
        self.events = Counter("tierlift_events", "runtime events recorded", ["rank", "kind"], registry=self.reg)
        self.rank = str(rank)
        try:
            self.server, self.thread = start_http_server(port, addr=host, registry=self.reg)
        except OSError as exc:
            raise LaunchError(f"cannot serve Prometheus metrics on {host}:{port} ({exc}).",
                              setting="telemetry.prometheus_port", value=port,
                              fix="pick a free port (rank r uses port + local rank) or 0 to disable.") from None
        self.port = self.server.server_port

    def update(self, row: dict[str, Any]) -> None:
        for name, gauge in self.gauges.items():
            if row.get(name) is not None:
                gauge.set(row[name])

    def count(self, kind: str) -> None:
        self.events.labels(self.rank, kind).inc()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


_PROM_GAUGES = {
    "step": "last optimizer step", "host_rss_bytes": "host RSS of the rank (+children), bytes",
    "cpu_percent": "rank CPU, 100 = one core", "disk_read_bytes_per_s": "node disk reads, bytes/s",
    "disk_write_bytes_per_s": "node disk writes, bytes/s", "pinned_bytes": "pinned host bytes held",
    "gpu_alloc_bytes": "torch-allocated GPU bytes", "gpu_mem_used_bytes": "NVML used GPU bytes",
    "gpu_util_percent": "GPU SM utilisation, percent", "pcie_rx_kb_per_s": "PCIe into the GPU, KB/s",
    "pcie_tx_kb_per_s": "PCIe out of the GPU, KB/s", "overhead_fraction": "sampler CPU time / wall time",
}


class TelemetrySampler:
    """Samples every ``cfg.interval_s`` on a daemon thread; ``event()`` from any thread.

    ``pinned_bytes``: a callable returning the pinned host bytes held (the caller
    knows its pools).  Disabled (every method a no-op) when ``cfg.enabled`` is false,
    or when there is neither a run directory nor a Prometheus port.
    """

    def __init__(self, run_dir: str | None, rank: int = 0, local_rank: int = 0, device=None,
                 cfg: TelemetryConfig | None = None, pinned_bytes: Callable[[], int] | None = None) -> None:
        self.cfg = cfg or TelemetryConfig()
        self.rank, self.local_rank, self.device = rank, local_rank, device
        self.pinned_fn = pinned_bytes
        self.enabled = self.cfg.enabled and (run_dir is not None or self.cfg.prometheus_port > 0)
        self.dir = os.path.join(run_dir, "telemetry") if run_dir and self.enabled else None
        self.step = 0
        self._rows: list[dict[str, Any]] = []
        self._events: list[dict[str, Any]] = []
        self._lock = threading.Lock()        # guards _rows, _events, step and the part counters
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._cpu_s = 0.0                    # sampler CPU seconds (thread_time), for overhead
        self._t0 = self._t_end = None        # perf_counter at start / stop
        self._last_flush = 0.0
        self._prev_disk = None               # (perf_counter, read_bytes, write_bytes)
        self._proc = psutil.Process()
        self._children: list[psutil.Process] = []
        self._children_t = -_CHILDREN_REFRESH_S
        self._nvml = self._prom = None
        self.prometheus_port: int | None = None
        if self.dir:
            os.makedirs(self.dir, exist_ok=True)
            self._part = self._next_part(f"rank-{rank}-part-")
            self._epart = self._next_part(f"events-rank-{rank}-part-")

    def _next_part(self, prefix: str) -> int:
        # Resumed runs append after the parts already there.
        nums = [int(n[len(prefix):-len(".parquet")]) for n in os.listdir(self.dir)
                if n.startswith(prefix) and n.endswith(".parquet") and n[len(prefix):-len(".parquet")].isdigit()]
        return max(nums) + 1 if nums else 0

    # -- lifecycle ---------------------------------------------------------------
    def start(self) -> "TelemetrySampler":
        if not self.enabled or self._thread is not None:
            return self
        if self.cfg.prometheus_port:
            self._prom = _Prometheus(self.cfg.prometheus_host, self.cfg.prometheus_port + self.local_rank, self.rank)
            self.prometheus_port = self._prom.port
        self._nvml = _Nvml(self.device)
        self._proc.cpu_percent(None)  # prime: psutil's first cpu_percent reads 0
        psutil.cpu_percent(None)
        self._t0 = self._last_flush = time.perf_counter()
        self._timed(lambda: self._sample(first=True))  # memory at start; rates need a second sample
        self._thread = threading.Thread(target=self._loop, name=f"tierlift-telemetry-{self.rank}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Take a last sample, write what is buffered, close NVML and the endpoint.  Idempotent."""
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join(timeout=self.cfg.interval_s + 10)
        self._thread = None
        self._timed(self._sample)
        self.event("telemetry_overhead", value=self.overhead_fraction())
        self._t_end = time.perf_counter()
        self._timed(self.flush)
        if self._nvml is not None:
            self._nvml.close()
        if self._prom is not None:
            self._prom.close()
            self._prom = None

    def __enter__(self) -> "TelemetrySampler":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _loop(self) -> None:
        while not self._stop.wait(self.cfg.interval_s):
            try:
                self._timed(self._sample)
                if time.perf_counter() - self._last_flush >= self.cfg.flush_interval_s:
                    self._timed(self.flush)
            except Exception as exc:  # telemetry must never take training down
                log.warning("telemetry sample failed: %s", exc, exc_info=True)

    def _timed(self, fn: Callable[[], None]) -> None:
        c0 = time.thread_time()
        try:
            fn()
        finally:
            self._cpu_s += time.thread_time() - c0

    def overhead_fraction(self) -> float:
        """Sampler CPU seconds / wall seconds since start (0.0 before start)."""
        if self._t0 is None:
            return 0.0
        wall = (self._t_end or time.perf_counter()) - self._t0
        return self._cpu_s / wall if wall > 0 else 0.0

    # -- sampling ----------------------------------------------------------------
    def _sample(self, first: bool = False) -> None:
        now, t = time.time(), time.perf_counter()
        row: dict[str, Any] = {"time": now, "rank": self.rank, "step": self.step}
        try:
            rss = self._proc.memory_info().rss
            if t - self._children_t >= _CHILDREN_REFRESH_S:
                # Listing children scans all of /proc (~1.5 ms per 100 pids): not every sample.
                self._children, self._children_t = self._proc.children(recursive=True), t
            for child in self._children:
                try:
                    rss += child.memory_info().rss
                except psutil.Error:
                    pass  # exited since it was listed
            row["host_rss_bytes"] = rss
            if not first:  # psutil's cpu_percent is a rate since its previous call (primed in start)
                row["cpu_percent"] = self._proc.cpu_percent(None)
        except psutil.Error:
            pass
        if not first:
            row["sys_cpu_percent"] = psutil.cpu_percent(None)
        disk = psutil.disk_io_counters()  # None in some containers
        if disk is not None:
            if self._prev_disk is not None and t > self._prev_disk[0]:
                dt = t - self._prev_disk[0]
                row["disk_read_bytes_per_s"] = max(0, disk.read_bytes - self._prev_disk[1]) / dt
                row["disk_write_bytes_per_s"] = max(0, disk.write_bytes - self._prev_disk[2]) / dt
            self._prev_disk = (t, disk.read_bytes, disk.write_bytes)
        if self.pinned_fn is not None:
            try:
                row["pinned_bytes"] = int(self.pinned_fn())
            except Exception:
                pass  # the pool may be closing
        if self.device is not None and getattr(self.device, "type", None) == "cuda":
            import torch
            if torch.cuda.is_initialized():
                row["gpu_alloc_bytes"] = torch.cuda.memory_allocated(self.device)
        if self._nvml is not None:
            row.update(self._nvml.read())
        row["overhead_fraction"] = self.overhead_fraction()
        prom = self._prom
        if prom is not None:
            prom.update(row)
        with self._lock:
            if len(self._rows) < _MAX_BUFFERED:
                self._rows.append(row)

    def event(self, kind: str, value: float | None = None, step: int | None = None, **fields: Any) -> None:
        """Record a runtime event (any thread).  ``step`` defaults to the last step seen;
        ``fields`` are stored as a JSON string in ``detail``."""
        if not self.enabled:
            return
        row = {"time": time.time(), "kind": str(kind), "value": None if value is None else float(value),
               "detail": json.dumps(fields, default=str, sort_keys=True) if fields else None}
        with self._lock:
            if step is not None:
                self.step = max(self.step, int(step))
            row["step"] = self.step if step is None else int(step)
            if len(self._events) < _MAX_BUFFERED:
                self._events.append(row)
        prom = self._prom  # stop() may clear it from another thread
        if prom is not None:
            prom.count(str(kind))
            if step is not None:
                prom.gauges["step"].set(self.step)

    # -- files -------------------------------------------------------------------
    def flush(self) -> None:
        """Write buffered samples and events as new parts (never touching old ones)."""
        self._last_flush = time.perf_counter()
        if self.dir is None:
            self._rows, self._events = [], []
            return
        with self._lock:
            rows, self._rows = self._rows, []
            events, self._events = self._events, []
            part, epart = self._part, self._epart
            self._part += bool(rows)
            self._epart += bool(events)
        try:
            if rows:
                self._write(rows, SAMPLE_SCHEMA, f"rank-{self.rank}-part-{part:05d}.parquet")
            if events:
                self._write(events, EVENT_SCHEMA, f"events-rank-{self.rank}-part-{epart:05d}.parquet")
        except OSError as exc:
            log.warning("telemetry: cannot write to %s (%s); %d samples and %d events dropped.",
                        self.dir, exc, len(rows), len(events))

    def _write(self, rows: list[dict[str, Any]], schema, name: str) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq
        batch = pa.RecordBatch.from_pylist(rows, schema=schema)
        path = os.path.join(self.dir, name)
        pq.write_table(pa.Table.from_batches([batch], schema=schema), path + ".tmp")
        os.replace(path + ".tmp", path)  # readers never see half a part
