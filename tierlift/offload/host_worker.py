"""The host optimizer's worker: one thread that lands gradients and runs host steps,
earliest next-forward deadline first.

Requests arrive on a queue from the training thread (``OffloadedOptimizer``):

- ``grad``: a gradient of an accumulating or deferred step, landed into the chunk's own
  fp32 buffer (its squared norm taken on the last micro-batch; an accumulated immediate
  step is stepped right there);
- ``drain``: step every gradient waiting in the backlog (``backlog.py``), taking them by
  deadline; each device gradient is copied into one of ``RING_SLOTS`` pinned fp32 slots
  on the memory owner's ``d2h`` stream one chunk ahead of its step (the next D2H overlaps
  this step), and released from the backlog once its copy completed;
- ``steps``: deferred steps in the next forward's order;
- ``barrier`` / ``stop``.

An exception is kept and raised on the training thread at its next wait; every chunk's
``done`` is set so no caller blocks forever.

Sync points: the worker waits on each gradient's event (``Guarded.wait``) before it
reads the host bytes; ``barrier`` returns once the queue before it and the NVMe writes
are done.  OpenMP thread counts are per OS thread: the worker asks for the creating
thread's count (under Ray, OMP_NUM_THREADS=1 would leave it serial).
"""

from __future__ import annotations

import queue
import threading
import time

import torch

from tierlift.offload.backlog import GradBacklog, PendingGrad
from tierlift.offload.host_step import HostStep
from tierlift.offload.memory import Guarded, MemoryOwner
from tierlift.offload.optimizer_state import ChunkPhase, StateTiers

__all__ = ["RING_SLOTS", "HostWorker"]

# Pinned gradient slots for immediate steps: two let the next chunk's D2H land while the
# worker steps this one; more would only hold host memory (waiting gradients stay on
# the device, in the backlog).
RING_SLOTS = 2


