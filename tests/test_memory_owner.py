"""The memory owner (offload/memory.py): the only place streams and events are made,
one pinned pool shared by every user, buffers that travel with their guarding event,
and the engine's narrow host-optimizer API the Trainer uses instead of ``host_opt``."""

from __future__ import annotations

import ast
import pathlib

import pytest
import torch
import torch.nn as nn

from tierlift.offload.activation_plan import ActivationConfig
from tierlift.offload.memory import STREAMS, Guarded, MemoryOwner
from tierlift.offload.param_slots import PARAM_SLOTS, ParamSlots
from tierlift.offload.policy import CPUOffload, OffloadConfig
from tierlift.parallel.config import OptimizerConfig, PrecisionConfig, ZeroConfig
from tierlift.parallel.zero import ZeroEngine

from _fakes import FakeEvent

PKG = pathlib.Path(__file__).resolve().parent.parent / "tierlift"


def test_cpu_owner_hands_out_no_streams_no_events_and_aligned_pageable_buffers():
    m = MemoryOwner("cpu", host_budget_bytes=1 << 20)
    assert [m.stream(r) for r in STREAMS] == [None] * len(STREAMS)
    assert m.event() is None and m.event(timing=True) is None and m.record(None) is None
    assert m.pool is None and m.pinned_bytes == 0
    bufs, release = m.host_buffers([5000, 100])
    assert [b.numel() for b in bufs] == [5000, 100] and all(b.data_ptr() % 4096 == 0 for b in bufs)
    release()
    with pytest.raises(ValueError, match="unknown stream role 'h2dd'; one of h2d, d2h"):
        m.stream("h2dd")
    m.close()
    m.close()  # idempotent
    assert m.closed


def test_guarded_buffer_is_free_only_once_its_event_completed():
    ev = FakeEvent()
    g = Guarded(torch.zeros(4), ev)
    assert not g.ready()
    g.wait()
    assert ev.synced == 1 and g.event is None and g.ready()
    g.wait()  # nothing in flight: no second wait
    assert ev.synced == 1


class _File:
    def __init__(self):
        self.reads = []

    def read(self, key, out):
        self.reads.append(key)
        out.fill_(float(key[0]))
        return _Handle()


class _Handle:
    def wait(self):
        pass


class _Store:
    def __init__(self, n_chunks: int, numel: int):
        self.file = _File()
        self.pieces = [[(0, numel)] for _ in range(n_chunks)]

    def read_params(self, chunk, out):
        self.file.read((chunk, "param", 0), out)


def test_param_slots_read_ahead_skips_slots_whose_copy_out_is_in_flight():
    store = _Store(PARAM_SLOTS + 1, 8)
    slots = ParamSlots(store, torch.float32, MemoryOwner("cpu").host_buffers)
    slots.ensure(8)
    pending = [FakeEvent() for _ in range(PARAM_SLOTS)]
    for i in range(PARAM_SLOTS):  # every slot handed out ...
        assert torch.equal(slots.read(i, 8), torch.full((8,), float(i)))
    for i, ev in enumerate(pending):  # ... and copied out, the copies still in flight
        slots.release(i, ev)
    n = len(store.file.reads)
    slots.prefetch(PARAM_SLOTS)  # a read ahead must not wait on the device: nothing is issued
    assert len(store.file.reads) == n and not slots.held
    pending[2].done = True
    slots.prefetch(PARAM_SLOTS)
    assert len(store.file.reads) == n + 1 and slots.held[PARAM_SLOTS] is slots.slots[2]
    assert torch.equal(slots.read(PARAM_SLOTS, 8), torch.full((8,), float(PARAM_SLOTS)))  # no second read
    assert len(store.file.reads) == n + 1
    slots.release(PARAM_SLOTS)
    slots.close()


def _calls(path: pathlib.Path, names: set[str]) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in names:
            base = ast.unparse(node.func.value)
            if base in ("torch.cuda", "cuda"):
                out.append(f"{path.relative_to(PKG.parent)}:{node.lineno} {ast.unparse(node.func)}")
    return out


