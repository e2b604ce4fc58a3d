"""Per-section mapping of DeepSpeed configs onto tierlift settings.

Each ``map_*`` function reads one DeepSpeed section and records tierlift
settings, problems and notes on a ``deepspeed_compat.Walk``; validation of the
values happens afterwards, once, in ``deepspeed_compat._build``.  Key classes
(mapped / fixed / no effect / unsupported) are in ``deepspeed_keys``.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Mapping

from tierlift._configbase import from_dict, nearest
from tierlift.errors import ConfigError
from tierlift.offload.policy import AioConfig
from tierlift.parallel.config import OptimizerConfig, ZeroConfig
from tierlift.runtime import deepspeed_keys as K
from tierlift.runtime.deepspeed_auto import auto_precision
from tierlift.runtime.deepspeed_walk import Walk
from tierlift.runtime.schedule import SchedulerConfig


__all__ = ["collect_errors", "map_optimizer", "map_scheduler", "map_precision", "map_aio",
           "map_zero", "map_activations"]

_ITEMSIZE = {"fp32": 4, "bf16": 2, "fp16": 2}  # bytes per element of the compute dtype


def collect_errors(cls: type, body: Mapping[str, Any], path: str) -> list[ConfigError]:
    """Every validation error of ``from_dict(cls, body, path)``, not only the first.

    Validators stop at their first failing check, so the offending key is dropped
    (reverting to its default) and the build retried until it passes; a key
    holding a nested config is searched the same way, one level down.
    """
    body, errors = dict(body), []
    while True:
        try:
            from_dict(cls, body, path)
            return errors
        except ConfigError as exc:
            if any(e.setting == exc.setting for e in errors):
                return errors  # a dropped key's default is invalid too: already reported
            rel = (exc.setting or "")[len(path) + 1:] if path else (exc.setting or "")
            key = rel.split(".", 1)[0].split("[", 1)[0]
            nested = _nested(cls, key, body.get(key)) if key in body and "." in rel else None
            # A nested config valid on its own: the error is a rule of the enclosing one (report it).
            errors.extend((collect_errors(nested[0], nested[1], f"{path}.{key}") if nested else []) or [exc])
            if key not in body:
                return errors
            del body[key]


def _nested(cls: type, key: str, value: Any) -> tuple[type, Mapping[str, Any]] | None:
    """The config class and body a mapping at ``cls.key`` is loaded as (policies by kind)."""
    if not isinstance(value, Mapping):
        return None
    tp = typing.get_type_hints(cls).get(key)
    if dataclasses.is_dataclass(tp):
        return tp, value
    options = [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)]
    for option in options:
        if getattr(option, "KIND", None) == value.get("kind"):
            return option, {k: v for k, v in value.items() if k != "kind"}
    return None


def map_optimizer(w: Walk, opt: Any) -> None:
    if opt is None:
        w.notes.append("no optimizer section: DeepSpeed would use the script's optimizer; tierlift uses "
                       "its optimizer defaults (AdamW).")
        return
    sec = w.section(opt, "optimizer", {"type", "params"})
    kind = sec.get("type")
    if "type" not in sec:
        if isinstance(opt, Mapping):
            w.problem("optimizer.type", None, "is missing.", f"set type to one of {list(K.OPTIMIZER_TYPES)}.")
        return
    name = str(kind).lower()
    if name not in ("adam", "adamw", "sgd"):
        canonical = {t.lower(): t for t in K.OPTIMIZER_TYPES}
        hint = canonical.get(nearest(name, canonical) or "")
        w.problem("optimizer.type", kind, "is not an optimizer tierlift can run on its fp32 shards.",
                  f"use one of {list(K.OPTIMIZER_TYPES)}" + (f" (did you mean {hint!r}?)" if hint else "") + ".")
        return
    adam = name != "sgd"
    defaults = K.ADAM_DEFAULTS if adam else K.SGD_DEFAULTS
    params = w.section(sec.get("params", {}), "optimizer.params",
                       set(defaults) | ({"adam_w_mode"} if adam else set()),
                       unsupported=K.OPTIMIZER_PARAMS_UNSUPPORTED,
                       fixed=K.ADAM_FIXED if adam else K.SGD_FIXED,
                       no_effect=K.ADAM_NO_EFFECT if adam else {}, auto_ok=K.OPTIMIZER_AUTO)
    tl_defaults = OptimizerConfig()
    for key in [k for k, v in params.items() if v == "auto"]:
        params[key] = w.choose(f"optimizer.params.{key}", "auto", getattr(tl_defaults, key),
                               f"tierlift's default optimizer.{key}")
    w.put("optimizer.name", "adamw" if adam else "sgd", "optimizer.type")
    for key, default in defaults.items():
        w.put(f"optimizer.{key}", params.get(key, default), f"optimizer.params.{key}")
    wd = params.get("weight_decay", 0.0)
    if not isinstance(params.get("adam_w_mode", True), bool):
        w.problem("optimizer.params.adam_w_mode", params["adam_w_mode"], "must be true or false.",
                  "write true (decoupled weight decay, DeepSpeed's default) or false.")
    if adam and isinstance(wd, (int, float)) and wd:
        # DeepSpeed: type AdamW forces decoupled decay; type Adam decouples unless adam_w_mode is false.
        if name == "adam" and params.get("adam_w_mode", True) is False:
            w.problem("optimizer.params.adam_w_mode", False,
                      f"asks for Adam with L2 weight decay (weight_decay={wd}) added to the gradient; "
                      "tierlift only decouples weight decay (AdamW).",
                      "remove adam_w_mode (DeepSpeed's default is true) or set weight_decay 0.")
        elif name == "adam":
            w.notes.append(f"optimizer.type=Adam with weight_decay={wd}: decoupled weight decay (AdamW), as "
                           "DeepSpeed does by default (adam_w_mode=true); tierlift optimizer.name: adamw.")
    w.put("optimizer.decay_1d", True, "optimizer.params.weight_decay")  # DeepSpeed decays biases/norms too


def map_scheduler(w: Walk, sch: Any) -> None:
    if sch is None:
        w.put("scheduler.kind", "constant", "scheduler")
        w.notes.append("no scheduler section: constant learning rate, as in DeepSpeed "
                       "(tierlift's own default is warmup + cosine).")
        return
    sec = w.section(sch, "scheduler", {"type", "params"})
    kind = sec.get("type")
    if kind not in K.SCHEDULER_TYPES:
        if "type" in sec or isinstance(sch, Mapping):
            canonical = {t.lower(): t for t in K.SCHEDULER_TYPES}
            hint = canonical.get(nearest(str(kind).lower(), canonical) or "")
            w.problem("scheduler.type", kind, "is not a learning-rate schedule tierlift supports.",
                      f"use one of {list(K.SCHEDULER_TYPES)}" + (f" (did you mean {hint!r}?)" if hint else "")
                      + "; OneCycle and LRRangeTest are not supported.")
        return
    p = w.section(sec.get("params", {}), "scheduler.params", K.SCHEDULER_PARAMS[kind], fixed=K.SCHEDULER_FIXED,
                  auto_ok=K.SCHEDULER_AUTO)
    at = "scheduler.params."
    _auto_schedule(w, p, at)
    w.put("scheduler.kind", {"WarmupLR": "constant", "WarmupDecayLR": "linear",
                             "WarmupCosineLR": "cosine"}[kind], "scheduler.type")
    w.put("scheduler.warmup_steps", p.get("warmup_num_steps", 1000), at + "warmup_num_steps")
    w.put("scheduler.warmup_type", p.get("warmup_type", "log"), at + "warmup_type")
    if "warmup_type" not in p:
        w.notes.append(f"scheduler {kind} without warmup_type: log-shaped warmup, DeepSpeed's default.")
    if kind != "WarmupLR":
        if "total_num_steps" not in p:
            w.problem(at + "total_num_steps", None, f"is required by {kind}.",
                      "set it to the step where the decay ends, usually the run's total steps.")
        else:
            w.put("scheduler.total_steps", p["total_num_steps"], at + "total_num_steps")
    if kind == "WarmupCosineLR":  # ratios of the optimizer's lr
        w.put("scheduler.warmup_min_ratio", p.get("warmup_min_ratio", 0.0), at + "warmup_min_ratio")
        w.put("scheduler.min_lr_ratio", p.get("cos_min_ratio", 0.0001), at + "cos_min_ratio")
        return
    # WarmupLR / WarmupDecayLR: absolute lrs; warmup_max_lr replaces the optimizer's lr.
    opt_lr = w.out.get("optimizer", {}).get("lr")
    peak = OptimizerConfig.lr if opt_lr is None else opt_lr
    default_max = None if kind == "WarmupLR" else 0.001  # DeepSpeed: WarmupLR falls back to the optimizer lr
    max_lr = p.get("warmup_max_lr", default_max)
    if max_lr == "auto":  # the optimizer's lr, as the Hugging Face integration fills it
        max_lr = w.choose(at + "warmup_max_lr", "auto", peak, "the optimizer's lr")
    min_lr = p.get("warmup_min_lr", 0.0)
    if max_lr is not None:
        if opt_lr is not None and opt_lr != max_lr:
            w.notes.append(f"optimizer lr {opt_lr} is replaced by the scheduler's warmup_max_lr={max_lr}, "
                           "as in DeepSpeed.")
        w.put("optimizer.lr", max_lr, at + "warmup_max_lr")
        peak = max_lr
    elif isinstance(peak, bool) or not isinstance(peak, (int, float)):
        return  # the optimizer's lr is reported by its own validation
    for key, value in (("warmup_max_lr", peak), ("warmup_min_lr", min_lr)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            w.problem(at + key, value, "must be a number.", "give a learning rate such as 3e-4.")
            return
    if peak <= 0 or not 0 <= min_lr <= peak:
        w.problem(at + "warmup_min_lr", min_lr, f"must be in [0, warmup_max_lr={peak}] with a positive peak.",
                  "give 0 <= warmup_min_lr <= warmup_max_lr.")
        return
    w.put("scheduler.warmup_min_ratio", min_lr / peak, at + "warmup_min_lr")
    w.put("scheduler.min_lr_ratio", min_lr / peak, at + "warmup_min_lr")


def _auto_schedule(w: Walk, p: dict, at: str) -> None:
    """Decide the scheduler params given as "auto" (but warmup_max_lr, which
    follows the optimizer's lr): tierlift's schedule defaults, the decay ending
    at the run's train.max_steps."""
    d = SchedulerConfig()
    fills = {"warmup_num_steps": (d.warmup_steps, "tierlift's default scheduler.warmup_steps"),
             "warmup_type": (d.warmup_type, "tierlift's default scheduler.warmup_type"),
             "total_num_steps": (0, "scheduler.total_steps 0: the decay ends at the run's train.max_steps"),
             "warmup_min_lr": (0.0, "the warmup starts from lr 0"),
             "warmup_min_ratio": (d.warmup_min_ratio, "tierlift's default scheduler.warmup_min_ratio"),
             "cos_min_ratio": (d.min_lr_ratio, "tierlift's default scheduler.min_lr_ratio")}
    for key in [k for k, v in p.items() if v == "auto" and k in fills]:
        p[key] = w.choose(at + key, "auto", *fills[key])


def map_precision(w: Walk, top: Mapping[str, Any]) -> str:
    """Map fp16 / bf16 / communication_data_type; returns the compute dtype."""
    fp16 = w.section(top.get("fp16"), "fp16", K.FP16_MAPPED, fixed=K.FP16_FIXED, auto_ok={"enabled"})
    bkey = "bfloat16" if "bfloat16" in top and "bf16" not in top else "bf16"
    bf16 = w.section(top.get(bkey), bkey, K.BF16_MAPPED, fixed=K.BF16_FIXED, no_effect=K.BF16_NO_EFFECT,
                     auto_ok={"enabled"})
    fp16_in, bf16_in = fp16.get("enabled", False), bf16.get("enabled", False)
    fp16_out, bf16_out = auto_precision(w, fp16_in, bf16_in, bkey)
    for sec, value_in, value_out in ((fp16, fp16_in, fp16_out), (bf16, bf16_in, bf16_out)):
        if value_in == "auto":
            sec["enabled"] = value_out
    for sec, key in ((fp16, "fp16"), (bf16, bkey)):
        if not isinstance(sec.get("enabled", False), bool):
            w.problem(f"{key}.enabled", sec["enabled"], "must be true or false.", "write true or false.")
    fp16_on, bf16_on = fp16.get("enabled") is True, bf16.get("enabled") is True
    if fp16_on and bf16_on:
        w.problem(f"{bkey}.enabled", True, "and fp16.enabled are both true.", "enable one of bf16 or fp16.")
    compute = "fp16" if fp16_on else "bf16" if bf16_on else "fp32"
    w.put("precision.compute", compute, "fp16.enabled" if fp16_on else f"{bkey}.enabled")
    for key in ("initial_scale_power", "loss_scale_window", "hysteresis", "min_loss_scale"):
        if key in fp16:
            w.put(f"precision.{key}", fp16[key], f"fp16.{key}")
    scale = fp16.get("loss_scale", 0)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or scale != 0:
        w.problem("fp16.loss_scale", scale, "asks for a static loss scale; tierlift scales fp16 losses "
                  "dynamically only.", "set loss_scale 0 (dynamic, starting at 2**initial_scale_power).")
    if bf16_on and "check_grad_overflow" not in bf16:
        w.notes.append("bf16: DeepSpeed skips steps whose gradients are not finite (check_grad_overflow, "
                       "default true); tierlift skips steps only under fp16 loss scaling.")
    comm = top.get("communication_data_type")
    if comm is not None:
        w.put("precision.reduce", str(comm).lower(), "communication_data_type")
    else:
        w.put("precision.reduce", compute, f"{bkey}.enabled" if bf16_on else "fp16.enabled")
        if compute != "fp32":
            w.notes.append(f"precision.reduce: {compute}: DeepSpeed reduces gradients in the compute dtype "
                           "unless communication_data_type says otherwise; set reduce: fp32 for fp32 sums.")
    return compute


def map_aio(w: Walk, aio: Any) -> dict | None:
    """The validated AioConfig fields from DeepSpeed's top-level aio, or None."""
    sec = w.section(aio, "aio", K.AIO_MAPPED, unsupported=K.AIO_UNSUPPORTED)
    out = {}
    for ds_key, tl_key in K.AIO_MAPPED.items():
        if ds_key in sec:
            out[tl_key] = sec[ds_key]
            w.origin[f"offload.aio.{tl_key}"] = f"aio.{ds_key}"
    if out.get("use_gds") is True:
        out["backend"] = "libaio"
        w.notes.append("aio.use_gds=true: offload.*.aio.backend libaio (GPUDirect Storage needs DeepSpeed's op).")
    errors = collect_errors(AioConfig, out, "offload.aio")
    for exc in errors:
        w.report(exc)
    return out if aio is not None and not errors else None


def map_activations(w: Walk, section: Any) -> None:
    """DeepSpeed's ``activation_checkpointing`` onto ``train.activations.policy``."""
    if section is None:
        return
    sec = w.section(section, "activation_checkpointing", K.ACT_MAPPED, no_effect=K.ACT_NO_EFFECT)
    cpu = sec.get("cpu_checkpointing", False)
    if not isinstance(cpu, bool):
        w.problem("activation_checkpointing.cpu_checkpointing", cpu, "must be true or false.", "use true or false.")
        return
    policy = "auto" if cpu else "recompute"
    w.put("train.activations", {"policy": policy}, "activation_checkpointing")
    w.notes.append(
        f"activation_checkpointing -> train.activations.policy={policy}: "
        + ("activations kept, swapped to pinned host memory or recomputed per unit, planned under the GPU budget "
           "(DeepSpeed's cpu_checkpointing moves checkpoints to host memory)." if cpu else
           "every wrap unit recomputed in backward (DeepSpeed checkpoints where the model calls "
           "deepspeed.checkpointing; tierlift needs no model change)."))


def map_zero(w: Walk, zero: Any, aio: dict | None, compute: str) -> None:
    z = w.section(zero, "zero_optimization", K.ZERO_MAPPED, unsupported=K.ZERO_UNSUPPORTED,
                  fixed=K.ZERO_FIXED, no_effect=K.ZERO_NO_EFFECT, ignored=K.ZERO_IGNORED, auto_ok=K.ZERO_AUTO)
    _deprecated_offload(w, z)
    d = ZeroConfig()
    for ds_key, tl_key, why in (
            ("sub_group_size", "sub_group_size", "one optimizer step per chunk shard"),
            ("stage3_max_live_parameters", "max_live_params", "no bound beyond zero.prefetch_units"),
            ("stage3_param_persistence_threshold", "persistence_threshold",
             "every chunk sharded: tierlift's chunks are whole wrap units, never single small parameters"),
            ("stage3_max_reuse_distance", "max_reuse_distance", "unset: keep gathered for the backward only "
                                                                "with parameters on NVMe"),
            ("stage3_prefetch_bucket_size", "prefetch_bytes", f"prefetch bounded by zero.prefetch_units="
                                                              f"{d.prefetch_units} wrap units of the model")):
        if z.get(ds_key) == "auto":
            value = w.choose(f"zero_optimization.{ds_key}", "auto", getattr(d, tl_key),
                             f"tierlift's default zero.{tl_key}: {why}")
            w.put(f"zero.{tl_key}", value, f"zero_optimization.{ds_key}")
            del z[ds_key]
    stage = z.get("stage", 0)
    if stage == 0 and not isinstance(stage, bool):
        what = "zero_optimization.stage=0" if "stage" in z else "no zero_optimization.stage (stage 0)"
        w.notes.append(f"{what}: runs as ZeRO stage 1, which trains the same numbers with optimizer state "
                       "sharded across ranks (tierlift has no unsharded mode).")
        stage = 1
    w.put("zero.stage", stage, "zero_optimization.stage")
    for ds_key, tl_key in (("sub_group_size", "sub_group_size"),
                           ("stage3_max_live_parameters", "max_live_params"),
                           ("stage3_param_persistence_threshold", "persistence_threshold"),
                           ("stage3_max_reuse_distance", "max_reuse_distance")):
        if ds_key in z:
            w.put(f"zero.{tl_key}", z[ds_key], f"zero_optimization.{ds_key}")
    if "stage3_prefetch_bucket_size" in z:
        elems = z["stage3_prefetch_bucket_size"]
        ok = isinstance(elems, (int, float)) and not isinstance(elems, bool) and float(elems).is_integer()
        value = int(elems) * _ITEMSIZE[compute] if ok else elems  # DeepSpeed counts elements
        w.put("zero.prefetch_bytes", value, "zero_optimization.stage3_prefetch_bucket_size")
        if ok:
            w.notes.append(f"stage3_prefetch_bucket_size={int(elems)} elements -> zero.prefetch_bytes={value} "
                           f"({_ITEMSIZE[compute]} bytes per {compute} element).")
    nvme = False
    for role in ("param", "optimizer"):
        nvme |= _map_offload(w, z.get(f"offload_{role}"), role, aio)
    if aio is not None and not nvme:
        w.notes.append("aio has no effect: nothing is offloaded to NVMe (as in DeepSpeed).")


def _deprecated_offload(w: Walk, z: dict) -> None:
    """cpu_offload / cpu_offload_param (DeepSpeed's deprecated spellings) as the
    offload_optimizer / offload_param sections DeepSpeed turns them into."""
    pin = z.pop("cpu_offload_use_pin_memory", None)
    for old, role in (("cpu_offload", "optimizer"), ("cpu_offload_param", "param")):
        if old not in z:
            continue
        value = z.pop(old)
        if not isinstance(value, bool):
            w.problem(f"zero_optimization.{old}", value, "must be true or false.", "write true or false.")
        elif value and f"offload_{role}" not in z:
            z[f"offload_{role}"] = {"device": "cpu", "pin_memory": bool(pin)}
            w.notes.append(f"zero_optimization.{old}=true (deprecated): offload_{role} device cpu, as DeepSpeed "
                           "reads it.")


def _map_offload(w: Walk, sec_in: Any, role: str, aio: dict | None) -> bool:
    """Map offload_param / offload_optimizer; True when it goes to NVMe."""
    path = f"zero_optimization.offload_{role}"
    is_opt = role == "optimizer"
    sec = w.section(sec_in, path, K.OFFLOAD_MAPPED[role],
                    fixed=K.OFFLOAD_OPTIMIZER_FIXED if is_opt else {},
                    no_effect=K.OFFLOAD_OPTIMIZER_NO_EFFECT if is_opt else {})
    device = sec.get("device", "none")
    if device not in ("none", "cpu", "nvme"):
        hint = nearest(str(device), ["none", "cpu", "nvme"])
        w.problem(f"{path}.device", device, "is not an offload device.",
                  "use none, cpu or nvme" + (f" (did you mean {hint!r}?)" if hint else "") + ".")
        return False
    if device != "nvme":
        unused = sorted(k for k in K.OFFLOAD_NVME_ONLY if k in sec)
        if unused:
            w.notes.append(f"{path}: {', '.join(unused)} have no effect with device {device} (as in DeepSpeed).")
    if device == "none":
        w.put(f"offload.{role}", {"kind": "none"}, path)
        return False
    policy: dict[str, Any] = {"kind": device, "pin_memory": sec.get("pin_memory", True)}
    w.origin[f"offload.{role}.pin_memory"] = f"{path}.pin_memory"
    if device == "nvme":
        if "nvme_path" not in sec:
            w.problem(f"{path}.nvme_path", None, "is required with device nvme.",
                      "set nvme_path to a directory on a fast local disk, e.g. /local_nvme.")
            return True
        policy["path"] = str(sec["nvme_path"])
        w.origin[f"offload.{role}.path"] = f"{path}.nvme_path"
        for key in ("buffer_count", "buffer_size", "max_in_cpu"):
            if key in sec:
                policy[key] = sec[key]
                w.origin[f"offload.{role}.{key}"] = f"{path}.{key}"
        if aio:
            policy["aio"] = dict(aio)
        for ds_key, tl_key in K.AIO_MAPPED.items():
            w.origin[f"offload.{role}.aio.{tl_key}"] = f"aio.{ds_key}"
    w.put(f"offload.{role}", policy, path)
    return device == "nvme"
