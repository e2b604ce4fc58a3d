"""What tierlift decides for DeepSpeed keys given as ``"auto"`` or left out:
batch sizes (from the world size, where known) and precision (from the device).

``"auto"`` is the Hugging Face integration's convention: the HF Trainer fills
such values from its own arguments before DeepSpeed sees them.  tierlift has no
such arguments, so "auto" means "tierlift decides": its default, or a value
derived from the run.  Every decision is one line on the walk's ``choices``
(``Walk.choose``).  Used by ``deepspeed_compat`` / ``deepspeed_sections``.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from tierlift.runtime.deepspeed_walk import Walk
from tierlift.runtime.loop_config import LoopConfig


__all__ = ["map_batch_sizes", "auto_precision"]

_BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")
_TBS, _MBS, _GAS = _BATCH_KEYS


def map_batch_sizes(w: Walk, top: Mapping[str, Any], raw: Mapping[str, Any], world_size: int | None) -> None:
    """train_batch_size = micro_batch * grad_accum * world size, as in DeepSpeed.

    Any two determine the third once the world size is known; with it unknown
    (``world_size`` None: a config loaded outside a launch) a count derived from
    train_batch_size is left 0, which the Trainer fills in at launch.  With no
    train_batch_size, a missing or "auto" micro-batch is tierlift's default.
    ``top``: the accepted top-level keys; ``raw``: the config as given."""
    vals: dict[str, int | None] = {}
    given: dict[str, Any] = {}  # "auto", None (missing) or the number
    for key in _BATCH_KEYS:
        v = top.get(key)
        given[key] = "auto" if v == "auto" else v
        if v is None or v == "auto":
            vals[key] = None
        elif isinstance(v, bool) or not isinstance(v, (int, float)) or not float(v).is_integer() or v < 1:
            w.problem(key, v, "must be a positive integer (or \"auto\").", "give a whole number >= 1.")
            return
        else:
            vals[key] = int(v)
    tbs, mbs, gas = (vals[k] for k in _BATCH_KEYS)
    if tbs is None:
        if mbs is None:
            why = "tierlift's default train.micro_batch_size"
            if all(given[k] is None for k in _BATCH_KEYS):
                why += "; the config gives no batch size"
            mbs = w.choose(_MBS, given[_MBS], LoopConfig.micro_batch_size, why)
        if gas is None:
            gas = 1  # DeepSpeed's default too: say so only where the config asked ("auto")
            if given[_GAS] == "auto":
                w.choose(_GAS, "auto", gas, "tierlift's default train.grad_accum_steps")
        if given[_TBS] == "auto" or all(given[k] is None for k in _BATCH_KEYS):
            total = f"{mbs * gas * world_size}" if world_size else f"{mbs} x {gas} x the number of ranks"
            w.choose(_TBS, given[_TBS], total, "micro-batch x accumulation x ranks")
    else:
        if mbs is None and gas is None:
            gas = w.choose(_GAS, given[_GAS], 1, "only train_batch_size given: one micro-batch per step, "
                                                 "as DeepSpeed does")
        if world_size is not None:
            if mbs is None:
                mbs, rest = divmod(tbs, gas * world_size)
                bad = (_MBS, rest or not mbs)
                reason = f"train_batch_size {tbs} / (accumulation {gas} x {world_size} ranks)"
            elif gas is None:
                gas, rest = divmod(tbs, mbs * world_size)
                bad = (_GAS, rest or not gas)
                reason = f"train_batch_size {tbs} / (micro-batch {mbs} x {world_size} ranks)"
            else:
                bad, reason = (_TBS, tbs != mbs * gas * world_size), ""
            if bad[1]:
                w.problem(bad[0], top.get(bad[0]), f"does not fit train_batch_size={tbs} on {world_size} ranks "
                          "(train_batch_size = micro-batch x accumulation x ranks).",
                          "give batch sizes whose product matches train_batch_size.")
                return
            if reason:
                w.choose(bad[0], given[bad[0]], mbs if bad[0] == _MBS else gas, reason)
        elif mbs is None or gas is None:
            key, other = (_MBS, f"accumulation {gas}") if mbs is None else (_GAS, f"micro-batch {mbs}")
            w.choose(key, given[key], "derived at launch",
                     f"train_batch_size {tbs} / ({other} x the number of ranks)")
            mbs, gas = mbs or 0, gas or 0  # 0: LoopConfig derives it once the world size is known
        elif tbs % (mbs * gas):
            w.problem(_TBS, tbs, f"is not a multiple of train_micro_batch_size_per_gpu x "
                      f"gradient_accumulation_steps = {mbs * gas}.", "fix one of the three batch settings.")
            return
        else:
            w.notes.append(f"train_batch_size={tbs} implies {tbs // (mbs * gas)} ranks; the trainer checks "
                           "train.global_batch_size against the actual world size at launch.")
    w.put("train.micro_batch_size", mbs, _MBS)
    w.put("train.grad_accum_steps", gas, _GAS)
    w.put("train.global_batch_size", tbs or 0, _TBS)


def auto_precision(w: Walk, fp16_enabled: Any, bf16_enabled: Any, bkey: str) -> tuple[bool, bool]:
    """fp16.enabled / bf16.enabled with "auto" decided from the device this
    process sees (run.device is "auto" in a DeepSpeed config): bf16 on a GPU
    that supports it, else fp16 on a GPU where fp16 is "auto", else fp32 (CPU:
    half precision there is slower, not faster).  Other values pass through."""
    fp16_auto, bf16_auto = fp16_enabled == "auto", bf16_enabled == "auto"
    if not (fp16_auto or bf16_auto):
        return fp16_enabled, bf16_enabled
    cuda = torch.cuda.is_available()
    bf16_ok = cuda and torch.cuda.is_bf16_supported()
    fixed_on = (fp16_enabled is True) or (bf16_enabled is True)
    device = "a CUDA device" + ("" if bf16_ok else " without bf16") if cuda else "no CUDA device, CPU"
    if bf16_auto:
        bf16_enabled = bool(bf16_ok and not fixed_on)
        why = f"{device}: " + ("bf16 compute" if bf16_enabled else "fp16 is enabled" if fixed_on else
                               "bf16 not supported" if cuda else "fp32 compute")
        w.choose(f"{bkey}.enabled", "auto", bf16_enabled, why)
    if fp16_auto:
        fp16_enabled = bool(cuda and not bf16_ok and bf16_enabled is not True and not fixed_on)
        why = f"{device}: " + ("fp16 compute with dynamic loss scaling" if fp16_enabled else
                               "bf16 compute" if bf16_enabled is True else
                               "fp32 compute" if not cuda else "fp16 not used")
        w.choose("fp16.enabled", "auto", fp16_enabled, why)
    return fp16_enabled, bf16_enabled
