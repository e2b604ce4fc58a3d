"""DeepSpeed JSON -> TrainConfig: every supported key's mapping, every problem reported
together by DeepSpeed key path, conversion to YAML and the shipped example.

CPU only, no process groups.  One test imports deepspeed (if installed) to check
that the key tables name keys DeepSpeed really has.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import pickle

import pytest
import yaml

from tierlift.errors import ConfigError
from tierlift.offload.policy import CPUOffload, NoOffload, NVMeOffload
from tierlift.runtime import deepspeed_keys as K
from tierlift.runtime.config import TrainConfig
from tierlift.runtime.deepspeed_compat import DeepSpeedConfigError, is_deepspeed_config
from tierlift.runtime.deepspeed_convert import convert_file, to_tierlift_yaml

from_deepspeed = TrainConfig.from_deepspeed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = os.path.join(ROOT, "configs", "ds-zero3-offload.json")
BASE = {"train_micro_batch_size_per_gpu": 4}


def _ds(**extra) -> dict:
    return {**copy.deepcopy(BASE), **extra}


def _problems(d, **kw) -> dict[str, ConfigError]:
    with pytest.raises(DeepSpeedConfigError) as info:
        from_deepspeed(d, **kw)
    return {p.setting: p for p in info.value.problems}


def test_detection():
    assert is_deepspeed_config({"zero_optimization": {"stage": 3}})
    assert is_deepspeed_config({"train_micro_batch_size_per_gpu": 1})
    assert is_deepspeed_config({"bf16": {"enabled": True}})
    assert is_deepspeed_config({"aio": {}})
    assert is_deepspeed_config({"optimizer": {"type": "AdamW"}})
    assert is_deepspeed_config({"scheduler": {"type": "WarmupLR"}})
    assert not is_deepspeed_config({"optimizer": {"name": "adamw"}, "zero": {"stage": 3}})
    assert not is_deepspeed_config({})
    assert not is_deepspeed_config(["zero_optimization"])
    cfg = TrainConfig.from_dict(_ds(gradient_clipping=0.5))  # TrainConfig dispatches on detection
    assert cfg.optimizer.grad_clip == 0.5


def test_full_mapping_of_every_supported_key(tmp_path):
    nvme = str(tmp_path / "nvme")
    d = {
        "train_batch_size": 64, "train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 2,
        "steps_per_print": 5, "gradient_clipping": 0.7,
        "bf16": {"enabled": True}, "communication_data_type": "fp32",
        "optimizer": {"type": "AdamW", "params": {"lr": 2e-4, "betas": [0.8, 0.9], "eps": 1e-6,
                                                  "weight_decay": 0.05}},
        "scheduler": {"type": "WarmupCosineLR", "params": {"total_num_steps": 500, "warmup_num_steps": 50,
                                                           "warmup_min_ratio": 0.1, "cos_min_ratio": 0.05,
                                                           "warmup_type": "linear"}},
        "zero_optimization": {
            "stage": 3, "sub_group_size": 1e8, "stage3_prefetch_bucket_size": 1000,
            "stage3_max_live_parameters": 2e8, "stage3_param_persistence_threshold": 5000,
            "stage3_max_reuse_distance": 1e9,
            "offload_param": {"device": "nvme", "nvme_path": nvme, "pin_memory": False, "buffer_count": 6,
                              "buffer_size": 1e6, "max_in_cpu": 1e7},
            # parameters on NVMe share the optimizer's extent file: both on NVMe, one path
            "offload_optimizer": {"device": "nvme", "nvme_path": nvme, "pin_memory": True, "buffer_count": 5}},
        "aio": {"block_size": 2097152, "queue_depth": 16, "intra_op_parallelism": 3, "single_submit": True,
                "overlap_events": False, "use_gds": False},
    }
    c = from_deepspeed(d)
    assert (c.train.micro_batch_size, c.train.grad_accum_steps, c.train.global_batch_size) == (8, 2, 64)
    assert c.train.log_every == 5 and c.optimizer.grad_clip == 0.7
    assert (c.precision.compute, c.precision.reduce) == ("bf16", "fp32")
    o = c.optimizer
    assert (o.name, o.lr, o.betas, o.eps, o.weight_decay) == ("adamw", 2e-4, [0.8, 0.9], 1e-6, 0.05)
    s = c.scheduler
    assert (s.kind, s.warmup_steps, s.total_steps, s.warmup_min_ratio, s.min_lr_ratio, s.warmup_type) == \
        ("cosine", 50, 500, 0.1, 0.05, "linear")
    z = c.zero
    assert (z.stage, z.sub_group_size, z.max_live_params, z.persistence_threshold) == (3, 10 ** 8, 2 * 10 ** 8, 5000)
    assert z.max_reuse_distance == 10 ** 9
    assert z.prefetch_bytes == 1000 * 2  # elements x bf16 bytes
    p = c.offload.param
    assert isinstance(p, NVMeOffload)
    assert (p.path, p.pin_memory, p.buffer_count, p.buffer_size, p.max_in_cpu) == (nvme, False, 6, 10 ** 6, 10 ** 7)
    a = p.aio
    assert (a.block_size, a.queue_depth, a.threads, a.single_submit, a.overlap_events, a.use_gds) == \
        (2097152, 16, 3, True, False, False)
    q = c.offload.optimizer
    assert isinstance(q, NVMeOffload) and (q.path, q.pin_memory, q.buffer_count) == (nvme, True, 5)


def test_params_on_nvme_with_the_optimizer_on_cpu_is_refused_by_name(tmp_path):
    """DeepSpeed allows it; tierlift keeps NVMe parameters in the optimizer's extent file."""
    d = _ds(zero_optimization={"stage": 3, "offload_param": {"device": "nvme", "nvme_path": str(tmp_path)},
                               "offload_optimizer": {"device": "cpu"}})
    with pytest.raises(ConfigError, match="parameters on NVMe need the optimizer state on NVMe too") as e:
        from_deepspeed(d)
    assert "offload.optimizer.kind" in str(e.value)


