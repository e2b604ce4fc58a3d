"""Planner and policy on synthetic node profiles and model shapes (pure, CPU, fast),
and `tierlift plan` end to end on the L1B config (meta device: no 4 GB allocation)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import replace

import pytest

from tierlift.errors import ConfigError
from tierlift.layout import UnitSpec, plan_chunks
from tierlift.runtime.planner import Budgets, GiB, ModelShape, NodeRates, TrainingShape, plan
from tierlift.runtime.policy import Policy, Thresholds

ROOT, BLOCK, NBLOCKS = 131_000_000, 58_000_000, 16  # L1B-like: a 131 M root and 16 blocks of 58 M
L1B = ModelShape.from_numels([ROOT] + [BLOCK] * NBLOCKS)
TRAIN = TrainingShape(tokens_per_step=8192, activation_bytes=int(3.5 * GiB))  # bf16, AC, clipping
H100 = NodeRates()


def _host_need(shape: ModelShape, k: int, buffers: int = 8) -> int:
    """Pinned bytes with the first k chunks' AdamW state in host memory, the rest on NVMe,
    written out independently of the planner from what OffloadedOptimizer allocates."""
    n = shape.shard_numel
    staging = buffers * 12 * min(max(n[k:]), 16 << 20) if k < len(n) else 0  # pieces of 16 Mi elements
    grads = 4 * sum(n)  # TRAIN clips: deferred steps keep a gradient buffer per chunk
    return 12 * sum(n[:k]) + 2 * sum(n[k:]) + staging + grads  # host state, or a bf16 copy of NVMe chunks


def test_no_offload_on_a_big_gpu():
    p = plan(L1B, Budgets(80 * GiB, 64 * GiB), H100, TRAIN)
    assert (p.optimizer_kind, p.param_kind) == ("none", "none")
    assert {(c.optimizer_tier, c.param_tier) for c in p.placements} == {("gpu", "gpu")}
    assert p.pinned_pool_bytes == 0 and p.nvme_bytes == 0
    # 16 B/param of fp32 state + grad and 2 B of bf16 shard stay on the GPU
    assert 18 * L1B.params < p.gpu_peak_bytes <= 80 * GiB
    assert 0.12 < p.step.step_s < 0.35  # L1B anchor: 0.18-0.2 s/step without offload
    cfg = p.to_offload_config()
    assert not cfg.enabled
    assert "optimizer state: GPU" in p.to_table()
    json.dumps(p.to_dict())


def test_small_gpu_puts_the_optimizer_on_the_host():
    p = plan(L1B, Budgets(16 * GiB, 64 * GiB), H100, TRAIN)
    assert p.optimizer_kind == "cpu" and p.param_kind == "none"
    assert all(c.optimizer_tier == "host" for c in p.placements)
    assert p.gpu_peak_bytes <= 16 * GiB
    assert p.pinned_pool_bytes == _host_need(L1B, len(L1B.shard_numel)) <= 64 * GiB
    assert p.step.cpu_optimizer_s > 0 and p.step.step_s > plan(L1B, Budgets(80 * GiB, 64 * GiB), H100,
                                                               TRAIN).step.step_s
    cfg = p.to_offload_config()
    assert type(cfg.optimizer).__name__ == "CPUOffload" and cfg.host_budget_bytes == 64 * GiB


def test_small_host_gives_the_partial_nvme_split_the_engine_places(tmp_path):
    k = 6
    budget = _host_need(L1B, k) + 1 * (1 << 20)  # room for 6 host chunks, not 7
    assert _host_need(L1B, k + 1) > budget
    p = plan(L1B, Budgets(16 * GiB, budget), H100, TRAIN)
    assert p.optimizer_kind == "nvme" and p.host_chunks == k
    assert [c.optimizer_tier for c in p.placements] == ["host"] * k + ["nvme"] * (NBLOCKS + 1 - k)
    assert p.max_in_cpu == sum(L1B.shard_numel[:k])
    assert p.pinned_pool_bytes <= budget and p.nvme_bytes == 12 * sum(L1B.shard_numel[k:])
    assert p.step.disk_s > 0
    cfg = p.to_offload_config(nvme_path=str(tmp_path / "nv"))
    assert cfg.optimizer.max_in_cpu == p.max_in_cpu and cfg.host_budget_bytes == budget
    # The engine's placement rule (offload/execplan.place_chunks) puts exactly the planned chunks on the host.
    from tierlift.offload.execplan import place_chunks
    layout = plan_chunks([UnitSpec("" if i == 0 else f"u{i}", ((f"p{i}", (n,)),))
                          for i, n in enumerate([ROOT] + [BLOCK] * NBLOCKS)], 1)
    tiers = place_chunks([c.shard_numel for c in layout], cfg.optimizer.max_in_cpu)
    assert list(tiers) == [c.optimizer_tier for c in p.placements]


def _assert_smallest(err: ConfigError, budgets: Budgets, **kinds) -> None:
    smallest = err.smallest_budgets
    plan(L1B, smallest, H100, TRAIN, **kinds)  # the suggested budgets fit
    assert err.setting in ("offload.gpu_budget_bytes", "offload.host_budget_bytes", "offload.nvme_budget_bytes")
    tier = err.setting.split(".")[1].replace("_budget_bytes", "")
    assert err.value == getattr(budgets, f"{tier}_bytes")
    assert str(getattr(smallest, f"{tier}_bytes")) in str(err)
    less = replace(smallest, **{f"{tier}_bytes": getattr(smallest, f"{tier}_bytes") - (64 << 20)})
    with pytest.raises(ConfigError):  # and 64 MiB less does not
        plan(L1B, less, H100, TRAIN, **kinds)


def test_everything_too_small_names_the_smallest_budget_that_fits():
    tiny = Budgets(2 * GiB, 1 * GiB, 1 * GiB)
    with pytest.raises(ConfigError) as exc:
        plan(L1B, tiny, H100, TRAIN)
    _assert_smallest(exc.value, tiny)
    assert "too small" in str(exc.value) and "GiB" in str(exc.value)


def test_host_too_small_even_for_nvme_names_the_host_budget():
    budgets = Budgets(16 * GiB, 4 * GiB, None)
    with pytest.raises(ConfigError) as exc:
        plan(L1B, budgets, H100, TRAIN, optimizer_kind="nvme", param_kind="none")
    assert exc.value.setting == "offload.host_budget_bytes"
    assert exc.value.smallest_budgets.host_bytes == min(_host_need(L1B, k) for k in range(NBLOCKS + 2))
    _assert_smallest(exc.value, budgets, optimizer_kind="nvme", param_kind="none")


def test_all_tiers_short_asks_for_several_raises_together():
    budgets = Budgets(1 * GiB, 1 * GiB, 1 * GiB)  # no single tier can fix NVMe + host params
    with pytest.raises(ConfigError) as exc:
        plan(L1B, budgets, H100, TRAIN, optimizer_kind="nvme", param_kind="cpu")
    s = exc.value.smallest_budgets
    assert sum(getattr(s, f"{t}_bytes") != getattr(budgets, f"{t}_bytes") for t in ("gpu", "host", "nvme")) >= 2
    plan(L1B, s, H100, TRAIN, optimizer_kind="nvme", param_kind="cpu")


def test_predicted_step_is_monotone_in_disk_rate():
    budgets = Budgets(16 * GiB, _host_need(L1B, 4) + (1 << 20))
    steps = []
    for gbps in (0.5, 1.0, 1.9, 4.0, 16.0, 64.0, 1000.0):
        p = plan(L1B, budgets, replace(H100, disk_read_gbps=gbps, disk_write_gbps=gbps), TRAIN)
        assert p.optimizer_kind == "nvme"
        s = p.step
        assert s.step_s == pytest.approx(s.compute_s + s.gpu_optimizer_s + s.exposed_host_s + s.exposed_pcie_s)
        steps.append(s.step_s)
    assert all(a >= b for a, b in zip(steps, steps[1:])) and steps[0] > 5 * steps[-1]


def test_all_on_nvme_respects_the_disk_floor():
    # the reference node (docs/planning.md): 12 B/param read + 12 B/param written per step at ~1.9 GB/s
    equal = ModelShape.from_numels([BLOCK] * (NBLOCKS + 1))
    p = plan(equal, Budgets(16 * GiB, _host_need(equal, 0) + (1 << 20)), H100, TRAIN)
    assert p.host_chunks == 0 and p.nvme_bytes == 12 * sum(equal.shard_numel)
    assert p.step.step_s >= 2 * 12 * sum(equal.shard_numel) / 1.9e9


def test_moe_experts_gather_with_their_block():
    units = [UnitSpec("", (("emb", (1000, 64)),)), UnitSpec("layers.0", (("a", (64, 64)),))]
    units += [UnitSpec(f"layers.0.mlp.experts.{e}", ((f"e{e}", (64, 256)),)) for e in range(4)]
    shape = ModelShape.from_layout(plan_chunks(units, 2))
    assert shape.groups == (sum(shape.padded_numel[1:]),)  # one group: the block and its 4 experts


# -- policy ------------------------------------------------------------------------

def _metrics(**kw):
    base = {"step_time_s": 0.5, "prefetch_stall_ms": 0.0, "gpu_reserved_bytes": 8 * GiB, "gpu_cap_bytes": 16 * GiB,
            "host_available_bytes": 40 * GiB, "host_rss_bytes": 20 * GiB}
    return {**base, **kw}


def test_stalls_deepen_prefetch_once_then_hold():
    p = plan(L1B, Budgets(16 * GiB, 64 * GiB), H100, TRAIN)
    pol = Policy(p, Thresholds(stall_patience=3, cooldown_steps=10))
    got = [d for step in range(10) for d in pol.observe(step, _metrics(prefetch_stall_ms=25.0))]
    assert [d.kind for d in got] == ["prefetch_deeper"]
    assert got[0].step == 2 and got[0].new_plan_fields == {"prefetch_units": p.prefetch_units + 1}
    assert "25.0 ms" in got[0].reason and pol.plan.prefetch_units == p.prefetch_units + 1
    more = [d for step in range(10, 60) for d in pol.observe(step, _metrics(prefetch_stall_ms=25.0))]
    assert all(d.kind == "prefetch_deeper" for d in more)
    assert pol.plan.prefetch_units <= Thresholds().max_prefetch


def test_gpu_near_cap_gives_shallower_prefetch_without_flapping():
    p = plan(L1B, Budgets(16 * GiB, 64 * GiB), H100, TRAIN)
    pol = Policy(p, Thresholds(stall_patience=2, cooldown_steps=5))
    d = pol.observe(0, _metrics(gpu_reserved_bytes=int(15.2 * GiB), prefetch_stall_ms=30.0))
    assert [x.kind for x in d] == ["prefetch_shallower"]
    assert d[0].new_plan_fields == {"prefetch_units": p.prefetch_units - 1} and "95%" in d[0].reason
    # Stalls continue while reserved stays between gpu_low and gpu_high: no deepening back.
    later = [x for s in range(1, 30) for x in pol.observe(s, _metrics(gpu_reserved_bytes=int(14.4 * GiB),
                                                                     prefetch_stall_ms=30.0))]
    assert later == [] and pol.plan.prefetch_units == p.prefetch_units - 1


def test_host_pressure_moves_the_last_host_chunks_to_nvme():
    th = Thresholds(host_min_available_bytes=4 * GiB, host_margin_bytes=2 * GiB, cooldown_steps=10)
    cpu = plan(L1B, Budgets(16 * GiB, 64 * GiB), H100, TRAIN)
    assert cpu.optimizer_kind == "cpu"  # no NVMe tier to move to: the engine has no extents
    d = Policy(cpu, th).observe(7, _metrics(host_available_bytes=1 * GiB))
    assert [x.kind for x in d] == ["host_pressure"] and "no NVMe tier" in d[0].reason
    p = plan(L1B, Budgets(16 * GiB, 64 * GiB), H100, TRAIN, optimizer_kind="nvme")
    assert p.optimizer_kind == "nvme" and p.host_chunks == NBLOCKS + 1  # the budget holds every chunk
    pol = Policy(p, th)
    d = pol.observe(7, _metrics(host_available_bytes=1 * GiB))
    assert [x.kind for x in d] == ["move_to_nvme"]
    f = d[0].new_plan_fields
    k = NBLOCKS + 1 - len(f["moved_chunks"])
    assert f["optimizer_kind"] == "nvme" and f["max_in_cpu"] == sum(L1B.shard_numel[:k])
    assert f["moved_chunks"] == list(range(k, NBLOCKS + 1))
    assert p.pinned_pool_bytes - f["pinned_pool_bytes"] >= 5 * GiB  # the 3 GiB shortfall + 2 GiB margin
    assert pol.plan.host_chunks == k and pol.plan.max_in_cpu == f["max_in_cpu"]
    assert re.search(r"available 1\.00 GiB < 4\.00 GiB", d[0].reason)
    assert re.search(r"frees \d+\.\d\d GiB", d[0].reason) and "max_in_cpu" in d[0].reason
    assert pol.observe(8, _metrics(host_available_bytes=1 * GiB)) == []  # cooldown: observe the effect first


def test_off_plan_steps_are_reported():
    p = plan(L1B, Budgets(80 * GiB, 64 * GiB), H100, TRAIN)
    pol = Policy(p, Thresholds(stall_patience=3))
    got = [d for s in range(5) for d in pol.observe(s, _metrics(step_time_s=3 * p.step.step_s))]
    assert [d.kind for d in got] == ["off_plan"] and "3.0x" in got[0].reason


# -- CLI -----------------------------------------------------------------------------

_RUN = ("import resource, runpy, sys\nsys.argv = ['tierlift', *sys.argv[1:]]\ntry:\n"
        "    runpy.run_module('tierlift', run_name='__main__')\nfinally:\n"
        "    print('MAXRSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\n")


def test_cli_plan_l1b_json_on_the_meta_device():
    proc = subprocess.run([sys.executable, "-c", _RUN, "plan", "configs/l1b-llama.yaml", "--world-size", "1",
                           "--json"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    d = json.loads(proc.stdout)
    assert 0.93e9 < d["params"] < 0.94e9 and d["chunks"] == 17 and d["world_size"] == 1
    assert len(d["placements"]) == 17 and d["step"]["step_s"] > 0
    rss_kb = int(re.search(r"MAXRSS_KB (\d+)", proc.stderr).group(1))
    assert rss_kb < 2 * 1024 * 1024, f"{rss_kb / 2**20:.1f} GiB RSS: the model was materialised"


def test_cli_plan_refuses_an_infeasible_budget():
    proc = subprocess.run([sys.executable, "-m", "tierlift", "plan", "configs/l1b-llama.yaml", "--gpu-budget",
                           "1GiB", "--host-budget", "1GiB"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.startswith("tierlift: error: offload.")
    assert "too small" in proc.stderr and "Traceback" not in proc.stderr


def test_parse_bytes():
    from tierlift.launch.cmd_plan import parse_bytes
    assert parse_bytes("24GiB") == 24 * GiB == parse_bytes("24G") and parse_bytes("80GB") == 80 * 10**9
    assert parse_bytes("1.5e10") == 15 * 10**9 and parse_bytes("0") == 0


def test_cli_plan_reads_the_calibration_cache(tmp_path):
    """The seam with tierlift/system/calibrate.py: a cached calibration replaces the defaults."""
    import os

    from tierlift.system import calibrate
    from tierlift.system.probe import probe_node
    profile = probe_node(None)
    nvme = os.path.abspath(profile.nvme.path) if profile.nvme is not None else None
    path = calibrate._cache_path(str(tmp_path), profile.fingerprint(), nvme, 8 << 20)
    cal = calibrate.Calibration(h2d_gbps=21.0, d2h_gbps=22.0, disk_read_gbps=0.7, cpu_adamw_params_per_s=2e9,
                                fingerprint=profile.fingerprint())
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"calibration": cal.to_dict(), "units": {}}, f)
    proc = subprocess.run([sys.executable, "-m", "tierlift", "plan", "configs/tiny-llama.yaml", "--json"],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TIERLIFT_CACHE_DIR": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr
    rates = json.loads(proc.stdout)["rates"]
    assert rates["source"].startswith("calibration cache") and rates["h2d_gbps"] == 21.0
    assert rates["cpu_adam_params_s"] == 2e9 and rates["disk_write_gbps"] == NodeRates().disk_write_gbps
    assert "disk_write_gbps" in proc.stderr  # what the cache lacks is said


def test_immediate_host_steps_are_bound_by_the_longer_cycle():
    """No clipping: the host path overlaps backward and the next forward, so the step is
    max(compute + tail, host path + idle) -- the CPU optimizer when it is slow, compute
    when it is fast -- never their sum."""
    from dataclasses import replace as dc_replace

    imm = dc_replace(TRAIN, deferred_step=False)
    slow = plan(L1B, Budgets(80 * GiB, 64 * GiB), dc_replace(H100, cpu_adam_params_s=1e9), imm,
                optimizer_kind="cpu", param_kind="cpu")
    s = slow.step
    assert s.cpu_optimizer_s > s.compute_s
    assert s.cpu_optimizer_s < s.step_s < s.compute_s + s.cpu_optimizer_s
    fast = plan(L1B, Budgets(80 * GiB, 64 * GiB), dc_replace(H100, cpu_adam_params_s=1e12), imm,
                optimizer_kind="cpu", param_kind="cpu").step
    assert fast.cpu_optimizer_s < 0.05 * fast.compute_s
    assert fast.step_s == pytest.approx(fast.compute_s, rel=0.1)
    # the deferred (clipping) model exposes more of the same host path
    deferred = plan(L1B, Budgets(80 * GiB, 64 * GiB), dc_replace(H100, cpu_adam_params_s=1e9), TRAIN,
                    optimizer_kind="cpu", param_kind="cpu").step
    assert deferred.step_s > s.step_s
    # immediate steps keep a 2-slot gradient ring on the host, not a buffer per chunk
    assert slow.pinned_pool_bytes == 12 * sum(L1B.shard_numel) + 8 * max(L1B.shard_numel)
