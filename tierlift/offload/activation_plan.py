"""Activation plan: keep, swap (a fraction) or recompute each unit's saved activations.

Pure data from a pure function (no process group, no I/O, no torch): the executor
(``offload/activations.py``) measures a ``UnitActivationProfile`` per wrap unit, this
module turns profiles + budgets + PCIe rates into an ``ActivationPlan``, and the
executor runs it.  ``tierlift plan`` prints the same object.

Decisions, per unit:

* ``keep``       every saved tensor stays on the GPU (fastest, most memory);
* ``swap``       a fraction ``f`` of every saved tensor's elements (token-wise: the
                 leading ``f`` of the flattened ``[batch, seq, ...]`` rows) goes to pinned
                 host memory on the D2H stream during forward and comes back on the H2D
                 stream ahead of the unit's backward; ``1 - f`` stays on the GPU;
* ``recompute``  only the unit's inputs are kept; its forward runs again in backward;
* ``selective``  outputs of the expensive ops (matmuls, attention) are kept, the cheap
                 element-wise ones are recomputed (Korthikanti et al. 2022).

The cost model (units: bytes, seconds)::

    step_s  = base_s + sum(recompute_s of recompute/selective units) + stall_s(X)
    stall_s = max(0, X / d2h_eff - forward_s) + max(0, X / h2d_eff - backward_s)
    peak    = sum(resident bytes of every unit) <= gpu_budget,   X <= host_budget

where ``X`` is the bytes swapped in total and ``*_eff`` is the PCIe rate left after the
parameter/gradient offload traffic (``pcie_busy_fraction``).  The D2H of X overlaps the
forward and its H2D the backward; what does not fit under them is exposed.

Why a DP and not an LP solver: the model has one binary choice per unit among three
(keep / recompute / selective) and one continuous quantity (X) that is *fungible*: a
swapped byte saves one resident byte whichever keep-unit it comes from.  So the plan is
"choose modes, then swap the least X that fits the budget", solved exactly by the DP in
:func:`plan_activations` (proof there) without adding scipy as a dependency.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np

from tierlift._configbase import check, check_choice

__all__ = ["POLICIES", "DECISIONS", "ActivationConfig", "UnitActivationProfile", "ActivationRates",
           "UnitDecision", "ActivationPlan", "plan_activations", "fixed_plan"]

POLICIES = ("auto", "keep", "recompute", "swap", "selective")
DECISIONS = ("keep", "swap", "recompute", "selective")


@dataclass
class ActivationConfig:
    """``train.activations``: what happens to each unit's saved activations.

    policy: ``auto`` (planned under the budgets from a profiling step), or one decision
    for every unit: ``keep``, ``recompute`` (= ``train.activation_checkpointing: true``),
    ``swap`` (everything to pinned host memory), ``selective``.
    gpu_budget_bytes: activation bytes allowed on the GPU; 0 = what the device has free
    after parameters, buffers and ``margin_bytes`` (on CPU runs: unlimited).
    host_budget_bytes: pinned host bytes for swapped activations; 0 = half of the host
    memory available when the engine starts (GPU runs; CPU runs copy unpinned).
    min_swap_bytes: saved tensors smaller than this stay put (copies of a few KiB cost
    more in launch overhead than they save).
    replan_tolerance: the policy re-plans when a unit's measured saved bytes differ from
    the plan's by more than this fraction."""

    policy: str = "keep"
    gpu_budget_bytes: int = 0
    host_budget_bytes: int = 0
    margin_bytes: int = 4 << 30
    min_swap_bytes: int = 1 << 16
    replan_tolerance: float = 0.10

    def __post_init__(self) -> None:
        check_choice("train.activations.policy", self.policy, list(POLICIES))
        for name in ("gpu_budget_bytes", "host_budget_bytes", "margin_bytes", "min_swap_bytes"):
            v = getattr(self, name)
            check(isinstance(v, int) and v >= 0, f"train.activations.{name}", v, "must be an integer >= 0.",
                  "give bytes, or 0 for the default.")
        check(0 < self.replan_tolerance < 10, "train.activations.replan_tolerance", self.replan_tolerance,
              "must be in (0, 10).", "use 0.1 (10%).")


