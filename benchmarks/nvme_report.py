"""Issue 4's NVMe line and issue 5's planner lines from one device session's $OUT.

    python benchmarks/nvme_report.py OUT_DIR      # writes OUT_DIR/nvme_l1b.md and .json

Reads what ``STAGES=plan,nvme[,zero] bash benchmarks/gpu_session.sh`` left in OUT_DIR:
``nvme_engine.json`` (bench_nvme.py: our engine and DeepSpeed's aio, same file and sizes),
``zero_*_offload-nvme.json`` (L1B: tierlift with the optimizer on NVMe, DeepSpeed
ZeRO-Infinity), ``zero_planned.json`` (tierlift with the planner's placement under the
host budget), ``plan_*.json`` (``tierlift plan --json``) and, when present,
``zero_*_offload-cpu.json``.

The disk floor: the bytes tierlift's optimizer moves per step (fp32 master, m and v of
every NVMe-resident shard element, read once and written once: 12 B each way) over the
read and write rates our engine measured on the same disk in the same session.
"""

from __future__ import annotations

import glob
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _bench_common as bc  # noqa: E402


def _load(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _run(doc, system: str):
    for r in (doc or {}).get("runs", []):
        if r.get("system") == system and r.get("status") == "ok":
            return r
    return None


def _fmt(x, nd=3):
    return "–" if x is None else f"{x:.{nd}f}"


def main(out: str) -> int:
    rows, res = [], {}
    eng = _load(os.path.join(out, "nvme_engine.json"))
    read_gbps = write_gbps = None
    if eng and eng.get("configs"):
        meds = [c["median"] for c in eng["configs"] if c.get("median")]
        med = meds[0]
        # The disk's rate: the best our engine reached in any configuration (the floor is then
        # the lowest defensible one).
        read_gbps = max(m.get("tierlift_read_gbps") or 0 for m in meds) or None
        write_gbps = max(m.get("tierlift_write_gbps") or 0 for m in meds) or None
        res["engine"] = meds
        rows.append(f"| NVMe engine write / DeepSpeed aio (8 MiB, first config) | {_fmt(med.get('ratio_write'))} | >= 0.95 |"
                    f" {'met' if (med.get('ratio_write') or 0) >= 0.95 else 'NOT met'} |")
        rows.append(f"| NVMe engine read / DeepSpeed aio | {_fmt(med.get('ratio_read'))} | >= 0.95 |"
                    f" {'met' if (med.get('ratio_read') or 0) >= 0.95 else 'NOT met'} |")
    nv = _load(next(iter(glob.glob(os.path.join(out, "zero_*_offload-nvme.json"))), ""))
    tl, ds = _run(nv, "tierlift"), _run(nv, "deepspeed")
    if tl:
        n = tl.get("n_params") or 0
        # Bytes per step.  Measured where the run reports them: the engine's cumulative NVMe
        # bytes (offload_busy_s.nvme_read_gib / nvme_written_gib); the state is written once at
        # setup and once per step, read once per step.  Otherwise from the model (elements ~
        # params; shard padding is < 0.1%): fp32 master, m and v read and written once; with
        # parameters on NVMe the bf16 copy is written with the state and read by each gather
        # (forward and backward, 2 B each).
        cfg = tl.get("tierlift_config") or {}
        params_nvme = cfg.get("offload", {}).get("param", {}).get("kind") == "nvme"
        busy = (tl.get("tierlift_summary") or {}).get("offload_busy_s") or {}
        steps = len(tl.get("step_times_s") or [])
        if busy.get("nvme_read_gib") and steps:
            read_b, write_b = busy["nvme_read_gib"] * 2**30 / steps, busy["nvme_written_gib"] * 2**30 / (steps + 1)
            source = f"measured: the engine's bytes over {steps} steps"
        else:
            read_b, write_b = (16 * n, 14 * n) if params_nvme else (12 * n, 12 * n)
            source = "from the model size"
        floor = read_b / (read_gbps * 1e9) + write_b / (write_gbps * 1e9) if read_gbps and write_gbps else None
        res["tierlift_nvme"] = {"step_s": tl["step_s"], "rss_gib": tl.get("peak_rss_gib_max_rank"),
                                "disk_floor_s": floor, "bytes_read": read_b, "bytes_written": write_b,
                                "bytes_source": source, "params_on_nvme": params_nvme,
                                "max_reuse_distance": cfg.get("zero", {}).get("max_reuse_distance", 0),
                                "busy": busy}
        if floor:
            r = tl["step_s"] / floor
            rows.append(f"| tierlift NVMe step / disk floor ({floor:.2f} s: {read_b / 1e9:.1f} GB read at "
                        f"{read_gbps:.2f} GB/s, {write_b / 1e9:.1f} GB written at {write_gbps:.2f} GB/s, {source}; "
                        f"parameters {'on NVMe' if params_nvme else 'in host memory'}) | {_fmt(r)} | <= 1.15 | "
                        f"{'met' if r <= 1.15 else 'NOT met'} |")
    if tl and ds:
        r, m = tl["step_s"] / ds["step_s"], tl["peak_rss_gib_max_rank"] / ds["peak_rss_gib_max_rank"]
        res["vs_zero_infinity"] = {"step_ratio": r, "rss_ratio": m, "deepspeed_step_s": ds["step_s"],
                                   "deepspeed_rss_gib": ds["peak_rss_gib_max_rank"]}
        rows.append(f"| step time / ZeRO-Infinity ({tl['step_s']:.2f} vs {ds['step_s']:.2f} s) | {_fmt(r)} | <= 0.8 |"
                    f" {'met' if r <= 0.8 else 'NOT met'} |")
        rows.append(f"| peak RSS / ZeRO-Infinity ({tl['peak_rss_gib_max_rank']:.1f} vs {ds['peak_rss_gib_max_rank']:.1f} GiB)"
                    f" | {_fmt(m)} | <= 0.35 | {'met' if m <= 0.35 else 'NOT met'} |")
    planned = _run(_load(os.path.join(out, "zero_planned.json")), "tierlift")
    if planned and ds:
        x = ds["step_s"] / planned["step_s"]
        res["planned_vs_zero_infinity"] = x
        rows.append(f"| planner's placement under the host budget: tokens/s / ZeRO-Infinity ({planned['step_s']:.3f} vs "
                    f"{ds['step_s']:.2f} s; RSS {planned.get('peak_rss_gib_max_rank', 0):.1f} GiB) | {_fmt(x, 1)} | >= 10 |"
                    f" {'met' if x >= 10 else 'NOT met'} |")
    cpu = _run(_load(next(iter(glob.glob(os.path.join(out, "zero_*_offload-cpu.json"))), "")), "tierlift")
    for tag, measured in (("cpu", cpu), ("nvme", tl), ("nvme_budget", planned)):
        plan = _load(os.path.join(out, f"plan_{tag}.json"))
        if plan and measured:
            pred = plan["step"]["step_s"]
            err = pred / measured["step_s"] - 1
            res[f"plan_{tag}"] = {"predicted_s": pred, "measured_s": measured["step_s"], "error": err,
                                  "rates": plan["rates"]["source"], "max_in_cpu": plan["max_in_cpu"]}
            rows.append(f"| plan prediction, {tag} ({pred:.3f} predicted vs {measured['step_s']:.3f} s measured) | "
                        f"{err:+.1%} | within ±20% | {'met' if abs(err) <= 0.2 else 'NOT met'} |")
    md = ["# L1B with NVMe offload and planned placement, one H100 session", "",
          "| quantity | value | target | |", "|---|---|---|---|", *rows, ""]
    bc.write_report(out, "nvme_l1b", md, res)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
