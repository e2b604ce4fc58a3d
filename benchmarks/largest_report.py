"""Issue 4's largest-model line from one device session's $OUT.

    python benchmarks/largest_report.py OUT_DIR   # writes OUT_DIR/largest_model.md and .json

Reads ``largest_<system>_<model>.json`` (bench_zero.py runs under the same caps:
GPU memory per process and a cgroup v2 host-memory cap).  For each system the
largest model that trained every step counts; a system whose every run failed has
none.  The ratio is tierlift's largest over the peer's; when the peer also failed a
smaller size, its largest is below that size and the ratio a lower bound.
"""

from __future__ import annotations

import glob
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _bench_common as bc  # noqa: E402


def main(out: str) -> int:
    runs = []
    for path in sorted(glob.glob(os.path.join(out, "largest_*.json"))):
        try:
            doc = json.load(open(path, encoding="utf-8"))
        except (OSError, ValueError):
            continue
        model = doc.get("params", {}).get("model")
        for r in doc.get("runs", []):
            runs.append({"system": r["system"], "model": model, "params": bc.llama_params(model),
                         "status": r.get("status"), "step_s": r.get("step_s"),
                         "peak_rss_gib": r.get("peak_rss_gib_max_rank"), "peak_gpu_alloc_gib": r.get("peak_gpu_alloc_gib"),
                         "host_cap": r.get("host_cap"), "error": (r.get("error") or "")[:160]})
    best = {}
    for r in runs:
        if r["status"] == "ok" and r["params"] > best.get(r["system"], {}).get("params", 0):
            best[r["system"]] = r
    failed_min = {}  # the smallest size a system could not train: killed for memory, or errored
    for r in runs:
        oom = (r["host_cap"] or {}).get("oom_kills", 0) > 0
        if r["status"] == "error" or oom:
            failed_min[r["system"]] = min(failed_min.get(r["system"], float("inf")), r["params"])
    unfinished = {r["system"]: r for r in runs if r["status"] == "timeout"}
    lines = ["# Largest model under a 16 GiB GPU cap and a 24 GiB host cap, one H100 session", "",
             "| system | model | params (B) | status | step s | peak RSS GiB | peak GPU alloc GiB | OOM kills | note |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(runs, key=lambda r: (r["system"], r["params"])):
        cap = r["host_cap"] or {}
        lines.append(f"| {r['system']} | {r['model']} | {r['params'] / 1e9:.3f} | {r['status']} | {bc.fmt(r['step_s'], 2)} | "
                     f"{bc.fmt(r['peak_rss_gib'], 1)} | {bc.fmt(r['peak_gpu_alloc_gib'], 1)} | {cap.get('oom_kills', '–')} | "
                     f"{r['error'] if r['status'] != 'ok' else ''} |")
    res = {"runs": runs}
    tl, ds = best.get("tierlift"), best.get("deepspeed")
    if tl and ds:
        ratio = tl["params"] / ds["params"]
        bound = failed_min.get("deepspeed")
        res.update(tierlift_largest=tl["params"], deepspeed_largest=ds["params"], ratio=ratio,
                   deepspeed_failed_at=bound)
        note = ""
        if bound:
            note = (f" It failed (out of memory or error) at {bound / 1e9:.2f} B, so its largest is below that: "
                    f"tierlift / {bound / 1e9:.2f} B = {tl['params'] / bound:.2f}x is a lower bound on the ratio.")
        t = unfinished.get("deepspeed")
        if t and t["params"] > ds["params"]:
            res["deepspeed_unfinished"] = t["params"]
            note += (f" At {t['params'] / 1e9:.2f} B it had not finished its steps when the run's time limit killed it "
                     f"(peak RSS {bc.fmt(t['peak_rss_gib'], 1)} GiB under the cap, no OOM kill): not a memory failure; "
                     f"had it trained, the ratio would be {tl['params'] / t['params']:.2f}x.")
        lines += ["", f"tierlift's largest trained: {tl['params'] / 1e9:.2f} B; DeepSpeed ZeRO-Infinity's: "
                  f"{ds['params'] / 1e9:.2f} B. Ratio of the largest trained: {ratio:.2f}x "
                  f"(target >= 2x: {'met' if ratio >= 2 else 'NOT met'}).{note}"]
    bc.write_report(out, "largest_model", lines, res)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
