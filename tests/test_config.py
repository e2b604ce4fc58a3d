"""Strict tierlift config loading: unknown keys, value validation, cross-section rules,
batch-size consistency, YAML round trips, render_config and the shipped configs.

CPU only, no process groups, no model construction.
"""

from __future__ import annotations

import glob
import math
import os

import pytest
import yaml

from tierlift._configbase import from_dict, to_dict
from tierlift.errors import ConfigError
from tierlift.offload.policy import AioConfig, CPUOffload, NoOffload, NVMeOffload, OffloadConfig
from tierlift.parallel.config import ZeroConfig
from tierlift.runtime.config import (LoopConfig, TrainConfig, check_batch_sizes, read_config_file,
                                     render_config)
from tierlift.runtime.schedule import SchedulerConfig, lr_at

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*")))


def _err(data) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        TrainConfig.from_dict(data)
    return info.value


# -- unknown keys -------------------------------------------------------------------
@pytest.mark.parametrize("data, setting, hint", [
    ({"train": {"micro_batch": 4}}, "train.micro_batch", "micro_batch_size"),
    ({"trian": {}}, "trian", "train"),
    ({"zero": {"stagee": 3}}, "zero.stagee", "stage"),
    ({"offload": {"optimizer": {"kind": "nvme", "path": "/tmp/x", "aio": {"thread": 2}}}},
     "offload.optimizer.aio.thread", "threads"),
    ({"optimizer": {"learning_rate": 1e-3}}, "optimizer.learning_rate", None),
])
def test_unknown_key_names_path_and_nearest(data, setting, hint):
    e = _err(data)
    assert e.setting == setting
    assert "not a known setting" in str(e)
    if hint:
        assert f"did you mean {hint!r}" in e.fix
    else:
        assert "did you mean" not in e.fix and "valid keys here are" in e.fix


def test_policy_needs_known_kind():
    e = _err({"offload": {"optimizer": {"kind": "disk"}}})
    assert e.setting == "offload.optimizer.kind" and e.value == "disk"


# -- value validation: (data, setting, value) ------------------------------------------
@pytest.mark.parametrize("data, setting, value", [
    ({"train": {"micro_batch_size": 0}}, "train.micro_batch_size", 0),
    ({"train": {"checkpoint_every": -1}}, "train.checkpoint_every", -1),
    ({"train": {"global_batch_size": -8}}, "train.global_batch_size", -8),
    ({"train": {"max_steps": "ten"}}, "train.max_steps", "ten"),
    ({"run": {"device": "tpu"}}, "run.device", "tpu"),
    ({"run": {"master_port": 70000}}, "run.master_port", 70000),
    ({"zero": {"stage": 4}}, "zero.stage", 4),
    ({"zero": {"prefetch_bytes": -1}}, "zero.prefetch_bytes", -1),
    ({"zero": {"sub_group_size": -1}}, "zero.sub_group_size", -1),
    ({"zero": {"chunk_align_bytes": 3000}}, "zero.chunk_align_bytes", 3000),
    ({"precision": {"compute": "fp8"}}, "precision.compute", "fp8"),
    ({"optimizer": {"lr": 0}}, "optimizer.lr", 0.0),
    ({"optimizer": {"lr": float("inf")}}, "optimizer.lr", float("inf")),
    ({"optimizer": {"betas": [0.9, 1.0]}}, "optimizer.betas", [0.9, 1.0]),
    ({"scheduler": {"kind": "step"}}, "scheduler.kind", "step"),
    ({"scheduler": {"warmup_type": "exp"}}, "scheduler.warmup_type", "exp"),
    ({"scheduler": {"warmup_min_ratio": 1.5}}, "scheduler.warmup_min_ratio", 1.5),
    ({"scheduler": {"warmup_steps": 100, "total_steps": 100}}, "scheduler.total_steps", 100),
    ({"offload": {"optimizer": {"kind": "nvme", "path": "/tmp/x", "aio": {"block_size": 1000}}}},
     "offload.optimizer.aio.block_size", 1000),
    ({"offload": {"param": {"kind": "nvme", "path": "/tmp/x", "buffer_size": -1}}, "zero": {"stage": 3}},
     "offload.param.buffer_size", -1),
    ({"offload": {"param": {"kind": "nvme", "path": "/tmp/x", "buffer_count": 1}}},
     "offload.param.buffer_count", 1),
    ({"offload": {"optimizer": {"kind": "nvme", "path": "/tmp/x", "aio": {"use_gds": True}}}},
     "offload.optimizer.aio.use_gds", True),
    ({"offload": {"optimizer": {"kind": "nvme", "path": ""}}}, "offload.optimizer.path", ""),
    # offloaded parameters are refreshed from the host optimizer (offload/policy.py, params_offload_error)
    ({"offload": {"param": {"kind": "cpu"}}, "zero": {"stage": 3}}, "offload.param", "cpu"),
    # parameters on NVMe share the optimizer's extent file
    ({"offload": {"optimizer": {"kind": "cpu"}, "param": {"kind": "nvme", "path": "/tmp/x"}}, "zero": {"stage": 3}},
     "offload.optimizer.kind", "cpu"),
    ({"offload": {"optimizer": {"kind": "nvme", "path": "/tmp/x"}, "param": {"kind": "nvme", "path": "/tmp/y"}},
      "zero": {"stage": 3}}, "offload.param.path", "/tmp/y"),
])
def test_bad_values_name_setting_and_value(data, setting, value):
    e = _err(data)
    assert e.setting == setting
    assert e.value == value
    assert e.fix
    assert f"{setting}={value!r}" in str(e)