def test_missing_keys_take_deepspeed_numerics():
    notes: list[str] = []
    c = from_deepspeed(_ds(optimizer={"type": "Adam"}), notes=notes)
    assert (c.optimizer.lr, c.optimizer.betas, c.optimizer.eps, c.optimizer.weight_decay) == \
        (1e-3, [0.9, 0.999], 1e-8, 0.0)
    assert c.optimizer.grad_clip == 0.0  # DeepSpeed does not clip unless gradient_clipping is set
    assert c.scheduler.kind == "constant"  # no scheduler: constant lr
    assert c.precision == TrainConfig().precision  # fp32, fp32 reduce
    assert c.zero.stage == 1 and any("stage 1" in n for n in notes)  # no zero section = stage 0
    assert c.offload == TrainConfig().offload
    assert any("gradient_clipping" in n for n in notes) and any("constant learning rate" in n for n in notes)


def test_adam_with_weight_decay_is_decoupled_with_a_note():
    notes: list[str] = []
    c = from_deepspeed(_ds(optimizer={"type": "Adam", "params": {"weight_decay": 0.01}}), notes=notes)
    assert c.optimizer.name == "adamw" and c.optimizer.weight_decay == 0.01
    assert any("decoupled" in n and "Adam" in n for n in notes)
    probs = _problems(_ds(optimizer={"type": "Adam", "params": {"weight_decay": 0.01, "adam_w_mode": False}}))
    p = probs["optimizer.params.adam_w_mode"]
    assert p.value is False and "L2" in p.message
    # AdamW forces decoupling in DeepSpeed, whatever adam_w_mode says
    assert from_deepspeed(_ds(optimizer={"type": "AdamW", "params": {"weight_decay": 0.1, "adam_w_mode": False}}))


def test_sgd_mapping():
    c = from_deepspeed(_ds(optimizer={"type": "SGD", "params": {"lr": 0.1, "momentum": 0.5, "weight_decay": 1e-4}}))
    assert (c.optimizer.name, c.optimizer.lr, c.optimizer.momentum, c.optimizer.weight_decay) == \
        ("sgd", 0.1, 0.5, 1e-4)
    probs = _problems(_ds(optimizer={"type": "SGD", "params": {"nesterov": True, "betas": [0.9, 0.9]}}))
    assert probs["optimizer.params.nesterov"].value is True
    assert probs["optimizer.params.betas"].value == [0.9, 0.9]


