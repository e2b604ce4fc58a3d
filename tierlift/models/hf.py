"""Hugging Face ``transformers`` causal LMs, built offline, trained unchanged.

Label convention.  tierlift's data pipeline gives ``labels[:, i]`` = the target
of position ``i`` (already shifted).  HF causal LMs shift ``labels`` once more
inside their loss, which would train on the token two ahead.  Rather than wrap
the model (a wrapper adds a prefix to every ``state_dict`` key and hides
``_no_split_modules``, ``config`` and ``save_pretrained``), the returned model
is the HF model itself with its ``loss_function`` attribute (a documented
settable property of ``PreTrainedModel``) replaced by
:func:`tierlift.models.layers.aligned_lm_loss`, which does not shift and
computes in fp32.  So:

* ``model(input_ids=..., labels=...)`` returns ``.loss`` = mean CE(logits[:, i],
  labels[:, i]) over labels != -100, plus the router aux loss for MoE models
  whose config sets ``output_router_logits: true`` (HF's own behaviour);
* ``model.state_dict()`` keys are the HF names, so a safetensors export loads
  with ``from_pretrained``;
* ``_no_split_modules`` is the class's own (e.g. ``["LlamaDecoderLayer"]``).

The same rule holds for a HF causal LM a user passes to the Trainer, which
applies it too; data with HF's unshifted labels is refused
(:mod:`tierlift.models.labels`).
"""

from __future__ import annotations

import importlib
import logging
import os
from typing import Any

import torch
from torch import nn

from tierlift._configbase import nearest
from tierlift.errors import ConfigError
from tierlift.models.config import ModelConfig
from tierlift.models.layers import aligned_lm_loss

__all__ = ["build_hf_model", "load_hf_config", "use_aligned_labels", "WEIGHT_FILES"]

log = logging.getLogger(__name__)

# A directory holding any of these has weights to load; otherwise only config.json.
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json",
                "pytorch_model.bin", "pytorch_model.bin.index.json")


def _import_transformers() -> Any:
    try:
        return importlib.import_module("transformers")
    except ImportError as exc:
        raise ConfigError(f"needs the optional dependency transformers ({exc}).", setting="model.kind",
                          value="hf", fix="pip install 'tierlift[hf]'.") from exc


def use_aligned_labels(model: nn.Module) -> nn.Module:
    """Make a HF causal LM read ``labels`` under tierlift's convention (no shift,
    fp32 loss); returns the same module.  Idempotent."""
    model.loss_function = aligned_lm_loss
    return model


def _config_from_dict(transformers: Any, hf_config: dict[str, Any]) -> Any:
    spec = dict(hf_config)
    model_type = spec.pop("model_type", None)
    if not model_type:
        raise ConfigError("has no model_type.", setting="model.hf_config", value=hf_config,
                          fix="add model_type, e.g. {model_type: llama, hidden_size: 512, ...}.")
    try:
        config = transformers.AutoConfig.for_model(model_type, **spec)
    except ValueError as exc:
        raise ConfigError(f"is not a model type this transformers {transformers.__version__} knows.",
                          setting="model.hf_config.model_type", value=model_type,
                          fix="use a type such as llama, mistral, mixtral, qwen2_moe or qwen3_moe, or "
                              "upgrade transformers.") from exc
    _reject_typos(config, spec)
    return config


def _reject_typos(config: Any, spec: dict[str, Any]) -> None:
    """HF configs keep any unknown keyword as an attribute that no model reads,
    so a misspelt key would be silently ignored.  A key is unknown when the
    config stored it verbatim although its class does not declare it (keys HF
    consumes and renames, like rope_theta, are not stored verbatim).  A key
    close to a declared one is an error (a typo); others only warn, because
    some models read optional attributes they never declare."""
    try:
        declared = set(type(config)().to_dict()) | set(getattr(config, "attribute_map", {}))
    except Exception:  # a config class without usable defaults: nothing to compare against
        return
    stored = config.to_dict()
    for key in spec:
        if key in declared or key not in stored:
            continue
        hint = nearest(key, declared)
        if hint is not None:
            raise ConfigError(f"is not a setting of {type(config).__name__}.", setting=f"model.hf_config.{key}",
                              value=spec[key], fix=f"did you mean {hint!r}?")
        log.warning("model.hf_config.%s=%r is not declared by %s; it only has an effect if the model "
                    "reads it.", key, spec[key], type(config).__name__)


