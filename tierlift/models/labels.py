"""tierlift's one label rule, for every model the Trainer trains.

The rule: in a batch, ``labels[:, i]`` is the target of position ``i`` -- already
shifted, ``labels[:, i] = tokens[i + 1]`` -- which is what tierlift's datasets yield
(``runtime/data/datasets.py``), and every model's loss reads it without shifting:

* the built-in models (``gpt``, ``moe-gpt``) compute their loss that way;
* a Hugging Face causal LM, whether built from config (``model.kind: hf``) or
  passed to the Trainer by the user, gets :func:`tierlift.models.layers.aligned_lm_loss`
  as its ``loss_function`` (:func:`use_aligned_labels`), since HF's own loss shifts
  once more and would train on the token two ahead.

So data built the Hugging Face way (``labels = input_ids.clone()``, the model
shifts) breaks the rule.  :func:`check_labels` refuses such a sample: labels equal
to the inputs at every labelled position, and not equally readable as shifted
(a run of one repeated token is both, and passes).
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import torch
from torch import nn

from tierlift.errors import ConfigError
from tierlift.models.hf import use_aligned_labels
from tierlift.models.layers import IGNORE_INDEX, aligned_lm_loss

__all__ = ["apply_label_rule", "check_labels", "is_hf_causal_lm"]

log = logging.getLogger(__name__)


def is_hf_causal_lm(model: nn.Module) -> bool:
    """A ``transformers`` causal LM (or a subclass of one).  Needs no import:
    such a model can only exist when ``transformers`` is already loaded."""
    transformers = sys.modules.get("transformers")
    if transformers is None or not isinstance(model, transformers.PreTrainedModel):
        return False
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES  # loaded with the model

    names = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    return any(cls.__name__ in names for cls in type(model).__mro__)


def check_labels(sample: Any) -> None:
    """Refuse a sample (a dict with ``input_ids`` and ``labels``) whose labels are
    the inputs themselves: see the module docstring.  Anything else passes."""
    if not isinstance(sample, dict):
        return
    ids, labels = sample.get("input_ids"), sample.get("labels")
    if not (torch.is_tensor(ids) and torch.is_tensor(labels)) or ids.shape != labels.shape or ids.shape[-1] < 2:
        return
    labelled = labels != IGNORE_INDEX
    if int(labelled.sum()) < 2 or not bool((labels[labelled] == ids[labelled]).all()):
        return
    as_shifted = labels[..., :-1] == ids[..., 1:]
    if bool(as_shifted[labelled[..., :-1]].all()):
        return  # e.g. one repeated token: both readings agree, nothing to refuse
    raise ConfigError("the data's labels equal its input_ids (Hugging Face's convention, where the model shifts); "
                      "tierlift reads labels[:, i] as the target of position i, so this would train the model "
                      "to copy its input.", setting="labels", value="labels == input_ids",
                      fix="shift them in the data: input_ids = tokens[:-1], labels = tokens[1:] (tierlift's "
                          "datasets do), keeping -100 where no loss is wanted.")


def _first_sample(data: Any) -> Any:
    """The first sample of a map-style dataset or a list (the same on every rank, so
    every rank decides alike); None for an iterable dataset, which is not peeked at."""
    if data is None or not hasattr(data, "__getitem__") or not hasattr(data, "__len__"):
        return None
    try:
        return data[0] if len(data) else None
    except (KeyError, IndexError, TypeError):
        return None


def apply_label_rule(model: nn.Module, data: Any = None) -> None:
    """Give a Hugging Face causal LM tierlift's label reading (idempotent) and
    refuse training data whose first sample breaks the rule (module docstring)."""
    if is_hf_causal_lm(model) and getattr(model, "_loss_function", None) is not aligned_lm_loss:
        use_aligned_labels(model)
        log.info("%s: loss reads labels[:, i] as the target of position i (tierlift's rule; "
                 "the data is shifted, the loss does not shift again).", type(model).__name__)
    check_labels(_first_sample(data))
