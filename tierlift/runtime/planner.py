"""Planner (pure: no I/O, process group or tensors): chunks + per-tier budgets + node
rates -> where state lives and what a step should cost.  The same Plan is printed by
``tierlift plan``, handed to the engine and checked by tests.

Memory per rank.  n_i / p_i: chunk i's shard / gathered elements (N = sum n_i); a
group: a top-level unit with its nested units' chunks; c, r: compute / reduce dtype
bytes; s: optimizer state bytes per element incl. the fp32 master (AdamW 12, SGD 8).
  GPU   (s + 4) n_i where the optimizer is on the GPU (4: fp32 grad), + c n_i while
        parameters stay there (0 if that is the fp32 master); + GPU_SLACK x (gathered:
        resident chunks + (prefetch + 1) x the largest group at stage 3, all below;
        grads: resident + largest group in c, 2 reductions of the largest chunk in r;
        activations).  Construction gathers every chunk once: peak >= state + c sum p.
        Immediate host steps add the gradient backlog: min(grad_backlog_bytes, r N).
  host  pinned pool, as tierlift/offload/optimizer.py carves it: s n_i where state
        stays in host memory (the engine casts masters on the GPU: no host copy),
        c n_i where it is on NVMe (the compute-dtype copy gathers read), + buffer_count
        x s x min(largest NVMe chunk, piece) (staging), + gradients: a 2-slot ring of
        the largest chunk (immediate) or 4 n_i per chunk (deferred).  RSS adds
        HOST_BASE_BYTES.   NVMe: s n_i where state is on NVMe.
Placement: the first k chunks' state in host memory, the rest on NVMe, exactly what
NVMeOffload(max_in_cpu = n_0 + .. + n_{k-1}) does.  "auto" tries GPU, host and the
largest k that fits, parameters on GPU or host, and keeps the fastest.

Time per rank and step (M micro-batches; CPU and disk rates are per node, shared by
``ranks_per_node`` ranks; collectives assumed hidden behind compute):
  compute C = (6, or 8 recomputing) x active params x tokens / (gpu_flops x mfu), 2 of
        those parts forward; or the measured per-unit seconds x M.
  GPU optimizer N_gpu / gpu_adam, after backward, not overlapped.
  host path H = max(O, D): CPU optimizer O = N_off x CPU_PASS_FACTOR / cpu_adam; disk
        D = sum s n_i (1/read + 1/write) over NVMe chunks (reads run ahead); per chunk
        the worker needs max(its CPU step, its disk time).  How much of H a step
        exposes depends on order, so it is simulated (``_simulate_period``): the GPU
        runs the forward chunk by chunk, each waiting for its step and its H2D copy,
        then the backward, releasing gradients in reverse (all at once after backward
        for deferred steps: clipping, fp16); one worker steps released chunks
        earliest-next-forward-deadline first, without preemption.  The steady
        distance between forward starts is the period; exposed = period - C.
  PCIe X = max(H2D, D2H), the directions are independent: grads r N_off per micro-batch
        D2H; parameters H2D as fp32 masters (4 B, cast on the GPU) from host-tier chunks
        and c from NVMe-tier ones, once per step, or on every gather (2 per micro-batch)
        with parameters on the host.  Exposed = max(0, X - C) + the first copy + stalls
        where prefetch is shallower than one group's copy needs.
  step = C + GPU optimizer + exposed host path + exposed PCIe.
A model of floors: steps measured above it are what Policy reports and acts on.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, replace
from itertools import groupby
from typing import Sequence

from tierlift.errors import ConfigError
from tierlift.parallel.layout import ChunkLayout, UnitSpec, plan_chunks

__all__ = ["ModelShape", "Budgets", "NodeRates", "TrainingShape", "ChunkPlacement", "StepEstimate", "Plan",
           "plan", "GiB"]

GiB = 1 << 30
GPU_SLACK = 1.10            # caching-allocator fragmentation on transient GPU buffers
HOST_BASE_BYTES = int(3.2 * GiB)  # process RSS without offload (design.md §4, DeepSpeed ZeRO-3 on L1B)
# The worker's AdamW in a run vs its isolated calibration rate: on the H100 it stepped L1B
# in 0.27 s/step against 0.17 s isolated (DMA of gradients and masters shares the memory
# bus; benchmarks/results/zero_h100x1_offload-cpu.md and offload_phases_h100.json).
CPU_PASS_FACTOR = 1.6
PIECE_NUMEL = 16 << 20      # NVMe staging piece (tierlift/offload/nvme_state.py)
MAX_PREFETCH = 8
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
    """GB/s (1e9 B/s), fp32 params/s, FLOP/s.  Defaults: design.md §4 (one H100, PCIe Gen5,
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
    source: str = "defaults (design.md §4, H100 node)"


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
    param_tier: str      # gpu | host
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


@dataclass(frozen=True)
class Plan:
    optimizer_kind: str  # none | cpu | nvme
    param_kind: str      # none | cpu
    placements: tuple[ChunkPlacement, ...]
    max_in_cpu: int      # elements (NVMeOffload.max_in_cpu); 0 unless nvme
    prefetch_units: int
    pinned_pool_bytes: int
    nvme_bytes: int
    gpu_peak_bytes: int
    host_peak_bytes: int
    step: StepEstimate
    budgets: Budgets
    rates: NodeRates
    training: TrainingShape
    shape: ModelShape = field(repr=False)
    ranks_per_node: int = 1
    nvme_buffer_count: int = 8
    notes: tuple[str, ...] = ()

    @property
    def host_chunks(self) -> int:
        return sum(p.optimizer_tier == "host" for p in self.placements)

    def replan(self, host_chunks: int | None = None, prefetch_units: int | None = None) -> "Plan":
        """The same plan with k host-resident chunks (the rest on NVMe) or another
        prefetch depth, re-costed.  Budgets are not enforced (Policy checks)."""
        opt, k = self.optimizer_kind, self.host_chunks
        if host_chunks is not None and host_chunks != k and opt != "none":
            opt, k = ("nvme" if host_chunks < len(self.placements) else opt), host_chunks
        return _evaluate(self.shape, self.training, self.rates, self.budgets, opt, self.param_kind, k,
                         self.prefetch_units if prefetch_units is None else prefetch_units,
                         self.ranks_per_node, self.nvme_buffer_count, self.notes)

    def to_offload_config(self, base=None, nvme_path: str | None = None):
        """An OffloadConfig: kinds, max_in_cpu and budgets from the plan; NVMe path,
        aio and buffers from ``base`` (or ``nvme_path``)."""
        from tierlift.offload.policy import CPUOffload, NoOffload, NVMeOffload, OffloadConfig
        base, b = base or OffloadConfig(), self.budgets
        src, pin = base.optimizer, getattr(base.optimizer, "pin_memory", True)
        optimizer = NoOffload() if self.optimizer_kind == "none" else CPUOffload(pin_memory=pin)
        if self.optimizer_kind == "nvme":
            path = nvme_path or (src.path if isinstance(src, NVMeOffload) else "")
            if not path:
                raise ConfigError("the plan puts optimizer state on NVMe but no directory is set.",
                                  setting="offload.optimizer.path", value="",
                                  fix="set offload.optimizer: {kind: nvme, path: DIR} on a fast local disk.")
            optimizer = (replace(src, path=path, max_in_cpu=self.max_in_cpu) if isinstance(src, NVMeOffload) else
                         NVMeOffload(path=path, max_in_cpu=self.max_in_cpu, buffer_count=self.nvme_buffer_count))
        param = CPUOffload(getattr(base.param, "pin_memory", True)) if self.param_kind == "cpu" else NoOffload()
        return OffloadConfig(optimizer, param, host_budget_bytes=b.host_bytes or 0,
                             gpu_budget_bytes=b.gpu_bytes or 0, nvme_budget_bytes=b.nvme_bytes or 0)

    def to_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k != "shape"}
        return {**d, "chunks": len(self.placements), "params": self.shape.params,
                "world_size": self.shape.world_size, "notes": list(self.notes)}

    def to_table(self) -> str:
        s, b, sh, tr, r = self.step, self.budgets, self.shape, self.training, self.rates
        opt = {"none": "GPU", "cpu": "host (pinned)", "nvme": f"host for {self.host_chunks} chunk(s), NVMe for "
               f"{len(self.placements) - self.host_chunks} (max_in_cpu={self.max_in_cpu:,})"}[self.optimizer_kind]
        rows = [f"tierlift plan: {_count(sh.params)} params, {len(self.placements)} chunks, world {sh.world_size}, "
                f"ZeRO-{tr.zero_stage}, {tr.optimizer}, {tr.tokens_per_step:,} tokens/rank/step",
                f"optimizer state: {opt}; parameters: {'host' if self.param_kind == 'cpu' else 'GPU'}; prefetch "
                f"{self.prefetch_units} unit(s); pinned pool {_gib(self.pinned_pool_bytes)}", "",
                f"  {'tier':<6}{'budget/rank':>14}{'peak/rank':>14}"]
        rows += [f"  {t:<6}{_gib(budget):>14}{_gib(peak):>14}{extra}" for t, budget, peak, extra in (
            ("GPU", b.gpu_bytes, self.gpu_peak_bytes, ""),
            ("host", b.host_bytes, self.pinned_pool_bytes, f"   pinned (RSS ~{_gib(self.host_peak_bytes)})"),
            ("NVMe", b.nvme_bytes, self.nvme_bytes, ""))]
        rows += ["", f"  {'chunks':<9}{'unit':<32}{'elems/rank':>10}  optimizer  params"]

        def alike(p):  # consecutive chunks of one size, placement and kind of unit share a row
            return p.shard_numel, p.optimizer_tier, p.param_tier, re.sub(r"\d+", "#", sh.units[p.index])

        for (n, ot, pt, _), run in ((k, list(g)) for k, g in groupby(self.placements, alike)):
            lo, hi, tag = run[0].index, run[-1].index, "" if len(run) == 1 else f" (x{len(run)})"
            rows.append(f"  {str(lo) if lo == hi else f'{lo}-{hi}':<9}{sh.units[lo][:31 - len(tag)] + tag:<32}"
                        f"{_count(n):>10}  {ot:<9}  {pt}")
        mode = "next forward (deferred)" if tr.deferred_step else "backward and the next forward (immediate)"
        rows += ["", f"predicted step {s.step_s:.3f} s ({s.tokens_per_s:,.0f} tokens/s per rank)",
                 f"  compute        {s.compute_s:8.3f} s  forward {s.forward_s:.3f}, backward {s.backward_s:.3f}",
                 f"  GPU optimizer  {s.gpu_optimizer_s:8.3f} s  after backward, not overlapped",
                 f"  CPU optimizer  {s.cpu_optimizer_s:8.3f} s  \\ max() overlaps the {mode}:",
                 f"  disk (NVMe)    {s.disk_s:8.3f} s  / window {s.overlap_window_s:.3f} s, exposed "
                 f"{s.exposed_host_s:.3f} s",
                 f"  PCIe           {s.pcie_s:8.3f} s  behind compute, exposed {s.exposed_pcie_s:.3f} s",
                 f"rates: {r.source}: H2D {r.h2d_gbps:g} / D2H {r.d2h_gbps:g} GB/s, disk {r.disk_read_gbps:g} / "
                 f"{r.disk_write_gbps:g} GB/s, CPU AdamW {r.cpu_adam_params_s / 1e9:g} G/s per node "
                 f"({self.ranks_per_node} rank(s)), GPU AdamW {r.gpu_adam_params_s / 1e9:g} G/s, "
                 f"{r.gpu_flops / 1e12:g} TFLOP/s x mfu {r.mfu:g}"]
        return "\n".join(rows + [f"note: {n}" for n in self.notes]) + "\n"


