"""Policy (pure decision logic): compare step telemetry with the plan and re-plan at
step boundaries.  Applying a decision to a running engine is the engine's job; this
module only decides, and says why with the numbers that made it decide.

Rules, in the order they are checked each step:

1. GPU near its cap (reserved / cap >= ``gpu_high``): prefetch one unit shallower
   (each unit fewer frees one gathered chunk).  Acts at once: memory is urgent.
2. Prefetch stalls (> ``stall_ms`` for ``stall_patience`` steps in a row): prefetch
   one unit deeper, up to ``max_prefetch`` and only while reserved / cap stays below
   ``gpu_low`` and the plan's GPU peak at the new depth fits its budget.
3. Host-memory pressure (available < ``host_min_available_bytes``): move the
   optimizer state of the last host-resident chunks to NVMe, as few as free the
   shortfall plus ``host_margin_bytes``, within the NVMe budget; only with an NVMe
   tier (``offload.optimizer.kind: nvme``: its extents exist for every chunk).
4. Off plan (measured step > ``slow_factor`` x predicted for ``stall_patience``
   steps): a note with the measured rates, no change.

Hysteresis: every rule has its own ``cooldown_steps`` after it fires, counters of
consecutive steps reset when a rule fires, and prefetch goes deeper only below
``gpu_low`` while it goes shallower at ``gpu_high`` -- the band between keeps the
depth from flapping.  Every decision also replaces ``Policy.plan``; the Replanner
turns it into a new ExecutionPlan the engine applies and verifies at the step
boundary (``parallel/plan_exec.apply_plan``).  Nothing here touches the config.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tierlift._configbase import check
from tierlift.runtime.planner import GiB, Plan

__all__ = ["Thresholds", "Decision", "Policy", "PolicyConfig"]


@dataclass(frozen=True)
class Thresholds:
    stall_ms: float = 2.0             # prefetch wait per step (ms) that counts as a stall
    stall_patience: int = 3           # consecutive steps over a threshold before acting
    max_prefetch: int = 8             # units
    gpu_high: float = 0.92            # reserved / cap at or above which prefetch gets shallower
    gpu_low: float = 0.85             # deeper prefetch only below this
    host_min_available_bytes: int = 4 * GiB
    host_margin_bytes: int = 2 * GiB  # freed beyond the shortfall, so one move is enough
    cooldown_steps: int = 20          # steps a rule stays quiet after it fired
    slow_factor: float = 1.5          # measured / predicted step time that counts as off plan


@dataclass
class PolicyConfig:
    """The ``policy:`` section: re-plan at step boundaries from what the node measures.
    The thresholds are :class:`Thresholds`' (bytes, ms, fractions of the GPU cap)."""

    enabled: bool = True
    stall_ms: float = 2.0
    stall_patience: int = 3
    max_prefetch: int = 8
    gpu_high: float = 0.92
    gpu_low: float = 0.85
    host_min_available_bytes: int = 4 * GiB
    host_margin_bytes: int = 2 * GiB
    cooldown_steps: int = 20
    slow_factor: float = 1.5

    def __post_init__(self) -> None:
        check(self.stall_patience >= 1, "policy.stall_patience", self.stall_patience, "must be >= 1.", "use 3.")
        check(self.max_prefetch >= 1, "policy.max_prefetch", self.max_prefetch, "must be >= 1.", "use 8.")
        check(0 < self.gpu_low < self.gpu_high <= 1, "policy.gpu_low", (self.gpu_low, self.gpu_high),
              "needs 0 < gpu_low < gpu_high <= 1 (the band between keeps prefetch from flapping).",
              "use gpu_low 0.85, gpu_high 0.92.")
        for name in ("stall_ms", "host_min_available_bytes", "host_margin_bytes", "cooldown_steps"):
            v = getattr(self, name)
            check(v >= 0, f"policy.{name}", v, "must be >= 0.", "use the default.")
        check(self.slow_factor > 1, "policy.slow_factor", self.slow_factor, "must be > 1.", "use 1.5.")

    def thresholds(self) -> "Thresholds":
        return Thresholds(**{k: v for k, v in vars(self).items() if k != "enabled"})


