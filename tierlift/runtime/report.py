"""`tierlift report RUN_DIR`: one self-contained HTML page plus PNGs.

Reads what a run directory holds -- ``metrics/part-*.parquet`` (per step, rank 0),
``telemetry/rank-*-part-*.parquet`` and ``telemetry/events-rank-*-part-*.parquet``
(per rank, see tierlift/system/telemetry.py), ``summary.json``, ``config.yaml`` --
and writes ``RUN_DIR/report/report.html`` with every plot embedded as a base64
data URI (the same PNGs are written beside it).  The page has no script and a
Content-Security-Policy of ``default-src 'none'``: it renders offline, and any
attempt to fetch something shows up as a console error (which CI checks in headless
Chromium).  Missing inputs give an empty-state note instead of a plot.
"""

from __future__ import annotations

import base64
import html
import importlib.util
import json
import os
from collections import Counter, defaultdict
from typing import Any

from tierlift.errors import DataError, TierliftError
from tierlift.runtime.metrics_parts import latest_rows

__all__ = ["build_report"]

_GIB = 2 ** 30
_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
_CSS = """body{font:14px/1.45 system-ui,sans-serif;margin:24px auto;max-width:1180px;color:#222}
h1{font-size:22px}h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ddd;padding:3px 8px;text-align:left;
font-variant-numeric:tabular-nums}th{background:#f4f4f4}img{max-width:100%;border:1px solid #eee}
.note{color:#666;font-style:italic}pre{background:#f7f7f7;padding:8px;overflow:auto;max-height:420px}
figure{margin:12px 0}figcaption{color:#555}"""
_KNOWN = ("step_end", "checkpoint", "telemetry_overhead")  # tabulated elsewhere, not in the event table


