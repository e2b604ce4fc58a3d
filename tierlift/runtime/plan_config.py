"""From a TrainConfig and its chunk layout to a planner input and a Plan.

Shared by ``tierlift plan`` (before training, model on the meta device) and the
Trainer (at start, from the engine's real layout) so both plan the same way.  Not
pure (reads the calibration cache, /proc/meminfo, disk free space); the planning
itself stays pure in ``planner.py``.  Every assumption is appended to ``notes``.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace

import torch

from tierlift.errors import ConfigError
from tierlift.models import build_model
from tierlift.offload.execplan import ExecutionPlan, build_execution_plan
from tierlift.offload.policy import NVMeOffload
from tierlift.runtime.plan_types import HOST_BASE_BYTES, Budgets, ModelShape, NodeRates, TrainingShape
from tierlift.runtime.planner import plan
from tierlift.system import calibrate
from tierlift.system.probe import probe_node

__all__ = ["estimate_activation_bytes", "build_meta", "node_rates", "budgets_for", "training_shape",
           "plan_for_config", "execution_plan_for"]

_TINY_PARAMS = 50_000_000  # CPU fallback only below this (200 MB in fp32)
_DEFAULT_GPU_BYTES = 78 << 30  # what one H100 80GB leaves to PyTorch (the reference node, docs/planning.md)


def estimate_activation_bytes(model_cfg, tokens: int, c: int, checkpointing: bool) -> int:
    """Peak activations of one micro-batch (bytes), from the model's widths.  Rough by
    design: per layer T c (6 h + 4 i) live while it runs (SDPA: no T^2 term), T h c
    saved per layer under checkpointing, and the logits with their fp32 loss and
    gradient T V (c + 8)."""
    if model_cfg.kind == "hf":
        hc = model_cfg.hf_config or _hf_path_config(model_cfg.hf_path)
        h, layers = hc.get("hidden_size", 4096), hc.get("num_hidden_layers", 32)
        i = hc.get("moe_intermediate_size") or hc.get("intermediate_size", 4 * h)
        i *= hc.get("num_experts_per_tok", 1) if hc.get("num_local_experts") or hc.get("num_experts") else 1
        vocab = hc.get("vocab_size", 32000)
    else:
        h, layers, vocab = model_cfg.d_model, model_cfg.n_layers, model_cfg.vocab_size
        i = model_cfg.d_ff or -(-(8 * h // 3) // 16) * 16
        i *= model_cfg.top_k if model_cfg.kind == "moe-gpt" else 1
    layer = tokens * c * (6 * h + 4 * i)
    saved = layers * tokens * h * c + layer if checkpointing else layers * layer
    return int(saved + tokens * vocab * (c + 8))


def _hf_path_config(path: str) -> dict:
    try:
        with open(os.path.join(os.path.expanduser(path), "config.json"), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def build_meta(cfg, notes: list[str]):
    try:
        with torch.device("meta"):
            return build_model(cfg.model)
    except ConfigError:
        raise
    except Exception as exc:  # a model whose init needs real data
        est = _rough_params(cfg.model)
        if est is None or est > _TINY_PARAMS:
            raise ConfigError(f"could not be built on the meta device ({type(exc).__name__}: {exc}); planning "
                              "would need the real weights in memory.", setting="model.kind", value=cfg.model.kind,
                              fix="report the model; plan a tiny variant of it meanwhile.") from exc
        notes.append(f"built the model on the CPU (~{est / 1e6:.1f} M params): the meta device failed ({exc})")
        return build_model(cfg.model)


def _rough_params(m) -> int | None:
    if m.kind == "hf":
        hc = m.hf_config or _hf_path_config(m.hf_path)
        h, layers = hc.get("hidden_size"), hc.get("num_hidden_layers")
        if not h or not layers:
            return None
        return 12 * layers * h * h + 2 * hc.get("vocab_size", 32000) * h
    return 12 * m.n_layers * m.d_model ** 2 * max(1, m.n_experts) + 2 * m.vocab_size * m.d_model


def node_rates(cfg, notes: list[str]):
    """Rates from this node's calibration cache (the file ``load_or_calibrate`` keeps),
    else the reference H100 node's (docs/planning.md).  Planning only reads the cache, never measures."""
    d = NodeRates()
    assumed = (f"H2D/D2H {d.h2d_gbps:g}/{d.d2h_gbps:g} GB/s, disk {d.disk_read_gbps:g}/{d.disk_write_gbps:g} GB/s, "
               f"CPU AdamW {d.cpu_adam_params_s / 1e9:g} G/s, GPU AdamW {d.gpu_adam_params_s / 1e9:g} G/s, "
               f"{d.gpu_flops / 1e12:g} TFLOP/s x mfu {d.mfu:g} (the reference H100 node, docs/planning.md)")
    opt = cfg.offload.optimizer
    nvme = opt.path if isinstance(opt, NVMeOffload) else None
    block = opt.aio.block_size if isinstance(opt, NVMeOffload) else 8 << 20
    try:
        profile = probe_node(nvme)
        if nvme is None and profile.nvme is not None:
            nvme = profile.nvme.path
        cal, path = calibrate.load_cached(profile, nvme_path=nvme, block_size=block)  # None: no usable file
        if cal is None:
            notes.append(f"no calibration cache for this node ({path}); assumed {assumed}")
            return d
    except Exception as exc:  # a probe or cache read that fails: plan with the defaults, and say so
        notes.append(f"no calibration ({type(exc).__name__}: {exc}); assumed {assumed}")
        return d
    names = {"h2d_gbps": "h2d_gbps", "d2h_gbps": "d2h_gbps", "disk_read_gbps": "disk_read_gbps",
             "disk_write_gbps": "disk_write_gbps", "cpu_adam_params_s": "cpu_adamw_params_per_s",
             "gpu_adam_params_s": "gpu_adamw_params_per_s"}
    found = {ours: getattr(cal, theirs, None) for ours, theirs in names.items()}
    missing = [k for k, v in found.items() if v is None]
    if missing:
        notes.append(f"calibration cache lacks {', '.join(missing)}: the reference node's defaults (docs/planning.md) used for those")
    return replace(d, **{k: v for k, v in found.items() if v is not None}, source=f"calibration cache {path}")