def test_only_the_memory_owner_creates_streams_and_events():
    found = [c for p in sorted(PKG.rglob("*.py")) if p.name != "memory.py" or p.parent.name != "offload"
             for c in _calls(p, {"Stream", "Event"})]
    assert not found, f"create streams and events through MemoryOwner (offload/memory.py): {found}"


def test_runtime_does_not_reach_into_the_host_optimizer():
    hits = [f"{p.name}:{n}" for p in sorted((PKG / "runtime").rglob("*.py"))
            for n, line in enumerate(p.read_text().splitlines(), 1) if "host_opt" in line]
    assert not hits, f"use the engine's drain() / offload_timings() / pinned_bytes: {hits}"


class _Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.fc = nn.Linear(d, d)

    def forward(self, x):
        return x + torch.tanh(self.fc(x))


class _Net(nn.Module):
    _no_split_modules = ["_Block"]

    def __init__(self, d=8, n=2):
        super().__init__()
        self.blocks = nn.ModuleList(_Block(d) for _ in range(n))

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x.pow(2).mean()


def _engine(offload: OffloadConfig | None, act: str = "swap") -> ZeroEngine:
    torch.manual_seed(0)
    return ZeroEngine(_Net(), ZeroConfig(stage=3), PrecisionConfig(), OptimizerConfig(lr=1e-2, grad_clip=0.0),
                      torch.device("cpu"), offload=offload,
                      activations=ActivationConfig(policy=act, min_swap_bytes=0))


def test_engine_has_one_memory_owner_shared_by_optimizer_and_activations_and_closes_it():
    eng = _engine(OffloadConfig(optimizer=CPUOffload()))
    try:
        assert eng.host_opt.memory is eng.memory and eng.activations.swap.memory is eng.memory
    finally:
        eng.close()
    assert eng.memory.closed


def test_engine_api_drains_and_reports_the_host_optimizer():
    eng = _engine(OffloadConfig(optimizer=CPUOffload()), act="keep")
    try:
        assert eng.steps_in_background and eng.pinned_bytes == 0
        x = torch.randn(4, 8)
        eng.begin_step(1e-2)
        eng.forward_begin()
        eng.backward(eng.model(x))
        eng.step(1e-2)
        eng.drain()
        assert all(eng.host_opt.is_stepped(i) for i in range(len(eng.chunks)))
        busy = eng.offload_timings()
        assert set(busy) >= {"step", "wait_d2h", "backlog_blocked"} and busy["step"] > 0
    finally:
        eng.close()
    plain = _engine(None, act="keep")
    assert not plain.steps_in_background and plain.offload_timings() is None
    plain.drain()  # no host optimizer: nothing to wait for
    plain.close()


@pytest.mark.gpu
def test_gpu_owner_streams_by_role_and_one_pool_for_optimizer_and_activations():
    dev = torch.device("cuda", torch.cuda.current_device())
    m = MemoryOwner(dev)
    assert m.stream("h2d") is m.stream("h2d") and m.stream("h2d") is not m.stream("act_h2d")
    bufs, release = m.host_buffers([1 << 20])
    assert bufs[0].is_pinned() and m.pinned_bytes >= 1 << 20
    slab = m.pool.slab(1 << 20, name="activations-0")  # a second user of the same pool
    assert m.pinned_bytes >= 2 << 20
    release()
    slab.release()
    m.close()
    assert m.pinned_bytes == 0


@pytest.mark.gpu
def test_activation_swap_stays_on_gpu_when_the_shared_pinned_budget_is_spent():
    from tierlift.offload.activation_swap import SwapStore
    dev = torch.device("cuda", torch.cuda.current_device())
    m = MemoryOwner(dev, host_budget_bytes=8 << 20)
    (_,), release = m.host_buffers([6 << 20])  # the host optimizer's share of the one budget
    small = SwapStore(dev, 1 << 20, m)
    host, _, ev = small.to_host(torch.ones(1 << 16, device=dev))
    assert host is not None and ev is not None  # 7 MiB of 8: fits
    big = SwapStore(dev, 16 << 20, m)
    assert big.to_host(torch.ones(1 << 16, device=dev)) == (None, None, None)  # kept on the GPU, not a crash
    ev.synchronize()
    release()
    m.close()