@dataclass(frozen=True)
class UnitActivationProfile:
    """What one unit's activations cost, measured by the executor's profiling step.

    saved_bytes: bytes autograd keeps for the unit's backward under ``keep``;
    input_bytes: bytes kept under ``recompute`` (the unit's inputs);
    selective_bytes: bytes kept under ``selective`` (expensive ops' outputs + inputs);
    forward_s: the unit's forward time, what ``recompute`` adds to the step;
    selective_s: the cheap ops' share of it, what ``selective`` adds."""

    unit: str
    saved_bytes: int
    input_bytes: int
    selective_bytes: int
    forward_s: float
    selective_s: float

    def __post_init__(self) -> None:
        if min(self.saved_bytes, self.input_bytes, self.selective_bytes) < 0 or \
                min(self.forward_s, self.selective_s) < 0:
            raise ValueError(f"activation profile of unit {self.unit!r} has a negative entry: {self}")


@dataclass(frozen=True)
class ActivationRates:
    """The budgets and the clock the plan is made under (bytes, bytes/s, seconds)."""

    gpu_budget_bytes: float  # math.inf = unlimited
    host_budget_bytes: float  # math.inf = unlimited
    d2h_bytes_per_s: float
    h2d_bytes_per_s: float
    forward_s: float  # the whole step's forward (D2H of swaps hides under it)
    backward_s: float  # the whole step's backward (H2D of swaps hides under it)
    base_step_s: float = 0.0  # step time with every unit kept (no recompute, no stall)
    pcie_busy_fraction: float = 0.0  # PCIe share that parameter/gradient offload already uses

    def stall_s(self, swapped_bytes: float) -> float:
        if swapped_bytes <= 0:
            return 0.0
        free = max(1e-6, 1.0 - self.pcie_busy_fraction)
        return (max(0.0, swapped_bytes / (self.d2h_bytes_per_s * free) - self.forward_s)
                + max(0.0, swapped_bytes / (self.h2d_bytes_per_s * free) - self.backward_s))


@dataclass(frozen=True)
class UnitDecision:
    unit: str
    decision: str  # one of DECISIONS
    swap_fraction: float  # of the unit's saved bytes; 0 unless decision == "swap"
    kept_bytes: int  # resident on the GPU between the unit's forward and backward
    swapped_bytes: int  # in pinned host memory over the same interval
    recompute_s: float  # added to the step


@dataclass(frozen=True)
class ActivationPlan:
    policy: str
    decisions: tuple[UnitDecision, ...] = ()
    predicted_step_s: float = 0.0
    predicted_peak_bytes: int = 0  # activation bytes resident on the GPU, all units
    recompute_s: float = 0.0
    swap_stall_s: float = 0.0
    swapped_bytes: int = 0
    feasible: bool = True  # False: even recomputing everything exceeds the GPU budget
    notes: tuple[str, ...] = field(default=())

    def decision(self, unit: str) -> UnitDecision | None:
        for d in self.decisions:
            if d.unit == unit:
                return d
        return None

    def to_json(self) -> list[dict]:
        return [asdict(d) for d in self.decisions]

    def to_record(self) -> dict:
        """The whole plan as JSON-able data (``from_record`` reads it back)."""
        return {"policy": self.policy, "decisions": self.to_json(), "predicted_step_s": self.predicted_step_s,
                "predicted_peak_bytes": self.predicted_peak_bytes, "recompute_s": self.recompute_s,
                "swap_stall_s": self.swap_stall_s, "swapped_bytes": self.swapped_bytes, "feasible": self.feasible,
                "notes": list(self.notes)}

    @classmethod
    def from_record(cls, d: dict) -> "ActivationPlan":
        return cls(d["policy"], tuple(UnitDecision(**x) for x in d["decisions"]), float(d["predicted_step_s"]),
                   int(d["predicted_peak_bytes"]), float(d["recompute_s"]), float(d["swap_stall_s"]),
                   int(d["swapped_bytes"]), bool(d["feasible"]), tuple(d.get("notes", ())))

    def to_table(self) -> str:
        """One row per unit: decision, swap fraction, bytes kept / swapped, recompute ms."""
        rows = [f"activation plan ({self.policy}): predicted +{self.recompute_s * 1e3:.1f} ms recompute, "
                f"{self.swap_stall_s * 1e3:.1f} ms swap stall, {self.predicted_peak_bytes / 2**30:.3f} GiB kept, "
                f"{self.swapped_bytes / 2**30:.3f} GiB swapped" + ("" if self.feasible else "  ** over budget **"),
                f"  {'unit':<32}{'decision':<11}{'swap':>6}{'kept MiB':>12}{'swapped MiB':>13}{'recompute ms':>14}"]
        rows += [f"  {d.unit[:31]:<32}{d.decision:<11}{d.swap_fraction:>6.2f}{d.kept_bytes / 2**20:>12.1f}"
                 f"{d.swapped_bytes / 2**20:>13.1f}{d.recompute_s * 1e3:>14.2f}" for d in self.decisions]
        rows += [f"  note: {n}" for n in self.notes]
        return "\n".join(rows) + "\n"


