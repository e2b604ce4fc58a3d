"""`tierlift report`: placeholder module, filled by the issue-5 work."""

from __future__ import annotations


def register(subparsers, common) -> None:
    """Add the `report` subcommand (not registered until implemented)."""
    return None
