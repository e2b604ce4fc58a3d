"""The checkpoint contract's types: how a rank hands its training state to checkpoint code.

They sit below every room (docs/architecture.md): the ZeRO engine (parallel) builds
``StateSegment``s, the host optimizer (offload) builds ``StreamedTensor``s for state on
NVMe, and checkpoints (runtime) read and write both, so neither producer has to import
the runtime that consumes them.  See docs/CONTRACTS.md, "Engine -> checkpoint".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

__all__ = ["StateSegment", "StreamedTensor"]


class StreamedTensor:
    """A 1-D tensor that is not in memory (state on NVMe): a checkpoint writes it from
    ``read(lo, hi)`` and loads it through ``write(lo, src)``, a slice at a time, so
    saving or resuming NVMe-resident state never holds more than a slice of it."""

    def __init__(self, dtype: torch.dtype, numel: int, read: Callable[[int, int], torch.Tensor],
                 write: Callable[[int, torch.Tensor], None]) -> None:
        self.dtype, self._numel, self.read, self.write = dtype, numel, read, write

    def numel(self) -> int:
        return self._numel

    def dim(self) -> int:
        return 1

    def element_size(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def shape(self) -> tuple[int]:
        return (self._numel,)


@dataclass
class StateSegment:
    """This rank's piece ``[param_lo, param_hi)`` of flattened parameter ``name``:
    ``tensors`` maps a state kind ("param", "exp_avg", "exp_avg_sq", "momentum")
    to a writable 1-D view with ``param_hi - param_lo`` elements (any device), or to a
    ``StreamedTensor`` for state that is not in memory (NVMe)."""

    name: str
    shape: tuple[int, ...]
    param_lo: int
    param_hi: int
    tensors: dict[str, torch.Tensor | StreamedTensor]
