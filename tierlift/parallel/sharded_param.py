"""The guard on stage-3 parameters while they are sharded.

A resharded chunk keeps its storage object at size 0 (``gather.py``), so the
model's parameters, which are views into it, point at no memory: reading one
(``w.sum()``, ``model.state_dict()``, ``save_pretrained``) reads out of bounds and
crashes the process.  While a chunk is sharded its parameters' Python class is
swapped for a subclass whose ``__torch_function__`` lets metadata through (shape,
dtype, device, ``.grad``, ``requires_grad``) and turns every other use into a
:class:`ShardedParameterError` naming the parameter and the fix.  Gathering
swaps the class back.

Why a class swap and not a guard on every parameter: a gathered parameter is a
plain ``nn.Parameter`` again, so the training step pays no ``__torch_function__``
dispatch; the swap is one attribute store per parameter per gather / reshard.
Autograd and the engine never go through Python on a parameter's data (they use
the chunk's buffer and C++ saved views), so the guard never fires inside a step.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn as nn

from tierlift.errors import TierliftError

__all__ = ["ShardedParameterError", "guard", "unguard", "is_guarded", "ChunkGuard", "FIX"]

FIX = ("use `model = trainer.unwrap_model()` (a full copy; rank0_only=True for rank 0 alone) or "
       "`with trainer.gathered_parameters():` (in place), called on every rank.")

_T = torch.Tensor
# What may be asked of a parameter that holds no data: metadata and gradient bookkeeping
# (the engine reads and clears ``.grad`` of units that got no gradient; model.dtype reads dtypes).
_GETTERS = ("shape", "dtype", "device", "requires_grad", "grad", "is_leaf", "ndim", "layout", "grad_fn",
            "is_cuda", "is_meta", "is_sparse", "is_quantized", "nbytes", "itemsize", "retains_grad",
            "_backward_hooks", "_post_accumulate_grad_hooks")
_SETTERS = ("grad", "requires_grad", "_backward_hooks", "_post_accumulate_grad_hooks")
_METHODS = ("size", "dim", "ndimension", "numel", "nelement", "element_size", "is_floating_point", "is_complex",
            "stride", "is_contiguous", "storage_offset", "get_device", "requires_grad_", "register_hook",
            "register_post_accumulate_grad_hook", "__len__")
_ALLOWED = frozenset([getattr(_T, n).__get__ for n in _GETTERS] + [getattr(_T, n).__set__ for n in _SETTERS]
                     + [getattr(_T, n) for n in _METHODS])


class ShardedParameterError(TierliftError, RuntimeError):
    """A sharded (stage-3) parameter was read outside the engine's gathers."""


def _raise_for(func, args, kwargs) -> None:
    names = [getattr(a, "_tierlift_name", "?") for a in _flat(args, kwargs) if is_guarded(a)]
    what = torch.overrides.resolve_name(func) or getattr(func, "__name__", repr(func))
    raise ShardedParameterError(
        f"is sharded by tierlift (ZeRO stage 3): outside a unit's forward and backward it holds no data, "
        f"so {what} cannot use it.", setting="parameter", value=names[0] if names else "?", fix=FIX)


def _flat(args, kwargs) -> Iterable:
    for a in list(args) + list((kwargs or {}).values()):
        if isinstance(a, (list, tuple)):
            yield from a
        else:
            yield a


def _guarded_torch_function(cls, func, types, args=(), kwargs=None):
    if func in _ALLOWED:
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **(kwargs or {}))
    _raise_for(func, args, kwargs)


_GUARD_OF: dict[type, type] = {}


def _guard_class(orig: type) -> type:
    """The guarded subclass of a parameter class (nn.Parameter or a user's subclass of it)."""
    cls = _GUARD_OF.get(orig)
    if cls is None:
        cls = type(f"Sharded{orig.__name__}", (orig,), {
            "__torch_function__": classmethod(_guarded_torch_function), "_tierlift_orig": orig,
            "__module__": __name__})
        _GUARD_OF[orig] = cls
    return cls


def is_guarded(p) -> bool:
    return "_tierlift_orig" in type(p).__dict__


def guard(params: Iterable[nn.Parameter], names: Iterable[str]) -> None:
    """Swap each parameter's class for its guarded subclass (idempotent)."""
    for p, name in zip(params, names):
        if not is_guarded(p):
            p._tierlift_name = name
            p.__class__ = _guard_class(type(p))


def unguard(params: Iterable[nn.Parameter]) -> None:
    """Give each parameter its own class back (idempotent)."""
    for p in params:
        if is_guarded(p):
            p.__class__ = type(p)._tierlift_orig


class ChunkGuard:
    """Guards the parameters of chunks as they are resharded and unguards them as they are
    gathered; suspended while the model is unwrapped, when the parameters hold full
    tensors of their own (``unshard.py``)."""

    def __init__(self) -> None:
        self.suspended = False

    def set(self, chunk, on: bool) -> None:
        if self.suspended:
            return
        if on:
            guard(chunk.params, (s.name for s in chunk.spec.params))
        else:
            unguard(chunk.params)
