"""`tierlift plan`: placeholder module, filled by the issue-5 work."""

from __future__ import annotations


def register(subparsers, common) -> None:
    """Add the `plan` subcommand (not registered until implemented)."""
    return None
