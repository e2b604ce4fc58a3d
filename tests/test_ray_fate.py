"""A SIGKILLed Ray driver takes its job with it: no rank trains or commits a
checkpoint after it, and no process of the job outlives it by more than a few
seconds (tierlift/launch/ray_fate.py, ray_reaper.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

psutil = pytest.importorskip("psutil")

GONE_WITHIN_S = 20.0  # Ray's own agents linger 60-80 s without the reaper


def _alive(procs):
    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


def _wait_gone(procs):
    deadline = time.monotonic() + GONE_WITHIN_S
    while _alive(procs) and time.monotonic() < deadline:
        time.sleep(0.1)
    return _alive(procs)


DRIVER = """
import os, subprocess, sys, time
from tierlift.launch.ray_fate import JOB_ENV, Reaper
reaper = Reaper()
env = dict(os.environ, **{JOB_ENV: reaper.token})
# A marked child that starts an unmarked grandchild, as raylet starts agents whose
# environment reads empty.
child = subprocess.Popen([sys.executable, "-c", "import subprocess, sys, time; "
                          "g = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'], env={}); "
                          "print(g.pid, flush=True); time.sleep(300)"], env=env, stdout=subprocess.PIPE, text=True)
print(child.pid, child.stdout.readline().strip(), flush=True)
time.sleep(300)
"""


def test_reaper_kills_the_job_and_its_descendants_when_the_driver_dies(tmp_path):
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    driver = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    procs = []
    try:
        procs = [psutil.Process(int(x)) for x in driver.stdout.readline().split()]
        assert len(procs) == 2
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait()
        assert _wait_gone(procs) == []
        assert bystander.poll() is None  # not of the job: left alone
    finally:
        for p in [*_alive(procs), psutil.Process(bystander.pid)]:
            p.kill()
        bystander.wait()


CFG = {
    "model": {"kind": "gpt", "vocab_size": 258, "d_model": 32, "n_layers": 2, "n_heads": 4, "max_seq_len": 32},
    "data": {"source": "synthetic", "seq_len": 32, "synthetic_samples": 4096},
    "train": {"micro_batch_size": 4, "max_steps": 100000, "checkpoint_every": 1, "keep_checkpoints": 100000,
              "log_every": 1000},
    "zero": {"stage": 3},
    "run": {"device": "cpu", "backend": "ray", "nproc": 2},
}


@pytest.mark.ray
@pytest.mark.slow
def test_sigkill_of_ray_driver_stops_ranks_and_ray(tmp_path):
    pytest.importorskip("ray")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(CFG))
    run = tmp_path / "run"
    ck = run / "checkpoints"
    proc = subprocess.Popen([sys.executable, "-m", "tierlift", "train", str(cfg), "--run-dir", str(run)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    job = []
    try:
        deadline = time.monotonic() + 480
        while not (ck.is_dir() and len(os.listdir(ck)) >= 3):
            assert proc.poll() is None and time.monotonic() < deadline, f"run ended early: {proc.returncode}"
            time.sleep(0.2)
        job = psutil.Process(proc.pid).children(recursive=True)  # gcs, raylet, agents, workers, reaper
        assert any("RayTrainWorker" in " ".join(p.cmdline()) for p in _alive(job))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()  # the driver is dead from here on
        committed = set(os.listdir(ck))
        left = _wait_gone(job)
        assert left == [], [(p.pid, p.name()) for p in left]
        assert set(os.listdir(ck)) == committed  # nothing committed after the driver died
    finally:
        for p in _alive(job):
            p.kill()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
