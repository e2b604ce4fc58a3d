"""DeepSpeed JSON configs mapped onto :class:`TrainConfig`, and converted to YAML.

DeepSpeed silently ignores keys it no longer reads (``aio.thread_count`` became
``intra_op_parallelism``).  Here every key is mapped, accepted because tierlift
already behaves that way, accepted as a speed knob without effect (and noted), or
reported; see ``deepspeed_keys``.  All problems of one config are raised together
in one :class:`DeepSpeedConfigError`, each naming the DeepSpeed key path, its
value, the nearest supported key and the fix.

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
import os
from typing import Any, Iterable, Mapping

from tierlift._configbase import from_dict, nearest
from tierlift.errors import ConfigError
from tierlift.offload.policy import OffloadConfig
from tierlift.parallel.config import OptimizerConfig, PrecisionConfig, ZeroConfig
from tierlift.runtime import deepspeed_keys as K
from tierlift.runtime.config import LoopConfig, TrainConfig, read_config_file, render_config
from tierlift.runtime.deepspeed_sections import (collect_errors, map_aio, map_batch_sizes, map_optimizer, map_precision,
                                                  map_scheduler, map_zero)
from tierlift.runtime.schedule import SchedulerConfig

__all__ = ["is_deepspeed_config", "from_deepspeed", "to_tierlift_yaml", "convert_file",
           "DeepSpeedConfigError"]

log = logging.getLogger("tierlift.config")

_SECTIONS = {"train": LoopConfig, "optimizer": OptimizerConfig, "scheduler": SchedulerConfig,
             "precision": PrecisionConfig, "zero": ZeroConfig, "offload": OffloadConfig}
_TIERLIFT_ONLY = {f.name for f in dataclasses.fields(TrainConfig)} - {"optimizer", "scheduler"}


class DeepSpeedConfigError(ConfigError):
    """Every problem of one DeepSpeed config; ``problems`` holds one ConfigError each."""

    def __init__(self, problems: list[ConfigError]) -> None:
        self.problems = list(problems)
        first = self.problems[0]
        super().__init__(first.message, setting=first.setting, value=first.value, fix=first.fix)

    def __reduce__(self):  # pickles whole (Ray ships exceptions between processes)
        return (type(self), (self.problems,))

    def render(self) -> str:
        if len(self.problems) == 1:
            return "DeepSpeed config: " + self.problems[0].render()
        head = (f"DeepSpeed config: {len(self.problems)} settings tierlift cannot honour "
                "(every other key was mapped):")
        return head + "".join(f"\n  - {p.render()}" for p in self.problems)


class Walk:
    """State of one mapping: tierlift sections built so far, where each tierlift
    setting came from (for errors in DeepSpeed terms), problems and notes."""

    def __init__(self) -> None:
        self.out: dict[str, dict[str, Any]] = {}
        self.origin: dict[str, str] = {}  # tierlift dotted path -> DeepSpeed dotted path
        self.problems: list[ConfigError] = []
        self.notes: list[str] = []

    def problem(self, key: str, value: Any, message: str, fix: str) -> None:
        if not any(p.setting == key and p.message == message for p in self.problems):
            self.problems.append(ConfigError(message, setting=key, value=value, fix=fix))

    def put(self, tl_path: str, value: Any, ds_path: str) -> None:
        section, _, name = tl_path.partition(".")
        self.out.setdefault(section, {})[name] = value
        self.origin[tl_path] = ds_path

    def section(self, d: Any, path: str, known: Iterable[str], *, unsupported: Mapping = {},
                fixed: Mapping = {}, no_effect: Mapping = {}, auto_ok: Iterable[str] = ()) -> dict:
        """The keys of mapping ``d`` (at DeepSpeed path ``path``) left to map: unknown
        and unsupported keys, unhonoured fixed values and 'auto' are reported,
        no-effect keys noted."""
        if d is None:
            return {}
        known = set(known) | set(unsupported) | set(fixed) | set(no_effect)
        if not isinstance(d, Mapping):
            self.problem(path, d, "must be a JSON object.", f"give an object with keys such as {sorted(known)[:4]}.")
            return {}
        kept, quiet = {}, []
        for key, value in d.items():
            sub = f"{path}.{key}" if path else str(key)
            if key in unsupported:
                self.problem(sub, value, *unsupported[key])
            elif key not in known:
                self.unknown(sub, key, value, known)
            elif isinstance(value, str) and value == "auto" and key not in auto_ok:
                self.problem(sub, value, "'auto' is filled in by the Hugging Face Trainer integration, "
                             "which tierlift does not use.", "replace 'auto' with the value you want.")
            elif key in fixed:
                allowed, fix = fixed[key]
                if not any(_same(value, a) for a in allowed):
                    self.problem(sub, value, f"cannot be honoured: tierlift behaves only as {key}="
                                 f"{', '.join(map(repr, allowed))}.", fix)
            elif key in no_effect:
                quiet.append((key, value))
            else:
                kept[key] = value
        by_reason: dict[str, list[str]] = {}
        for key, value in quiet:
            by_reason.setdefault(no_effect[key], []).append(f"{key}={value!r}")
        for why, keys in by_reason.items():
            where = f"{path}: " if path else ""
            self.notes.append(f"{where}{', '.join(keys)} accepted without effect: {why}.")
        return kept

    def unknown(self, sub: str, key: Any, value: Any, known: Iterable[str]) -> None:
        if not sub.count(".") and key in _TIERLIFT_ONLY:
            self.problem(sub, value, "is a tierlift section; it cannot be mixed into a DeepSpeed config.",
                         "convert the DeepSpeed JSON to YAML (`tierlift config convert`), then set "
                         f"{key}: there.")
            return
        hint = nearest(str(key), known)
        fix = f"did you mean {hint!r}? Otherwise remove it." if hint else \
            f"remove or rename it; supported keys here are {sorted(known)}."
        self.problem(sub, value, "is not a DeepSpeed setting tierlift supports.", fix)

    def report(self, exc: ConfigError) -> None:
        """A tierlift validation error, renamed to the DeepSpeed key it came from."""
        tl = exc.setting or ""
        ds = self.origin.get(tl)
        if ds is None:
            for prefix in sorted(self.origin, key=len, reverse=True):
                if tl.startswith(prefix + "."):
                    ds = self.origin[prefix] + tl[len(prefix):]
                    break
        if ds is None or ds == tl:
            self.problem(tl, exc.value, exc.message, exc.fix or "")
        else:
            self.problem(ds, exc.value, f"{exc.message} (tierlift setting {tl})", exc.fix or "")


def _same(value: Any, allowed: Any) -> bool:
    """Equal, with booleans matching only booleans (JSON's 1 is not true)."""
    if isinstance(value, bool) or isinstance(allowed, bool):
        return value is allowed
    return value == allowed


def is_deepspeed_config(d: Any) -> bool:
    """True when ``d`` uses DeepSpeed's top-level keys (zero_optimization,
    train_micro_batch_size_per_gpu, bf16, aio, ... or an optimizer/scheduler with
    a ``type``) rather than tierlift's sections."""
    if not isinstance(d, Mapping):
        return False
    if any(k in K.MARKERS for k in d):
        return True
    return any(isinstance(d.get(k), Mapping) and "type" in d[k] for k in ("optimizer", "scheduler"))


def from_deepspeed(d: Mapping[str, Any], *, world_size: int | None = None,
                   notes: list[str] | None = None) -> TrainConfig:
    """Map DeepSpeed config ``d`` onto a TrainConfig.

    ``world_size``: when known, lets train_batch_size stand in for a missing
    micro-batch or accumulation count as DeepSpeed allows.  ``notes`` (if given)
    receives one sentence per mapping decision a reader should know; the same
    notes ride on the result for :func:`render_config`.  Raises
    :class:`DeepSpeedConfigError` listing every key that cannot be honoured.
    """
    if not isinstance(d, Mapping):
        raise ConfigError("must be a JSON object.", setting="config", value=d,
                          fix="give the DeepSpeed config as a mapping of its top-level keys.")
    w = Walk()
    top = w.section(d, "", K.TOP_MAPPED | set(K.TOP_DISABLED_ONLY), unsupported=K.TOP_UNSUPPORTED,
                    fixed=K.TOP_FIXED, no_effect=K.TOP_NO_EFFECT, auto_ok={"train_batch_size"})
    for key, fix in K.TOP_DISABLED_ONLY.items():
        if key not in top:
            continue
        if isinstance(top[key], Mapping) and top[key].get("enabled") is False:
            w.notes.append(f"{key} is disabled: accepted without effect.")
        else:
            w.problem(key, top[key], 'is accepted only while disabled ({"enabled": false}).', fix)
    map_batch_sizes(w, top, d, world_size)
    if "steps_per_print" in top:
        w.put("train.log_every", top["steps_per_print"], "steps_per_print")
    w.put("optimizer.grad_clip", top.get("gradient_clipping", 0.0), "gradient_clipping")
    if "gradient_clipping" not in top:
        w.notes.append("no gradient_clipping: clipping is off, as in DeepSpeed (tierlift's own default is 1.0).")
    map_optimizer(w, top.get("optimizer"))
    map_scheduler(w, top.get("scheduler"))
    compute = map_precision(w, top)
    aio = map_aio(w, top.get("aio"))
    map_zero(w, top.get("zero_optimization"), aio, compute)
    w.notes.append("model, data and run are not part of DeepSpeed configs: they keep tierlift's defaults; "
                   "set them in the converted YAML.")
    cfg = _build(w)
    if w.problems:
        raise DeepSpeedConfigError(w.problems)
    for note in w.notes:
        log.info("DeepSpeed config: %s", note)
    cfg._deepspeed_notes = list(w.notes)  # not a field: read by render_config, ignored by ==
    if notes is not None:
        notes.extend(w.notes)
    return cfg


def _build(w: Walk) -> TrainConfig | None:
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
        return TrainConfig(**built)
    except ConfigError as exc:
        w.report(exc)
        return None


def to_tierlift_yaml(d: Mapping[str, Any], source: str | None = None, *, world_size: int | None = None) -> str:
    """DeepSpeed config ``d`` as a complete tierlift YAML (every default shown), its
    header naming ``source`` and listing the mapping notes.  Loads back equal."""
    cfg = from_deepspeed(d, world_size=world_size)
    return render_config(cfg, source or "DeepSpeed config (mapped)")


def convert_file(ds_json_path: str | os.PathLike, out_path: str | os.PathLike | None = None, *,
                 overwrite: bool = False, world_size: int | None = None) -> str:
    """Convert a DeepSpeed JSON file to tierlift YAML; returns the YAML text and, if
    ``out_path`` is given, writes it there (never over an existing file unless
    ``overwrite``)."""
    src = os.fspath(ds_json_path)
    data = read_config_file(src)
    if not is_deepspeed_config(data):
        raise ConfigError("is not a DeepSpeed config: none of its top-level keys (such as zero_optimization, "
                          "train_micro_batch_size_per_gpu, bf16) are DeepSpeed's.", setting="config", value=src,
                          fix="give a DeepSpeed JSON; a tierlift YAML needs no conversion.")
    text = to_tierlift_yaml(data, src, world_size=world_size)
    if out_path is not None:
        dst = os.fspath(out_path)
        if os.path.exists(dst) and not overwrite:
            raise ConfigError("already exists; it was not overwritten.", setting="out", value=dst,
                              fix="choose another output path, or allow overwriting "
                                  "(overwrite=True; CLI: --overwrite).")
        if os.path.isdir(dst):
            raise ConfigError("is a directory.", setting="out", value=dst, fix="give a file path such as run.yaml.")
        parent = os.path.dirname(os.path.abspath(dst))
        os.makedirs(parent, exist_ok=True)
        tmp = f"{dst}.tmp.{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:  # write then rename: no half-written config
            f.write(text)
        os.replace(tmp, dst)
    return text
