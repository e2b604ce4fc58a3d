"""The activation executor on CPU: every policy gives the same loss and gradients as
``keep`` (swap is a copy, recompute and selective replay the RNG), and the metrics and
the auto plan come from what the executor measured."""

from __future__ import annotations


import pytest
import torch
import torch.nn as nn

from tierlift.offload.activation_plan import ActivationConfig
from tierlift.offload.activations import ActivationExecutor
from tierlift.parallel.units import find_units


class Block(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.up, self.down = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.norm = nn.LayerNorm(d)
        self.drop = nn.Dropout(0.2)

    def forward(self, x):
        return x + self.drop(self.down(torch.nn.functional.gelu(self.up(self.norm(x)))))


class Toy(nn.Module):
    _no_split_modules = ["Block"]

    def __init__(self, d=32, n=4):
        super().__init__()
        self.inp = nn.Linear(d, d)
        self.layers = nn.ModuleList(Block(d) for _ in range(n))
        self.head = nn.Linear(d, 1)

    def forward(self, x):
        x = self.inp(x)
        for b in self.layers:
            x = b(x)
        return self.head(x).pow(2).mean()


def run(policy: str, steps: int = 3, device: str = "cpu", **cfg):
    torch.manual_seed(0)
    model = Toy().to(device)
    ex = None
    if policy != "none":
        ex = ActivationExecutor(find_units(model, ["Block"]), torch.device(device),
                                ActivationConfig(policy=policy, min_swap_bytes=0, **cfg))
        assert ex.install() == 4
    losses, grads, metrics = [], [], []
    torch.manual_seed(1)
    for _ in range(steps):
        x = torch.randn(2, 16, 32).to(device)
        if ex:
            ex.begin_step()
        loss = model(x)
        loss.backward()
        if ex:
            metrics.append(ex.end_step())
        losses.append(loss.item())
        grads.append([p.grad.clone() for p in model.parameters()])
        model.zero_grad()
    return losses, grads, metrics, ex


@pytest.mark.parametrize("policy", ["keep", "swap", "recompute", "selective", "auto"])
def test_every_policy_matches_plain_autograd(policy):
    ref_l, ref_g, _, _ = run("none")
    l, g, m, ex = run(policy, gpu_budget_bytes=60_000)
    assert l == pytest.approx(ref_l, rel=1e-6)
    for a, b in zip(g, ref_g):
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)
    if policy == "swap":
        assert all(s["act_swapped_bytes"] > 0 for s in m)
    if policy in ("recompute", "selective"):
        assert all(s["act_recompute_ms"] > 0 for s in m)


def test_auto_profiles_then_times_warm_then_plans():
    """Step 1 counts bytes (profile), step 2 recomputes every unit and times it warm; the plan
    comes after step 2, its forward times from step 2's recompute clocks."""
    _, _, m1, ex1 = run("auto", steps=1, gpu_budget_bytes=60_000)
    assert ex1.plan is None and ex1.timing and ex1.profiles is not None
    profiled = [p.forward_s for p in ex1.profiles]
    _, _, m2, ex2 = run("auto", steps=2, gpu_budget_bytes=60_000)
    assert ex2.plan is not None and not ex2.timing
    assert m2[1]["act_recompute_ms"] > 0  # the timing step recomputed
    timed = [p.forward_s for p in ex2.profiles]
    assert all(t > 0 for t in timed) and timed != profiled
    assert sum(timed) * 1e3 == pytest.approx(m2[1]["act_recompute_ms"], rel=1e-6)


def test_auto_profiles_then_plans_a_mixed_plan_under_the_budget():
    _, _, m, ex = run("auto", steps=4, gpu_budget_bytes=60_000)
    assert ex.profiles is not None and len(ex.profiles) == 4
    prof = ex.profiles[0]
    assert prof.saved_bytes > prof.selective_bytes > prof.input_bytes > 0 and prof.forward_s > 0
    plan = ex.plan
    assert plan.policy == "auto" and plan.predicted_peak_bytes <= 60_000
    # the budget is below keeping everything: something is swapped or recomputed
    assert {d.decision for d in plan.decisions} != {"keep"}
    assert m[2]["act_peak_bytes"] > 0


def test_auto_with_room_keeps_everything():
    _, _, _, ex = run("auto", gpu_budget_bytes=1 << 30)
    assert [d.decision for d in ex.plan.decisions] == ["keep"] * 4


