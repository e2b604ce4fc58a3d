"""Which parameters weight decay applies to (optimizer.decay_1d, optimizer.no_decay):
the engine on 2 CPU ranks matches torch.optim.AdamW given the same decay groups."""

from __future__ import annotations

import json

import pytest
import torch

from _dist import run_ranks
from tierlift.errors import ConfigError

STEPS, MBS, SEQ, LR, WD = 6, 2, 16, 3e-3, 0.5
TINY = {"kind": "gpt", "vocab_size": 64, "d_model": 32, "n_layers": 2, "n_heads": 4, "max_seq_len": SEQ}


def _model():
    from tierlift.models import build_model
    from tierlift.models.config import ModelConfig
    return build_model(ModelConfig(**TINY), seed=7)


def _batch(step: int, rank: int) -> dict:
    g = torch.Generator().manual_seed(100 + step * 2 + rank)
    x = torch.randint(0, 64, (MBS, SEQ + 1), generator=g)
    return {"input_ids": x[:, :-1], "labels": x[:, 1:]}


def _engine(opt_kwargs: dict):
    import torch.distributed as dist

    from tierlift.parallel.config import OptimizerConfig, PrecisionConfig, ZeroConfig
    from tierlift.parallel.zero import ZeroEngine

    dist.init_process_group("gloo")
    model = _model()
    eng = ZeroEngine(model, ZeroConfig(stage=3), PrecisionConfig(),
                     OptimizerConfig(lr=LR, weight_decay=WD, grad_clip=0.0, **opt_kwargs), torch.device("cpu"))
    for s in range(STEPS):
        eng.forward_begin()
        eng.backward(model(**_batch(s, dist.get_rank())).loss)
        eng.step(LR)
    return eng.full_state_dict()


def _reference(no_decay_names: set[str]):
    model = _model()
    named = dict(model.named_parameters())
    groups = [{"params": [p for n, p in named.items() if n not in no_decay_names], "weight_decay": WD},
              {"params": [p for n, p in named.items() if n in no_decay_names], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=LR, betas=(0.9, 0.95), eps=1e-8)
    for s in range(STEPS):
        opt.zero_grad()
        for r in range(2):
            (model(**_batch(s, r)).loss / 2).backward()
        opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _rel(a, b) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def test_decay_1d_and_no_decay_match_torch_adamw_groups():
    names = [n for n, _ in _model().named_parameters()]
    ones = {n for n, p in _model().named_parameters() if p.ndim < 2}
    assert ones, "the tiny model needs 1-D parameters for this test to mean anything"
    every = _reference(set())
    for opts, ref in [({"decay_1d": True}, every),
                      ({}, _reference(ones)),
                      ({"decay_1d": True, "no_decay": ["*norm*"]}, _reference({n for n in names if "norm" in n}))]:
        got = run_ranks(_engine, 2, opts)
        for k, v in ref.items():
            assert _rel(got[k].float(), v) < 1e-5, (opts, k, _rel(got[k].float(), v))
    default = run_ranks(_engine, 2, {})
    # The switch matters: with decay_1d off the norm weights end measurably elsewhere.
    assert max(_rel(default[n].float(), every[n]) for n in ones) > 1e-4


def test_deepspeed_json_decays_every_parameter_and_yaml_default_does_not(tmp_path):
    from tierlift.runtime.config import TrainConfig

    p = tmp_path / "ds.json"
    p.write_text(json.dumps({"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
                             "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.01}}}))
    assert TrainConfig.load(str(p)).optimizer.decay_1d is True
    assert TrainConfig.from_dict({}).optimizer.decay_1d is False


@pytest.mark.parametrize("opt, setting", [({"decay_1d": 1}, "optimizer.decay_1d"),
                                           ({"no_decay": [""]}, "optimizer.no_decay")])
def test_bad_decay_settings_name_the_setting(opt, setting):
    from tierlift.runtime.config import TrainConfig

    with pytest.raises(ConfigError) as e:
        TrainConfig.from_dict({"optimizer": opt})
    assert e.value.setting == setting
