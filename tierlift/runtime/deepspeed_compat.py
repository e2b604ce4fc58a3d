"""DeepSpeed JSON configs mapped onto :class:`TrainConfig` (YAML conversion:
``deepspeed_convert``).  Imports run one way: ``runtime.config`` imports this
module and hands it the TrainConfig class; nothing here imports ``runtime.config``.

DeepSpeed silently ignores keys it no longer reads (``aio.thread_count`` became
``intra_op_parallelism``).  Here every key is mapped, accepted because tierlift
already behaves that way, accepted as a speed knob without effect (and noted),
ignored with one warning naming it when tierlift does not honour it but the
numbers trained cannot change (logging monitors, DeepSpeed's own checkpoint
options), or reported; see ``deepspeed_keys``.  ``"auto"`` (the Hugging Face
integration's convention) means "tierlift decides": its default, or a value
derived from the run (batch sizes from the world size, precision from the
device), each choice one ``ds-config: KEY="auto" -> VALUE (why)`` line.  All
problems of one config are raised together in one :class:`DeepSpeedConfigError`,
each naming the DeepSpeed key path, its value, the nearest supported key and the fix.

Missing keys: where DeepSpeed's default changes the numbers trained (optimizer
hyper-parameters, gradient clipping, lr schedule, reduction dtype) the mapping
uses DeepSpeed's default; where it changes only speed or memory (aio, buffer
counts) tierlift's default.  Model, data and run are not in DeepSpeed configs and
keep tierlift's defaults.  Warmup timing differs by one step: tierlift's warmup
reaches the peak lr at step warmup_steps - 1 and never trains at lr 0.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Mapping, TypeVar

from tierlift._configbase import from_dict
from tierlift.errors import ConfigError
from tierlift.offload.policy import OffloadConfig
from tierlift.parallel.config import OptimizerConfig, PrecisionConfig, ZeroConfig
from tierlift.runtime import deepspeed_keys as K
from tierlift.runtime.deepspeed_auto import map_batch_sizes
from tierlift.runtime.deepspeed_walk import DeepSpeedConfigError, Walk
from tierlift.runtime.deepspeed_sections import (collect_errors, map_activations, map_aio, map_optimizer,
                                                  map_precision, map_scheduler, map_zero)
from tierlift.runtime.loop_config import LoopConfig
from tierlift.runtime.schedule import SchedulerConfig

__all__ = ["is_deepspeed_config", "map_deepspeed", "DeepSpeedConfigError"]

log = logging.getLogger("tierlift.config")

_SECTIONS = {"train": LoopConfig, "optimizer": OptimizerConfig, "scheduler": SchedulerConfig,
             "precision": PrecisionConfig, "zero": ZeroConfig, "offload": OffloadConfig}
C = TypeVar("C")


def is_deepspeed_config(d: Any) -> bool:
    """True when ``d`` uses DeepSpeed's top-level keys (zero_optimization,
    train_micro_batch_size_per_gpu, bf16, aio, ... or an optimizer/scheduler with
    a ``type``) rather than tierlift's sections."""
    if not isinstance(d, Mapping):
        return False
    if any(k in K.MARKERS for k in d):
        return True
    return any(isinstance(d.get(k), Mapping) and "type" in d[k] for k in ("optimizer", "scheduler"))


def map_deepspeed(d: Mapping[str, Any], cfg_cls: type[C], *, world_size: int | None = None,
                  notes: list[str] | None = None) -> C:
    """Map DeepSpeed config ``d`` onto ``cfg_cls`` (TrainConfig, which calls this
    from ``TrainConfig.from_deepspeed``; passed in so that imports run one way).

    ``world_size``: when known, lets train_batch_size stand in for a missing
    micro-batch or accumulation count as DeepSpeed allows; unknown, such a count
    is left to derive at launch (0).  "auto" values and missing batch sizes are
    decided by tierlift, one line each on the result's ``_deepspeed_choices``.
    ``notes`` (if given) receives one sentence per mapping decision a reader
    should know; the same notes ride on the result for ``render_config``.
    Raises :class:`DeepSpeedConfigError` listing every key that cannot be honoured.
    """
    if not isinstance(d, Mapping):
        raise ConfigError("must be a JSON object.", setting="config", value=d,
                          fix="give the DeepSpeed config as a mapping of its top-level keys.")
    w = Walk(f.name for f in dataclasses.fields(cfg_cls))
    top = w.section(d, "", K.TOP_MAPPED | set(K.TOP_DISABLED_ONLY), unsupported=K.TOP_UNSUPPORTED,
                    fixed=K.TOP_FIXED, no_effect=K.TOP_NO_EFFECT, ignored=K.TOP_IGNORED,
                    auto_ok=K.TOP_AUTO)
    for key, fix in K.TOP_DISABLED_ONLY.items():
        if key not in top:
            continue
        if isinstance(top[key], Mapping) and top[key].get("enabled") is False:
            w.notes.append(f"{key} is disabled: accepted without effect.")
        elif key in K.MONITORS:  # only writes logs: ignoring it cannot change the numbers
            w.ignored.append(f"{key} (enabled) ({K.MONITORS[key]})")
        else:
            w.problem(key, top[key], 'is accepted only while disabled ({"enabled": false}).', fix)
    map_batch_sizes(w, top, d, world_size)
    if "steps_per_print" in top:
        w.put("train.log_every", top["steps_per_print"], "steps_per_print")
    clip = top.get("gradient_clipping", 0.0)
    if clip == "auto":
        clip = w.choose("gradient_clipping", "auto", OptimizerConfig.grad_clip,
                        "tierlift's default optimizer.grad_clip")
    w.put("optimizer.grad_clip", clip, "gradient_clipping")
    if "gradient_clipping" not in top:
        w.notes.append("no gradient_clipping: clipping is off, as in DeepSpeed (tierlift's own default is 1.0).")
    map_optimizer(w, top.get("optimizer"))
    map_scheduler(w, top.get("scheduler"))
    compute = map_precision(w, top)
    aio = map_aio(w, top.get("aio"))
    map_zero(w, top.get("zero_optimization"), aio, compute)
    map_activations(w, top.get("activation_checkpointing"))
    w.notes.append("model, data and run are not part of DeepSpeed configs: they keep tierlift's defaults; "
                   "set them in the converted YAML.")
    cfg = _build(w, cfg_cls)
    if w.problems:
        raise DeepSpeedConfigError(w.problems)
    if w.ignored:
        # Named once: tierlift does not do what these ask, and the numbers trained are the same without them.
        w.notes.append("ignored (tierlift does not honour them; ignoring them cannot change the numbers "
                       "trained): " + "; ".join(w.ignored) + ".")
        log.warning("ds-config: %s", w.notes[-1])
    for note in w.notes:
        log.info("DeepSpeed config: %s", note)
    cfg._deepspeed_notes = list(w.notes)  # not fields: read by render_config and the Trainer, ignored by ==
    cfg._deepspeed_choices = list(w.choices)
    if notes is not None:
        notes.extend(w.notes)
    return cfg


def _build(w: Walk, cfg_cls: type[C]) -> C | None:
    """Validate each section, collecting every field's error (not only the first)."""
    built = {}
    for name, cls in _SECTIONS.items():
        body = w.out.get(name, {})
        try:
            built[name] = from_dict(cls, body, name)
        except ConfigError:
            for err in collect_errors(cls, body, name):
                w.report(err)
    if w.problems:
        return None
    try:
        return cfg_cls(**built)
    except ConfigError as exc:
        w.report(exc)
        return None
