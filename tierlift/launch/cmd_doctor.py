"""`tierlift doctor`: check this node before training and say what to fix.

    tierlift doctor [--nvme-path DIR] [--pinned-budget BYTES] [--calibrate] [--json]

Each finding has a level (OK / WARN / FAIL), what was found and, unless OK, the
fix.  Checked: torch build, nvidia-ml-py, NVIDIA driver (and that it supports
torch's CUDA), visible GPUs and their PCIe links, the memlock limit against the
pinned budget, host memory and cores, the NVMe directory (exists, writable,
filesystem, O_DIRECT, free space, read/write speed through our NVMe engine),
a one-rank gloo group, a one-rank NCCL group when CUDA is there, and Ray 2.60.0.
``--calibrate`` also runs the calibration micro-benchmarks and stores them in the
node's calibration cache (``$TIERLIFT_CACHE_DIR`` or ``~/.cache/tierlift``).

Exit codes: 0 when no finding is FAIL (WARNs allowed), 1 when any is FAIL, 2 for
bad input (usage errors, an unusable option value), like every tierlift command.
``--json`` prints one JSON document on stdout: ``{"format", "exit_code",
"counts", "findings": [{"check", "level", "found", "fix"}], "profile",
"calibration"}``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["register", "Finding", "run_checks"]

RAY_VERSION = "2.60.0"  # pinned: its loopback-only listener setup was verified for this version (tests/test_ray_launch.py)
NVME_FAIL_BYTES = 1 << 30  # below 1 GiB free the NVMe tier cannot hold even a small model's state
NVME_WARN_BYTES = 16 << 30  # optimizer state is 12 B/param: 16 GiB holds about a 1.3 B-param model
DISK_WARN_GBPS = 1.0  # below this an NVMe-offloaded optimizer step is disk bound for any useful model
H2D_WARN_GBPS = 10.0  # a healthy Gen4/Gen5 x16 link gives 25-55 GB/s pinned
_GIB = 2**30


@dataclass(frozen=True)
class Finding:
    check: str
    level: str  # "OK", "WARN" or "FAIL"
    found: str
    fix: str = ""


def _bytes_arg(text: str) -> int:
    """``123``, ``64GiB``, ``512M`` (K/M/G/T = powers of 1000, Ki/Mi/Gi/Ti = of 1024; a trailing B is optional)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]i?)?b?\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a byte count (e.g. 68719476736, 64GiB, 512M)")
    unit = (m.group(2) or "").lower()
    scale = 1 if not unit else (1024 if unit.endswith("i") else 1000) ** ("kmgt".index(unit[0]) + 1)
    return int(float(m.group(1)) * scale)


def _gib(n: int | None) -> str:
    return "unknown" if n is None else f"{n / _GIB:.1f} GiB"