# -- the model: the formulas of the module docstring -----------------------------------
def _tiers(opt: str, k: int, nchunks: int) -> list[str]:
    return ["gpu"] * nchunks if opt == "none" else ["host"] * k + ["nvme"] * (nchunks - k)


def _gpu_bytes(sh: ModelShape, tr: TrainingShape, opt: str, param: str, depth: int) -> int:
    c, r, s = tr.compute_bytes, tr.reduce_bytes, _STATE_BYTES[tr.optimizer]
    n, p = sh.shard_numel, sh.padded_numel
    opt_state = (s + 4) * sum(n) if opt == "none" else 0
    if opt != "none" and not tr.deferred_step:  # gradients waiting for their host step
        opt_state = min(tr.grad_backlog_bytes, r * sum(n))
    shard = c * sum(n) if param == "none" and (opt, c) != ("none", 4) else 0  # fp32 compute: the master itself
    res, big = sum(pi for pi, keep in zip(p, sh.resident) if keep), max(sh.groups or (0,))
    gathered = c * sum(p) if tr.zero_stage < 3 else c * (res + (depth + 1) * big)
    grads = c * (res + big) + 2 * r * max(p)  # a group's grads, reductions in flight
    return int(opt_state + shard + max(GPU_SLACK * (gathered + grads + tr.activation_bytes), c * sum(p)))


