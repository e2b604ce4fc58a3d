"""ZeRO-3 head-to-head: tierlift vs DeepSpeed ZeRO-3 vs PyTorch FSDP2 on the anchor model L1B.

    python benchmarks/bench_zero.py --gpus 1,2 --systems tierlift,deepspeed,fsdp2 \
        --model l1b --steps 8 --warmup 3 [--offload none|cpu] [--repeats 2] \
        --out benchmarks/results/zero_h100.json

For every (repeat, GPU count, system) it launches ``zero_worker.py`` under
torchrun as a subprocess -- a fresh process per run, so no system inherits
another's allocator state, CUDA context or JIT caches in memory -- and samples
the host RSS of the whole process tree at 20 Hz from here.  A run that fails or
hangs is recorded (status, error, log tail) and the sweep goes on.  Odd repeats
run the systems in reverse order, so slow drift of the machine (clocks,
page cache, thermal) does not favour whoever goes first.

Writes one self-describing JSON (per-run records, per-(system, GPUs) summary,
tierlift/peer ratios, 2-GPU/1-GPU scaling, the issue's targets checked) and a
markdown twin ``<out>.md``; both are rewritten after every run, so a sweep cut
short by the device's time limit still leaves its finished runs behind.  The
markdown table is also printed at the end.

Definitions: step time = median over the timed steps (after --warmup) of the
per-step maximum over ranks; tokens/s = GPUs x micro-batch x seq / step time
(totals, like design.md section 4); peak GPU memory = max over ranks of
torch.cuda.max_memory_allocated / max_memory_reserved over the whole run;
peak RSS = peak over time of each rank's RSS (per rank) and of the sum over the
tree (torchrun agent and any compiler subprocesses included).
"""

from __future__ import annotations

import argparse
import glob
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import _bench_common as bc  # noqa: E402

WORKER = os.path.join(HERE, "zero_worker.py")
SYSTEMS = ("tierlift", "deepspeed", "fsdp2")
PEERS = ("deepspeed", "fsdp2")

# The acceptance targets (no offload).  Kept as data so the JSON says
# what was checked, and a change of target is one edit.
TARGETS = {
    "step_vs_deepspeed_max": 0.95,   # tierlift step time <= 0.95 x DeepSpeed's
    "step_vs_fsdp2_max": 1.0,        # tierlift step time <= FSDP2's
    "gpu_alloc_vs_deepspeed_max": 1.0,  # tierlift peak GPU memory <= DeepSpeed's
    "scaling_2_over_1_min": 1.85,    # tierlift 2-GPU tokens/s >= 1.85 x its 1-GPU tokens/s
}

MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpus", default="1", help="comma-separated GPU counts (ranks), e.g. 1,2")
    p.add_argument("--systems", default=",".join(SYSTEMS))
    p.add_argument("--model", default="l1b", help="a preset (l1b, tiny) or llama-H-L (hidden H, L layers)")
    p.add_argument("--steps", type=int, default=8, help="total optimizer steps per run (warmup included)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--mbs", type=int, default=8)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--offload", default="none", choices=["none", "cpu", "nvme"])
    p.add_argument("--nvme-dir", default="/tmp/tl-bench-nvme",
                   help="NVMe tier directory; emptied after every run (--offload nvme)")
    p.add_argument("--gpu-mem-gib", type=float, default=0.0, help="GPU memory cap per process (0 = none)")
    p.add_argument("--host-cap-gib", type=float, default=0.0,
                   help="host memory cap for each run's process tree, a cgroup v2 memory.max (root; 0 = none)")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                   help="cpu: gloo, --gpus then counts CPU ranks (smoke tests only)")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--timeout", type=float, default=420.0, help="seconds per run before it is killed")
    p.add_argument("--budget", type=float, default=0.0,
                   help="seconds for the whole sweep (0 = none): runs that cannot start with "
                        "--min-run-s left are skipped and recorded as such")
    p.add_argument("--min-run-s", type=float, default=60.0)
    p.add_argument("--ds-comm-dtype", default=None, choices=["fp32", "bf16"])
    p.add_argument("--tl-config", default=None, help="JSON merged over tierlift's config (passed to the worker)")
    p.add_argument("--no-ac", dest="ac", action="store_false",
                   help="every system without activation checkpointing (the worker's --no-ac)")
    p.add_argument("--tl-run-dir", default=None, help="tierlift trains with this run directory (passed to the worker)")
    p.add_argument("--out", required=True, help="result JSON; the markdown goes next to it as .md")
    p.add_argument("--logdir", default=None, help="per-run logs and rank files (default: <out>_logs/)")
    a = p.parse_args(argv)
    bc.model_preset(a.model)  # a bad --model fails here, not in every worker
    a.gpu_list = [int(g) for g in a.gpus.split(",") if g.strip()]
    a.system_list = [s.strip() for s in a.systems.split(",") if s.strip()]
    bad = [s for s in a.system_list if s not in SYSTEMS]
    if bad:
        p.error(f"unknown systems {bad}; choose from {SYSTEMS}")
    if a.steps <= a.warmup:
        p.error("--steps must exceed --warmup")
    base = a.out[:-5] if a.out.endswith(".json") else a.out
    a.md_path = base + ".md"
    a.logdir = a.logdir or base + "_logs"
    return a


