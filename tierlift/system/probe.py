"""What this node is: GPUs (through NVML), host memory, memlock limit, cores, the NVMe directory.

``probe_node(nvme_path)`` returns a frozen :class:`NodeProfile`.  It never raises
for missing hardware: no NVML library, no driver or no GPU gives ``gpus=()`` and
the reason in ``nvml_error``, so the same code runs on CPU-only CI.  It does not
create a CUDA context or call ``torch.cuda.*`` (a launcher may probe before it
forks its ranks, and CUDA initialised before a fork is unusable in the children).

Units: bytes for memory and disk, PCIe generation as an integer (5 = Gen5) and
width in lanes.  ``None`` means "unknown" except for ``memlock_bytes`` (None =
unlimited, as ``ulimit -l`` prints it) and ``cgroup_memory_limit_bytes`` (None =
no cgroup limit below physical memory).

``fingerprint()`` hashes only what decides measured speeds (hardware, driver,
torch/CUDA build, NVMe directory and its filesystem); volatile numbers (free
memory, free disk, current PCIe link state, memlock) are left out, so a cached
calibration survives a reboot but not a new GPU, a new driver or another disk.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import mmap
import os
import resource
import secrets
import socket
from dataclasses import dataclass
from typing import Any

__all__ = ["GPUInfo", "DiskInfo", "NodeProfile", "probe_node", "probe_disk", "probe_gpus"]

_FORMAT = "tierlift-node/1"
_ALIGN = 4096  # bytes: O_DIRECT alignment the NVMe engine uses (covers 512 B and 4 KiB sectors)


@dataclass(frozen=True)
class GPUInfo:
    """One GPU as NVML sees it.  ``index`` is NVML's (PCI bus order), which equals the
    CUDA ordinal when ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` and no ``CUDA_VISIBLE_DEVICES``
    remapping is in effect.  ``pcie_gen``/``pcie_width``: the best link this GPU *and*
    its slot support (stable); ``*_current``: the link right now (an idle GPU drops
    its generation to save power, so only a narrower width signals a problem)."""

    index: int
    name: str
    memory_bytes: int
    pcie_gen: int | None
    pcie_width: int | None
    numa_node: int | None
    driver: str | None
    pcie_gen_current: int | None = None
    pcie_width_current: int | None = None
    uuid: str | None = None
    pci_bus_id: str | None = None


@dataclass(frozen=True)
class DiskInfo:
    """The NVMe tier's directory.  For a directory that does not exist yet, space
    and filesystem are those of its nearest existing parent (where it would be made).
    ``writable``/``o_direct`` come from really creating, writing and reading a 4 KiB
    temp file (``os.access`` is wrong for root and for read-only mounts); ``error``
    says why either is False."""

    path: str
    free_bytes: int | None
    fstype: str | None
    o_direct: bool
    exists: bool = True
    is_dir: bool = True
    writable: bool = False
    total_bytes: int | None = None
    mount_point: str | None = None
    device: str | None = None  # the mount's source, e.g. /dev/nvme0n1p1
    error: str | None = None


@dataclass(frozen=True)
class NodeProfile:
    hostname: str
    cores: int  # logical CPUs this process may run on (affinity / cpuset)
    host_memory_bytes: int  # physical RAM (MemTotal)
    host_available_bytes: int  # MemAvailable at probe time (volatile)
    memlock_bytes: int | None  # RLIMIT_MEMLOCK soft limit; None = unlimited
    gpus: tuple[GPUInfo, ...] = ()
    nvme: DiskInfo | None = None
    torch_version: str | None = None
    cuda_version: str | None = None  # CUDA runtime torch was built with; None = CPU build
    nccl_version: str | None = None
    physical_cores: int | None = None
    cpu_model: str | None = None
    memlock_privileged: bool = False  # root or CAP_IPC_LOCK: the kernel does not enforce memlock
    cgroup_memory_limit_bytes: int | None = None
    cuda_driver_version: str | None = None  # newest CUDA the driver supports, e.g. "12.4"
    nvml_error: str | None = None  # why gpus is empty, when NVML could not be used

    def __post_init__(self) -> None:
        object.__setattr__(self, "gpus", tuple(self.gpus))  # callers may pass a list; stored immutable

    def fingerprint(self) -> str:
        """sha256 (hex) of the speed-deciding fields; the calibration cache key."""
        gpu_keys = ("name", "memory_bytes", "pcie_gen", "pcie_width", "numa_node", "driver")
        nvme = None
        if self.nvme is not None:
            nvme = {k: getattr(self.nvme, k) for k in ("path", "fstype", "device", "o_direct")}
        doc = {
            "hostname": self.hostname, "cpu_model": self.cpu_model, "cores": self.cores,
            "physical_cores": self.physical_cores,
            # GiB, rounded: MemTotal moves by a few MiB between kernels and boots
            "host_memory_gib": round(self.host_memory_bytes / 2**30),
            "gpus": [{k: getattr(g, k) for k in gpu_keys} for g in self.gpus],
            "nvme": nvme, "torch": self.torch_version, "cuda": self.cuda_version, "nccl": self.nccl_version,
        }
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["gpus"] = [dataclasses.asdict(g) for g in self.gpus]
        d["format"] = _FORMAT
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "NodeProfile":
        """Inverse of :meth:`to_dict`; keys this version does not know are ignored
        (a newer tierlift's cache file), missing required keys raise TypeError."""
        d = dict(d)
        if d.pop("format", _FORMAT) != _FORMAT:
            raise ValueError(f"not a {_FORMAT} document")
        d["gpus"] = tuple(_build(GPUInfo, g) for g in d.get("gpus") or ())
        d["nvme"] = _build(DiskInfo, d["nvme"]) if d.get("nvme") is not None else None
        return _build(cls, d)


def _build(cls: type, d: dict[str, Any]) -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in names})


# -- GPUs -------------------------------------------------------------------------------------------
def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)  # older nvidia-ml-py returns bytes


def _nvml(fn: str, *args: Any) -> Any:
    """One NVML query; None where this GPU/driver does not support it (vGPU, MIG, old driver)."""
    import pynvml

    try:
        return getattr(pynvml, fn)(*args)
    except (pynvml.NVMLError, AttributeError, TypeError):
        return None


def _sysfs_numa(bus_id: str | None) -> int | None:
    """NUMA node of a PCI device from sysfs.  NVML writes the domain with 8 hex
    digits, upper case ("00000000:3B:00.0"); sysfs uses 4, lower case."""
    if not bus_id:
        return None
    dom, _, rest = bus_id.lower().partition(":")
    try:
        with open(f"/sys/bus/pci/devices/{dom[-4:]}:{rest}/numa_node") as f:
            node = int(f.read().strip())
    except (OSError, ValueError):
        return None
    return node if node >= 0 else None  # -1: single-node machine or firmware did not say


def _visible(gpus: list[GPUInfo]) -> list[GPUInfo]:
    """Apply CUDA_VISIBLE_DEVICES (indices or UUID prefixes) when it is set and parses."""
    raw = os.environ.get("CUDA_VISIBLE_DEVICES")
    if raw is None or "MIG-" in raw:  # MIG instances are not NVML devices: leave the list alone
        return gpus
    keep = []
    for tok in (t.strip() for t in raw.split(",")):
        if not tok:
            break  # CUDA stops at the first empty or invalid entry
        if tok.lstrip("-").isdigit():
            match = [g for g in gpus if g.index == int(tok)]
        else:
            match = [g for g in gpus if g.uuid and g.uuid.startswith(tok)]
        if len(match) != 1:
            break
        keep.append(match[0])
    return keep


def probe_gpus() -> tuple[list[GPUInfo], str | None, str | None]:
    """(GPUs visible to this process, CUDA version the driver supports, why NVML failed)."""
    try:
        import pynvml
    except ImportError:
        return [], None, "nvidia-ml-py (pynvml) is not installed"
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as e:  # no library (no driver), driver not loaded, no permission
        return [], None, f"NVML unavailable: {e}"
    try:
        driver = _nvml("nvmlSystemGetDriverVersion")
        driver = _text(driver) if driver is not None else None
        cuda_drv = _nvml("nvmlSystemGetCudaDriverVersion")  # e.g. 12040 -> "12.4"
        cuda_drv = f"{cuda_drv // 1000}.{cuda_drv % 1000 // 10}" if isinstance(cuda_drv, int) else None
        gpus = []
        for i in range(_nvml("nvmlDeviceGetCount") or 0):
            h = _nvml("nvmlDeviceGetHandleByIndex", i)
            if h is None:
                continue
            mem = _nvml("nvmlDeviceGetMemoryInfo", h)
            pci = _nvml("nvmlDeviceGetPciInfo", h)
            bus = _text(pci.busId) if pci is not None else None
            numa = _nvml("nvmlDeviceGetNumaNodeId", h)
            name, uuid = _nvml("nvmlDeviceGetName", h), _nvml("nvmlDeviceGetUUID", h)
            gpus.append(GPUInfo(
                index=i, name=_text(name) if name is not None else "unknown",
                memory_bytes=int(mem.total) if mem is not None else 0,
                pcie_gen=_nvml("nvmlDeviceGetMaxPcieLinkGeneration", h),
                pcie_width=_nvml("nvmlDeviceGetMaxPcieLinkWidth", h),
                numa_node=numa if isinstance(numa, int) and numa >= 0 else _sysfs_numa(bus),
                driver=driver,
                pcie_gen_current=_nvml("nvmlDeviceGetCurrPcieLinkGeneration", h),
                pcie_width_current=_nvml("nvmlDeviceGetCurrPcieLinkWidth", h),
                uuid=_text(uuid) if uuid is not None else None, pci_bus_id=bus))
        return _visible(gpus), cuda_drv, None
    finally:
        try:
            pynvml.nvmlShutdown()
        except pynvml.NVMLError:
            pass


# -- host -------------------------------------------------------------------------------------------
def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return None


def _cgroup_memory_limit(total: int) -> int | None:
    """Smallest memory limit of this process's cgroup and its ancestors (v2
    ``memory.max`` or v1 ``memory.limit_in_bytes``); None when none is below RAM.
    A container often sees its own cgroup mounted as the root, so the root files count too."""
    files = []
    try:
        with open("/proc/self/cgroup") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        hid, ctrl, path = (line.split(":", 2) + ["", ""])[:3]
        if hid == "0" and ctrl == "":
            base, name = "/sys/fs/cgroup", "memory.max"
        elif "memory" in ctrl.split(","):
            base, name = "/sys/fs/cgroup/memory", "memory.limit_in_bytes"
        else:
            continue
        parts = [p for p in path.split("/") if p]
        files += [os.path.join(base, *parts[:k], name) for k in range(len(parts), -1, -1)]
    limits = []
    for p in files:
        try:
            with open(p) as f:
                v = f.read().strip()
        except OSError:
            continue
        if v.isdigit():  # "max" = none
            limits.append(int(v))
    lim = min(limits, default=None)
    return lim if lim is not None and lim < total else None


def _privileged() -> bool:
    if os.geteuid() == 0:
        return True
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool((int(line.split()[1], 16) >> 14) & 1)  # bit 14: CAP_IPC_LOCK
    except (OSError, ValueError, IndexError):
        pass
    return False


def _torch_versions() -> tuple[str | None, str | None, str | None]:
    try:
        import torch
    except ImportError:
        return None, None, None
    try:
        v = torch.cuda.nccl.version()  # reads the library's version; creates no CUDA context
        nccl = ".".join(map(str, v)) if isinstance(v, tuple) else str(v)
    except Exception:  # CPU build: torch._C has no NCCL
        nccl = None
    return torch.__version__, torch.version.cuda, nccl


# -- disk -------------------------------------------------------------------------------------------
def _mount_of(path: str) -> tuple[str | None, str | None, str | None]:
    """(mount point, fstype, source) of the longest mount containing ``path``."""
    best = (None, None, None)
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                src, mnt, fstype = (line.split() + ["", "", ""])[:3]
                mnt = mnt.replace("\\040", " ").replace("\\011", "\t").replace("\\134", "\\")
                inside = path == mnt or path.startswith(mnt.rstrip("/") + "/")
                if inside and (best[0] is None or len(mnt) >= len(best[0])):
                    best = (mnt, fstype, src)
    except OSError:
        pass
    return best


def _try_io(directory: str) -> tuple[bool, bool, str | None]:
    """(writable, O_DIRECT works, error) by writing and reading back one aligned 4 KiB
    block in a temp file.  Some filesystems accept O_DIRECT at open and refuse the I/O."""
    path = os.path.join(directory, f".tierlift-probe-{os.getpid()}-{secrets.token_hex(4)}")
    buf = mmap.mmap(-1, _ALIGN)  # anonymous mappings are page aligned, as O_DIRECT needs
    buf.write(b"tierlift" * (_ALIGN // 8))
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except OSError as e:
        return False, False, f"cannot create a file there: {e.strerror}"
    try:
        os.write(fd, b"x")
        os.close(fd)
        fd = os.open(path, os.O_RDWR | getattr(os, "O_DIRECT", 0) | os.O_CLOEXEC)
        try:
            ok = os.pwrite(fd, buf, 0) == _ALIGN and os.preadv(fd, [buf], 0) == _ALIGN
            return True, ok, None if ok else "O_DIRECT transferred a short block"
        finally:
            os.close(fd)
    except OSError as e:
        if e.errno == errno.EINVAL:
            return True, False, f"the filesystem refuses O_DIRECT ({e.strerror})"
        return True, False, f"I/O failed: {e.strerror}"
    finally:
        buf.close()
        try:
            os.unlink(path)
        except OSError:
            pass


def probe_disk(path: str) -> DiskInfo:
    """Space, filesystem, writability and O_DIRECT support of ``path`` (not created)."""
    ap = os.path.abspath(os.path.expanduser(path))
    exists, is_dir = os.path.exists(ap), os.path.isdir(ap)
    probe_at = ap
    while not os.path.exists(probe_at):
        probe_at = os.path.dirname(probe_at)
    free = total = None
    try:
        st = os.statvfs(probe_at)
        free, total = st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize
    except OSError:
        pass
    mnt, fstype, src = _mount_of(os.path.realpath(probe_at))
    if not is_dir:
        why = "is a file, not a directory" if exists else f"does not exist (nearest existing parent: {probe_at})"
        return DiskInfo(ap, free, fstype, False, exists, False, False, total, mnt, src, why)
    writable, direct, err = _try_io(ap)
    return DiskInfo(ap, free, fstype, direct, True, True, writable, total, mnt, src, err)


def probe_node(nvme_path: str | None = None) -> NodeProfile:
    """Probe this node; ``nvme_path``: the NVMe tier's directory to inspect (optional)."""
    import psutil

    vm = psutil.virtual_memory()
    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    gpus, cuda_drv, nvml_err = probe_gpus()
    tv, cv, nv = _torch_versions()
    return NodeProfile(
        hostname=socket.gethostname(), cores=cores, host_memory_bytes=int(vm.total),
        host_available_bytes=int(vm.available),
        memlock_bytes=None if soft == resource.RLIM_INFINITY else int(soft),
        gpus=tuple(gpus), nvme=probe_disk(nvme_path) if nvme_path else None,
        torch_version=tv, cuda_version=cv, nccl_version=nv,
        physical_cores=psutil.cpu_count(logical=False), cpu_model=_cpu_model(),
        memlock_privileged=_privileged(), cgroup_memory_limit_bytes=_cgroup_memory_limit(int(vm.total)),
        cuda_driver_version=cuda_drv, nvml_error=nvml_err)
