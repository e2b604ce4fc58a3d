"""Per-step metric rows of a run that was resumed: the re-run steps' rows win.

A run appends ``metrics/part-NNNNN.parquet`` in write order, steps ascending within
one process.  A resume from the checkpoint at step S re-runs steps S+1.. and appends
new parts for them, so the crashed run's rows for those steps (and for any later
step the resumed run has not reached yet: a timeline that was abandoned) are stale.
Rule: walking the parts in order, a part whose first step is m drops every row of
the earlier parts with step >= m.  Nothing on disk is rewritten: the old rows stay
in their parts, readers (``rundir.read_metrics``, ``tierlift report``) apply the rule.
"""

from __future__ import annotations

from typing import Any

__all__ = ["latest_rows"]


def latest_rows(tables: list[Any]) -> list[Any]:
    """``tables``: pyarrow Tables of the parts in write order; returns them with the rows
    that a later part re-ran removed (parts without a ``step`` column are kept whole)."""
    import pyarrow.compute as pc  # pyarrow only when metrics are read, as in rundir.py

    kept: list[Any] = []
    for t in tables:
        if "step" in t.column_names and t.num_rows:
            first = pc.min(t["step"]).as_py()
            if first is not None:
                kept = [k.filter(pc.less(k["step"], first)) if "step" in k.column_names else k for k in kept]
        kept.append(t)
    return kept