def _read_parts(paths: list[str], notes: list[str], rerun_steps_replace: bool = False):
    """Concatenate Parquet parts; an unreadable part is skipped with a note.  With
    ``rerun_steps_replace`` (metrics/), rows of steps a resumed run re-ran give way to the
    resumed run's (``metrics_parts.latest_rows``)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    tables = []
    for p in sorted(paths):
        try:
            tables.append(pq.read_table(p))
        except Exception as exc:  # a torn or foreign file must not hide the rest of the run
            notes.append(f"skipped unreadable {os.path.basename(p)}: {exc}")
    if not tables:
        return None
    if rerun_steps_replace:
        tables = latest_rows(tables)
    return pa.concat_tables(tables, promote_options="default").to_pydict()


def _load(run_dir: str) -> dict[str, Any]:
    notes: list[str] = []
    d = {"notes": notes, "metrics": None, "samples": {}, "events": {}, "summary": None, "config": None}
    mdir = os.path.join(run_dir, "metrics")
    if os.path.isdir(mdir):
        d["metrics"] = _read_parts([os.path.join(mdir, n) for n in os.listdir(mdir) if n.endswith(".parquet")],
                                   notes, rerun_steps_replace=True)
    tdir = os.path.join(run_dir, "telemetry")
    if os.path.isdir(tdir):
        groups: dict[tuple[str, int], list[str]] = defaultdict(list)
        for n in os.listdir(tdir):
            if not n.endswith(".parquet"):
                continue  # *.tmp: a part being written
            head, _, rank = n.partition("-part-")[0].rpartition("rank-")
            if rank.isdigit():
                groups[("events" if head.startswith("events") else "samples", int(rank))].append(
                    os.path.join(tdir, n))
        for (what, rank), paths in sorted(groups.items()):
            table = _read_parts(paths, notes)
            if table is not None:
                d[what][rank] = table
    path = os.path.join(run_dir, "summary.json")
    if os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as f:
                d["summary"] = json.load(f)
        except ValueError as exc:
            notes.append(f"summary.json is not valid JSON ({exc}); the run may have been interrupted")
    path = os.path.join(run_dir, "config.yaml")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            d["config"] = f.read()
    return d


# -- plots ------------------------------------------------------------------------

def _fig(rows: int = 1, height: float = 3.6):
    from matplotlib.figure import Figure  # no pyplot: leaves the caller's backend alone; PNG uses Agg
    fig = Figure(figsize=(11, height * rows), dpi=100, layout="constrained")
    return fig, fig.subplots(rows, 1, squeeze=False)[:, 0]


def _xy(table: dict, x: str, y: str, scale: float = 1.0):
    """Pairs where both columns exist and y is not null (absent columns give nothing)."""
    xs, ys = table.get(x) or [], table.get(y) or []
    pts = [(a, b / scale) for a, b in zip(xs, ys) if a is not None and b is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def _line(ax, xy, *fmt, **kw):
    """A line, with markers when there are few points (one sample is otherwise invisible)."""
    xs, ys = xy
    if len(xs) < 30:
        kw.setdefault("marker", "o")
        kw.setdefault("ms", 3)
    return ax.plot(xs, ys, *fmt, **kw)


def _t0(d: dict) -> float | None:
    times = [t for tab in list(d["samples"].values()) + list(d["events"].values()) for t in tab.get("time", [])]
    return min(times) if times else None


def _rel(table: dict, t0: float) -> dict:
    return {**table, "t": [t - t0 for t in table.get("time", [])]}


def _plot_loss(d):
    m = d["metrics"]
    fig, (ax,) = _fig()
    ax.plot(*_xy(m, "step", "loss"), label="train loss")
    if "eval_loss" in m:
        ax.plot(*_xy(m, "step", "eval_loss"), "o-", label="eval loss")
    ax.set(xlabel="optimizer step", ylabel="loss", title="Loss")
    ax.grid(alpha=.3)
    ax.legend()
    return fig


def _plot_step_time(d):
    m = d["metrics"]
    fig, (ax,) = _fig()
    ax.plot(*_xy(m, "step", "step_time_s"), color="C0", label="step time (s)")
    ax.set(xlabel="optimizer step", ylabel="step time (s)", title="Step time and throughput")
    ax.grid(alpha=.3)
    ax2 = ax.twinx()
    ax2.plot(*_xy(m, "step", "tokens_per_s"), color="C1", label="tokens/s")
    ax2.set_ylabel("tokens/s (all ranks)")
    fig.legend(loc="outside lower center", ncols=2)
    return fig


def _breakdown(d) -> list[tuple[str, float]]:
    """Seconds of the run spent in steps, prefetch stalls (inside steps), checkpoints and the rest."""
    m, ev0 = d["metrics"] or {}, d["events"].get(min(d["events"]) if d["events"] else -1, {})
    steps = sum(v for v in m.get("step_time_s", []) if v is not None)
    kinds, vals = ev0.get("kind", []), ev0.get("value", [])
    stall = sum(v or 0 for k, v in zip(kinds, vals) if k == "prefetch_stall") / 1e3  # ms -> s
    ckpt = sum(v or 0 for k, v in zip(kinds, vals) if k == "checkpoint")
    parts = [("steps: compute and transfers", max(0.0, steps - stall)), ("steps: prefetch stalls", stall),
             ("checkpoints", ckpt)]
    times = [t for tab in d["samples"].values() for t in tab.get("time", [])]
    if times:  # wall clock of the sampler: startup, eval and logging are "other"
        parts.append(("other (start-up, eval, logging)", max(0.0, max(times) - min(times) - steps - ckpt)))
    return [p for p in parts if p[1] > 0]


def _plot_breakdown(d):
    parts = _breakdown(d)
    fig, (ax,) = _fig(height=2.2)
    left = 0.0
    for i, (name, secs) in enumerate(parts):
        ax.barh([0], [secs], left=left, color=f"C{i}", label=f"{name}: {secs:.2f} s")
        left += secs
    ax.set(yticks=[], xlabel="seconds", title="Where the run's time went (rank 0)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1))
    return fig


def _plot_memory(d):
    fig, (ax,) = _fig(height=4.2)
    series = (("gpu_alloc_bytes", "GPU allocated (torch)"), ("gpu_mem_used_bytes", "GPU used (NVML)"),
              ("host_rss_bytes", "host RSS"), ("pinned_bytes", "pinned host"))
    if d["samples"]:
        t0 = _t0(d)
        for rank, tab in d["samples"].items():
            tab = _rel(tab, t0)
            for i, (col, name) in enumerate(series):
                xs, ys = _xy(tab, "t", col, _GIB)
                if any(ys):
                    _line(ax, (xs, ys), color=f"C{i}", lw=1.6 if rank == 0 else 0.8, label=f"{name}, rank {rank}")
        ax.set_xlabel("seconds since the first sample")
    else:  # no telemetry: the per-step readings of metrics/ (rank 0)
        for i, (col, name) in enumerate(series):
            xs, ys = _xy(d["metrics"] or {}, "step", col, _GIB)
            if any(ys):
                _line(ax, (xs, ys), color=f"C{i}", label=name)
        ax.set_xlabel("optimizer step")
    ax.set(ylabel="GiB", title="Memory per tier")
    ax.grid(alpha=.3)
    if ax.lines:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
    return fig


def _plot_io(d):
    fig, (a1, a2) = _fig(rows=2, height=3.0)
    t0 = _t0(d)
    for rank, tab in d["samples"].items():
        tab, lw = _rel(tab, t0), 1.6 if rank == 0 else 0.8
        if rank == min(d["samples"]):  # disk counters are node-wide: one rank's view is enough
            _line(a1, _xy(tab, "t", "disk_read_bytes_per_s", 1e6), color="C0", label="disk read")
            _line(a1, _xy(tab, "t", "disk_write_bytes_per_s", 1e6), color="C3", label="disk write")
        _line(a2, _xy(tab, "t", "pcie_rx_kb_per_s", 1e6), color="C2", lw=lw, label=f"PCIe rx (H2D), rank {rank}")
        _line(a2, _xy(tab, "t", "pcie_tx_kb_per_s", 1e6), color="C4", lw=lw, label=f"PCIe tx (D2H), rank {rank}")
    a1.set(ylabel="MB/s", title="Disk throughput (node)")
    a2.set(ylabel="GB/s", xlabel="seconds since the first sample", title="PCIe throughput (NVML)")
    for ax, empty in ((a1, "no disk counters"), (a2, "no PCIe counters (no GPU, or NVML unavailable)")):
        ax.grid(alpha=.3)
        if any(line.get_xydata().size for line in ax.lines):
            ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
        else:
            ax.set(xticks=[], yticks=[])
            ax.text(0.5, 0.5, empty, transform=ax.transAxes, ha="center", color="#777")
    return fig


def _prefetch_per_step(d) -> dict[int, dict[str, float]]:
    per: dict[int, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for tab in d["events"].values():
        for k, s, v in zip(tab.get("kind", []), tab.get("step", []), tab.get("value", [])):
            if k in ("prefetch_hit", "prefetch_miss", "prefetch_stall", "prefetch_issued"):
                # stall: value is ms; hit/miss/issued: value is a count (one when absent)
                per[s][k] += (v or 0.0) if k == "prefetch_stall" else (1.0 if v is None else v)
    return per


def _plot_prefetch(d):
    per = _prefetch_per_step(d)
    steps = sorted(per)
    fig, (a1, a2) = _fig(rows=2, height=2.8)
    rate = [(s, per[s]["prefetch_hit"] / (per[s]["prefetch_hit"] + per[s]["prefetch_miss"])) for s in steps
            if per[s]["prefetch_hit"] + per[s]["prefetch_miss"] > 0]
    a1.plot([s for s, _ in rate], [r * 100 for _, r in rate], "o-", ms=3)
    a1.set(ylabel="hit rate (%)", ylim=(0, 105), title="Prefetch hit rate (all ranks)")
    a2.bar(steps, [per[s]["prefetch_stall"] for s in steps], color="C3")
    a2.set(xlabel="optimizer step", ylabel="stall (ms)", title="Prefetch stall per step")
    for ax in (a1, a2):
        ax.grid(alpha=.3)
    return fig


def _plot_activations(d):
    """The activation executor's per-step columns (train.activations, offload/activations.py)."""
    m = d["metrics"]
    fig, (a1, a2) = _fig(2, 2.8)
    _line(a1, _xy(m, "step", "act_peak_bytes", 2**30), label="peak kept on the device (GiB)")
    _line(a1, _xy(m, "step", "act_swapped_bytes", 2**30), label="swapped to host (GiB)")
    a1.set(ylabel="GiB", title="Saved activations")
    _line(a2, _xy(m, "step", "act_recompute_ms"), color="C2", label="recompute (ms)")
    _line(a2, _xy(m, "step", "act_swap_stall_ms"), color="C3", label="swap-in stall (ms)")
    a2.set(xlabel="optimizer step", ylabel="ms per step")
    for ax in (a1, a2):
        ax.grid(alpha=.3)
        ax.legend()
    return fig


