"""The state of one DeepSpeed-config mapping (``Walk``) and its error type.

Below ``deepspeed_compat`` (the entry), ``deepspeed_sections`` and ``deepspeed_auto``
(the mappers), which all take a ``Walk``: one import direction, no cycle.
"""

from __future__ import annotations

import json
from typing import Any, Iterable, Mapping

from tierlift._configbase import nearest
from tierlift.errors import ConfigError

__all__ = ["DeepSpeedConfigError", "Walk"]


class DeepSpeedConfigError(ConfigError):
    """Every problem of one DeepSpeed config; ``problems`` holds one ConfigError each."""

    def __init__(self, problems: list[ConfigError]) -> None:
        self.problems = list(problems)
        first = self.problems[0]
        super().__init__(first.message, setting=first.setting, value=first.value, fix=first.fix)

    def __reduce__(self):  # pickles whole (Ray ships exceptions between processes)
        return (type(self), (self.problems,))

    def render(self) -> str:
        if len(self.problems) == 1:
            return "DeepSpeed config: " + self.problems[0].render()
        head = (f"DeepSpeed config: {len(self.problems)} settings tierlift cannot honour "
                "(every other key was mapped):")
        return head + "".join(f"\n  - {p.render()}" for p in self.problems)


class Walk:
    """State of one mapping: tierlift sections built so far, where each tierlift
    setting came from (for errors in DeepSpeed terms), problems and notes."""

    def __init__(self, tierlift_sections: Iterable[str] = ()) -> None:
        self.out: dict[str, dict[str, Any]] = {}
        self.origin: dict[str, str] = {}  # tierlift dotted path -> DeepSpeed dotted path
        self.problems: list[ConfigError] = []
        self.notes: list[str] = []
        self.choices: list[str] = []  # one line per "auto" / missing key tierlift decided
        self.ignored: list[str] = []  # "key=value (why)": not honoured, cannot change the numbers
        self.tierlift_only = set(tierlift_sections) - {"optimizer", "scheduler"}

    def choose(self, ds_path: str, given: Any, value: Any, why: str) -> Any:
        """Record that tierlift chose ``value`` for DeepSpeed key ``ds_path`` given as
        ``given`` ("auto", or None when missing); returns ``value``."""
        shown = value if isinstance(value, str) else json.dumps(value)
        head = f'{ds_path}="auto"' if given == "auto" else f"{ds_path} (missing)"
        self.choices.append(f"ds-config: {head} -> {shown} ({why})")
        return value

    def problem(self, key: str, value: Any, message: str, fix: str) -> None:
        if not any(p.setting == key and p.message == message for p in self.problems):
            self.problems.append(ConfigError(message, setting=key, value=value, fix=fix))

    def put(self, tl_path: str, value: Any, ds_path: str) -> None:
        section, _, name = tl_path.partition(".")
        self.out.setdefault(section, {})[name] = value
        self.origin[tl_path] = ds_path

    def section(self, d: Any, path: str, known: Iterable[str], *, unsupported: Mapping = {},
                fixed: Mapping = {}, no_effect: Mapping = {}, ignored: Mapping = {},
                auto_ok: Iterable[str] = ()) -> dict:
        """The keys of mapping ``d`` (at DeepSpeed path ``path``) left to map: unknown
        and unsupported keys and unhonoured fixed values are reported; no-effect
        keys noted, ignored keys (``ignored``: key -> why) kept for one warning;
        'auto' is kept for the mapper to decide where the key is in ``auto_ok``,
        and reported elsewhere."""
        if d is None:
            return {}
        known = set(known) | set(unsupported) | set(fixed) | set(no_effect) | set(ignored)
        if not isinstance(d, Mapping):
            self.problem(path, d, "must be a JSON object.", f"give an object with keys such as {sorted(known)[:4]}.")
            return {}
        kept, quiet = {}, []
        for key, value in d.items():
            sub = f"{path}.{key}" if path else str(key)
            if key in unsupported:
                self.problem(sub, value, *unsupported[key])
            elif key not in known:
                self.unknown(sub, key, value, known)
            elif key in fixed and any(_same(value, a) for a in fixed[key][0]):
                continue  # the value tierlift always behaves as
            elif key in ignored:  # with a fixed value too: any other value is ignored, not refused
                self.ignored.append(f"{sub}={json.dumps(value)} ({ignored[key]})")
            elif isinstance(value, str) and value == "auto" and key in no_effect:
                self.choose(sub, value, "not used", no_effect[key])
            elif isinstance(value, str) and value == "auto" and key not in auto_ok:
                self.problem(sub, value, "'auto' asks tierlift to decide, but this key has no value tierlift "
                             "can choose for it.", "replace 'auto' with the value you want.")
            elif key in fixed:
                allowed, fix = fixed[key]
                self.problem(sub, value, f"cannot be honoured: tierlift behaves only as {key}="
                             f"{', '.join(map(repr, allowed))}.", fix)
            elif key in no_effect:
                quiet.append((key, value))
            else:
                kept[key] = value
        by_reason: dict[str, list[str]] = {}
        for key, value in quiet:
            by_reason.setdefault(no_effect[key], []).append(f"{key}={value!r}")
        for why, keys in by_reason.items():
            where = f"{path}: " if path else ""
            self.notes.append(f"{where}{', '.join(keys)} accepted without effect: {why}.")
        return kept

    def unknown(self, sub: str, key: Any, value: Any, known: Iterable[str]) -> None:
        if not sub.count(".") and key in self.tierlift_only:
            self.problem(sub, value, "is a tierlift section; it cannot be mixed into a DeepSpeed config.",
                         "convert the DeepSpeed JSON to YAML (`tierlift config convert`), then set "
                         f"{key}: there.")
            return
        hint = nearest(str(key), known)
        fix = f"did you mean {hint!r}? Otherwise remove it." if hint else \
            f"remove or rename it; supported keys here are {sorted(known)}."
        self.problem(sub, value, "is not a DeepSpeed setting tierlift supports.", fix)

    def report(self, exc: ConfigError) -> None:
        """A tierlift validation error, renamed to the DeepSpeed key it came from."""
        tl = exc.setting or ""
        ds = self.origin.get(tl)
        if ds is None:
            for prefix in sorted(self.origin, key=len, reverse=True):
                if tl.startswith(prefix + "."):
                    ds = self.origin[prefix] + tl[len(prefix):]
                    break
        if ds is None or ds == tl:
            self.problem(tl, exc.value, exc.message, exc.fix or "")
        else:
            self.problem(ds, exc.value, f"{exc.message} (tierlift setting {tl})", exc.fix or "")


def _same(value: Any, allowed: Any) -> bool:
    """Equal, with booleans matching only booleans (JSON's 1 is not true)."""
    if isinstance(value, bool) or isinstance(allowed, bool):
        return value is allowed
    return value == allowed
