"""Pinned slab pool: exact sizes, 4 KiB alignment, budget and memlock errors, sub-allocation
with coalescing and event-guarded reuse, release on close.

CPU tests use the pool's pageable mode (same code paths minus cudaHostRegister); tests
marked ``gpu`` pin for real and run on the device machine.
"""

from __future__ import annotations

import gc
import random
import resource
import threading
import weakref

import pytest
import torch
from _fakes import FakeEvent

from tierlift.errors import ConfigError
from tierlift.offload import host_alloc, pinned
from tierlift.offload.pinned_bench import benchmark_pinning
from tierlift.offload.pinned import (PAGE, PinnedMemoryError, PinnedPool, SlabFullError,
                                     check_memlock, hostalloc_pinned_bytes)

MiB = 1 << 20


@pytest.fixture
def pool():
    with PinnedPool(64 * MiB, device="cpu") as p:
        yield p


# -- sizes and alignment ------------------------------------------------------------------------
def test_exact_size_rounded_only_to_4k(pool):
    s = pool.slab(1_000_000, name="m")
    assert (s.nbytes, s.reserved_bytes, s.pinned_bytes, s.pinned) == (1_000_000, 1_003_520, 0, False)
    st = pool.stats()
    assert (st.slabs, st.requested_bytes, st.reserved_bytes, st.pinned_bytes) == (1, 1_000_000, 1_003_520, 0)
    assert st.overhead_ratio == pytest.approx(1_003_520 / 1_000_000)
    big = pool.slab(int(1.1 * 32 * MiB))  # where torch's host cache would round up to 64 MiB
    assert big.reserved_bytes - big.nbytes < PAGE
    assert pool.stats().overhead_ratio < 1.02


def test_alignment_of_slabs_regions_and_views(pool):
    s = pool.slab(20 * PAGE + 7)  # room for an 8-page-aligned page wherever the mapping starts
    assert s.data_ptr % PAGE == 0 and s.tensor.data_ptr() == s.data_ptr and s.tensor.numel() == 20 * PAGE + 7
    regions = [s.alloc(n) for n in (1, PAGE + 1, 3)]
    assert [r.offset for r in regions] == [0, PAGE, 3 * PAGE]
    assert all(r.data_ptr % PAGE == 0 and r.tensor.data_ptr() == r.data_ptr for r in regions)
    wide = s.alloc(PAGE, align=8 * PAGE)
    assert wide.data_ptr % (8 * PAGE) == 0
    for r in regions[::-1] + [wide]:
        r.free()
    assert s.free_bytes == s.reserved_bytes and len(s._free) == 1


