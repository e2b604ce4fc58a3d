"""tierlift.system (probe, calibration, cache) and `tierlift doctor`.  CPU, fast; no
wall-clock thresholds (speeds are only checked to be positive).  GPU checks are
marked ``gpu`` and run on the device machine."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import types

import pytest
import torch

from tierlift.launch import cmd_doctor
from tierlift.system import calibrate as cal_mod
from tierlift.system.calibrate import Calibration, calibrate, load_or_calibrate, measure_units
from tierlift.system.probe import DiskInfo, GPUInfo, NodeProfile, probe_disk, probe_node

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _gpu(i: int = 0, **kw) -> GPUInfo:
    base = dict(index=i, name="NVIDIA H100 80GB HBM3", memory_bytes=80 << 30, pcie_gen=5, pcie_width=16,
                numa_node=0, driver="580.65.06", pcie_gen_current=5, pcie_width_current=16, uuid=f"GPU-{i:04d}")
    return GPUInfo(**{**base, **kw})


def _profile(**kw) -> NodeProfile:
    base = dict(hostname="node1", cores=16, host_memory_bytes=126 << 30, host_available_bytes=100 << 30,
                memlock_bytes=None, gpus=[_gpu(0)], nvme=DiskInfo("/nvme", 1 << 40, "ext4", True),
                torch_version="2.11.0", cuda_version="13.0", nccl_version="2.27.7", cuda_driver_version="13.0")
    return NodeProfile(**{**base, **kw})


# -- probe --------------------------------------------------------------------------------------------
def test_probe_without_nvml_gives_no_gpus(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import fails as if nvidia-ml-py were absent
    p = probe_node()
    assert p.gpus == () and "nvidia-ml-py" in p.nvml_error
    assert p.cores >= 1 and p.host_memory_bytes > 0 and 0 < p.host_available_bytes <= p.host_memory_bytes
    assert p.nvme is None and p.torch_version == torch.__version__
    import resource
    soft = resource.getrlimit(resource.RLIMIT_MEMLOCK)[0]
    assert p.memlock_bytes == (None if soft == resource.RLIM_INFINITY else soft)


def test_probe_nvml_init_failure_is_not_an_exception(monkeypatch):
    import pynvml

    def fail():
        raise pynvml.NVMLError(pynvml.NVML_ERROR_DRIVER_NOT_LOADED)
    monkeypatch.setattr(pynvml, "nvmlInit", fail)
    p = probe_node()
    assert p.gpus == () and p.nvml_error.startswith("NVML unavailable")


def _fake_nvml() -> types.ModuleType:
    m = types.ModuleType("pynvml")

    class NVMLError(Exception):
        pass
    m.NVMLError = NVMLError
    m.nvmlInit = m.nvmlShutdown = lambda: None
    m.nvmlSystemGetDriverVersion = lambda: b"580.65.06"  # old bindings return bytes
    m.nvmlSystemGetCudaDriverVersion = lambda: 13000
    m.nvmlDeviceGetCount = lambda: 2
    m.nvmlDeviceGetHandleByIndex = lambda i: i
    m.nvmlDeviceGetName = lambda h: b"NVIDIA H200"
    m.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(total=(141 << 30) + h)
    m.nvmlDeviceGetPciInfo = lambda h: types.SimpleNamespace(busId=f"00000000:{0x3B + h:02X}:00.0")

    def no_numa(h):
        raise NVMLError("Not Supported")
    m.nvmlDeviceGetNumaNodeId = no_numa  # falls back to sysfs, which has no such device here
    m.nvmlDeviceGetMaxPcieLinkGeneration = lambda h: 5
    m.nvmlDeviceGetMaxPcieLinkWidth = lambda h: 16
    m.nvmlDeviceGetCurrPcieLinkGeneration = lambda h: 1  # idle GPUs drop their link generation
    m.nvmlDeviceGetCurrPcieLinkWidth = lambda h: 16 if h == 0 else 8
    m.nvmlDeviceGetUUID = lambda h: f"GPU-{h}aaa-bbbb"
    return m


def test_probe_reads_nvml_and_honours_cuda_visible_devices(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", _fake_nvml())
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    p = probe_node()
    assert [g.index for g in p.gpus] == [0, 1] and p.nvml_error is None and p.cuda_driver_version == "13.0"
    g = p.gpus[1]
    assert (g.name, g.memory_bytes, g.pcie_gen, g.pcie_width, g.pcie_width_current, g.driver) == \
           ("NVIDIA H200", (141 << 30) + 1, 5, 16, 8, "580.65.06")
    assert g.pci_bus_id == "00000000:3C:00.0" and g.uuid == "GPU-1aaa-bbbb"
    for visible, want in (("1", [1]), ("GPU-1aa", [1]), ("0,7", [0]), ("-1", []), ("", []), ("MIG-x", [0, 1])):
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
        assert [g.index for g in probe_node().gpus] == want, visible


def test_probe_disk(tmp_path):
    d = probe_disk(str(tmp_path))
    assert d.exists and d.is_dir and d.writable and d.free_bytes > 0 and d.fstype
    assert os.listdir(tmp_path) == []  # the O_DIRECT probe file is gone
    missing = probe_disk(str(tmp_path / "a" / "b"))
    assert not missing.exists and not missing.writable and missing.free_bytes == d.free_bytes
    (tmp_path / "f").write_text("x")
    assert not probe_disk(str(tmp_path / "f")).is_dir


def test_fingerprint_stable_and_sensitive(tmp_path):
    a, b = probe_node(str(tmp_path)), probe_node(str(tmp_path))
    assert a.fingerprint() == b.fingerprint() and len(a.fingerprint()) == 64
    p = _profile()
    fp = p.fingerprint()
    # volatile numbers do not invalidate a calibration ...
    for same in (dataclasses.replace(p, host_available_bytes=1), dataclasses.replace(p, memlock_bytes=1 << 20),
                 dataclasses.replace(p, nvme=dataclasses.replace(p.nvme, free_bytes=5)),
                 dataclasses.replace(p, gpus=[dataclasses.replace(p.gpus[0], pcie_gen_current=1)])):
        assert same.fingerprint() == fp
    # ... hardware, driver, software and disk changes do
    for other in (dataclasses.replace(p, cores=8), dataclasses.replace(p, hostname="node2"),
                  dataclasses.replace(p, host_memory_bytes=252 << 30), dataclasses.replace(p, gpus=[]),
                  dataclasses.replace(p, gpus=[_gpu(0), _gpu(1)]),
                  dataclasses.replace(p, gpus=[_gpu(0, name="NVIDIA H200")]),
                  dataclasses.replace(p, gpus=[_gpu(0, pcie_width=8)]),
                  dataclasses.replace(p, gpus=[_gpu(0, driver="570.1")]),
                  dataclasses.replace(p, torch_version="2.13.0"), dataclasses.replace(p, nvme=None),
                  dataclasses.replace(p, nvme=dataclasses.replace(p.nvme, path="/other")),
                  dataclasses.replace(p, nvme=dataclasses.replace(p.nvme, o_direct=False))):
        assert other.fingerprint() != fp


def test_profile_json_round_trip(tmp_path):
    for p in (probe_node(str(tmp_path)), _profile(), _profile(nvme=None, gpus=[_gpu(0), _gpu(1, numa_node=None)])):
        d = json.loads(json.dumps(p.to_dict()))
        q = NodeProfile.from_dict(d)
        assert q == p and q.fingerprint() == p.fingerprint() and isinstance(q.gpus, tuple)
    assert NodeProfile.from_dict({**_profile().to_dict(), "added_later": 1}) == _profile()
    with pytest.raises(ValueError):
        NodeProfile.from_dict({**_profile().to_dict(), "format": "something-else"})


# -- calibration --------------------------------------------------------------------------------------
def test_calibrate_quick_cpu(tmp_path):
    cal = calibrate(probe_node(), nvme_path=str(tmp_path), quick=True)
    assert cal.disk_read_gbps > 0 and cal.disk_write_gbps > 0 and isinstance(cal.disk_direct, bool)
    assert cal.cpu_adamw_params_per_s > 0 and cal.cpu_threads == torch.get_num_threads()
    assert cal.quick and cal.nvme_path == str(tmp_path) and cal.seconds > 0
    if not torch.cuda.is_available():
        assert cal.h2d_gbps is None and cal.d2h_gbps is None and cal.gpu_adamw_params_per_s is None
    assert os.listdir(tmp_path) == []  # the benchmark's directory and extent file are deleted
    assert Calibration.from_dict(json.loads(json.dumps(cal.to_dict()))) == cal


def test_calibrate_without_nvme_path_skips_disk():
    cal = calibrate(_profile(nvme=None, gpus=[]), quick=True)
    assert cal.disk_read_gbps is None and cal.disk_direct is None and cal.cpu_adamw_params_per_s > 0


def test_measure_units_clears_grads():
    lin = torch.nn.Linear(32, 32)
    x = torch.randn(8, 32, requires_grad=True)
    fwd, bwd = measure_units({"block0": (lin, x)}, target_s=0.01)
    assert fwd["block0"] > 0 and bwd["block0"] >= 0
    assert lin.weight.grad is None and x.grad is None


@pytest.fixture
def fake_calibrate(monkeypatch):
    """Cache tests count calibrations instead of running them."""
    calls = []

    def fake(profile, *, nvme_path=None, quick=True, block_size=8 << 20, units=None):
        calls.append("calibrate")
        fwd = {k: 1.0 for k in units} if units else None
        return Calibration(cpu_adamw_params_per_s=1e9, nvme_path=nvme_path, quick=quick, block_size=block_size,
                           fingerprint=profile.fingerprint(), unit_fwd_s=fwd, unit_bwd_s=fwd)

    def fake_units(units, *, target_s=0.5):
        calls.append("units")
        return {k: 2.0 for k in units}, {k: 3.0 for k in units}
    monkeypatch.setattr(cal_mod, "calibrate", fake)
    monkeypatch.setattr(cal_mod, "measure_units", fake_units)
    return calls


def test_cache_hit_miss_and_invalidation(tmp_path, fake_calibrate):
    p, cache = _profile(nvme=None), str(tmp_path / "cache")
    first = load_or_calibrate(p, cache_dir=cache)
    assert load_or_calibrate(p, cache_dir=cache) == first and fake_calibrate == ["calibrate"]
    files = [f for f in os.listdir(cache) if f.endswith(".json")]
    assert len(files) == 1 and json.load(open(os.path.join(cache, files[0])))["calibration"]["fingerprint"] == \
        p.fingerprint()
    load_or_calibrate(dataclasses.replace(p, gpus=[_gpu(0, name="NVIDIA H200")]), cache_dir=cache)  # new GPU
    assert fake_calibrate == ["calibrate"] * 2
    load_or_calibrate(p, cache_dir=cache, quick=False)  # a quick result does not satisfy a full run ...
    load_or_calibrate(p, cache_dir=cache, quick=True)  # ... but a full one satisfies a quick run
    load_or_calibrate(p, cache_dir=cache, nvme_path=str(tmp_path))  # another disk: its own entry
    load_or_calibrate(p, cache_dir=cache, refresh=True)
    assert fake_calibrate == ["calibrate"] * 5


def test_cache_dir_from_environment(tmp_path, monkeypatch, fake_calibrate):
    monkeypatch.setenv("TIERLIFT_CACHE_DIR", str(tmp_path / "envcache"))
    load_or_calibrate(_profile(nvme=None))
    assert any(f.endswith(".json") for f in os.listdir(tmp_path / "envcache"))


def test_corrupt_cache_file_is_ignored_and_rewritten(tmp_path, fake_calibrate):
    p, cache = _profile(nvme=None), str(tmp_path)
    load_or_calibrate(p, cache_dir=cache)
    path = os.path.join(cache, next(f for f in os.listdir(cache) if f.endswith(".json")))
    for junk in ("{not json", json.dumps({"calibration": {"format": "tierlift-calibration/1", "nope": 1}})):
        with open(path, "w") as f:
            f.write(junk)
        with pytest.warns(UserWarning, match="unreadable calibration cache"):
            load_or_calibrate(p, cache_dir=cache)
        assert Calibration.from_dict(json.load(open(path))["calibration"]).fingerprint == p.fingerprint()
    assert fake_calibrate == ["calibrate"] * 3
    load_or_calibrate(p, cache_dir=cache)
    assert len(fake_calibrate) == 3


def test_unit_times_cached_per_model(tmp_path, fake_calibrate):
    p, cache, lin = _profile(nvme=None), str(tmp_path), torch.nn.Linear(4, 4)
    with pytest.raises(ValueError, match="units_key"):
        load_or_calibrate(p, cache_dir=cache, units={"b0": (lin, torch.randn(2, 4))})
    a = load_or_calibrate(p, cache_dir=cache, units={"b0": (lin, torch.randn(2, 4))}, units_key="modelA")
    assert a.unit_fwd_s == {"b0": 1.0} and fake_calibrate == ["calibrate"]
    b = load_or_calibrate(p, cache_dir=cache, units={"b0": (lin, torch.randn(2, 4))}, units_key="modelB")
    assert b.unit_fwd_s == {"b0": 2.0} and b.unit_bwd_s == {"b0": 3.0}
    assert fake_calibrate == ["calibrate", "units"]  # the node's numbers were reused
    again = load_or_calibrate(p, cache_dir=cache, units={"b0": (lin, torch.randn(2, 4))}, units_key="modelA")
    assert again.unit_fwd_s == {"b0": 1.0} and len(fake_calibrate) == 2
    assert load_or_calibrate(p, cache_dir=cache).unit_fwd_s is None  # no model asked: node numbers only


# -- doctor -------------------------------------------------------------------------------------------
def _doctor(*args: str, env_dir) -> tuple[int, dict]:
    env = {**os.environ, "TIERLIFT_CACHE_DIR": str(env_dir), "PYTHONPATH": REPO}
    r = subprocess.run([sys.executable, "-m", "tierlift", "doctor", *args, "--json"], capture_output=True,
                       text=True, env=env, cwd=REPO, timeout=120)
    assert r.returncode in (0, 1), r.stderr
    return r.returncode, json.loads(r.stdout)


def test_doctor_json(tmp_path):
    nvme = tmp_path / "nvme"
    nvme.mkdir()
    rc, doc = _doctor("--nvme-path", str(nvme), env_dir=tmp_path / "cache")
    by = {f["check"]: f for f in doc["findings"]}
    assert {"torch", "nvidia-ml-py", "gpu", "memlock", "host memory", "cpu", "nvme path", "o_direct",
            "nvme space", "nvme speed", "gloo", "nccl", "ray"} <= set(by)
    assert all(f["level"] in ("OK", "WARN", "FAIL") and f["found"] for f in doc["findings"])
    assert all(f["fix"] for f in doc["findings"] if f["level"] != "OK")
    assert rc == doc["exit_code"] == (1 if doc["counts"]["FAIL"] else 0)
    assert by["nvme path"]["level"] == "OK" and by["gloo"]["level"] == "OK"
    assert NodeProfile.from_dict(doc["profile"]).nvme.path == str(nvme) and doc["calibration"] is None
    if not torch.cuda.is_available():
        assert by["gpu"]["level"] == "WARN" and by["nccl"]["level"] == "OK"
    assert os.listdir(nvme) == []


# (A read-only directory is not among the cases: CI runs as root, which ignores
# directory permissions, so that case could never run there.)
@pytest.mark.parametrize("case", ["file", "under_file", "proc"])
def test_doctor_unwritable_nvme_path_fails_with_fix(tmp_path, case):
    f = tmp_path / "f"
    f.write_text("x")
    path = {"file": f, "under_file": f / "nvme", "proc": "/proc"}[case]
    rc, doc = _doctor("--nvme-path", str(path), env_dir=tmp_path / "cache")
    row = next(x for x in doc["findings"] if x["check"] == "nvme path")
    assert rc == 1 and doc["exit_code"] == 1 and row["level"] == "FAIL" and row["fix"], row
    assert str(path) in row["found"]


def test_doctor_table_and_bad_input(tmp_path):
    env = {**os.environ, "TIERLIFT_CACHE_DIR": str(tmp_path), "PYTHONPATH": REPO}
    r = subprocess.run([sys.executable, "-m", "tierlift", "doctor", "--nvme-path", str(tmp_path / "missing")],
                       capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert r.returncode in (0, 1), r.stderr
    assert r.stdout.startswith("LEVEL") and f"(exit {r.returncode}:" in r.stdout
    row = next(line for line in r.stdout.splitlines() if "nvme path" in line)
    assert row.startswith("WARN") and "fix: create it now" in r.stdout  # missing but creatable: a warning
    from tierlift.launch.cli import main
    assert main(["doctor", "--pinned-budget", "12x"]) == 2
    assert main(["doctor", "--nvme-path", " "]) == 2


def test_bytes_arg():
    assert [cmd_doctor._bytes_arg(t) for t in ("4096", "64GiB", "512M", "1.5g", "8 MiB")] == \
           [4096, 64 << 30, 512 * 10**6, 1_500_000_000, 8 << 20]


def test_memlock_below_pinned_budget_fails_with_ulimit_fix(monkeypatch):
    import resource

    from tierlift.offload import host_alloc
    monkeypatch.setattr(resource, "getrlimit", lambda which: (8 << 20, 8 << 20))
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setattr(host_alloc, "_has_cap_ipc_lock", lambda: False)
    rows = cmd_doctor._check_host(_profile(), True, 1 << 30)
    row = next(r for r in rows if r.check == "memlock")
    assert row.level == "FAIL" and "ulimit -l unlimited" in row.fix
    ok = next(r for r in cmd_doctor._check_host(_profile(), False, 1 << 30) if r.check == "memlock")
    assert ok.level == "OK"  # without CUDA host buffers are pageable: memlock does not apply


def test_driver_and_pcie_findings(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    rows = {r.check: r for r in cmd_doctor._check_software(_profile(cuda_driver_version="12.8"), True)}
    assert rows["driver"].level == "FAIL" and "upgrade the NVIDIA driver" in rows["driver"].fix
    rows = cmd_doctor._check_software(_profile(gpus=[_gpu(0), _gpu(1, pcie_width_current=8)]), True)
    assert [r.level for r in rows if r.check == "pcie"] == ["OK", "WARN"]
    gpu = next(r for r in cmd_doctor._check_software(_profile(), False) if r.check == "gpu")
    assert gpu.level == "FAIL" and gpu.fix  # GPUs present but torch cannot use them


# -- GPU machine ----------------------------------------------------------------------------------------
@pytest.mark.gpu
def test_gpu_probe_and_calibration(tmp_path):
    p = probe_node(str(tmp_path))
    assert p.gpus and p.gpus[0].memory_bytes > 0 and p.cuda_version
    cal = calibrate(p, nvme_path=str(tmp_path), quick=True)
    assert cal.h2d_gbps > 0 and cal.d2h_gbps > 0 and cal.duplex_gbps > 0 and cal.gpu_adamw_params_per_s > 0
    lin = torch.nn.Linear(256, 256, device="cuda")
    fwd, bwd = measure_units({"b": (lin, torch.randn(64, 256, device="cuda"))}, target_s=0.05)
    assert fwd["b"] > 0


@pytest.mark.gpu
def test_gpu_doctor(tmp_path):
    rc, doc = _doctor("--nvme-path", str(tmp_path), "--calibrate", env_dir=tmp_path / "cache")
    by = {f["check"]: f for f in doc["findings"]}
    assert by["gpu"]["level"] == "OK" and by["nccl"]["level"] == "OK" and doc["calibration"]["h2d_gbps"] > 0
