"""`tierlift plan CONFIG`: print where state will live and what a step should cost,
before any training.

The model is built on the meta device (no memory), chunked exactly as the engine
chunks it (``find_units`` + ``plan_chunks``), and handed to the pure planner
(tierlift/runtime/planner.py) with per-tier budgets and node rates.  Budgets come
from the flags, else the config's ``offload.*_budget_bytes``, else what this node
has; rates from the calibration cache when ``tierlift.system.calibrate`` provides
one, else the reference H100 node's (docs/planning.md).  Every assumption is printed as a note.
An infeasible budget exits 2 with the smallest budget that fits.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from dataclasses import replace

__all__ = ["register", "parse_bytes"]

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40,
          "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40,
          "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}


def parse_bytes(text: str) -> int:
    """'24GiB', '24G' (binary), '24GB' (decimal), '1.5e10', '0' (no budget)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z]*)\s*", str(text).lower())
    if not m or m.group(2) not in _UNITS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size; use bytes or e.g. 24GiB, 512MiB, 80GB")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def register(subparsers, common) -> None:
    p = subparsers.add_parser("plan", parents=[common], help="print the placement and predicted step of a config")
    p.add_argument("config", metavar="CONFIG", help="tierlift YAML or DeepSpeed JSON")
    p.add_argument("--world-size", type=int, default=None, help="ranks in all (default run.nproc)")
    p.add_argument("--ranks-per-node", type=int, default=None,
                   help="ranks sharing one node's host memory, disk and cores (default: all on one node)")
    p.add_argument("--gpu-budget", type=parse_bytes, metavar="BYTES", help="per rank, e.g. 24GiB (0 = unbounded)")
    p.add_argument("--host-budget", type=parse_bytes, metavar="BYTES", help="pinned host memory per rank")
    p.add_argument("--nvme-budget", type=parse_bytes, metavar="BYTES", help="NVMe bytes per rank")
    p.add_argument("--as-configured", action="store_true",
                   help="cost the config's own placement (offload.optimizer.max_in_cpu) instead of choosing one")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(handler=_cmd_plan)


def _kinds(path: str, cfg) -> tuple[str, str]:
    """The config's offload kinds, or "auto" where the config chooses none."""
    from tierlift.runtime.config import read_config_file
    raw = read_config_file(path)
    ds = raw.get("zero_optimization")
    if isinstance(ds, dict):  # DeepSpeed JSON
        given = {"optimizer": "offload_optimizer" in ds, "param": "offload_param" in ds}
    else:
        off = raw.get("offload") or {}
        given = {role: role in off for role in ("optimizer", "param")}
    return tuple(type(getattr(cfg.offload, r)).KIND if given[r] else "auto" for r in ("optimizer", "param"))


def _activation_plan(cfg, units, notes: list[str]):
    """The activation plan the engine executes: for ``auto`` it is made from the first
    step's measurements, so it is read from ``run.dir/activations.json`` (the Trainer
    writes it there); a fixed policy's decisions are known without a run."""
    from tierlift.offload.activation_plan import (ActivationPlan, ActivationRates, UnitActivationProfile,
                                                  fixed_plan)

    policy = cfg.train.activations.policy
    if policy == "keep":
        return None
    path = os.path.join(cfg.run.dir, "activations.json")
    try:
        with open(path, encoding="utf-8") as f:
            rec = json.load(f)
        plan = ActivationPlan.from_record(rec["plan"])
        notes.append(f"activations: the plan {path} recorded at step {rec.get('step')}")
        return plan
    except FileNotFoundError:
        pass
    except (OSError, ValueError, KeyError, TypeError) as exc:
        notes.append(f"activations: {path} is unreadable ({type(exc).__name__}: {exc}); ignored")
    if policy == "auto":
        notes.append("activations: policy auto is planned from the first two training steps' measurements; "
                     f"run it, then `tierlift plan` reads {path}")
        return None
    outer = [u.name for u in units if u.name]
    outer = [n for n in outer if not any(n.startswith(o + ".") for o in outer if o != n)]
    notes.append(f"activations: policy {policy} for every unit; bytes are measured by a run "
                 f"(then in {path})")
    return fixed_plan(policy, [UnitActivationProfile(n, 0, 0, 0, 0.0, 0.0) for n in outer],
                      ActivationRates(0.0, 0.0, 1.0, 1.0, 0.0, 0.0))


