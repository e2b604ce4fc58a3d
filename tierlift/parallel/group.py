"""Groups: a top-level wrap unit and the chunks it carries, the unit of collectives.

A group owns its chunks' unshard (issue the gathers), the wait for them and the
reshard, as FSDP2's ``FSDPParamGroup`` does for its parameters; the moves themselves
are the shared ``Gatherer``'s (``gather.py``).  Nested units (MoE experts) travel with
their top-level unit, so every rank issues the same collectives in the same order
whatever data-dependent path runs inside the unit (docs/zero.md).
"""

from __future__ import annotations

import torch.nn as nn

from tierlift.parallel.chunks import RuntimeChunk
from tierlift.parallel.gather import Gatherer
from tierlift.parallel.units import UnitModule

__all__ = ["Group", "make_groups"]


class Group:
    """A top-level wrap unit and the chunks it carries (its own and its nested units')."""

    def __init__(self, index: int, name: str, module: nn.Module, chunks: list[RuntimeChunk],
                 gatherer: Gatherer) -> None:
        self.index = index
        self.name = name
        self.module = module
        self.chunks = chunks
        self.gatherer = gatherer
        self.reduced = False  # its gradients were reduced in this micro-batch's backward
        self.persistent = all(c.spec.persistent for c in chunks)

    @property
    def numel(self) -> int:
        return sum(c.spec.padded_numel for c in self.chunks)

    def is_sharded(self) -> bool:
        """Some chunk needs a gather before the unit can run."""
        return any(c.is_sharded for c in self.chunks)

    def step_pending(self) -> bool:
        """A gather would wait for a host optimizer step still running."""
        return self.gatherer.host_opt is not None and any(self.gatherer.step_pending(c) for c in self.chunks)

    def unshard(self) -> None:
        """Issue the gathers of the chunks not gathered yet (async)."""
        for c in self.chunks:
            self.gatherer.issue(c)

    def wait_for_unshard(self) -> None:
        """Gathered on return (issued here when not yet): the compute stream may use it."""
        self.gatherer.gathered(self.chunks)

    def reshard(self) -> None:
        """Free the gathered storage of the non-persistent chunks (gathers in flight land first)."""
        for c in self.chunks:
            self.gatherer.reshard(c)


def make_groups(units: list[UnitModule], chunks: list[RuntimeChunk], gatherer: Gatherer) -> list[Group]:
    """One group per top-level named unit that has chunks, in unit order."""
    names = [u.name for u in units if u.name]
    top = [n for n in names if not any(n.startswith(o + ".") for o in names if o != n)]
    modules = {u.name: u.module for u in units}
    groups: list[Group] = []
    for n in top:
        mine = [c for c in chunks if c.spec.unit == n or c.spec.unit.startswith(n + ".")]
        if mine:
            groups.append(Group(len(groups), n, modules[n], mine, gatherer))
    return groups