def _host_available() -> int | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f if line.split()[1:]}
        return info.get("MemAvailable")
    except (OSError, ValueError, IndexError):
        return None


def budgets_for(cfg, ranks: int, notes: list[str], overrides: dict | None = None):
    """Per-rank budgets: ``overrides`` (tier -> bytes), else the config's
    ``offload.*_budget_bytes``, else what this node has over its ``ranks`` (the ranks
    per node: each node's memory and disk are shared by its own ranks only)."""
    out, given = {}, set()
    overrides = overrides or {}
    for tier in ("gpu", "host", "nvme"):
        flag = overrides.get(tier)
        value = flag if flag is not None else getattr(cfg.offload, f"{tier}_budget_bytes")
        if flag is not None or value:
            given.add(tier)
        out[tier] = value or None  # 0 = unbounded, as in the config
    if "gpu" not in given:
        if torch.cuda.is_available():
            out["gpu"] = torch.cuda.get_device_properties(0).total_memory
            notes.append(f"GPU budget: all of GPU 0 ({out['gpu'] / 2**30:.1f} GiB)")
        else:
            out["gpu"] = _DEFAULT_GPU_BYTES
            notes.append(f"GPU budget assumed {_DEFAULT_GPU_BYTES / 2**30:.0f} GiB per rank (no GPU here; H100 "
                         "80GB); set --gpu-budget")
    if "host" not in given:
        avail = _host_available()
        if avail:
            out["host"] = max(0, avail - ranks * HOST_BASE_BYTES) // ranks
            notes.append(f"host budget: this node's MemAvailable {avail / 2**30:.1f} GiB less "
                         f"{HOST_BASE_BYTES / 2**30:.1f} GiB per rank for the process, over {ranks} rank(s) per node; "
                         "set --host-budget")
    opt = cfg.offload.optimizer
    if "nvme" not in given and isinstance(opt, NVMeOffload):
        d = os.path.abspath(opt.path)
        while not os.path.exists(d):
            d = os.path.dirname(d)
        st = os.statvfs(d)
        out["nvme"] = st.f_bavail * st.f_frsize // ranks
        notes.append(f"NVMe budget: free space under {d} over {ranks} rank(s)")
    return Budgets(out["gpu"], out["host"], out["nvme"])




