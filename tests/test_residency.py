"""The residency state machine of a chunk's compute parameters (parallel/chunks.py): the
allowed and refused transitions (pure), a gather's handles held until it is waited for,
and the engine's chunks ending every step in the state its plan implies."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn as nn

from tierlift.offload.policy import CPUOffload, NoOffload, OffloadConfig
from tierlift.parallel.chunks import TRANSITIONS, Residency, ResidencyError, check_transition
from tierlift.parallel.config import OptimizerConfig, PrecisionConfig, ZeroConfig
from tierlift.parallel.sharded_param import is_guarded
from tierlift.parallel.zero import ZeroEngine

R = Residency
# The specification (docs/zero.md, "Residency"), written out independently of TRANSITIONS.
ALLOWED = {
    (R.ON_HOST, R.H2D_INFLIGHT), (R.H2D_INFLIGHT, R.GATHERING),
    (R.SHARDED, R.GATHERING), (R.SHARDED, R.ON_HOST),
    (R.GATHERING, R.GATHERED),
    (R.GATHERED, R.SHARDED), (R.GATHERED, R.ON_HOST),
}


@pytest.mark.parametrize("old, new", list(itertools.product(Residency, Residency)),
                         ids=lambda r: r.name)
def test_transition_allowed_or_refused(old, new):
    if (old, new) in ALLOWED:
        check_transition(old, new)
    else:
        with pytest.raises(ResidencyError, match=f"{old.name} -> {new.name}"):
            check_transition(old, new)


def test_table_is_the_specification():
    assert {(a, b) for a, bs in TRANSITIONS.items() for b in bs} == ALLOWED
    # every state is reachable and can be left: no chunk gets stuck
    assert {b for _, b in ALLOWED} == set(Residency) == {a for a, _ in ALLOWED}


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.fc = nn.Linear(d, d)

    def forward(self, x):
        return x + torch.tanh(self.fc(x))


class Net(nn.Module):
    _no_split_modules = ["Block"]

    def __init__(self, d=8, v=16, n=3):
        super().__init__()
        self.emb = nn.Embedding(v, d)
        self.blocks = nn.ModuleList([Block(d) for _ in range(n)])
        self.head = nn.Linear(d, v, bias=False)

    def forward(self, x, y):
        h = self.emb(x)
        for b in self.blocks:
            h = b(h)
        return nn.functional.cross_entropy(self.head(h).flatten(0, 1), y.flatten())


def _engine(stage=3, offload=None, device="cpu", compute="fp32"):
    torch.manual_seed(0)
    return ZeroEngine(Net(), ZeroConfig(stage=stage), PrecisionConfig(compute=compute), OptimizerConfig(lr=1e-2),
                      torch.device(device), offload=offload)


def test_a_gather_keeps_its_handles_until_waited_for():
    eng = _engine()
    g = eng.groups[0]
    c = g.chunks[0]
    assert c.state is R.SHARDED and c.inflight is None
    g.unshard()
    assert c.state is R.GATHERING and c.inflight is not None
    with pytest.raises(ResidencyError, match="not waited for"):
        c.transition(R.GATHERED)
    g.wait_for_unshard()
    assert c.state is R.GATHERED and c.inflight is None and not is_guarded(c.params[0])
    with pytest.raises(ResidencyError, match="GATHERED -> GATHERING"):
        c.transition(R.GATHERING)
    g.reshard()
    assert c.state is R.SHARDED and c.full.untyped_storage().size() == 0 and is_guarded(c.params[0])


def _planned(eng, c) -> Residency:
    """The state a chunk rests in between steps: gathered when it stays gathered (stages 1-2,
    the root, persistent chunks); otherwise its device shard, which a host optimizer's step
    makes stale (ON_HOST: the next gather copies the new values up)."""
    if eng.cfg.stage < 3 or c.spec.persistent or c is eng.root:
        return R.GATHERED
    return R.ON_HOST if eng.host_opt is not None else R.SHARDED


@pytest.mark.parametrize("stage, offload", [
    (1, None), (2, None), (3, None),
    (2, OffloadConfig(optimizer=CPUOffload())),
    (3, OffloadConfig(optimizer=CPUOffload())),
    (3, OffloadConfig(optimizer=CPUOffload(), param=CPUOffload())),
], ids=["s1", "s2", "s3", "s2-cpu-opt", "s3-cpu-opt", "s3-cpu-params"])
def test_chunks_end_each_step_in_the_planned_state(stage, offload):
    _check_steps_end_in_planned_state(_engine(stage, offload))


@pytest.mark.gpu
@pytest.mark.parametrize("param", ["device", "host"])
def test_chunks_end_each_step_in_the_planned_state_gpu_host_optimizer(param):
    """The H2D path (gather.py, _gather_from_host): bf16 compute, copies on the memory owner's stream."""
    offload = OffloadConfig(optimizer=CPUOffload(), param=CPUOffload() if param == "host" else NoOffload())
    _check_steps_end_in_planned_state(_engine(3, offload, device="cuda", compute="bf16"))


def _check_steps_end_in_planned_state(eng):
    stage = eng.cfg.stage
    try:
        params_on_device = [tier == "gpu" for _, tier in eng.plan.placement]
        assert [c.on_device for c in eng.chunks] == params_on_device
        g = torch.Generator().manual_seed(1)
        for _ in range(3):
            x, y = (torch.randint(0, 16, (2, 5), generator=g).to(eng.device) for _ in range(2))
            eng.begin_step(1e-2)
            eng.forward_begin()
            eng.backward(eng.model(x, y))
            if stage == 3:  # after backward every unit rests in its device shard, or on the host
                assert all(c.state is c.resting for gr in eng.groups for c in gr.chunks if not c.spec.persistent)
            eng.step(1e-2)
            for c in eng.chunks:
                assert c.state is _planned(eng, c), (c.spec.unit, c.state)
                assert c.inflight is None
                if c.state is not R.GATHERED:
                    assert c.full.untyped_storage().size() == 0 and all(is_guarded(p) for p in c.params)
    finally:
        eng.close()


def _attributes(eng) -> dict[str, set[str]]:
    parts = {"engine": eng, "gatherer": eng.gatherer, "hooks": eng.hooks, "reducer": eng.reducer,
             "stepper": eng.stepper, "state": eng.state, "full_model": eng.full_model, "guard": eng.guard}
    parts.update({f"group{g.index}": g for g in eng.groups})
    parts.update({f"chunk{c.spec.index}": c for c in eng.chunks})
    return {name: set(vars(obj)) for name, obj in parts.items()}


def test_engine_is_composed_and_its_parts_create_no_attributes_after_construction():
    assert ZeroEngine.__mro__ == (ZeroEngine, object)  # composition, no mixins
    eng = _engine(3, OffloadConfig(optimizer=CPUOffload()))
    try:
        built = _attributes(eng)
        x, y = torch.randint(0, 16, (2, 5)), torch.randint(0, 16, (2, 5))
        eng.begin_step(1e-2)
        eng.forward_begin()
        eng.backward(eng.model(x, y))
        eng.step(1e-2)
        segments = eng.state_segments()
        assert segments
        eng.load_extra_state(eng.extra_state())
        with eng.gathered_parameters() as model, torch.no_grad():
            model(x, y)
        eng.unwrap()
        eng.forward_begin()  # binds the parameters back
        with torch.no_grad():
            eng.model(x, y)
        eng.forward_end_eval()
        assert _attributes(eng) == built
    finally:
        eng.close()
