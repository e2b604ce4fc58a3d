"""Torchrun environment, ports and the local launcher (CPU, gloo)."""

from __future__ import annotations

import io
import ipaddress
import json
import socket
import subprocess
import sys

import pytest

from tierlift.errors import LaunchError
from tierlift.parallel.env import DistEnv
from tierlift.launch.local import launch_local, pump_lines
from tierlift.launch.ports import check_port_free, find_free_port, resolve_master_port

ENV_KEYS = ["RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"]


# -- DistEnv -----------------------------------------------------------------------

def test_dist_env_round_trip():
    env = DistEnv(rank=3, local_rank=1, world_size=4, local_world_size=2, master_addr="10.0.0.7",
                  master_port=29511, node_rank=1)
    environ = env.to_environ()
    assert environ["RANK"] == "3" and environ["LOCAL_WORLD_SIZE"] == "2" and environ["MASTER_PORT"] == "29511"
    assert DistEnv.from_environ(environ) == env


def test_dist_env_node_rank_fallbacks():
    base = {"RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4",
            "MASTER_ADDR": "h", "MASTER_PORT": "1234"}
    assert DistEnv.from_environ(base).node_rank == 1  # RANK // LOCAL_WORLD_SIZE
    assert DistEnv.from_environ({**base, "GROUP_RANK": "7"}).node_rank == 7  # torchrun's name


@pytest.mark.parametrize("change, name", [
    ({"RANK": None}, "RANK"),
    ({"MASTER_ADDR": None}, "MASTER_ADDR"),
    ({"LOCAL_WORLD_SIZE": None}, "LOCAL_WORLD_SIZE"),
    ({"WORLD_SIZE": "two"}, "WORLD_SIZE"),
    ({"RANK": "2"}, "RANK"),  # rank >= world size
    ({"LOCAL_RANK": "2"}, "LOCAL_RANK"),  # local rank >= local world size
    ({"MASTER_PORT": "70000"}, "MASTER_PORT"),
])
def test_dist_env_validation_names_the_variable(change, name):
    environ = {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    for k, v in change.items():
        if v is None:
            environ.pop(k)
        else:
            environ[k] = v
    with pytest.raises(LaunchError) as info:
        DistEnv.from_environ(environ)
    assert info.value.setting == name
    assert name in str(info.value) and "Fix:" in str(info.value)


def test_dist_env_single_process_without_variables():
    assert DistEnv.from_environ({}, allow_single=True) == DistEnv()
    with pytest.raises(LaunchError):
        DistEnv.from_environ({})


# -- ports -------------------------------------------------------------------------

def test_ports():
    port = find_free_port()
    check_port_free(port)
    assert resolve_master_port(port) == port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        taken = s.getsockname()[1]
        with pytest.raises(LaunchError) as info:
            check_port_free(taken, setting="--master-port")
        assert info.value.setting == "--master-port" and info.value.value == taken
        assert "port in use" in str(info.value) and "0 to pick a free one" in str(info.value)
    assert resolve_master_port(0) > 0


# -- local launcher ------------------------------------------------------------------

class _Chunks(io.RawIOBase):
    """A pipe that delivers the given chunks one read at a time."""

    def __init__(self, chunks):
        self.chunks = list(chunks)

    def readable(self):
        return True

    def readinto(self, buf):
        if not self.chunks:
            return 0
        c = self.chunks.pop(0)
        buf[:len(c)] = c
        return len(c)


def test_pump_prefixes_lines_and_progress_updates():
    console, log = io.StringIO(), io.BytesIO()
    stream = io.BufferedReader(_Chunks([b"a\nstep 1\r", b"\nstep 2\rstep 3\r", b"bad \xff\r\nend"]))
    log.close = lambda: None
    pump_lines(stream, console, "[rank 1] ", log)
    assert console.getvalue() == ("[rank 1] a\n[rank 1] step 1\r\n[rank 1] step 2\r[rank 1] step 3\r"
                                  "[rank 1] bad \ufffd\r\n[rank 1] end\n")
    assert log.getvalue() == b"a\nstep 1\r\nstep 2\rstep 3\rbad \xff\r\nend"


REPORT = """
import ipaddress, json, os, sys
import psutil, torch, torch.distributed as dist
from tierlift.parallel.env import init_distributed, shutdown_distributed
dev = init_distributed("cpu")
t = torch.tensor([float(os.environ["RANK"]) + 1.0])
dist.all_reduce(t)
listen = [c.laddr.ip for c in psutil.Process().net_connections("inet") if c.status == "LISTEN"]
rec = {k: os.environ[k] for k in %r}
rec.update(sum=t.item(), device=str(dev), listen=listen, threads=torch.get_num_threads())
with open(os.path.join(sys.argv[1], "rank-%%s.json" %% os.environ["RANK"]), "w") as f:
    json.dump(rec, f)
print("hello from", os.environ["RANK"])
print("warn from", os.environ["RANK"], file=sys.stderr)
shutdown_distributed()
""" % (ENV_KEYS,)


def test_local_launch_two_ranks(tmp_path, capfd):
    script = tmp_path / "report.py"
    script.write_text(REPORT)
    logs = tmp_path / "logs"
    rc = launch_local([sys.executable, str(script), str(tmp_path)], 2, log_dir=str(logs), run_dir=str(tmp_path))
    out, err = capfd.readouterr()
    assert rc == 0, err
    recs = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in range(2)]
    for r, rec in enumerate(recs):
        assert rec["RANK"] == str(r) and rec["LOCAL_RANK"] == str(r)
        assert rec["WORLD_SIZE"] == "2" and rec["LOCAL_WORLD_SIZE"] == "2"
        assert rec["MASTER_ADDR"] == "127.0.0.1"
        assert rec["sum"] == 3.0
        assert rec["device"] == "cpu"
        # The rendezvous store and gloo bind to loopback only.
        assert rec["listen"] and all(ipaddress.ip_address(ip).is_loopback for ip in rec["listen"]), rec["listen"]
    assert recs[0]["MASTER_PORT"] == recs[1]["MASTER_PORT"]
    assert "[rank 0] hello from 0" in out and "[rank 1] hello from 1" in out
    assert "[rank 1] warn from 1" in err
    log1 = (logs / "rank-1.log").read_text()
    assert "hello from 1" in log1 and "warn from 1" in log1


