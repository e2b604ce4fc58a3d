"""Gradients waiting for their host optimizer step, kept where they were produced.

With the optimizer on the host and no clipping, a chunk steps as soon as its
gradient shard is final.  Backward produces gradients faster than a CPU can step
them, so some must wait.  They wait *on the device* (GPU memory is the plentiful
tier during an offloaded run; host memory is the scarce one), in a backlog bounded
by ``budget_bytes``: backward blocks only when the budget is spent.

The worker takes gradients by *deadline*, not arrival: the next forward needs the
root and the first units first, and those gradients arrive last.  Stepping them
first lets the next forward start while the later units are still stepping
(earliest-deadline-first; with a backlog it reads as last-in-first-out).

Sync points: ``put`` never blocks on the device.  A gradient's ``ready`` event
(recorded on the producing stream) travels with it; the worker's D2H copy waits
on it, and the gradient is dropped only after that copy completed.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

__all__ = ["PendingGrad", "GradBacklog"]


@dataclass
class PendingGrad:
    """One chunk's final gradient shard for one step, and what its step needs."""

    index: int               # chunk index
    grad: torch.Tensor       # on the producing device, any float dtype
    ready: object            # torch.cuda.Event recorded after the gradient was produced, or None (CPU)
    lr: float                # the step's learning rate
    step_count: int          # optimizer steps taken before this one (bias correction)

    @property
    def nbytes(self) -> int:
        return self.grad.numel() * self.grad.element_size()


class GradBacklog:
    """Pending gradients, taken earliest-deadline-first, under a byte budget.

    ``budget_bytes``: bytes of pending gradients allowed at once; one gradient is
    always admitted when the backlog is empty, so a budget smaller than a chunk still
    makes progress (one chunk at a time)."""

    def __init__(self, budget_bytes: int) -> None:
        if budget_bytes < 0:
            raise ValueError(f"budget_bytes must be >= 0, got {budget_bytes}")
        self.budget_bytes = budget_bytes
        self._pending: dict[int, PendingGrad] = {}
        self._bytes = 0
        self._deadline: dict[int, int] = {}
        self._cv = threading.Condition()
        self.peak_bytes = 0
        self.blocked_s = 0.0  # producer seconds spent waiting for room (backpressure)

    def set_deadlines(self, order: list[int]) -> None:
        """Chunk indices in the order the next forward needs them (earliest first)."""
        with self._cv:
            self._deadline = {idx: pos for pos, idx in enumerate(order)}

    def deadline(self, index: int) -> int:
        # Chunks the order does not name go last, by index: deterministic either way.
        return self._deadline.get(index, len(self._deadline) + index)

    def put(self, item: PendingGrad) -> None:
        """Add a gradient; blocks while it does not fit the budget (and the backlog is not empty)."""
        import time

        with self._cv:
            if item.index in self._pending:
                raise RuntimeError(f"chunk {item.index} already has a gradient waiting for its step; "
                                   "a chunk must step before its next gradient arrives.")
            t0 = time.perf_counter()
            while self._bytes and self._bytes + item.nbytes > self.budget_bytes:
                self._cv.wait()
            self.blocked_s += time.perf_counter() - t0
            self._pending[item.index] = item
            self._bytes += item.nbytes
            self.peak_bytes = max(self.peak_bytes, self._bytes)
            self._cv.notify_all()

    def take(self) -> PendingGrad | None:
        """The pending gradient with the earliest deadline (still counted against the
        budget until ``release``), or None when nothing is pending."""
        with self._cv:
            if not self._pending:
                return None
            index = min(self._pending, key=self.deadline)
            return self._pending.pop(index)

    def release(self, item: PendingGrad) -> None:
        """``item``'s gradient has been copied out: its bytes are free again."""
        with self._cv:
            self._bytes -= item.nbytes
            item.grad = None
            self._cv.notify_all()

    def __len__(self) -> int:
        with self._cv:
            return len(self._pending)

    @property
    def bytes(self) -> int:
        with self._cv:
            return self._bytes
