"""Data types and constants of the planner (``planner.py``): the model's chunks, the
budgets, the node's rates, the training job and the cost estimate.  Pure data."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from tierlift.layout import ChunkLayout, UnitSpec, plan_chunks

__all__ = ["ModelShape", "Budgets", "NodeRates", "TrainingShape", "ChunkPlacement", "StepEstimate", "GiB",
           "GPU_SLACK", "HOST_BASE_BYTES", "CPU_PASS_FACTOR", "PIECE_NUMEL", "MAX_PREFETCH", "PARAM_SLOTS"]

GiB = 1 << 30
GPU_SLACK = 1.10            # caching-allocator fragmentation on transient GPU buffers
HOST_BASE_BYTES = int(3.2 * GiB)  # process RSS without offload (DeepSpeed ZeRO-3 on L1B; docs/planning.md)
# The worker's AdamW in a run vs its isolated calibration rate: on the H100 it stepped L1B
# in 0.27 s/step against 0.17 s isolated (DMA of gradients and masters shares the memory
# bus; benchmarks/results/zero_h100x1_offload-cpu.md and offload_phases_h100.json).
CPU_PASS_FACTOR = 1.6
PIECE_NUMEL = 16 << 20      # NVMe staging piece (tierlift/offload/nvme_state.py)
MAX_PREFETCH = 8
PARAM_SLOTS = 6             # pinned slots for parameters read from NVMe (offload/optimizer_state.py)
_STATE_BYTES = {"adamw": 12, "sgd": 8}  # per element: fp32 master + (m, v) or momentum
_SETTING = {t: f"offload.{t}_budget_bytes" for t in ("gpu", "host", "nvme")}  # the config keys budgets map to


def _gib(b: float | None) -> str:
    return "unbounded" if b is None or b == math.inf else f"{b / GiB:.2f} GiB"


def _count(n: float) -> str:
    return next(f"{n / d:.{2 if d > 1e6 else 1}f} {u}" for d, u in ((1e9, "B"), (1e6, "M"), (1e3, "K"), (1, ""))
                if n >= d or d == 1)


@dataclass(frozen=True)
class ModelShape:
    """One rank's view of the chunks, in forward order (root first)."""
    shard_numel: tuple[int, ...]   # elements of this rank's shard, padding included
    padded_numel: tuple[int, ...]  # elements of the gathered buffer
    resident: tuple[bool, ...]     # stays gathered all step (root, persistent chunks)
    params: int                    # unpadded parameters of the model (FLOPs)
    world_size: int
    groups: tuple[int, ...]        # gathered elements of each other group: the unit of gathers and prefetch
    units: tuple[str, ...]         # module path of each chunk

    @classmethod
    def from_layout(cls, layout: ChunkLayout) -> "ModelShape":
        cs, lead, sums = list(layout), {}, {}
        for c in sorted(cs, key=lambda c: len(c.unit)):  # outer units first: MoE experts join their block
            lead[c.unit] = lead.get(next((u for u in lead if u and c.unit.startswith(u + ".")), c.unit), c.index)
            if c.unit and not c.persistent:
                sums[lead[c.unit]] = sums.get(lead[c.unit], 0) + c.padded_numel
        return cls(tuple(c.shard_numel for c in cs), tuple(c.padded_numel for c in cs),
                   tuple(c.unit == "" or c.persistent for c in cs), layout.total_numel, layout.world_size,
                   tuple(sums.values()), tuple(c.unit or "(root)" for c in cs))

    @classmethod
    def from_numels(cls, numels: Sequence[int], world_size: int = 1, align_bytes: int = 4096) -> "ModelShape":
        """Synthetic model: chunk 0 is the root, the rest are units (tests, what-ifs)."""
        specs = [UnitSpec("" if i == 0 else f"u{i}", ((f"p{i}", (int(n),)),)) for i, n in enumerate(numels)]
        return cls.from_layout(plan_chunks(specs, world_size, align_bytes))


@dataclass(frozen=True)
class Budgets:
    """Bytes per rank per tier, as the offload.*_budget_bytes settings; None = unbounded."""
    gpu_bytes: int | None
    host_bytes: int | None
    nvme_bytes: int | None = None

    def get(self, tier: str) -> float:
        return math.inf if getattr(self, f"{tier}_bytes") is None else getattr(self, f"{tier}_bytes")


@dataclass(frozen=True)
class NodeRates:
    """GB/s (1e9 B/s), fp32 params/s, FLOP/s.  Defaults: the reference node of docs/planning.md (one H100, PCIe Gen5,
    virtio disk, 16 cores); mfu: the share of gpu_flops a step reaches (L1B: ~0.4-0.44)."""
    h2d_gbps: float = 55.0
    d2h_gbps: float = 55.0
    disk_read_gbps: float = 1.9
    disk_write_gbps: float = 1.9
    cpu_adam_params_s: float = 4.8e9
    gpu_adam_params_s: float = 88.7e9
    gpu_flops: float = 756e12
    mfu: float = 0.40
    unit_fwd_s: tuple[float, ...] | None = None  # measured, per unit per micro-batch
    unit_bwd_s: tuple[float, ...] | None = None
    source: str = "defaults (reference H100 node, docs/planning.md)"


@dataclass(frozen=True)
class TrainingShape:
    tokens_per_step: int            # per rank per optimizer step
    activation_bytes: int           # peak live activations of one micro-batch, per rank
    micro_batches: int = 1
    compute_bytes: int = 2
    reduce_bytes: int = 4
    activation_checkpointing: bool = True
    deferred_step: bool = True      # clipping / fp16: CPU steps overlap the next forward, not backward
    zero_stage: int = 3
    active_params: int | None = None  # FLOPs count (MoE: routed share); None = all parameters
    optimizer: str = "adamw"        # adamw | sgd
    grad_backlog_bytes: int = 4 << 30  # offload.grad_backlog_bytes (immediate steps)


@dataclass(frozen=True)
class ChunkPlacement:
    index: int
    optimizer_tier: str  # gpu | host | nvme
    param_tier: str      # gpu | host | nvme (offload/execplan.param_tiers)
    shard_numel: int


@dataclass(frozen=True)
class StepEstimate:  # seconds per optimizer step, per rank
    compute_s: float
    forward_s: float
    backward_s: float
    gpu_optimizer_s: float
    cpu_optimizer_s: float
    disk_s: float
    pcie_s: float
    overlap_window_s: float  # compute the host path hides behind
    exposed_host_s: float
    exposed_pcie_s: float
    step_s: float
    tokens_per_s: float
