"""The host optimizer's chunk records (offload/optimizer_state.py): the step phase and the
tier move only along their legal edges, and a worker error reaches the training thread."""

from __future__ import annotations

import pytest
import torch

from tierlift.layout import UnitSpec, plan_chunks
from tierlift.offload.optimizer import OffloadedOptimizer
from tierlift.offload.optimizer_state import ChunkPhase, HostChunk, Tier
from tierlift.offload.policy import CPUOffload, OffloadConfig
from tierlift.parallel.config import OptimizerConfig


def _chunk() -> HostChunk:
    hc = HostChunk(3, Tier.HOST, 8)
    hc.done.set()
    return hc


def test_phase_moves_idle_grad_stepping_idle_and_nothing_else():
    hc = _chunk()
    with pytest.raises(RuntimeError, match="chunk 3: phase idle -> stepping is not a legal move"):
        hc.enter(ChunkPhase.STEPPING)  # a step queued for a chunk that has no gradient
    hc.enter(ChunkPhase.GRAD)
    with pytest.raises(RuntimeError, match="phase grad -> grad"):
        hc.enter(ChunkPhase.GRAD)  # a second gradient before the first was stepped
    hc.enter(ChunkPhase.STEPPING)
    hc.enter(ChunkPhase.IDLE)
    hc.enter(ChunkPhase.GRAD)
    hc.enter(ChunkPhase.IDLE)  # a skipped step (fp16 overflow)
    assert hc.phase is ChunkPhase.IDLE


def test_tier_moves_host_to_nvme_only_and_only_at_rest():
    hc = _chunk()
    hc.enter(ChunkPhase.GRAD)
    with pytest.raises(RuntimeError, match="tier host -> nvme in phase grad is not a legal move"):
        hc.move_tier(Tier.NVME)
    hc.enter(ChunkPhase.IDLE)
    hc.done.clear()  # a step still queued in the worker
    with pytest.raises(RuntimeError, match="tier host -> nvme"):
        hc.move_tier(Tier.NVME)
    hc.done.set()
    hc.move_tier(Tier.NVME)
    with pytest.raises(RuntimeError, match="tier nvme -> host"):
        hc.move_tier(Tier.HOST)


def test_worker_error_surfaces_on_the_training_thread_and_releases_waiters():
    units = [UnitSpec("", (("w", (8, 8)),)), UnitSpec("b.0", (("b.0.w", (8, 8)),))]
    layout = list(plan_chunks(units, 1, align_bytes=64))
    opt = OffloadedOptimizer(layout, 0, [torch.randn(c.shard_numel) for c in layout],
                             OptimizerConfig(lr=0.1, grad_clip=0.0), OffloadConfig(optimizer=CPUOffload()),
                             torch.float32, torch.device("cpu"), deferred=False)
    try:
        def broken(*a, **k):
            raise OSError("disk gone")
        opt.stepper.run = broken
        opt.begin_step(0.1)
        opt.accept_grad(1, torch.ones(layout[1].shard_numel), first_micro=True, last_micro=True)
        with pytest.raises(OSError, match="disk gone"):
            opt.wait_chunk(1)  # returns (raising) instead of waiting forever
        with pytest.raises(OSError, match="disk gone"):
            opt.wait_all()
    finally:
        opt.close()
    assert opt.memory.closed  # its own memory owner goes with it