# -- software and GPUs ------------------------------------------------------------------------------
def _check_software(profile, cuda_ok: bool) -> list[Finding]:
    import torch

    build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU build"
    out = [Finding("torch", "OK", f"torch {torch.__version__} ({build}), Python {sys.version.split()[0]}")]
    try:
        from importlib.metadata import version

        __import__("pynvml")
        out.append(Finding("nvidia-ml-py", "OK", f"nvidia-ml-py {version('nvidia-ml-py')}"))
    except Exception as e:  # noqa: BLE001 -- ImportError, PackageNotFoundError, a broken install
        out.append(Finding("nvidia-ml-py", "WARN", f"not importable ({type(e).__name__}: {e}); GPU details unknown",
                           "pip install nvidia-ml-py"))
    drv, need = profile.cuda_driver_version, torch.version.cuda
    if profile.gpus and drv and need:
        have_v, need_v = (tuple(int(x) for x in v.split(".")[:2]) for v in (drv, need))
        found = f"driver {profile.gpus[0].driver}, supports CUDA {drv}; torch needs CUDA {need}"
        fix = f"upgrade the NVIDIA driver to one supporting CUDA {need}, or install a torch build for CUDA {drv}."
        level = "FAIL" if have_v[0] < need_v[0] else "WARN" if have_v < need_v else "OK"
        out.append(Finding("driver", level, found, fix if level != "OK" else ""))
    elif profile.gpus:
        out.append(Finding("driver", "OK", f"driver {profile.gpus[0].driver}"))
    elif need:  # a CUDA build of torch on a node where NVML finds no driver
        out.append(Finding("driver", "WARN", f"no NVIDIA driver found ({profile.nvml_error or 'NVML sees no GPU'})",
                           "install the NVIDIA driver (check `nvidia-smi`), or ignore on a CPU-only node."))
    gpus, names = profile.gpus, ", ".join(sorted({g.name for g in profile.gpus}))
    if gpus and cuda_ok:
        mem = _gib(min(g.memory_bytes for g in gpus))
        out.append(Finding("gpu", "OK", f"{len(gpus)} x {names}, {mem} each"))
    elif gpus:
        why = "torch is a CPU build" if not need else "torch.cuda.is_available() is False"
        out.append(Finding("gpu", "FAIL", f"{len(gpus)} x {names} present, but {why}",
                           "install a torch build for this driver's CUDA (https://pytorch.org/get-started/locally/), "
                           "and check CUDA_VISIBLE_DEVICES and that `nvidia-smi` works."))
    elif cuda_ok:
        out.append(Finding("gpu", "WARN", f"CUDA works but NVML lists no GPU ({profile.nvml_error})",
                           "install nvidia-ml-py and check that NVML matches the driver (`nvidia-smi`)."))
    else:
        out.append(Finding("gpu", "WARN", f"no GPU visible ({profile.nvml_error or 'NVML sees none'}); "
                                          "training runs on the CPU (slow)",
                           "on a GPU node: install the NVIDIA driver, check `nvidia-smi` and CUDA_VISIBLE_DEVICES."))
    for g in gpus:
        link = f"GPU {g.index}: PCIe Gen{g.pcie_gen} x{g.pcie_width}, now x{g.pcie_width_current}, NUMA {g.numa_node}"
        if g.pcie_width and g.pcie_width_current and g.pcie_width_current < g.pcie_width:
            out.append(Finding("pcie", "WARN", link + " (link trained narrower than it can run)",
                               "reseat the GPU or check the riser and BIOS lane settings: host<->GPU copies run "
                               "at a fraction of their speed."))
        else:
            out.append(Finding("pcie", "OK", link))
    return out


