"""`tierlift render k8s|slurm`: the RayJob validates strictly against KubeRay
v1.7.0's CRD (tests/data/kuberay/), the sbatch scripts parse with `bash -n` and
carry what the modes need, and bad options are one line with exit 2."""

from __future__ import annotations

import copy
import lzma
import os
import shlex
import subprocess
import sys

import pytest
import yaml

from tierlift.launch.cli import main
from tierlift.runtime.config import TrainConfig

jsonschema = pytest.importorskip("jsonschema")

CRD = os.path.join(os.path.dirname(__file__), "data", "kuberay", "ray.io_rayjobs-v1.7.0.yaml.xz")
CFG = {
    "model": {"kind": "gpt", "vocab_size": 258, "d_model": 32, "n_layers": 2, "n_heads": 4, "max_seq_len": 32},
    "data": {"source": "synthetic", "seq_len": 32},
    "train": {"micro_batch_size": 4, "max_steps": 6},
    "zero": {"stage": 3},
    "run": {"dir": "runs/My_Run.1", "device": "cpu", "backend": "local", "nproc": 2},
}


def _strict(node):
    """The CRD schema with unknown fields refused: additionalProperties false
    wherever properties are listed and unknown fields are not preserved."""
    if isinstance(node, list):
        return [_strict(v) for v in node]
    if not isinstance(node, dict):
        return node
    out = {k: _strict(v) for k, v in node.items()}
    if "properties" in out and "additionalProperties" not in out \
            and not out.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