def test_nvme_path_that_is_a_file_or_under_a_file(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    for path, words in ((str(f), "not a directory"), (str(f / "sub"), "not writable")):
        e = _err({"offload": {"optimizer": {"kind": "nvme", "path": path}}})
        assert e.setting == "offload.optimizer.path" and e.value == path and words in e.message


def test_nvme_path_missing_but_creatable(tmp_path):
    cfg = TrainConfig.from_dict({"offload": {"optimizer": {"kind": "nvme", "path": str(tmp_path / "a" / "b")}}})
    assert isinstance(cfg.offload.optimizer, NVMeOffload)
    assert not (tmp_path / "a").exists()  # validation creates nothing


# -- cross-section rules ----------------------------------------------------------------
def test_param_offload_needs_stage_3():
    e = _err({"zero": {"stage": 2}, "offload": {"optimizer": {"kind": "cpu"}, "param": {"kind": "cpu"}}})
    assert e.setting == "zero.stage" and e.value == 2 and "stage 3" in e.message
    TrainConfig.from_dict({"zero": {"stage": 2}, "offload": {"optimizer": "cpu"}})  # optimizer offload is fine


def test_seq_len_within_model_limits():
    e = _err({"model": {"max_seq_len": 64}, "data": {"seq_len": 128}})
    assert e.setting == "data.seq_len" and e.value == 128 and "max_seq_len=64" in e.message
    e = _err({"model": {"kind": "hf", "hf_config": {"model_type": "llama", "max_position_embeddings": 32}},
              "data": {"seq_len": 64}})
    assert e.setting == "data.seq_len" and e.value == 64 and "max_position_embeddings=32" in e.message


def test_gds_needs_a_gpu():
    nvme = {"kind": "nvme", "path": "/tmp/x", "aio": {"use_gds": True, "backend": "libaio"}}
    e = _err({"offload": {"optimizer": nvme}, "run": {"device": "cpu"}})
    assert e.setting == "offload.optimizer.aio.use_gds" and e.value is True
    TrainConfig.from_dict({"offload": {"optimizer": nvme}, "run": {"device": "cuda"}})


def test_fp16_compute_with_bf16_reduce():
    e = _err({"precision": {"compute": "fp16", "reduce": "bf16"}})
    assert e.setting == "precision.reduce" and e.value == "bf16"


# -- loading conveniences of _configbase ---------------------------------------------------
def test_yaml_number_spellings_and_int_lists():
    data = yaml.safe_load("optimizer: {lr: 3e-3, betas: [0, 0]}\nzero: {max_live_params: 1e9}\n")
    assert data["optimizer"]["lr"] == "3e-3"  # PyYAML's YAML 1.1 quirk this guards against
    cfg = TrainConfig.from_dict(data)
    assert cfg.optimizer.lr == 3e-3 and cfg.optimizer.betas == [0.0, 0.0]
    assert all(type(b) is float for b in cfg.optimizer.betas)
    assert cfg.zero.max_live_params == 10 ** 9 and type(cfg.zero.max_live_params) is int
    e = _err({"zero": {"max_live_params": "1.5e0"}})
    assert e.setting == "zero.max_live_params" and e.value == "1.5e0"
    e = _err({"optimizer": {"lr": "fast"}})
    assert e.setting == "optimizer.lr" and e.value == "fast"


def test_policy_shorthand_and_typed_policies():
    cfg = TrainConfig.from_dict({"offload": {"optimizer": "cpu", "param": "none"}})
    assert cfg.offload.optimizer == CPUOffload(pin_memory=True)
    assert isinstance(cfg.offload.param, NoOffload) and cfg.offload.enabled
    assert not OffloadConfig().enabled


def test_relocated_errors_keep_direct_construction_names():
    with pytest.raises(ConfigError) as info:
        AioConfig(block_size=10)
    assert info.value.setting == "offload.aio.block_size"
    with pytest.raises(ConfigError) as info:
        from_dict(ZeroConfig, {"stage": 5})
    assert info.value.setting == "zero.stage"


# -- batch sizes ------------------------------------------------------------------------
def test_check_batch_sizes():
    cfg = TrainConfig(train=LoopConfig(micro_batch_size=8, grad_accum_steps=2))
    assert check_batch_sizes(cfg, 2) == 32  # derived when global_batch_size is 0
    cfg.train.global_batch_size = 32
    assert check_batch_sizes(cfg, 2) == 32
    with pytest.raises(ConfigError) as info:
        check_batch_sizes(cfg, 4)
    e = info.value
    assert e.setting == "train.global_batch_size" and e.value == 32 and "= 64" in e.message
    assert "grad_accum_steps: 1" in e.fix  # 32 / (8 * 4)
    cfg.train.global_batch_size = 36
    with pytest.raises(ConfigError) as info:
        check_batch_sizes(cfg, 2)
    assert "multiple of" in info.value.fix
    with pytest.raises(ConfigError) as info:
        check_batch_sizes(cfg, 0)
    assert info.value.setting == "world_size" and info.value.value == 0


# -- schedules --------------------------------------------------------------------------
def test_lr_at_warmup_shapes_and_decays():
    peak = 1e-3
    lin = SchedulerConfig(kind="cosine", warmup_steps=10, total_steps=110, min_lr_ratio=0.1)
    assert lr_at(0, peak, lin, 0) == peak * 1 / 10 and lr_at(9, peak, lin, 0) == peak
    assert lr_at(110, peak, lin, 0) == pytest.approx(1e-4)
    log = SchedulerConfig(warmup_steps=10, warmup_type="log", total_steps=110)
    assert lr_at(0, peak, log, 0) == pytest.approx(peak * math.log(2) / math.log(11))
    assert lr_at(9, peak, log, 0) == pytest.approx(peak)
    assert lr_at(0, peak, log, 0) > lr_at(0, peak, lin, 0)  # log warmup rises fast first
    floor = SchedulerConfig(warmup_steps=10, warmup_min_ratio=0.5, total_steps=110)
    assert lr_at(0, peak, floor, 0) == pytest.approx(peak * (0.5 + 0.5 * 0.1))
    linear = SchedulerConfig(kind="linear", warmup_steps=0, min_lr_ratio=0.0, total_steps=100)
    assert lr_at(50, peak, linear, 0) == pytest.approx(peak / 2)
    assert lr_at(100, peak, linear, 0) == 0.0
    const = SchedulerConfig(kind="constant", warmup_steps=5)
    assert lr_at(4, peak, const, 100) == peak and lr_at(50, peak, const, 100) == peak


# -- files: read, render, round trip, shipped configs ---------------------------------------
def test_read_config_file_errors(tmp_path):
    with pytest.raises(ConfigError) as info:
        read_config_file(tmp_path / "nope.yaml")
    assert info.value.setting == "config" and "does not exist" in info.value.message
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError) as info:
        read_config_file(bad)
    assert "could not be parsed" in info.value.message and info.value.value == str(bad)
    lst = tmp_path / "list.json"
    lst.write_text("[1, 2]")
    with pytest.raises(ConfigError) as info:
        read_config_file(lst)
    assert "mapping at the top level" in info.value.message


