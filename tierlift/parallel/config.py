"""Config of the chunked ZeRO engine and its mixed precision.  ``OptimizerConfig`` lives
with the shard optimizer (``tierlift.offload.shard_optim``) and is handed on here, so the
engine's three configs import from one place."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from tierlift._configbase import check, check_choice
from tierlift.offload.shard_optim import OptimizerConfig

__all__ = ["ZeroConfig", "PrecisionConfig", "OptimizerConfig"]

DType = Literal["fp32", "bf16", "fp16"]


@dataclass
class ZeroConfig:
    """How parameters, gradients and optimizer state are sharded.

    stage: 1 shards optimizer state; 2 also gradients; 3 also parameters.
    prefetch_units: how many wrap units ahead (forward) / behind (backward) the
        stage-3 all-gather is issued.
    persistence_threshold: chunks with fewer elements stay gathered for the
        whole step (DeepSpeed's stage3_param_persistence_threshold).
    chunk_align_bytes: every rank's shard is a multiple of this many bytes (O_DIRECT).
    wrap: module class names that become wrap units; empty = the model's
        ``_no_split_modules`` (Hugging Face) or its ``wrap_modules`` attribute.
    max_live_params: upper bound of gathered elements at once (0 = no bound);
        limits prefetch depth (DeepSpeed's stage3_max_live_parameters).
    debug_sync: check that gathered parameters agree across ranks and checksum shards.
    prefetch_bytes: upper bound of parameter bytes being gathered ahead of use at
        once (0 = bounded by prefetch_units only); DeepSpeed's
        stage3_prefetch_bucket_size, which counts elements, times the compute
        dtype's size.
    sub_group_size: the optimizer steps at most this many elements at a time,
        which bounds its pinned staging memory (0 = one step per chunk shard);
        DeepSpeed's sub_group_size.
    max_reuse_distance: after a unit's forward, keep it gathered for its backward
        when fewer than this many parameter elements are gathered in between
        (the later units, forward and backward: twice their size); 0 = always
        reshard.  Saves the backward's gather -- with parameters on NVMe, a disk
        read -- at the price of GPU memory.  DeepSpeed's stage3_max_reuse_distance
        (its default: 1e9).  Unset (None): 1e9 with parameters on NVMe, where a
        second read costs disk time, else 0.
    arena: where gathered chunks and gradient buffers are allocated on a GPU:
        "shared" (default), torch's caching allocator on demand; "pool", a private
        pool reserved when the engine is built, so their churn never meets the
        memory activations use (``offload/arena.py``).  Measured on L1B, the pool
        costs 1.4-1.7 GiB more peak reserved memory and the shared allocator's
        reserved - allocated levels off within a few steps: docs/zero.md.
    rendezvous_timeout_s: seconds a collective outside the training step (a forward
        of the sharded model, gathered_parameters, unwrap_model, full_state_dict,
        evaluate) waits for every rank to
        enter it before failing with an error that says so (instead of hanging in
        the all-gather until the process group's timeout); ``rendezvous.py``.
    """

    stage: int = 3
    prefetch_units: int = 2
    persistence_threshold: int = 0
    chunk_align_bytes: int = 4096
    wrap: list[str] = field(default_factory=list)
    max_live_params: int = 0
    debug_sync: bool = False
    prefetch_bytes: int = 0
    sub_group_size: int = 0
    max_reuse_distance: int | None = None
    arena: Literal["shared", "pool"] = "shared"
    rendezvous_timeout_s: float = 120.0

    def __post_init__(self) -> None:
        check_choice("zero.stage", self.stage, [1, 2, 3])
        check(isinstance(self.rendezvous_timeout_s, (int, float)) and self.rendezvous_timeout_s > 0,
              "zero.rendezvous_timeout_s", self.rendezvous_timeout_s, "must be a number of seconds > 0.",
              "use e.g. 120; raise it if ranks legitimately reach an eval forward minutes apart.")
        check_choice("zero.arena", self.arena, ["shared", "pool"])
        check(self.max_reuse_distance is None or self.max_reuse_distance >= 0, "zero.max_reuse_distance",
              self.max_reuse_distance, "must be an integer >= 0 (elements), or unset.",
              "use 0 to reshard every unit after its forward, or e.g. 1000000000 (DeepSpeed's default).")
        check(self.prefetch_units >= 0, "zero.prefetch_units", self.prefetch_units,
              "must be >= 0.", "use 0 to disable prefetch or a small number such as 2.")
        check(self.persistence_threshold >= 0, "zero.persistence_threshold", self.persistence_threshold,
              "must be >= 0.", "use 0 to shard every chunk.")
        a = self.chunk_align_bytes
        check(a >= 2 and a & (a - 1) == 0, "zero.chunk_align_bytes", a,
              "must be a power of two >= 2.", "use 4096 (O_DIRECT) or 512.")
        check(self.max_live_params >= 0, "zero.max_live_params", self.max_live_params,
              "must be >= 0.", "use 0 for no bound.")
        check(self.prefetch_bytes >= 0, "zero.prefetch_bytes", self.prefetch_bytes,
              "must be >= 0.", "use 0 to bound prefetch by prefetch_units only.")
        check(self.sub_group_size >= 0, "zero.sub_group_size", self.sub_group_size,
              "must be >= 0.", "use 0 to step one chunk shard at a time.")


@dataclass
class PrecisionConfig:
    """compute: dtype of gathered parameters and activations; master weights and
    optimizer state are always fp32.  reduce: dtype gradients are reduced in.
    fp16 uses dynamic loss scaling (initial_scale = 2**initial_scale_power)."""

    compute: DType = "fp32"
    reduce: DType = "fp32"
    initial_scale_power: int = 16
    loss_scale_window: int = 1000
    min_loss_scale: float = 1.0
    hysteresis: int = 2

    def __post_init__(self) -> None:
        check_choice("precision.compute", self.compute, ["fp32", "bf16", "fp16"])
        check_choice("precision.reduce", self.reduce, ["fp32", "bf16", "fp16"])
        check(0 <= self.initial_scale_power <= 32, "precision.initial_scale_power",
              self.initial_scale_power, "must be in [0, 32].", "use 16.")
        check(self.loss_scale_window >= 1, "precision.loss_scale_window", self.loss_scale_window,
              "must be >= 1.", "use 1000.")
        check(self.min_loss_scale > 0, "precision.min_loss_scale", self.min_loss_scale,
              "must be > 0.", "use 1.0.")
        check(self.hysteresis >= 1, "precision.hysteresis", self.hysteresis, "must be >= 1.", "use 2.")
