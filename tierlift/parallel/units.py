"""Wrap units: which modules of a model become chunks (their activations: offload/activations.py).

A wrap unit is a module whose class name is in the wrap list (default: the model's
``_no_split_modules``, as Hugging Face models declare their transformer blocks).
Units may nest (an MoE expert inside a block): a parameter belongs to the
innermost unit that contains it; the rest of the model forms the root unit "".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch.nn as nn

from tierlift.errors import ConfigError
from tierlift.layout import UnitSpec

__all__ = ["UnitModule", "find_units", "default_wrap_classes"]


@dataclass
class UnitModule:
    name: str  # module path ("" for the root)
    module: nn.Module
    params: list[tuple[str, nn.Parameter]]  # (fully-qualified name, parameter), registration order

    def spec(self) -> UnitSpec:
        return UnitSpec(self.name, tuple((n, tuple(p.shape)) for n, p in self.params))


def default_wrap_classes(model: nn.Module) -> list[str]:
    names = getattr(model, "_no_split_modules", None)
    if names is None:
        inner = getattr(model, "model", None)
        names = getattr(inner, "_no_split_modules", None)
    return list(names or [])


def find_units(model: nn.Module, wrap_classes: Sequence[str]) -> list[UnitModule]:
    """Units in module order: the root first (it owns embeddings and head), then
    every wrap-class module.  Tied parameters are listed once, under the first
    module path that registers them."""
    wrap = set(wrap_classes)
    unit_of_module: dict[str, str] = {}
    units: dict[str, UnitModule] = {"": UnitModule("", model, [])}
    found = set()
    for path, mod in model.named_modules():
        if path and type(mod).__name__ in wrap:
            units[path] = UnitModule(path, mod, [])
            found.add(type(mod).__name__)
    missing = wrap - found
    if missing:
        present = sorted({type(m).__name__ for m in model.modules()})
        raise ConfigError(f"names module classes not in the model: {sorted(missing)}.", setting="zero.wrap",
                          value=list(wrap_classes),
                          fix=f"use class names the model has, e.g. {present[:12]}.")
    unit_paths = sorted((p for p in units if p), key=len, reverse=True)

    def owner(module_path: str) -> str:
        if module_path in unit_of_module:
            return unit_of_module[module_path]
        for up in unit_paths:  # longest (innermost) prefix wins
            if module_path == up or module_path.startswith(up + "."):
                unit_of_module[module_path] = up
                return up
        unit_of_module[module_path] = ""
        return ""

    seen: set[int] = set()
    for mod_path, mod in model.named_modules():
        for pname, p in mod.named_parameters(recurse=False):
            if id(p) in seen or not isinstance(p, nn.Parameter):
                continue
            seen.add(id(p))
            fqn = f"{mod_path}.{pname}" if mod_path else pname
            units[owner(mod_path)].params.append((fqn, p))
    return [units[""]] + [units[p] for p in units if p]
