"""The engine's side of the execution plan (``offload/execplan.py``): the plan an
engine is built from when none is given, the placement it actually has, the check
that the two agree, and applying a changed plan (a policy decision) at a step
boundary.

Sync points: ``apply_plan`` waits for the host optimizer's queued steps (moving
state needs the worker idle); call it between optimizer steps only.
"""

from __future__ import annotations

import os

import torch

from tierlift.layout import ChunkLayout
from tierlift.offload.execplan import ExecutionPlan, PlanMismatch, build_execution_plan

__all__ = ["PlanMismatch", "plan_for_engine", "check_layout", "actual_placement", "verify", "apply_plan"]


def plan_for_engine(layout: ChunkLayout, zero, offload, optimizer_name: str, compute_dtype: torch.dtype,
                    reduce_dtype: torch.dtype, device: torch.device, rank: int) -> ExecutionPlan:
    """The plan the config asks for: placement by the rule over ``max_in_cpu``.  Ranks
    per node from torchrun's LOCAL_WORLD_SIZE (one node when it is not set)."""
    world = layout.world_size
    rpn = min(world, max(1, int(os.environ.get("LOCAL_WORLD_SIZE", world) or world)))
    opt = offload.optimizer
    return build_execution_plan(
        list(layout), rank=rank, world_size=world, ranks_per_node=rpn, zero_stage=zero.stage,
        prefetch_units=zero.prefetch_units, optimizer_kind=opt.KIND, param_kind=offload.param.KIND,
        optimizer_name=optimizer_name, compute_itemsize=compute_dtype.itemsize,
        reduce_itemsize=reduce_dtype.itemsize, gpu=device.type == "cuda",
        max_in_cpu=getattr(opt, "max_in_cpu", 0), nvme_buffer_size=getattr(opt, "buffer_size", 0),
        host_budget_bytes=offload.host_budget_bytes)


def check_layout(plan: ExecutionPlan, layout: ChunkLayout) -> None:
    """A plan handed to an engine must be for the layout it chunked the model into."""
    got = [(c.index, c.shard_numel) for c in layout]
    want = [(c.index, c.shard_numel) for c in plan.chunks]
    if got != want or plan.world_size != layout.world_size:
        raise PlanMismatch(f"the plan is for {len(want)} chunks of shards {[n for _, n in want]} over world "
                           f"{plan.world_size}; the engine chunked the model into {len(got)} of "
                           f"{[n for _, n in got]} over world {layout.world_size}")


def actual_placement(engine) -> tuple[tuple[str, str], ...]:
    """(optimizer tier, parameter tier) of each chunk as the engine holds it now: the
    parameters are on the compute device while a device shard exists, else where the
    host optimizer serves them from."""
    host = engine.host_opt.placement() if engine.host_opt is not None else None
    return tuple((host[j][0] if host else "gpu",
                  "gpu" if c.on_device else (host[j][1] if host else "none"))
                 for j, c in enumerate(engine.chunks))


def verify(engine, when: str) -> None:
    """Raise PlanMismatch naming the first chunk whose placement is not the plan's."""
    engine.plan.check(actual_placement(engine), f"rank {engine.rank} {when}")
    if engine.cfg.prefetch_units != engine.plan.prefetch_units:
        raise PlanMismatch(f"rank {engine.rank} {when}: prefetch is {engine.cfg.prefetch_units} unit(s), the plan "
                           f"says {engine.plan.prefetch_units}")


def apply_plan(engine, new: ExecutionPlan) -> list[int]:
    """Carry out the changes from ``engine.plan`` to ``new`` at a step boundary, then
    verify; returns the chunks whose optimizer state moved to NVMe."""
    old = engine.plan
    if new.placement == old.placement and new.prefetch_units == old.prefetch_units:
        return []
    moved = old.moved_to_nvme(new)
    if moved:
        if engine.host_opt is None or engine.host_opt.nvme is None:
            raise PlanMismatch(f"the new plan moves chunks {moved} to NVMe but the engine has no NVMe tier")
        engine.host_opt.move_to_nvme(moved)
    # The engine's own copy of zero (not the user's).  A GPU arena keeps what it reserved at
    # construction: a deeper prefetch grows it on demand (arena_growth_bytes), in the same sizes.
    engine.cfg.prefetch_units = new.prefetch_units
    engine.plan = new
    verify(engine, "after applying a new plan")
    return moved