# ---------------------------------------------------------------------------
# one run
# ---------------------------------------------------------------------------

def worker_cmd(a, system: str, gpus: int, rank_out: str) -> list[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(gpus), WORKER,
           "--system", system, "--model", a.model, "--steps", str(a.steps), "--warmup", str(a.warmup),
           "--mbs", str(a.mbs), "--seq", str(a.seq), "--offload", a.offload, "--device", a.device,
           "--out", rank_out, "--nvme-dir", a.nvme_dir]
    if a.gpu_mem_gib:
        cmd += ["--gpu-mem-gib", str(a.gpu_mem_gib)]
    if not a.ac:
        cmd += ["--no-ac"]
    if a.ds_comm_dtype and system == "deepspeed":
        cmd += ["--ds-comm-dtype", a.ds_comm_dtype]
    if a.tl_config and system == "tierlift":
        cmd += ["--tl-config", a.tl_config]
    if a.tl_run_dir and system == "tierlift":
        cmd += ["--tl-run-dir", a.tl_run_dir]
    return cmd


def child_env(gpus: int) -> dict[str, str]:
    env = dict(os.environ)
    for k, v in MULTICAST_OFF.items():
        env.setdefault(k, v)  # required on the multi-GPU hosts; never let a run drop them
    env["PYTHONUNBUFFERED"] = "1"
    # torchrun would set OMP_NUM_THREADS=1 for nproc > 1, which cripples the CPU
    # optimizer of the offload runs; give each rank its share of the cores instead
    # (what tierlift's run.threads_per_rank=0 does), the same for every system.
    if "OMP_NUM_THREADS" not in os.environ:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // gpus))
    return env


def _tail(path: str, n: int = 3000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - n))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def _kill_tree(proc: subprocess.Popen) -> None:
    """torchrun was started in its own session, so its process group holds it and
    every rank (and their compiler children): end exactly that group."""
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _host_cap_cgroup(a, tag: str) -> str:
    """A cgroup v2 child with memory.max = --host-cap-gib and no swap (needs root and the
    memory controller; design.md notes how).  Errors stop the sweep: an uncapped run
    would silently measure something else."""
    root = "/sys/fs/cgroup"
    if not os.path.exists(os.path.join(root, "cgroup.controllers")):
        raise SystemExit(f"--host-cap-gib needs cgroup v2 mounted at {root} (this host has v1 or none); "
                         "nothing was run uncapped.")
    with open(os.path.join(root, "cgroup.subtree_control"), "a") as f:
        f.write("+memory")
    path = os.path.join(root, f"tl-bench-{os.getpid()}-{tag}")
    os.makedirs(path, exist_ok=True)
    if not os.path.exists(os.path.join(path, "memory.max")):  # a plain directory is not a capped cgroup
        raise SystemExit(f"{path} has no memory.max: the memory controller is not enabled there; nothing was run.")
    with open(os.path.join(path, "memory.max"), "w") as f:
        f.write(str(int(a.host_cap_gib * 2 ** 30)))
    try:
        with open(os.path.join(path, "memory.swap.max"), "w") as f:
            f.write("0")
    except OSError:
        pass  # no swap accounting: there is no swap to escape to either
    return path


