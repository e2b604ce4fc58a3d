"""Failures that must reach the user as one line (exit 2, no traceback) and change
nothing on disk (issue 17): unusable output directories, a refused --resume, a full
disk under the logs, a rank whose peer failed first (no gloo noise), and an NVMe run
that must exit 0 after fit() returned.  Through the real CLI or launcher where it
matters, in subprocesses, on CPU.  The Ray driver's SIGKILL is tests/test_ray_fate.py."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time

import pytest
import yaml

CFG = {
    "model": {"kind": "gpt", "vocab_size": 258, "d_model": 32, "n_layers": 2, "n_heads": 4, "max_seq_len": 32},
    "data": {"source": "synthetic", "seq_len": 32, "synthetic_samples": 256},
    "train": {"micro_batch_size": 4, "max_steps": 2, "checkpoint_every": 2, "log_every": 1},
    "zero": {"stage": 3},
    "run": {"device": "cpu", "backend": "local", "nproc": 1},
}


def tierlift(*args, prefix=(), **kw):
    return subprocess.run([*prefix, sys.executable, "-m", "tierlift", *args], capture_output=True, text=True,
                          timeout=300, **kw)


def assert_one_line(p, *needles):
    assert p.returncode == 2, (p.returncode, p.stderr[-3000:])
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("tierlift: error: "), p.stderr
    assert "Fix:" in lines[0] and all(n in lines[0] for n in needles), lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A config file and a finished 1-rank run with one checkpoint (seconds)."""
    d = tmp_path_factory.mktemp("trained")
    cfg = d / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(CFG))
    p = tierlift("train", str(cfg), "--run-dir", str(d / "run"))
    assert p.returncode == 0, p.stderr[-3000:]
    text = d / "corpus.txt"
    text.write_text("some text to tokenize\n")
    return {"cfg": str(cfg), "run": str(d / "run"), "text": str(text)}


def _bad_dirs(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("keep me\n")
    return {"file in path": (str(blocker / "sub"), "has a file in its path"),
            "a file": (str(blocker), None),  # each command words this its own way
            "under /proc": ("/proc/tierlift-test-dir", "cannot create the directory"),
            "/proc dir": ("/proc/self", "cannot write a file there")}


def _command(kind, trained, out):
    if kind == "train":
        return ("train", trained["cfg"], "--run-dir", out)
    if kind == "export":
        return ("export", trained["run"], "--out", out)
    return ("data", "prepare", trained["text"], "--out", out)


@pytest.mark.parametrize("kind", ["train", "export", "prepare"])
@pytest.mark.parametrize("case", ["file in path", "a file", "under /proc", "/proc dir"])
def test_unusable_output_dir_is_one_line(tmp_path, trained, kind, case):
    out, needle = _bad_dirs(tmp_path)[case]
    p = tierlift(*_command(kind, trained, out))
    if case == "/proc dir" and kind != "train":
        needle = None  # refused earlier, as not empty
    needles = [needle, "--run-dir" if kind == "train" else "--out"] if needle else []
    assert_one_line(p, os.path.abspath(out), *needles)
    assert (tmp_path / "a-file").read_text() == "keep me\n"


def test_read_only_mount_is_one_line(tmp_path, trained):
    # A real read-only mount in a private mount namespace: as root, permission
    # bits do not stop writes, a read-only file system does.
    ro = tmp_path / "ro"
    ro.mkdir()
    probe = subprocess.run(["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o ro tmpfs {ro} && ! touch {ro}/x"],
                           capture_output=True)
    if probe.returncode != 0:
        pytest.skip("cannot make a private read-only mount here (needs unshare and mount rights)")
    for kind in ("train", "export", "prepare"):
        out = str(ro / "out")
        p = tierlift(*_command(kind, trained, out),
                     prefix=("unshare", "-m", "sh", "-c", f'mount -t tmpfs -o ro tmpfs {ro} && exec "$@"', "sh"))
        assert_one_line(p, "Read-only file system")


def _snapshot(run_dir):
    """sha256 of every file; logs (append-only) as their bytes, to check for a prefix."""
    out = {}
    for root, _, files in os.walk(run_dir):
        for name in files:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, run_dir)
            data = open(path, "rb").read()
            out[rel] = data if rel.startswith("logs" + os.sep) or rel == "train.log" else hashlib.sha256(data).hexdigest()
    return out


