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
        HOST_BASE_BYTES.   NVMe: s n_i where state is on NVMe (+ c n_i with parameters
        there, offload.param: nvme, which then keep no host copy but 6 pinned read slots).
Placement: ``offload/execplan.place_chunks``, the engine's own rule (first-fit in
forward order of max_in_cpu elements).  "auto" tries GPU, host, and NVMe with
max_in_cpu at each prefix sum of the shards and at the most the host budget allows,
parameters on GPU or host, and keeps the fastest.

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
        with parameters on the host.  Parameters on NVMe add a disk read of c n_i per
        NVMe-tier chunk and micro-batch (kept gathered forward to backward) to X.
        Exposed = max(0, X - C) + the first copy + stalls where prefetch is shallower
        than one group's copy needs.
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
from tierlift.offload.execplan import optimizer_tiers_for
from tierlift.offload.policy import CPUOffload, NoOffload, NVMeOffload, OffloadConfig, params_offload_error
from tierlift.runtime.plan_types import (CPU_PASS_FACTOR, GPU_SLACK, HOST_BASE_BYTES, MAX_PREFETCH,  # noqa: F401
                                         PARAM_SLOTS, PIECE_NUMEL, _STATE_BYTES, Budgets, ChunkPlacement, GiB,
                                         ModelShape, NodeRates, StepEstimate, TrainingShape, _count, _gib, _SETTING)

__all__ = ["ModelShape", "Budgets", "NodeRates", "TrainingShape", "ChunkPlacement", "StepEstimate", "Plan",
           "plan", "GiB"]


@dataclass(frozen=True)
class Plan:
    optimizer_kind: str  # none | cpu | nvme
    param_kind: str      # none | cpu | nvme
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

    @property
    def optimizer_tiers(self) -> tuple[str, ...]:
        return tuple(p.optimizer_tier for p in self.placements)

    def replan(self, optimizer_tiers: Sequence[str] | None = None, prefetch_units: int | None = None) -> "Plan":
        """The same plan with optimizer state where ``optimizer_tiers`` puts it (per chunk:
        gpu | host | nvme, as the engine's ExecutionPlan has it) or another prefetch
        depth, re-costed.  Budgets are not enforced (Policy checks)."""
        tiers = self.optimizer_tiers if optimizer_tiers is None else tuple(optimizer_tiers)
        opt = self.optimizer_kind if "nvme" not in tiers else "nvme"
        return _evaluate(self.shape, self.training, self.rates, self.budgets, opt, self.param_kind, tiers,
                         self.prefetch_units if prefetch_units is None else prefetch_units,
                         self.ranks_per_node, self.nvme_buffer_count, self.notes)

    def to_offload_config(self, base=None, nvme_path: str | None = None):
        """An OffloadConfig: kinds, max_in_cpu and budgets from the plan; NVMe path,
        aio and buffers from ``base`` (or ``nvme_path``).  Only for a placement the
        rule reproduces from max_in_cpu (what ``plan`` chooses); a re-planned one (a
        policy move) lives in the engine's ExecutionPlan, not in a config."""
        if optimizer_tiers_for(self.optimizer_kind, self.shape.shard_numel, self.max_in_cpu) != self.optimizer_tiers:
            raise ValueError(f"placement {self.optimizer_tiers} is not what max_in_cpu={self.max_in_cpu} gives")
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
        if self.param_kind == "nvme":  # parameters share the optimizer's extent file
            param = NVMeOffload(path=optimizer.path)
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
                f"optimizer state: {opt}; parameters: {_PARAMS[self.param_kind]}; prefetch "
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
_PARAMS = {"none": "GPU", "cpu": "host", "nvme": "NVMe (host for host-tier chunks)"}


def _param_tier(param: str, opt_tier: str) -> str:
    return {"none": "gpu", "cpu": "host"}.get(param) or ("nvme" if opt_tier == "nvme" else "host")


def _nvme_bytes(sh: ModelShape, tr: TrainingShape, param: str, tiers: Sequence[str]) -> int:
    per = _STATE_BYTES[tr.optimizer] + (tr.compute_bytes if param == "nvme" else 0)
    return per * sum(ni for ni, t in zip(sh.shard_numel, tiers) if t == "nvme")


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