@pytest.mark.parametrize("sched, expect", [
    ({"type": "WarmupLR", "params": {"warmup_min_lr": 1e-4, "warmup_max_lr": 1e-3, "warmup_num_steps": 10,
                                     "warmup_type": "linear"}},
     {"kind": "constant", "warmup_steps": 10, "warmup_min_ratio": 0.1, "lr": 1e-3, "warmup_type": "linear"}),
    ({"type": "WarmupDecayLR", "params": {"total_num_steps": 200, "warmup_min_lr": 0.0, "warmup_max_lr": 5e-4,
                                          "warmup_num_steps": 20}},
     {"kind": "linear", "warmup_steps": 20, "total_steps": 200, "min_lr_ratio": 0.0, "lr": 5e-4,
      "warmup_type": "log"}),
    ({"type": "WarmupCosineLR", "params": {"total_num_steps": 300, "warmup_num_steps": 100}},
     {"kind": "cosine", "warmup_steps": 100, "total_steps": 300, "min_lr_ratio": 0.0001,
      "warmup_min_ratio": 0.0, "lr": 7e-4, "warmup_type": "log"}),
])
def test_scheduler_mapping(sched, expect):
    """DeepSpeed's defaults fill what is missing (cos_min_ratio 1e-4, log warmup)."""
    c = from_deepspeed(_ds(optimizer={"type": "AdamW", "params": {"lr": 7e-4}}, scheduler=sched))
    got = {key: c.optimizer.lr if key == "lr" else getattr(c.scheduler, key) for key in expect}
    assert got == pytest.approx(expect)


def test_warmup_lr_without_max_uses_optimizer_lr():
    c = from_deepspeed(_ds(optimizer={"type": "AdamW", "params": {"lr": 2e-3}},
                           scheduler={"type": "WarmupLR", "params": {"warmup_min_lr": 1e-3, "warmup_num_steps": 5}}))
    assert c.optimizer.lr == 2e-3 and c.scheduler.warmup_min_ratio == pytest.approx(0.5)


def test_scheduler_problems():
    probs = _problems(_ds(scheduler={"type": "WarmupDecayLR", "params": {"warmup_num_steps": 5}}))
    assert "scheduler.params.total_num_steps" in probs
    probs = _problems(_ds(scheduler={"type": "OneCycle", "params": {}}))
    assert probs["scheduler.type"].value == "OneCycle"
    probs = _problems(_ds(scheduler={"type": "warmupcosinelr", "params": {"total_num_steps": 9}}))
    assert "did you mean 'WarmupCosineLR'" in probs["scheduler.type"].fix
    probs = _problems(_ds(scheduler={"type": "WarmupCosineLR", "params": {"total_num_steps": 100,
                                                                          "cos_min_ratio": 2}}))
    p = probs["scheduler.params.cos_min_ratio"]
    assert p.value == 2.0 and "scheduler.min_lr_ratio" in p.message


def test_fp16_mapping_and_static_scale():
    c = from_deepspeed(_ds(fp16={"enabled": True, "loss_scale": 0, "initial_scale_power": 12,
                                 "loss_scale_window": 500, "hysteresis": 3, "min_loss_scale": 0.5}))
    p = c.precision
    assert (p.compute, p.reduce, p.initial_scale_power, p.loss_scale_window, p.hysteresis, p.min_loss_scale) == \
        ("fp16", "fp16", 12, 500, 3, 0.5)
    probs = _problems(_ds(fp16={"enabled": True, "loss_scale": 128}))
    assert probs["fp16.loss_scale"].value == 128 and "static" in probs["fp16.loss_scale"].message


def test_bf16_alias_and_both_enabled():
    assert from_deepspeed(_ds(bfloat16={"enabled": True})).precision.compute == "bf16"
    probs = _problems(_ds(bf16={"enabled": True}, fp16={"enabled": True}))
    assert probs["bf16.enabled"].value is True
    probs = _problems(_ds(bf16={"enabled": True}, communication_data_type="fp8"))
    assert probs["communication_data_type"].value == "fp8"