@dataclass(frozen=True)
class Decision:
    """new_plan_fields: the Plan fields that change (move_to_nvme adds ``moved_chunks``,
    the chunk indices whose optimizer state goes to NVMe); empty for notes."""
    step: int
    kind: str  # prefetch_deeper | prefetch_shallower | move_to_nvme | host_pressure | off_plan
    reason: str
    new_plan_fields: dict[str, Any] = field(default_factory=dict)


class Policy:
    """Feed ``observe`` once per optimizer step; it returns the decisions taken."""

    def __init__(self, plan: Plan, thresholds: Thresholds | None = None) -> None:
        self.plan = plan
        self.th = thresholds or Thresholds()
        self.log: list[Decision] = []
        self._quiet_until: dict[str, int] = {}  # rule -> first step it may fire again
        self._stalled = 0
        self._slow = 0

    def _ready(self, rule: str, step: int) -> bool:
        return step >= self._quiet_until.get(rule, -1)

    def _fire(self, rule: str, step: int, kind: str, reason: str, fields: dict, plan: Plan | None,
              out: list) -> None:
        self._quiet_until[rule] = step + self.th.cooldown_steps
        if plan is not None:
            self.plan = plan
        d = Decision(step, kind, reason, fields)
        self.log.append(d)
        out.append(d)

    def observe(self, step: int, metrics: dict[str, float]) -> list[Decision]:
        """metrics (any may be missing): step_time_s, prefetch_stall_ms, host_rss_bytes,
        host_available_bytes (or host_limit_bytes, read with the RSS), gpu_reserved_bytes,
        gpu_cap_bytes, disk_read_gbps / disk_write_gbps (or disk_gbps)."""
        out: list[Decision] = []
        th, plan = self.th, self.plan
        reserved, cap = metrics.get("gpu_reserved_bytes"), metrics.get("gpu_cap_bytes")
        ratio = reserved / cap if reserved is not None and cap else None
        depth = plan.prefetch_units

        # 1. GPU near its cap: shallower prefetch, at once.
        if ratio is not None and ratio >= th.gpu_high and depth > 1 and self._ready("shallower", step):
            new = plan.replan(prefetch_units=depth - 1)
            freed = plan.gpu_peak_bytes - new.gpu_peak_bytes
            self._fire("shallower", step, "prefetch_shallower",
                       f"GPU reserved {reserved / GiB:.2f} GiB is {ratio:.0%} of the {cap / GiB:.2f} GiB cap "
                       f"(>= {th.gpu_high:.0%}): prefetch {depth} -> {depth - 1} units, ~{freed / GiB:.2f} GiB "
                       f"less at peak; predicted step {plan.step.step_s:.3f} -> {new.step.step_s:.3f} s",
                       {"prefetch_units": depth - 1}, new, out)
            self._quiet_until["deeper"] = step + th.cooldown_steps  # no deepening right after
            self._stalled = 0

        # 2. Stalls: deeper prefetch, after stall_patience steps in a row.
        stall = metrics.get("prefetch_stall_ms")
        if stall is not None:
            self._stalled = self._stalled + 1 if stall > th.stall_ms else 0
            depth = self.plan.prefetch_units
            if (self._stalled >= th.stall_patience and self._ready("deeper", step) and depth < th.max_prefetch
                    and not out):
                new = self.plan.replan(prefetch_units=depth + 1)
                gpu_ok = new.gpu_peak_bytes <= self.plan.budgets.get("gpu")
                if (ratio is None or ratio < th.gpu_low) and gpu_ok:
                    self._fire("deeper", step, "prefetch_deeper",
                               f"prefetch stalled {stall:.1f} ms (> {th.stall_ms:g} ms) for {self._stalled} "
                               f"steps: prefetch {depth} -> {depth + 1} units (GPU peak "
                               f"{self.plan.gpu_peak_bytes / GiB:.2f} -> {new.gpu_peak_bytes / GiB:.2f} GiB"
                               + (f", reserved {ratio:.0%} of cap)" if ratio is not None else ")"),
                               {"prefetch_units": depth + 1}, new, out)
                    self._stalled = 0

        # 3. Host-memory pressure: optimizer state of the last host chunks -> NVMe.
        avail = metrics.get("host_available_bytes")
        rss = metrics.get("host_rss_bytes")
        if avail is None and rss is not None and metrics.get("host_limit_bytes"):
            avail = metrics["host_limit_bytes"] - rss
        if avail is not None and avail < th.host_min_available_bytes and self._ready("host", step):
            self._host_pressure(step, avail, rss, out)

        # 4. Off plan: a note with what was measured.
        measured = metrics.get("step_time_s")
        if measured is not None:
            predicted = self.plan.step.step_s
            self._slow = self._slow + 1 if measured > th.slow_factor * predicted else 0
            if self._slow >= th.stall_patience and self._ready("off_plan", step):
                disk = metrics.get("disk_read_gbps") or metrics.get("disk_gbps")
                extra = ""
                if disk is not None and self.plan.nvme_bytes:
                    extra = f"; disk measured {disk:.2f} GB/s vs {self.plan.rates.disk_read_gbps:g} GB/s planned"
                self._fire("off_plan", step, "off_plan",
                           f"step took {measured:.3f} s for {self._slow} steps, {measured / predicted:.1f}x the "
                           f"predicted {predicted:.3f} s (> {th.slow_factor:g}x){extra}; plan unchanged",
                           {}, None, out)
                self._slow = 0
        return out

    def _host_pressure(self, step: int, avail: float, rss: float | None, out: list) -> None:
        th, plan = self.th, self.plan
        shortfall = th.host_min_available_bytes - avail + th.host_margin_bytes
        # Host-resident chunks where the plan (the engine's placement) has them, not
        # necessarily a prefix: the last in forward order move first (latest deadlines).
        host = [p.index for p in plan.placements if p.optimizer_tier == "host"]
        head = (f"host memory available {avail / GiB:.2f} GiB < {th.host_min_available_bytes / GiB:.2f} GiB"
                + (f" (RSS {rss / GiB:.2f} GiB)" if rss is not None else ""))
        best = None
        for m in range(1, len(host) + 1) if plan.optimizer_kind == "nvme" else ():  # fewest that free enough
            tiers = tuple("nvme" if i in host[-m:] else t for i, t in enumerate(plan.optimizer_tiers))
            new = plan.replan(optimizer_tiers=tiers)
            if new.nvme_bytes > plan.budgets.get("nvme"):
                break
            best = (m, new)
            if plan.pinned_pool_bytes - new.pinned_pool_bytes >= shortfall:
                break
        if best is None or plan.pinned_pool_bytes - best[1].pinned_pool_bytes <= 0:
            why = ("optimizer state is on the GPU" if plan.optimizer_kind == "none" else
                   "no NVMe tier (offload.optimizer.kind is cpu)" if plan.optimizer_kind == "cpu" else
                   "no host-resident optimizer state left to move" if not host else
                   f"moving it would exceed the NVMe budget {plan.budgets.nvme_bytes or 0:,} B or free nothing")
            self._fire("host", step, "host_pressure", f"{head}; nothing moved: {why}", {}, None, out)
            return
        m, new = best
        freed = plan.pinned_pool_bytes - new.pinned_pool_bytes
        moved = host[-m:]
        enough = "" if freed >= shortfall else f" (short of the {shortfall / GiB:.2f} GiB wanted)"
        self._fire("host", step, "move_to_nvme",
                   f"{head}: moving optimizer state of {m} chunk(s) {moved} "
                   f"({(new.nvme_bytes - plan.nvme_bytes) / GiB:.2f} GiB) to NVMe frees "
                   f"{freed / GiB:.2f} GiB pinned{enough} (pool {plan.pinned_pool_bytes / GiB:.2f} -> "
                   f"{new.pinned_pool_bytes / GiB:.2f} GiB); max_in_cpu {plan.max_in_cpu or 'all'} -> "
                   f"{new.max_in_cpu:,}; predicted step {plan.step.step_s:.3f} -> {new.step.step_s:.3f} s",
                   {"optimizer_kind": new.optimizer_kind, "max_in_cpu": new.max_in_cpu, "moved_chunks": moved,
                    "optimizer_tiers": new.optimizer_tiers,
                    "pinned_pool_bytes": new.pinned_pool_bytes, "nvme_bytes": new.nvme_bytes}, new, out)
