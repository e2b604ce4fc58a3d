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
    if not mbs:
        mbs, rest = divmod(gbs, gas * world_size)
        check(rest == 0 and mbs >= 1, "train.global_batch_size", gbs,
              f"is not a multiple of grad_accum_steps {gas} x {world_size} ranks = {gas * world_size}, so no "
              "micro-batch size fits (DeepSpeed: train_batch_size = micro-batch x accumulation x ranks).",
              f"give a global batch divisible by {gas * world_size}, or set the micro-batch size.")
        lines.append(f"config: train.micro_batch_size (DeepSpeed train_micro_batch_size_per_gpu) -> {mbs} "
                     f"= global batch {gbs} / (accumulation {gas} x {world_size} ranks)")
    else:
        gas, rest = divmod(gbs, mbs * world_size)
        check(rest == 0 and gas >= 1, "train.global_batch_size", gbs,
              f"is not a multiple of micro_batch_size {mbs} x {world_size} ranks = {mbs * world_size}, so no "
              "accumulation count fits (DeepSpeed: train_batch_size = micro-batch x accumulation x ranks).",
              f"give a global batch divisible by {mbs * world_size}, or set the accumulation steps.")
        lines.append(f"config: train.grad_accum_steps (DeepSpeed gradient_accumulation_steps) -> {gas} "
                     f"= global batch {gbs} / (micro-batch {mbs} x {world_size} ranks)")
    return dataclasses.replace(loop, micro_batch_size=mbs, grad_accum_steps=gas), lines