def test_batch_size_rules():
    c = from_deepspeed({"train_batch_size": 64, "train_micro_batch_size_per_gpu": 8}, world_size=2)
    assert (c.train.micro_batch_size, c.train.grad_accum_steps, c.train.global_batch_size) == (8, 4, 64)
    c = from_deepspeed({"train_batch_size": 32}, world_size=4)
    assert (c.train.micro_batch_size, c.train.grad_accum_steps) == (8, 1)
    probs = _problems({"train_batch_size": 60, "train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 1})
    assert probs["train_batch_size"].value == 60
    probs = _problems({"train_batch_size": 64, "train_micro_batch_size_per_gpu": 8}, world_size=3)
    assert "gradient_accumulation_steps" in probs
    probs = _problems({"train_micro_batch_size_per_gpu": 2.5})
    assert probs["train_micro_batch_size_per_gpu"].value == 2.5
    c = from_deepspeed({"train_batch_size": "auto", "train_micro_batch_size_per_gpu": 2})
    assert c.train.global_batch_size == 0


def test_zero_stage_and_offload_rules(tmp_path):
    probs = _problems(_ds(zero_optimization={"stage": 2, "offload_param": {"device": "cpu"},
                                             "offload_optimizer": {"device": "cpu"}}))
    assert probs["zero_optimization.stage"].value == 2 and "stage 3" in probs["zero_optimization.stage"].message
    # DeepSpeed offloads parameters alone; tierlift refreshes them from the host optimizer
    probs = _problems(_ds(zero_optimization={"stage": 3, "offload_param": {"device": "cpu"}}))
    assert probs["zero_optimization.offload_param"].value == "cpu"
    assert "optimizer offloaded too" in probs["zero_optimization.offload_param"].message
    c = from_deepspeed(_ds(zero_optimization={"stage": 2, "offload_optimizer": {"device": "cpu"}}))
    assert c.zero.stage == 2 and isinstance(c.offload.optimizer, CPUOffload) and isinstance(c.offload.param, NoOffload)
    assert from_deepspeed(_ds(zero_optimization={"stage": 0})).zero.stage == 1
    probs = _problems(_ds(zero_optimization={"stage": 3, "offload_param": {"device": "gpu"},
                                             "offload_optimizer": {"device": "nvme"}}))
    assert probs["zero_optimization.offload_param.device"].value == "gpu"
    assert "zero_optimization.offload_optimizer.nvme_path" in probs
    f = tmp_path / "file"
    f.write_text("")
    probs = _problems(_ds(zero_optimization={"stage": 3, "offload_optimizer": {"device": "nvme", "nvme_path": str(f),
                                                                               "buffer_count": 1}}))
    assert probs["zero_optimization.offload_optimizer.nvme_path"].value == str(f)
    assert probs["zero_optimization.offload_optimizer.buffer_count"].value == 1
    c = from_deepspeed(_ds(zero_optimization={"stage": 3, "stage3_prefetch_bucket_size": 10}))
    assert c.zero.prefetch_bytes == 40  # fp32: 4 bytes per element


def test_aio_thread_count_message():
    probs = _problems(_ds(aio={"thread_count": 8, "intra_op_parallelism": 2}))
    p = probs["aio.thread_count"]
    assert p.value == 8 and "not a DeepSpeed aio setting" in p.message
    assert ("renamed intra_op_parallelism in DeepSpeed; tierlift maps intra_op_parallelism to "
            "offload.aio.threads") in p.fix


def test_aio_reaches_every_nvme_policy(tmp_path):
    d = _ds(zero_optimization={"stage": 3, "offload_param": {"device": "nvme", "nvme_path": str(tmp_path)},
                               "offload_optimizer": {"device": "nvme", "nvme_path": str(tmp_path)}},
            aio={"intra_op_parallelism": 5, "use_gds": True})
    c = from_deepspeed(d)
    for policy in (c.offload.param, c.offload.optimizer):
        assert policy.aio.threads == 5 and policy.aio.use_gds and policy.aio.backend == "libaio"
    probs = _problems({**d, "aio": {"block_size": 100, "queue_depth": 0}})
    assert probs["aio.block_size"].value == 100
    assert probs["aio.queue_depth"].value == 0


def test_all_problems_reported_together():
    d = _ds(aio={"thread_count": 4},
            zero_optimization={"stage": 3, "overlap_com": True, "zero_quantized_weights": True, "cpu_offload": 2},
            optimizer={"type": "Lamb"}, fp16={"enabled": True, "loss_scale": 64},
            amp={"enabled": True}, tensorboard={"enabled": True},  # monitors are ignored, amp is not
            activation_checkpointing={"partition_activations": True},
            gradient_clipping=-1, model={"kind": "gpt"}, fancy_new_feature=1,
            steps_per_print="often")
    with pytest.raises(DeepSpeedConfigError) as info:
        from_deepspeed(d)
    e = info.value
    expected = {"aio.thread_count", "zero_optimization.overlap_com", "zero_optimization.zero_quantized_weights",
                "zero_optimization.cpu_offload", "optimizer.type", "fp16.loss_scale", "amp",
                "gradient_clipping", "model", "fancy_new_feature", "steps_per_print"}
    assert {p.setting for p in e.problems} == expected
    text = str(e)
    assert f"{len(expected)} settings" in text
    for key in expected:
        assert f"  - {key}=" in text
    assert isinstance(e, ConfigError)
    again = pickle.loads(pickle.dumps(e))  # Ray moves errors between processes
    assert str(again) == text and [p.setting for p in again.problems] == [p.setting for p in e.problems]
    by = {p.setting: p for p in e.problems}
    assert "did you mean 'overlap_comm'" in by["zero_optimization.overlap_com"].fix
    assert "true or false" in by["zero_optimization.cpu_offload"].fix
    assert "tierlift section" in by["model"].message
    assert by["gradient_clipping"].value == -1.0 and "optimizer.grad_clip" in by["gradient_clipping"].message
    assert by["steps_per_print"].value == "often"


def test_auto_values_are_decided_and_each_choice_is_one_line():
    c = from_deepspeed({"train_micro_batch_size_per_gpu": "auto", "gradient_clipping": "auto",
                        "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto",
                                                                  "weight_decay": "auto"}},
                        "scheduler": {"type": "WarmupDecayLR", "params": {"warmup_min_lr": "auto", "warmup_max_lr":
                                      "auto", "warmup_num_steps": "auto", "total_num_steps": "auto"}},
                        "fp16": {"enabled": "auto"}, "bf16": {"enabled": "auto"},
                        "zero_optimization": {"stage": 3, "reduce_bucket_size": "auto",
                                              "stage3_prefetch_bucket_size": "auto",
                                              "stage3_param_persistence_threshold": "auto",
                                              "stage3_gather_16bit_weights_on_model_save": "auto"}})
    d = TrainConfig()
    assert c.train.micro_batch_size == d.train.micro_batch_size and c.optimizer.grad_clip == d.optimizer.grad_clip
    o = c.optimizer
    assert (o.lr, o.betas, o.eps, o.weight_decay) == (d.optimizer.lr, d.optimizer.betas, d.optimizer.eps,
                                                      d.optimizer.weight_decay)
    s = c.scheduler
    assert (s.kind, s.warmup_steps, s.total_steps, s.warmup_min_ratio) == ("linear", 0, 0, 0.0)
    assert c.precision.compute == "fp32"  # no CUDA here: fp32
    assert (c.zero.prefetch_bytes, c.zero.persistence_threshold) == (0, 0)
    lines = c._deepspeed_choices
    for key in ("train_micro_batch_size_per_gpu", "gradient_clipping", "optimizer.params.lr",
                "optimizer.params.betas", "scheduler.params.warmup_max_lr", "scheduler.params.total_num_steps",
                "fp16.enabled", "bf16.enabled", "zero_optimization.reduce_bucket_size",
                "zero_optimization.stage3_prefetch_bucket_size", "zero_optimization.stage3_param_persistence_threshold",
                "zero_optimization.stage3_gather_16bit_weights_on_model_save"):
        assert sum(line.startswith(f'ds-config: {key}="auto" -> ') for line in lines) == 1, key
    text = "\n".join(lines)
    assert f'ds-config: optimizer.params.lr="auto" -> {d.optimizer.lr} (' in text
    assert 'ds-config: fp16.enabled="auto" -> false (no CUDA device, CPU: fp32 compute)' in lines
    assert 'ds-config: zero_optimization.reduce_bucket_size="auto" -> not used (' in text
    assert "train_batch_size" not in text  # not given, micro-batch given: DeepSpeed derives it, no line
    # a key tierlift has no value to choose for stays an error
    probs = _problems(_ds(zero_optimization={"stage": "auto"}))
    assert probs["zero_optimization.stage"].value == "auto" and "no value tierlift" in probs[
        "zero_optimization.stage"].message