class HostWorker:
    """The thread behind one ``OffloadedOptimizer`` (module doc)."""

    def __init__(self, tiers: StateTiers, step: HostStep, backlog: GradBacklog, memory: MemoryOwner,
                 deferred: bool, busy: dict[str, float], rank: int) -> None:
        self.tiers, self.step, self.backlog, self.memory = tiers, step, backlog, memory
        self.deferred, self.busy = deferred, busy
        self.errors: list[BaseException] = []
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self._ring: list[torch.Tensor] | None = None
        self._ring_free: list[torch.Tensor] = []
        self._ring_cv = threading.Condition()
        self._threads = torch.get_num_threads()
        self._cuda_index = None
        if memory.cuda:
            d = memory.device
            self._cuda_index = d.index if d.index is not None else torch.cuda.current_device()
        self.d2h = memory.stream("d2h")  # before the thread starts: it copies on it
        self._thread = threading.Thread(target=self._loop, name=f"tierlift-hostopt-r{rank}", daemon=True)
        self._thread.start()

    # -- requests (training thread) ------------------------------------------------------
    def land(self, i: int, grad: torch.Tensor | None, event, first: bool, last: bool, lr: float,
             step_count: int) -> None:
        self._q.put(("grad", (i, grad, event, first, last, lr, step_count)))

    def drain(self) -> None:
        self._q.put(("drain", None))

    def run_steps(self, order: list[int], lr: float, coef: float, step_count: int) -> None:
        self._q.put(("steps", (list(order), lr, coef, step_count)))

    def barrier(self) -> None:
        """Block until every request before this one ran and the NVMe writes are done."""
        ev = threading.Event()
        self._q.put(("barrier", ev))
        ev.wait()

    def raise_error(self) -> None:
        if self.errors:
            raise self.errors[0]

    def stop(self) -> None:
        self._q.put(("stop", None))
        self._thread.join(timeout=30)

    # -- the thread ----------------------------------------------------------------------
    def _loop(self) -> None:
        torch.set_num_threads(self._threads)
        if self._cuda_index is not None:  # per-thread current device: the caller's
            torch.cuda.set_device(self._cuda_index)
        nvme = self.tiers.nvme
        while True:
            op, payload = self._q.get()
            try:
                if op == "stop":
                    if nvme is not None:
                        nvme.drain()
                    return
                if op == "barrier":
                    if nvme is not None:
                        nvme.drain()
                    payload.set()
                elif op == "grad":
                    self._land_grad(*payload)
                elif op == "drain":
                    self._drain_backlog()
                elif op == "steps":
                    self.step.run(*payload)
            except BaseException as exc:  # surfaced on the training thread at its next wait
                self.errors.append(exc)
                for hc in self.tiers.chunks:
                    hc.done.set()
                if op == "barrier":
                    payload.set()

    def _land_grad(self, i: int, grad: torch.Tensor | None, event, first: bool, last: bool, lr: float,
                   step_count: int) -> None:
        """Accumulation and deferred steps: into the chunk's own fp32 buffer.  ``grad`` is
        None when the D2H copy went straight into it."""
        hc = self.tiers.chunks[i]
        t0 = time.perf_counter()
        if event is not None:
            event.synchronize()
        t1 = time.perf_counter()
        target = self.tiers.grad_buf(hc)
        if grad is not None:
            if first:
                target.copy_(grad)
            else:
                target.add_(grad.to(torch.float32))
        t2 = time.perf_counter()
        self.busy["wait_d2h"] += t1 - t0
        self.busy["grad"] += t2 - t1
        if last:  # the norm is wanted for clipping (deferred) and reported always
            # fp32 reduction (as clip_grad_norm_ does): an fp64 upcast costs ~30x more on CPU.
            hc.sumsq = float(torch.linalg.vector_norm(target)) ** 2
            self.busy["norm"] += time.perf_counter() - t2
            if not self.deferred:  # accumulated: step now (flush_grads waits for it)
                hc.enter(ChunkPhase.STEPPING)
                self.step.run([i], lr, 1.0, step_count)
                return
        hc.done.set()

    def _ring_acquire(self) -> torch.Tensor:
        """A pinned fp32 slot for a gradient that is stepped as soon as it lands.
        Blocks while every slot waits for its step: backpressure instead of memory."""
        with self._ring_cv:
            if self._ring is None:
                n = max(hc.shard_numel for hc in self.tiers.chunks)
                self._ring = [self.tiers.alloc([n * 4])[0][0].view(torch.float32) for _ in range(RING_SLOTS)]
                self._ring_free = list(self._ring)
            while not self._ring_free:
                self._ring_cv.wait()
            return self._ring_free.pop()

    def _ring_release(self, slot: torch.Tensor) -> None:
        with self._ring_cv:
            self._ring_free.append(slot)
            self._ring_cv.notify()

    def _drain_backlog(self) -> None:
        """Step every pending gradient, earliest deadline first (module doc)."""
        staged: list[tuple[PendingGrad, Guarded | None]] = []
        while True:
            while len(staged) < RING_SLOTS:
                item = self.backlog.take()
                if item is None:
                    break
                staged.append(self._stage(item))
            if not staged:
                return
            # A gradient that landed after another was staged may be due sooner (the root's
            # comes last and is needed first): step by deadline among the staged too.
            staged.sort(key=lambda s: self.backlog.deadline(s[0].index))
            item, slot = staged.pop(0)
            t0 = time.perf_counter()
            if slot is not None:
                slot.wait()
            self.busy["wait_d2h"] += time.perf_counter() - t0
            n = self.tiers.chunks[item.index].shard_numel
            if slot is None:  # a host fp32 gradient steps where it is; its bytes stay counted until done
                target = item.grad
            else:
                target = slot.tensor
                self.backlog.release(item)  # copied out: the device memory may go
            try:
                self.step.run([item.index], item.lr, 1.0, item.step_count, grad=target[:n])
            finally:
                if slot is not None:
                    self._ring_release(slot.tensor)
                else:
                    self.backlog.release(item)

    def _stage(self, item: PendingGrad) -> tuple[PendingGrad, Guarded | None]:
        """Start moving ``item``'s gradient into a ring slot: the slot, guarded by its copy's
        event (None: a host fp32 gradient that steps where it is)."""
        g = item.grad
        self.step.read_ahead(item.index)  # NVMe: read(i+1) overlaps step(i)
        if g.device.type != "cuda":
            if g.dtype == torch.float32:
                return item, None
            slot = self._ring_acquire()
            t0 = time.perf_counter()
            slot[:g.numel()].copy_(g)
            self.busy["grad"] += time.perf_counter() - t0
            return item, Guarded(slot)
        slot = self._ring_acquire()
        with torch.cuda.stream(self.d2h):
            self.d2h.wait_event(item.ready)
            if g.dtype == torch.float32:
                slot[:g.numel()].copy_(g, non_blocking=True)
            else:  # the ring is fp32: widen on the device (a transient the size of the shard)
                slot[:g.numel()].copy_(g.to(torch.float32), non_blocking=True)
            event = self.memory.record(self.d2h)
        return item, Guarded(slot, event)
