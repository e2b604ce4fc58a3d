"""Rank-sliced, deterministic, resumable batches: one call per optimizer step.

:class:`StepBatcher` gives each rank its ``grad_accum_steps`` micro-batches of
global step s, following :mod:`tierlift.runtime.data.order` exactly (see there
for the layout).  Its position is a single number, ``samples_consumed =
steps * global_batch_size``, so a checkpoint resumes onto the same next global
batch under any (micro_batch_size, grad_accum_steps, world_size) with the same
product; with a different product the position cannot be mapped and loading
the state raises.

Iterable datasets (no ``__len__``) are consumed in order: each global batch is
the next GB items, sliced by rank like a map-style batch.  Every rank reads the
whole stream (and keeps its slice), and when the stream ends the partial batch
is dropped and a new pass starts (``set_epoch(e)`` is called first when the
dataset has it).  Resuming re-creates the iterator and skips the items already
consumed in the current pass: this *replays* the stream, costing the time of
reading those items, and is exact only if the stream yields the same items
again.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch.utils.data import IterableDataset

from tierlift.errors import DataError
from tierlift.runtime.data.order import global_step_indices, rank_slice, steps_per_epoch

__all__ = ["StepBatcher", "collate", "tokens_per_step"]

_STATE_VERSION = 1


def tokens_per_step(global_batch_size: int, seq_len: int) -> int:
    """Label tokens one optimizer step trains on (all ranks, all micro-batches)."""
    return int(global_batch_size) * int(seq_len)


def collate(items: list[Any]) -> dict[str, torch.Tensor]:
    """Stack a list of dict items key by key: tensors with torch.stack, ints/lists with torch.tensor."""
    if not items:
        raise ValueError("cannot collate an empty micro-batch")
    if not isinstance(items[0], Mapping):
        raise TypeError(f"dataset items must be dicts of tensors or lists/ints, got {type(items[0]).__name__}")
    out = {}
    for key in items[0]:
        values = [item[key] for item in items]
        out[key] = torch.stack(values) if isinstance(values[0], torch.Tensor) else torch.tensor(values)
    return out


def _is_iterable(dataset: Any) -> bool:
    if isinstance(dataset, IterableDataset):
        return True
    return not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__"))


class StepBatcher:
    """This rank's micro-batches, step by step, in a run-wide deterministic order.

    ``dataset``: map-style (``__len__`` + ``__getitem__``, a plain list counts)
    or iterable; ``seed`` and ``epoch`` key the shuffle (``shuffle=False``
    visits samples in index order).  ``next_step()`` returns a list of
    ``grad_accum_steps`` dicts of tensors shaped ``[micro_batch_size, ...]``.
    """

    def __init__(self, dataset: Any, micro_batch_size: int, grad_accum_steps: int, rank: int, world_size: int,
                 seed: int, shuffle: bool = True) -> None:
        for name, v in (("micro_batch_size", micro_batch_size), ("grad_accum_steps", grad_accum_steps),
                        ("world_size", world_size)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.dataset = dataset
        self.micro_batch_size = micro_batch_size
        self.grad_accum_steps = grad_accum_steps
        self.rank = rank
        self.world_size = world_size
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.global_batch_size = micro_batch_size * grad_accum_steps * world_size
        self.iterable = _is_iterable(dataset)
        self.steps = 0  # optimizer steps taken = global batches consumed
        # Iterable datasets only: the current pass, how far into it the live
        # iterator is, and the iterator (None until first needed / after a load).
        self._pass = 0
        self._pass_consumed = 0
        self._iterator: Iterator[Any] | None = None
        if self.iterable:
            self.dataset_len: int | None = None
            self.steps_per_epoch: int | None = None
        else:
            self.dataset_len = len(dataset)
            self.steps_per_epoch = self._checked_steps_per_epoch(self.dataset_len)

    def _checked_steps_per_epoch(self, n: int) -> int:
        try:
            return steps_per_epoch(n, self.global_batch_size)
        except DataError as exc:
            exc.message = (f"the dataset has {n} samples, fewer than one global batch of {self.global_batch_size} "
                           f"= micro_batch_size {self.micro_batch_size} x grad_accum_steps "
                           f"{self.grad_accum_steps} x world_size {self.world_size}.")
            exc.args = (exc.render(),)
            raise

    # -- position ----------------------------------------------------------
    @property
    def samples_consumed(self) -> int:
        """Samples consumed by all ranks together since the start of training."""
        return self.steps * self.global_batch_size

    @property
    def epoch(self) -> int:
        """The pass over the data that the next step draws from."""
        if self.iterable:
            return self._pass
        return self.steps // self.steps_per_epoch

    @property
    def samples_in_epoch(self) -> int:
        """Samples of the current pass already consumed by earlier steps."""
        if self.iterable:
            return self._pass_consumed
        return (self.steps % self.steps_per_epoch) * self.global_batch_size

    def global_step_indices(self, step: int) -> list[int]:
        """The whole global batch of ``step`` (0-based, across epochs) as dataset indices, rank-major.

        Pure: does not move the batcher.  For an iterable dataset these are
        ordinals in the item stream, valid within its first pass (the length of
        a pass is unknown in advance).
        """
        if self.iterable:
            if step < 0:
                raise ValueError(f"step must be >= 0, got {step}")
            return list(range(step * self.global_batch_size, (step + 1) * self.global_batch_size))
        return global_step_indices(step, dataset_len=self.dataset_len, global_batch_size=self.global_batch_size,
                                   seed=self.seed, shuffle=self.shuffle)

    # -- batches -----------------------------------------------------------
    def next_step(self) -> list[dict[str, torch.Tensor]]:
        """This rank's ``grad_accum_steps`` micro-batches of the next global step."""
        if self.iterable:
            items = self._next_stream_batch()
            parts = rank_slice(items, self.rank, self.world_size, self.micro_batch_size, self.grad_accum_steps)
            micro = [collate(p) for p in parts]
        else:
            indices = self.global_step_indices(self.steps)
            parts = rank_slice(indices, self.rank, self.world_size, self.micro_batch_size, self.grad_accum_steps)
            micro = [collate([self.dataset[i] for i in p]) for p in parts]
        self.steps += 1
        return micro

    def __iter__(self) -> Iterator[list[dict[str, torch.Tensor]]]:
        """Steps without end (epochs roll over); the trainer decides when to stop."""
        while True:
            yield self.next_step()

    def _open_pass(self, skip: int) -> None:
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(self._pass)
        self._iterator = iter(self.dataset)
        for n in range(skip):
            try:
                next(self._iterator)
            except StopIteration:
                raise DataError(f"the iterable dataset ended after {n} items while replaying {skip} items "
                                f"consumed in pass {self._pass} before the checkpoint: it does not yield the "
                                "same items again.", setting="data", value=type(self.dataset).__name__,
                                fix="resume with the same data, or make the stream repeatable.") from None

    def _next_stream_batch(self) -> list[Any]:
        gb = self.global_batch_size
        for _attempt in range(2):  # this pass, then at most one fresh pass
            if self._iterator is None:
                self._open_pass(self._pass_consumed)
            items = []
            for item in self._iterator:
                items.append(item)
                if len(items) == gb:
                    self._pass_consumed += gb
                    return items
            # Stream ended: drop the partial batch and start the next pass.
            started_empty = self._pass_consumed == 0
            self._pass += 1
            self._pass_consumed = 0
            self._iterator = None
            if started_empty:
                break
        raise DataError(f"one pass of the iterable dataset yields {len(items)} items, fewer than one global batch "
                        f"of {gb} = micro_batch_size {self.micro_batch_size} x grad_accum_steps "
                        f"{self.grad_accum_steps} x world_size {self.world_size}.", setting="train.global_batch_size",
                        value=gb, fix="add data, or lower train.micro_batch_size / train.grad_accum_steps / "
                                      "the number of ranks.")

    # -- checkpointing -----------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The data position, JSON-able; the same on every rank."""
        return {"version": _STATE_VERSION, "kind": "iterable" if self.iterable else "map",
                "samples_consumed": self.samples_consumed, "epoch": self.epoch,
                "samples_in_epoch": self.samples_in_epoch, "steps": self.steps,
                "global_batch_size": self.global_batch_size, "dataset_len": self.dataset_len,
                "seed": self.seed, "shuffle": self.shuffle}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from ``state`` (from any world size / accumulation with the same global batch)."""
        gb_saved = int(state["global_batch_size"])
        if gb_saved != self.global_batch_size:
            per_rank = self.micro_batch_size * self.world_size
            hint = (f" e.g. grad_accum_steps = {gb_saved // per_rank}" if gb_saved % per_rank == 0 else "")
            raise DataError(f"the checkpoint's data position was saved with a global batch of {gb_saved} samples; "
                            f"this run's is {self.global_batch_size} = micro_batch_size {self.micro_batch_size} x "
                            f"grad_accum_steps {self.grad_accum_steps} x world_size {self.world_size}. The position "
                            "in the sample order cannot be mapped between different global batch sizes (the "
                            "step boundaries and the dropped epoch tail differ).", setting="train.global_batch_size",
                            value=self.global_batch_size,
                            fix=f"resume with micro_batch_size x grad_accum_steps x world_size = {gb_saved}{hint}, "
                                "or start a new run (without resume) to use a different global batch.")
        kind = "iterable" if self.iterable else "map"
        if state.get("kind") != kind:
            raise DataError(f"the checkpoint's data position is for a {state.get('kind')} dataset, this run's "
                            f"dataset is {kind}.", setting="data", value=type(self.dataset).__name__,
                            fix="resume with the same data source.")
        for key, setting in (("dataset_len", "data"), ("seed", "data.seed"), ("shuffle", "data.shuffle")):
            if state.get(key) != getattr(self, key):
                raise DataError(f"is {getattr(self, key)!r} but the checkpoint was written with {state.get(key)!r} "
                                f"({key}), so the sample order would differ and samples would be repeated or "
                                "skipped.", setting=setting, value=getattr(self, key),
                                fix="resume with the same data, data.seq_len, data.seed and data.shuffle as the "
                                    "checkpointed run.")
        steps = int(state["steps"])
        if int(state["samples_consumed"]) != steps * gb_saved:
            raise DataError("the checkpoint's data position is inconsistent (samples_consumed != steps x "
                            "global_batch_size).", setting="checkpoint data state", value=dict(state),
                            fix="resume from another checkpoint.")
        self.steps = steps
        if self.iterable:
            self._pass = int(state["epoch"])
            self._pass_consumed = int(state["samples_in_epoch"])
            self._iterator = None  # re-created and fast-forwarded on the next step