def test_swap_fraction_splits_each_tensor():
    _, _, m_full, _ = run("swap")

    def half_plan():
        torch.manual_seed(0)
        model = Toy()
        ex = ActivationExecutor(find_units(model, ["Block"]), torch.device("cpu"),
                                ActivationConfig(policy="swap", min_swap_bytes=0))
        ex.plan = ex.plan.__class__(ex.plan.policy, tuple(d.__class__(d.unit, "swap", 0.5, 0, 0, 0.0)
                                                          for d in ex.plan.decisions))
        ex.install()
        ex.begin_step()
        torch.manual_seed(1)
        model(torch.randn(2, 16, 32)).backward()
        return ex.end_step()

    m_half = half_plan()
    assert m_half["act_swapped_bytes"] == pytest.approx(m_full[0]["act_swapped_bytes"] / 2, rel=0.01)


def test_drifted_bytes_trigger_a_replan():
    _, _, _, ex = run("auto", gpu_budget_bytes=1 << 30)
    before = ex.replans
    inflated = [p.saved_bytes * 3 for p in ex.profiles]
    ex.profiles = [p.__class__(p.unit, b, p.input_bytes, p.selective_bytes, p.forward_s, p.selective_s)
                   for p, b in zip(ex.profiles, inflated)]
    block = ex.units[0].module  # one unit's forward is enough to measure that unit
    ex.begin_step()
    torch.manual_seed(1)
    block(torch.randn(2, 16, 32, requires_grad=True)).sum().backward()
    ex.end_step()
    assert ex.replans == before + 1
    assert ex.profiles[0].saved_bytes * 2 < inflated[0]  # the measured bytes replaced the drifted ones
    assert ex.profiles[1].saved_bytes == inflated[1]  # nothing measured for unit 1: kept


@pytest.mark.gpu
@pytest.mark.parametrize("policy", ["swap", "selective", "auto"])
def test_gpu_policies_match_plain_autograd(policy):
    """On the GPU the swaps really cross PCIe on the executor's own streams."""
    torch.manual_seed(3)
    ref_l, ref_g, _, _ = run("none", device="cuda")
    l, g, m, ex = run(policy, device="cuda", gpu_budget_bytes=60_000)
    torch.cuda.synchronize()
    assert l == pytest.approx(ref_l, rel=1e-5)
    for a, b in zip(g, ref_g):
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
    if policy == "swap":
        assert all(s["act_swapped_bytes"] > 0 for s in m)
        assert ex.swap._slabs and ex.swap._slabs[0].pinned
    ex.close()


def test_tierlift_plan_prints_the_plan_the_trainer_executed(tmp_path, capsys):
    """`tierlift plan CONFIG` shows the activation plan the run made (run.dir/activations.json):
    a row per unit in the table, and `--json` carries it under execution.activations."""
    import json

    from _fakes import arith_samples
    from tierlift import Trainer, TrainConfig
    from tierlift.launch.cli import main
    from tierlift.models import build_model
    from tierlift.models.config import ModelConfig

    model_cfg = {"kind": "gpt", "vocab_size": 64, "d_model": 32, "n_layers": 3, "n_heads": 4, "max_seq_len": 16}
    d = {"model": model_cfg, "data": {"seq_len": 16}, "run": {"device": "cpu", "dir": str(tmp_path / "run")},
         "train": {"micro_batch_size": 2, "max_steps": 2,
                   "activations": {"policy": "auto", "gpu_budget_bytes": 6000, "min_swap_bytes": 0}}}
    cfg = TrainConfig.from_dict(d)
    path = tmp_path / "cfg.yaml"
    path.write_text(cfg.to_yaml())
    assert main(["plan", str(path)]) == 0  # before any run: says the plan comes from the first step
    assert "planned from the first two training steps" in capsys.readouterr().out
    trainer = Trainer(build_model(ModelConfig(**model_cfg), seed=1), cfg, train_data=arith_samples(32, seed=2),
                      run_dir=str(tmp_path / "run"))
    trainer.fit(2)
    executed = trainer.engine.activations.plan
    assert main(["plan", str(path)]) == 0
    out = capsys.readouterr().out
    assert "activation plan (auto)" in out
    for dec in executed.decisions:
        assert any(line.strip().startswith(dec.unit) and dec.decision in line for line in out.splitlines())
    assert main(["plan", str(path), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["execution"]["activations"]
    assert [(r["unit"], r["decision"], r["swap_fraction"], r["kept_bytes"], r["swapped_bytes"]) for r in rows] == \
        [(x.unit, x.decision, x.swap_fraction, x.kept_bytes, x.swapped_bytes) for x in executed.decisions]
