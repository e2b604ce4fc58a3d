"""DeepSpeed configs in the shapes users have them (tests/data/ds_configs/) load as
they are and train the tiny GPT on 2 CPU ranks, every value tierlift chose for an
"auto" or missing key printed as one line.

The four files: a model library's ZeRO-3 + CPU offload test config full of
"auto"; a launcher's ZeRO-3 "auto" config; DeepSpeed's own stage-1 offload fp16
test config (train_batch_size and accumulation, no micro-batch, the deprecated
cpu_offload); a ZeRO-2 offload tutorial config with no batch size at all.
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys

import pytest

from _dist import run_ranks
from tierlift.errors import ConfigError
from tierlift.runtime.config import TrainConfig, require_batch_sizes

HERE = os.path.dirname(os.path.abspath(__file__))
DIR = os.path.join(HERE, "data", "ds_configs")
FILES = sorted(n for n in os.listdir(DIR) if n.endswith(".json"))
ROOT = os.path.dirname(HERE)


def _auto_keys(d, path=""):
    """Dotted paths of every "auto" value in a DeepSpeed config."""
    for key, value in d.items():
        sub = f"{path}.{key}" if path else key
        if isinstance(value, dict):
            yield from _auto_keys(value, sub)
        elif value == "auto":
            yield sub


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def _train_each(names: list[str], steps: int) -> dict:
    from tierlift.models import build_model
    from tierlift.runtime.data import build_dataset
    from tierlift.runtime.trainer import Trainer

    lines = _Lines()
    logger = logging.getLogger("tierlift")
    logger.addHandler(lines)
    logger.setLevel(logging.INFO)
    out = {}
    for name in names:
        start = len(lines.lines)
        cfg = TrainConfig.load(os.path.join(DIR, name))  # no world size: the Trainer knows it
        model = build_model(cfg.model, seed=cfg.train.seed)
        data = build_dataset(cfg.data, vocab_size=cfg.model.vocab_size, split="train")
        trainer = Trainer(model, cfg, train_data=data)
        summary = trainer.fit(max_steps=steps)
        t = trainer.cfg.train
        out[name] = {"losses": summary.losses, "batch": (t.micro_batch_size, t.grad_accum_steps),
                     "compute": trainer.cfg.precision.compute, "stage": trainer.cfg.zero.stage,
                     "lines": lines.lines[start:]}
    return out


@pytest.fixture(scope="module")
def trained():
    return run_ranks(_train_each, 2, FILES, 2)


def test_there_are_the_four_shapes():
    assert FILES == ["accelerate_zero3_auto.json", "deepspeed_stage1_offload_fp16.json",
                     "hf_zero3_cpu_offload_auto.json", "zero2_offload_tutorial.json"]


@pytest.mark.parametrize("name", FILES)
def test_each_config_trains_on_two_ranks_with_every_choice_printed(trained, name):
    got = trained[name]
    assert len(got["losses"]) == 2 and all(math.isfinite(x) for x in got["losses"])
    with open(os.path.join(DIR, name)) as f:
        raw = json.load(f)
    lines = got["lines"]
    for key in _auto_keys(raw):
        hits = [line for line in lines if line.startswith(f'ds-config: {key}="auto" -> ')]
        assert len(hits) == 1, (key, lines)


def test_derived_micro_batch_on_two_ranks(trained):
    got = trained["deepspeed_stage1_offload_fp16.json"]
    assert got["batch"] == (2, 2) and got["compute"] == "fp16" and got["stage"] == 1  # 8 = 2 x 2 x 2 ranks
    assert ("config: train.micro_batch_size (DeepSpeed train_micro_batch_size_per_gpu) -> 2 = global batch 8 / "
            "(accumulation 2 x 2 ranks)") in got["lines"]
    # its activation_checkpointing section is mapped (train.activations), so nothing is ignored
    assert not [line for line in got["lines"] if line.startswith("ds-config: ignored")]
    assert TrainConfig.load(os.path.join(DIR, "deepspeed_stage1_offload_fp16.json")).train.activations.policy \
        == "recompute"


def test_no_batch_size_at_all_takes_the_default_micro_batch(trained):
    got = trained["zero2_offload_tutorial.json"]
    assert got["batch"] == (TrainConfig().train.micro_batch_size, 1)
    assert any(line.startswith("ds-config: train_micro_batch_size_per_gpu (missing) -> 8 (") and
               "no batch size" in line for line in got["lines"])
    ignored = [line for line in got["lines"] if line.startswith("ds-config: ignored")]
    assert len(ignored) == 1 and "tensorboard" in ignored[0]


def test_all_auto_batch_sizes(trained):
    assert trained["hf_zero3_cpu_offload_auto.json"]["batch"] == (8, 1)
    assert trained["accelerate_zero3_auto.json"]["batch"] == (8, 2)


def test_a_derived_batch_size_needs_the_world_size_where_it_is_not_known():
    cfg = TrainConfig.load(os.path.join(DIR, "deepspeed_stage1_offload_fp16.json"))
    with pytest.raises(ConfigError, match="depends on the number of ranks") as e:
        require_batch_sizes(cfg, "`tierlift config show` without --world-size")
    assert "--world-size" in e.value.fix
    cfg = TrainConfig.load(os.path.join(DIR, "deepspeed_stage1_offload_fp16.json"), world_size=4)
    assert (cfg.train.micro_batch_size, cfg.train.grad_accum_steps) == (1, 2)
    with pytest.raises(ConfigError, match="does not fit train_batch_size=8 on 3 ranks"):
        TrainConfig.load(os.path.join(DIR, "deepspeed_stage1_offload_fp16.json"), world_size=3)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "tierlift", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=120)


def test_config_show_lists_the_choices_and_refuses_without_a_world_size():
    path = os.path.join(DIR, "deepspeed_stage1_offload_fp16.json")
    proc = _cli("config", "show", path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("tierlift: error:")]
    assert len(errors) == 1 and "depends on the number of ranks" in errors[0] and "--world-size" in errors[0]
    proc = _cli("config", "show", path, "--world-size", "2")
    assert proc.returncode == 0, proc.stderr
    assert ("#   ds-config: train_micro_batch_size_per_gpu (missing) -> 2 (train_batch_size 8 / "
            "(accumulation 2 x 2 ranks))") in proc.stdout
    assert "micro_batch_size: 2" in proc.stdout
    proc = _cli("config", "show", os.path.join(DIR, "hf_zero3_cpu_offload_auto.json"))
    assert proc.returncode == 0, proc.stderr
    assert '#   ds-config: zero_optimization.stage3_prefetch_bucket_size="auto" -> 0 (' in proc.stdout


def test_plan_sizes_the_derived_micro_batch_for_its_world_size():
    proc = _cli("plan", os.path.join(DIR, "deepspeed_stage1_offload_fp16.json"), "--world-size", "2", "--json")
    assert proc.returncode == 0, proc.stderr
    seq_len = TrainConfig().data.seq_len
    # train_batch_size 8 = micro 2 x accumulation 2 x 2 ranks: per rank 2 x 2 sequences a step
    assert json.loads(proc.stdout)["training"]["tokens_per_step"] == 2 * 2 * seq_len