def _save(fig, out_dir: str, name: str) -> str:
    """Write the PNG beside the page and return it base64-encoded for the data URI."""
    path = os.path.join(out_dir, name)
    fig.savefig(path, format="png")
    with open(path, "rb") as f:
        return base64.b64encode(f.read()).decode("ascii")


# -- page ---------------------------------------------------------------------------

def _table(header: list[str], rows: list[list[Any]]) -> str:
    def cell(v):
        if isinstance(v, float):
            v = f"{v:.4g}"
        return f"<td>{html.escape(str(v) if v is not None else '')}</td>"
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    return f"<table><tr>{head}</tr>" + "".join(f"<tr>{''.join(cell(v) for v in r)}</tr>" for r in rows) + "</table>"


def _note(text: str) -> str:
    return f'<p class="note">{html.escape(text)}</p>'


def _summary_rows(d) -> list[list[Any]]:
    s, rows = d["summary"] or {}, []
    for key in ("start_step", "steps", "world_size", "tokens_per_step", "tokens_per_s"):
        if key in s:
            rows.append([key, s[key]])
    for key in ("peak_gpu_alloc_bytes", "peak_gpu_reserved_bytes", "peak_host_rss_bytes", "pinned_bytes"):
        if s.get(key) is not None:
            rows.append([key.replace("_bytes", " (GiB)"), s[key] / _GIB])
    if s.get("losses"):
        rows.append(["loss first -> last", f"{s['losses'][0]:.4f} -> {s['losses'][-1]:.4f}"])
    if s.get("step_times"):
        rows.append(["mean step time (s)", sum(s["step_times"]) / len(s["step_times"])])
    for rank, tab in d["events"].items():
        over = [v for k, v in zip(tab.get("kind", []), tab.get("value", [])) if k == "telemetry_overhead"]
        if over:
            rows.append([f"telemetry overhead, rank {rank} (CPU s / wall s)", over[-1]])
    return rows