def test_precision_auto_follows_the_device(monkeypatch):
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    both = {"fp16": {"enabled": "auto"}, "bf16": {"enabled": "auto"}}
    assert from_deepspeed(_ds(**both)).precision.compute == "bf16"
    assert from_deepspeed(_ds(fp16={"enabled": True}, bf16={"enabled": "auto"})).precision.compute == "fp16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    c = from_deepspeed(_ds(**both))
    assert c.precision.compute == "fp16"
    assert 'ds-config: bf16.enabled="auto" -> false (a CUDA device without bf16: bf16 not supported)' in \
        c._deepspeed_choices


def test_no_effect_and_fixed_keys():
    notes: list[str] = []
    c = from_deepspeed(_ds(wall_clock_breakdown=True, zero_allow_untested_optimizer=True,
                           tensorboard={"enabled": False, "output_path": "x"},
                           zero_optimization={"stage": 3, "overlap_comm": True, "reduce_bucket_size": 5e8,
                                              "zero_quantized_weights": False, "mics_shard_size": -1}),
                       notes=notes)
    assert c.zero.stage == 3
    assert any("wall_clock_breakdown=True" in n for n in notes)
    assert any("overlap_comm=True" in n and "reduce_bucket_size" in n for n in notes)
    assert any("tensorboard is disabled" in n for n in notes)
    probs = _problems(_ds(prescale_gradients=True, zero_optimization={"mics_shard_size": 8, "stage": 3}))
    assert probs["prescale_gradients"].value is True
    assert probs["zero_optimization.mics_shard_size"].value == 8
    probs = _problems(_ds(zero_optimization={"stage": 3, "zero_hpz_partition_size": True}))
    assert "zero_optimization.zero_hpz_partition_size" in probs  # JSON true is not 1
    probs = _problems(_ds(optimizer={"type": "AdamW", "params": {"max_grad_norm": 1.0}}))
    assert "gradient_clipping" in probs["optimizer.params.max_grad_norm"].fix