def _cgroup_oom_kills(path: str) -> int:
    try:
        with open(os.path.join(path, "memory.events")) as f:
            return int(dict(line.split() for line in f).get("oom_kill", 0))
    except (OSError, ValueError):
        return -1


def run_one(a, system: str, gpus: int, repeat: int, order_index: int, timeout: float) -> dict:
    tag = f"{system}_g{gpus}_r{repeat}"
    rank_out = os.path.join(a.logdir, tag + ".json")
    log_path = os.path.join(a.logdir, tag + ".log")
    for stale in glob.glob(os.path.join(a.logdir, tag + ".rank*.json")):
        os.remove(stale)
    cmd = worker_cmd(a, system, gpus, rank_out)
    env = child_env(gpus)
    rec: dict = {"system": system, "gpus": gpus, "repeat": repeat, "order_index": order_index,
                 "device": a.device, "offload": a.offload, "cmd": shlex.join(cmd),
                 "omp_num_threads": env.get("OMP_NUM_THREADS"), "started": bc.now_iso(), "log": log_path}
    print(f"[bench_zero] run {tag}: {rec['cmd']}", flush=True)
    t0 = time.perf_counter()
    cgroup = _host_cap_cgroup(a, tag) if a.host_cap_gib else None
    if cgroup:
        rec["host_cap"] = {"kind": "cgroup v2 memory.max (swap 0)", "gib": a.host_cap_gib, "cgroup": cgroup}

    def enter_cgroup() -> None:  # in the child, before exec: the whole tree inherits it
        if cgroup:
            with open(os.path.join(cgroup, "cgroup.procs"), "w") as f:
                f.write(str(os.getpid()))

    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=os.path.dirname(HERE),
                                start_new_session=True, preexec_fn=enter_cgroup if cgroup else None)
        sampler = bc.TreeRSSSampler(proc.pid, hz=20.0, nvml=(a.device == "cuda"))
        sampler.start()
        timed_out = False
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_tree(proc)
        finally:
            sampler.stop()
    rec["wall_s"] = time.perf_counter() - t0
    rec["returncode"] = proc.returncode
    if cgroup:
        rec["host_cap"]["oom_kills"] = _cgroup_oom_kills(cgroup)
    if a.offload == "nvme":  # the next run needs the disk
        shutil.rmtree(a.nvme_dir, ignore_errors=True)
    rec.update(sampler.result())

    ranks = []
    for r in range(gpus):
        path = f"{rank_out[:-5]}.rank{r}.json"
        try:
            import json

            with open(path, encoding="utf-8") as f:
                ranks.append(json.load(f))
        except (OSError, ValueError):
            ranks.append(None)
    _merge_ranks(a, rec, ranks)
    if timed_out:
        rec["status"] = "timeout"
        rec["error"] = f"killed after {timeout:.0f} s"
    elif proc.returncode != 0 or any(r is None or r.get("status") != "ok" for r in ranks):
        rec["status"] = "error"
        errs = [r.get("error") for r in ranks if r and r.get("error")]
        rec.setdefault("error", errs[0] if errs else f"exit code {proc.returncode}; no rank result")
    else:
        rec["status"] = "ok"
    if rec["status"] != "ok":
        rec["log_tail"] = _tail(log_path)
        tb = next((r.get("traceback") for r in ranks if r and r.get("traceback")), None)
        if tb:
            rec["traceback"] = tb
    rec["finished"] = bc.now_iso()
    msg = (f"step {bc.fmt(rec.get('step_s'), 4)} s, {bc.fmt(rec.get('tokens_s'))} tok/s, "
           f"GPU {bc.fmt(rec.get('peak_gpu_alloc_gib'), 2)} GiB, RSS/rank {bc.fmt(rec.get('peak_rss_gib_max_rank'), 2)} GiB"
           if rec["status"] == "ok" else f"{rec['status']}: {rec.get('error')}")
    print(f"[bench_zero] {tag} ({rec['wall_s']:.0f} s): {msg}", flush=True)
    if rec["status"] != "ok":
        # The worker's own traceback says why; the log's tail is mostly torchrun's summary.
        what, text = ("worker traceback", rec["traceback"]) if rec.get("traceback") else ("log tail", rec["log_tail"])
        print(f"[bench_zero] --- {what} ---\n{text[-1500:]}\n[bench_zero] ---", flush=True)
    return rec