def training_shape(cfg, layout, units, world: int, notes: list[str], ranks_per_node: int | None = None):
    c = {"fp32": 4, "bf16": 2, "fp16": 2}
    t, ac = cfg.train, cfg.train.activation_checkpointing
    tokens = t.micro_batch_size * cfg.data.seq_len
    active = None
    if cfg.model.kind == "moe-gpt":  # FLOPs of the routed experts only
        experts = {u.name for u in units if type(u.module).__name__ == "Expert"}
        routed = sum(ch.numel for ch in layout if ch.unit in experts)
        active = layout.total_numel - int(routed * (1 - cfg.model.top_k / cfg.model.n_experts))
    shape = TrainingShape(
        tokens_per_step=tokens * t.grad_accum_steps,
        activation_bytes=estimate_activation_bytes(cfg.model, tokens, c[cfg.precision.compute], ac),
        micro_batches=t.grad_accum_steps, compute_bytes=c[cfg.precision.compute],
        reduce_bytes=c[cfg.precision.reduce], activation_checkpointing=ac,
        deferred_step=cfg.optimizer.grad_clip > 0 or cfg.precision.compute == "fp16",
        zero_stage=cfg.zero.stage, active_params=active, optimizer=cfg.optimizer.name)
    notes.append(f"activations estimated from the model's widths: {shape.activation_bytes / 2**30:.2f} GiB "
                 f"per micro-batch; {world} rank(s), {ranks_per_node or world} per node; collectives assumed hidden")
    return shape


def plan_for_config(cfg, layout, units, world: int, notes: list[str], *, opt_kind: str, param_kind: str,
                    budget_overrides: dict | None = None, ranks_per_node: int | None = None):
    """The Plan for ``cfg`` over ``layout``; ConfigError when no budget fits.  Budgets and
    node rates are per node, shared by ``ranks_per_node`` ranks (default: all on one)."""
    rpn = ranks_per_node or world
    training = training_shape(cfg, layout, units, world, notes, rpn)
    rates = node_rates(cfg, notes)
    budgets = budgets_for(cfg, rpn, notes, budget_overrides)
    buffers = getattr(cfg.offload.optimizer, "buffer_count", 8)
    return plan(ModelShape.from_layout(layout), budgets, rates, training, opt_kind, param_kind,
                ranks_per_node=rpn, nvme_buffer_count=buffers, notes=notes)


def execution_plan_for(cfg, layout, result, *, rank: int = 0, gpu: bool = True) -> ExecutionPlan:
    """The ExecutionPlan an engine runs for the costed ``result`` (a ``planner.Plan``):
    its placement and prefetch depth over ``layout``, the config's NVMe pieces."""
    item = {"fp32": 4, "bf16": 2, "fp16": 2}
    return build_execution_plan(
        list(layout), rank=rank, world_size=layout.world_size, ranks_per_node=result.ranks_per_node,
        zero_stage=cfg.zero.stage, prefetch_units=result.prefetch_units, optimizer_kind=result.optimizer_kind,
        param_kind=result.param_kind, optimizer_name=cfg.optimizer.name,
        compute_itemsize=item[cfg.precision.compute], reduce_itemsize=item[cfg.precision.reduce], gpu=gpu,
        optimizer_tiers=result.optimizer_tiers, nvme_buffer_size=getattr(cfg.offload.optimizer, "buffer_size", 0),
        host_budget_bytes=int(result.budgets.host_bytes or 0))
