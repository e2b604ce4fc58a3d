"""Runtime state of chunks: the residency state machine and the gathered buffers.

A chunk's compute-dtype parameters on the device are in exactly one ``Residency``
state; every move between states goes through ``RuntimeChunk.transition``, which
refuses the moves ``TRANSITIONS`` does not list.  Who moves them: ``gather.py``
(gathers, waits, reshards) and the engine's step (a host optimizer step makes the
device copy stale: ``mark_stepped``).  Groups of chunks are in ``group.py``.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any

import torch

from tierlift.parallel.units import UnitModule

__all__ = ["Residency", "TRANSITIONS", "ResidencyError", "check_transition", "InFlight", "RuntimeChunk"]


class Residency(enum.Enum):
    """Where a chunk's current compute-dtype parameters are, as the device sees them."""

    ON_HOST = "on_host"            # current values only on the host (a host optimizer step, or parameters
                                   # offloaded); any device shard or gathered storage is stale or freed
    H2D_INFLIGHT = "h2d_inflight"  # host values being copied into a device shard (H2D stream; CPU: a copy)
    SHARDED = "sharded"            # this rank's device shard is current; gathered storage freed (stage 3)
                                   # or stale and about to be refilled in place
    GATHERING = "gathering"        # all-gather in flight into the gathered storage; handles in ``inflight``
    GATHERED = "gathered"          # gathered storage holds the full parameters


# The only moves a chunk makes.  ON_HOST -> H2D_INFLIGHT -> GATHERING: the copy up and the
# all-gather are issued back to back on one stream, so a chunk is never left resting in
# H2D_INFLIGHT.  GATHERED -> SHARDED: reshard (or device shard refreshed in place);
# GATHERED / SHARDED -> ON_HOST: the host optimizer stepped, or a reshard of offloaded parameters.
TRANSITIONS: dict[Residency, frozenset[Residency]] = {
    Residency.ON_HOST: frozenset({Residency.H2D_INFLIGHT}),
    Residency.H2D_INFLIGHT: frozenset({Residency.GATHERING}),
    Residency.SHARDED: frozenset({Residency.GATHERING, Residency.ON_HOST}),
    Residency.GATHERING: frozenset({Residency.GATHERED}),
    Residency.GATHERED: frozenset({Residency.SHARDED, Residency.ON_HOST}),
}


class ResidencyError(RuntimeError):
    """A chunk was moved along a transition the state machine refuses (an engine bug)."""


def check_transition(old: Residency, new: Residency, what: str = "chunk") -> None:
    """Raise ResidencyError unless ``old -> new`` is in ``TRANSITIONS`` (pure)."""
    if new not in TRANSITIONS[old]:
        raise ResidencyError(f"{what}: {old.name} -> {new.name} is not a residency transition "
                             f"(from {old.name}: {sorted(r.name for r in TRANSITIONS[old])}).")


@dataclasses.dataclass
class InFlight:
    """The handles of one gather in flight, held by the chunk while GATHERING and dropped
    once waited for: the buffers travel with what guards them."""

    work: Any = None                    # async collective handle; None: world size 1, copied in place
    ready: Any = None                   # CUDA event recorded on the H2D stream after its copy and gather
    source: torch.Tensor | None = None  # a device shard made for this gather only (parameters on the host);
                                        # reusable once the stream that waits for ``ready`` gets there


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
        # Where a gather reads this rank's compute-dtype shard from:
        # - host_params: nowhere on the device; the host's values are copied up for each gather;
        # - optimizer on the device: cast from the fp32 master at each gather (``cast_from_master``),
        #   as FSDP2's mixed precision does, instead of a persistent compute-dtype copy (2 bytes
        #   per shard element less; fp32 compute reads the master itself);
        # - optimizer on the host: a device shard the host's new values are copied into.
        self.cast_from_master = not host_optimizer and not host_params
        if host_params or self.cast_from_master:
            self.compute_shard = None
        else:
            self.compute_shard = self.master.to(device=device, dtype=compute_dtype)
        self.state = Residency.GATHERED  # the setup copy above holds the full parameters
        self.inflight: InFlight | None = None
        self.bytes = self.full.numel() * self.full.element_size()
        for slot, p in zip(spec.params, self.params):
            p.data = self.full[slot.offset:slot.end].view(slot.shape)

    @property
    def resting(self) -> Residency:
        """The state a reshard leaves the chunk in: its device shard when it has one."""
        return Residency.SHARDED if self.on_device else Residency.ON_HOST

    @property
    def on_device(self) -> bool:
        """This rank's current compute-dtype shard can be had on the device (a device shard,
        or a cast of the device master) without the host."""
        return self.compute_shard is not None or self.cast_from_master

    def device_shard(self) -> torch.Tensor:
        """This rank's compute-dtype shard on the device: the device shard, or a fresh cast of
        the fp32 master (the caller holds it until every reader is done)."""
        if self.compute_shard is not None:
            return self.compute_shard
        if not self.cast_from_master:
            raise ResidencyError(f"chunk {self.spec.index} ({self.spec.unit!r}) has no device shard: its "
                                 "parameters live on the host.")
        return self.master.to(self.full.dtype)

    @property
    def is_sharded(self) -> bool:
        """Not gathered nor on its way: using it needs a gather."""
        return self.state in (Residency.SHARDED, Residency.ON_HOST)

    def transition(self, new: Residency) -> None:
        """Move to ``new``; raises ResidencyError for a move ``TRANSITIONS`` does not list,
        or for leaving GATHERING with its gather not waited for."""
        check_transition(self.state, new, f"chunk {self.spec.index} ({self.spec.unit!r})")
        if self.state is Residency.GATHERING and self.inflight is not None:
            raise ResidencyError(f"chunk {self.spec.index} ({self.spec.unit!r}): left GATHERING with its gather "
                                 f"not waited for.")
        self.state = new

    def mark_stepped(self) -> None:
        """The host optimizer produced new values: whatever the device holds is stale."""
        if self.state is not Residency.ON_HOST:
            self.transition(Residency.ON_HOST)
