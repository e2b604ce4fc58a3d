"""What verifying NVMe-resident optimizer state costs (issue 17): L1B, tierlift with the
optimizer on NVMe, ``offload.optimizer.verify`` on and off side by side in one command:

    python3 benchmarks/bench_nvme_verify.py --out benchmarks/results/nvme_verify_h200.json \
        [--repeats 2] [--steps 6] [--warmup 2] [--budget 560]

(or ``STAGES=verify bash benchmarks/gpu_session.sh`` on the device, which writes
``$OUT/nvme_verify.md``).  Each (repeat, setting) is one ``bench_zero.py`` run of tierlift
alone on one GPU with ``--offload nvme`` -- a fresh torchrun process whose extent file
is deleted afterwards -- and odd repeats run "off" first, so drift of the disk or the
page cache does not favour either setting.  With verification on, every read of the
extent file is crc32-checked on the I/O thread that read it (writes are checksummed
either way).

Writes ``--out`` (JSON: every run's record) and its markdown twin: per setting the
median over repeats of each run's median step time and tokens/s, and the ratio
on / off of the step time against the target (<= 1.03).  ``--device cpu --model tiny``
runs the same on CPU ranks (a smoke test of the harness, not a measurement).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import _bench_common as bc  # noqa: E402

TARGET = 1.03  # step time with verification / without
SETTINGS = ("on", "off")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="result JSON; the markdown goes next to it as .md")
    p.add_argument("--model", default="l1b")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--mbs", type=int, default=8)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--nvme-dir", default="/tmp/tl-bench-nvme")
    p.add_argument("--timeout", type=float, default=240.0, help="seconds per run")
    p.add_argument("--budget", type=float, default=560.0, help="seconds for all runs")
    p.add_argument("--min-run-s", type=float, default=60.0, help="a run needs this much budget left to start")
    p.add_argument("--logdir", default=None, help="default: <out>_logs/")
    a = p.parse_args(argv)
    if a.steps <= a.warmup:
        p.error("--steps must exceed --warmup")
    a.base = a.out[:-5] if a.out.endswith(".json") else a.out
    a.logdir = a.logdir or a.base + "_logs"
    return a


def one_run(a, setting: str, rep: int, left_s: float) -> dict:
    """One bench_zero.py run; its tierlift record (status ok/error/skipped)."""
    out = os.path.join(a.logdir, f"verify_{setting}_r{rep}.json")
    tl_config = json.dumps({"offload": {"optimizer": {"verify": setting == "on"}}})
    cmd = [sys.executable, os.path.join(HERE, "bench_zero.py"), "--gpus", "1", "--systems", "tierlift",
           "--model", a.model, "--steps", str(a.steps), "--warmup", str(a.warmup), "--mbs", str(a.mbs),
           "--seq", str(a.seq), "--offload", "nvme", "--nvme-dir", a.nvme_dir, "--device", a.device,
           "--timeout", str(min(a.timeout, left_s)), "--budget", str(left_s), "--min-run-s", str(a.min_run_s),
           "--tl-config", tl_config, "--out", out, "--logdir", os.path.join(a.logdir, f"{setting}_r{rep}")]
    p = subprocess.run(cmd, capture_output=True, text=True)
    for line in p.stdout.splitlines():
        if line.startswith("[bench_zero]"):
            print(f"[verify {setting} r{rep}] {line}", flush=True)
    try:
        with open(out, encoding="utf-8") as f:
            runs = json.load(f).get("runs", [])
    except (OSError, ValueError):
        runs = []
    rec = next((r for r in runs if r.get("system") == "tierlift"), None)
    if rec is None:
        return {"status": "error", "error": f"bench_zero.py exit {p.returncode}; no record",
                "log_tail": (p.stdout + p.stderr)[-2000:]}
    return rec


def summarize(runs: list[dict]) -> dict:
    out: dict = {}
    for s in SETTINGS:
        ok = [r for r in runs if r["setting"] == s and r.get("status") == "ok"]
        if ok:
            out[s] = {"step_s": bc.median(r["step_s"] for r in ok), "tokens_s": bc.median(r["tokens_s"] for r in ok),
                      "step_s_per_repeat": [r["step_s"] for r in ok], "runs": len(ok)}
    if "on" in out and "off" in out:
        out["ratio_on_over_off"] = out["on"]["step_s"] / out["off"]["step_s"]
        out["target_max"] = TARGET
        out["met"] = out["ratio_on_over_off"] <= TARGET
    return out


def report(a, runs: list[dict], summary: dict) -> list[str]:
    where = next((r["gpu_name"] for r in runs if r.get("gpu_name")), None) or a.device
    L = [f"# NVMe optimizer state: verification on vs off, {a.model}, 1 {where}",
         "", f"{len(runs)} runs, {a.steps} steps each ({a.warmup} warmup), micro-batch {a.mbs}, seq {a.seq}; "
             "odd repeats run 'off' first.", "",
         "| verify | step s (median) | tokens/s | step s per repeat |", "|---|---|---|---|"]
    for s in SETTINGS:
        e = summary.get(s)
        if e:
            L.append(f"| {s} | {bc.fmt(e['step_s'], 3)} | {bc.fmt(e['tokens_s'])} | "
                     f"{', '.join(bc.fmt(x, 3) for x in e['step_s_per_repeat'])} |")
        else:
            L.append(f"| {s} | no successful run | | |")
    if "ratio_on_over_off" in summary:
        L += ["", f"**step time on / off: {summary['ratio_on_over_off']:.4f}** (target <= {TARGET}: "
                  f"{'met' if summary['met'] else 'NOT met'})"]
    bad = [r for r in runs if r.get("status") != "ok"]
    for r in bad:
        L.append(f"- {r['setting']} r{r['repeat']}: {r.get('status')}: {str(r.get('error'))[:300]}")
    return L


def main(argv=None) -> int:
    a = parse_args(argv)
    os.makedirs(a.logdir, exist_ok=True)
    t0 = time.monotonic()
    runs: list[dict] = []
    for rep in range(a.repeats):
        for s in (SETTINGS if rep % 2 == 0 else SETTINGS[::-1]):
            left = a.budget - (time.monotonic() - t0)
            if left < a.min_run_s:
                runs.append({"setting": s, "repeat": rep, "status": "skipped",
                             "error": f"{left:.0f} s of budget left"})
                continue
            runs.append({**one_run(a, s, rep, left), "setting": s, "repeat": rep})
    summary = summarize(runs)
    facts = bc.env_facts()
    obj = {"bench": "nvme_verify", "created": bc.now_iso(), "args": vars(a), "env": facts,
           "summary": summary, "runs": runs}
    bc.write_report(os.path.dirname(os.path.abspath(a.out)), os.path.basename(a.base), report(a, runs, summary), obj)
    return 0 if "ratio_on_over_off" in summary else 1


if __name__ == "__main__":
    sys.exit(main())
