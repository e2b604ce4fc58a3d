"""NVMe extent files are scratch: gone when the process exits, unless
offload.optimizer.keep_files; nothing tierlift did not create is touched."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tierlift.offload.policy import NVMeOffload

_SCRIPT = """
import os, sys, torch
import torch.distributed as dist
from tierlift.models import build_model
from tierlift.models.config import ModelConfig
from tierlift.offload.policy import CPUOffload, NVMeOffload, OffloadConfig
from tierlift.parallel.config import OptimizerConfig, PrecisionConfig, ZeroConfig
from tierlift.parallel.zero import ZeroEngine

path, keep = sys.argv[1], sys.argv[2] == "keep"
dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
model = build_model(ModelConfig(kind="gpt", vocab_size=64, d_model=32, n_layers=2, n_heads=4, max_seq_len=16), seed=0)
off = OffloadConfig(optimizer=NVMeOffload(path=path, buffer_size=2048, buffer_count=2, keep_files=keep),
                    param=CPUOffload())
eng = ZeroEngine(model, ZeroConfig(stage=3), PrecisionConfig(), OptimizerConfig(grad_clip=1.0), torch.device("cpu"),
                 offload=off)
x = torch.randint(0, 64, (2, 17))
eng.forward_begin()
eng.backward(model(input_ids=x[:, :-1], labels=x[:, 1:]).loss)
eng.step(1e-3)
print("FILES", sorted(os.listdir(path)))
dist.destroy_process_group()
"""


def _run(tmp_path, path, mode):
    script = tmp_path / "nvme_run.py"
    script.write_text(_SCRIPT)
    r = subprocess.run([sys.executable, str(script), str(path), mode], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("FILES"))
    assert "tierlift-rank00000.extents" in line  # the file existed while the run lived
    return r


def test_extent_files_and_the_dir_tierlift_made_are_gone_after_a_clean_exit(tmp_path):
    path = tmp_path / "scratch" / "nvme"
    _run(tmp_path, path, "remove")
    assert not path.exists() and (tmp_path / "scratch").is_dir()  # only the leaf tierlift made goes


def test_a_users_files_and_directory_stay(tmp_path):
    path = tmp_path / "nvme"
    path.mkdir()
    (path / "notes.txt").write_text("mine")
    _run(tmp_path, path, "remove")
    assert sorted(os.listdir(path)) == ["notes.txt"]


def test_keep_files_keeps_them(tmp_path):
    path = tmp_path / "nvme"
    _run(tmp_path, path, "keep")
    assert "tierlift-rank00000.extents" in os.listdir(path)


def test_keep_files_must_be_a_bool():
    from tierlift._configbase import from_dict
    from tierlift.errors import ConfigError

    with pytest.raises(ConfigError):
        from_dict(NVMeOffload, {"path": "/tmp/x", "keep_files": "yes"}, "offload.optimizer")
