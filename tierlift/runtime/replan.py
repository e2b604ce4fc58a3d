"""Re-planning a running job: the plan made at start, the policy fed every step,
and its decisions carried out on the engine at the step boundary.

The cost model (``planner.Plan``) prices the engine's own ExecutionPlan: the chunks
where it put them, at its prefetch depth.  A decision becomes a new ExecutionPlan
that ``parallel/plan_exec.apply_plan`` executes and verifies; the user's config is
never changed (it goes into checkpoints as given).

Every rank must take the same decision (prefetch depth changes the order in which
all-gathers and reduce-scatters are issued, and that order must match across
ranks), so the measurements are first agreed on with one all-reduce (MAX) and the
policy, which is deterministic, then sees the same numbers everywhere.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import psutil
import torch
import torch.distributed as dist

from tierlift.errors import ConfigError
from tierlift.parallel.plan_exec import apply_plan
from tierlift.runtime.plan_config import plan_for_config
from tierlift.runtime.policy import Decision, Policy

__all__ = ["Replanner"]

log = logging.getLogger("tierlift.replan")


class Replanner:
    """Builds the plan for the engine's real layout, then ``step_end`` per step."""

    def __init__(self, engine, cfg, world_size: int) -> None:
        self.engine, self.cfg, self.world_size = engine, cfg, world_size
        self.policy: Policy | None = None
        notes: list[str] = []
        ex = engine.plan
        try:
            plan = plan_for_config(cfg, engine.layout, engine.units, world_size, notes, opt_kind=ex.optimizer_kind,
                                   param_kind=ex.param_kind, ranks_per_node=ex.ranks_per_node)
        except ConfigError as exc:  # the planner's budgets are tighter than what runs: say so, train on
            log.warning("planner: %s -- training without re-planning", exc)
            return
        # Cost the chunks where the engine's plan put them, at its prefetch depth.
        plan = plan.replan(optimizer_tiers=ex.optimizer_tiers, prefetch_units=ex.prefetch_units)
        thresholds = cfg.policy.thresholds()
        if plan.rates.source.startswith("defaults") or engine.device.type != "cuda":
            # Predicted times from another machine's rates (no calibration of this node),
            # or a CPU run (the model prices GPU compute): "off plan" notes would only
            # compare against numbers that do not describe this run, so they stay off.
            thresholds = replace(thresholds, slow_factor=float("inf"))
        self.policy = Policy(plan, thresholds)
        log.info("plan at start:\n%s\n%s", plan.to_table(), ex.to_table())
        for n in notes:
            log.info("plan note: %s", n)

    def _agreed(self, step_time_s: float, rss: int, stall_ms: float) -> dict[str, float]:
        device = self.engine.device
        vals = [step_time_s, float(rss), -float(psutil.virtual_memory().available), stall_ms]
        if device.type == "cuda":
            vals += [float(torch.cuda.memory_reserved(device)),
                     -float(torch.cuda.get_device_properties(device).total_memory)]
        t = torch.tensor(vals, dtype=torch.float64)
        if self.world_size > 1:
            dist.all_reduce(t, op=dist.ReduceOp.MAX)  # worst rank; CPU tensor: the gloo side of the group
        m = {"step_time_s": float(t[0]), "host_rss_bytes": float(t[1]), "host_available_bytes": -float(t[2]),
             "prefetch_stall_ms": float(t[3])}
        if device.type == "cuda":
            m["gpu_reserved_bytes"], m["gpu_cap_bytes"] = float(t[4]), -float(t[5])
        return m

    def step_end(self, step: int, step_time_s: float, rss: int, stall_ms: float = 0.0) -> list[Decision]:
        """Feed one step's measurements; carry out and return the decisions taken."""
        if self.policy is None:
            return []
        decisions = self.policy.observe(step, self._agreed(step_time_s, rss, stall_ms))
        for d in decisions:
            self.apply(d)
            log.info("policy at step %d: %s: %s", step, d.kind, d.reason)
        return decisions

    def apply(self, d: Decision) -> None:
        """Turn a decision into the engine's next ExecutionPlan; the engine executes it
        now (a step boundary) and verifies the placement it then has (PlanMismatch if not)."""
        fields, new = d.new_plan_fields, self.engine.plan
        if "prefetch_units" in fields:
            new = new.with_prefetch(int(fields["prefetch_units"]))
        if "optimizer_tiers" in fields:
            new = new.with_optimizer_tiers(fields["optimizer_tiers"])
        apply_plan(self.engine, new)
