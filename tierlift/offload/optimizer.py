"""The offloaded optimizer: fp32 master, gradient and AdamW/SGD state of every chunk
live in host memory (pinned slabs) or on NVMe, and each chunk steps on the CPU as
soon as its gradient shard reaches the host.

Two modes, both exact:

- **immediate** (no clipping, no fp16 overflow check): a chunk's final gradient
  waits on the device in a bounded backlog (``backlog.py``); the worker copies it
  to a pinned ring slot and steps it, earliest next-forward deadline first, so the
  steps overlap the rest of backward *and* the next forward (DeepSpeed serialises
  the optimizer after backward).  ``step`` does not wait for them: the norm is
  reduced on the device, and each gather waits only for its own chunk.
- **deferred** (``grad_clip > 0`` or fp16): the global norm needs every gradient
  first; the worker keeps each chunk's squared norm as it lands, ``step`` does one
  all-reduce, then steps chunks in the *next forward's* order, so the step of chunk
  i overlaps the forward of the units before it.  Exactness comes for free: no
  rollback, no second backward.

NVMe-resident chunks pipeline read(i+1) / step(i) / write(i-1): reads are issued
when a chunk is queued, at most ``buffer_count`` chunks hold staging buffers, and
writes complete in the background (the chunk's next read waits for them).

Host-tier chunks keep no compute-dtype copy: the engine copies the fp32 master to
the device and casts there (PCIe has room; host memory and CPU bandwidth do not).
NVMe-tier chunks keep a compute-dtype host copy, written after each step.

Composition (no mixins): this facade holds the training thread's side of the protocol
and wires the tiers (``optimizer_state.StateTiers``: where each chunk's state lives, host
slabs and the NVMe store, parameter slots), the step (``host_step.HostStep``) and the
worker thread (``host_worker.HostWorker``) to the engine's ``MemoryOwner`` (``memory.py``:
streams, events, the pinned pool).

Sync points: a device gradient travels with a CUDA event recorded after it was
produced (immediate) or after its D2H copy (deferred, accumulation); the worker
waits on it before touching the host buffer.  ``wait_chunk(i)`` blocks the caller
until chunk i's step is done; the engine calls it before it copies the chunk's
parameters to the GPU.
"""

from __future__ import annotations

import torch

from tierlift.layout import Chunk
from tierlift.offload.backlog import GradBacklog, PendingGrad
from tierlift.offload.execplan import optimizer_tiers_for
from tierlift.offload.host_step import HostStep
from tierlift.offload.host_worker import HostWorker
from tierlift.offload.memory import MemoryOwner
from tierlift.offload.nvme_state import NVMeStateStore
from tierlift.offload.optimizer_state import ChunkPhase, HostChunk, StateTiers, Tier
from tierlift.offload.policy import NVMeOffload, OffloadConfig
from tierlift.offload.shard_optim import OptimizerConfig

__all__ = ["OffloadedOptimizer", "Tier"]