def _merge_ranks(a, rec: dict, ranks: list) -> None:
    ok = [r for r in ranks if r and r.get("status") == "ok"]
    r0 = next((r for r in ranks if r and r.get("rank") == 0), None)
    if r0:
        for k in ("gpu_name", "gpu_count", "cuda", "env", "deepspeed_version", "n_params", "optimizer_impl",
                  "ds_config", "tierlift_config", "tierlift_summary", "build_model_s", "pinned_host", "warnings",
                  "gpu_frag_bytes", "torch_runtime", "activation_plan"):
            if k in r0:
                rec[k] = r0[k]
    for key in ("peak_gpu_alloc_gib", "peak_gpu_reserved_gib", "gpu_used_at_end_gib"):
        vals = [r.get(key) for r in ranks if r and r.get(key) is not None]
        rec[key + "_per_rank"] = vals
        rec[key] = max(vals) if vals else None
    per_rank = rec.get("peak_rss_gib_per_rank") or {}
    rec["peak_rss_gib_max_rank"] = max(per_rank.values()) if per_rank else None
    if len(ok) != len(ranks) or not ok:
        return
    n = min(len(r["step_times_s"]) for r in ok)
    per_step = [max(r["step_times_s"][i] for r in ok) for i in range(n)]  # the slowest rank sets the pace
    rec["step_times_s"] = per_step
    rec["step_s"] = bc.median(per_step[a.warmup:])
    rec["step_s_min"] = min(per_step[a.warmup:]) if per_step[a.warmup:] else None
    rec["tokens_s"] = rec["gpus"] * a.mbs * a.seq / rec["step_s"] if rec["step_s"] else None
    m = min(len(r["losses"]) for r in ok)
    # Equal token counts per rank, so the global mean loss is the mean of the ranks'.
    rec["losses"] = [sum(r["losses"][i] for r in ok) / len(ok) for i in range(m)]
    rec["train_wall_s"] = max(r.get("train_wall_s") or 0 for r in ok)


# ---------------------------------------------------------------------------
# aggregation
# ---------------------------------------------------------------------------

def summarize(a, runs: list[dict]) -> dict:
    summary: dict = {}
    for g in a.gpu_list:
        for s in a.system_list:
            rs = [r for r in runs if r["gpus"] == g and r["system"] == s]
            ok = [r for r in rs if r["status"] == "ok"]
            e: dict = {"runs": len(rs), "ok_runs": len(ok)}
            if ok:
                e["step_s"] = bc.median(r["step_s"] for r in ok)
                e["step_s_per_repeat"] = [r["step_s"] for r in ok]
                e["tokens_s"] = g * a.mbs * a.seq / e["step_s"]
                for k in ("peak_gpu_alloc_gib", "peak_gpu_reserved_gib", "peak_rss_gib_max_rank",
                          "peak_rss_gib_ranks_total", "peak_rss_gib_tree_total"):
                    vals = [r.get(k) for r in ok if r.get(k) is not None]
                    e[k] = max(vals) if vals else None
                e["losses"] = ok[0].get("losses")
                e["loss_first"] = (ok[0].get("losses") or [None])[0]
            else:
                e["error"] = rs[-1].get("error") if rs else "not run"
                e["status"] = rs[-1]["status"] if rs else "not run"
            summary.setdefault(str(g), {})[s] = e
    return summary


