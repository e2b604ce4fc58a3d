"""The full model outside training: gathered in place, or unwrapped as a plain copy.

A mixin of :class:`tierlift.parallel.zero.ZeroEngine` (which owns the state used
here); the Trainer exposes it as ``trainer.gathered_parameters()`` and
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
from typing import Iterator

import torch
import torch.nn as nn

from tierlift.errors import TierliftError
from tierlift.parallel.chunks import Residency, RuntimeChunk
from tierlift.parallel.sharded_param import guard, unguard

__all__ = ["UnshardMixin"]


class UnshardMixin:
    """Hooks, the sharded-parameter guard, and the full model outside training."""

    unwrapped = False

    def _record_model_dtypes(self, model: nn.Module) -> None:
        """Before the engine binds parameters to its compute-dtype buffers: the dtypes unwrap restores."""
        self._model_dtypes = {id(p): p.dtype for p in model.parameters()}

    def _attach_hooks(self) -> None:
        for g in self.groups:
            self._hooks.append(g.module.register_forward_pre_hook(
                lambda m, a, k, g=g: self._pre_forward(g, a, k), with_kwargs=True))
            self._hooks.append(g.module.register_forward_hook(lambda m, a, o, g=g: self._post_forward(g, o)))

    def _set_guard(self, c: RuntimeChunk, on: bool) -> None:
        """Guard a resharded chunk's parameters (``sharded_param.py``); not while unwrapped,
        when they hold their own full tensors."""
        if self.unwrapped:
            return
        if on:
            guard(c.params, (s.name for s in c.spec.params))
        else:
            unguard(c.params)

    def _check_ranks_present(self, g) -> None:
        """Before a gather outside the step loop: fail fast unless every rank runs it too."""
        if self.cfg.stage == 3 and self._is_sharded(g):
            self.rendezvous.check("forward", f"a forward of unit {g.name!r} outside fit()")

    def _require_idle(self, what: str) -> None:
        if self.phase.value != "idle":
            raise TierliftError(f"was called during a {self.phase.value} pass.", setting=what, value=self.phase.value,
                                rank=self.rank, fix=f"call {what} between training steps, not inside one.")

    @contextlib.contextmanager
    def gathered_parameters(self) -> Iterator[nn.Module]:
        """Every unit gathered in place for the body (all ranks enter); resharded on exit."""
        self._require_idle("gathered_parameters()")
        self.rendezvous.check("gathered_parameters", "gathered_parameters()")
        self.rewrap()
        if self.cfg.stage == 3:
            for g in self.groups:  # issue all, then wait: the gathers overlap
                self._issue_gather(g)
            for g in self.groups:
                self._wait_gathered(g)
        try:
            yield self.model
        finally:
            if self.cfg.stage == 3:  # local: no collective, so an error on one rank cannot hang the others
                self._reshard_gathered()

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
            for h in self._hooks:
                h.remove()
            self._hooks = []
            for c in self.chunks:
                unguard(c.params)
            # Aliases of the parameters' views into the chunk buffers, to bind again on rewrap
            # (a fresh view cannot be cut from a resharded buffer: its storage has size 0).
            self._bound_views = [[p.data for p in c.params] for c in self.chunks]
        for name, p in self.model.named_parameters(remove_duplicate=False):
            if name in full:
                p.data = full[name].to(device=device, dtype=self._model_dtypes.get(id(p), p.dtype))
                p.grad = None
        self.unwrapped = True
        return self.model

    def rewrap(self) -> None:
        """Bind the parameters to the engine's buffers again after ``unwrap`` (local, no collective)."""
        if not self.unwrapped:
            return
        self.unwrapped = False
        views, self._bound_views = self._bound_views, []
        for c, chunk_views in zip(self.chunks, views):
            for p, view in zip(c.params, chunk_views):
                p.data = view
                p.grad = None
            if c.state is Residency.SHARDED:
                self._set_guard(c, True)
        self._attach_hooks()