def _host_bytes(sh: ModelShape, tr: TrainingShape, opt: str, k: int, buffers: int) -> int:
    n, c, s = sh.shard_numel, tr.compute_bytes, _STATE_BYTES[tr.optimizer]
    if opt == "none":
        return 0
    staging = buffers * s * min(max(n[k:]), PIECE_NUMEL) if k < len(n) else 0  # NVMe staging sets
    grads = 4 * sum(n) if tr.deferred_step else 2 * 4 * max(n)  # per-chunk buffers, or the ring
    return s * sum(n[:k]) + c * sum(n[k:]) + staging + grads


def _time(sh: ModelShape, tr: TrainingShape, rates: NodeRates, tiers: list[str], param: str, depth: int,
          ranks_per_node: int) -> tuple[StepEstimate, int]:
    """The step estimate and the prefetch depth that would hide one unit's copy."""
    M, c, r, s, n = tr.micro_batches, tr.compute_bytes, tr.reduce_bytes, _STATE_BYTES[tr.optimizer], sh.shard_numel
    if rates.unit_fwd_s and rates.unit_bwd_s:  # measured seconds per unit per micro-batch
        fwd, bwd = M * sum(rates.unit_fwd_s), M * sum(rates.unit_bwd_s)
    else:  # 2 FLOPs per param per token forward, 4 backward, 2 more when recomputing
        mult = 6 + 2 * tr.activation_checkpointing
        total = mult * (tr.active_params or sh.params) * tr.tokens_per_step / (rates.gpu_flops * rates.mfu)
        fwd, bwd = total * 2 / mult, total * (mult - 2) / mult
    compute = fwd + bwd
    cpu_rate = rates.cpu_adam_params_s / ranks_per_node  # params/s, the node's cores shared by its ranks
    rd, wr = (rates.disk_read_gbps * 1e9 / ranks_per_node, rates.disk_write_gbps * 1e9 / ranks_per_node)  # B/s
    off = [ni for ni, t in zip(n, tiers) if t != "gpu"]
    gpu_opt = sum(ni for ni, t in zip(n, tiers) if t == "gpu") / rates.gpu_adam_params_s
    cpu_opt = sum(off) * CPU_PASS_FACTOR / cpu_rate
    disk_of = [s * ni / rd + s * ni / wr if t == "nvme" else 0.0 for ni, t in zip(n, tiers)]
    units = max(1, len(sh.groups))
    t_unit = fwd / M / units  # one group's forward
    window, disk = (fwd if tr.deferred_step else bwd), sum(disk_of)
    exposed_host = 0.0
    if off:
        jobs = [max(ni * CPU_PASS_FACTOR / cpu_rate, d) if t != "gpu" else 0.0 for ni, t, d in zip(n, tiers, disk_of)]
        copy_in = [(4 if t == "host" else c) * ni / (rates.h2d_gbps * 1e9) if t != "gpu" else 0.0
                   for ni, t in zip(n, tiers)]
        exposed_host = max(0.0, _simulate_period(fwd, bwd, jobs, copy_in, tr.deferred_step) - compute)
    # Bytes a gather copies in per element: fp32 masters of host-tier chunks, compute dtype from NVMe-tier ones.
    h2d_elems = sum((4 if t == "host" else c) * ni for ni, t in zip(n, tiers) if t != "gpu")
    h2d_unit = 4 * max(sh.groups or (0,)) / sh.world_size / (rates.h2d_gbps * 1e9) if off else 0.0  # one group
    h2d = (2 * M * h2d_elems if param == "cpu" else h2d_elems) / (rates.h2d_gbps * 1e9)
    d2h = M * r * sum(off) / (rates.d2h_gbps * 1e9)
    need = math.ceil(h2d_unit / t_unit) + 1 if t_unit > 0 else 2  # groups ahead that hide one copy
    want = max(1, min(MAX_PREFETCH, units - 1, max(2, need)))
    copies = 2 * M if param == "cpu" else 1  # copy-ins per group per step: every gather, or one refresh
    stall = copies * units * max(0.0, h2d_unit - depth * t_unit)
    exposed_pcie = max(0.0, max(h2d, d2h) - compute) + stall + (h2d_unit if param == "cpu" else 0.0)
    step = compute + gpu_opt + exposed_host + exposed_pcie
    est = StepEstimate(compute, fwd, bwd, gpu_opt, cpu_opt, disk, h2d + d2h, window, exposed_host, exposed_pcie,
                       step, tr.tokens_per_step / step if step > 0 else 0.0)
    return est, want