@pytest.mark.slow
def test_refused_resume_changes_nothing_in_run_dir(tmp_path, trained):
    run = str(tmp_path / "run")
    shutil.copytree(trained["run"], run)
    before = _snapshot(run)
    # Two ranks, so the ranks get the config from the launcher, not from config.yaml.
    p = tierlift("train", trained["cfg"], "--run-dir", run, "--resume", "--nproc", "2",
                 "--set", "model.d_model=64", "--steps", "4")
    assert p.returncode == 2, p.stderr[-3000:]
    assert "shape" in p.stderr and "Traceback" not in p.stderr, p.stderr[-3000:]
    after = _snapshot(run)
    state = {k for k, v in before.items() if isinstance(v, str)}
    assert {k: after.get(k) for k in state} == {k: before[k] for k in state}
    # Only the attempt's output may be added: appended to the logs, nothing else new.
    for k in set(after) - state:
        assert k.startswith("logs" + os.sep) or k == "train.log", k
        assert after[k].startswith(before.get(k, b"")), k


RANK_SAYS = """
import os, sys, time
for i in range(50):
    print("line", i, "of rank", os.environ["RANK"])
sys.stdout.flush()
# Both ranks have printed before either fails: the launcher stops the survivors of a
# failed rank, and on a loaded machine the second rank may not have started yet.
open(os.path.join(os.path.dirname(__file__), "printed-" + os.environ["RANK"]), "w").close()
deadline = time.time() + 60
while time.time() < deadline and not all(
        os.path.exists(os.path.join(os.path.dirname(__file__), "printed-%d" % r)) for r in range(2)):
    time.sleep(0.05)
print("tierlift: error: [rank %s] the rank's own clear error" % os.environ["RANK"], file=sys.stderr)
sys.exit(2)
"""


def test_full_disk_under_log_keeps_ranks_errors_on_console(tmp_path, capfd, monkeypatch):
    from tierlift.launch import local

    # /dev/full fails every write with ENOSPC, as a full run directory does.
    monkeypatch.setattr(local, "_open_log", lambda path: open("/dev/full", "ab"))
    script = tmp_path / "rank.py"
    script.write_text(RANK_SAYS)
    rc = local.launch_local([sys.executable, str(script)], 2, log_dir=str(tmp_path / "logs"), grace_s=30)
    out, err = capfd.readouterr()
    assert rc == 2
    for r in range(2):
        assert f"[rank {r}] line 49 of rank {r}" in out
        assert f"[rank {r}] tierlift: error: [rank {r}] the rank's own clear error" in err
        assert err.count(f"rank-{r}.log (No space left on device)") == 1, err
    assert "Traceback" not in err


def test_rank_log_close_on_full_disk_does_not_raise(monkeypatch, capsys):
    from tierlift.launch import local

    monkeypatch.setattr(local, "_open_log", lambda path: open("/dev/full", "ab", buffering=1 << 20))
    log = local.RankLog("x/rank-0.log")
    log.file.write(b"buffered, fails only when flushed at close\n")  # a write that close() must flush
    log.close()
    log.write(b"after close: dropped\n")
    assert capsys.readouterr().err.count("cannot write x/rank-0.log (No space left on device)") == 1


@pytest.mark.slow
def test_truncated_nvme_file_is_one_clear_line_without_peer_noise(tmp_path):
    cfg = {k: dict(v) for k, v in CFG.items()}
    cfg["train"].update(max_steps=5000, checkpoint_every=2, keep_checkpoints=1)
    cfg["run"]["nproc"] = 2
    cfg["offload"] = {"optimizer": {"kind": "nvme", "path": str(tmp_path / "nvme")}}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "tierlift", "train", str(path), "--run-dir", str(run)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # Once the loop runs (a checkpoint is committed), cut rank 1's extent file.
        deadline = time.monotonic() + 240
        while not (run / "checkpoints").is_dir() or not os.listdir(run / "checkpoints"):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.1)
        with open(tmp_path / "nvme" / "tierlift-rank00001.extents", "r+b") as f:
            f.truncate(0)
        _, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 2, err[-3000:]
    assert "truncated" in err and "tierlift-rank00001.extents" in err, err[-3000:]
    for noise in ("Traceback", "gloo", "Connection closed", "RuntimeError"):
        assert noise not in err, err[-3000:]


EXIT_WITH_IO_IN_FLIGHT = """
import atexit, sys
from tierlift.offload.extents import plan_extents
from tierlift.offload.nvme import NVMeFile, aligned_empty
from tierlift.offload.policy import AioConfig
plan = plan_extents([((i, "state"), 1 << 20) for i in range(4)])
f = NVMeFile(sys.argv[1], 0, plan, AioConfig(block_size=8192, queue_depth=2, threads=2))
bufs = [aligned_empty(1 << 20) for _ in range(4)]
for i, b in enumerate(bufs):
    f.write((i, "state"), b)  # left in flight, as fit() leaves its last write-behind
atexit._run_exitfuncs()  # what the interpreter runs before it finalizes
print("ALIVE", sum(t.is_alive() for t in f._workers), "PENDING", f._pending)
"""


