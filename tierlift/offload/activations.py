"""Activation executor: runs an ``ActivationPlan`` (keep / swap a fraction / recompute /
selective recompute per wrap unit) with ``torch.autograd.graph.saved_tensors_hooks``.

One object per engine.  ``install()`` replaces each outermost non-root unit's
``forward`` on the instance (names, hooks and the engine's gathers are untouched; the
engine's module hooks fire around the wrapped call, as with plain checkpointing).

Swap, per saved tensor of a swap unit (parameters and tensors under ``min_swap_bytes``
stay put): the leading ``swap_fraction`` of its elements -- token-wise for the usual
contiguous ``[batch, seq, ...]`` activations -- is copied to a pinned host region on the
executor's D2H stream while compute goes on; the rest is cloned and kept on the GPU; the
original's block is handed back to the allocator with ``record_stream(d2h)`` so it is
reused only after the copy.  When the backward of a unit unpacks its first tensor, the
swapped tensors of the next ``prefetch_units`` units in backward order are copied back on
the H2D stream; a tensor's unpack waits on the event of its own copy only.  PyTorch's
``save_on_cpu`` copies on the compute stream and pins per tensor: this overlaps both
directions and sub-allocates one pinned slab under the host budget.

Recompute is ``torch.utils.checkpoint`` (non-reentrant, RNG state preserved so dropout
matches); selective keeps the expensive ops' outputs (matmuls, attention) through
``create_selective_checkpoint_contexts`` and recomputes the element-wise rest.

Profiling (policy ``auto``): the first step runs every unit under recompute (the safe
choice at any length) with a dispatch mode that sums the bytes their ops' outputs take,
split by op class: an upper bound of what autograd saves under keep, measured from the
ops that ran, not estimated from widths.  The second step runs every unit under recompute
again and times each unit's recompute with events: a warm forward (the first step's times
include cuBLAS autotuning, lazy initialisation and the dispatch mode's own Python, which
made the predicted step 6x the measured one at seq 32k on an H200).  The plan is made
after it.  Keep and swap units then count the bytes they really save every step, and the
plan is remade when those differ from the profile by more than ``replan_tolerance``.

Sync points: none in steady state (events only).  The profiling step synchronizes the
device around each unit; the timing step synchronizes once at its end to read its events;
otherwise ``end_step`` reads timing events of earlier steps only once they have completed.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import time
from dataclasses import replace
from typing import Any, Callable, Sequence

import psutil
import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts

from tierlift.offload.activation_plan import (ActivationConfig, ActivationPlan, ActivationRates,
                                              UnitActivationProfile, fixed_plan, plan_activations)
from tierlift.offload.activation_profile import Clock, ProfileMode, nbytes, selective_policy, tensor_bytes
from tierlift.offload.activation_swap import Swapped, SwapStore
from tierlift.offload.memory import MemoryOwner

__all__ = ["ActivationExecutor"]

log = logging.getLogger("tierlift.activations")

class _UnitState:
    def __init__(self, index: int, name: str, module: nn.Module):
        self.index, self.name, self.module = index, name, module
        self.handles: list[Swapped] = []
        self.prefetched = False
        self.saved_bytes = 0  # measured this step (keep / swap units)
        self.param_ptrs: set[int] = set()


class ActivationExecutor:
    """Executes the activation plan for the units of one engine (see module doc)."""

    def __init__(self, units: Sequence[Any], device: torch.device, cfg: ActivationConfig, *,
                 h2d_bytes_per_s: float = 25e9, d2h_bytes_per_s: float = 25e9, offload_pcie_bytes: int = 0,
                 prefetch_units: int = 1, memory: MemoryOwner | None = None):
        paths = [u.name for u in units if u.name]
        outer = [u for u in units if u.name and not any(u.name.startswith(p + ".") for p in paths if p != u.name)]
        self.units = [_UnitState(i, u.name, u.module) for i, u in enumerate(outer)]
        self._root = next((u.module for u in units if not u.name), None)
        if device.type == "cuda" and device.index is None:  # streams and memory queries need the index
            device = torch.device("cuda", torch.cuda.current_device())
        self.device, self.cfg = device, cfg
        self.cuda = device.type == "cuda"
        self.h2d_rate, self.d2h_rate = h2d_bytes_per_s, d2h_bytes_per_s
        self.offload_pcie_bytes = offload_pcie_bytes
        self.prefetch_units = max(1, prefetch_units)
        # Host bytes swapped activations may pin: the setting, else half of what the node has
        # available now (pinned pages cannot be swapped out; the rest stays for the host
        # optimizer, the data and the OS).  With it every swap plan fits the host.
        self.host_budget = cfg.host_budget_bytes or (psutil.virtual_memory().available // 2 if self.cuda else 0)
        self.swap = SwapStore(device, self.host_budget, memory)  # the owner's streams and pinned pool
        self.profiles: list[UnitActivationProfile] | None = None
        self.plan: ActivationPlan | None = None
        self.profiling = False
        self.timing = False  # the step after profiling: every unit recomputes, each timed warm
        self._prof: dict[int, dict] = {}
        self._timers: list[tuple[str, int, Clock]] = []  # (kind, unit index, clock)
        self.replans = 0
        self._room: float | None = None  # GPU bytes for activations (None: unlimited, a CPU run)
        self._reset_step()
        if cfg.policy != "auto":
            self.plan = fixed_plan(cfg.policy, [UnitActivationProfile(u.name, 0, 0, 0, 0.0, 0.0)
                                                for u in self.units], self._rates(0.0))

    # -- installation --------------------------------------------------------------------
    def install(self) -> int:
        # A Hugging Face model builds a KV cache in its training forward by default; a
        # recomputed unit would then append to the cache its forward filled (and selective
        # recompute's op replay would not match).  HF's own gradient_checkpointing_enable()
        # turns the cache off for the same reason.
        hf_cfg = getattr(self._root, "config", None)
        if getattr(hf_cfg, "use_cache", False):
            hf_cfg.use_cache = False
            log.info("activations: set model.config.use_cache = False for training (a KV cache is for generation)")
        for u in self.units:
            if getattr(u.module, "_tierlift_act", None) is self:
                continue
            orig = u.module.forward

            @functools.wraps(orig)
            def forward(*args, __u=u, __orig=orig, **kwargs):
                if not torch.is_grad_enabled():
                    return __orig(*args, **kwargs)
                return self._run(__u, __orig, args, kwargs)

            u.module.forward = forward
            u.module._tierlift_act = self
        return len(self.units)

    def decision(self, u: _UnitState) -> tuple[str, float]:
        if self.timing:
            return "recompute", 0.0
        if self.profiling or self.plan is None:
            return "profile", 0.0
        d = self.plan.decision(u.name)
        return (d.decision, d.swap_fraction) if d is not None else ("keep", 0.0)

    # -- one unit's forward ----------------------------------------------------------------
    def _run(self, u: _UnitState, orig: Callable, args: tuple, kwargs: dict):
        mode, frac = self.decision(u)
        if mode == "profile":
            return self._profile_forward(u, orig, args, kwargs)
        if mode == "recompute":
            return checkpoint(orig, *args, use_reentrant=False,
                              context_fn=functools.partial(self._timed_contexts, u.index), **kwargs)
        if mode == "selective":
            return checkpoint(orig, *args, use_reentrant=False,
                              context_fn=functools.partial(self._selective_contexts, u.index), **kwargs)
        u.prefetched = False  # this micro-batch's backward has not reached the unit yet
        u.param_ptrs = {p.untyped_storage().data_ptr() for p in u.module.parameters()}
        with torch.autograd.graph.saved_tensors_hooks(functools.partial(self._pack, u, frac),
                                                      functools.partial(self._unpack, u)):
            return orig(*args, **kwargs)

    def _timed_contexts(self, unit: int):
        """checkpoint's (forward, recompute) contexts for ``recompute``: the recompute timed."""
        return contextlib.nullcontext(), self._timed_recompute(contextlib.nullcontext(), unit)

    def _selective_contexts(self, unit: int):
        """The same for ``selective``: torch's caching contexts, the recompute timed."""
        fwd, rec = create_selective_checkpoint_contexts(selective_policy)
        return fwd, self._timed_recompute(rec, unit)

    @contextlib.contextmanager
    def _timed_recompute(self, inner, unit: int):
        clock = Clock(self.swap.memory)
        self._timers.append(("recompute", unit, clock))
        clock.start()
        try:
            with inner:
                yield
        finally:
            clock.stop()

    def _profile_forward(self, u: _UnitState, orig: Callable, args: tuple, kwargs: dict):
        mode = ProfileMode()
        if self.cuda:
            torch.cuda.synchronize(self.device)
        t0 = time.perf_counter()
        p = self._prof.setdefault(u.index, {"t": 0.0, "exp": 0, "cheap": 0, "inp": 0, "saved": 0})
        if u.index == 0:
            # The first unit runs kept, its saved tensors counted by pass-through hooks: the
            # ratio of what autograd really saves to its ops' outputs calibrates every unit's
            # estimate (the units of a transformer are alike; one unit's activations are small).
            u.param_ptrs = {q.untyped_storage().data_ptr() for q in u.module.parameters()}

            def count(t: torch.Tensor):
                if not (isinstance(t, nn.Parameter) or t.untyped_storage().data_ptr() in u.param_ptrs):
                    p["saved"] += nbytes(t)
                return t

            with torch.autograd.graph.saved_tensors_hooks(count, lambda t: t), mode:
                out = orig(*args, **kwargs)
        else:
            out = checkpoint(orig, *args, use_reentrant=False,
                             context_fn=lambda: (mode, contextlib.nullcontext()), **kwargs)
        if self.cuda:
            torch.cuda.synchronize(self.device)
        p["t"] += time.perf_counter() - t0
        p["exp"] += mode.expensive_bytes
        p["cheap"] += mode.cheap_bytes
        p["inp"] += tensor_bytes(args) + tensor_bytes(kwargs)
        return out

    # -- saved-tensor hooks (keep / swap units) ---------------------------------------------
    def _pack(self, u: _UnitState, frac: float, t: torch.Tensor):
        nb = nbytes(t)
        if isinstance(t, nn.Parameter) or t.is_sparse or t.device.type == "meta" or \
                t.untyped_storage().data_ptr() in u.param_ptrs:
            return t  # weights: the engine owns their storage (gathered / resharded)
        u.saved_bytes += nb
        if frac <= 0 or nb < self.cfg.min_swap_bytes or t.device.type != self.device.type:
            self._live(nb)
            return t
        flat = t.detach().reshape(-1) if t.is_contiguous() else t.detach().contiguous().view(-1)
        k = flat.numel() if frac >= 1 else int(flat.numel() * frac)
        if k == 0:
            self._live(nb)
            return t
        host, region, event = self.swap.to_host(flat[:k])
        if host is None:  # the pinned budget is spent: keep it, and say so in the metrics
            self.step["act_swap_overflow_bytes"] += nb
            self._live(nb)
            return t
        kept = flat[k:].clone() if k < flat.numel() else None
        self._live(0 if kept is None else nbytes(kept))
        self.step["act_swapped_bytes"] += k * t.element_size()
        h = Swapped(t.shape, t.dtype, flat.numel(), k, host, region, kept, event)
        u.handles.append(h)
        return h

    def _unpack(self, u: _UnitState, h):
        if isinstance(h, torch.Tensor):
            self._live(-nbytes(h))
            return h
        if not u.prefetched:
            u.prefetched = True
            self._prefetch_after(u)
        out, stall_s = self.swap.wait(h)
        self.step["act_swap_stall_ms"] += stall_s * 1e3
        self._live(-(nbytes(out) - h.k * out.element_size()))
        return out

    def _prefetch_after(self, u: _UnitState) -> None:
        """Backward reached ``u``: fetch the swapped tensors of the next units backward needs."""
        for v in reversed(self.units[max(0, u.index - self.prefetch_units):u.index + 1]):
            for h in v.handles:
                if h.ready is None and h.host is not None:
                    self.swap.fetch(h)

    # -- per-step accounting and planning ---------------------------------------------------
    def _live(self, delta: int) -> None:
        self._live_bytes += delta
        self.step["act_peak_bytes"] = max(self.step["act_peak_bytes"], self._live_bytes)

    def _reset_step(self) -> None:
        self.step = {"act_swapped_bytes": 0, "act_swap_stall_ms": 0.0, "act_recompute_ms": 0.0,
                     "act_peak_bytes": 0, "act_swap_overflow_bytes": 0}
        self._live_bytes = 0
        for u in getattr(self, "units", []):
            u.handles.clear()
            u.prefetched = False
            u.saved_bytes = 0

    def begin_step(self) -> None:
        """Before the step's first forward: the first step of ``auto`` profiles."""
        if self.cfg.policy == "auto" and self.profiles is None:
            self.profiling = True

    def end_step(self, *, gpu_free_bytes: float | None = None) -> dict[str, float]:
        """After the step's backward: this step's metrics; makes the plan after the profiling
        step and remakes it when measured bytes drift (the policy's decision, applied at this
        step boundary)."""
        if self.timing and self.cuda:
            torch.cuda.synchronize(self.device)  # once: every recompute of the timed step resolves
        done, pending = [], []
        for timer in self._timers:
            (done if timer[2].done() else pending).append(timer)
        self._timers = pending
        metrics = dict(self.step)
        metrics["act_recompute_ms"] = sum(c.seconds() for _, _, c in done) * 1e3
        if self.profiling:
            # The room for activations is measured once, in the step that kept almost none.
            self._room = gpu_free_bytes if gpu_free_bytes is not None or not self.cuda else self._gpu_room()
            self.profiling = False
            self.profiles = [self._profile_of(u) for u in self.units]
            self.timing = True
        elif self.timing:
            self.timing = False
            self.profiles = self._timed_profiles(done)
            self._make_plan(self._room)
        elif self.cfg.policy == "auto" and self.plan is not None:
            self._check_drift(self._room)
        self._reset_step()
        return metrics

    def _timed_profiles(self, done: list[tuple[str, int, Clock]]) -> list[UnitActivationProfile]:
        """The profiles with each unit's forward time replaced by its warm recompute time of
        the timing step (summed over micro-batches, as the profile's bytes are); selective
        recompute keeps its share of the forward."""
        spent: dict[int, float] = {}
        for _, unit, c in done:
            spent[unit] = spent.get(unit, 0.0) + c.seconds()
        out = []
        for u, p in zip(self.units, self.profiles):
            t = spent.get(u.index)
            if t is None or p.forward_s <= 0:
                out.append(p)
                continue
            out.append(replace(p, forward_s=t, selective_s=p.selective_s * t / p.forward_s))
        return out

    def _gpu_room(self) -> float:
        """Bytes the device can give activations: its memory (under a per-process cap, as
        ``torch.cuda.set_per_process_memory_fraction`` sets) less the peak this step
        reserved without them (the profiling step keeps only unit inputs, counted back)."""
        total = torch.cuda.get_device_properties(self.device).total_memory
        frac = getattr(torch.cuda, "get_per_process_memory_fraction", None)
        if frac is not None:
            total *= frac(self.device)
        # Reserved, not allocated: the caching allocator's fragmentation at this peak is memory
        # the activations cannot have either (at seq 128k on L1B it was 35 GiB of 128).
        peak = torch.cuda.max_memory_reserved(self.device)
        kept_inputs = sum(p["inp"] for p in self._prof.values()) if self.profiling else 0
        return max(0.0, total - peak + kept_inputs)

    def _profile_of(self, u: _UnitState) -> UnitActivationProfile:
        p = self._prof.get(u.index, {"t": 0.0, "exp": 0, "cheap": 0, "inp": 0, "saved": 0})
        total = p["exp"] + p["cheap"]
        # cheap ops are memory-bound: their share of the time is taken as their share of bytes
        cheap_share = p["cheap"] / total if total else 0.0
        first = self._prof.get(0, {})
        calib = first.get("saved", 0) / (first["exp"] + first["cheap"]) if first.get("saved") else None
        saved = p["saved"] if p.get("saved") else (int(total * calib) if calib else total + p["inp"])
        return UnitActivationProfile(u.name, saved_bytes=saved, input_bytes=p["inp"],
                                     selective_bytes=p["exp"] + p["inp"], forward_s=p["t"],
                                     selective_s=p["t"] * cheap_share)

    def _rates(self, forward_s: float) -> ActivationRates:
        gpu = self.cfg.gpu_budget_bytes or math.inf
        host = self.host_budget or math.inf
        bwd = 2 * forward_s
        busy = 0.0
        if forward_s > 0 and self.offload_pcie_bytes:
            busy = min(0.95, self.offload_pcie_bytes / (min(self.h2d_rate, self.d2h_rate) * (forward_s + bwd)))
        return ActivationRates(gpu, host, self.d2h_rate, self.h2d_rate, forward_s, bwd, forward_s + bwd, busy)

    def _make_plan(self, gpu_free_bytes: float | None) -> None:
        fwd = sum(p.forward_s for p in self.profiles)
        rates = self._rates(fwd)
        if not self.cfg.gpu_budget_bytes and gpu_free_bytes is not None:
            rates = replace(rates, gpu_budget_bytes=max(0.0, gpu_free_bytes - self.cfg.margin_bytes))
        self.plan = plan_activations(self.profiles, rates)
        self.swap.planned_bytes = self.plan.swapped_bytes
        log.info("activation plan (%s): %s; predicted +%.1f ms recompute, %.1f ms stall, peak %.2f GiB",
                 self.plan.policy, ", ".join(f"{d.unit}={d.decision}"
                                             + (f"({d.swap_fraction:.2f})" if d.decision == "swap" else "")
                                             for d in self.plan.decisions),
                 self.plan.recompute_s * 1e3, self.plan.swap_stall_s * 1e3, self.plan.predicted_peak_bytes / 2**30)

    def _check_drift(self, gpu_free_bytes: float | None) -> None:
        changed = []
        for u, p in zip(self.units, self.profiles):
            d = self.plan.decision(u.name)
            if d is None or d.decision not in ("keep", "swap") or u.saved_bytes == 0:
                changed.append(p)  # nothing measured for it this step
                continue
            if abs(u.saved_bytes - p.saved_bytes) > self.cfg.replan_tolerance * max(p.saved_bytes, 1):
                changed.append(replace(p, saved_bytes=u.saved_bytes))
            else:
                changed.append(p)
        if any(a is not b for a, b in zip(changed, self.profiles)):
            self.profiles = changed
            self.replans += 1
            log.info("activation profile drifted from the plan: re-planning with measured saved bytes")
            self._make_plan(gpu_free_bytes)

    def close(self) -> None:
        self.swap.close()
