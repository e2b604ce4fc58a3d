"""Measuring activations: the profiling dispatch mode, the selective-recompute policy and
a device-timeline clock, used by the activation executor (``activations.py``).

The profile is measured, not estimated from widths: every non-view op that runs in a
unit's forward adds its floating outputs' bytes, split by class -- EXPENSIVE_OPS (FLOP
bound: matmuls, attention; what selective recompute keeps) and the rest (memory bound,
cheap to recompute).  Their sum is an upper bound of what autograd saves under keep
(an op's output is saved at most once, by the op that consumes it); the executor
replaces it by the bytes it counts in its saved-tensor hooks once a unit runs kept.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import CheckpointPolicy

from tierlift.offload.memory import MemoryOwner

__all__ = ["EXPENSIVE_OPS", "selective_policy", "ProfileMode", "Clock", "nbytes", "tensor_bytes"]

_aten = torch.ops.aten
# Outputs worth keeping under selective recompute: what costs FLOPs, not bytes.
EXPENSIVE_OPS = frozenset(getattr(_aten, n) for n in (
    "mm", "addmm", "bmm", "baddbmm", "convolution", "_scaled_mm",
    "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu",
    "_flash_attention_forward", "_efficient_attention_forward") if hasattr(_aten, n))


def selective_policy(ctx, op, *args, **kwargs):
    return CheckpointPolicy.MUST_SAVE if op.overloadpacket in EXPENSIVE_OPS else CheckpointPolicy.PREFER_RECOMPUTE



class Clock:
    """A span on the device's timeline: CUDA events on a GPU, perf_counter on CPU.
    ``memory``: the engine's ``MemoryOwner`` (where timing events come from)."""

    def __init__(self, memory: MemoryOwner):
        self.cuda = memory.cuda
        self.t0 = self.t1 = 0.0
        self.e0 = memory.event(timing=True)
        self.e1 = memory.event(timing=True)

    def start(self) -> None:
        self.e0.record() if self.cuda else setattr(self, "t0", time.perf_counter())

    def stop(self) -> None:
        self.e1.record() if self.cuda else setattr(self, "t1", time.perf_counter())

    def done(self) -> bool:
        return not self.cuda or self.e1.query()

    def seconds(self) -> float:
        return self.e0.elapsed_time(self.e1) / 1e3 if self.cuda else self.t1 - self.t0


class ProfileMode(TorchDispatchMode):
    """Bytes of every non-view op's floating outputs, split expensive / cheap (see EXPENSIVE_OPS)."""

    def __init__(self) -> None:
        super().__init__()
        self.expensive_bytes = 0
        self.cheap_bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view:
            nb = sum(nbytes(t) for t in (out if isinstance(out, (list, tuple)) else (out,))
                     if isinstance(t, torch.Tensor) and t.is_floating_point())
            if func.overloadpacket in EXPENSIVE_OPS:
                self.expensive_bytes += nb
            else:
                self.cheap_bytes += nb
        return out


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def tensor_bytes(tree: Any) -> int:
    """Bytes of every tensor in a (nested) list / tuple / dict."""
    if isinstance(tree, torch.Tensor):
        return nbytes(tree)
    if isinstance(tree, (list, tuple)):
        return sum(tensor_bytes(x) for x in tree)
    if isinstance(tree, dict):
        return sum(tensor_bytes(x) for x in tree.values())
    return 0
