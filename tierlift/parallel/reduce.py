"""Gradient reduction: a chunk's parameter gradients, flattened and reduce-scattered into
this rank's fp32 gradient shard (on the device), or handed to the host optimizer.

Sync points (GPU): reduce-scatters are issued async from the compute stream; at most
two stay in flight (bounded memory, still overlapped with backward), and ``drain``
waits for the rest at the end of a micro-batch's backward.  ``work.wait()`` makes
the compute stream wait, never the host (NCCL); gloo's waits block the host.
"""

from __future__ import annotations

from typing import Any

import torch

from tierlift.parallel.chunks import RuntimeChunk
from tierlift.parallel.comm import reduce_scatter_flat
from tierlift.parallel.gather import Gatherer

__all__ = ["GradReducer"]

_MAX_IN_FLIGHT = 2


class GradReducer:
    """Reduce-scatters chunks' gradients, averaged over ranks; counts micro-batches."""

    def __init__(self, *, stage: int, world_size: int, device: torch.device, reduce_dtype: torch.dtype,
                 host_opt, gatherer: Gatherer) -> None:
        self.stage, self.world_size, self.device, self.reduce_dtype = stage, world_size, device, reduce_dtype
        self.host_opt = host_opt
        self.gatherer = gatherer  # its arena scope holds the gradient buffers too
        self.micro = 0         # micro-batch index inside the current optimizer step
        self.last_micro = True  # the micro-batch being reduced is the step's last
        self._pending: list[tuple[RuntimeChunk, Any, torch.Tensor, torch.Tensor]] = []

    def begin_micro(self, last: bool) -> None:
        self.last_micro = last

    def end_micro(self, last: bool) -> None:
        self.micro = 0 if last else self.micro + 1

    def reduce_chunk(self, c: RuntimeChunk) -> None:
        """Flatten the chunk's parameter grads (zeros where a parameter got none) and
        reduce-scatter them into the fp32 shard grad, averaged over ranks."""
        with self.gatherer.alloc():
            flat = torch.zeros(c.spec.padded_numel, dtype=self.reduce_dtype, device=self.device)
        for slot, p in zip(c.spec.params, c.params):
            if p.grad is not None:
                flat[slot.offset:slot.end].copy_(p.grad.reshape(-1))
                p.grad = None
        if self.world_size == 1:
            self._land(c, flat[: c.spec.shard_numel])
            return
        with self.gatherer.alloc():
            out = torch.empty(c.spec.shard_numel, dtype=self.reduce_dtype, device=self.device)
        work = reduce_scatter_flat(out, flat, async_op=True)
        self._pending.append((c, work, out, flat))
        while len(self._pending) > _MAX_IN_FLIGHT:
            self._finish_one()

    def drain(self) -> None:
        """Wait for every reduce-scatter in flight and land its shard."""
        while self._pending:
            self._finish_one()

    def _finish_one(self) -> None:
        c, work, out, _flat = self._pending.pop(0)
        work.wait()
        self._land(c, out.div_(self.world_size))

    def _land(self, c: RuntimeChunk, shard_grad: torch.Tensor) -> None:
        """An averaged gradient shard is final for this micro-batch: accumulate it."""
        if self.host_opt is not None:
            first = self.micro == 0 or self.stage == 1  # stage 1 reduces once per step
            self.host_opt.accept_grad(c.spec.index, shard_grad, first_micro=first, last_micro=self.last_micro)
        else:
            c.grad.add_(shard_grad.to(torch.float32))