def test_not_a_mapping():
    with pytest.raises(ConfigError):
        from_deepspeed([1, 2])
    probs = _problems(_ds(zero_optimization=True))
    assert probs["zero_optimization"].value is True


# -- conversion ------------------------------------------------------------------------
def test_convert_file_writes_loadable_yaml_and_refuses_overwrite(tmp_path):
    src = tmp_path / "ds.json"
    d = _ds(bf16={"enabled": True}, optimizer={"type": "Adam", "params": {"lr": 1e-4, "weight_decay": 0.1}})
    src.write_text(json.dumps(d))
    out = tmp_path / "sub" / "run.yaml"
    text = convert_file(src, out)
    assert out.read_text() == text
    assert f"# source: {src}" in text and "decoupled" in text  # header: source and notes
    assert TrainConfig.load(out) == from_deepspeed(d)
    with pytest.raises(ConfigError) as info:
        convert_file(src, out)
    assert info.value.setting == "out" and info.value.value == str(out) and "overwrite" in info.value.fix
    out.write_text("keep me")
    with pytest.raises(ConfigError):
        convert_file(src, out)
    assert out.read_text() == "keep me"
    assert convert_file(src, out, overwrite=True) == text and out.read_text() == text
    assert convert_file(src) == text  # no out_path: only returns the text
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["run.yaml"]  # no temp files left


def test_convert_file_rejects_tierlift_yaml(tmp_path):
    src = tmp_path / "t.yaml"
    src.write_text("train: {max_steps: 3}\n")
    with pytest.raises(ConfigError) as info:
        convert_file(src)
    assert info.value.setting == "config" and "not a DeepSpeed config" in info.value.message


def test_to_tierlift_yaml_round_trip():
    d = json.load(open(SHIPPED))
    text = to_tierlift_yaml(d)
    import yaml
    assert TrainConfig.from_dict(yaml.safe_load(text)) == from_deepspeed(d)