def _decide(p: UnitActivationProfile, mode: str, swap_fraction: float = 0.0) -> UnitDecision:
    if mode == "keep":
        return UnitDecision(p.unit, "keep", 0.0, p.saved_bytes, 0, 0.0)
    if mode == "recompute":
        return UnitDecision(p.unit, "recompute", 0.0, p.input_bytes, 0, p.forward_s)
    if mode == "selective":
        return UnitDecision(p.unit, "selective", 0.0, p.selective_bytes, 0, p.selective_s)
    swapped = int(round(p.saved_bytes * swap_fraction))
    return UnitDecision(p.unit, "swap", swap_fraction, p.saved_bytes - swapped, swapped, 0.0)


def _finish(policy: str, decisions: list[UnitDecision], rates: ActivationRates, feasible: bool = True,
            notes: Sequence[str] = ()) -> ActivationPlan:
    rec = sum(d.recompute_s for d in decisions)
    x = sum(d.swapped_bytes for d in decisions)
    stall = rates.stall_s(x)
    return ActivationPlan(policy, tuple(decisions), rates.base_step_s + rec + stall,
                          sum(d.kept_bytes for d in decisions), rec, stall, x, feasible, tuple(notes))


def fixed_plan(policy: str, profiles: Sequence[UnitActivationProfile], rates: ActivationRates) -> ActivationPlan:
    """One decision for every unit (the non-``auto`` policies)."""
    check_choice("train.activations.policy", policy, [p for p in POLICIES if p != "auto"])
    if policy == "swap":
        return _finish(policy, [_decide(p, "swap", 1.0) for p in profiles], rates)
    return _finish(policy, [_decide(p, policy) for p in profiles], rates)


