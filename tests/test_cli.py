"""The ``tierlift`` command line, through its real entry (``python -m tierlift``)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml


def tierlift(*args: str, cwd=None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tierlift", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=timeout)


TINY = """\
model: {d_model: 32, n_layers: 1, n_heads: 2, max_seq_len: 32}
data: {seq_len: 32, synthetic_samples: 256}
train: {micro_batch_size: 4, max_steps: 3, log_every: 1}
run: {device: cpu, backend: local}
"""


def test_help_lists_commands_without_heavy_imports():
    proc = tierlift("--help")
    assert proc.returncode == 0
    for cmd in ("train", "launch", "config", "data", "export"):
        assert cmd in proc.stdout
    code = ("import sys; from tierlift.launch.cli import main; main(['--help'])\n"
            "assert 'torch' not in sys.modules and 'ray' not in sys.modules, sorted(sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0


def test_missing_config_is_one_line(tmp_path):
    missing = tmp_path / "nope.yaml"
    proc = tierlift("train", str(missing))
    assert proc.returncode == 2
    assert str(missing) in proc.stderr and proc.stderr.startswith("tierlift: error:")
    assert "Traceback" not in proc.stderr


def test_unknown_key_names_the_key(tmp_path):
    cfg = tmp_path / "typo.yaml"
    cfg.write_text("train:\n  max_stpes: 5\n")
    proc = tierlift("train", str(cfg), "--run-dir", str(tmp_path / "run"))
    assert proc.returncode == 2
    assert "train.max_stpes" in proc.stderr and "max_steps" in proc.stderr  # the key and the suggestion
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()  # nothing written for a config that does not load


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_shows_traceback(tmp_path, where):
    args = ["train", str(tmp_path / "nope.yaml")]
    args = ["--debug", *args] if where == "before" else [*args, "--debug"]
    proc = tierlift(*args)
    assert proc.returncode == 2
    assert "Traceback" in proc.stderr and "ConfigError" in proc.stderr
    assert "tierlift: error:" in proc.stderr


def test_config_show_prints_resolved_yaml(tmp_path):
    cfg = tmp_path / "small.yaml"
    cfg.write_text("train:\n  max_steps: 7\n")
    proc = tierlift("config", "show", str(cfg))
    assert proc.returncode == 0, proc.stderr
    shown = yaml.safe_load(proc.stdout)
    assert shown["train"]["max_steps"] == 7
    assert shown["train"]["micro_batch_size"] == 8  # a default, shown
    assert shown["run"]["backend"] == "ray" and "zero" in shown and "offload" in shown


@pytest.mark.parametrize("args", [
    [],
    ["bogus"],
    ["train"],
    ["train", "x.yaml", "--backend", "slurm"],
    ["train", "x.yaml", "--nproc", "0"],
    ["launch", "--nproc", "two", "--", "true"],
    ["launch", "--master-port", "70000", "--", "true"],
    ["config"],
    ["export", "somewhere"],  # --out missing
])
def test_usage_errors_exit_2(args):
    proc = tierlift(*args)
    assert proc.returncode == 2
    assert "usage:" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_launch_without_command():
    proc = tierlift("launch", "--backend", "local", "--nproc", "2")
    assert proc.returncode == 2 and "no command given" in proc.stderr


def test_ray_backend_without_ray():
    # As on the GPU machines: Ray absent (a None entry makes `import ray` fail).
    code = ("import sys; sys.modules['ray'] = None\n"
            "from tierlift.launch.cli import main\n"
            "sys.exit(main(['launch', '--backend', 'ray', '--nproc', '2', '--', 'true']))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "Ray is not installed" in proc.stderr and "pip install 'tierlift[ray]'" in proc.stderr
    assert "--backend local" in proc.stderr and "Traceback" not in proc.stderr


def test_resume_without_checkpoint(tmp_path):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(TINY)
    proc = tierlift("train", str(cfg), "--run-dir", str(tmp_path / "run"), "--resume")
    assert proc.returncode == 2
    assert "--resume" in proc.stderr and "no complete checkpoint" in proc.stderr and "Fix:" in proc.stderr


@pytest.mark.slow
def test_train_local_two_ranks_writes_run_dir(tmp_path):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(TINY)
    run = tmp_path / "run"
    proc = tierlift("train", str(cfg), "--nproc", "2", "--backend", "local", "--steps", "2", "--run-dir", str(run))
    assert proc.returncode == 0, proc.stderr
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert resolved["run"]["nproc"] == 2 and resolved["run"]["dir"] == str(run)
    assert resolved["train"]["max_steps"] == 2
    assert (run / "logs" / "rank-0.log").exists() and (run / "logs" / "rank-1.log").exists()