def test_shipped_example():
    c = TrainConfig.load(SHIPPED)
    assert (c.zero.stage, c.precision.compute, c.optimizer.name, c.scheduler.kind) == (3, "bf16", "adamw", "cosine")
    assert isinstance(c.offload.param, CPUOffload) and isinstance(c.offload.optimizer, CPUOffload)
    assert c.optimizer.grad_clip == 1.0 and c.train.micro_batch_size == 8
    notes = c._deepspeed_notes
    assert any("nvme_path" in n and "no effect with device cpu" in n for n in notes)
    # flipping both devices to nvme is all it takes to use the nvme_path and aio block
    d = json.load(open(SHIPPED))
    for role in ("offload_param", "offload_optimizer"):
        d["zero_optimization"][role]["device"] = "nvme"
    c = from_deepspeed(d)
    assert c.offload.param.path == "/tmp/tierlift-nvme" and c.offload.param.aio.block_size == 1048576
    assert c.offload.param.buffer_count == 5 and c.offload.optimizer.buffer_count == 4


def test_key_tables_name_real_deepspeed_keys():
    """Guards against invented key names: every zero/offload/precision key tierlift
    classifies exists in the installed DeepSpeed's config models."""
    from deepspeed.runtime.precision_config import DeepSpeedBF16Config, DeepSpeedFP16Config
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    from deepspeed.runtime.zero.offload_config import (DeepSpeedZeroOffloadOptimizerConfig,
                                                       DeepSpeedZeroOffloadParamConfig)

    def names(model):
        return {n for n, f in model.model_fields.items()} | {f.alias for f in model.model_fields.values() if f.alias}

    zero = set(K.ZERO_MAPPED) | set(K.ZERO_NO_EFFECT) | set(K.ZERO_FIXED) | set(K.ZERO_UNSUPPORTED) \
        | set(K.ZERO_IGNORED) | set(K.ZERO_AUTO)
    assert zero - {"mics_shard_size"} <= names(DeepSpeedZeroConfig)  # MiCS is read outside the model
    assert K.OFFLOAD_MAPPED["param"] <= names(DeepSpeedZeroOffloadParamConfig)
    opt = K.OFFLOAD_MAPPED["optimizer"] | set(K.OFFLOAD_OPTIMIZER_NO_EFFECT) | set(K.OFFLOAD_OPTIMIZER_FIXED)
    assert opt <= names(DeepSpeedZeroOffloadOptimizerConfig)
    assert K.FP16_MAPPED | set(K.FP16_FIXED) <= names(DeepSpeedFP16Config)
    assert K.BF16_MAPPED | set(K.BF16_FIXED) | set(K.BF16_NO_EFFECT) <= names(DeepSpeedBF16Config)
    DeepSpeedZeroConfig(**json.load(open(SHIPPED))["zero_optimization"])  # DeepSpeed accepts the example
    from deepspeed.runtime.activation_checkpointing import config as act
    act_keys = {getattr(act, n) for n in dir(act) if n.startswith("ACT_CHKPT_") and not n.endswith("_DEFAULT")}
    assert K.ACT_MAPPED | set(K.ACT_NO_EFFECT) == act_keys


def test_tuning_only_keys_are_accepted_and_the_ignored_ones_named_once_in_a_warning(caplog):
    d = _ds(activation_checkpointing={"partition_activations": True}, memory_breakdown=True,
            checkpoint={"tag_validation": "Warn"}, wandb={"enabled": True, "project": "p"},
            zero_optimization={"stage": 2, "ignore_unused_parameters": False, "round_robin_gradients": True,
                               "allgather_bucket_size": 5e8, "cpu_offload": True},
            optimizer={"type": "Adam", "params": {"adam_w_mode": False, "torch_adam": True}})
    with caplog.at_level(logging.WARNING, logger="tierlift.config"):
        c = from_deepspeed(d)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    for key in ("memory_breakdown=true", "checkpoint=", "wandb (enabled)",
                "zero_optimization.ignore_unused_parameters=false"):
        assert key in warnings[0], key
    assert "activation_checkpointing" not in warnings[0]  # mapped, not ignored
    assert c.train.activations.policy == "recompute"
    assert isinstance(c.offload.optimizer, CPUOffload)  # cpu_offload: DeepSpeed's old spelling
    assert c.optimizer.name == "adamw" and c.optimizer.weight_decay == 0.0  # adam_w_mode moot without decay
    # the fixed value is silent; a value that changes the numbers is still refused
    assert not any("ignore_unused" in n for n in from_deepspeed(
        _ds(zero_optimization={"stage": 2, "ignore_unused_parameters": True}))._deepspeed_notes)
    assert "amp" in _problems(_ds(amp={"enabled": True}))


