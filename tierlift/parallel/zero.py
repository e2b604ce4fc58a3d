"""The chunked ZeRO engine, stages 1–3.

Every wrap unit's parameters live in one flat chunk (see ``tierlift/layout.py``).  Each rank
owns a shard of every chunk: the fp32 master, its gradient and the optimizer state.
Parameters of the model are views into a per-chunk *gathered* buffer in the compute
dtype, bound once at setup (``param.data = view``).  Stage 3 frees that buffer's
storage after a unit's forward (``untyped_storage().resize_(0)``) and refills it
with an all-gather before the unit runs again; because the storage object is kept,
every view autograd saved stays valid, so arbitrary models work unchanged.

The engine is a thin coordinator of parts it builds in ``__init__`` (FSDP2's
FSDPParam / FSDPParamGroup / FSDPState, in chunks): ``RuntimeChunk``s and their
residency state machine (``chunks.py``), the ``Gatherer`` that moves them
(``gather.py``), ``Group``s that unshard / reshard their chunks (``group.py``),
``UnitHooks`` that drive them from module hooks (``hooks.py``), the ``GradReducer``
(``reduce.py``), the ``OptimizerStep`` (``step.py``), ``EngineState`` for checkpoints
(``zero_state.py``) and ``FullModel`` for the model outside training (``unshard.py``).

Sync points (GPU): reduce-scatters are issued async from the compute stream and
waited for at most two behind (``reduce.py``); gathers and their streams are
described in ``gather.py``; the step's host sync in ``step.py``.  Streams, events,
the pinned pool and the GPU arena belong to the memory owner (``offload/memory.py``).
On CPU (gloo) the same code runs with gloo's background threads.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging

import torch
import torch.distributed as dist
import torch.nn as nn

from tierlift.layout import ChunkLayout, plan_chunks
from tierlift.offload.activation_plan import ActivationConfig
from tierlift.offload.activations import ActivationExecutor
from tierlift.offload.memory import MemoryOwner
from tierlift.offload.optimizer import OffloadedOptimizer
from tierlift.offload.policy import NoOffload, NVMeOffload, OffloadConfig
from tierlift.offload.shard_optim import ShardOptimizer
from tierlift.parallel.chunks import Residency, RuntimeChunk
from tierlift.parallel.config import OptimizerConfig, PrecisionConfig, ZeroConfig
from tierlift.parallel.gather import Gatherer, arena_stats, make_arena
from tierlift.parallel.group import make_groups
from tierlift.parallel.hooks import Phase, UnitHooks
from tierlift.parallel.optim import LossScaler
from tierlift.parallel.plan_exec import PlanMismatch, check_layout, plan_for_engine, verify
from tierlift.parallel.reduce import GradReducer
from tierlift.parallel.rendezvous import Rendezvous
from tierlift.parallel.sharded_param import ChunkGuard
from tierlift.parallel.step import OptimizerStep, StepStats
from tierlift.parallel.unshard import FullModel
from tierlift.parallel.units import default_wrap_classes, find_units
from tierlift.parallel.zero_state import EngineState

__all__ = ["ZeroEngine", "Residency", "StepStats"]

log = logging.getLogger("tierlift.zero")

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class ZeroEngine:
    """Shards ``model`` (already built identically on every rank) over the default group."""

    def __init__(self, model: nn.Module, zero: ZeroConfig, precision: PrecisionConfig, optim: OptimizerConfig,
                 device: torch.device, activation_checkpointing: bool = False, offload=None, plan=None,
                 activations: ActivationConfig | None = None) -> None:
        self.offload = offload or OffloadConfig()
        host_opt = not isinstance(self.offload.optimizer, NoOffload)
        host_params = not isinstance(self.offload.param, NoOffload)
        # OffloadConfig refuses parameters offloaded without the optimizer (and NVMe parameters
        # apart from the optimizer's file): the engine relies on it.
        self.model = model
        self.cfg = zero
        self.precision = precision
        self.optim_cfg = optim
        self.device = device
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1
        self.compute_dtype = _DTYPES[precision.compute]
        self.reduce_dtype = _DTYPES[precision.reduce]
        wrap = list(zero.wrap) or default_wrap_classes(model)
        self.units = find_units(model, wrap)
        self.layout: ChunkLayout = plan_chunks([u.spec() for u in self.units], self.world_size,
                                               zero.chunk_align_bytes, zero.persistence_threshold)
        # The ExecutionPlan this engine executes (offload/execplan.py): given, or the config's.
        if plan is not None:
            check_layout(plan, self.layout)
        self.plan = plan or plan_for_engine(self.layout, zero, self.offload, optim.name, self.compute_dtype,
                                            self.reduce_dtype, device, self.rank)
        self.cfg = dataclasses.replace(zero, prefetch_units=self.plan.prefetch_units)  # own copy: re-plans change it
        unit_by_name = {u.name: u for u in self.units}
        self._move_buffers(model, device)
        model_dtypes = {id(p): p.dtype for p in model.parameters()}  # before the chunks bind them: unwrap's
        self.rendezvous = Rendezvous(self.rank, self.world_size, zero.rendezvous_timeout_s)
        self.chunks = [RuntimeChunk(c, unit_by_name[c.unit], self.rank, device, self.compute_dtype,
                                     host_optimizer=host_opt, host_params=host_params)
                       for c in self.layout]
        self.root = next((c for c in self.chunks if c.spec.unit == ""), None)
        # Streams, events, the pinned pool and the GPU arena: one owner (offload/memory.py),
        # shared by the host optimizer and the activation swapper.
        self.memory = MemoryOwner(device, self.offload.host_budget_bytes)
        self.host_opt = None
        if host_opt:
            deferred = optim.grad_clip > 0 or precision.compute == "fp16"
            masters = [c.master for c in self.chunks]
            for c in self.chunks:
                c.master = None  # the host optimizer takes them over, and drops each once copied
            self.host_opt = OffloadedOptimizer(list(self.layout), self.rank, masters, optim,
                                               self.offload, self.compute_dtype, device, deferred=deferred,
                                               placement=self.plan.optimizer_tiers, memory=self.memory)
            del masters
            self.optimizer = None
        else:
            self.optimizer = ShardOptimizer(optim, [c.master for c in self.chunks], [c.grad for c in self.chunks],
                                            [c.spec.segments(self.rank) for c in self.chunks],
                                            sub_group_size=zero.sub_group_size)
        self.scaler = LossScaler(precision, enabled=precision.compute == "fp16")
        self.reuse_distance = zero.max_reuse_distance if zero.max_reuse_distance is not None else \
            (10 ** 9 if isinstance(self.offload.param, NVMeOffload) else 0)  # elements; see ZeroConfig
        # The parts (module doc), each given what it uses; none reaches into another.
        self.guard = ChunkGuard()
        self.gatherer = Gatherer(rank=self.rank, world_size=self.world_size, device=device,
                                 compute_dtype=self.compute_dtype, host_opt=self.host_opt, memory=self.memory,
                                 guard=self.guard, debug_sync=zero.debug_sync)
        self.groups = make_groups(self.units, self.chunks, self.gatherer)
        self.reducer = GradReducer(stage=zero.stage, world_size=self.world_size, device=device,
                                   reduce_dtype=self.reduce_dtype, host_opt=self.host_opt, gatherer=self.gatherer)
        self.hooks = UnitHooks(groups=self.groups, chunks=self.chunks, cfg=self.cfg, reducer=self.reducer,
                               rendezvous=self.rendezvous, host_opt=self.host_opt, compute_dtype=self.compute_dtype,
                               reuse_distance=self.reuse_distance, rank=self.rank)
        self.stepper = OptimizerStep(chunks=self.chunks, root=self.root, groups=self.groups, hooks=self.hooks,
                                     gatherer=self.gatherer, host_opt=self.host_opt, optimizer=self.optimizer,
                                     scaler=self.scaler, optim_cfg=optim, stage=zero.stage, rank=self.rank,
                                     world_size=self.world_size)
        self.state = EngineState(model=model, chunks=self.chunks, host_opt=self.host_opt, optimizer=self.optimizer,
                                 optim_cfg=optim, scaler=self.scaler, refresh_params=self.stepper.refresh_params,
                                 rank=self.rank, world_size=self.world_size)
        self.full_model = FullModel(model=model, groups=self.groups, chunks=self.chunks, hooks=self.hooks,
                                    guard=self.guard, rendezvous=self.rendezvous,
                                    full_state_dict=self.state.full_state_dict, model_dtypes=model_dtypes,
                                    stage=zero.stage, device=device, rank=self.rank)
        # Saved activations: kept (no executor, no cost), or swapped / recomputed per the plan.
        act = activations or ActivationConfig(policy="recompute" if activation_checkpointing else "keep")
        self.activations: ActivationExecutor | None = None
        if act.policy != "keep":
            # PCIe bytes per step the offloaded optimizer already moves (fp32 master in, gradients
            # out): the activation plan's swaps share the link with them.
            pcie = self.layout.shard_numel() * 8 if host_opt else 0
            self.activations = ActivationExecutor(self.units, device, act, offload_pcie_bytes=pcie,
                                                  memory=self.memory)
            self.activations.install()
        self.hooks.attach()
        if zero.stage == 3:
            for g in self.groups:
                if not g.persistent:
                    g.reshard()
        self.arena = make_arena(self.memory, self.plan, self.rank, zero.arena)
        log.info("rank %d: %d chunks in %d groups, %.1f M params, %.1f M shard elems/rank, stage %d",
                 self.rank, len(self.chunks), len(self.groups), self.layout.total_numel / 1e6,
                 self.layout.shard_numel() / 1e6, zero.stage)
        try:
            verify(self, "after construction")
        except PlanMismatch:
            self.close()  # the host optimizer's worker and its NVMe file go with the refused engine
            raise

    # -- setup ---------------------------------------------------------------
    @staticmethod
    def _move_buffers(model: nn.Module, device: torch.device) -> None:
        for mod in model.modules():
            for name, buf in list(mod._buffers.items()):
                if buf is not None and buf.device != device:
                    mod._buffers[name] = buf.to(device)

    # -- public step API -----------------------------------------------------
    def forward_begin(self) -> None:
        """Call before each micro-batch's forward (and before an eval forward)."""
        self.full_model.rewrap()  # after unwrap_model(): parameters back on the engine's buffers
        self.hooks.forward_begin()
        if self.host_opt is not None:  # reads ahead no gather used: stale once their chunk stepped
            self.host_opt.drop_prefetched()
        if self.root is not None:
            self.gatherer.gathered([self.root])

    def backward(self, loss: torch.Tensor, sync_grads: bool = True) -> None:
        """Backward of one micro-batch; ``sync_grads`` on its last micro-batch.

        Stage 1 accumulates full gradients locally and reduces them only when
        ``sync_grads``; stages 2–3 reduce-scatter every micro-batch as units finish."""
        self.hooks.backward_begin()
        if self.host_opt is not None:  # waiting gradients step in the next forward's order
            self.host_opt.set_step_order(self.stepper.step_order())
            if self.cfg.stage == 3:  # disk reads for the prefetches backward_begin released
                self.host_opt.drop_prefetched()
        self.reducer.begin_micro(sync_grads)
        try:
            (loss * self.scaler.scale if self.scaler.enabled else loss).backward()
            self.hooks.backward_end()
            if self.root is not None and self.cfg.stage >= 2:
                self.reducer.reduce_chunk(self.root)
            if sync_grads and self.cfg.stage == 1:
                for c in self.chunks:
                    self.reducer.reduce_chunk(c)
            self.reducer.drain()
        finally:
            self.hooks.idle()
            self.reducer.end_micro(sync_grads)

    def begin_step(self, lr: float) -> None:
        """The learning rate of the optimizer step about to be computed.  With the
        optimizer on the host and no clipping, chunks step as their gradients land
        during backward, so they need it before ``step``."""
        self.stepper.begin_step(lr)

    def forward_end_eval(self) -> None:
        """After a forward no backward follows (evaluation)."""
        self.hooks.forward_end_eval()

    def step(self, lr: float) -> StepStats:
        """Unscale (fp16), clip to the exact global norm, step the shards, refresh params."""
        return self.stepper.step(lr)

    def refresh_params(self) -> None:
        """Bring the compute-dtype parameters up to date with the masters (``step.py``)."""
        self.stepper.refresh_params()

    # -- the host optimizer as the trainer sees it (no caller reaches into host_opt) ----
    @property
    def steps_in_background(self) -> bool:
        """Optimizer steps may still run after ``step`` returned (the optimizer is on the host)."""
        return self.host_opt is not None

    def drain(self) -> None:
        """Block until every queued host optimizer step is done (sync point; no-op without one)."""
        if self.host_opt is not None:
            self.host_opt.wait_all()

    def offload_timings(self) -> dict[str, float] | None:
        """Cumulative seconds the host optimizer spent per phase (``OffloadedOptimizer.timings``);
        None without one."""
        return self.host_opt.timings() if self.host_opt is not None else None

    @property
    def pinned_bytes(self) -> int:
        """Page-locked host bytes of the memory owner's pool (optimizer state, slots, swapped
        activations) now; 0 on CPU."""
        return self.memory.pinned_bytes

    # -- parts handed out as the engine's own (docs/CONTRACTS.md) -----------------
    @property
    def phase(self) -> Phase:
        return self.hooks.phase

    @property
    def order_changes(self) -> int:
        return self.hooks.order_changes

    def take_prefetch_counts(self) -> dict[str, int]:
        """Gathers issued ahead, and hits / misses at use, since the last call."""
        return self.hooks.take_prefetch_counts()

    def take_stall_ms(self) -> float:
        """Milliseconds the host waited for gathers in flight since the last call."""
        return self.gatherer.take_stall_ms()

    def take_host_wait_ms(self) -> float:
        """Milliseconds the host waited for host optimizer steps since the last call."""
        return self.gatherer.take_host_wait_ms()

    def arena_stats(self) -> dict[str, int]:
        """Per-step memory facts for metrics: arena bytes and device fragmentation (GPU only)."""
        return arena_stats(self.arena, self.device)

    def full_state_dict(self, to_rank0: bool = True) -> dict[str, torch.Tensor]:
        return self.state.full_state_dict(to_rank0)

    def aliases(self) -> dict[str, str]:
        return self.state.aliases()

    def state_segments(self) -> list:
        return self.state.state_segments()

    def finish_state_segments(self, loaded: bool) -> None:
        self.state.finish_state_segments(loaded)

    @property
    def step_count(self) -> int:
        return self.state.step_count

    def extra_state(self) -> dict:
        return self.state.extra_state()

    def load_extra_state(self, d: dict) -> None:
        self.state.load_extra_state(d)

    @property
    def unwrapped(self) -> bool:
        return self.full_model.unwrapped

    def gathered_parameters(self) -> contextlib.AbstractContextManager[nn.Module]:
        """Every unit gathered in place for the body (all ranks enter); resharded on exit."""
        return self.full_model.gathered_parameters()

    def unwrap(self, rank0_only: bool = False, device: torch.device | str | None = None) -> nn.Module:
        return self.full_model.unwrap(rank0_only, device)

    def rewrap(self) -> None:
        self.full_model.rewrap()

    def close(self) -> None:
        """Take the hooks off, stop the host optimizer's worker, close NVMe files and release
        pinned memory (the memory owner's pool)."""
        self.hooks.detach()
        if self.host_opt is not None:
            self.host_opt.close()
        self.memory.close()
