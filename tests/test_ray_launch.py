"""The Ray launcher on CPU: torchrun env, collectives, loopback-only listeners, errors.

Each test starts a private local Ray (tens of seconds on 2 cores); the env and
the listener checks share one run.
"""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys
import time

import pytest

pytest.importorskip("ray")
psutil = pytest.importorskip("psutil")

pytestmark = pytest.mark.ray

ENV_KEYS = ["RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"]

# Reports its env and an all_reduce, then holds the run open (ready-N / go files)
# so the test can list the sockets of every process of the live run.
SCRIPT = """
import json, os, sys, time
import torch, torch.distributed as dist
from tierlift.parallel.env import init_distributed, shutdown_distributed
out = sys.argv[1]
init_distributed("cpu")
t = torch.tensor([float(os.environ["RANK"]) + 1.0])
dist.all_reduce(t)
rank = os.environ["RANK"]
keys = {keys!r}
with open(os.path.join(out, f"env-{{rank}}.json"), "w") as f:
    json.dump({{**{{k: os.environ.get(k) for k in keys}}, "sum": t.item(), "cwd": os.getcwd()}}, f)
open(os.path.join(out, f"ready-{{rank}}"), "w").close()
deadline = time.monotonic() + 300
while not os.path.exists(os.path.join(out, "go")) and time.monotonic() < deadline:
    time.sleep(0.2)
dist.barrier()
shutdown_distributed()
print(f"rank {{rank}} done")
""".format(keys=ENV_KEYS)


def _cli(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tierlift", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def _listeners(root: psutil.Process) -> list[tuple[str, str, int]]:
    """(process name, local address, port) of every listening TCP socket of ``root`` and its descendants."""
    found = []
    for p in [root, *root.children(recursive=True)]:
        try:
            conns = p.net_connections(kind="inet")
            name = p.name()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        found += [(name, c.laddr.ip, c.laddr.port) for c in conns if c.status == psutil.CONN_LISTEN]
    return found


def _is_loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip.split("%")[0])
    if getattr(addr, "ipv4_mapped", None) is not None:  # ::ffff:127.0.0.1 from a dual-stack socket
        addr = addr.ipv4_mapped
    return addr.is_loopback


@pytest.fixture(scope="module")
def ray_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("ray_run")
    script = d / "report.py"
    script.write_text(SCRIPT)
    proc = _cli("launch", "--backend", "ray", "--nproc", "2", "--run-dir", str(d / "run"), "--",
                sys.executable, str(script), str(d), cwd=str(d))
    try:
        deadline = time.monotonic() + 480
        while not all((d / f"ready-{r}").exists() for r in range(2)):
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                out, err = proc.communicate()
                pytest.fail(f"ranks never got ready (rc={proc.returncode}):\n{out}\n{err}")
            time.sleep(0.5)
        listeners = _listeners(psutil.Process(proc.pid))
    finally:
        (d / "go").touch()
    out, err = proc.communicate(timeout=300)
    return {"dir": d, "rc": proc.returncode, "out": out, "err": err, "listeners": listeners}


def test_ray_launch_env_and_all_reduce(ray_run):
    assert ray_run["rc"] == 0, ray_run["err"]
    d = ray_run["dir"]
    envs = [json.loads((d / f"env-{r}.json").read_text()) for r in range(2)]
    for r, env in enumerate(envs):
        assert env["RANK"] == str(r) and env["LOCAL_RANK"] == str(r)
        assert env["WORLD_SIZE"] == "2" and env["LOCAL_WORLD_SIZE"] == "2"
        assert env["MASTER_ADDR"] == "127.0.0.1"
        assert env["sum"] == 3.0  # 1 + 2
        assert os.path.samefile(env["cwd"], d)  # the launch directory, as under torchrun
    assert envs[0]["MASTER_PORT"] == envs[1]["MASTER_PORT"]
    # Each rank's output also lands in the run's log files.
    for r in range(2):
        assert f"rank {r} done" in (d / "run" / "logs" / f"rank-{r}.log").read_text()


def test_ray_run_listens_on_loopback_only(ray_run):
    listeners = ray_run["listeners"]
    names = {name for name, _, _ in listeners}
    # The scan must have seen Ray's own daemons, or it proves nothing.
    assert {"gcs_server", "raylet"} <= names, listeners
    exposed = [entry for entry in listeners if not _is_loopback(entry[1])]
    assert not exposed, f"listening beyond loopback: {exposed}"


def test_ray_command_failure_surfaces(tmp_path):
    script = tmp_path / "fail.py"
    script.write_text(
        "import os, sys, time\n"
        "if os.environ['RANK'] == '1':\n"
        "    print('boom from rank 1', file=sys.stderr)\n"
        "    sys.exit(5)\n"
        "time.sleep(120)\n"
        "open(sys.argv[1], 'w').close()\n")
    marker = tmp_path / "rank0-finished"
    proc = _cli("launch", "--backend", "ray", "--nproc", "2", "--", sys.executable, str(script), str(marker))
    out, err = proc.communicate(timeout=480)
    assert proc.returncode == 5, err
    assert "boom from rank 1" in out + err
    assert "[rank 1]" in err and "command exited with code 5" in err
    assert not marker.exists()  # rank 0 was stopped, not waited for


def test_ray_tierlift_error_keeps_message(tmp_path):
    # A real tierlift function that raises ConfigError on every rank.
    code = ("import sys\n"
            "from tierlift.errors import ConfigError\n"
            "from tierlift.launch.ray_launcher import launch_ray\n"
            "try:\n"
            "    launch_ray(nproc=2, device='cpu', target='tierlift.runtime.config:read_config_file',\n"
            f"               kwargs={{'path': {str(tmp_path / 'missing.yaml')!r}}})\n"
            "except ConfigError as e:\n"
            "    print('CAUGHT', e.rank, e.setting, e, file=sys.stderr)\n"
            "    sys.exit(2)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=480)
    assert proc.returncode == 2, proc.stderr
    caught = [ln for ln in proc.stderr.splitlines() if ln.startswith("CAUGHT")]
    assert caught and caught[0].startswith("CAUGHT 0 config"), proc.stderr
    assert "missing.yaml" in caught[0] and "does not exist" in caught[0]
    assert "Error in training function" not in proc.stderr + proc.stdout  # no per-rank traceback without debug