def test_empty_yaml_is_all_defaults(tmp_path):
    p = tmp_path / "empty.yaml"
    p.write_text("")
    assert TrainConfig.load(p) == TrainConfig()


@pytest.mark.parametrize("path", [p for p in CONFIGS if p.endswith(".yaml")], ids=os.path.basename)
def test_yaml_round_trip(path, tmp_path):
    cfg = TrainConfig.load(path)
    again = TrainConfig.from_dict(yaml.safe_load(cfg.to_yaml()))
    assert again == cfg
    assert to_dict(again) == to_dict(cfg)
    text = render_config(cfg)
    assert text.splitlines()[1] == f"# source: {path}"
    out = tmp_path / "resolved.yaml"
    out.write_text(text)
    assert TrainConfig.load(out) == cfg


def test_round_trip_of_every_policy_kind(tmp_path):
    cfg = TrainConfig.from_dict({
        "zero": {"stage": 3, "wrap": ["Block"], "prefetch_bytes": 1 << 20, "sub_group_size": 1000},
        "offload": {"optimizer": {"kind": "nvme", "path": str(tmp_path), "buffer_size": 4096,
                                  "aio": {"threads": 2, "single_submit": True}},
                    "param": {"kind": "cpu", "pin_memory": False}},
        "scheduler": {"kind": "linear", "warmup_type": "log", "warmup_min_ratio": 0.1}})
    assert TrainConfig.from_dict(yaml.safe_load(cfg.to_yaml())) == cfg