class OffloadedOptimizer:
    """Host/NVMe-resident shard optimizer: the tiers (``optimizer_state.StateTiers``), the
    step (``host_step.HostStep``) and the worker thread (``host_worker.HostWorker``), wired
    to the engine's ``MemoryOwner``.  The training thread's side of the protocol lives here."""

    def __init__(self, chunks: list[Chunk], rank: int, masters: list[torch.Tensor], optim: OptimizerConfig,
                 offload: OffloadConfig, compute_dtype: torch.dtype, device: torch.device,
                 deferred: bool, placement: tuple[str, ...] | None = None,
                 memory: MemoryOwner | None = None) -> None:
        """``placement``: "host" or "nvme" per chunk, from the engine's ExecutionPlan
        (offload/execplan.py); None: the placement rule over the config's max_in_cpu.
        ``memory``: the engine's memory owner (streams, pinned pool); None: one of its own,
        closed with this optimizer."""
        self.optim_cfg = optim
        self.kinds = ("exp_avg", "exp_avg_sq") if optim.name == "adamw" else ("momentum",)
        self.device = device
        self.deferred = deferred
        self.compute_dtype = compute_dtype
        policy = offload.optimizer
        self.policy = policy
        # Compute-dtype parameters of NVMe-tier chunks on NVMe too (offload.param: nvme):
        # written with the state after each step, read into a pinned slot for each gather.
        self.params_on_nvme = isinstance(offload.param, NVMeOffload)
        self._own_memory = memory is None
        self.memory = memory or MemoryOwner(device, offload.host_budget_bytes)
        pin = device.type == "cuda" and getattr(policy, "pin_memory", True)
        if placement is None:
            placement = optimizer_tiers_for(policy.KIND, [c.shard_numel for c in chunks],
                                            getattr(policy, "max_in_cpu", 0))
        tiers = [Tier(t) for t in placement]
        if len(tiers) != len(chunks) or (Tier.NVME in tiers and not isinstance(policy, NVMeOffload)):
            raise ValueError(f"placement {placement} does not fit {len(chunks)} chunks under {policy}")
        self.worker: HostWorker | None = None
        self.tiers = StateTiers(chunks, rank, masters, self.kinds, tiers, compute_dtype, policy,
                                self.params_on_nvme, self.memory, pin, quiesce=self.wait_all, on_exit=self.close)
        self.step_count = 0
        self._lr = 0.0
        self.backlog = GradBacklog(offload.grad_backlog_bytes)
        self._sumsq_dev: dict[int, torch.Tensor] = {}  # chunk -> squared norm, reduced on its device
        self._host_path = False  # a gradient of this step went through the worker's landing path
        self.busy = {"wait_d2h": 0.0, "grad": 0.0, "norm": 0.0, "step": 0.0, "cast": 0.0}
        self.stepper = HostStep(self.tiers, optim, self.busy)
        self.worker = HostWorker(self.tiers, self.stepper, self.backlog, self.memory, deferred, self.busy, rank)

    # -- what the tiers hold (read-only views for the engine, checkpoints, tests) ---------
    @property
    def chunks(self) -> list[HostChunk]:
        return self.tiers.chunks

    @property
    def nvme(self) -> NVMeStateStore | None:
        return self.tiers.nvme

    @property
    def segments(self):
        return self.tiers.segments

    @property
    def host_bytes(self) -> int:
        """Host bytes the placement keeps at construction (masters, moments, compute-dtype copies)."""
        return self.tiers.host_bytes

    @property
    def host_state_bytes(self) -> int:
        return self.tiers.host_state_bytes

    def placement(self) -> tuple[tuple[str, str], ...]:
        return self.tiers.placement()

    def move_to_nvme(self, indices: list[int]) -> list[int]:
        """Host-tier chunks ``indices`` to NVMe, at a step boundary (``StateTiers.move_to_nvme``)."""
        return self.tiers.move_to_nvme(indices)

    def chunk_state(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.tiers.chunk_state(index)

    def streamed_state(self, index: int, lo: int, hi: int) -> dict[str, object]:
        return self.tiers.streamed_state(index, lo, hi)

    def finish_streamed(self, changed: list[int]) -> None:
        self.tiers.finish_streamed(changed)

    def commit_chunk_state(self, index: int, master: torch.Tensor, states: dict[str, torch.Tensor]) -> None:
        self.tiers.commit_chunk_state(index, master, states)

    # -- gradients arrive ----------------------------------------------------------
    def accept_grad(self, index: int, shard_grad: torch.Tensor, first_micro: bool, last_micro: bool) -> None:
        """Hand chunk ``index``'s averaged gradient shard (device, any float dtype) to the host.
        Returns at once; on GPU the copy runs on the D2H stream, guarded by an event."""
        hc = self.chunks[index]
        if first_micro:
            hc.done.wait()  # this chunk's previous step must be done before its grad buffer is reused
            self._raise()
            hc.enter(ChunkPhase.GRAD)
        if first_micro and last_micro and not self.deferred:
            self._accept_immediate(hc, shard_grad)
            return
        self._host_path = True
        event = None
        if shard_grad.device.type == "cuda":
            # D2H straight into the chunk's pinned fp32 buffer on the first micro-batch;
            # later ones (or a non-fp32 reduce dtype) land in a staging buffer the
            # worker converts/adds.  The device buffer outlives the copy.
            direct = first_micro and shard_grad.dtype == torch.float32
            if direct:
                dst = self.tiers.grad_buf(hc)
            else:
                dst = torch.empty(shard_grad.shape, dtype=shard_grad.dtype, pin_memory=True)
            stream = self.worker.d2h
            stream.wait_stream(torch.cuda.current_stream(shard_grad.device))
            with torch.cuda.stream(stream):
                dst.copy_(shard_grad, non_blocking=True)
                event = self.memory.record(stream)
            shard_grad.record_stream(stream)
            shard_grad = None if direct else dst
        hc.done.clear()
        self.worker.land(index, shard_grad, event, first_micro, last_micro, self._lr, self.step_count)

    def _accept_immediate(self, hc: HostChunk, grad: torch.Tensor) -> None:
        """The chunk's final gradient of this step: its squared norm is reduced where
        it lives (fp32, as clip_grad_norm_ does), and it waits in the backlog."""
        self._sumsq_dev[hc.index] = torch.linalg.vector_norm(grad, dtype=torch.float32).square()
        ready = None
        if grad.device.type == "cuda":
            ready = self.memory.record(torch.cuda.current_stream(grad.device))
        hc.done.clear()
        hc.enter(ChunkPhase.STEPPING)
        self.backlog.put(PendingGrad(hc.index, grad, ready, self._lr, self.step_count))
        self.worker.drain()

    def set_step_order(self, order: list[int]) -> None:
        """Chunk indices in the order the next forward gathers them: pending gradients
        step in this order."""
        self.backlog.set_deadlines(order)

    # -- the step ----------------------------------------------------------------
    def flush_grads(self) -> list[float]:
        """Per-chunk squared norms of this step's gradients.  Waits for the worker only
        where it landed gradients itself (deferred steps, accumulation); immediate
        steps go on in the background, each gather waiting for its own chunk."""
        if self._host_path:
            self.worker.barrier()
            self._host_path = False
        self._raise()
        if self._sumsq_dev:
            idx = sorted(self._sumsq_dev)
            vals = torch.stack([self._sumsq_dev[i] for i in idx]).tolist()  # sync point: the step's norms
            for i, v in zip(idx, vals):
                self.chunks[i].sumsq = float(v)
            self._sumsq_dev.clear()
        return [hc.sumsq for hc in self.chunks]

    def step_deferred(self, lr: float, coef: float, order: list[int]) -> None:
        """Queue every chunk's step in ``order`` (the next forward's), gradients scaled by ``coef``."""
        for i in order:
            self.chunks[i].enter(ChunkPhase.STEPPING)
            self.chunks[i].done.clear()
        # The step count travels with the request: finish_step() bumps it before the worker runs.
        self.worker.run_steps(order, lr, coef, self.step_count)

    def skip_step(self) -> None:
        """fp16 overflow: drop this step's gradients on every chunk."""
        for hc in self.chunks:
            if hc.grad is not None:
                hc.grad.zero_()
            hc.sumsq = 0.0
            if hc.phase is ChunkPhase.GRAD:
                hc.enter(ChunkPhase.IDLE)

    def wait_chunk(self, index: int) -> torch.Tensor:
        """Block until chunk ``index`` stepped; its parameters on the host: the fp32
        master (host tier) or a compute-dtype copy (NVMe tier).  The caller casts."""
        hc = self.chunks[index]
        hc.done.wait()
        self._raise()
        return self.tiers.params(hc)

    def is_stepped(self, index: int) -> bool:
        """Chunk ``index`` has no step queued or running (``wait_chunk`` would not block)."""
        return self.chunks[index].done.is_set()

    def wait_all(self) -> None:
        for hc in self.chunks:
            hc.done.wait()
        self._raise()

    def _raise(self) -> None:
        if self.worker is not None:
            self.worker.raise_error()

    # -- parameters read from NVMe (offload.param: nvme) ---------------------------------
    def prefetch_source(self, index: int) -> None:
        """Start reading chunk ``index``'s parameters from NVMe into a free pinned slot, without
        waiting, when it has stepped (so the file orders the read after the step's write)
        and a slot is free; ``wait_chunk`` then only waits for the read."""
        if self.tiers.reads_params_from_nvme(index) and self.is_stepped(index):
            self.tiers.prefetch_params(index)

    def drop_prefetched(self) -> None:
        """Give back slots read ahead for chunks no gather used (a path not taken):
        their contents go stale at the chunk's next step."""
        if self.tiers.slots is not None:
            self.tiers.slots.drop_prefetched()

    def release_source(self, index: int, event=None) -> None:
        """The caller has enqueued its copy out of ``wait_chunk(index)``'s tensor; ``event``
        (CUDA) completes when that copy has.  Only parameters read from NVMe hold a slot."""
        if self.tiers.slots is not None:
            self.tiers.slots.release(index, event)

    def begin_step(self, lr: float) -> None:
        """The learning rate of the step whose gradients are about to arrive (immediate mode)."""
        self._lr = lr

    def finish_step(self) -> None:
        self.step_count += 1

    def close(self) -> None:
        if self.worker is not None:
            self.worker.stop()
        self.tiers.close()
        if self._own_memory:
            self.memory.close()

    def timings(self) -> dict[str, float]:
        """Cumulative seconds per worker phase, plus the seconds backward blocked on a
        full gradient backlog (``backlog_blocked``) and its peak size in GiB; with NVMe,
        GiB the disk read and wrote and its busy seconds."""
        nvme = self.nvme
        out = {**self.busy, "backlog_blocked": self.backlog.blocked_s,
               "backlog_peak_gib": self.backlog.peak_bytes / 2 ** 30,
               "nvme_read": nvme.read_wait_s if nvme is not None else 0.0}
        if nvme is not None:  # what the disk moved, and how long it had work
            st = nvme.file.stats()
            out.update(nvme_read_gib=st.bytes_read / 2 ** 30, nvme_written_gib=st.bytes_written / 2 ** 30,
                       nvme_busy=st.busy_s)
        return out

    @property
    def pinned_bytes(self) -> int:
        """Page-locked bytes of the memory owner's pool (every user of it)."""
        return self.memory.pinned_bytes