def test_views_are_typed_bounded_and_share_memory(pool):
    s = pool.slab(4 * PAGE)
    a, b = s.alloc(PAGE), s.alloc(PAGE)
    a.view(torch.float32).fill_(1.5)
    b.view(torch.int64, 4, offset=8).fill_(7)
    assert torch.equal(s.view(torch.float32, PAGE // 4), torch.full((PAGE // 4,), 1.5))
    assert s.view(torch.int64, 4, offset=PAGE + 8).tolist() == [7] * 4
    assert a.view(torch.bfloat16).numel() == PAGE // 2
    with pytest.raises(ValueError, match="beyond"):
        a.view(torch.float32, PAGE // 4 + 1)
    with pytest.raises(ValueError, match="multiple"):
        s.view(torch.float32, 1, offset=2)


# -- budget ---------------------------------------------------------------------------------------
def test_budget_error_names_budget_request_pinned_and_fix():
    with PinnedPool(10 * MiB, device="cpu") as p:
        p.slab(6 * MiB, name="master")
        with pytest.raises(PinnedMemoryError) as info:
            p.slab(6 * MiB, name="exp_avg")
        msg = str(info.value)
        assert info.value.setting == "offload.host_budget_bytes" and info.value.value == 10 * MiB
        for text in ("offload.host_budget_bytes=10485760", "'exp_avg'", "requests 6,291,456 bytes",
                     "already pinned 6,291,456 bytes", "budget 10,485,760 bytes", "Fix:", "NVMe",
                     "at least 12582912"):
            assert text in msg, (text, msg)
        p.slab(4 * MiB)  # the refused request left no charge behind
        assert p.stats().reserved_bytes == 10 * MiB


def test_release_and_close_return_budget():
    p = PinnedPool(8 * MiB, device="cpu")
    s = p.slab(8 * MiB)
    s.release()
    assert s.released and p.stats().reserved_bytes == 0
    s2 = p.slab(8 * MiB)
    p.close()
    assert p.closed and s2.released and p.stats().slabs == 0
    with pytest.raises(RuntimeError, match="released"):
        s2.view(torch.uint8)
    with pytest.raises(RuntimeError, match="closed"):
        p.slab(PAGE)
    p.close()  # idempotent


def test_release_refuses_live_regions(pool):
    s = pool.slab(2 * PAGE)
    r = s.alloc(PAGE)
    with pytest.raises(RuntimeError, match="live regions"):
        s.release()
    r.free()
    s.release()


def test_close_unmaps_and_tolerates_live_views():
    p = PinnedPool(0, device="cpu")
    quiet, kept = p.slab(PAGE), p.slab(PAGE)
    mm_quiet, mm_kept = weakref.ref(quiet._b._mm), weakref.ref(kept._b._mm)
    view = kept.view(torch.int32)
    view.fill_(3)
    with pytest.warns(ResourceWarning, match="4,096 bytes stay mapped"):
        p.close()
    assert mm_quiet() is None and mm_kept() is not None  # unmapped / kept for the view
    assert int(view.sum()) == 3 * PAGE // 4  # still valid memory, no use-after-free
    del view
    assert mm_kept() is None  # unmapped with its last view


def test_finalizer_releases_when_pool_is_dropped():
    p = PinnedPool(0, device="cpu", hugepages=False)
    s = p.slab(PAGE)
    fin = p._finalizer
    del p
    gc.collect()
    assert not fin.alive and s.released


# -- sub-allocation -------------------------------------------------------------------------------
def test_carve_packs_exactly_in_order(pool):
    regions = pool.carve([1000, 5000, PAGE], name="grads")
    slab = regions[0].slab
    assert [r.offset for r in regions] == [0, PAGE, 3 * PAGE]
    assert [r.nbytes for r in regions] == [1000, 5000, PAGE]
    assert slab.nbytes == slab.reserved_bytes == 4 * PAGE and slab.free_bytes == 0
    with pytest.raises(ValueError):
        pool.carve([PAGE, 0])


def test_free_list_coalesces_both_neighbours(pool):
    s = pool.slab(10 * PAGE)
    a, b, c = s.alloc(PAGE), s.alloc(2 * PAGE), s.alloc(3 * PAGE)
    b.free()
    a.free()  # merges with b's extent
    assert s._free == [[0, 3 * PAGE], [6 * PAGE, 4 * PAGE]]
    c.free()  # merges left and right: one extent again
    assert s._free == [[0, 10 * PAGE]] and s.allocated_bytes == 0
    assert s.alloc(10 * PAGE).offset == 0


def test_slab_full_and_double_free(pool):
    s = pool.slab(2 * PAGE, name="staging")
    r = s.alloc(2 * PAGE)
    with pytest.raises(SlabFullError, match="'staging'.*no free extent of 4,096 bytes"):
        s.alloc(1)
    r.free()
    with pytest.raises(RuntimeError, match="double free"):
        r.free()


def test_event_guarded_free_is_reused_only_after_event(pool):
    s = pool.slab(2 * PAGE)
    r = s.alloc(2 * PAGE)
    ev = FakeEvent()
    r.free(ev)
    with pytest.raises(SlabFullError, match="8,192 bytes waiting on events"):
        s.alloc(PAGE)
    ev.done = True
    assert s.alloc(2 * PAGE).offset == 0


def test_close_waits_for_pending_events():
    p = PinnedPool(0, device="cpu")
    s = p.slab(PAGE)
    ev = FakeEvent()
    s.alloc(PAGE).free(ev)
    p.close()
    assert ev.synced == 1


def test_concurrent_alloc_free_keeps_free_list_consistent(pool):
    s = pool.slab(256 * PAGE)
    errors = []

    def worker(seed: int) -> None:
        rng, held = random.Random(seed), []
        try:
            for _ in range(300):
                if held and (rng.random() < 0.5 or len(held) > 6):
                    held.pop(rng.randrange(len(held))).free()
                else:
                    try:
                        held.append(s.alloc(rng.randint(1, 8) * PAGE - rng.randint(0, 100)))
                    except SlabFullError:
                        pass
            for r in held:
                r.free()
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert s._free == [[0, 256 * PAGE]]


# -- memlock --------------------------------------------------------------------------------------
@pytest.fixture
def limits(monkeypatch):
    """Set RLIMIT_MEMLOCK and privilege as seen by the pool."""

    def set_(soft, hard=None, root=False, cap=False):
        hard = soft if hard is None else hard
        monkeypatch.setattr(resource, "getrlimit",
                            lambda which: (soft, hard) if which == resource.RLIMIT_MEMLOCK else (0, 0))
        monkeypatch.setattr(host_alloc.os, "geteuid", lambda: 0 if root else 1000)
        monkeypatch.setattr(host_alloc, "_has_cap_ipc_lock", lambda: cap)

    return set_


def test_memlock_refuses_budget_above_limit(limits):
    limits(8 * MiB)
    with pytest.raises(PinnedMemoryError) as info:
        check_memlock(16 * MiB)
    msg = str(info.value)
    for text in ("offload.host_budget_bytes=16777216", "memlock limit 8,388,608 bytes", "ulimit -l unlimited",
                 "--ulimit memlock=-1", "at most 8388608"):
        assert text in msg, (text, msg)
    with pytest.raises(PinnedMemoryError, match="no budget"):
        check_memlock(0)  # unbounded pinning under a finite limit
    rep = check_memlock(8 * MiB)
    assert rep.ok and rep.soft_bytes == 8 * MiB and not rep.privileged


@pytest.mark.parametrize("kw", [dict(root=True), dict(cap=True)])
def test_memlock_privileged_is_reported_not_enforced(limits, kw):
    limits(64 << 10, **kw)
    rep = check_memlock(1 << 40)
    assert rep.privileged and rep.ok and "not enforced" in rep.describe()


def test_memlock_unlimited_and_pageable(limits):
    limits(resource.RLIM_INFINITY)
    assert check_memlock(1 << 40).soft_bytes is None
    limits(64 << 10)
    rep = check_memlock(1 << 40, pinning=False)
    assert rep.ok and not rep.applies
    assert PinnedPool(1 << 40, device="cpu").memlock.applies is False  # pageable pools never refuse


# -- methods --------------------------------------------------------------------------------------
def test_hostalloc_refused_where_rounding_wastes_more_than_2_percent():
    assert hostalloc_pinned_bytes(int(1.1 * (1 << 30))) == 2 << 30
    with PinnedPool(0, method="hostalloc", device="cpu") as p:
        with pytest.raises(PinnedMemoryError) as info:
            p.slab(int(1.1 * (1 << 30)), name="big")
        assert "method='register'" in str(info.value) and info.value.setting == "PinnedPool.method"
        assert p.stats().slabs == 0  # refused before allocating
        assert p.slab(MiB - 100).reserved_bytes == MiB  # power of two: accepted


def test_bad_arguments():
    with pytest.raises(ConfigError, match="PinnedPool.method"):
        PinnedPool(0, method="malloc")
    with pytest.raises(PinnedMemoryError, match="must be >= 0"):
        PinnedPool(-1, device="cpu")
    with PinnedPool(0, device="cpu") as p, pytest.raises(ValueError):
        p.slab(0)


def test_benchmark_pinning_reports_every_size():
    out = benchmark_pinning([PAGE, 3 * PAGE + 1], device="cpu", repeats=1)
    assert out["pinned"] is False  # and no hostalloc rows: that method needs CUDA
    assert [(r["bytes"], r["method"]) for r in out["results"]] == [
        (PAGE, "register"), (PAGE, "register_4k"), (3 * PAGE + 1, "register"), (3 * PAGE + 1, "register_4k")]
    row = out["results"][2]
    assert row["reserved_bytes"] == 4 * PAGE and row["pinned_bytes"] == 0 and row["pool_accepts"]
    assert {"total_s", "map_touch_s", "register_s", "release_s", "gib_per_s"} <= row.keys()


# -- GPU (device machine) -------------------------------------------------------------------------
@pytest.mark.parametrize("method, nbytes", [("register", 64 * MiB + 123), ("hostalloc", 64 * MiB)])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_slab_is_pinned_exact_and_dmas(method, nbytes):
    with PinnedPool(1 << 30, method=method) as p:
        s = p.slab(nbytes)
        st = p.stats()
        assert s.pinned and st.pinned and st.pinned_bytes / st.requested_bytes <= 1.02
        host = s.view(torch.float32)
        assert host.is_pinned()
        host.copy_(torch.arange(host.numel(), dtype=torch.float32))
        dev = host.to("cuda", non_blocking=True)
        back = s.alloc(PAGE * 16) if method == "register" else None
        torch.cuda.synchronize()
        assert torch.equal(dev.cpu(), host)
        if back is not None:
            back.view(torch.float32).copy_(dev[:PAGE * 4], non_blocking=True)
            torch.cuda.synchronize()
            assert torch.equal(back.view(torch.float32), host[:PAGE * 4])
            back.free()
        kept = s.view(torch.uint8, 16)
    if method == "register":  # close() unpinned it; the view itself stays valid memory
        assert not kept.is_pinned()
    assert kept.sum().item() >= 0
    del kept


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_event_guards_region_reuse():
    with PinnedPool(1 << 30) as p:
        s = p.slab(16 * MiB)
        r = s.alloc(16 * MiB)
        src = torch.ones(4 * MiB, device="cuda")
        torch.cuda._sleep(200_000_000)  # keep the stream busy so the event is still pending
        r.view(torch.float32).copy_(src, non_blocking=True)
        ev = torch.cuda.Event()
        ev.record()
        r.free(ev)
        with pytest.raises(SlabFullError, match="waiting on events"):
            s.alloc(PAGE)
        ev.synchronize()
        assert s.alloc(16 * MiB).view(torch.float32).sum().item() == 4 * MiB