FAIL = """
import os, sys, time
out = sys.argv[1]
if os.environ["RANK"] == "1":
    # Fail only once rank 0 is surely running, so the launcher must stop it.
    while not os.path.exists(os.path.join(out, "rank0.pid")):
        time.sleep(0.05)
    sys.exit(3)
with open(os.path.join(out, "rank0.pid"), "w") as f:
    f.write(str(os.getpid()))
time.sleep(60)
open(os.path.join(out, "rank0.finished"), "w").close()
"""


def test_local_launch_failure_stops_other_ranks(tmp_path):
    psutil = pytest.importorskip("psutil")
    script = tmp_path / "fail.py"
    script.write_text(FAIL)
    rc = launch_local([sys.executable, str(script), str(tmp_path)], 2, grace_s=2.0)
    assert rc == 3
    pid = int((tmp_path / "rank0.pid").read_text())
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert not (tmp_path / "rank0.finished").exists()  # killed, not waited for


def test_local_launch_exit_code_of_signal(tmp_path):
    script = tmp_path / "kill.py"
    script.write_text("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n")
    assert launch_local([sys.executable, str(script)], 1) == 128 + 9


def test_local_launch_refuses_multi_node():
    with pytest.raises(LaunchError) as info:
        launch_local([sys.executable, "-c", "pass"], 2, nnodes=2)
    assert "--backend ray" in str(info.value)


def test_cli_launch_port_in_use():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        proc = subprocess.run([sys.executable, "-m", "tierlift", "launch", "--backend", "local", "--nproc", "2",
                               "--master-port", str(port), "--", sys.executable, "-c", "pass"],
                              capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "port in use" in proc.stderr and f"--master-port={port}" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_launch_local_runs_command(tmp_path):
    script = tmp_path / "env.py"
    script.write_text("import os\nprint('R', os.environ['RANK'], os.environ['WORLD_SIZE'], "
                      "os.environ['TIERLIFT_RUN_DIR'])\n")
    proc = subprocess.run([sys.executable, "-m", "tierlift", "launch", "--backend", "local", "--nproc", "2",
                           "--run-dir", str(tmp_path / "run"), "--", sys.executable, str(script)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert f"[rank 1] R 1 2 {tmp_path / 'run'}" in proc.stdout
    assert (tmp_path / "run" / "logs" / "rank-0.log").read_text().startswith("R 0 2")


def test_rank_env_asks_for_expandable_segments_unless_the_user_set_the_allocator():
    from tierlift.launch.local import rank_env
    env = rank_env(DistEnv(), nproc=1, base={"PATH": "/bin"})
    assert env["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    mine = rank_env(DistEnv(), nproc=1, base={"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:512"})
    assert mine["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:512"