def test_nvme_workers_are_stopped_before_the_interpreter_finalizes(tmp_path):
    # A worker still inside a torch op at finalization aborts the process after a
    # good run (exit 134; torchrun says 1): the exit hooks must leave none running.
    script = tmp_path / "exit.py"
    script.write_text(EXIT_WITH_IO_IN_FLIGHT)
    p = subprocess.run([sys.executable, str(script), str(tmp_path / "nvme")], capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "ALIVE 0 PENDING 0" in p.stdout, p.stdout + p.stderr[-3000:]


def test_run_log_on_full_disk_warns_once_and_console_keeps_errors(capsys):
    import io
    import logging

    from tierlift.runtime.rundir import RunLogHandler

    logger = logging.getLogger("tierlift.test_full_disk")
    logger.propagate = False
    console = io.StringIO()
    fh = RunLogHandler("/dev/full")  # every write fails with ENOSPC, as on a full disk
    logger.handlers = [fh, logging.StreamHandler(console)]
    try:
        for i in range(3):
            logger.error("the rank's own error %d", i)
    finally:
        logger.handlers = []
        fh.close()  # must not raise either
    assert console.getvalue().splitlines() == [f"the rank's own error {i}" for i in range(3)]
    err = capsys.readouterr().err
    assert err.count("cannot write /dev/full (No space left on device)") == 1, err
    assert "Logging error" not in err and "Traceback" not in err, err


SAME_ERROR = """
import os, sys
print("tierlift: error: checkpoint dir='x': shapes differ. Fix: use the old config.", file=sys.stderr)
print("rank", os.environ["RANK"], "done", file=sys.stderr)
"""  # exits 0: no rank is stopped before it has printed


def test_same_error_from_every_rank_reaches_console_once(tmp_path, capfd):
    from tierlift.launch.local import launch_local

    script = tmp_path / "rank.py"
    script.write_text(SAME_ERROR)
    rc = launch_local([sys.executable, str(script)], 3, log_dir=str(tmp_path / "logs"), grace_s=30)
    err = capfd.readouterr().err
    assert rc == 0
    assert err.count("tierlift: error: checkpoint dir='x': shapes differ.") == 1, err
    assert all(f"[rank {r}] rank {r} done" in err for r in range(3)), err
    for r in range(3):  # each rank's own log keeps its copy
        assert "shapes differ" in (tmp_path / "logs" / f"rank-{r}.log").read_text()


SCRIPT_ENDS_WITH_WORKER_IN_TORCH_OP = """
import sys, torch
from tierlift.offload import nvme
from tierlift.offload.extents import plan_extents
from tierlift.offload.policy import AioConfig
busy, write = torch.empty(1 << 18), nvme.NVMeFile._pwrite
def slow_disk_write(self, view, off, h):  # a worker in torch (C++) ops, GIL released, when the script ends
    for _ in range(3000):
        busy.mul_(1.0001)
    write(self, view, off, h)
nvme.NVMeFile._pwrite = slow_disk_write
f = nvme.NVMeFile(sys.argv[1], 0, plan_extents([((i, "state"), 1 << 16) for i in range(4)]),
                  AioConfig(block_size=1 << 16, queue_depth=2, threads=2))
bufs = [nvme.aligned_empty(1 << 16) for _ in range(4)]
for i, b in enumerate(bufs):
    f.write((i, "state"), b)
"""


def test_script_ending_with_nvme_io_in_flight_exits_0(tmp_path):
    # Without the exit hook this aborts ("terminate called without an active
    # exception", exit 134) in about 2 of 3 runs; three runs all exiting 0 rule it out.
    script = tmp_path / "ends.py"
    script.write_text(SCRIPT_ENDS_WITH_WORKER_IN_TORCH_OP)
    for i in range(3):
        p = subprocess.run([sys.executable, str(script), str(tmp_path / f"nvme{i}")], capture_output=True,
                           text=True, timeout=300)
        assert p.returncode == 0 and "terminate called" not in p.stderr, (p.returncode, p.stderr[-2000:])


def test_unwritable_config_yaml_is_one_line(tmp_path, trained):
    run = tmp_path / "run"
    (run / "config.yaml").mkdir(parents=True)  # the rename onto it fails, as on a full disk
    p = tierlift("train", trained["cfg"], "--run-dir", str(run))
    assert_one_line(p, "--run-dir", "cannot write", "config.yaml")


def test_only_peer_lost_ranks_still_get_one_line(tmp_path, capfd):
    from tierlift.launch.local import launch_local
    from tierlift.launch.worker import PEER_LOST_EXIT

    script = tmp_path / "rank.py"
    script.write_text(f"import sys; sys.exit({PEER_LOST_EXIT})")
    rc = launch_local([sys.executable, str(script)], 2, grace_s=30, peer_lost_code=PEER_LOST_EXIT)
    err = capfd.readouterr().err
    assert rc == PEER_LOST_EXIT
    assert err.count("tierlift: error: ") == 1 and "no rank said why" in err and "--debug" in err, err
