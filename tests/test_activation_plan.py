"""The activation planner alone: pure data in, pure data out (no torch, no process group)."""

from __future__ import annotations

import itertools
import math

import pytest

from tierlift.errors import ConfigError
from tierlift.offload.activation_plan import (ActivationConfig, ActivationRates, UnitActivationProfile, fixed_plan,
                                              plan_activations)

MB = 1 << 20


def prof(name, saved, inp, sel, fwd, sel_s):
    return UnitActivationProfile(name, saved * MB, inp * MB, sel * MB, fwd, sel_s)


def rates(gpu_mb, host_mb=math.inf, fwd=1.0, bwd=2.0, bw_mb=100.0, busy=0.0):
    return ActivationRates(gpu_mb * MB if not math.isinf(gpu_mb) else math.inf,
                           host_mb * MB if not math.isinf(host_mb) else math.inf,
                           bw_mb * MB, bw_mb * MB, fwd, bwd, 3.0, busy)


UNITS = [prof(f"layers.{i}", 100, 10, 40, 0.1, 0.02 + 0.01 * i) for i in range(4)]


def brute_force(profiles, r):
    """Every mode vector, with the best swap for it (what the DP's proof says it finds)."""
    best = math.inf
    for modes in itertools.product(("keep", "recompute", "selective"), repeat=len(profiles)):
        resident = sum({"keep": p.saved_bytes, "recompute": p.input_bytes, "selective": p.selective_bytes}[m]
                       for p, m in zip(profiles, modes))
        keep = sum(p.saved_bytes for p, m in zip(profiles, modes) if m == "keep")
        x = max(0, resident - r.gpu_budget_bytes)
        if x > min(keep, r.host_budget_bytes):
            continue
        t = sum({"keep": 0, "recompute": p.forward_s, "selective": p.selective_s}[m] for p, m in zip(profiles, modes))
        best = min(best, t + r.stall_s(x))
    return best


def test_everything_fits_keeps_everything():
    plan = plan_activations(UNITS, rates(1000))
    assert [d.decision for d in plan.decisions] == ["keep"] * 4
    assert plan.recompute_s == 0 and plan.swapped_bytes == 0 and plan.predicted_peak_bytes == 400 * MB


def test_free_pcie_swaps_instead_of_recomputing_and_fills_the_budget_exactly():
    # 250 MB budget, PCIe fast enough to hide 150 MB under the 1 s forward: swap, no recompute.
    plan = plan_activations(UNITS, rates(250, bw_mb=1000))
    assert plan.recompute_s == 0
    assert plan.swapped_bytes == 150 * MB and plan.predicted_peak_bytes == 250 * MB
    fractions = [d.swap_fraction for d in plan.decisions]
    assert fractions == [1.0, 0.5, 0.0, 0.0]  # earliest units first, the last one partly (token-wise split)
    assert plan.swap_stall_s == 0


def test_slow_pcie_recomputes_cheapest_units():
    # PCIe 10 MB/s: any swap stalls for seconds; selective (0.02..0.05 s) is the cheapest way down.
    plan = plan_activations(UNITS, rates(250, bw_mb=10))
    assert plan.swapped_bytes == 0
    assert plan.predicted_peak_bytes <= 250 * MB
    assert plan.predicted_step_s == pytest.approx(3.0 + brute_force(UNITS, rates(250, bw_mb=10)))
    assert {d.decision for d in plan.decisions} <= {"keep", "selective"}


@pytest.mark.parametrize("gpu,host,bw", [(120, math.inf, 10), (180, 50, 100), (300, 20, 30), (60, 1000, 200)])
def test_dp_matches_brute_force(gpu, host, bw):
    profiles = [prof("a", 120, 8, 50, 0.2, 0.05), prof("b", 60, 8, 20, 0.05, 0.01),
                prof("c", 90, 8, 30, 0.3, 0.08), prof("d", 30, 4, 10, 0.02, 0.005)]
    r = rates(gpu, host, bw_mb=bw)
    plan = plan_activations(profiles, r, bins=4096)
    assert plan.feasible
    assert plan.predicted_peak_bytes <= r.gpu_budget_bytes
    assert plan.swapped_bytes <= r.host_budget_bytes
    # cell rounding may cost at most a little; with 4096 cells it is exact here
    assert plan.predicted_step_s - 3.0 == pytest.approx(brute_force(profiles, r), abs=1e-6)


def test_infeasible_budget_recomputes_everything_and_says_so():
    plan = plan_activations(UNITS, rates(5, host_mb=0))
    assert not plan.feasible and all(d.decision == "recompute" for d in plan.decisions)
    assert "over the GPU budget" in plan.notes[0]


def test_fixed_policies():
    r = rates(1000)
    assert [d.decision for d in fixed_plan("recompute", UNITS, r).decisions] == ["recompute"] * 4
    swap = fixed_plan("swap", UNITS, r)
    assert swap.swapped_bytes == 400 * MB and swap.predicted_peak_bytes == 0
    assert fixed_plan("selective", UNITS, r).predicted_peak_bytes == 160 * MB


def test_pcie_busy_with_offload_raises_the_stall():
    r_free, r_busy = rates(250, bw_mb=300), rates(250, bw_mb=300, busy=0.8)
    assert r_busy.stall_s(150 * MB) > r_free.stall_s(150 * MB)


def test_config_validates():
    with pytest.raises(ConfigError, match="train.activations.policy"):
        ActivationConfig(policy="swapp")
    with pytest.raises(ConfigError, match="gpu_budget_bytes"):
        ActivationConfig(gpu_budget_bytes=-1)
