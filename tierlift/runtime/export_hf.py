"""The Hugging Face half of ``tierlift export``: what makes the exported directory
load with ``AutoModelForCausalLM.from_pretrained(dir)`` as is.

* ``config.json``: the run's model config (``model.hf_config`` or ``model.hf_path``
  in the run's ``config.yaml``, or the ``transformers`` config a caller passes),
  with ``architectures`` and ``dtype`` set as ``save_pretrained`` sets them and
  ``use_cache`` back on (tierlift turns it off for training only).
* ``generation_config.json``: ``hf_path``'s own when it has one, else the one
  ``transformers`` derives from the config (what ``save_pretrained`` writes for
  every model that can generate).
* Tied weights are written once, under the name ``save_pretrained`` keeps (the
  source of the model's ``_tied_weights_keys``, e.g. the input embedding);
  ``from_pretrained`` re-ties the others.  A tie the model class does not declare
  keeps a copy under every name, so nothing is lost.

``transformers`` is imported only here, only for a Hugging Face export.
"""

from __future__ import annotations

import copy
import importlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from tierlift._configbase import from_dict
from tierlift.errors import CheckpointError, ConfigError
from tierlift.models.config import ModelConfig
from tierlift.models.hf import load_hf_config

__all__ = ["HFExport", "hf_export_for", "tied_names_to_drop", "write_hf_metadata"]

_DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
GENERATION_CONFIG = "generation_config.json"


@dataclass
class HFExport:
    config: Any  # a transformers PretrainedConfig, a private copy
    architecture: str  # e.g. "LlamaForCausalLM"
    tied_targets: set[str]  # names from_pretrained re-ties (not written)
    generation_dir: str | None  # a directory holding generation_config.json to copy, if any


def _run_model_config(ckpt: str) -> ModelConfig | None:
    """The ``model`` section of the run's ``config.yaml`` when ``ckpt`` is a
    ``<run>/checkpoints/step-*`` dir of a ``tierlift train`` run, else None."""
    path = Path(ckpt).parent
    if path.name != "checkpoints" or not (path.parent / "config.yaml").is_file():
        return None
    cfg_file = path.parent / "config.yaml"
    try:
        data = yaml.safe_load(cfg_file.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise CheckpointError(f"the run's {cfg_file} cannot be read: {e}", setting="RUN_OR_CKPT",
                              value=str(path.parent), fix="restore the run's config.yaml, or export a "
                              "checkpoint copied out of its run dir to get the weights only.") from None
    section = data.get("model") if isinstance(data, dict) else None
    return from_dict(ModelConfig, section, "model") if isinstance(section, dict) else None


def hf_export_for(ckpt: str, hf_config: Any = None) -> HFExport | None:
    """What a Hugging Face export of ``ckpt`` needs, or None for a model that is
    not a ``transformers`` one (built-in kinds, or no config to say).  ``hf_config``
    (a transformers config, e.g. ``model.config``) overrides the run's config.yaml."""
    generation_dir = None
    if hf_config is None:
        model_cfg = _run_model_config(ckpt)
        if model_cfg is None or model_cfg.kind != "hf":
            return None
        hf_config = load_hf_config(model_cfg)
        if model_cfg.hf_path and os.path.isfile(os.path.join(model_cfg.hf_path, GENERATION_CONFIG)):
            generation_dir = model_cfg.hf_path
    try:
        transformers = importlib.import_module("transformers")
    except ImportError as exc:  # a config object was passed in, so this is unlikely
        raise ConfigError(f"needs transformers ({exc}).", setting="hf_config", value=type(hf_config).__name__,
                          fix="pip install 'tierlift[hf]'.") from exc
    config = copy.deepcopy(hf_config)
    # On the meta device: the class and its declared ties, without allocating weights.
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    return HFExport(config=config, architecture=type(model).__name__, tied_targets=set(tied),
                    generation_dir=generation_dir)


def tied_names_to_drop(hf: HFExport, params: dict, aliases: dict[str, str]) -> set[str]:
    """Names of a tied group that ``from_pretrained`` re-ties, when the group keeps
    at least one name that it loads (the checkpoint's canonical name or an alias)."""
    groups: dict[str, set[str]] = {name: {name} for name in params}
    for alias, target in aliases.items():
        if target in groups:
            groups[target].add(alias)
    drop: set[str] = set()
    for names in groups.values():
        retied = names & hf.tied_targets
        if len(names) > 1 and retied and names - retied:
            drop |= retied
    return drop


def write_hf_metadata(out: Path, hf: HFExport, dtype: str) -> list[str]:
    """Write config.json and generation_config.json into ``out``; returns their paths."""
    config = hf.config
    config.architectures = [hf.architecture]
    config.dtype = _DTYPE_NAMES[dtype]
    if hasattr(config, "use_cache"):
        config.use_cache = True
    try:
        config.save_pretrained(out)
        gen_path = out / GENERATION_CONFIG
        if hf.generation_dir is not None:
            shutil.copyfile(os.path.join(hf.generation_dir, GENERATION_CONFIG), gen_path)
        else:
            transformers = importlib.import_module("transformers")
            transformers.GenerationConfig.from_model_config(config).save_pretrained(out)
    except OSError as e:
        raise CheckpointError(f"cannot write the model config into {out}: {e.strerror or e}", setting="out_dir",
                              value=str(out), fix="free space on that disk or export elsewhere.") from e
    return [str(out / "config.json"), str(gen_path)]
