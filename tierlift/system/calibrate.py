"""Calibration: short micro-benchmarks of the speeds the planner needs, cached per node.

``calibrate(profile)`` measures pinned H2D / D2H copies (and both at once), disk
read / write through our own :class:`~tierlift.offload.nvme.NVMeFile` at the
engine's request size, fused AdamW on CPU and GPU, and optionally the forward and
backward time of each wrap unit of the real model.  Each benchmark repeats until
``target_s`` has passed (0.5 s quick, 2 s full; one call that alone takes longer
is its own measurement), so a slow machine costs a little more time, not a
timeout.  GPU benchmarks are skipped without CUDA and recorded as None.

Units: GB/s are 1e9 bytes per second (as in the planner's ``NodeRates``); AdamW rates are
fp32 parameters stepped per second; unit times are seconds per call.

``load_or_calibrate`` keeps one JSON file per (node fingerprint, NVMe directory,
request size) under ``$TIERLIFT_CACHE_DIR`` or ``~/.cache/tierlift``: a changed
GPU, driver, torch build or disk gives a new fingerprint and so a fresh
calibration.  The file is locked while it is made, so the ranks of one node do
not benchmark at the same time (they would measure each other).
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch

from tierlift.offload.extents import plan_extents
from tierlift.offload.nvme import NVMeError, NVMeFile, aligned_empty
from tierlift.offload.memory import MemoryOwner
from tierlift.offload.pinned import PinnedMemoryError
from tierlift.offload.policy import AioConfig
from tierlift.system.probe import NodeProfile, probe_node

__all__ = ["Calibration", "calibrate", "load_or_calibrate", "load_cached", "measure_units", "measure_disk",
           "default_cache_dir"]

_FORMAT = "tierlift-calibration/1"
_TARGET_S = {True: 0.5, False: 2.0}  # seconds per benchmark: quick / full
# Sizes (bytes / params) large enough to reach steady state: far beyond the L3 cache,
# >= 4 MiB per copy (below that PCIe copies are latency bound on the H100 node).
_COPY_BYTES = {True: 256 << 20, False: 1 << 30}
_DISK_EXTENT = {True: (4, 32 << 20), False: (8, 64 << 20)}  # (extents in flight, bytes each) per round
# Working sets (16 B/param: p, g, m, v) far beyond any last-level cache: a cached 8 Mi run
# measured 9.1 G/s on the H100 host where 64 Mi runs -- what a real chunk sees -- give 5.5.
_CPU_ADAM_PARAMS = {True: 64 << 20, False: 128 << 20}
_GPU_ADAM_PARAMS = {True: 64 << 20, False: 256 << 20}


@dataclass(frozen=True)
class Calibration:
    """Measured speeds of one node.  None = not measured (no GPU, no NVMe path)."""

    h2d_gbps: float | None = None  # pinned host -> GPU
    d2h_gbps: float | None = None  # GPU -> pinned host
    duplex_gbps: float | None = None  # both directions at once, summed
    disk_read_gbps: float | None = None
    disk_write_gbps: float | None = None
    disk_direct: bool | None = None  # False: the filesystem refused O_DIRECT (buffered + fsync measured)
    cpu_adamw_params_per_s: float | None = None
    gpu_adamw_params_per_s: float | None = None
    unit_fwd_s: dict[str, float] | None = None
    unit_bwd_s: dict[str, float] | None = None
    cpu_threads: int = 0  # torch intra-op threads the CPU AdamW ran with
    block_size: int = 8 << 20  # bytes per disk request
    nvme_path: str | None = None
    quick: bool = True
    fingerprint: str = ""  # NodeProfile.fingerprint() of the node measured
    created_unix: float = 0.0
    seconds: float = 0.0  # wall time the calibration took

    def to_dict(self) -> dict[str, Any]:
        return {"format": _FORMAT, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Calibration":
        d = dict(d)
        if d.pop("format", None) != _FORMAT:
            raise ValueError(f"not a {_FORMAT} document")
        if not isinstance(d.get("fingerprint"), str) or not d["fingerprint"]:
            raise ValueError("no fingerprint: cannot tell which node it was measured on")
        for k, v in d.items():  # a hand-edited or truncated file must not feed the planner nonsense
            if k.endswith(("_gbps", "_per_s")) and not (v is None or (isinstance(v, (int, float)) and v > 0)):
                raise ValueError(f"{k}={v!r} is not a positive number")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


# -- timing -----------------------------------------------------------------------------------------
def _per_call(fn: Callable[[], Any], target_s: float, sync: Callable[[], Any] = lambda: None) -> float:
    """Seconds per call of ``fn``: one warm-up call, then calls until ``target_s`` passed.
    A warm-up that alone exceeds the target is taken as the measurement."""
    t0 = time.perf_counter()
    fn()
    sync()
    first = time.perf_counter() - t0
    if first >= target_s:
        return first
    n, t0 = 0, time.perf_counter()
    while True:
        fn()
        sync()
        n += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= target_s:
            return elapsed / n


def _adamw_rate(n: int, device: torch.device, target_s: float, sync: Callable[[], Any]) -> float:
    """fp32 params per second of one fused AdamW step over ``n`` params (as offload/shard_optim.py calls it)."""
    p, g = torch.rand(n, device=device), torch.randn(n, device=device).mul_(1e-3)
    m, v = torch.zeros(n, device=device), torch.zeros(n, device=device)
    step = torch.zeros((), dtype=torch.float32, device=device)

    def one() -> None:
        torch._fused_adamw_([p], [g], [m], [v], [], [step], lr=1e-4, beta1=0.9, beta2=0.999,
                            weight_decay=0.01, eps=1e-8, amsgrad=False, maximize=False)
    return n / _per_call(one, target_s, sync)


# -- PCIe copies ------------------------------------------------------------------------------------
def _copies(memory: MemoryOwner, nbytes: int, dev: torch.device, target_s: float) -> tuple[float, float, float]:
    h1, h2 = memory.pool.slab(nbytes).tensor, memory.pool.slab(nbytes).tensor
    d1, d2 = torch.empty(nbytes, dtype=torch.uint8, device=dev), torch.empty(nbytes, dtype=torch.uint8, device=dev)
    sync = torch.cuda.synchronize  # every call waits for all streams: no cross-stream hazards between calls
    h2d = nbytes / _per_call(lambda: d1.copy_(h1, non_blocking=True), target_s, sync) / 1e9
    d2h = nbytes / _per_call(lambda: h2.copy_(d2, non_blocking=True), target_s, sync) / 1e9
    s1, s2 = memory.stream("h2d"), memory.stream("d2h")  # the roles' streams, as a run has them

    def both() -> None:  # one copy per direction on its own stream, as the engine overlaps them
        with torch.cuda.stream(s1):
            d1.copy_(h1, non_blocking=True)
        with torch.cuda.stream(s2):
            h2.copy_(d2, non_blocking=True)
    duplex = 2 * nbytes / _per_call(both, target_s, sync) / 1e9
    return h2d, d2h, duplex  # the views die here, before the pool unpins and unmaps the slabs


def _copy_rates(nbytes: int, target_s: float) -> tuple[float, float, float]:
    """(H2D, D2H, duplex) GB/s between GPU memory and exact-size pinned slabs of our pool
    (what the engine copies from; torch's pinned allocator would round and keep them)."""
    dev = torch.device("cuda", torch.cuda.current_device())
    try:
        memory = MemoryOwner(dev, 2 * nbytes)
        memory.pool  # created here: the memlock check runs now
    except PinnedMemoryError as e:  # memlock too low for 2 buffers: still measure, smaller
        warnings.warn(f"calibration: cannot pin {2 * nbytes} bytes ({e}); measuring with 1/16 of that")
        nbytes //= 16
        memory = MemoryOwner(dev, 2 * nbytes)
    try:
        return _copies(memory, nbytes, dev, target_s)
    finally:
        memory.close()  # synchronizes first: no DMA may touch the slabs when the pool unpins them


# -- disk -------------------------------------------------------------------------------------------
def measure_disk(path: str, *, quick: bool = True, block_size: int = 8 << 20,
                 target_s: float | None = None) -> tuple[float, float, bool]:
    """(read GB/s, write GB/s, O_DIRECT used) through NVMeFile (threads backend) on a temp
    file in a fresh subdirectory of ``path`` (never touching a running job's extent file),
    deleted afterwards.  Checksums off: this measures the disk, not the checksum."""
    count, extent = _DISK_EXTENT[bool(quick)]
    target_s = _TARGET_S[bool(quick)] if target_s is None else target_s
    setting = "nvme_path"
    try:
        free = shutil.disk_usage(path).free
        tmp = tempfile.mkdtemp(prefix=".tierlift-calibrate-", dir=path)
    except OSError as e:
        raise NVMeError(f"cannot create a benchmark directory there: {e.strerror}.", setting=setting, value=path,
                        fix="give an existing, writable directory on the disk of the NVMe tier.") from e
    if free < 2 * count * extent:
        shutil.rmtree(tmp, ignore_errors=True)
        raise NVMeError(f"only {free} bytes free; the disk benchmark needs {2 * count * extent}.",
                        setting=setting, value=path, fix="free space there or calibrate another directory.")
    try:
        plan = plan_extents([(i, extent) for i in range(count)])
        buf = aligned_empty(count * extent)
        buf.view(torch.int64).random_()  # incompressible, so compressing/deduplicating storage cannot cheat
        views = [buf[i * extent:(i + 1) * extent] for i in range(count)]
        with NVMeFile(tmp, 0, plan, AioConfig(block_size=block_size), checksum=False, keep=False,
                      setting=setting) as f:
            fd = os.open(f.path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                def write_round() -> None:
                    for h in [f.write(i, views[i]) for i in range(count)]:
                        h.wait()
                    if not f.direct:  # buffered writes only reach the page cache: include the flush
                        os.fsync(fd)

                def read_round() -> None:
                    if not f.direct:  # drop cached pages, or we would time memory copies
                        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                    for h in [f.read(i, views[i]) for i in range(count)]:
                        h.wait()
                write = count * extent / _per_call(write_round, target_s) / 1e9
                read = count * extent / _per_call(read_round, target_s) / 1e9
                return read, write, f.direct
            finally:
                os.close(fd)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# -- model units ------------------------------------------------------------------------------------
def _first_tensor(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    for v in (out.values() if isinstance(out, Mapping) else out):
        if isinstance(v, torch.Tensor):
            return v
    raise TypeError(f"unit output {type(out).__name__} holds no tensor to backpropagate from")


def measure_units(units: Mapping[str, tuple[torch.nn.Module, Any]], *, target_s: float = 0.5
                  ) -> tuple[dict[str, float], dict[str, float]]:
    """Forward and backward seconds per call of each wrap unit: ``units[name] = (module,
    args)`` with ``args`` a tensor or tuple on the unit's device (set ``requires_grad`` on
    inputs whose gradient training needs: the cost is in the backward).  Backward =
    (forward + backward) - forward.  Gradients the runs left in the module are cleared."""
    fwd, bwd = {}, {}
    for name, (mod, args) in units.items():
        args = args if isinstance(args, tuple) else (args,)
        cuda = [a.device for a in args if isinstance(a, torch.Tensor) and a.is_cuda]
        sync = (lambda d=cuda[0]: torch.cuda.synchronize(d)) if cuda else (lambda: None)
        with torch.enable_grad():
            t_f = _per_call(lambda: mod(*args), target_s, sync)
            t_fb = _per_call(lambda: _first_tensor(mod(*args)).float().sum().backward(), target_s, sync)
        mod.zero_grad(set_to_none=True)
        for a in args:
            if isinstance(a, torch.Tensor):
                a.grad = None
        fwd[name], bwd[name] = t_f, max(t_fb - t_f, 0.0)
    return fwd, bwd


# -- entry points -----------------------------------------------------------------------------------
def calibrate(profile: NodeProfile, *, nvme_path: str | None = None, quick: bool = True,
              block_size: int = 8 << 20, units: Mapping[str, tuple[torch.nn.Module, Any]] | None = None
              ) -> Calibration:
    """Run the micro-benchmarks on this node.  ``nvme_path`` defaults to ``profile.nvme``'s
    path; without one the disk is not measured.  ``quick``: ~0.5 s per benchmark (else ~2 s)."""
    AioConfig(block_size=block_size)  # validates it, naming offload.aio.block_size
    t0, target = time.perf_counter(), _TARGET_S[bool(quick)]
    if nvme_path is None and profile.nvme is not None:
        nvme_path = profile.nvme.path
    nvme_path = os.path.abspath(os.path.expanduser(nvme_path)) if nvme_path else None
    r: dict[str, Any] = {}
    if nvme_path:
        r["disk_read_gbps"], r["disk_write_gbps"], r["disk_direct"] = measure_disk(nvme_path, quick=quick,
                                                                                  block_size=block_size)
    r["cpu_adamw_params_per_s"] = _adamw_rate(_CPU_ADAM_PARAMS[quick], torch.device("cpu"), target, lambda: None)
    if torch.cuda.is_available():
        r["h2d_gbps"], r["d2h_gbps"], r["duplex_gbps"] = _copy_rates(_COPY_BYTES[quick], target)
        dev = torch.device("cuda", torch.cuda.current_device())
        r["gpu_adamw_params_per_s"] = _adamw_rate(_GPU_ADAM_PARAMS[quick], dev, target, torch.cuda.synchronize)
        torch.cuda.empty_cache()  # hand the benchmark's GPU memory back before training allocates
    if units:
        r["unit_fwd_s"], r["unit_bwd_s"] = measure_units(units, target_s=target)
    return Calibration(**r, cpu_threads=torch.get_num_threads(), block_size=block_size, nvme_path=nvme_path,
                       quick=bool(quick), fingerprint=profile.fingerprint(), created_unix=time.time(),
                       seconds=time.perf_counter() - t0)


def load_cached(profile: NodeProfile, *, nvme_path: str | None = None, block_size: int = 8 << 20,
                cache_dir: str | None = None) -> tuple[Calibration | None, str]:
    """This node's cached calibration for ``nvme_path`` without measuring anything:
    (the numbers or None, the cache file's path).  What ``tierlift plan`` reads."""
    nvme = os.path.abspath(os.path.expanduser(nvme_path)) if nvme_path else None
    path = _cache_path(cache_dir or default_cache_dir(), profile.fingerprint(), nvme, block_size)
    cal, _ = _read_cache(path, profile.fingerprint(), True)
    return cal, path


def default_cache_dir() -> str:
    return os.environ.get("TIERLIFT_CACHE_DIR") or os.path.join("~", ".cache", "tierlift")


def _cache_path(cache_dir: str, fp: str, nvme_path: str | None, block_size: int) -> str:
    key = hashlib.sha256(f"{fp}|{nvme_path}|{block_size}".encode()).hexdigest()[:16]
    return os.path.join(os.path.expanduser(cache_dir), f"calibration-{key}.json")


def _read_cache(path: str, fp: str, quick: bool) -> tuple[Calibration | None, dict]:
    """(the node's cached numbers if usable, the file's unit times per model key).
    A corrupt file warns and counts as a miss; it is rewritten after calibrating."""
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
        cal = Calibration.from_dict(doc["calibration"])
        models = {str(k): (dict(v["fwd"]), dict(v["bwd"])) for k, v in (doc.get("units") or {}).items()}
    except FileNotFoundError:
        return None, {}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        warnings.warn(f"ignoring the unreadable calibration cache {path} ({type(e).__name__}: {e}); "
                      "calibrating again and rewriting it.")
        return None, {}
    if cal.fingerprint != fp:  # not this node's file (copied in from elsewhere)
        return None, {}
    return (None if cal.quick and not quick else cal), models  # a full run was asked for: redo


def load_or_calibrate(profile: NodeProfile | None = None, *, cache_dir: str | None = None,
                      nvme_path: str | None = None, quick: bool = True, block_size: int = 8 << 20,
                      refresh: bool = False, units: Mapping[str, tuple[torch.nn.Module, Any]] | None = None,
                      units_key: str | None = None) -> Calibration:
    """The cached calibration of this node, or a new one (then cached).

    ``profile`` defaults to ``probe_node(nvme_path)``; ``cache_dir`` to
    :func:`default_cache_dir`; ``refresh`` ignores the cache.  Unit times depend on
    the model: pass ``units`` with a ``units_key`` naming the model (e.g. a hash of its
    config); they are cached under that key next to the node's numbers.  A cache that
    cannot be written only warns: training must not fail over a cache file."""
    if units and not units_key:
        raise ValueError("load_or_calibrate: units need a units_key naming the model they come from")
    if profile is None:
        profile = probe_node(nvme_path)
    if nvme_path is None and profile.nvme is not None:
        nvme_path = profile.nvme.path
    nvme_path = os.path.abspath(os.path.expanduser(nvme_path)) if nvme_path else None
    fp = profile.fingerprint()
    path = _cache_path(cache_dir or default_cache_dir(), fp, nvme_path, block_size)
    key = units_key if units else None
    lock_fd = -1
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        lock_fd = os.open(path + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        fcntl.flock(lock_fd, fcntl.LOCK_EX)  # another rank calibrating: wait, then read its result
    except OSError as e:
        warnings.warn(f"calibration cache {path} is not usable ({e.strerror}); calibrating without it.")
    try:
        hw, models = _read_cache(path, fp, quick) if lock_fd >= 0 else (None, {})
        if hw is not None and not refresh and (key is None or key in models):
            return hw if key is None else dataclasses.replace(hw, unit_fwd_s=models[key][0],
                                                              unit_bwd_s=models[key][1])
        if hw is None or refresh:
            cal = calibrate(profile, nvme_path=nvme_path, quick=quick, block_size=block_size, units=units)
        else:  # the node's numbers are cached; only this model's units are new
            assert units is not None
            fwd, bwd = measure_units(units, target_s=_TARGET_S[bool(quick)])
            cal = dataclasses.replace(hw, unit_fwd_s=fwd, unit_bwd_s=bwd)
        if key is not None:
            models[key] = (cal.unit_fwd_s, cal.unit_bwd_s)
        if lock_fd >= 0:
            hw = dataclasses.replace(cal, unit_fwd_s=None, unit_bwd_s=None)  # unit times live under "units"
            doc = {"calibration": hw.to_dict(), "profile": profile.to_dict(),
                   "units": {k: {"fwd": f, "bwd": b} for k, (f, b) in models.items()}}
            try:
                tmp = f"{path}.tmp-{os.getpid()}"
                with open(tmp, "w", encoding="utf-8") as f:
                    json.dump(doc, f, indent=1)
                os.replace(tmp, path)  # readers see the old file or the new one, never half
            except OSError as e:
                warnings.warn(f"cannot write the calibration cache {path} ({e.strerror}); it is not cached.")
        return cal
    finally:
        if lock_fd >= 0:
            os.close(lock_fd)