def _simulate_period(fwd: float, bwd: float, jobs: list[float], copy_in: list[float], deferred: bool,
                     steps: int = 6) -> float:
    """Seconds between the starts of consecutive forwards in steady state.

    Chunk 0 is the root (gathered before the first unit, its gradient last); chunks
    1.. are units in forward order, each taking an equal share of ``fwd``/``bwd``.
    ``jobs[i]``: the worker's seconds for chunk i; ``copy_in[i]``: its H2D copy after
    the step.  The worker is one server, non-preemptive, earliest deadline (= index)
    first among released gradients.  Pure arithmetic, a few hundred operations."""
    k = len(jobs)
    units = max(1, k - 1)
    f, b = fwd / units, bwd / units
    ready = [0.0] * k   # when each chunk's step of the previous optimizer step is done
    t = worker = 0.0
    starts = []
    for _ in range(steps):
        t = max(t, ready[0] + copy_in[0])
        starts.append(t)
        for i in range(1, k):
            t = max(t, ready[i] + copy_in[i]) + f
        released = []
        for i in range(k - 1, 0, -1):
            t += b
            released.append((t, i))
        released.append((t, 0))
        if deferred:  # one norm all-reduce after backward, then every step in forward order
            released = [(t, i) for _, i in released]
        released.sort()
        pending: list[int] = []
        nxt = 0
        while nxt < len(released) or pending:
            if not pending:
                worker = max(worker, released[nxt][0])
            while nxt < len(released) and released[nxt][0] <= worker:
                pending.append(released[nxt][1])
                nxt += 1
            i = min(pending)
            pending.remove(i)
            worker += jobs[i]
            ready[i] = worker
    tail = starts[len(starts) // 2:]
    return (tail[-1] - tail[0]) / max(1, len(tail) - 1)


def _evaluate(sh, tr, rates, budgets, opt, param, k, depth, ranks_per_node, buffers, notes=()) -> Plan:
    tiers = _tiers(opt, k, len(sh.shard_numel))
    est, _ = _time(sh, tr, rates, tiers, param, depth, ranks_per_node)
    pinned = _host_bytes(sh, tr, opt, k, buffers)
    nvme = _STATE_BYTES[tr.optimizer] * sum(ni for ni, t in zip(sh.shard_numel, tiers) if t == "nvme")
    placements = tuple(ChunkPlacement(i, t, "host" if param == "cpu" else "gpu", ni)
                       for i, (t, ni) in enumerate(zip(tiers, sh.shard_numel)))
    max_in_cpu = sum(sh.shard_numel[:k]) if opt == "nvme" else 0
    return Plan(opt, param, placements, max_in_cpu, depth, pinned, nvme, _gpu_bytes(sh, tr, opt, param, depth),
                pinned + HOST_BASE_BYTES, est, budgets, rates, tr, sh, ranks_per_node, buffers, tuple(notes))


def plan(shape: ModelShape, budgets: Budgets, rates: NodeRates, training: TrainingShape,
         optimizer_kind: str = "auto", param_kind: str = "auto", ranks_per_node: int | None = None,
         nvme_buffer_count: int = 8, notes: Sequence[str] = ()) -> Plan:
    """The fastest feasible plan, or ConfigError naming the budget to raise (and the
    smallest value that fits, also on the exception as ``smallest_budgets``)."""
    for setting, value, ok in (("offload.optimizer.kind", optimizer_kind, ("auto", "none", "cpu", "nvme")),
                               ("offload.param.kind", param_kind, ("auto", "none", "cpu")),
                               ("optimizer.name", training.optimizer, ("adamw", "sgd"))):
        if value not in ok:
            raise ConfigError("is not a choice the planner knows.", setting=setting, value=value,
                              fix=f"use one of {list(ok)}.")
    if param_kind == "cpu" and (training.zero_stage != 3 or optimizer_kind == "none"):
        raise ConfigError("parameters on the host need ZeRO stage 3 and the optimizer offloaded.",
                          setting="offload.param.kind", value="cpu", fix="set zero.stage: 3 and offload.optimizer.")
    K, rpn = len(shape.shard_numel), ranks_per_node or shape.world_size
    options = []  # (preference, opt, param, k): the order GPU > host > NVMe, more host chunks first
    for opt in ("none", "cpu", "nvme") if optimizer_kind == "auto" else (optimizer_kind,):
        ks = [K] if opt != "nvme" else range(K - (optimizer_kind == "auto"), -1, -1)
        for k in ks:
            for param in ("none", "cpu") if param_kind == "auto" else (param_kind,):
                if param == "cpu" and (opt == "none" or training.zero_stage != 3):
                    continue
                options.append((len(options), opt, param, k))
    gpu = {(o[1], o[2]): _gpu_bytes(shape, training, o[1], o[2], 1) for o in options}  # k does not matter
    need = {o: (gpu[o[1], o[2]], _host_bytes(shape, training, o[1], o[3], nvme_buffer_count),  # bytes per tier
                _STATE_BYTES[training.optimizer] * sum(shape.shard_numel[o[3]:]) if o[1] == "nvme" else 0)
            for o in options}
    fits = [o for o in options if all(v <= budgets.get(t) for v, t in zip(need[o], ("gpu", "host", "nvme")))]
    if not fits:
        raise _infeasible(shape, budgets, options, need, optimizer_kind, param_kind)
    nv = [o for o in fits if o[1] == "nvme"]  # fewer host chunks than fit is never faster: only the most
    top_k = {param: max(o[3] for o in nv if o[2] == param) for param in {o[2] for o in nv}}

    def build(o):  # the option with the deepest prefetch (up to what hides a copy) that fits the GPU
        _, opt, param, k = o
        _, want = _time(shape, training, rates, _tiers(opt, k, K), param, 1, rpn)
        depth = max(d for d in range(1, want + 1) if _gpu_bytes(shape, training, opt, param, d) <= budgets.get("gpu"))
        return _evaluate(shape, training, rates, budgets, opt, param, k, depth, rpn, nvme_buffer_count, notes)
    # The fastest by the model; min() keeps the first of equals, so the preference order breaks ties.
    return min((build(o) for o in fits if o[1] != "nvme" or o[3] == top_k[o[2]]),
               key=lambda p: round(p.step.step_s, 6))


def _infeasible(shape, budgets, options, need, opt_kind, param_kind) -> ConfigError:
    tiers = ("gpu", "host", "nvme")
    deficit = {o: [max(0.0, v - budgets.get(t)) for v, t in zip(need[o], tiers)] for o in options}
    single: dict[str, float] = {}  # tier -> smallest budget that fits when only that tier is raised
    for o in options:
        bad = [i for i, x in enumerate(deficit[o]) if x > 0]
        if len(bad) == 1:
            single[tiers[bad[0]]] = min(single.get(tiers[bad[0]], math.inf), need[o][bad[0]])
    joint_o = min(options, key=lambda o: (sum(deficit[o]), o[0]))  # least raised in all
    joint = {t: need[joint_o][i] for i, t in enumerate(tiers) if deficit[joint_o][i] > 0}
    if single:  # the tier needing the smallest relative raise
        t = min(single, key=lambda t: single[t] / max(1.0, budgets.get(t)))
        raise_to = {t: single[t]}
    else:
        raise_to, t = joint, next(iter(joint))

    def says(d):
        return " and ".join(f"{_SETTING[u]} >= {int(v)} ({math.ceil(v / GiB * 100) / 100:.2f} GiB)"
                            for u, v in d.items())
    alts = [says({u: v}) for u, v in single.items() if u != t]
    alts += [f"together {says(joint)}"] if len(joint) > 1 and joint != raise_to else []
    err = ConfigError(f"{_gib(budgets.get(t))} is too small: no placement of {_count(shape.params)} params "
                      f"({len(shape.shard_numel)} chunks, world {shape.world_size}, optimizer {opt_kind}, "
                      f"params {param_kind}) fits the budgets per rank.", setting=_SETTING[t],
                      value=getattr(budgets, f"{t}_bytes"),
                      fix=f"raise {says(raise_to)}" + (f"; or {'; or '.join(alts)}" if alts else "") + ".")
    err.smallest_budgets = replace(budgets, **{f"{u}_bytes": int(v) for u, v in raise_to.items()})
    return err