# -- host -------------------------------------------------------------------------------------------
def _check_host(profile, cuda_ok: bool, pinned_budget: int) -> list[Finding]:
    from tierlift.offload.pinned import PinnedMemoryError, check_memlock

    out = []
    try:
        rep = check_memlock(pinned_budget, pinning=cuda_ok)
        budget = f"pinned budget {_gib(pinned_budget)}" if pinned_budget else "no pinned budget (0 = unbounded)"
        out.append(Finding("memlock", "OK", f"{rep.describe()}; {budget}"))
    except PinnedMemoryError as e:
        out.append(Finding("memlock", "FAIL", e.message, f"{e.fix} Check a planned budget with --pinned-budget BYTES."))
    avail = min(profile.host_available_bytes, profile.cgroup_memory_limit_bytes or profile.host_available_bytes)
    cg = f", cgroup limit {_gib(profile.cgroup_memory_limit_bytes)}" if profile.cgroup_memory_limit_bytes else ""
    found = f"{_gib(profile.host_memory_bytes)} total, {_gib(profile.host_available_bytes)} available{cg}"
    if avail < min(4 * _GIB, profile.host_memory_bytes // 10):
        out.append(Finding("host memory", "WARN", found, "stop other jobs on this node or lower "
                                                         "offload.host_budget_bytes: offloaded state lives here."))
    else:
        out.append(Finding("host memory", "OK", found))
    out.append(Finding("cpu", "OK", f"{profile.cores} usable cores ({profile.physical_cores} physical), "
                                    f"{profile.cpu_model or 'unknown model'}"))
    return out


# -- NVMe directory ---------------------------------------------------------------------------------
def _check_nvme(disk) -> tuple[list[Finding], bool]:
    """Findings for the NVMe directory, and whether a disk speed test can run there."""
    if disk is None:
        return [Finding("nvme path", "OK", "not checked (no --nvme-path given)",
                        "pass --nvme-path DIR to check the NVMe tier's directory.")], False
    p = disk.path
    if not disk.exists:
        parent = p
        while not os.path.exists(parent):
            parent = os.path.dirname(parent)
        if os.path.isdir(parent) and os.access(parent, os.W_OK | os.X_OK):
            return [Finding("nvme path", "WARN", f"{p} does not exist; tierlift creates it at start",
                            f"create it now (`mkdir -p {p}`) and run doctor again to test it.")], False
        return [Finding("nvme path", "FAIL", f"{p} does not exist and cannot be created ({parent} is "
                                             f"{'not a directory' if not os.path.isdir(parent) else 'not writable'})",
                        "give --nvme-path / offload.*.path a writable directory on a local NVMe disk.")], False
    if not disk.is_dir:
        return [Finding("nvme path", "FAIL", f"{p} is not a directory",
                        "give --nvme-path / offload.*.path a directory on a local NVMe disk.")], False
    if not disk.writable:
        return [Finding("nvme path", "FAIL", f"{p} is not writable: {disk.error}",
                        f"make it writable for uid {os.geteuid()} (chown/chmod, or remount read-write), "
                        "or choose a directory on a writable local disk.")], False
    out = [Finding("nvme path", "OK", f"{p} writable, {disk.fstype} on {disk.device} (mounted at {disk.mount_point})")]
    fs = (disk.fstype or "").lower()
    if fs in ("tmpfs", "ramfs"):
        out.append(Finding("nvme filesystem", "WARN", f"{fs}: RAM-backed, offloading there uses host memory",
                           "point it at a directory on a local NVMe disk."))
    elif fs in ("overlay", "nfs", "nfs4", "cifs", "smb3") or fs.startswith("fuse"):
        out.append(Finding("nvme filesystem", "WARN", f"{fs}: a container overlay or network filesystem",
                           "bind-mount (docker -v / a hostPath volume) a local NVMe directory and use that."))
    if not disk.o_direct:
        out.append(Finding("o_direct", "WARN", f"refused ({disk.error}); I/O goes through the page cache",
                           "use a local ext4/xfs disk: buffered I/O doubles host memory use and its speed varies."))
    else:
        out.append(Finding("o_direct", "OK", "supported"))
    free = disk.free_bytes or 0
    found = f"{_gib(free)} free of {_gib(disk.total_bytes)}"
    fix = "free space there or choose a bigger disk: NVMe-offloaded optimizer state takes 12 bytes per parameter."
    level = "FAIL" if free < NVME_FAIL_BYTES else "WARN" if free < NVME_WARN_BYTES else "OK"
    out.append(Finding("nvme space", level, found, fix if level != "OK" else ""))
    return out, free >= NVME_FAIL_BYTES


def _speed_finding(read: float, write: float, direct: bool) -> Finding:
    found = f"read {read:.2f} GB/s, write {write:.2f} GB/s ({'O_DIRECT' if direct else 'buffered'}, 8 MiB requests)"
    if min(read, write) < DISK_WARN_GBPS:
        return Finding("nvme speed", "WARN", found,
                       f"use a local NVMe SSD: an NVMe optimizer step moves 12 B/param each way, about "
                       f"{12 / min(read, write):.0f} s per B params at this speed; or keep state in host memory "
                       "(offload kind: cpu).")
    return Finding("nvme speed", "OK", found)


# -- communication ----------------------------------------------------------------------------------
def _try_group(backend: str) -> str | None:
    """Make a one-rank group of ``backend`` and all-reduce one tensor; the error text, if any."""
    import torch
    import torch.distributed as dist

    try:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        try:
            dev = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
            x = torch.ones(4, device=dev)
            dist.all_reduce(x)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
        finally:
            dist.destroy_process_group()
    except Exception as e:  # noqa: BLE001 -- any failure is the finding
        return f"{type(e).__name__}: {e}".splitlines()[0]
    return None


def _check_comm(profile, cuda_ok: bool) -> list[Finding]:
    import torch.distributed as dist

    out = []
    if not dist.is_available() or not dist.is_gloo_available():
        out.append(Finding("gloo", "FAIL", "torch.distributed or its gloo backend is missing from this torch build",
                           "install an official torch build (pip install torch)."))
    elif err := _try_group("gloo"):
        out.append(Finding("gloo", "FAIL", f"a one-rank gloo group failed: {err}",
                           "check that the hostname resolves (`getent hosts $(hostname)`), or set "
                           "GLOO_SOCKET_IFNAME to a working interface (lo on one node)."))
    else:
        out.append(Finding("gloo", "OK", "one-rank gloo group all-reduced"))
    if not cuda_ok:
        out.append(Finding("nccl", "OK", "not needed (no CUDA): CPU runs use gloo"))
    elif not dist.is_nccl_available():
        out.append(Finding("nccl", "FAIL", "this CUDA torch build has no NCCL",
                           "install an official CUDA torch build."))
    elif err := _try_group("nccl"):
        out.append(Finding("nccl", "FAIL", f"a one-rank NCCL group failed: {err}",
                           "rerun with NCCL_DEBUG=INFO; check the driver and that no other job holds the GPU."))
    else:
        out.append(Finding("nccl", "OK", f"NCCL {profile.nccl_version}: one-rank group all-reduced"))
    try:
        import ray
        v = ray.__version__
    except Exception as e:  # noqa: BLE001
        out.append(Finding("ray", "WARN", f"not importable ({type(e).__name__}); only --backend local works",
                           f"pip install 'tierlift[ray]' (ray[train]=={RAY_VERSION}) for --backend ray."))
        return out
    if v != RAY_VERSION:
        out.append(Finding("ray", "WARN", f"ray {v}; tierlift is tested with {RAY_VERSION} only",
                           f"pip install 'ray[train]=={RAY_VERSION}', or use --backend local."))
    else:
        out.append(Finding("ray", "OK", f"ray {v}"))
    return out


# -- command ----------------------------------------------------------------------------------------
def run_checks(nvme_path: str | None = None, *, pinned_budget: int = 0, calibrate: bool = False,
               disk_speed: bool = True) -> tuple[list[Finding], Any, Any]:
    """(findings, NodeProfile, Calibration or None).  ``disk_speed``: run the quick disk
    benchmark (~1-2 s) when the NVMe directory is usable."""
    import torch

    from tierlift.errors import TierliftError
    from tierlift.system.calibrate import load_or_calibrate, measure_disk
    from tierlift.system.probe import probe_node

    if nvme_path is not None and not nvme_path.strip():
        raise TierliftError("is empty.", setting="--nvme-path", value=nvme_path,
                            fix="give the NVMe tier's directory, or leave the option out.")
    profile = probe_node(nvme_path)
    cuda_ok = torch.cuda.is_available()
    findings = _check_software(profile, cuda_ok) + _check_host(profile, cuda_ok, pinned_budget)
    nvme, usable = _check_nvme(profile.nvme)
    findings += nvme
    cal = None
    if calibrate:
        measured = profile if usable else dataclasses.replace(profile, nvme=None)  # no disk bench where unusable
        cal = load_or_calibrate(measured, refresh=True)
        parts = [f"CPU AdamW {cal.cpu_adamw_params_per_s / 1e9:.2f} Gparam/s ({cal.cpu_threads} threads)"]
        if cal.gpu_adamw_params_per_s:
            parts.append(f"GPU AdamW {cal.gpu_adamw_params_per_s / 1e9:.1f} Gparam/s")
        if cal.h2d_gbps:
            parts.append(f"pinned H2D {cal.h2d_gbps:.1f} / D2H {cal.d2h_gbps:.1f} / both {cal.duplex_gbps:.1f} GB/s")
        slow = cal.h2d_gbps is not None and min(cal.h2d_gbps, cal.d2h_gbps or 0) < H2D_WARN_GBPS
        findings.append(Finding("calibration", "WARN" if slow else "OK", "; ".join(parts),
                                "check the PCIe link (pcie rows above) and run on the GPU's NUMA node "
                                "(numactl --cpunodebind=N --membind=N)." if slow else ""))
        if cal.disk_read_gbps is not None:
            findings.append(_speed_finding(cal.disk_read_gbps, cal.disk_write_gbps, bool(cal.disk_direct)))
    elif usable and disk_speed:
        findings.append(_speed_finding(*measure_disk(profile.nvme.path, quick=True)))
    findings += _check_comm(profile, cuda_ok)
    return findings, profile, cal


def _exit_code(findings: list[Finding]) -> int:
    return 1 if any(f.level == "FAIL" for f in findings) else 0


def _cmd_doctor(args: argparse.Namespace) -> int:
    findings, profile, cal = run_checks(args.nvme_path, pinned_budget=args.pinned_budget,
                                        calibrate=args.calibrate, disk_speed=not args.no_disk_speed)
    rc = _exit_code(findings)
    counts = {lv: sum(f.level == lv for f in findings) for lv in ("OK", "WARN", "FAIL")}
    if args.json:
        doc = {"format": "tierlift-doctor/1", "exit_code": rc, "counts": counts,
               "findings": [asdict(f) for f in findings], "profile": profile.to_dict(),
               "calibration": cal.to_dict() if cal is not None else None}
        json.dump(doc, sys.stdout, indent=1)
        sys.stdout.write("\n")
        return rc
    width = max(len(f.check) for f in findings)
    print(f"{'LEVEL':<5}  {'CHECK':<{width}}  FOUND")
    for f in findings:
        print(f"{f.level:<5}  {f.check:<{width}}  {f.found}")
        if f.fix and f.level != "OK":
            print(f"{'':<5}  {'':<{width}}  fix: {f.fix}")
    print(f"\n{profile.hostname}: {counts['FAIL']} FAIL, {counts['WARN']} WARN, {counts['OK']} OK "
          f"(exit {rc}: {'no failures' if rc == 0 else 'fix the FAIL rows first'})")
    return rc


def register(subparsers, common) -> None:
    """Add ``tierlift doctor`` to the CLI (see the module doc for checks and exit codes)."""
    d = subparsers.add_parser("doctor", parents=[common], help="check this node and print what to fix",
                              description="Check this node (driver, GPUs, memlock, NVMe directory, gloo/NCCL, "
                                          "Ray) and print findings with fixes.",
                              epilog="exit status: 0 no FAIL (WARNs allowed), 1 at least one FAIL, 2 bad input.")
    d.add_argument("--nvme-path", metavar="DIR", help="the NVMe tier's directory to check (space, O_DIRECT, speed)")
    d.add_argument("--pinned-budget", type=_bytes_arg, default=0, metavar="BYTES",
                   help="planned pinned host memory (offload.host_budget_bytes) to check against the memlock "
                        "limit, e.g. 64GiB (default 0 = unbounded)")
    d.add_argument("--calibrate", action="store_true",
                   help="also run the calibration benchmarks (a few seconds) and refresh the node's cache")
    d.add_argument("--no-disk-speed", action="store_true", help="skip the ~1 s disk speed test")
    d.add_argument("--json", action="store_true", help="print one JSON document instead of the table")
    d.set_defaults(handler=_cmd_doctor)