def _host_bytes(sh: ModelShape, tr: TrainingShape, opt: str, tiers: Sequence[str], buffers: int,
                param: str = "none") -> int:
    n, c, s = sh.shard_numel, tr.compute_bytes, _STATE_BYTES[tr.optimizer]
    if opt == "none":
        return 0
    host = [ni for ni, t in zip(n, tiers) if t == "host"]
    nv = [ni for ni, t in zip(n, tiers) if t == "nvme"]
    on_disk = param == "nvme"  # compute-dtype parameters on NVMe: read slots instead of a host copy
    staging = buffers * (s + c * on_disk) * min(max(nv), PIECE_NUMEL) if nv else 0  # NVMe staging sets
    slots = PARAM_SLOTS * c * max(nv) if nv and on_disk else 0
    grads = 4 * sum(n) if tr.deferred_step else 2 * 4 * max(n)  # per-chunk buffers, or the ring
    return s * sum(host) + (0 if on_disk else c) * sum(nv) + staging + slots + grads


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
    param_disk = M * c * sum(ni for ni, t in zip(n, tiers) if t == "nvme") / rd if param == "nvme" else 0.0
    # Bytes a gather copies in per element: fp32 masters of host-tier chunks, compute dtype from NVMe-tier ones.
    h2d_elems = sum((4 if t == "host" else c) * ni for ni, t in zip(n, tiers) if t != "gpu")
    h2d_unit = 4 * max(sh.groups or (0,)) / sh.world_size / (rates.h2d_gbps * 1e9) if off else 0.0  # one group
    h2d = (2 * M * h2d_elems if param != "none" else h2d_elems) / (rates.h2d_gbps * 1e9)
    d2h = M * r * sum(off) / (rates.d2h_gbps * 1e9)
    need = math.ceil(h2d_unit / t_unit) + 1 if t_unit > 0 else 2  # groups ahead that hide one copy
    want = max(1, min(MAX_PREFETCH, units - 1, max(2, need)))
    copies = 2 * M if param != "none" else 1  # copy-ins per group per step: every gather, or one refresh
    stall = copies * units * max(0.0, h2d_unit - depth * t_unit)
    exposed_pcie = max(0.0, max(h2d, d2h, param_disk) - compute) + stall + (h2d_unit if param != "none" else 0.0)
    step = compute + gpu_opt + exposed_host + exposed_pcie
    est = StepEstimate(compute, fwd, bwd, gpu_opt, cpu_opt, disk + param_disk, h2d + d2h, window, exposed_host,
                       exposed_pcie,
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


def _evaluate(sh, tr, rates, budgets, opt, param, tiers, depth, ranks_per_node, buffers, notes=()) -> Plan:
    est, _ = _time(sh, tr, rates, list(tiers), param, depth, ranks_per_node)
    pinned = _host_bytes(sh, tr, opt, tiers, buffers, param)
    nvme = _nvme_bytes(sh, tr, param, tiers)
    placements = tuple(ChunkPlacement(i, t, _param_tier(param, t), ni)
                       for i, (t, ni) in enumerate(zip(tiers, sh.shard_numel)))
    max_in_cpu = sum(ni for ni, t in zip(sh.shard_numel, tiers) if t == "host") if opt == "nvme" else 0
    return Plan(opt, param, placements, max_in_cpu, depth, pinned, nvme, _gpu_bytes(sh, tr, opt, param, depth),
                pinned + HOST_BASE_BYTES, est, budgets, rates, tr, sh, ranks_per_node, buffers, tuple(notes))


def plan(shape: ModelShape, budgets: Budgets, rates: NodeRates, training: TrainingShape,
         optimizer_kind: str = "auto", param_kind: str = "auto", ranks_per_node: int | None = None,
         nvme_buffer_count: int = 8, notes: Sequence[str] = ()) -> Plan:
    """The fastest feasible plan, or ConfigError naming the budget to raise (and the
    smallest value that fits, also on the exception as ``smallest_budgets``)."""
    for setting, value, ok in (("offload.optimizer.kind", optimizer_kind, ("auto", "none", "cpu", "nvme")),
                               ("offload.param.kind", param_kind, ("auto", "none", "cpu", "nvme")),
                               ("optimizer.name", training.optimizer, ("adamw", "sgd"))):
        if value not in ok:
            raise ConfigError("is not a choice the planner knows.", setting=setting, value=value,
                              fix=f"use one of {list(ok)}.")
    if param_kind in ("cpu", "nvme") and training.zero_stage != 3:
        raise ConfigError("offloading parameters needs ZeRO stage 3.", setting="offload.param.kind",
                          value=param_kind, fix="set zero.stage: 3, or offload.param: {kind: none}.")
    why = params_offload_error(param_kind, optimizer_kind) if "auto" not in (param_kind, optimizer_kind) else None
    if why is not None:
        raise ConfigError(why[1], setting=why[0], value=param_kind if why[0] == "offload.param" else optimizer_kind,
                          fix=why[2])
    n, rpn = shape.shard_numel, ranks_per_node or shape.world_size
    options = []  # (preference, opt, param, tiers): the order GPU > host > NVMe, more host elements first
    for opt in ("none", "cpu", "nvme") if optimizer_kind == "auto" else (optimizer_kind,):
        for param in ("none", "cpu") if param_kind == "auto" else (param_kind,):
            if params_offload_error(param, opt) or (param != "none" and training.zero_stage != 3):
                continue
            for tiers in _candidate_tiers(shape, training, budgets, opt, param, nvme_buffer_count,
                                          all_host=optimizer_kind != "auto"):
                options.append((len(options), opt, param, tiers))
    gpu = {(o[1], o[2]): _gpu_bytes(shape, training, o[1], o[2], 1) for o in options}  # tiers do not matter
    need = {o: (gpu[o[1], o[2]], _host_bytes(shape, training, o[1], o[3], nvme_buffer_count, o[2]),  # per tier
                _nvme_bytes(shape, training, o[2], o[3])) for o in options}
    fits = [o for o in options if all(v <= budgets.get(t) for v, t in zip(need[o], ("gpu", "host", "nvme")))]
    if not fits:
        raise _infeasible(shape, budgets, options, need, optimizer_kind, param_kind)

    def host_elems(o):
        return sum(ni for ni, t in zip(n, o[3]) if t == "host")
    nv = [o for o in fits if o[1] == "nvme"]  # fewer host elements than fit is never faster: only the most
    top = {param: max(host_elems(o) for o in nv if o[2] == param) for param in {o[2] for o in nv}}

    def build(o):  # the option with the deepest prefetch (up to what hides a copy) that fits the GPU
        _, opt, param, tiers = o
        _, want = _time(shape, training, rates, list(tiers), param, 1, rpn)
        depth = max(d for d in range(1, want + 1) if _gpu_bytes(shape, training, opt, param, d) <= budgets.get("gpu"))
        return _evaluate(shape, training, rates, budgets, opt, param, tiers, depth, rpn, nvme_buffer_count, notes)
    # The fastest by the model; min() keeps the first of equals, so the preference order breaks ties.
    return min((build(o) for o in fits if o[1] != "nvme" or host_elems(o) == top[o[2]]),
               key=lambda p: round(p.step.step_s, 6))


def _candidate_tiers(sh: ModelShape, tr: TrainingShape, budgets: Budgets, opt: str, param: str, buffers: int,
                     all_host: bool) -> list[tuple[str, ...]]:
    """Optimizer tiers to cost for ``opt``: with NVMe, the placement rule at max_in_cpu =
    each prefix sum of the shards (all in host memory only when NVMe was asked for) and
    at the most host elements the host budget allows (first-fit may pack chunks past a
    large one that a prefix stops at), most host elements first, duplicates dropped."""
    n = sh.shard_numel
    if opt != "nvme":
        return [optimizer_tiers_for(opt, n)]
    caps = [sum(n[:k]) for k in range(len(n) - (not all_host), -1, -1)]
    s, c = _STATE_BYTES[tr.optimizer], tr.compute_bytes * (param != "nvme")
    if budgets.host_bytes is not None and s > c:  # host bytes grow by s - c per element kept in host memory
        fixed = _host_bytes(sh, tr, opt, ("nvme",) * len(n), buffers, param)  # staging sized for every chunk
        caps.append(max(0, (budgets.host_bytes - fixed) // (s - c)))
    out = {optimizer_tiers_for("nvme", n, cap): cap for cap in caps}
    if not all_host:
        out.pop(("host",) * len(n), None)
    return sorted(out, key=lambda t: -sum(ni for ni, x in zip(n, t) if x == "host"))


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
