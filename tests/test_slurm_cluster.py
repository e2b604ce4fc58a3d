"""The rendered sbatch script (MPI mode) on a real Slurm cluster of two nodes on
this machine: Debian's slurm-wlm and munge, one slurmctld and two `slurmd -N`
(n1, n2), all listening on 127.0.0.1, with a private munge socket and key.

Checks: the job completes with a falling loss on 2 ranks (one per node, through
`srun --mpi=pmi2`), `scontrol requeue` mid-run resumes from the checkpoint onto
the uninterrupted loss curve, and a failing job's exit code reaches Slurm.

Needs root (slurmd) and the daemons: `apt-get install -y slurm-wlm munge`
(~10 s); skipped otherwise."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import yaml

pytest.importorskip("mpi4py")
_TOOLS = ("slurmctld", "slurmd", "sbatch", "scontrol", "sinfo", "munged")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(any(shutil.which(t) is None for t in _TOOLS) or os.geteuid() != 0,
                       reason="needs root and Debian's slurm-wlm + munge (apt-get install -y slurm-wlm munge)"),
]

CFG = {
    "model": {"kind": "gpt", "vocab_size": 258, "d_model": 32, "n_layers": 2, "n_heads": 4, "max_seq_len": 32},
    "data": {"source": "synthetic", "seq_len": 32, "synthetic_samples": 4096},
    "train": {"micro_batch_size": 4, "grad_accum_steps": 2, "max_steps": 24, "checkpoint_every": 4,
              "log_every": 4},
    "optimizer": {"lr": 3.0e-3, "grad_clip": 1.0},
    "scheduler": {"warmup_steps": 4, "total_steps": 24},
    "zero": {"stage": 3},
    "run": {"device": "cpu"},
}
_WAIT_S = 300  # per job; the tiny GPT takes ~20 s on two busy cores


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    def __init__(self, root):
        self.root, self.env = root, dict(os.environ, SLURM_CONF=str(root / "slurm.conf"))
        for k in [k for k in self.env if k.startswith(("SLURM_", "PMI_", "MPIR_"))]:
            if k != "SLURM_CONF":
                del self.env[k]
        # The `mpich` wheel speaks PMI-1 to Slurm's pmi2 plugin; its default UCX netmod puts
        # business cards long enough to be split, and slurmstepd then rejects the request
        # ("value not properly terminated") in about one job of three.  OFI over TCP keeps them short.
        self.env.update(MPIR_CVAR_CH4_NETMOD="ofi", FI_PROVIDER="tcp")

    def run(self, *cmd, check=True):
        return subprocess.run(cmd, capture_output=True, text=True, env=self.env, timeout=60, check=check)

    def state(self, job: str) -> dict[str, str]:
        out = self.run("scontrol", "-o", "show", "job", job).stdout
        return dict(w.split("=", 1) for w in out.split() if "=" in w)

    def wait(self, job: str, states: set[str], timeout: float = _WAIT_S) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            s = self.state(job)
            if s["JobState"] in states:
                return s
            time.sleep(1)
        raise AssertionError(f"job {job} still {s['JobState']} after {timeout} s; log:\n{self.log(job)}")

    def log(self, job: str) -> str:
        path = self.root / f"job-{job}.out"
        return path.read_text().replace("\r", "\n") if path.exists() else "(no output file)"

    def submit(self, script: str, *extra: str) -> str:
        return self.run("sbatch", "--parsable", "-o", str(self.root / "job-%j.out"), *extra, script).stdout.strip()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("slurm")
    root.chmod(0o755)  # munged wants its socket directory searchable
    (root / "munge.key").write_bytes(os.urandom(1024))
    (root / "munge.key").chmod(0o600)
    for d in ("state", "spool-n1", "spool-n2"):
        (root / d).mkdir()
    host = socket.gethostname()
    ctld_port, d1, d2 = _free_port(), _free_port(), _free_port()
    (root / "slurm.conf").write_text(f"""\
