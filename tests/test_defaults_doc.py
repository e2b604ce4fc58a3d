"""The settings the TrainConfig docstring gives for plain AdamW behaviour do give it."""

from __future__ import annotations

import re

import torch
import yaml

from tierlift.runtime.config import TrainConfig


def _documented_plain_adamw() -> dict:
    block = TrainConfig.__doc__.split("::", 1)[1]
    lines = [ln.strip() for ln in block.splitlines() if re.match(r"\s+\w+: \{", ln)]
    return yaml.safe_load("\n".join(lines))


def test_documented_plain_adamw_settings_match_torch_defaults():
    cfg = TrainConfig.from_dict(_documented_plain_adamw())
    ref = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))]).defaults
    o = cfg.optimizer
    assert (o.lr, tuple(o.betas), o.eps, o.weight_decay) == (ref["lr"], ref["betas"], ref["eps"], ref["weight_decay"])
    assert o.decay_1d and o.grad_clip == 0 and not o.no_decay
    assert cfg.scheduler.kind == "constant" and cfg.data.shuffle is False


def test_the_documented_defaults_are_the_defaults():
    cfg = TrainConfig()
    o = cfg.optimizer
    assert (o.lr, list(o.betas), o.weight_decay, o.decay_1d, o.grad_clip) == (3e-4, [0.9, 0.95], 0.1, False, 1.0)
    assert cfg.scheduler.kind == "cosine" and cfg.data.shuffle is True
    for needle in ("lr 3e-4", "betas (0.9, 0.95)", "weight decay 0.1", "clipping at 1.0", "cosine", "shuffled"):
        assert needle in " ".join(TrainConfig.__doc__.split()), needle