def test_imports_run_one_way():
    """runtime.config imports the DeepSpeed mapping; nothing of the mapping imports
    runtime.config, and config.py imports nothing inside a function to dodge a cycle."""
    import ast

    import tierlift.runtime as rt
    here = os.path.dirname(rt.__file__)

    def imports(name, in_functions=False):
        tree = ast.parse(open(os.path.join(here, name)).read())
        nodes = [n for f in ast.walk(tree) if isinstance(f, ast.FunctionDef) for n in ast.walk(f)] \
            if in_functions else list(ast.walk(tree))
        return {n.module for n in nodes if isinstance(n, ast.ImportFrom)} | \
            {a.name for n in nodes if isinstance(n, ast.Import) for a in n.names}

    for name in ("deepspeed_compat.py", "deepspeed_sections.py", "deepspeed_keys.py", "deepspeed_auto.py",
                 "loop_config.py"):
        assert "tierlift.runtime.config" not in imports(name), name
    assert not {m for m in imports("config.py", in_functions=True) if m.startswith("tierlift")}
    assert "tierlift.runtime.deepspeed_compat" in imports("config.py")


def test_batch_sizes_derived_once_the_world_size_is_known():
    from tierlift.runtime.config import resolve_batch_sizes
    from tierlift.runtime.loop_config import LoopConfig

    cfg = TrainConfig(train=LoopConfig(micro_batch_size=0, grad_accum_steps=3, global_batch_size=24))
    out, lines = resolve_batch_sizes(cfg, 4)
    assert (out.train.micro_batch_size, out.train.grad_accum_steps) == (2, 3) and len(lines) == 1
    out, lines = resolve_batch_sizes(TrainConfig(train=LoopConfig(micro_batch_size=0, grad_accum_steps=0,
                                                                  global_batch_size=8)), 2)
    assert (out.train.micro_batch_size, out.train.grad_accum_steps) == (4, 1) and len(lines) == 2
    out, lines = resolve_batch_sizes(TrainConfig(train=LoopConfig(micro_batch_size=2, grad_accum_steps=0,
                                                                  global_batch_size=16)), 2)
    assert out.train.grad_accum_steps == 4
    with pytest.raises(ConfigError, match="not a multiple of grad_accum_steps 3 x 3 ranks = 9") as e:
        resolve_batch_sizes(cfg, 3)
    assert e.value.setting == "train.global_batch_size" and "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="train.global_batch_size"):
        LoopConfig(micro_batch_size=0)  # derived only from a global batch
    c = from_deepspeed({"train_batch_size": 8, "gradient_accumulation_steps": 2})
    assert (c.train.micro_batch_size, c.train.grad_accum_steps, c.train.global_batch_size) == (0, 2, 8)
    with pytest.raises(ConfigError, match="depends on the number of ranks"):
        to_tierlift_yaml({"train_batch_size": 8, "gradient_accumulation_steps": 2})
    text = to_tierlift_yaml({"train_batch_size": 8, "gradient_accumulation_steps": 2}, world_size=2)
    assert TrainConfig.from_dict(yaml.safe_load(text)).train.micro_batch_size == 2


def test_activation_checkpointing_section_maps_onto_the_activation_policy():
    assert from_deepspeed(_ds()).train.activations.policy == "keep"
    c = from_deepspeed(_ds(activation_checkpointing={"partition_activations": False, "number_checkpoints": 4,
                                                     "contiguous_memory_optimization": True}))
    assert c.train.activations.policy == "recompute"
    assert any("number_checkpoints" in n for n in c._deepspeed_notes)  # no effect, said so
    assert from_deepspeed(_ds(activation_checkpointing={"cpu_checkpointing": True})).train.activations.policy == "auto"
    probs = _problems(_ds(activation_checkpointing={"cpu_checkpointing": "yes", "partition_activation": True}))
    assert set(probs) == {"activation_checkpointing.cpu_checkpointing", "activation_checkpointing.partition_activation"}
