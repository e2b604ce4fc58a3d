"""This tree against another commit's, same machine, same session (issue 11's
"performance unchanged", ±3%).  Reads the ``ab_<tree>_<offload>_r<k>.json`` files that
``gpu_session.sh``'s ``ab`` stage writes (bench_zero.py runs of tierlift alone, the two
trees alternating which goes first) and writes ``ab_perf.md`` / ``ab_perf.json``:

    python3 benchmarks/ab_report.py OUT_DIR [--prev-commit SHA]

Per (tree, offload): the median over repeats of each run's median step time, tokens/s,
peak GPU memory allocated and peak host RSS; the ratio new/prev of each; the verdict
"within noise" when the step-time ratio is inside [0.97, 1.03].
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import _bench_common as bc  # noqa: E402

NOISE = 0.03
KEYS = ("step_s", "tokens_s", "peak_gpu_alloc_gib", "peak_rss_gib_tree_total")


def collect(out_dir: str) -> dict[tuple[str, str], list[dict]]:
    runs: dict[tuple[str, str], list[dict]] = {}
    for path in sorted(glob.glob(os.path.join(out_dir, "ab_*_*_r*.json"))):
        m = re.match(r"ab_(new|prev)_(\w+?)_r(\d+)\.json$", os.path.basename(path))
        if not m:
            continue
        for r in bc.read_json(path).get("runs", []):
            if r.get("status") == "ok" and r.get("system") == "tierlift":
                runs.setdefault((m.group(1), m.group(2)), []).append(r)
    return runs


def summarize(runs: dict[tuple[str, str], list[dict]]) -> dict:
    table = {}
    for (tree, off), rs in runs.items():
        table.setdefault(off, {})[tree] = {
            "runs": len(rs), "step_s_each": [r["step_s"] for r in rs],
            **{k: statistics.median(r[k] for r in rs if r.get(k) is not None)
               for k in KEYS if any(r.get(k) is not None for r in rs)}}
    for off, by_tree in table.items():
        if "new" in by_tree and "prev" in by_tree:
            by_tree["ratio_new_over_prev"] = {k: by_tree["new"][k] / by_tree["prev"][k]
                                             for k in KEYS if k in by_tree["new"] and k in by_tree["prev"]}
            r = by_tree["ratio_new_over_prev"]["step_s"]
            by_tree["verdict"] = ("within noise" if abs(r - 1) <= NOISE
                                  else "faster" if r < 1 else "SLOWER")
    return table


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir")
    p.add_argument("--prev-commit", default=os.environ.get("AB_PREV_COMMIT"))
    a = p.parse_args(argv)
    table = summarize(collect(a.out_dir))
    lines = ["# L1B, this tree vs the previous commit, one GPU, one session", "",
             f"previous commit: {a.prev_commit}; this tree: {bc.tierlift_commit()}", "",
             "| offload | prev step s | new step s | new/prev step | new/prev tokens/s | new/prev GPU alloc "
             "| new/prev RSS | verdict (±3%) |", "|---|---|---|---|---|---|---|---|"]
    for off, t in sorted(table.items()):
        if "ratio_new_over_prev" not in t:
            lines.append(f"| {off} | incomplete: {sorted(k for k in t if k in ('new', 'prev'))} |")
            continue
        r = t["ratio_new_over_prev"]
        lines.append(f"| {off} | {t['prev']['step_s']:.4f} | {t['new']['step_s']:.4f} | {r['step_s']:.3f} "
                     f"| {r.get('tokens_s', float('nan')):.3f} | {r.get('peak_gpu_alloc_gib', float('nan')):.3f} "
                     f"| {r.get('peak_rss_gib_tree_total', float('nan')):.3f} | {t['verdict']} |")
    bc.write_report(a.out_dir, "ab_perf", lines, {"prev_commit": a.prev_commit, "noise": NOISE, "table": table})
    return 0


if __name__ == "__main__":
    sys.exit(main())
