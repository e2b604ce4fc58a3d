"""Single-process engine pieces: unit discovery, residency, optimizer sub-groups,
loss scaling, wrap errors, execution-order tracking and clipping."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from tierlift.errors import ConfigError
from tierlift.parallel.config import OptimizerConfig, PrecisionConfig, ZeroConfig
from tierlift.parallel.optim import LossScaler
from tierlift.parallel.units import find_units
from tierlift.parallel.zero import Residency, ZeroEngine


class Expert(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.fc = nn.Linear(d, d)

    def forward(self, x):
        return torch.relu(self.fc(x))


class Block(nn.Module):
    def __init__(self, d, n_exp=0):
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.fc = nn.Linear(d, d)
        self.experts = nn.ModuleList([Expert(d) for _ in range(n_exp)])

    def forward(self, x, route: int | None = None):
        h = x + self.fc(self.ln(x))
        if self.experts and route is not None:
            h = h + self.experts[route](h)
        return h


class Net(nn.Module):
    _no_split_modules = ["Block", "Expert"]

    def __init__(self, d=8, v=16, n=3, n_exp=2):
        super().__init__()
        self.emb = nn.Embedding(v, d)
        self.blocks = nn.ModuleList([Block(d, n_exp) for _ in range(n)])
        self.head = nn.Linear(d, v, bias=False)
        self.head.weight = self.emb.weight  # tied

    def forward(self, input_ids, labels, route=None, skip=()):
        h = self.emb(input_ids)
        for i, b in enumerate(self.blocks):
            if i not in skip:
                h = b(h, route)
        return nn.functional.cross_entropy(self.head(h).flatten(0, 1), labels.flatten())


def _engine(model, **zero):
    return ZeroEngine(model, ZeroConfig(**zero), PrecisionConfig(), OptimizerConfig(lr=1e-2), torch.device("cpu"))


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 16, (2, 5), generator=g), torch.randint(0, 16, (2, 5), generator=g)


def test_find_units_nesting_and_ties():
    units = find_units(Net(), ["Block", "Expert"])
    names = [u.name for u in units]
    assert names[0] == "" and "blocks.0" in names and "blocks.0.experts.1" in names
    owners = {n: u.name for u in units for n, _ in u.params}
    assert owners["blocks.0.experts.1.fc.weight"] == "blocks.0.experts.1"
    assert owners["blocks.0.fc.weight"] == "blocks.0"
    assert "head.weight" not in owners and owners["emb.weight"] == ""  # tied: stored once


def test_unknown_wrap_class_is_a_config_error():
    with pytest.raises(ConfigError, match="zero.wrap"):
        find_units(Net(), ["Blok"])


def test_stage3_reshards_after_forward_and_backward():
    model = Net()
    eng = _engine(model, stage=3)
    assert all(c.state is Residency.SHARDED for g in eng.groups for c in g.chunks)
    x, y = _batch()
    eng.forward_begin()
    loss = model(x, y, route=1)
    assert all(c.state is Residency.SHARDED for g in eng.groups for c in g.chunks)
    eng.backward(loss)
    assert all(c.state is Residency.SHARDED for g in eng.groups for c in g.chunks)
    assert eng.root.state is Residency.GATHERED
    assert all(p.grad is None for p in model.parameters()), "grads live in the shards, not on the params"
    assert any(float(c.grad.abs().sum()) > 0 for c in eng.chunks)


def test_keep_for_backward_plan():
    from tierlift.parallel.gather import keep_for_backward
    assert keep_for_backward([10, 10, 10, 10], 0) == [False] * 4
    # unit k waits for twice the elements after it: 60, 40, 20, 0
    assert keep_for_backward([10, 10, 10, 10], 41) == [False, True, True, True]
    assert keep_for_backward([10, 10, 10, 10], 40) == [False, False, True, True]
    assert keep_for_backward([10, 10, 10, 10], 10 ** 9) == [True] * 4
    with pytest.raises(ConfigError, match="zero.max_reuse_distance"):
        ZeroConfig(max_reuse_distance=-1)


@pytest.mark.parametrize("distance, kept", [(10 ** 9, 3), (1, 1), (0, 0)])
def test_units_stay_gathered_for_backward_within_reuse_distance(distance, kept):
    model = Net()
    ref = copy.deepcopy(model)
    eng, ref_eng = _engine(model, stage=3, max_reuse_distance=distance), _engine(ref, stage=3)
    for step in range(3):
        x, y = _batch(step)
        losses = []
        for e, m in ((eng, model), (ref_eng, ref)):
            e.forward_begin()
            loss = m(x, y, route=1)
            gathered = sum(not g.is_sharded() for g in e.groups)
            if e is eng:  # the order is known from step 2 on: the last units stay gathered
                assert gathered == (kept if step else 0)
            e.backward(loss)
            assert all(g.is_sharded() for g in e.groups)  # every unit resharded after its backward
            e.step(1e-2)
            losses.append(float(loss.detach()))
        assert losses[0] == losses[1]  # same numbers as resharding after every forward
    with torch.no_grad():  # no backward follows: nothing is kept
        eng.forward_begin()
        model(*_batch(9))
        eng.forward_end_eval()
    assert all(g.is_sharded() for g in eng.groups)


def test_reuse_distance_defaults_on_with_parameters_on_nvme(tmp_path):
    from tierlift.offload.policy import NVMeOffload, OffloadConfig
    assert _engine(Net(), stage=3).reuse_distance == 0
    assert _engine(Net(), stage=3, max_reuse_distance=5).reuse_distance == 5
    nvme = NVMeOffload(path=str(tmp_path))
    eng = ZeroEngine(Net(), ZeroConfig(stage=3), PrecisionConfig(), OptimizerConfig(lr=1e-2), torch.device("cpu"),
                     offload=OffloadConfig(optimizer=nvme, param=NVMeOffload(path=str(tmp_path))))
    try:
        assert eng.reuse_distance == 10 ** 9  # DeepSpeed's default: a second read would cost disk time
    finally:
        eng.close()


def test_aliases_and_full_state_dict_names():
    model = Net()
    ref = copy.deepcopy(model).state_dict()
    eng = _engine(model, stage=3)
    sd = eng.full_state_dict()
    assert eng.aliases() == {"head.weight": "emb.weight"}
    assert set(sd) == set(ref)
    for k in ref:
        torch.testing.assert_close(sd[k], ref[k])


def test_execution_order_change_is_recorded():
    model = Net()
    eng = _engine(model, stage=3, prefetch_units=1)
    for skip in ((), (), (1,), (1,)):
        x, y = _batch()
        eng.forward_begin()
        eng.backward(model(x, y, skip=skip))
        eng.step(1e-3)
    assert eng.order_changes == 1
    assert eng.hooks.fwd_order == [0, 2]


def test_unrouted_expert_gets_zero_grad_and_matches_reference():
    torch.manual_seed(0)
    model = Net()
    ref = copy.deepcopy(model)
    eng = _engine(model, stage=3)
    opt = torch.optim.AdamW([{"params": [p for p in ref.parameters() if p.ndim >= 2], "weight_decay": 0.1},
                             {"params": [p for p in ref.parameters() if p.ndim < 2], "weight_decay": 0.0}],
                            lr=1e-2, betas=(0.9, 0.95))
    for step in range(4):
        x, y = _batch(step)
        eng.forward_begin()
        loss = model(x, y, route=step % 2)
        eng.backward(loss)
        eng.step(1e-2)
        opt.zero_grad()
        ref(x, y, route=step % 2).backward()
        # Documented semantics (docs/zero.md): a parameter that got no gradient in a step
        # (an unrouted expert) steps with a zero gradient, as in DeepSpeed; torch skips it.
        for p in ref.parameters():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
        opt.step()
    sd = eng.full_state_dict()
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(sd[k], v, rtol=1e-5, atol=1e-6)


def test_unrouted_expert_chunk_is_gathered_with_its_block():
    # docs/zero.md and models/moe.py: experts' chunks travel with their block, routed or
    # not, so every rank issues the same collectives; only compute follows the routing.
    model = Net()
    eng = _engine(model, stage=3)
    seen = {}

    def record(module, args):
        for c in eng.chunks:
            if c.spec.unit.startswith("blocks.0.experts."):
                seen[c.spec.unit] = c.state

    model.blocks[0].experts[0].register_forward_pre_hook(record)
    x, y = _batch()
    eng.forward_begin()
    eng.backward(model(x, y, route=0))
    assert seen == {"blocks.0.experts.0": Residency.GATHERED, "blocks.0.experts.1": Residency.GATHERED}


def test_optimizer_sub_groups_bound_elements_and_keep_numerics():
    outs = []
    for sub in (0, 64):
        torch.manual_seed(0)
        model = Net()
        eng = _engine(model, stage=2, sub_group_size=sub)
        if sub:
            assert all(sum(p.numel() for p in g.params) <= sub or len(g.params) == 1
                       for _, g in eng.optimizer.groups)
            assert len(eng.optimizer.groups) > 2
        x, y = _batch()
        eng.forward_begin()
        eng.backward(model(x, y, route=0))
        eng.step(1e-2)
        outs.append(eng.full_state_dict())
    for k in outs[0]:
        torch.testing.assert_close(outs[0][k], outs[1][k])


def test_loss_scaler_dynamics():
    sc = LossScaler(PrecisionConfig(compute="fp16", initial_scale_power=4, loss_scale_window=2, hysteresis=2,
                                    min_loss_scale=2.0), enabled=True)
    assert sc.scale == 16
    sc.update(True)   # first overflow: hysteresis absorbs it
    assert sc.scale == 16
    sc.update(True)   # second: halve
    assert sc.scale == 8
    sc.update(False)
    sc.update(False)  # window of good steps: double
    assert sc.scale == 16
    for _ in range(20):
        sc.update(True)
    assert sc.scale == 2.0  # floor
    sc2 = LossScaler(PrecisionConfig(compute="fp16"), enabled=True)
    sc2.load_state_dict(sc.state_dict())
    assert sc2.state_dict() == sc.state_dict()


def test_fp16_overflow_skips_step_and_keeps_weights():
    model = Net()
    eng = ZeroEngine(model, ZeroConfig(stage=3), PrecisionConfig(compute="fp16", hysteresis=1),
                     OptimizerConfig(lr=1e-2), torch.device("cpu"))
    before = eng.full_state_dict()
    x, y = _batch()
    eng.forward_begin()
    loss = model(x, y)
    eng.backward(loss * float("inf"))
    stats = eng.step(1e-2)
    assert stats["skipped"] and eng.scaler.scale == 2.0 ** 15
    after = eng.full_state_dict()
    for k in before:
        torch.testing.assert_close(before[k], after[k], rtol=0, atol=0)