def _ratio(x, y):
    return x / y if (x is not None and y) else None


def ratios_and_targets(a, summary: dict) -> tuple[dict, dict, list]:
    ratios: dict = {}
    for g, by_sys in summary.items():
        tl = by_sys.get("tierlift", {})
        for peer in PEERS:
            pe = by_sys.get(peer)
            if pe is None:
                continue
            ratios.setdefault(g, {})[f"tierlift_vs_{peer}"] = {
                "step_time_ratio": _ratio(tl.get("step_s"), pe.get("step_s")),        # < 1: tierlift faster
                "tokens_s_ratio": _ratio(tl.get("tokens_s"), pe.get("tokens_s")),     # > 1: tierlift faster
                "gpu_alloc_ratio": _ratio(tl.get("peak_gpu_alloc_gib"), pe.get("peak_gpu_alloc_gib")),
                "gpu_reserved_ratio": _ratio(tl.get("peak_gpu_reserved_gib"), pe.get("peak_gpu_reserved_gib")),
                "rss_per_rank_ratio": _ratio(tl.get("peak_rss_gib_max_rank"), pe.get("peak_rss_gib_max_rank")),
            }
    scaling: dict = {}
    base = summary.get("1", {})
    for g, by_sys in summary.items():
        if g == "1":
            continue
        for s, e in by_sys.items():
            scaling.setdefault(s, {})[f"{g}_over_1"] = _ratio(e.get("tokens_s"), base.get(s, {}).get("tokens_s"))

    targets: list = []
    if a.offload != "none":
        return ratios, scaling, [{"note": "the issue's targets are defined for --offload none; none checked"}]

    def add(name, value, op, threshold):
        met = None if value is None else (value <= threshold if op == "<=" else value >= threshold)
        targets.append({"target": name, "value": value, "op": op, "threshold": threshold, "met": met})

    for g, by_sys in summary.items():
        r = ratios.get(g, {})
        if "deepspeed" in by_sys:
            add(f"{g} GPU: tierlift step / DeepSpeed step", r.get("tierlift_vs_deepspeed", {}).get("step_time_ratio"),
                "<=", TARGETS["step_vs_deepspeed_max"])
            add(f"{g} GPU: tierlift peak GPU alloc / DeepSpeed's",
                r.get("tierlift_vs_deepspeed", {}).get("gpu_alloc_ratio"), "<=", TARGETS["gpu_alloc_vs_deepspeed_max"])
        if "fsdp2" in by_sys:
            add(f"{g} GPU: tierlift step / FSDP2 step", r.get("tierlift_vs_fsdp2", {}).get("step_time_ratio"),
                "<=", TARGETS["step_vs_fsdp2_max"])
        if g != "1":
            for peer in PEERS:
                if peer in by_sys:
                    add(f"{g} GPU: tierlift tokens/s / {peer} tokens/s",
                        r.get(f"tierlift_vs_{peer}", {}).get("tokens_s_ratio"), ">=", 1.0)
            if g == "2":
                add("tierlift 2-GPU tokens/s / 1-GPU tokens/s", scaling.get("tierlift", {}).get("2_over_1"),
                    ">=", TARGETS["scaling_2_over_1_min"])
    return ratios, scaling, targets


def loss_check(summary: dict) -> dict:
    """Same seed, same weights, same batch: the first step's loss (computed before
    any update) must agree across systems up to bf16 rounding."""
    out = {}
    for g, by_sys in summary.items():
        firsts = {s: e.get("loss_first") for s, e in by_sys.items() if e.get("loss_first") is not None}
        if len(firsts) >= 2:
            spread = max(firsts.values()) - min(firsts.values())
            out[g] = {"first_loss": firsts, "spread": spread, "agree_within_0.05": spread <= 0.05}
    return out


