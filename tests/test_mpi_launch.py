"""``--backend mpi``: ranks started by mpiexec (the `mpich` wheel's Hydra) agree on
the torchrun variables through mpi4py and train like the local launcher; a launch
without an MPI process manager, a world of the wrong size and a --nnodes that does
not match are refused in one line.  MPICH's MPIR_CVAR_NUM_CLIQUES splits this
host into fake nodes for the node-local communicator."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import yaml

pytest.importorskip("mpi4py")
MPIEXEC = shutil.which("mpiexec", path=os.path.dirname(sys.executable)) or shutil.which("mpiexec")
pytestmark = pytest.mark.skipif(MPIEXEC is None, reason="no mpiexec (pip install mpich)")

CFG = {
    "model": {"kind": "gpt", "vocab_size": 258, "d_model": 32, "n_layers": 2, "n_heads": 4, "max_seq_len": 32},
    "data": {"source": "synthetic", "seq_len": 32, "synthetic_samples": 4096},
    "train": {"micro_batch_size": 4, "max_steps": 6, "checkpoint_every": 3, "log_every": 3},
    "optimizer": {"lr": 3.0e-3},
    "zero": {"stage": 3},
    "run": {"device": "cpu", "backend": "local", "nproc": 2},
}
TIERLIFT = [sys.executable, "-m", "tierlift"]


def _run(cmd, env_extra=None, timeout=300):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "SLURM_", "OMPI_", "MPIR_"))}
    env.update(env_extra or {})
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def _config(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(CFG))
    return str(path)


def _error_lines(stderr):
    return [line for line in stderr.splitlines() if line.startswith("tierlift: error:")]


@pytest.mark.slow
def test_mpiexec_two_ranks_train_to_the_local_launchers_losses(tmp_path):
    from tierlift.runtime.rundir import read_metrics

    cfg = _config(tmp_path)
    local, mpi = str(tmp_path / "local"), str(tmp_path / "mpi")
    p = _run([*TIERLIFT, "train", cfg, "--run-dir", local])
    assert p.returncode == 0, p.stderr[-3000:]
    p = _run([MPIEXEC, "-n", "2", *TIERLIFT, "train", cfg, "--backend", "mpi", "--run-dir", mpi])
    assert p.returncode == 0, p.stderr[-3000:]
    ref, got = read_metrics(local).to_pydict(), read_metrics(mpi).to_pydict()
    assert got["step"] == ref["step"] == list(range(1, 7))
    assert got["loss"] == pytest.approx(ref["loss"], rel=1e-6, abs=0)
    summary = yaml.safe_load(open(os.path.join(mpi, "summary.json")))
    assert summary["world_size"] == 2


def test_rendezvous_local_ranks_from_the_node_communicator(tmp_path):
    script = tmp_path / "rdv.py"
    script.write_text("import sys\nfrom tierlift.launch.mpi import rendezvous\n"
                      "e = rendezvous(4, nnodes=2)\n"
                      "open(f'{sys.argv[1]}/env{e.rank}', 'w').write(' '.join(map(str, (e.rank, e.local_rank,"
                      " e.local_world_size, e.node_rank, e.master_addr, e.master_port))))\n")
    out = tmp_path / "out"
    out.mkdir()
    p = _run([MPIEXEC, "-n", "4", sys.executable, str(script), str(out)], {"MPIR_CVAR_NUM_CLIQUES": "2"},
             timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = sorted(tuple(f.read_text().split()) for f in out.iterdir())  # one file per rank: no interleaving
    assert [int(r[0]) for r in rows] == [0, 1, 2, 3]
    nodes = {}
    for rank, local_rank, local_size, node, addr, port in rows:
        nodes.setdefault(int(node), []).append(int(local_rank))
        assert local_size == "2" and addr == "127.0.0.1"  # one host: the store stays on loopback
    assert sorted(nodes) == [0, 1] and all(sorted(v) == [0, 1] for v in nodes.values())
    assert len({r[5] for r in rows}) == 1 and int(rows[0][5]) > 0  # rank 0's port reached every rank


def test_plain_launch_without_an_mpi_launcher_is_refused(tmp_path):
    cfg = _config(tmp_path)
    p = _run([*TIERLIFT, "train", cfg, "--backend", "mpi", "--run-dir", str(tmp_path / "run")], timeout=120)
    assert p.returncode == 2, p.stderr[-3000:]
    (line,) = _error_lines(p.stderr)
    assert "run.nproc=2" in line and "1-rank MPI world" in line and "mpiexec -n 2" in line
    assert "Traceback" not in p.stderr


def test_srun_without_pmi_is_refused_naming_mpi_pmi2(tmp_path):
    # What each task of a plain `srun -n 2` sees: Slurm's task variables, no PMI.
    cfg = _config(tmp_path)
    p = _run([*TIERLIFT, "train", cfg, "--backend", "mpi", "--run-dir", str(tmp_path / "run")],
             {"SLURM_STEP_NUM_TASKS": "2", "SLURM_PROCID": "1"}, timeout=120)
    assert p.returncode == 2
    (line,) = _error_lines(p.stderr)
    assert "without PMI" in line and "srun --mpi=pmi2" in line


@pytest.mark.parametrize("n, extra, env, needle", [
    (3, [], {}, "run.nproc=2: the MPI launch has 3 ranks"),
    (2, ["--nnodes", "3"], {}, "--nnodes=3: does not divide the world of 2"),
    (2, ["--nnodes", "1"], {"MPIR_CVAR_NUM_CLIQUES": "2"}, "--nnodes=1: the MPI launch spans 2 node(s)"),
])
def test_wrong_world_or_nodes_is_one_line_from_rank_0(tmp_path, n, extra, env, needle):
    cfg = _config(tmp_path)
    p = _run([MPIEXEC, "-n", str(n), *TIERLIFT, "train", cfg, "--backend", "mpi",
              "--run-dir", str(tmp_path / "run"), *extra], env, timeout=120)
    assert p.returncode == 2, p.stderr[-3000:]
    (line,) = _error_lines(p.stderr)  # the other ranks exit 2 without repeating it
    assert needle in line and "Fix:" in line