@pytest.fixture(scope="module")
def validator():
    with lzma.open(CRD, "rt", encoding="utf-8") as f:
        crd = yaml.load(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    assert crd["spec"]["names"]["kind"] == "RayJob"
    return jsonschema.Draft7Validator(_strict(v1["schema"]["openAPIV3Schema"]))


def _config(tmp_path, **offload):
    cfg = copy.deepcopy(CFG)
    if offload:
        cfg["offload"] = offload
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _render(capsys, *argv):
    rc = main(["render", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _errors(validator, doc):
    return sorted(f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc))


@pytest.mark.parametrize("nodes", [1, 2, 16])
@pytest.mark.parametrize("pvc", [None, "ckpt-claim"])
def test_rayjob_validates_strictly_against_the_kuberay_crd(tmp_path, capsys, validator, nodes, pvc):
    cfg = _config(tmp_path, optimizer={"kind": "nvme", "path": str(tmp_path / "nvme")})
    rc, out, err = _render(capsys, "k8s", cfg, "--nodes", str(nodes), "--gpus-per-node", "8",
                           "--image", "ghcr.io/me/tierlift:0.1", *(["--pvc", pvc] if pvc else []))
    assert rc == 0, err
    config_map, rayjob = yaml.safe_load_all(out)
    assert _errors(validator, rayjob) == []
    assert rayjob["apiVersion"] == "ray.io/v1" and rayjob["kind"] == "RayJob"
    assert rayjob["metadata"]["name"] == "my-run-1"  # a DNS label from run.dir's last part
    spec = rayjob["spec"]
    assert spec["backoffLimit"] >= 1
    (workers,) = spec["rayClusterSpec"]["workerGroupSpecs"]
    assert workers["replicas"] == workers["minReplicas"] == workers["maxReplicas"] == nodes
    pod = workers["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 8
    volumes = {v["name"]: v for v in pod["volumes"]}
    shared = volumes["shared"]
    assert (shared["persistentVolumeClaim"]["claimName"] == pvc) if pvc else ("emptyDir" in shared)
    assert ("no --pvc" in err) == (pvc is None)
    nvme = [v["hostPath"]["path"] for v in pod["volumes"] if "hostPath" in v]
    assert nvme == [str(tmp_path / "nvme")]
    assert {m["mountPath"] for m in pod["containers"][0]["volumeMounts"]} >= {"/shared", str(tmp_path / "nvme")}
    # The driver's command: the config from the ConfigMap, Ray backend over the whole cluster, resume when
    # the shared run directory holds a checkpoint.
    entry = spec["entrypoint"]
    assert "tierlift train /etc/tierlift/config.yaml --backend ray" in entry
    assert f"--nnodes {nodes} --nproc-per-node 8" in entry and "then R=--resume" in entry
    resolved = TrainConfig.from_dict(yaml.safe_load(config_map["data"]["config.yaml"]))
    assert (resolved.run.nproc, resolved.run.backend, resolved.run.device) == (8 * nodes, "ray", "cuda")
    assert resolved.run.dir == "/shared/runs/my-run-1" and resolved.run.dir in entry
    assert config_map["metadata"]["name"] in str(spec["rayClusterSpec"]["headGroupSpec"])


def test_strict_validator_refuses_unknown_fields(tmp_path, capsys, validator):
    # The strictness the test above relies on: a misspelt field anywhere is an error.
    rc, out, _ = _render(capsys, "k8s", _config(tmp_path), "--nodes", "2", "--gpus-per-node", "1",
                         "--image", "img:1")
    assert rc == 0
    rayjob = list(yaml.safe_load_all(out))[1]
    bad = copy.deepcopy(rayjob)
    bad["spec"]["backofLimit"] = 3
    bad["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["gpus"] = 1
    errs = _errors(validator, bad)
    assert len(errs) == 2 and any("backofLimit" in e for e in errs) and any("'gpus'" in e for e in errs), errs


def test_slurm_mpi_script(tmp_path, capsys):
    run_dir = tmp_path / "shared run"
    rc, out, err = _render(capsys, "slurm", _config(tmp_path), "--nodes", "2", "--gpus-per-node", "4",
                           "--backend", "mpi", "--partition", "gpu", "--time", "1-00:00:00", "--account", "proj",
                           "--run-dir", str(run_dir))
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[0] == "#!/bin/bash"
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=4", "#SBATCH --gpus-per-node=4",
                 "#SBATCH --requeue", "#SBATCH --partition=gpu", "#SBATCH --time=1-00:00:00",
                 "#SBATCH --account=proj", f"RUN_DIR={shlex.quote(str(run_dir))}"):
        assert line in lines, line
    srun = [line for line in lines if line.startswith("srun ")]
    assert srun == ['srun --mpi=pmi2 --kill-on-bad-exit=1 "$PY" -m tierlift train "$CONFIG" --backend mpi '
                    '--nnodes 2 $RESUME']
    assert lines[-1] == "exit $?"
    subprocess.run(["bash", "-n"], input=out, text=True, check=True)


def test_slurm_ray_script_ports_per_job_and_cleanup(tmp_path, capsys):
    rc, out, err = _render(capsys, "slurm", _config(tmp_path), "--nodes", "3", "--gpus-per-node", "2")
    assert rc == 0, err
    assert "#SBATCH --ntasks-per-node=1" in out and "#SBATCH --requeue" in out
    assert "BASE=$((20000 + (SLURM_JOB_ID % 400) * 100))" in out
    assert "trap stop_ray EXIT" in out and "export RAY_AUTH_MODE=token" in out
    assert '--backend ray --address "$GCS" --nnodes 3 --nproc-per-node 2 $RESUME' in out
    subprocess.run(["bash", "-n"], input=out, text=True, check=True)


def test_slurm_script_embeds_the_resolved_config_and_resume_test(tmp_path, capsys):
    """Run the script's preamble (up to the launch) with a fake SLURM_JOB_ID: it
    writes the resolved config into the run dir and resumes only from a complete
    checkpoint."""
    run_dir = tmp_path / "run"
    rc, out, _ = _render(capsys, "slurm", _config(tmp_path), "--nodes", "2", "--gpus-per-node", "1",
                         "--backend", "mpi", "--device", "cpu", "--run-dir", str(run_dir))
    assert rc == 0
    preamble = out.split("\n# One task per rank")[0] + '\necho "RESUME=$RESUME"\n'
    env = dict(os.environ, SLURM_JOB_ID="7", SLURM_JOB_NODELIST="n[1-2]", TIERLIFT_PYTHON=sys.executable)
    p = subprocess.run(["bash", "-c", preamble], capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "RESUME="
    resolved = TrainConfig.load(str(run_dir / "job-config.yaml"))
    assert (resolved.run.nproc, resolved.run.backend, resolved.run.device) == (2, "mpi", "cpu")
    assert resolved.run.dir == str(run_dir)


@pytest.mark.parametrize("argv, needle", [
    (["slurm", "{cfg}", "--nodes", "2", "--gpus-per-node", "1", "--time", "tomorrow"], "--time='tomorrow'"),
    (["slurm", "{cfg}", "--nodes", "2", "--gpus-per-node", "1", "--partition", "gpu; rm -rf ~"], "--partition="),
    (["k8s", "{cfg}", "--nodes", "2", "--gpus-per-node", "1", "--image", "img", "--pvc", "Bad_Claim"], "--pvc="),
    (["k8s", "{cfg}", "--nodes", "2", "--gpus-per-node", "1", "--image", "has space"], "--image="),
    (["slurm", "{missing}", "--nodes", "2", "--gpus-per-node", "1"], "missing.yaml"),
    (["slurm", "{cfg}", "--nodes", "1", "--gpus-per-node", "1", "--out", "{existing}"], "--out="),
])
def test_bad_render_input_is_one_line_exit_2(tmp_path, capsys, argv, needle):
    existing = tmp_path / "job.sbatch"
    existing.write_text("keep me")
    subst = {"cfg": _config(tmp_path), "missing": str(tmp_path / "missing.yaml"), "existing": str(existing)}
    rc, out, err = _render(capsys, *[a.format(**subst) for a in argv])
    assert rc == 2 and out == ""
    (line,) = err.strip().splitlines()
    assert line.startswith("tierlift: error:") and needle in line and "Fix:" in line, line
    assert existing.read_text() == "keep me"


@pytest.mark.parametrize("argv", [
    ["slurm", "c.yaml", "--nodes", "0", "--gpus-per-node", "1"],
    ["slurm", "c.yaml", "--nodes", "2", "--gpus-per-node", "1", "--backend", "local"],
    ["k8s", "c.yaml", "--nodes", "2", "--gpus-per-node", "1"],  # --image is required
])
def test_invalid_render_options_exit_2(capsys, argv):
    rc, _, err = _render(capsys, *argv)
    assert rc == 2 and "error:" in err