def _event_sections(d) -> str:
    counts: Counter = Counter()
    rows = []
    for rank, tab in d["events"].items():
        for t, s, k, v, det in zip(tab.get("time", []), tab.get("step", []), tab.get("kind", []),
                                   tab.get("value", []), tab.get("detail", [])):
            counts[k] += 1
            if k not in _KNOWN:
                rows.append([rank, s, k, v, det or ""])
    out = ["<h2>Events</h2>"]
    if not counts:
        return out[0] + _note("No runtime events recorded (the run has no telemetry/ events parts).")
    out.append(_table(["kind", "count"], sorted(counts.items())))
    policy = [r for r in rows if r[2].startswith("policy")]
    out.append("<h2>Policy decisions</h2>")
    out.append(_table(["rank", "step", "kind", "value", "detail"], policy[-200:]) if policy else
               _note("No policy decisions recorded: the runtime did not re-plan during this run."))
    other = [r for r in rows if not r[2].startswith("policy")]
    if other:
        out.append(f"<h2>Other events (last {min(200, len(other))} of {len(other)})</h2>")
        out.append(_table(["rank", "step", "kind", "value", "detail"], other[-200:]))
    return "".join(out)


def build_report(run_dir: str, out_dir: str | None = None) -> str:
    """Render RUN_DIR's report; returns the path of ``report.html``."""
    run_dir = os.path.abspath(run_dir)
    markers = ("metrics", "telemetry", "summary.json", "config.yaml")
    if not os.path.isdir(run_dir) or not any(os.path.exists(os.path.join(run_dir, m)) for m in markers):
        raise DataError("is not a tierlift run directory (it has none of metrics/, telemetry/, summary.json, "
                        "config.yaml).", setting="RUN_DIR", value=run_dir,
                        fix="give the --run-dir of a `tierlift train` run, or a Trainer's run_dir.")
    if importlib.util.find_spec("matplotlib") is None:
        raise TierliftError("needs matplotlib.", setting="report", value=None,
                            fix="pip install 'tierlift[report]' (matplotlib>=3.8).")
    out_dir = os.path.abspath(out_dir or os.path.join(run_dir, "report"))
    os.makedirs(out_dir, exist_ok=True)
    d = _load(run_dir)
    has_m = bool(d["metrics"] and d["metrics"].get("step"))
    has_prefetch = bool(_prefetch_per_step(d))
    plots = [  # (file, caption, builder, available, why not)
        ("loss.png", "Training loss per optimizer step", _plot_loss, has_m, "no metrics/ parts"),
        ("step_time.png", "Step time and tokens/s", _plot_step_time, has_m, "no metrics/ parts"),
        ("time_breakdown.png", "Step-time breakdown", _plot_breakdown, bool(_breakdown(d)), "no steps timed"),
        ("memory.png", "Memory per tier over time", _plot_memory, bool(d["samples"]) or has_m,
         "no telemetry/ samples and no metrics/"),
        ("io.png", "Disk and PCIe throughput", _plot_io, bool(d["samples"]), "no telemetry/ samples"),
        ("prefetch.png", "Prefetch hit rate and stalls", _plot_prefetch, has_prefetch,
         "no prefetch events recorded (the engine emitted none for this run)"),
        ("activations.png", "Activations: kept, swapped, recomputed", _plot_activations,
         bool((d["metrics"] or {}).get("act_peak_bytes")), "train.activations.policy is keep (no executor ran)"),
    ]
    body = [f"<h1>tierlift run report</h1><p>{html.escape(run_dir)}</p>"]
    body += [_note(n) for n in d["notes"]]
    body.append("<h2>Summary</h2>")
    rows = _summary_rows(d)
    body.append(_table(["", "value"], rows) if rows else _note("No summary.json: the run did not finish."))
    body.append("<h2>Plots</h2>")
    for name, caption, build, ok, why in plots:
        if not ok:
            body.append(f"<h3>{html.escape(caption)}</h3>" + _note(f"Not available: {why}."))
            continue
        fig = build(d)
        data = _save(fig, out_dir, name)
        body.append(f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{data}">'
                    f'<figcaption>{html.escape(caption)} (<a href="{name}">{name}</a>)</figcaption></figure>')
    body.append(_event_sections(d))
    body.append("<h2>Config</h2>" + (f"<pre>{html.escape(d['config'])}</pre>" if d["config"] else
                                     _note("No config.yaml in the run directory.")))
    page = (f'<!doctype html><html lang="en"><head><meta charset="utf-8">'
            f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">'
            f"<title>tierlift report: {html.escape(os.path.basename(run_dir))}</title>"
            f"<style>{_CSS}</style></head><body>{''.join(body)}</body></html>\n")
    path = os.path.join(out_dir, "report.html")
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write(page)
    os.replace(path + ".tmp", path)
    return path
