"""Strict loading of typed config dataclasses from plain dicts.

Config dataclasses live with the component that owns them and validate in
``__post_init__``; this module only turns nested dicts into those dataclasses and
back.  Loading is strict: an unknown key is an error that names the key, its path
and the nearest valid key, because a silently ignored key is a silently wrong run.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from typing import Any, Mapping, TypeVar, Union, get_args, get_origin, get_type_hints

from tierlift.errors import ConfigError

__all__ = ["from_dict", "to_dict", "check", "check_choice", "nearest"]

T = TypeVar("T")

# A decimal number in the spellings YAML 1.1 leaves as strings (``3e-3``, ``1E9``).
_FLOAT_RE = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def nearest(key: str, valid: typing.Iterable[str]) -> str | None:
    """The valid key closest to ``key`` (for "did you mean" messages), or None."""
    matches = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
    return matches[0] if matches else None


def check(cond: bool, setting: str, value: object, message: str, fix: str) -> None:
    """Raise :class:`ConfigError` unless ``cond``."""
    if not cond:
        raise ConfigError(message, setting=setting, value=value, fix=fix)


def check_choice(setting: str, value: object, choices: typing.Sequence[object]) -> None:
    if value not in choices:
        hint = nearest(str(value), [str(c) for c in choices])
        fix = f"use one of {list(choices)}" + (f" (did you mean {hint!r}?)" if hint else "")
        raise ConfigError("is not a valid choice.", setting=setting, value=value, fix=fix + ".")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, path: str) -> Any:
    """Convert ``value`` (from YAML/JSON) to annotation ``tp`` strictly."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        dc_args = [a for a in args if dataclasses.is_dataclass(a)]
        if len(dc_args) > 1 and isinstance(value, str):
            # Shorthand for a policy with no settings of its own: ``optimizer: cpu``.
            value = {"kind": value}
        if dc_args and isinstance(value, Mapping) and len(dc_args) > 1:
            # A union of policy dataclasses is tagged by a "kind" key.
            kinds = {getattr(a, "KIND", a.__name__).lower(): a for a in dc_args}
            kind = str(value.get("kind", "")).lower()
            if kind not in kinds:
                hint = nearest(kind, kinds)
                raise ConfigError("needs a 'kind' naming the policy.", setting=f"{path}.kind",
                                  value=value.get("kind"),
                                  fix=f"set kind to one of {sorted(kinds)}"
                                      + (f" (did you mean {hint!r}?)" if hint else "") + ".")
            body = {k: v for k, v in value.items() if k != "kind"}
            return from_dict(kinds[kind], body, path)
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, path)
            except ConfigError as exc:
                errors.append(exc)
        raise errors[0] if errors else ConfigError("has the wrong type.", setting=path, value=value,
                                                   fix=f"give a {tp}.")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError("must be a mapping.", setting=path, value=value,
                              fix=f"give a mapping with the keys of {_type_name(tp)}.")
        return from_dict(tp, value, path)
    if origin in (list, tuple, typing.Sequence):
        if not isinstance(value, (list, tuple)):
            raise ConfigError("must be a list.", setting=path, value=value, fix="give a list.")
        args = get_args(tp)
        item_tp = args[0] if args else Any
        items = [_convert(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise ConfigError("must be a mapping.", setting=path, value=value, fix="give a mapping.")
        return dict(value)
    if origin is typing.Literal:
        check_choice(path, value, get_args(tp))
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError("must be true or false.", setting=path, value=value, fix="write true or false.")
        return value
    if tp is int:
        num = value
        if isinstance(value, str) and _FLOAT_RE.fullmatch(value.strip()) and "e" in value.lower():
            num = float(value)  # ``1e9`` in YAML is a string; exact below 2**53, checked next
        if isinstance(num, bool) or not isinstance(num, int):
            if isinstance(num, float) and num.is_integer() and abs(num) < 2 ** 53:
                return int(num)
            raise ConfigError("must be an integer.", setting=path, value=value, fix="give a whole number.")
        return value
    if tp is float:
        if isinstance(value, str) and _FLOAT_RE.fullmatch(value.strip()):
            # PyYAML (YAML 1.1) reads ``3e-3`` (no dot) as a string; accept it as the number it is.
            return float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError("must be a number.", setting=path, value=value, fix="give a number.")
        if not math.isfinite(value):
            raise ConfigError("must be a finite number.", setting=path, value=value, fix="give a finite number.")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError("must be a string.", setting=path, value=value, fix="give a string.")
        return value
    return value


def from_dict(cls: type[T], data: Mapping[str, Any], path: str = "") -> T:
    """Build dataclass ``cls`` from ``data``; unknown keys are errors."""
    if not isinstance(data, Mapping):
        raise ConfigError("must be a mapping.", setting=path or cls.__name__, value=data,
                          fix=f"give a mapping with the keys of {cls.__name__}.")
    _raise_unknown(_unknown_keys(cls, data, path))
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        kwargs[key] = _convert(value, hints[key], f"{path}.{key}" if path else str(key))
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        _relocate(exc, path, fields)
        raise


def _unknown_keys(cls: Any, data: Mapping[str, Any], path: str) -> list[tuple[str, Any, str | None, list[str]]]:
    """Every unknown key under ``data`` (this level and nested sections, policy
    unions resolved by their ``kind``), as (path, value, nearest valid key, valid
    keys), so one error can name them all.  Values that are not mappings are left
    to ``_convert``, which reports them with their type."""
    hints = get_type_hints(cls)
    fields = [f.name for f in dataclasses.fields(cls) if f.init]
    found: list[tuple[str, Any, str | None, list[str]]] = []
    for key, value in data.items():
        sub = f"{path}.{key}" if path else str(key)
        if key not in fields:
            found.append((sub, value, nearest(str(key), fields), sorted(fields)))
            continue
        if not isinstance(value, Mapping):
            continue
        tp = hints[key]
        candidates = [a for a in get_args(tp) if dataclasses.is_dataclass(a)] \
            if get_origin(tp) in (Union, types.UnionType) else ([tp] if dataclasses.is_dataclass(tp) else [])
        if len(candidates) == 1:
            found += _unknown_keys(candidates[0], value, sub)
        elif candidates:  # a tagged policy union: the body of the chosen kind, "kind" itself aside
            kinds = {getattr(a, "KIND", a.__name__).lower(): a for a in candidates}
            chosen = kinds.get(str(value.get("kind", "")).lower())
            if chosen is not None:
                found += _unknown_keys(chosen, {k: v for k, v in value.items() if k != "kind"}, sub)
    return found


def _raise_unknown(found: list[tuple[str, Any, str | None, list[str]]]) -> None:
    if not found:
        return
    if len(found) == 1:
        sub, value, hint, valid = found[0]
        raise ConfigError("is not a known setting.", setting=sub, value=value,
                          fix=(f"did you mean {hint!r}? " if hint else "") + f"valid keys here are {valid}.")
    fixes = "; ".join(f"{sub}: " + (f"did you mean {hint!r}?" if hint else f"valid keys here are {valid}")
                      for sub, _, hint, valid in found)
    raise ConfigError(f"are not known settings ({len(found)} keys).", setting=", ".join(s for s, *_ in found),
                      value={s: v for s, v, *_ in found}, fix=fixes + ".")


def _relocate(exc: ConfigError, path: str, fields: Mapping[str, Any]) -> None:
    """Make a ``__post_init__`` error name the setting where it was loaded.

    Validators name settings by their usual place ("offload.aio.block_size",
    "offload.*.path"); the same dataclass can sit elsewhere (an NVMe policy under
    ``offload.param``), so an error about one of ``cls``'s own fields is renamed
    to ``path.field``; any other setting is prefixed with ``path``.
    """
    if not path or not exc.setting:
        return
    field_name = exc.setting.rsplit(".", 1)[-1].split("[", 1)[0]
    if field_name in fields:
        exc.setting = f"{path}.{exc.setting.rsplit('.', 1)[-1]}"
    elif exc.setting != path and not exc.setting.startswith(path + "."):
        exc.setting = f"{path}.{exc.setting}"
    exc.args = (exc.render(),)


def to_dict(obj: Any) -> Any:
    """Dataclass (nested) -> plain dict/list values, tagging policy unions with 'kind'."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out = {}
        if hasattr(type(obj), "KIND"):
            out["kind"] = type(obj).KIND
        for f in dataclasses.fields(obj):
            out[f.name] = to_dict(getattr(obj, f.name))
        return out
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj
