"""Runtime state of chunks: residency state machine, gathered buffers, groups.

A chunk's gathered (compute-dtype) parameters move SHARDED -> GATHERING ->
GATHERED -> SHARDED; every transition is asserted.  A group is a top-level wrap
unit with the chunks it carries (its own and its nested units'), the unit of
collectives.  The engine (zero.py) drives these objects.
"""

from __future__ import annotations

import enum

import torch
import torch.nn as nn

from tierlift.parallel.units import UnitModule

__all__ = ["Residency", "RuntimeChunk", "Group", "PostBackward"]


class Residency(enum.Enum):
    """Where a chunk's gathered (compute-dtype) parameters are."""

    SHARDED = "sharded"      # storage freed; only shards exist
    GATHERING = "gathering"  # all-gather in flight into the storage
    GATHERED = "gathered"    # storage holds the full parameters


_ALLOWED = {
    Residency.SHARDED: {Residency.GATHERING},
    Residency.GATHERING: {Residency.GATHERED},
    Residency.GATHERED: {Residency.SHARDED},
}


class RuntimeChunk:
    """One chunk on this rank: shards, gathered buffer, residency, pending work."""

    def __init__(self, spec, unit: UnitModule, rank: int, device: torch.device, compute_dtype: torch.dtype,
                 host_optimizer: bool = False, host_params: bool = False) -> None:
        self.spec = spec
        self.unit = unit
        by_name = dict(unit.params)
        self.params = [by_name[s.name] for s in spec.params]
        lo, hi = spec.shard_range(rank)
        with torch.no_grad():
            flat = torch.zeros(spec.padded_numel, dtype=torch.float32)
            for slot, p in zip(spec.params, self.params):
                flat[slot.offset:slot.end].copy_(p.detach().reshape(-1).to(torch.float32))
            # With the optimizer offloaded the fp32 master/grad live on the host
            # (OffloadedOptimizer takes ``master`` and the device keeps neither).
            self.master = flat[lo:hi].clone() if host_optimizer else flat[lo:hi].to(device).clone()
            self.grad = None if host_optimizer else torch.zeros_like(self.master)
            self.full = flat.to(device=device, dtype=compute_dtype)
            del flat
        if host_params:
            self.compute_shard = None  # bf16 shard on the host; copied in for each gather
        elif compute_dtype == torch.float32 and not host_optimizer:
            self.compute_shard = self.master
        else:
            self.compute_shard = self.master.to(device=device, dtype=compute_dtype)
        self.stale = False  # host optimizer stepped: the device copy must be refreshed before use
        self.state = Residency.GATHERED
        self.work = None
        self.ready = None       # CUDA event: the H2D stream's part of a gather is done
        self.gather_tmp = None  # device shard a gather reads, kept until the gather is waited for
        self.bytes = self.full.numel() * self.full.element_size()
        for slot, p in zip(spec.params, self.params):
            p.data = self.full[slot.offset:slot.end].view(slot.shape)

    def transition(self, new: Residency) -> None:
        assert new in _ALLOWED[self.state], f"chunk {self.spec.index} ({self.spec.unit!r}): {self.state} -> {new}"
        self.state = new


class Group:
    """A top-level wrap unit and the chunks it carries (its own and its nested
    units', e.g. MoE experts).  Collectives are issued per group, in the same order
    on every rank, whatever data-dependent path runs inside the unit."""

    def __init__(self, index: int, name: str, module: nn.Module, chunks: list[RuntimeChunk]) -> None:
        self.index = index
        self.name = name
        self.module = module
        self.chunks = chunks
        self.reduced = False
        self.persistent = all(c.spec.persistent for c in chunks)

    @property
    def numel(self) -> int:
        return sum(c.spec.padded_numel for c in self.chunks)


class PostBackward(torch.autograd.Function):
    """Identity on a unit's inputs whose backward runs once the unit's whole
    backward is done (AccumulateGrad nodes run first, so its grads are final)."""

    @staticmethod
    def forward(ctx, engine, group, *inputs):
        ctx.engine, ctx.group = engine, group
        return inputs if len(inputs) > 1 else inputs[0]

    @staticmethod
    def backward(ctx, *grads):
        ctx.engine._post_backward(ctx.group)
        return (None, None) + grads