def load_hf_config(cfg: ModelConfig) -> Any:
    """The ``transformers`` config of a kind-"hf" model: ``cfg.hf_config`` through
    ``AutoConfig.for_model``, or ``hf_path``'s config.json (offline); no weights."""
    transformers = _import_transformers()
    if cfg.hf_config:
        return _config_from_dict(transformers, cfg.hf_config)
    path = _resolve_path(cfg.hf_path)
    try:
        return transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"has a config.json transformers {transformers.__version__} cannot read: {exc}",
                          setting="model.hf_path", value=path,
                          fix="point model.hf_path at a save_pretrained output of a supported causal LM.") from exc


def _resolve_path(path: str) -> str:
    path = os.path.expanduser(path)
    if not os.path.isdir(path) or not os.path.isfile(os.path.join(path, "config.json")):
        raise ConfigError("is not a local directory holding a Hugging Face config.json "
                          "(tierlift never downloads models).", setting="model.hf_path", value=path,
                          fix="download once elsewhere, e.g. `huggingface-cli download ORG/NAME --local-dir "
                              "DIR`, and set model.hf_path: DIR (or give model.hf_config instead).")
    return path


def _instantiate(load: Any, *args: Any, **kwargs: Any) -> nn.Module:
    """Prefer SDPA attention; fall back to the model's default for the few
    architectures without an SDPA path (HF raises ValueError for those)."""
    try:
        return load(*args, attn_implementation="sdpa", **kwargs)
    except ValueError as exc:
        message = str(exc).lower()
        if "sdpa" not in message and "scaled_dot_product_attention" not in message:
            raise
        log.warning("this model has no SDPA attention (%s); using its default attention.", exc)
        return load(*args, **kwargs)


def build_hf_model(cfg: ModelConfig) -> nn.Module:
    """The ``transformers`` causal LM described by ``cfg`` (kind "hf"), offline.

    ``cfg.hf_config`` (dict with ``model_type``) → ``AutoConfig.for_model`` →
    ``AutoModelForCausalLM.from_config`` (fresh init from the torch RNG:
    seed first, as :func:`tierlift.models.build_model` does).
    ``cfg.hf_path`` (local dir) → ``from_pretrained(local_files_only=True)``
    when weights are present, else ``from_config`` of its config.json.

    The result has fp32 parameters (the precision policy casts later; a bf16
    checkpoint is upcast), SDPA attention, ``config.use_cache = False`` (a KV
    cache built in training forwards would keep every layer's keys and values
    alive and defeat activation offload/recompute; an exporter may set it back)
    and is in train mode.  Its loss follows tierlift's label convention: see
    the module docstring.  The trainer calls it as ``model(**batch)`` with
    ``batch = {"input_ids": ..., "labels": ...}`` and reads ``.loss``.
    """
    transformers = _import_transformers()
    auto_model = transformers.AutoModelForCausalLM
    if cfg.hf_config:
        config = _config_from_dict(transformers, cfg.hf_config)
        model = _instantiate(auto_model.from_config, config, dtype=torch.float32)
    else:
        path = _resolve_path(cfg.hf_path)
        try:
            if any(os.path.exists(os.path.join(path, name)) for name in WEIGHT_FILES):
                model = _instantiate(auto_model.from_pretrained, path, local_files_only=True,
                                     dtype=torch.float32)
            else:
                config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
                model = _instantiate(auto_model.from_config, config, dtype=torch.float32)
        except (OSError, ValueError) as exc:
            # Unknown model_type, remote code (never trusted: it would run code
            # from the directory), a broken or partial weights file ...
            raise ConfigError(f"could not be loaded by transformers {transformers.__version__}: {exc}",
                              setting="model.hf_path", value=path,
                              fix="check that the directory is a complete save_pretrained output of a "
                                  "causal LM this transformers version supports.") from exc
    model.config.use_cache = False
    model.train()
    return use_aligned_labels(model)
