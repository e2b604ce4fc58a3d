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

Sync points: a device gradient travels with a CUDA event recorded after it was
produced (immediate) or after its D2H copy (deferred, accumulation); the worker
waits on it before touching the host buffer.  ``wait_chunk(i)`` blocks the caller
until chunk i's step is done; the engine calls it before it copies the chunk's
parameters to the GPU.
"""

from __future__ import annotations

import dataclasses
import enum
import os
import queue
import threading
import time
from dataclasses import dataclass

import torch

from tierlift.layout import Chunk
from tierlift.offload.backlog import GradBacklog, PendingGrad
from tierlift.offload.execplan import nvme_piece_numel, optimizer_tiers_for
from tierlift.offload.nvme import aligned_empty
from tierlift.offload.nvme_state import NVMeStateStore, Staged
from tierlift.offload.optimizer_state import HostStateMixin, Tier
from tierlift.offload.pinned import PinnedPool
from tierlift.offload.policy import NVMeOffload, OffloadConfig
from tierlift.offload.scratch import release_at_exit
from tierlift.offload.shard_optim import OptimizerConfig, ShardOptimizer

__all__ = ["OffloadedOptimizer", "Tier"]

# Pinned gradient slots for immediate steps: two let the next chunk's D2H land while the
# worker steps this one; more would only hold host memory (waiting gradients stay on
# the device, in the backlog).
_RING_SLOTS = 2


class _ChunkPhase(enum.Enum):
    IDLE = "idle"          # state at rest in its tier, parameters current
    GRAD = "grad"          # gradient of this step landing / landed
    STEPPING = "stepping"  # queued or running in the worker
    # back to IDLE when the step and the compute-dtype copy are done


@dataclass
class _HostChunk:
    index: int
    tier: Tier
    shard_numel: int
    grad: torch.Tensor | None    # fp32, host; allocated on first need
    param16: torch.Tensor | None  # compute dtype, host (NVMe tier only): what goes back to the GPU
    master: torch.Tensor | None  # fp32 host (None when on NVMe)
    states: dict[str, torch.Tensor]
    done: threading.Event
    phase: _ChunkPhase = _ChunkPhase.IDLE
    sumsq: float = 0.0
    release_state: object = None  # gives the master/moments allocation back (host tier)


class OffloadedOptimizer(HostStateMixin):
    """Host/NVMe-resident shard optimizer driven by a worker thread."""

    def __init__(self, chunks: list[Chunk], rank: int, masters: list[torch.Tensor], optim: OptimizerConfig,
                 offload: OffloadConfig, compute_dtype: torch.dtype, device: torch.device,
                 deferred: bool, placement: tuple[str, ...] | None = None) -> None:
        """``placement``: "host" or "nvme" per chunk, from the engine's ExecutionPlan
        (offload/execplan.py); None: the placement rule over the config's max_in_cpu."""
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
        self._pslots: list[list] = []  # [slot tensor, event guarding its last copy-out]
        self.pool = None
        self.nvme = None
        self.policy_buffer_count = max(2, getattr(policy, "buffer_count", 2))
        self._ring, self._ring_free, self._ring_cv = None, [], threading.Condition()
        self._early_reads: dict[tuple[int, int], Staged] = {}  # (chunk, piece lo) -> reads issued at staging
        pin = device.type == "cuda" and getattr(policy, "pin_memory", True)
        if placement is None:
            placement = optimizer_tiers_for(policy.KIND, [c.shard_numel for c in chunks],
                                            getattr(policy, "max_in_cpu", 0))
        tiers = [Tier(t) for t in placement]
        if len(tiers) != len(chunks) or (Tier.NVME in tiers and not isinstance(policy, NVMeOffload)):
            raise ValueError(f"placement {placement} does not fit {len(chunks)} chunks under {policy}")
        host_bytes = sum(self._host_bytes(c, t) for c, t in zip(chunks, tiers))
        if pin:
            self.pool = PinnedPool(offload.host_budget_bytes, device=device)
        self.chunks: list[_HostChunk] = []
        for j, (c, tier) in enumerate(zip(chunks, tiers)):
            n, m = c.shard_numel, masters[j]
            # grad: allocated on first need (accumulation or deferred steps); an
            # immediate step reads its gradient straight from a ring slot instead.
            hc = _HostChunk(c.index, tier, n, None, None, None, {}, threading.Event())
            if tier is Tier.NVME and not self.params_on_nvme:
                self._alloc_param16(hc)
                hc.param16.copy_(m)
            hc.done.set()
            if tier is Tier.HOST:
                self._alloc_state(hc)
                hc.master.copy_(m)
                masters[j] = None  # the caller's fp32 copy goes now, not after every chunk is in
            self.chunks.append(hc)
        self.segments = [c.segments(rank) for c in chunks]
        self.host_bytes = host_bytes
        if isinstance(policy, NVMeOffload):  # extents for every chunk, so any chunk can move later
            self._open_nvme(chunks, masters, rank)
        self.step_count = 0
        self._lr = 0.0
        self._errors: list[BaseException] = []
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self.backlog = GradBacklog(offload.grad_backlog_bytes)
        self._sumsq_dev: dict[int, torch.Tensor] = {}  # chunk -> squared norm, reduced on its device
        self._host_path = False  # a gradient of this step went through the worker's landing path
        # OpenMP thread counts are per OS thread: the worker must ask for the
        # caller's count itself (under Ray, OMP_NUM_THREADS=1 would leave it serial).
        self._threads = torch.get_num_threads()
        self._cuda_index = None
        if device.type == "cuda":
            self._cuda_index = device.index if device.index is not None else torch.cuda.current_device()
        self.busy = {"wait_d2h": 0.0, "grad": 0.0, "norm": 0.0, "step": 0.0, "cast": 0.0}
        if device.type == "cuda":  # before the worker starts: it uses the stream
            self._d2h = torch.cuda.Stream(device)
        self._worker = threading.Thread(target=self._loop, name=f"tierlift-hostopt-r{rank}", daemon=True)
        self._worker.start()

    # -- host memory -------------------------------------------------------------
    def _host_bytes(self, c: Chunk, tier: Tier) -> int:
        n = c.shard_numel
        if tier is Tier.HOST:
            return n * 4 * (1 + len(self.kinds))
        return 0 if self.params_on_nvme else n * self.compute_dtype.itemsize

    def _alloc(self, sizes: list[int]):
        """Byte buffers of ``sizes`` in one allocation, 4 KiB aligned (O_DIRECT straight
        into them), and the callable that gives that allocation back."""
        if self.pool is not None:
            regions = self.pool.carve(sizes)
            slab = regions[0].slab

            def release() -> None:
                for r in regions:
                    r.free()
                slab.release()
            return [r.view(torch.uint8) for r in regions], release
        return [aligned_empty(s) for s in sizes], lambda: None  # pageable: freed with the last reference

    def _alloc_state(self, hc: _HostChunk) -> None:
        """Host buffers for a chunk's fp32 master and moments (zeroed), in their own slab
        so that moving the chunk to NVMe gives the memory back."""
        bufs, hc.release_state = self._alloc([hc.shard_numel * 4] * (1 + len(self.kinds)))
        hc.master = bufs[0].view(torch.float32)
        hc.states = {k: b.view(torch.float32).zero_() for k, b in zip(self.kinds, bufs[1:])}

    def _alloc_param16(self, hc: _HostChunk) -> None:
        (buf,), _ = self._alloc([hc.shard_numel * self.compute_dtype.itemsize])
        hc.param16 = buf.view(self.compute_dtype)

    def _grad_buf(self, hc: _HostChunk) -> torch.Tensor:
        """The chunk's own fp32 gradient buffer (accumulation, deferred steps)."""
        if hc.grad is None:
            (buf,), _ = self._alloc([hc.shard_numel * 4])
            hc.grad = buf.view(torch.float32).zero_()
        return hc.grad

    def _ring_acquire(self) -> torch.Tensor:
        """A pinned fp32 slot for a gradient that is stepped as soon as it lands.
        Blocks while every slot waits for its step: backpressure instead of memory."""
        with self._ring_cv:
            if self._ring is None:
                n = max(hc.shard_numel for hc in self.chunks)
                self._ring = [self._alloc([n * 4])[0][0].view(torch.float32) for _ in range(_RING_SLOTS)]
                self._ring_free = list(self._ring)
            while not self._ring_free:
                self._ring_cv.wait()
            return self._ring_free.pop()

    def _ring_release(self, slot: torch.Tensor) -> None:
        with self._ring_cv:
            self._ring_free.append(slot)
            self._ring_cv.notify()

    def _open_nvme(self, chunks, masters, rank) -> None:
        piece = nvme_piece_numel(self.policy.buffer_size, self.params_on_nvme, self.compute_dtype.itemsize)
        fresh_dir = not os.path.isdir(self.policy.path)
        self.nvme = NVMeStateStore(self.policy.path, rank, [c.shard_numel for c in chunks], ("master",) + self.kinds,
                                   self.policy.aio, self._alloc, self.policy_buffer_count, piece,
                                   setting="offload.optimizer.path", verify=self.policy.verify,
                                   param_dtype=self.compute_dtype if self.params_on_nvme else None)
        release_at_exit(self.nvme.file, keep=self.policy.keep_files, created_dir=fresh_dir,
                        setting="offload.optimizer.path", close=self.close)
        self._ensure_staging()
        # Initial state of NVMe-tier chunks: master from the model, zero moments, a piece
        # at a time through one staging set.
        for j, (hc, m) in enumerate(zip(self.chunks, masters)):
            if hc.tier is not Tier.NVME:
                continue
            for lo, hi in self.nvme.pieces[hc.index]:
                staged = self.nvme.fresh(hc.index, lo, hi)
                staged.views[0].copy_(m[lo:hi])
                for v in staged.views[1:]:
                    v.zero_()
                if staged.param_view is not None:
                    staged.param_view.copy_(m[lo:hi])
                self.nvme.start_write(staged)
            masters[j] = None
        self.nvme.drain()

    # -- gradients arrive ----------------------------------------------------------
    def accept_grad(self, index: int, shard_grad: torch.Tensor, first_micro: bool, last_micro: bool) -> None:
        """Hand chunk ``index``'s averaged gradient shard (device, any float dtype) to the host.
        Returns at once; on GPU the copy runs on the D2H stream, guarded by an event."""
        hc = self.chunks[index]
        if first_micro:
            hc.done.wait()  # this chunk's previous step must be done before its grad buffer is reused
            self._raise()
            hc.phase = _ChunkPhase.GRAD
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
                dst = self._grad_buf(hc)
            else:
                dst = torch.empty(shard_grad.shape, dtype=shard_grad.dtype, pin_memory=True)
            stream = self._d2h
            stream.wait_stream(torch.cuda.current_stream(shard_grad.device))
            with torch.cuda.stream(stream):
                dst.copy_(shard_grad, non_blocking=True)
                event = torch.cuda.Event()
                event.record(stream)
            shard_grad.record_stream(stream)
            shard_grad = None if direct else dst
        hc.done.clear()
        self._q.put(("grad", (index, shard_grad, event, first_micro, last_micro)))

    def _accept_immediate(self, hc: _HostChunk, grad: torch.Tensor) -> None:
        """The chunk's final gradient of this step: its squared norm is reduced where
        it lives (fp32, as clip_grad_norm_ does), and it waits in the backlog."""
        self._sumsq_dev[hc.index] = torch.linalg.vector_norm(grad, dtype=torch.float32).square()
        ready = None
        if grad.device.type == "cuda":
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(grad.device))
        hc.done.clear()
        hc.phase = _ChunkPhase.STEPPING
        self.backlog.put(PendingGrad(hc.index, grad, ready, self._lr, self.step_count))
        self._q.put(("drain", None))

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
            ev = threading.Event()
            self._q.put(("barrier", ev))
            ev.wait()
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
            self.chunks[i].phase = _ChunkPhase.STEPPING
            self.chunks[i].done.clear()
        # The step count travels with the request: finish_step() bumps it before the worker runs.
        self._q.put(("steps", (list(order), lr, coef, self.step_count)))

    def skip_step(self) -> None:
        """fp16 overflow: drop this step's gradients on every chunk."""
        for hc in self.chunks:
            if hc.grad is not None:
                hc.grad.zero_()
            hc.sumsq = 0.0
            hc.phase = _ChunkPhase.IDLE

    def wait_chunk(self, index: int) -> torch.Tensor:
        """Block until chunk ``index`` stepped; its parameters on the host: the fp32
        master (host tier) or a compute-dtype copy (NVMe tier).  The caller casts."""
        hc = self.chunks[index]
        hc.done.wait()
        self._raise()
        if hc.tier is Tier.HOST:
            return hc.master
        if hc.param16 is not None:
            return hc.param16
        return self._read_params(hc)

    def is_stepped(self, index: int) -> bool:
        """Chunk ``index`` has no step queued or running (``wait_chunk`` would not block)."""
        return self.chunks[index].done.is_set()

    def wait_all(self) -> None:
        for hc in self.chunks:
            hc.done.wait()
        self._raise()

    def _raise(self) -> None:
        if self._errors:
            raise self._errors[0]

    # -- the worker -----------------------------------------------------------------
    def _loop(self) -> None:
        torch.set_num_threads(self._threads)
        if self._cuda_index is not None:  # per-thread current device: the caller's
            torch.cuda.set_device(self._cuda_index)
        while True:
            op, payload = self._q.get()
            try:
                if op == "stop":
                    if self.nvme is not None:
                        self.nvme.drain()
                    return
                if op == "barrier":
                    if self.nvme is not None:
                        self.nvme.drain()
                    payload.set()
                elif op == "grad":
                    self._land_grad(*payload)
                elif op == "drain":
                    self._drain_backlog()
                elif op == "steps":
                    self._run_steps(*payload)
            except BaseException as exc:  # surfaced on the training thread at its next wait
                self._errors.append(exc)
                for hc in self.chunks:
                    hc.done.set()
                if op == "barrier":
                    payload.set()

    def _land_grad(self, i: int, grad: torch.Tensor | None, event, first: bool, last: bool) -> None:
        """Accumulation and deferred steps: into the chunk's own fp32 buffer.  ``grad`` is
        None when the D2H copy went straight into it."""
        hc = self.chunks[i]
        t0 = time.perf_counter()
        if event is not None:
            event.synchronize()
        t1 = time.perf_counter()
        target = self._grad_buf(hc)
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
                hc.phase = _ChunkPhase.STEPPING
                self._run_steps([i], self._lr, 1.0, self.step_count)
                return
        hc.done.set()

    def _drain_backlog(self) -> None:
        """Step every pending gradient, earliest deadline first.  Device gradients are
        copied into the pinned ring one chunk ahead of the step (the D2H of the next
        overlaps this step); a gradient is released once its copy completed."""
        staged: list[tuple[PendingGrad, torch.Tensor, object]] = []
        while True:
            while len(staged) < _RING_SLOTS:
                item = self.backlog.take()
                if item is None:
                    break
                staged.append(self._stage(item))
            if not staged:
                return
            # A gradient that landed after another was staged may be due sooner (the root's
            # comes last and is needed first): step by deadline among the staged too.
            staged.sort(key=lambda s: self.backlog.deadline(s[0].index))
            item, target, event = staged.pop(0)
            t0 = time.perf_counter()
            if event is not None:
                event.synchronize()
            self.busy["wait_d2h"] += time.perf_counter() - t0
            slot, n = target, self.chunks[item.index].shard_numel
            if slot is None:  # a host fp32 gradient steps where it is; its bytes stay counted until done
                target = item.grad
            else:
                self.backlog.release(item)  # copied out: the device memory may go
            try:
                self._run_steps([item.index], item.lr, 1.0, item.step_count, grad=target[:n])
            finally:
                if slot is not None:
                    self._ring_release(slot)
                else:
                    self.backlog.release(item)

    def _stage(self, item: PendingGrad):
        """Start moving ``item``'s gradient into a ring slot: (item, slot or None, event or None)."""
        g = item.grad
        self._read_ahead(item.index)  # NVMe: read(i+1) overlaps step(i)
        if g.device.type != "cuda":
            if g.dtype == torch.float32:
                return item, None, None
            slot = self._ring_acquire()
            t0 = time.perf_counter()
            slot[:g.numel()].copy_(g)
            self.busy["grad"] += time.perf_counter() - t0
            return item, slot, None
        slot = self._ring_acquire()
        with torch.cuda.stream(self._d2h):
            self._d2h.wait_event(item.ready)
            if g.dtype == torch.float32:
                slot[:g.numel()].copy_(g, non_blocking=True)
            else:  # the ring is fp32: widen on the device (a transient the size of the shard)
                slot[:g.numel()].copy_(g.to(torch.float32), non_blocking=True)
            event = torch.cuda.Event()
            event.record(self._d2h)
        return item, slot, event

    def _read_ahead(self, i: int) -> None:
        """Start reading the first piece of NVMe-tier chunk ``i`` (if a set is free)."""
        hc = self.chunks[i]
        if hc.tier is Tier.NVME and self.nvme.free_sets:
            lo, hi = self.nvme.pieces[i][0]
            if (i, lo) not in self._early_reads:
                self._early_reads[(i, lo)] = self.nvme.start_read(i, lo, hi)

    def _piece_segments(self, i: int, lo: int, hi: int):
        """Chunk ``i``'s shard segments clipped to ``[lo, hi)`` and rebased to ``lo``."""
        if lo == 0 and hi >= self.chunks[i].shard_numel:
            return self.segments[i]
        out = []
        for sg in self.segments[i]:
            a, b = max(sg.shard_lo, lo), min(sg.shard_hi, hi)
            if a < b:
                out.append(dataclasses.replace(sg, shard_lo=a - lo, shard_hi=b - lo,
                                               param_lo=sg.param_lo + a - sg.shard_lo,
                                               param_hi=sg.param_lo + b - sg.shard_lo))
        return out

    @torch.no_grad()
    def _run_steps(self, order: list[int], lr: float, coef: float, step_count: int,
                   grad: torch.Tensor | None = None) -> None:
        """Step ``order``'s chunks; ``grad``: the (single) chunk's gradient when it is not
        the chunk's own buffer (a ring slot).  Host-tier chunks step whole; NVMe-tier
        chunks piece by piece, reads running ``buffer_count - 1`` pieces ahead and
        writes behind (see nvme_state.py)."""
        work = []  # (chunk, lo, hi, last piece of the chunk)
        for i in order:
            hc = self.chunks[i]
            pieces = self.nvme.pieces[i] if hc.tier is Tier.NVME else [(0, hc.shard_numel)]
            work += [(i, lo, hi, k == len(pieces) - 1) for k, (lo, hi) in enumerate(pieces)]
        disk = [(i, lo, hi) for i, lo, hi, _ in work if self.chunks[i].tier is Tier.NVME]
        pos = {w: n for n, w in enumerate(disk)}
        reads: dict[tuple[int, int], object] = {}
        lookahead = max(1, self.policy_buffer_count - 1)
        for i, lo, hi, last in work:
            hc = self.chunks[i]
            if hc.tier is Tier.NVME:
                n = pos[(i, lo, hi)]
                for j, jlo, jhi in disk[n:n + lookahead]:
                    if (j, jlo) not in reads:
                        reads[(j, jlo)] = self._early_reads.pop((j, jlo), None) or self.nvme.start_read(j, jlo, jhi)
                staged = reads.pop((i, lo))
                views = self.nvme.wait_read(staged)
                master, states = views[0], dict(zip(self.kinds, views[1:]))
            else:
                master, states = hc.master, hc.states
            g = (grad if grad is not None else self._grad_buf(hc))[lo:hi]
            if coef != 1.0:
                g.mul_(coef)
            t0 = time.perf_counter()
            ShardOptimizer(self.optim_cfg, [master], [g], [self._piece_segments(i, lo, hi)], states=[states],
                           step_count=step_count).step(lr)
            t1 = time.perf_counter()
            if hc.param16 is not None:
                hc.param16[lo:hi].copy_(master)
            elif hc.tier is Tier.NVME and staged.param_view is not None:
                staged.param_view.copy_(master)  # written with the state below
            self.busy["step"] += t1 - t0
            self.busy["cast"] += time.perf_counter() - t1
            if grad is None:
                g.zero_()
            if hc.tier is Tier.NVME:
                self.nvme.start_write(staged)
            if last:
                hc.phase = _ChunkPhase.IDLE
                hc.done.set()

    def begin_step(self, lr: float) -> None:
        """The learning rate of the step whose gradients are about to arrive (immediate mode)."""
        self._lr = lr

    def finish_step(self) -> None:
        self.step_count += 1

    def close(self) -> None:
        self._q.put(("stop", None))
        self._worker.join(timeout=30)
        if self.nvme is not None:
            self.nvme.close()
        for hc in self.chunks:
            if hc.release_state is not None:
                hc.release_state()
        if self.pool is not None:
            self.pool.close()

    def timings(self) -> dict[str, float]:
        """Cumulative seconds per worker phase, plus the seconds backward blocked on a
        full gradient backlog (``backlog_blocked``) and its peak size in GiB; with NVMe,
        GiB the disk read and wrote and its busy seconds."""
        out = {**self.busy, "backlog_blocked": self.backlog.blocked_s,
               "backlog_peak_gib": self.backlog.peak_bytes / 2 ** 30,
               "nvme_read": self.nvme.read_wait_s if self.nvme is not None else 0.0}
        if self.nvme is not None:  # what the disk moved, and how long it had work
            st = self.nvme.file.stats()
            out.update(nvme_read_gib=st.bytes_read / 2 ** 30, nvme_written_gib=st.bytes_written / 2 ** 30,
                       nvme_busy=st.busy_s)
        return out

    @property
    def pinned_bytes(self) -> int:
        return self.pool.stats().pinned_bytes if self.pool is not None else 0
