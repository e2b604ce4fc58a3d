"""Error types that carry what a user needs to fix a problem.

Every user-facing error names the setting, the value it had and the fix.  The CLI
turns a :class:`TierliftError` into a short message and exit code 2 (no traceback
unless ``--debug``).
"""

from __future__ import annotations

__all__ = ["TierliftError", "ConfigError", "DataError", "CheckpointError", "LaunchError"]


class TierliftError(Exception):
    """Base class of errors caused by input or environment, not by a bug.

    ``setting``: dotted config path or CLI flag; ``value``: what it was;
    ``fix``: one sentence telling the user what to do; ``rank``: the rank that
    raised it, when inside a multi-process run.
    """

    def __init__(self, message: str, *, setting: str | None = None, value: object = None,
                 fix: str | None = None, rank: int | None = None) -> None:
        self.message = message
        self.setting = setting
        self.value = value
        self.fix = fix
        self.rank = rank
        super().__init__(self.render())

    def render(self) -> str:
        parts = []
        if self.rank is not None:
            parts.append(f"[rank {self.rank}] ")
        if self.setting is not None:
            parts.append(f"{self.setting}={self.value!r}: ")
        parts.append(self.message)
        if self.fix:
            parts.append(f" Fix: {self.fix}")
        return "".join(parts)


class ConfigError(TierliftError):
    """A configuration key or value is invalid."""


class DataError(TierliftError):
    """A dataset path or its content is unusable."""


class CheckpointError(TierliftError):
    """A checkpoint cannot be written or does not match the model."""


class LaunchError(TierliftError):
    """Processes could not be started or a port/address is unusable."""