ClusterName=tierlift-test
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
AuthType=auth/munge
AuthInfo=socket={root}/munge.sock
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool-%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd-%n.log
ProctrackType=proctrack/pgid
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
NodeName=n1 NodeHostname={host} NodeAddr=127.0.0.1 Port={d1} CPUs=1 State=UNKNOWN
NodeName=n2 NodeHostname={host} NodeAddr=127.0.0.1 Port={d2} CPUs=1 State=UNKNOWN
PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP
""")
    c = Cluster(root)
    c.run("munged", "--force", f"--socket={root}/munge.sock", f"--key-file={root}/munge.key",
          f"--pid-file={root}/munged.pid", f"--log-file={root}/munged.log", f"--seed-file={root}/munged.seed")
    try:
        c.run("slurmctld", "-i", "-f", str(root / "slurm.conf"))
        for node in ("n1", "n2"):
            c.run("slurmd", "-f", str(root / "slurm.conf"), "-N", node)
        deadline = time.monotonic() + 60
        while c.run("sinfo", "-h", "-o", "%T", check=False).stdout.split() != ["idle"]:
            assert time.monotonic() < deadline, (root / "slurmctld.log").read_text()[-3000:]
            time.sleep(0.5)
        yield c
    finally:
        c.run("scancel", "--full", "-u", "root", check=False)
        for pid_file in ("slurmd-n1.pid", "slurmd-n2.pid", "slurmctld.pid", "munged.pid"):
            path = root / pid_file
            if path.exists():  # only the daemons this fixture started, by their pid
                try:
                    os.kill(int(path.read_text().split()[0]), signal.SIGTERM)
                except (ProcessLookupError, ValueError):
                    pass


def _render(cluster, run_dir, name) -> str:
    cfg = cluster.root / f"{name}.yaml"
    cfg.write_text(yaml.safe_dump(CFG))
    script = cluster.root / f"{name}.sbatch"
    p = subprocess.run([sys.executable, "-m", "tierlift", "render", "slurm", str(cfg), "--nodes", "2",
                        "--gpus-per-node", "1", "--device", "cpu", "--backend", "mpi", "--run-dir", str(run_dir),
                        "--out", str(script)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    return str(script)


def _losses(run_dir):
    from tierlift.runtime.rundir import read_metrics

    t = read_metrics(str(run_dir)).to_pydict()
    return dict(zip(t["step"], t["loss"]))


@pytest.fixture(scope="module")
def reference(cluster):
    """One uninterrupted 2-node MPI job: its losses."""
    run_dir = cluster.root / "ref"
    job = cluster.submit(_render(cluster, run_dir, "ref"))
    s = cluster.wait(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"})
    assert (s["JobState"], s["ExitCode"]) == ("COMPLETED", "0:0"), cluster.log(job)
    assert s["NodeList"] == "n[1-2]"
    return _losses(run_dir)


def test_mpi_job_on_two_nodes_completes_with_falling_loss(reference):
    assert sorted(reference) == list(range(1, 25))
    assert reference[24] < 0.9 * reference[1], reference


def test_requeue_mid_run_resumes_from_the_checkpoint(cluster, reference):
    run_dir = cluster.root / "requeued"
    job = cluster.submit(_render(cluster, run_dir, "requeued"))
    ckpts = run_dir / "checkpoints"
    deadline = time.monotonic() + _WAIT_S
    while not (ckpts.is_dir() and any(d.name.startswith("step-") for d in ckpts.iterdir())):
        assert time.monotonic() < deadline and cluster.state(job)["JobState"] in ("PENDING", "RUNNING"), \
            cluster.log(job)
        time.sleep(0.2)
    cluster.run("scontrol", "requeue", job)
    cluster.wait(job, {"PENDING"})
    cluster.run("scontrol", "update", f"JobId={job}", "StartTime=now")  # Slurm holds a requeued job 2 min
    s = cluster.wait(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"})
    log = cluster.log(job)
    assert (s["JobState"], s["ExitCode"], s["Restarts"]) == ("COMPLETED", "0:0", "1"), log
    assert "(restart count 1)" in log and "(resuming)" in log, log
    got = _losses(run_dir)
    assert sorted(got) == list(range(1, 25))
    for step in range(1, 25):
        assert got[step] == pytest.approx(reference[step], rel=1e-6, abs=0), (step, got[step], reference[step])


def test_failing_job_exit_code_reaches_slurm(cluster):
    # One node instead of the two the script's config asks for: every rank refuses (exit 2).
    job = cluster.submit(_render(cluster, cluster.root / "failing", "failing"), "--nodes=1")
    s = cluster.wait(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"})
    log = cluster.log(job)
    assert (s["JobState"], s["ExitCode"]) == ("FAILED", "2:0"), log
    assert "tierlift: error: run.nproc=2" in log
