"""Issue 6's weak-scaling curve from bench_zero.py results: a plot and a table.

    python benchmarks/scaling_plot.py --out docs/scaling.png \
        benchmarks/results/zero_h200x4.json benchmarks/results/zero_h200x2_offload-cpu.json

Each JSON is one bench_zero.py run (one model, one offload mode, several GPU counts,
systems side by side).  Per (mode, system): tokens/s per GPU against the GPU count,
and the weak-scaling efficiency tokens/s(N) / (N x tokens/s(1)) -- the micro-batch
per GPU is fixed, so perfect scaling keeps tokens/s per GPU flat.  The markdown
table goes to stdout (and --table).
"""

from __future__ import annotations

import argparse
import json
import sys


def load(paths: list[str]) -> list[dict]:
    rows = []
    for path in paths:
        doc = json.load(open(path, encoding="utf-8"))
        p = doc.get("params", {})
        machine = (doc.get("facts") or {}).get("gpu_name") or ""
        for r in doc.get("runs", []):
            if r.get("status") == "ok" and r.get("tokens_s"):
                rows.append({"model": p.get("model"), "offload": r.get("offload", p.get("offload")),
                             "system": r["system"], "gpus": int(r["gpus"]), "tokens_s": float(r["tokens_s"]),
                             "peak_gpu_alloc_gib": r.get("peak_gpu_alloc_gib"),
                             "peak_rss_gib_node": r.get("peak_rss_gib_tree_total"), "source": path,
                             "machine": machine})
    return rows


def table(rows: list[dict]) -> list[str]:
    out = ["| model | offload | GPUs | system | tokens/s | tokens/s per GPU | efficiency vs 1 GPU | "
           "peak GPU alloc GiB | peak host RSS GiB (node) | tierlift vs it |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    base = {(r["model"], r["offload"], r["system"]): r["tokens_s"] for r in rows if r["gpus"] == 1}
    tl = {(r["model"], r["offload"], r["gpus"]): r["tokens_s"] for r in rows if r["system"] == "tierlift"}
    for r in sorted(rows, key=lambda r: (r["model"], r["offload"], r["gpus"], r["system"])):
        b = base.get((r["model"], r["offload"], r["system"]))
        eff = f"{r['tokens_s'] / (r['gpus'] * b):.1%}" if b else "–"
        t = tl.get((r["model"], r["offload"], r["gpus"]))
        vs = f"{t / r['tokens_s']:.3f}x" if t and r["system"] != "tierlift" else ""
        out.append(f"| {r['model']} | {r['offload']} | {r['gpus']} | {r['system']} | {r['tokens_s'] / 1e3:.1f}k | "
                   f"{r['tokens_s'] / r['gpus'] / 1e3:.1f}k | {eff} | {r['peak_gpu_alloc_gib'] or 0:.1f} | "
                   f"{r['peak_rss_gib_node'] or 0:.1f} | {vs} |")
    return out


def plot(rows: list[dict], out: str) -> None:
    from matplotlib.figure import Figure  # no pyplot: Agg through savefig

    modes = sorted({(r["model"], r["offload"]) for r in rows})
    fig = Figure(figsize=(5.2 * len(modes), 4.0))
    for i, (model, offload) in enumerate(modes):
        ax = fig.add_subplot(1, len(modes), i + 1)
        for system in ("tierlift", "deepspeed", "fsdp2"):
            pts = sorted((r["gpus"], r["tokens_s"] / r["gpus"]) for r in rows
                         if (r["model"], r["offload"], r["system"]) == (model, offload, system))
            if pts:
                ax.plot([g for g, _ in pts], [t / 1e3 for _, t in pts], marker="o", label=system)
        ax.set_xscale("log", base=2)
        ax.set_xticks([1, 2, 4, 8], labels=["1", "2", "4", "8"])
        ax.set_xlim(0.8, 10)
        ax.set_ylim(bottom=0)
        ax.set_xlabel("GPUs (one host)")
        ax.set_ylabel("tokens/s per GPU (k)")
        ax.set_title(f"{model}, ZeRO-3, offload {offload}")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", nargs="+", help="bench_zero.py result JSON files")
    ap.add_argument("--out", required=True, help="PNG to write")
    ap.add_argument("--table", default=None, help="also write the markdown table here")
    a = ap.parse_args(argv)
    rows = load(a.results)
    if not rows:
        print("no successful runs in " + ", ".join(a.results), file=sys.stderr)
        return 1
    plot(rows, a.out)
    lines = table(rows)
    if a.table:
        with open(a.table, "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
