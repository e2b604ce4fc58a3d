"""The full model outside training: gathered in place, or unwrapped as a plain copy.

Owned by :class:`tierlift.parallel.zero.ZeroEngine`, which hands these out as its own;
the Trainer exposes them as ``trainer.gathered_parameters()`` and
``trainer.unwrap_model()``, as FSDP2 has ``unshard()`` / ``get_model_state_dict``
and DeepSpeed ``GatheredParameters`` / ``zero_to_fp32``.

- ``gathered_parameters()``: every rank gathers every stage-3 unit in place (the
  parameters are the engine's compute-dtype buffers), the body runs, every unit is
  resharded on exit.  Inside, a forward needs no collective, so one rank alone may
  run eval or ``generate``.  Costs the whole model in the compute dtype on the
  device; writes to the parameters are not kept.
- ``unwrap(rank0_only)``: the fp32 masters are consolidated (``full_state_dict``),
  the engine's hooks come off and every parameter gets its own tensor in the
  model's original dtype: a plain ``nn.Module`` (``state_dict``, ``save_pretrained``,
  ``generate``, deep copies).  Costs the full model once in fp32 on the host of each
  rank that receives it, plus once in the model's dtype on ``device``.  The next
  engine forward (``fit``, ``evaluate``, ``gathered_parameters``) binds the
  parameters back to the engine's buffers: training continues from the engine's
  own state, and edits made to the unwrapped weights are not taken back.

Both are collectives: every rank enters them (checked, ``rendezvous.py``).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
import torch.nn as nn

from tierlift.errors import TierliftError
from tierlift.parallel.chunks import RuntimeChunk
from tierlift.parallel.group import Group
from tierlift.parallel.hooks import UnitHooks
from tierlift.parallel.rendezvous import Rendezvous
from tierlift.parallel.sharded_param import ChunkGuard, unguard

__all__ = ["FullModel"]


class FullModel:
    """``gathered_parameters`` / ``unwrap`` / ``rewrap`` of one engine's model (module doc)."""

    def __init__(self, *, model: nn.Module, groups: list[Group], chunks: list[RuntimeChunk], hooks: UnitHooks,
                 guard: ChunkGuard, rendezvous: Rendezvous, full_state_dict: Callable[..., dict],
                 model_dtypes: dict[int, torch.dtype], stage: int, device: torch.device, rank: int) -> None:
        self.model, self.groups, self.chunks, self.hooks = model, groups, chunks, hooks
        self.guard, self.rendezvous, self.full_state_dict = guard, rendezvous, full_state_dict
        self.stage, self.device, self.rank = stage, device, rank
        self.model_dtypes = model_dtypes  # id(param) -> the dtype it had before the engine bound it
        self.unwrapped = False
        # While unwrapped: the parameters' views into the chunk buffers, to bind again on rewrap
        # (a fresh view cannot be cut from a resharded buffer: its storage has size 0).
        self._bound_views: list[list[torch.Tensor]] = []

    def _require_idle(self, what: str) -> None:
        phase = self.hooks.phase.value
        if phase != "idle":
            raise TierliftError(f"was called during a {phase} pass.", setting=what, value=phase,
                                rank=self.rank, fix=f"call {what} between training steps, not inside one.")

    @contextlib.contextmanager
    def gathered_parameters(self) -> Iterator[nn.Module]:
        """Every unit gathered in place for the body (all ranks enter); resharded on exit."""
        self._require_idle("gathered_parameters()")
        self.rendezvous.check("gathered_parameters", "gathered_parameters()")
        self.rewrap()
        if self.stage == 3:
            for g in self.groups:  # issue all, then wait: the gathers overlap
                g.unshard()
            for g in self.groups:
                g.wait_for_unshard()
        try:
            yield self.model
        finally:
            if self.stage == 3:  # local: no collective, so an error on one rank cannot hang the others
                self.hooks.reshard_gathered()

    @torch.no_grad()
    def unwrap(self, rank0_only: bool = False, device: torch.device | str | None = None) -> nn.Module:
        """The model with full parameters of its own (on every rank, or on rank 0 only; the
        others keep it sharded) in its original dtype on ``device`` (default: the engine's)."""
        self._require_idle("unwrap_model()")
        self.rendezvous.check("unwrap_model", "unwrap_model()")
        full = self.full_state_dict(to_rank0=rank0_only)
        if rank0_only and self.rank != 0:
            return self.model
        device = torch.device(device) if device is not None else self.device
        if not self.unwrapped:
            self.hooks.detach()
            for c in self.chunks:
                unguard(c.params)
            self._bound_views = [[p.data for p in c.params] for c in self.chunks]
        for name, p in self.model.named_parameters(remove_duplicate=False):
            if name in full:
                p.data = full[name].to(device=device, dtype=self.model_dtypes.get(id(p), p.dtype))
                p.grad = None
        self.unwrapped = self.guard.suspended = True
        return self.model

    def rewrap(self) -> None:
        """Bind the parameters to the engine's buffers again after ``unwrap`` (local, no collective)."""
        if not self.unwrapped:
            return
        self.unwrapped = self.guard.suspended = False
        views, self._bound_views = self._bound_views, []
        for c, chunk_views in zip(self.chunks, views):
            for p, view in zip(c.params, chunk_views):
                p.data = view
                p.grad = None
            if c.is_sharded:
                self.guard.set(c, True)
        self.hooks.attach()
