"""Issue 13's long-context comparison from ``gpu_session.sh``'s ``act`` stage: L1B at
micro-batch 1, tierlift ``train.activations.policy: auto`` against FSDP2 with full
activation checkpointing and FSDP2 keeping everything (and, under ``--gpu-mem-gib``,
the same under a per-process GPU cap), one machine, one session.

    python3 benchmarks/act_report.py OUT_DIR

Reads ``act_<system>_<mode>_<capGiB>_<seq>.json`` (bench_zero.py runs), writes ``act.md`` /
``act.json``: tokens/s, peak GPU memory, MFU (model FLOPs per token 6N + 12·L·h·s, the
PaLM count with attention, over the H200's 989 TFLOP/s dense bf16 datasheet peak), the
ratios tierlift/peer, and the activation plan's predicted step time beside the measured
one (target within ±15%).
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import _bench_common as bc  # noqa: E402

PEAK_FLOPS = 989e12


def flops_per_token(model: str, seq: int) -> float:
    p = bc.model_preset(model)
    return 6 * bc.llama_params(model) + 12 * p["num_hidden_layers"] * p["hidden_size"] * seq


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir")
    a = ap.parse_args(argv)
    rows = {}
    for path in sorted(glob.glob(os.path.join(a.out_dir, "act_*_*_*_*.json"))):
        m = re.match(r"act_(\w+?)_(\w+?)_(\d+)_(\d+)\.json$", os.path.basename(path))
        if not m:
            continue
        d = bc.read_json(path)
        run = next((r for r in d.get("runs", []) if r.get("status") == "ok"), None)
        sysname, mode, cap, seq = m.group(1), m.group(2), int(m.group(3)), int(m.group(4))
        fails = [f"{r.get('status')}: {str(r.get('error'))[:160]}" for r in d.get("runs", []) if r.get("status") != "ok"]
        row = {"system": sysname, "mode": mode, "cap_gib": cap, "seq": seq, "ok": run is not None, "failed": fails}
        if run:
            model = d["params"]["model"]
            row.update(step_s=run["step_s"], tokens_s=run["tokens_s"], peak_gpu_alloc_gib=run.get("peak_gpu_alloc_gib"),
                       peak_gpu_reserved_gib=run.get("peak_gpu_reserved_gib"),
                       mfu=run["tokens_s"] * flops_per_token(model, seq) / PEAK_FLOPS)
            plan = run.get("activation_plan")
            if plan:
                row["predicted_step_s"] = plan["predicted_step_s"]
                row["predicted_over_measured"] = plan["predicted_step_s"] / run["step_s"]
                row["plan"] = {dd: sum(1 for x in plan["decisions"] if x["decision"] == dd)
                               for dd in ("keep", "swap", "recompute", "selective")}
        rows[(sysname, mode, cap, seq)] = row
    lines = ["# Long context: tierlift activation plan vs FSDP2, L1B, micro-batch 1, one GPU, one session", "",
             "| system | activations | GPU cap GiB | seq | tokens/s | step s | peak alloc GiB | MFU | plan | "
             "predicted/measured |", "|---|---|---|---|---|---|---|---|---|---|"]
    for k, r in sorted(rows.items(), key=lambda kv: (kv[0][3], kv[0][2], kv[0][0], kv[0][1])):
        if not r["ok"]:
            lines.append(f"| {r['system']} | {r['mode']} | {r['cap_gib'] or '-'} | {r['seq']} | failed: "
                         f"{'; '.join(r['failed'])[:200]} |")
            continue
        lines.append(f"| {r['system']} | {r['mode']} | {r['cap_gib'] or '-'} | {r['seq']} | {r['tokens_s']:,.0f} "
                     f"| {r['step_s']:.3f} | {bc.fmt(r['peak_gpu_alloc_gib'], 1)} | {r['mfu']:.1%} "
                     f"| {r.get('plan', '')} | {bc.fmt(r.get('predicted_over_measured'), 2)} |")
    ratios = []
    for (s, mode, cap, seq), r in rows.items():
        if s != "tierlift" or not r["ok"]:
            continue
        for (ps, pmode, pcap, pseq), pr in rows.items():
            if ps != "tierlift" and pcap == cap and pseq == seq and pr["ok"]:
                ratios.append({"seq": seq, "cap_gib": cap, "tierlift": mode, "peer": f"{ps}+{pmode}",
                               "tokens_s_ratio": r["tokens_s"] / pr["tokens_s"],
                               "peak_alloc_ratio": (r["peak_gpu_alloc_gib"] / pr["peak_gpu_alloc_gib"]
                                                    if r.get("peak_gpu_alloc_gib") and pr.get("peak_gpu_alloc_gib")
                                                    else None)})
    lines += ["", "| seq | GPU cap | tierlift | peer | tokens/s ratio | peak alloc ratio |", "|---|---|---|---|---|---|"]
    for x in sorted(ratios, key=lambda x: (x["seq"], x["cap_gib"], x["peer"])):
        lines.append(f"| {x['seq']} | {x['cap_gib'] or '-'} | {x['tierlift']} | {x['peer']} | "
                     f"{x['tokens_s_ratio']:.3f} | {bc.fmt(x['peak_alloc_ratio'], 3)} |")
    bc.write_report(a.out_dir, "act", lines, {"rows": list(rows.values()), "ratios": ratios,
                                              "peak_flops": PEAK_FLOPS})
    return 0


if __name__ == "__main__":
    sys.exit(main())