# ---------------------------------------------------------------------------
# output
# ---------------------------------------------------------------------------

def markdown(a, result: dict) -> str:
    facts = result["facts"]
    L = []
    n = facts.get("n_params")
    size = "?" if not n else (f"{n / 1e9:.3f} B" if n >= 1e8 else f"{n / 1e6:.2f} M")
    L.append(f"# ZeRO-3 benchmark: {a.model} ({size} params), "
             f"seq {a.seq}, micro-batch {a.mbs} per GPU, offload {a.offload}")
    L.append("")
    L.append(f"- date: {result['date']}; device: {facts.get('gpu_name')} x{facts.get('gpu_count')} "
             f"({a.device}); torch {facts.get('torch')}, deepspeed {facts.get('deepspeed')}, "
             f"transformers {facts.get('transformers')}")
    L.append(f"- {a.steps} steps per run, first {a.warmup} excluded; step time = median of the per-step max "
             f"over ranks; tokens/s are totals; repeats: {a.repeats} (odd repeats in reverse system order)")
    L.append(f"- command: `{result['command']}`")
    L.append("")
    L.append("| GPUs | system | step s | tokens/s | peak GPU alloc GiB | peak GPU reserved GiB "
             "| peak RSS GiB per rank (max) | peak RSS GiB all ranks | loss step 1 | status |")
    L.append("|---|---|---|---|---|---|---|---|---|---|")
    for g, by_sys in result["summary"].items():
        for s, e in by_sys.items():
            status = "ok" if e.get("ok_runs") else f"{e.get('status')}: {str(e.get('error'))[:80]}"
            if e.get("ok_runs") and e["ok_runs"] < e["runs"]:
                status = f"ok {e['ok_runs']}/{e['runs']}"
            L.append(f"| {g} | {s} | {bc.fmt(e.get('step_s'), 3)} | {bc.fmt(e.get('tokens_s'))} | "
                     f"{bc.fmt(e.get('peak_gpu_alloc_gib'), 1)} | {bc.fmt(e.get('peak_gpu_reserved_gib'), 1)} | "
                     f"{bc.fmt(e.get('peak_rss_gib_max_rank'), 1)} | {bc.fmt(e.get('peak_rss_gib_ranks_total'), 1)} | "
                     f"{bc.fmt(e.get('loss_first'), 4)} | {status} |")
    if result["ratios"]:
        L += ["", "## tierlift / peer", "",
              "| GPUs | peer | step time ratio (<1 better) | tokens/s ratio (>1 better) | GPU alloc ratio | RSS/rank ratio |",
              "|---|---|---|---|---|---|"]
        for g, d in result["ratios"].items():
            for k, r in d.items():
                L.append(f"| {g} | {k.replace('tierlift_vs_', '')} | {bc.fmt(r['step_time_ratio'])} | "
                         f"{bc.fmt(r['tokens_s_ratio'])} | {bc.fmt(r['gpu_alloc_ratio'])} | {bc.fmt(r['rss_per_rank_ratio'])} |")
    if result["scaling"]:
        L += ["", "## Scaling (tokens/s, N GPUs over 1 GPU, same per-GPU batch)", "", "| system | ratio |", "|---|---|"]
        for s, d in result["scaling"].items():
            for k, v in d.items():
                L.append(f"| {s} ({k.replace('_over_', '/')}) | {bc.fmt(v)} |")
    if result["targets"]:
        L += ["", "## Issue targets", "", "| target | value | threshold | met |", "|---|---|---|---|"]
        for t in result["targets"]:
            if "note" in t:
                L.append(f"| {t['note']} | | | |")
            else:
                met = {True: "yes", False: "**no**", None: "n/a (missing run)"}[t["met"]]
                L.append(f"| {t['target']} | {bc.fmt(t['value'])} | {t['op']} {t['threshold']} | {met} |")
    if result["loss_check"]:
        L += ["", "## First-step loss agreement", ""]
        for g, d in result["loss_check"].items():
            L.append(f"- {g} GPU: " + ", ".join(f"{s} {v:.4f}" for s, v in d["first_loss"].items())
                     + f"; spread {d['spread']:.4f} ({'ok' if d['agree_within_0.05'] else '**disagree**'})")
    fails = [r for r in result["runs"] if r["status"] != "ok"]
    if fails:
        L += ["", "## Failed runs", ""]
        for r in fails:
            L.append(f"- {r['system']} x{r['gpus']} (repeat {r['repeat']}): {r['status']}: {str(r.get('error'))[:300]}")
    L.append("")
    return "\n".join(L)


