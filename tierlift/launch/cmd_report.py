"""`tierlift report RUN_DIR [--out DIR]`: render a run's self-contained HTML report.

The page (``report.html``) embeds its plots as data URIs and loads nothing else, so
it can be mailed, attached to CI artifacts or opened offline; the PNGs are written
beside it too.  Work lives in tierlift/runtime/report.py; this module only parses.
"""

from __future__ import annotations

import argparse
import sys

__all__ = ["register"]


def _cmd_report(args: argparse.Namespace) -> int:
    from tierlift.runtime.report import build_report  # matplotlib/pyarrow only when run

    path = build_report(args.run_dir, args.out)
    print(path)  # stdout: the page, for scripts (`xdg-open "$(tierlift report runs/x)"`)
    print(f"tierlift: wrote {path} (PNGs beside it)", file=sys.stderr)
    return 0


def register(subparsers, common) -> None:
    """Add the `report` subcommand."""
    r = subparsers.add_parser("report", parents=[common],
                              help="render a run's HTML report (memory per tier, throughput, step times, events)")
    r.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (holds metrics/, telemetry/, summary.json)")
    r.add_argument("--out", metavar="DIR", help="write report.html and PNGs here (default RUN_DIR/report)")
    r.set_defaults(handler=_cmd_report)