def _cmd_plan(args: argparse.Namespace) -> int:
    from tierlift.errors import ConfigError
    from tierlift.layout import plan_chunks
    from tierlift.parallel.units import default_wrap_classes, find_units
    from tierlift.runtime.config import TrainConfig, resolve_batch_sizes
    from tierlift.offload.execplan import place_chunks
    from tierlift.runtime.plan_config import build_meta, execution_plan_for, plan_for_config

    for flag, value in (("--world-size", args.world_size), ("--ranks-per-node", args.ranks_per_node)):
        if value is not None and value < 1:  # before reading anything: 0 is not "the default"
            raise ConfigError("must be >= 1.", setting=flag, value=value, fix="give a number of ranks, 1 or more.")
    cfg = TrainConfig.load(args.config)
    world = args.world_size if args.world_size is not None else cfg.run.nproc
    rpn = args.ranks_per_node if args.ranks_per_node is not None else world
    if rpn > world:
        raise ConfigError(f"is more than the {world} rank(s) in all.", setting="--ranks-per-node", value=rpn,
                          fix=f"give at most --world-size ({world}).")
    cfg = resolve_batch_sizes(cfg, world)[0]  # a micro-batch a DeepSpeed train_batch_size leaves to the world size
    notes: list[str] = []
    model = build_meta(cfg, notes)
    units = find_units(model, list(cfg.zero.wrap) or default_wrap_classes(model))
    layout = plan_chunks([u.spec() for u in units], world, cfg.zero.chunk_align_bytes,
                         cfg.zero.persistence_threshold)
    opt_kind, param_kind = _kinds(args.config, cfg)
    overrides = {t: getattr(args, f"{t}_budget") for t in ("gpu", "host", "nvme")}
    try:
        result = plan_for_config(cfg, layout, units, world, notes, opt_kind=opt_kind, param_kind=param_kind,
                                 budget_overrides={k: v for k, v in overrides.items() if v is not None},
                                 ranks_per_node=rpn)
    except ConfigError as exc:
        if exc.setting and exc.setting.endswith("budget_bytes"):
            exc.fix = (exc.fix or "") + " Flags: --gpu-budget, --host-budget, --nvme-budget (e.g. 24GiB)."
            exc.args = (exc.render(),)
        raise
    if args.as_configured and result.optimizer_kind == "nvme":
        cap = getattr(cfg.offload.optimizer, "max_in_cpu", 0)  # the engine's rule: offload/execplan.place_chunks
        result = result.replan(optimizer_tiers=place_chunks([p.shard_numel for p in result.placements], cap))
        notes.append(f"as configured: max_in_cpu={cap:,} keeps {result.host_chunks} chunk(s) in host memory")
        result = replace(result, notes=tuple(notes))
    if result.optimizer_kind == "nvme" and opt_kind == "auto":
        notes.append("optimizer state goes partly to NVMe: set offload.optimizer: {kind: nvme, path: DIR}")
        result = replace(result, notes=tuple(notes))
    execution = execution_plan_for(cfg, layout, result, gpu=cfg.run.device != "cpu")  # what rank 0's engine runs
    execution = replace(execution, activations=_activation_plan(cfg, units, notes))
    result = replace(result, notes=tuple(notes))
    if args.json:
        for n in result.notes:
            print(f"tierlift plan: {n}", file=sys.stderr)
        print(json.dumps({**result.to_dict(), "execution": execution.to_dict()}, indent=2))
    else:
        sys.stdout.write(result.to_table() + "\n" + execution.to_table()
                         + (execution.activations.to_table() if execution.activations else ""))
    return 0