def test_render_config_shows_every_default():
    text = render_config(TrainConfig())
    assert text.startswith("# tierlift config") and "# source: defaults" in text
    body = yaml.safe_load(text)
    assert set(body) == {"model", "data", "train", "optimizer", "scheduler", "precision", "zero", "offload", "policy",
                         "telemetry", "run"}
    assert body["zero"]["prefetch_bytes"] == 0 and body["offload"]["optimizer"] == {"kind": "none"}
    assert render_config(TrainConfig(), source="x.yaml").splitlines()[1] == "# source: x.yaml"


def test_all_shipped_configs_load():
    names = {os.path.basename(p) for p in CONFIGS}
    assert {"tiny-gpt.yaml", "tiny-moe.yaml", "tiny-llama.yaml", "l1b-llama.yaml", "ds-zero3-offload.json"} <= names
    for path in CONFIGS:
        assert isinstance(TrainConfig.load(path), TrainConfig)


def test_tiny_gpt_is_the_make_run_job():
    c = TrainConfig.load(os.path.join(ROOT, "configs", "tiny-gpt.yaml"))
    assert (c.model.kind, c.model.d_model, c.model.n_layers, c.model.n_heads, c.model.vocab_size) == \
        ("gpt", 64, 2, 4, 258)
    assert (c.data.source, c.data.seq_len) == ("synthetic", 64)
    assert (c.train.micro_batch_size, c.train.max_steps, c.train.checkpoint_every) == (8, 300, 100)
    assert (c.zero.stage, c.precision.compute, c.optimizer.name, c.optimizer.lr) == (3, "fp32", "adamw", 3e-3)
    assert (c.scheduler.kind, c.scheduler.warmup_steps, c.optimizer.grad_clip) == ("cosine", 20, 1.0)
    assert (c.run.nproc, c.run.backend, c.run.device) == (2, "ray", "cpu")


def test_moe_and_llama_configs():
    moe = TrainConfig.load(os.path.join(ROOT, "configs", "tiny-moe.yaml"))
    assert (moe.model.kind, moe.model.n_experts, moe.model.top_k) == ("moe-gpt", 4, 2)
    tiny = TrainConfig.load(os.path.join(ROOT, "configs", "tiny-llama.yaml")).model
    assert tiny.kind == "hf" and tiny.hf_config["model_type"] == "llama"
    assert [tiny.hf_config[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                        "num_attention_heads", "vocab_size", "max_position_embeddings")] == \
        [64, 128, 2, 4, 258, 128]
    l1b = TrainConfig.load(os.path.join(ROOT, "configs", "l1b-llama.yaml"))
    h = l1b.model.hf_config
    assert [h[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                           "intermediate_size", "vocab_size")] == [2048, 16, 16, 16, 5440, 32000]
    assert (l1b.data.seq_len, l1b.train.micro_batch_size, l1b.precision.compute) == (1024, 8, "bf16")
    assert l1b.train.activation_checkpointing and l1b.zero.stage == 3 and l1b.run.device == "cuda"
    # 0.934 B parameters with untied embeddings (design §4).
    d, f, v, n = 2048, 5440, 32000, 16
    params = 2 * v * d + n * (4 * d * d + 3 * d * f + 2 * d) + d
    assert round(params / 1e9, 3) == 0.934


def test_every_unknown_key_is_reported_at_once_with_its_nearest_key():
    e = _err({"train": {"micro_batch": 4, "max_step": 3}, "zero": {"stagee": 3},
              "offload": {"optimizer": {"kind": "nvme", "path": "/tmp/x", "aio": {"thread": 2}}},
              "optimizer": {"learning_rate": 1e-3}})
    for setting, hint in [("train.micro_batch", "micro_batch_size"), ("train.max_step", "max_steps"),
                          ("zero.stagee", "stage"), ("offload.optimizer.aio.thread", "threads")]:
        assert setting in e.setting and f"{setting}: did you mean {hint!r}?" in e.fix
    assert "optimizer.learning_rate: valid keys here are" in e.fix
    assert "5 keys" in str(e) and len(str(e).splitlines()) == 1