def plan_activations(profiles: Sequence[UnitActivationProfile], rates: ActivationRates, *,
                     bins: int = 256) -> ActivationPlan:
    """The plan of least predicted step time whose resident activations fit the GPU budget
    and whose swapped bytes fit the host budget.

    Algorithm and proof.  Every unit takes a mode m in {keep, recompute, selective} and
    keep-units may additionally swap part of their bytes.  For a mode vector, let
    M = resident bytes before any swap, K = bytes of keep-units (the swappable ones),
    T = recompute seconds.  A swapped byte lowers the resident bytes by exactly one
    whichever keep-unit it comes from, and the cost of swapping, stall_s(X), is
    non-decreasing in X; so the best X for a mode vector is X* = max(0, M - G), feasible
    iff X* <= min(K, H).  The cost of a mode vector therefore depends on it only through
    (M, K, T), and for fixed (M, K) the smallest T is best.  The DP over units keeps, for
    every reachable (M, K) cell, the least T of any prefix reaching it (optimal
    substructure: replacing a prefix by one with the same (M, K) and smaller T keeps
    every extension feasible and lowers its cost), so the minimum over final cells of
    T + stall_s(X*) is the optimum.  Bytes are counted in ``bins`` cells: resident bytes
    rounded *up* and swappable bytes rounded *down*, so every plan returned fits the real
    budgets; the optimum may leave at most ``units x cell`` bytes of budget unused.
    Which keep-units carry X does not change the cost in this model; they are taken in
    forward order (the earliest forward units are the last needed in backward, so their
    D2H and H2D have the most compute to hide under), the last one partly: that
    fractional unit is what lets the plan fill the budget exactly.
    """
    if not profiles:
        return _finish("auto", [], rates)
    g, h = rates.gpu_budget_bytes, rates.host_budget_bytes
    if math.isinf(g) or sum(p.saved_bytes for p in profiles) <= g:
        return _finish("auto", [_decide(p, "keep") for p in profiles], rates, notes=["everything fits: keep"])
    total = sum(max(p.saved_bytes, p.input_bytes, p.selective_bytes) for p in profiles)
    # Exact when every size is a multiple of the cell (their gcd, if that needs <= bins
    # cells); otherwise sizes are rounded as the docstring says.
    sizes = [b for p in profiles for b in (p.saved_bytes, p.input_bytes, p.selective_bytes) if b > 0]
    cell = max(math.gcd(*sizes) if sizes else 1, -(-total // bins), 1)
    up = lambda b: -(-int(b) // cell)  # noqa: E731  (resident: round up)
    down = lambda b: int(b) // cell  # noqa: E731  (swappable: round down)
    nm = sum(up(max(p.saved_bytes, p.input_bytes, p.selective_bytes)) for p in profiles)
    nk = sum(down(p.saved_bytes) for p in profiles)
    inf = float("inf")
    t = np.full((nm + 1, nk + 1), inf)
    t[0, 0] = 0.0
    choice = np.zeros((len(profiles), nm + 1, nk + 1), dtype=np.uint8)
    modes = ("keep", "recompute", "selective")
    for i, p in enumerate(profiles):
        moves = ((up(p.saved_bytes), down(p.saved_bytes), 0.0), (up(p.input_bytes), 0, p.forward_s),
                 (up(p.selective_bytes), 0, p.selective_s))
        new = np.full_like(t, inf)
        for j, (dm, dk, cost) in enumerate(moves):
            cand = np.full_like(t, inf)
            cand[dm:, dk:] = t[:nm + 1 - dm, :nk + 1 - dk] + cost
            better = cand < new
            new[better] = cand[better]
            choice[i][better] = j
        t = new
    best, best_cell = inf, None
    for m, k in zip(*np.nonzero(np.isfinite(t))):
        x = max(0.0, m * cell - g)
        if x > min(k * cell, h):
            continue
        cost = t[m, k] + rates.stall_s(x)
        if cost < best - 1e-12 or (abs(cost - best) <= 1e-12 and best_cell is not None and m < best_cell[0]):
            best, best_cell = cost, (m, k)
    if best_cell is None:
        plan = _finish("auto", [_decide(p, "recompute") for p in profiles], rates, feasible=False,
                       notes=[f"even recomputing every unit keeps {sum(p.input_bytes for p in profiles):,} bytes, "
                              f"over the GPU budget of {int(g):,}"])
        return plan
    m, k = best_cell
    picked = []
    for i in range(len(profiles) - 1, -1, -1):
        j = int(choice[i][m, k])
        picked.append(modes[j])
        p = profiles[i]
        moves = ((up(p.saved_bytes), down(p.saved_bytes)), (up(p.input_bytes), 0), (up(p.selective_bytes), 0))
        m, k = m - moves[j][0], k - moves[j][1]
    picked.reverse()
    # Swap the least real bytes that fit the budget, from keep-units in forward order.
    resident = sum(_decide(p, mode).kept_bytes for p, mode in zip(profiles, picked))
    need = max(0, resident - int(g))
    decisions = []
    for p, mode in zip(profiles, picked):
        if mode == "keep" and need > 0 and p.saved_bytes > 0:
            take = min(p.saved_bytes, need)
            need -= take
            decisions.append(_decide(p, "swap", take / p.saved_bytes))
        else:
            decisions.append(_decide(p, mode))
    return _finish("auto", decisions, rates)
