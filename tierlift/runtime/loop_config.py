"""LoopConfig: the step loop's settings, and the batch sizes derived once the world size is known.

Below ``runtime.config`` (never imports it), so that both ``runtime.config``
and the DeepSpeed mapping below it can use it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from tierlift._configbase import check
from tierlift.offload.activation_plan import ActivationConfig

__all__ = ["LoopConfig", "resolve_loop"]


@dataclass
class LoopConfig:
    """The step loop.  micro_batch_size is per rank; one optimizer step consumes
    micro_batch_size * grad_accum_steps * world_size samples.

    global_batch_size: 0 = derived; if set, must equal that product.  With it set,
    micro_batch_size and/or grad_accum_steps may be 0 = derived from it once the
    number of ranks is known (the Trainer, ``tierlift train --nproc``), as
    DeepSpeed derives a missing train_micro_batch_size_per_gpu; both 0 means one
    micro-batch per step (accumulation 1)."""

    micro_batch_size: int = 8
    grad_accum_steps: int = 1
    max_steps: int = 300
    seed: int = 1234
    log_every: int = 10
    eval_every: int = 0
    eval_batches: int = 4
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    activation_checkpointing: bool = False  # the alias of activations.policy: recompute
    global_batch_size: int = 0
    activations: ActivationConfig = field(default_factory=ActivationConfig)

    def __post_init__(self) -> None:
        for name in ("max_steps", "log_every", "eval_batches", "keep_checkpoints"):
            v = getattr(self, name)
            check(v >= 1, f"train.{name}", v, "must be >= 1.", "give a positive integer.")
        for name in ("eval_every", "checkpoint_every", "global_batch_size"):
            v = getattr(self, name)
            check(v >= 0, f"train.{name}", v, "must be >= 0.", "use 0 to disable.")
        if self.activation_checkpointing:
            check(self.activations.policy in ("keep", "recompute"), "train.activation_checkpointing", True,
                  f"conflicts with train.activations.policy={self.activations.policy!r}.",
                  "set only train.activations.policy (activation_checkpointing: true is its alias for 'recompute').")
            self.activations = dataclasses.replace(self.activations, policy="recompute")
        for name in ("micro_batch_size", "grad_accum_steps"):
            v = getattr(self, name)
            check(v >= 1 or (v == 0 and self.global_batch_size > 0), f"train.{name}", v,
                  "must be >= 1 (0, derived at launch, only with train.global_batch_size set).",
                  "give a positive integer, or set train.global_batch_size to derive it from.")


def resolve_loop(loop: LoopConfig, world_size: int) -> tuple[LoopConfig, list[str]]:
    """``loop`` with a derived (0) micro-batch / accumulation count filled in for
    ``world_size`` ranks, and one line per value chosen (none when nothing was
    derived).  Raises ConfigError when the global batch does not divide.  Pure."""
    mbs, gas, gbs = loop.micro_batch_size, loop.grad_accum_steps, loop.global_batch_size
    if mbs and gas:
        return loop, []
    lines = []
    if not gas and not mbs:
        gas = 1  # DeepSpeed's rule when only train_batch_size is given
        lines.append("config: train.grad_accum_steps (DeepSpeed gradient_accumulation_steps) -> 1 "
                     "(no micro-batch or accumulation given: one micro-batch per step, as DeepSpeed does)")
    # The one count not given is the global batch over the other and the ranks.
    if not mbs:
        mbs, line = _derive(gbs, gas, world_size, "micro_batch_size", "train_micro_batch_size_per_gpu",
                            "grad_accum_steps", "accumulation")
    else:
        gas, line = _derive(gbs, mbs, world_size, "grad_accum_steps", "gradient_accumulation_steps",
                            "micro_batch_size", "micro-batch")
    lines.append(line)
    return dataclasses.replace(loop, micro_batch_size=mbs, grad_accum_steps=gas), lines


def _derive(gbs: int, given: int, world_size: int, name: str, ds_name: str, given_name: str,
            given_words: str) -> tuple[int, str]:
    """``gbs / (given x world_size)`` for ``train.<name>``, and the line saying so; a
    ConfigError when it does not divide."""
    value, rest = divmod(gbs, given * world_size)
    per = given * world_size
    check(rest == 0 and value >= 1, "train.global_batch_size", gbs,
          f"is not a multiple of {given_name} {given} x {world_size} ranks = {per}, so no {name} fits "
          "(DeepSpeed: train_batch_size = micro-batch x accumulation x ranks).",
          f"give a global batch divisible by {per}, or set train.{name}.")
    return value, (f"config: train.{name} (DeepSpeed {ds_name}) -> {value} "
                   f"= global batch {gbs} / ({given_words} {given} x {world_size} ranks)")
