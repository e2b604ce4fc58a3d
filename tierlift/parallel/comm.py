"""Process groups and the collectives the engine and the I/O code use.

On GPU the default group is created with ``"cuda:nccl,cpu:gloo"`` so a CPU tensor
(a host-resident shard, a checksum, a Python object) never meets an NCCL-only
group ("No backend type associated with device type cpu").  On CPU it is gloo.

``Comm`` is the small object handed to code that only needs barriers and object
exchange (checkpoints, data, telemetry): it is a no-op for one process, so that
code runs and is tested without a process group.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["Comm", "LocalComm", "DistComm", "current_comm", "all_gather_flat", "reduce_scatter_flat"]


class Comm:
    rank: int = 0
    world_size: int = 1

    def barrier(self) -> None:
        raise NotImplementedError

    def all_gather_object(self, obj: Any) -> list[Any]:
        raise NotImplementedError

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        raise NotImplementedError

    def all_reduce_sum(self, value: float) -> float:
        raise NotImplementedError


class LocalComm(Comm):
    """The single-process Comm: every collective is the identity."""

    def barrier(self) -> None:
        return None

    def all_gather_object(self, obj: Any) -> list[Any]:
        return [obj]

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        return obj

    def all_reduce_sum(self, value: float) -> float:
        return float(value)


class DistComm(Comm):
    """Comm over an initialised torch.distributed group (objects go through gloo)."""

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)

    def barrier(self) -> None:
        # A gloo barrier on the CPU side avoids NCCL's device barrier (which needs
        # a device id and synchronises the GPU for no reason).
        dist.barrier(group=self.group)

    def all_gather_object(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        box = [obj]
        dist.broadcast_object_list(box, src=src, group=self.group)
        return box[0]

    def all_reduce_sum(self, value: float) -> float:
        t = torch.tensor([float(value)], dtype=torch.float64)
        dist.all_reduce(t, group=self.group)
        return float(t.item())


def current_comm() -> Comm:
    """DistComm when a default process group exists, else LocalComm."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return DistComm()
    return LocalComm()


# torch 2.13 renamed the flat collectives (*_single); 2.11 has only the old names.
_ag_single = getattr(dist, "all_gather_single", None)
_rs_single = getattr(dist, "reduce_scatter_single", None)


def all_gather_flat(out: torch.Tensor, shard: torch.Tensor, group=None, async_op: bool = False):
    """Gather equal shards into ``out`` (len = world * len(shard)), rank-ordered."""
    if _ag_single is not None:
        return _ag_single(out, shard, group=group, async_op=async_op)
    return dist.all_gather_into_tensor(out, shard, group=group, async_op=async_op)


def reduce_scatter_flat(out: torch.Tensor, flat: torch.Tensor, group=None, async_op: bool = False):
    """Sum ``flat`` over ranks and keep this rank's slice in ``out``."""
    if _rs_single is not None:
        return _rs_single(out, flat, group=group, async_op=async_op)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return dist.reduce_scatter_tensor(out, flat, group=group, async_op=async_op)
