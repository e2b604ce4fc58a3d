"""Issue 4's GPU chunk arena line from one device session's $OUT.

    python benchmarks/arena_report.py OUT_DIR   # writes OUT_DIR/arena.md and .json

Reads ``arena_<offload>_<arena>.json`` (bench_zero.py runs of L1B in one session:
tierlift with ``zero.arena: pool`` and with ``shared``, peers where they ran).  For
each run: reserved - allocated after every step (the Trainer's ``gpu_frag_bytes``,
the harness's for the peers), the arena's growth beyond its reservation, the step
time and peak GPU memory.  "Grows" asks whether any step after the run's warm-up
steps (bench_zero's --warmup, the steps its timing excludes too) ends with more
fragmentation than the largest of the warm-up steps did.
"""

from __future__ import annotations

import glob
import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _bench_common as bc  # noqa: E402

MiB = 2 ** 20


def _row(r: dict, offload: str, arena: str, warmup: int) -> dict:
    summary = r.get("tierlift_summary") or {}
    frag = summary.get("gpu_frag_bytes") or r.get("gpu_frag_bytes") or []
    growth = summary.get("arena_growth_bytes") or []
    w = max(1, warmup)
    warm = max(frag[:w]) if frag else None
    return {"offload": offload, "arena": arena if r["system"] == "tierlift" else "–", "system": r["system"],
            "status": r.get("status"), "step_s": r.get("step_s"), "peak_alloc_gib": r.get("peak_gpu_alloc_gib"),
            "peak_reserved_gib": r.get("peak_gpu_reserved_gib"), "frag_mib": [f / MiB for f in frag],
            "frag_warm_mib": warm / MiB if warm is not None else None,
            "frag_last_mib": frag[-1] / MiB if frag else None,
            "frag_max_after_warm_mib": max(frag[w:]) / MiB if len(frag) > w else None,
            "grows": (max(frag[w:]) > warm) if len(frag) > w else None,
            "growth_after_warm_mib": (max(growth[w:]) - max(growth[:w])) / MiB if len(growth) > w else None,
            "growth_mib": [g / MiB for g in growth], "losses": r.get("losses")}


def main(out: str) -> int:
    rows = []
    for path in sorted(glob.glob(os.path.join(out, "arena_*.json"))):
        m = re.match(r"arena_(\w+?)_(pool|shared)\.json$", os.path.basename(path))
        if not m:
            continue
        try:
            doc = json.load(open(path, encoding="utf-8"))
        except (OSError, ValueError):
            continue
        warmup = int((doc.get("params") or {}).get("warmup", 2))
        rows += [_row(r, m.group(1), m.group(2), warmup) for r in doc.get("runs", [])]
    lines = ["# GPU chunk arena: fragmentation over an L1B run, one session", "",
             "reserved - allocated (MiB) at the end of each step (before the last step's host-optimizer drain); "
             "warm = the largest over the warm-up steps.", "",
             "| offload | system | arena | status | step s | peak alloc GiB | peak reserved GiB | frag warm MiB | "
             "frag max after warm-up MiB | frag last MiB | grows | arena growth after warm-up MiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['offload']} | {r['system']} | {r['arena']} | {r['status']} | {bc.fmt(r['step_s'], 3)} | "
                     f"{bc.fmt(r['peak_alloc_gib'], 2)} | {bc.fmt(r['peak_reserved_gib'], 2)} | "
                     f"{bc.fmt(r['frag_warm_mib'], 1)} | {bc.fmt(r['frag_max_after_warm_mib'], 1)} | "
                     f"{bc.fmt(r['frag_last_mib'], 1)} | {r['grows']} | {bc.fmt(r['growth_after_warm_mib'], 1)} |")
    lines += ["", "Per-step series (MiB):", ""]
    for r in rows:
        lines.append(f"- {r['offload']} {r['system']} {r['arena']}: frag {[round(x, 1) for x in r['frag_mib']]}"
                     + (f"; arena growth {[round(x, 1) for x in r['growth_mib']]}" if r["growth_mib"] else ""))
    checks = {}
    for off in sorted({r["offload"] for r in rows}):
        pool = next((r for r in rows if r["offload"] == off and r["arena"] == "pool"), None)
        shared = next((r for r in rows if r["offload"] == off and r["arena"] == "shared"), None)
        if pool and shared and pool["losses"] and shared["losses"]:
            diff = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(pool["losses"], shared["losses"]))
            checks[off] = {"loss_max_rel_diff": diff,
                           "pool_grows": pool["grows"], "shared_grows": shared["grows"]}
    lines += ["", "| offload | losses pool vs shared, max relative difference | pool frag grows | shared frag grows |",
              "|---|---|---|---|"]
    lines += [f"| {k} | {v['loss_max_rel_diff']:.2e} | {v['pool_grows']} | {v['shared_grows']} |"
              for k, v in checks.items()]
    bc.write_report(out, "arena", lines, {"rows": rows, "checks": checks})
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "."))
