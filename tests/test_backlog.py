"""The gradient backlog: earliest-deadline-first order and the byte budget."""

import threading

import pytest
import torch

from tierlift.offload.backlog import GradBacklog, PendingGrad


def _item(i, numel=4):
    return PendingGrad(i, torch.zeros(numel), None, 0.1, 0)


def test_takes_earliest_deadline_not_arrival():
    b = GradBacklog(1 << 20)
    b.set_deadlines([9, 0, 1, 2])  # the root (9) first, then units in forward order
    for i in (2, 1, 0, 9):         # backward delivers them in reverse
        b.put(_item(i))
    assert [b.take().index for _ in range(4)] == [9, 0, 1, 2]
    assert b.take() is None


def test_unnamed_chunks_go_last_by_index():
    b = GradBacklog(1 << 20)
    b.set_deadlines([3])
    for i in (5, 3, 4):
        b.put(_item(i))
    assert [b.take().index for _ in range(3)] == [3, 4, 5]


def test_budget_blocks_producer_until_release_and_counts_taken_bytes():
    b = GradBacklog(budget_bytes=32)  # two 16-byte gradients
    first, second = _item(0), _item(1)
    b.put(first)
    b.put(second)
    assert b.bytes == 32
    done = threading.Event()
    t = threading.Thread(target=lambda: (b.put(_item(2)), done.set()))
    t.start()
    taken = b.take()
    assert not done.wait(0.2), "a taken gradient still holds its bytes until released"
    b.release(taken)
    assert done.wait(5)
    t.join()
    assert b.bytes == 32 and b.peak_bytes == 32 and b.blocked_s > 0
    assert taken.grad is None  # released: the device memory can go


def test_one_gradient_always_admitted_even_over_budget():
    b = GradBacklog(budget_bytes=1)
    b.put(_item(0, numel=1000))
    assert len(b) == 1


def test_same_chunk_twice_is_an_error():
    b = GradBacklog(1 << 20)
    b.put(_item(0))
    with pytest.raises(RuntimeError, match="chunk 0 already has a gradient"):
        b.put(_item(0))


def test_negative_budget_refused():
    with pytest.raises(ValueError, match="budget_bytes"):
        GradBacklog(-1)


def test_offloaded_optimizer_steps_waiting_gradients_in_next_forward_order():
    """Gradients arrive in backward order while the worker is busy; it steps them in
    the next forward's order, and step() (flush_grads) does not wait for them."""
    from tierlift.offload.optimizer import OffloadedOptimizer
    from tierlift.offload.policy import CPUOffload, OffloadConfig
    from tierlift.parallel.config import OptimizerConfig
    from tierlift.layout import UnitSpec, plan_chunks

    units = [UnitSpec("", (("embed.weight", (16, 8)),))] + [
        UnitSpec(f"blocks.{i}", ((f"blocks.{i}.w", (8, 8)),)) for i in range(3)]
    layout = list(plan_chunks(units, 1, align_bytes=64))
    masters = [torch.randn(c.shard_numel) for c in layout]
    opt = OffloadedOptimizer(layout, 0, list(masters), OptimizerConfig(lr=0.1, grad_clip=0.0),
                             OffloadConfig(optimizer=CPUOffload()), torch.float32, torch.device("cpu"),
                             deferred=False)
    stepped, gate = [], threading.Event()
    run_steps, drain = opt.stepper.run, opt.worker._drain_backlog
    opt.stepper.run = lambda order, *a, **k: (stepped.extend(order), run_steps(order, *a, **k))
    opt.worker._drain_backlog = lambda: (gate.wait(), drain())
    root = next(c.index for c in layout if c.unit == "")
    blocks = [c.index for c in layout if c.unit != ""]
    opt.set_step_order([root] + blocks)
    opt.begin_step(0.1)
    for i in reversed([root] + blocks):  # backward: last unit first, root last
        opt.accept_grad(i, torch.ones(layout[i].shard_numel), first_micro=True, last_micro=True)
    sq = opt.flush_grads()  # returns while every step still waits behind the gate
    assert stepped == [] and sq == pytest.approx([float(c.shard_numel) for c in layout])
    gate.set()
    opt.finish_step()
    for i in [root] + blocks:
        p = opt.wait_chunk(i)
        assert not torch.equal(p, masters[i]), "the step changed the master"
    assert stepped[0] == root and stepped == [root] + blocks
    opt.close()
