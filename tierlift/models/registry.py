"""Model construction by ``ModelConfig.kind``, and what the engine asks of a model."""

from __future__ import annotations

import contextlib
from collections import Counter
from typing import Iterator, Sequence

import torch
from torch import nn

from tierlift._configbase import nearest
from tierlift.errors import ConfigError
from tierlift.models.config import ModelConfig
from tierlift.models.gpt import GPT
from tierlift.models.hf import build_hf_model
from tierlift.models.moe import MoEGPT

__all__ = ["build_model", "count_params", "wrap_class_names"]


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Run the body with torch's RNG seeded, then restore the caller's RNG state,
    so building a model neither depends on nor disturbs what ran before.  The
    CUDA generator is forked too when the default device is CUDA (modules
    created under ``torch.set_default_device("cuda")`` draw from it)."""
    default = torch.get_default_device()
    devices = []
    if default.type == "cuda":
        devices = [default.index if default.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=devices, device_type="cuda"):
        # Not torch.manual_seed: it would also reseed every CUDA generator,
        # including the ones fork_rng does not restore.
        torch.random.default_generator.manual_seed(seed)
        if devices:
            torch.cuda.manual_seed(seed)
        yield


def _build(cfg: ModelConfig) -> nn.Module:
    if cfg.kind == "gpt":
        return GPT(cfg)
    if cfg.kind == "moe-gpt":
        return MoEGPT(cfg)
    if cfg.kind == "hf":
        return build_hf_model(cfg)  # imports transformers only now
    raise ConfigError("is not a valid choice.", setting="model.kind", value=cfg.kind,
                      fix="use one of ['gpt', 'moe-gpt', 'hf'].")


def build_model(cfg: ModelConfig, seed: int | None = None) -> nn.Module:
    """The model ``cfg`` describes, with fp32 parameters on the default device.

    With ``seed``, initial weights depend only on (cfg, seed): every rank that
    calls ``build_model(cfg, seed)`` holds identical weights before any
    broadcast.  The global RNG state is restored afterwards.  Weights loaded by
    ``from_pretrained`` (kind "hf" with weights in ``hf_path``) ignore the seed.
    """
    if seed is None:
        return _build(cfg)
    with _seeded(seed):
        return _build(cfg)


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements; a tied weight counts once."""
    # parameters() already yields a Parameter shared under two names once.
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def wrap_class_names(model: nn.Module, override: Sequence[str] | None = None) -> list[str]:
    """Module class names that become wrap units (chunks).

    ``override`` (``zero.wrap``) when non-empty: every name must be the class of
    some module in the model, else ConfigError (a misspelt name would silently
    leave the whole model in the root chunk).  Otherwise the model's
    ``_no_split_modules`` (HF and built-in models), else its ``wrap_modules``
    attribute, else [].  HF turns ``_no_split_modules`` into a set on
    instances; sets come back sorted so every rank gets the same order.
    """
    if override:
        present = Counter(type(m).__name__ for m in model.modules())
        missing = [name for name in override if name not in present]
        if missing:
            hints = {name: nearest(name, present) for name in missing}
            repeated = sorted(name for name, n in present.items() if n > 1)
            fix = "; ".join(f"{name!r}: did you mean {hint!r}?" for name, hint in hints.items() if hint)
            raise ConfigError(f"names module classes that are not in the model: {missing}.",
                              setting="zero.wrap", value=list(override),
                              fix=(fix + ". " if fix else "") + f"Classes that repeat in this model: {repeated}; "
                                  "or leave zero.wrap empty to use the model's _no_split_modules.")
        return list(dict.fromkeys(override))
    for attr in ("_no_split_modules", "wrap_modules"):
        names = getattr(model, attr, None)
        if names:
            return sorted(names) if isinstance(names, (set, frozenset)) else list(dict.fromkeys(names))
    return []