def build_result(a, runs: list[dict], argv: list[str], t_begin: str) -> dict:
    summary = summarize(a, runs)
    ratios, scaling, targets = ratios_and_targets(a, summary)
    facts = bc.env_facts()
    for r in runs:  # hardware facts come from a worker (the driver never touches CUDA)
        for k in ("gpu_name", "gpu_count", "cuda", "n_params", "torch_runtime"):
            if r.get(k) is not None and facts.get(k) is None:
                facts[k] = r[k]
    return {
        "schema": "tierlift.bench_zero/1",
        "description": "ZeRO-3 step time / tokens/s / peak memory of tierlift vs DeepSpeed ZeRO-3 vs FSDP2 "
                       "on the same model, weights and batch; see benchmarks/bench_zero.py's docstring for "
                       "definitions.",
        "date": t_begin,
        "finished": bc.now_iso(),
        "command": shlex.join(["python"] + argv),
        "params": {"model": a.model, "gpus": a.gpu_list, "systems": a.system_list, "steps": a.steps,
                   "warmup": a.warmup, "mbs": a.mbs, "seq": a.seq, "offload": a.offload, "device": a.device,
                   "repeats": a.repeats, "timeout_s": a.timeout, "budget_s": a.budget,
                   "ds_comm_dtype": a.ds_comm_dtype, "tl_config": a.tl_config,
                   "common": "bf16 compute, fp32 master + AdamW state, AdamW lr 1e-4 betas (0.9, 0.95) eps 1e-8 "
                             "wd 0.1 (matrices only), no grad clipping, constant LR, full activation checkpointing, "
                             "same seed-1234 CPU-initialised fp32 weights and same batch in every system"},
        "facts": facts,
        "targets_definition": TARGETS,
        "summary": summary,
        "ratios": ratios,
        "scaling": scaling,
        "targets": targets,
        "loss_check": loss_check(summary),
        "runs": runs,
    }


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = parse_args(argv)
    os.makedirs(a.logdir, exist_ok=True)
    t_begin = bc.now_iso()
    t0 = time.perf_counter()
    runs: list[dict] = []
    cmdline = [os.path.relpath(__file__, os.getcwd())] + argv
    order_index = 0
    for rep in range(a.repeats):
        order = a.system_list if rep % 2 == 0 else a.system_list[::-1]
        for g in a.gpu_list:
            for s in order:
                left = a.budget - (time.perf_counter() - t0) if a.budget else float("inf")
                if left < a.min_run_s:
                    runs.append({"system": s, "gpus": g, "repeat": rep, "order_index": order_index,
                                 "status": "skipped", "error": f"sweep budget: {left:.0f} s left < --min-run-s"})
                    print(f"[bench_zero] skip {s} x{g} r{rep}: budget", flush=True)
                else:
                    runs.append(run_one(a, s, g, rep, order_index, min(a.timeout, left)))
                order_index += 1
                result = build_result(a, runs, cmdline, t_begin)
                bc.write_json(a.out, result)
                with open(a.md_path, "w", encoding="utf-8") as f:
                    f.write(markdown(a, result))
    md = markdown(a, result)
    print("\n" + md, flush=True)
    print(f"[bench_zero] wrote {a.out} and {a.md_path} ({time.perf_counter() - t0:.0f} s)", flush=True)
    return 0 if all(r["status"] == "ok" for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
