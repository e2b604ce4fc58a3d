"""NVMe engine: extent planning (pure) and the extent-file executor (threads backend).

CPU only and fast: small files under tmp_path, block_size of a few KiB so an item
spans several requests.  Both I/O paths run: O_DIRECT where tmp_path's filesystem
allows it (direct=None) and buffered (direct=False).  No wall-clock thresholds.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import stat
import sys
import threading

import pytest
import torch

from tierlift.errors import TierliftError
from tierlift.offload import nvme
from tierlift.offload.extents import IO_ALIGN, ExtentPlan, plan_extents
from tierlift.offload.nvme import ChecksumError, NVMeError, NVMeFile, aligned_empty
from tierlift.offload.policy import AioConfig

BS = 8192  # bytes per request in these tests: every item above 8 KiB is split
SIZES = {(0, "param"): 1, (0, "exp_avg"): 4095, (0, "exp_avg_sq"): 4096, (1, "param"): 4097,
         (1, "exp_avg"): 3 * BS + 123, (1, "exp_avg_sq"): 2 * BS, (2, "bf16"): 0}


def _aio(threads: int = 1, block_size: int = BS) -> AioConfig:
    # threads=1 -> one worker, strictly serial; otherwise threads x 2 workers
    return AioConfig(block_size=block_size, queue_depth=1 if threads == 1 else 2, threads=threads)


def _random_bytes(n: int, seed: int) -> torch.Tensor:
    buf = aligned_empty(n)
    g = torch.Generator().manual_seed(seed)
    buf.copy_(torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g))
    return buf


def _plan() -> ExtentPlan:
    return plan_extents(list(SIZES.items()))


def _open(tmp_path, threads=1, direct=None, **kw) -> NVMeFile:
    return NVMeFile(str(tmp_path / "nvme"), 3, kw.pop("plan", None) or _plan(), _aio(threads, kw.pop("bs", BS)),
                    direct=direct, **kw)


# ----------------------------------------------------------------------- plan (pure)

def test_plan_aligned_ordered_no_overlap():
    plan = _plan()
    pos = 0
    for (key, n), e in zip(SIZES.items(), plan):
        assert e.key == key and e.nbytes == n
        assert e.offset == pos and e.offset % IO_ALIGN == 0 and e.padded % IO_ALIGN == 0
        assert n <= e.padded < n + IO_ALIGN or (n == 0 and e.padded == 0)
        pos = e.end
    assert plan.file_bytes == pos == sum(e.padded for e in plan)
    assert plan.payload_bytes == sum(SIZES.values())
    assert plan[(1, "param")].padded == 2 * IO_ALIGN and (9, "x") not in plan
    with pytest.raises(KeyError, match="no extent"):
        plan[(9, "x")]


def test_plan_larger_align_and_bad_input():
    plan = plan_extents([("a", 10), ("b", 1 << 20)], align=1 << 20)
    assert [(e.offset, e.padded) for e in plan] == [(0, 1 << 20), (1 << 20, 1 << 20)]
    with pytest.raises(ValueError, match="multiple of 4096"):
        plan_extents([("a", 1)], align=512)
    with pytest.raises(ValueError, match="duplicate"):
        plan_extents([("a", 1), ("a", 2)])
    with pytest.raises(ValueError, match=">= 0"):
        plan_extents([("a", -1)])


@pytest.mark.parametrize("bs", [4096, BS, 3 * 4096, 1 << 20])
def test_requests_split_extent(bs):
    plan = _plan()
    for e in plan:
        reqs = plan.requests(e.key, bs)
        pos = 0
        for fo, bo, n in reqs:
            assert bo == pos and fo == e.offset + bo
            assert fo % IO_ALIGN == 0 and bo % IO_ALIGN == 0 and n % IO_ALIGN == 0 and 0 < n <= bs
            pos += n
        assert pos == e.padded
    with pytest.raises(ValueError, match="block_size"):
        plan.requests((0, "param"), 1000)


def test_plan_json_round_trip():
    plan = _plan()
    d = json.loads(json.dumps(plan.to_json({(0, "param"): {"x": 1}})))
    back, sums = ExtentPlan.from_json(d)
    assert back.same_layout(plan) and sums == {(0, "param"): {"x": 1}}
    d["extents"][1]["offset"] += 1
    with pytest.raises(ValueError, match="aligned"):
        ExtentPlan.from_json(d)


def test_aligned_empty():
    for n in (0, 1, 4095, 4096, 12345):
        t = aligned_empty(n)
        assert t.dtype == torch.uint8 and t.numel() == n
        assert n == 0 or t.data_ptr() % IO_ALIGN == 0


# ----------------------------------------------------------------------- executor

@pytest.mark.parametrize("direct", [None, False])
@pytest.mark.parametrize("threads", [1, 4])
def test_round_trip(tmp_path, threads, direct):
    data = {k: _random_bytes(n, i) for i, (k, n) in enumerate(SIZES.items())}
    with _open(tmp_path, threads, direct) as f:
        assert direct is None or f.direct is False
        for h in [f.write(k, t) for k, t in data.items()]:
            h.wait(60)
        outs = {k: aligned_empty(n) for k, n in SIZES.items()}  # exact size: the tail is bounced
        for h in [f.read(k, outs[k], verify=True) for k in data]:
            h.wait(60)
        for k in data:
            assert torch.equal(outs[k], data[k]), k
        # padded-size buffers (no bounce) and typed views read the same bytes
        e = f.plan[(1, "exp_avg")]
        big = aligned_empty(e.padded)
        f.read(e.key, big, verify=True).wait(60)
        assert torch.equal(big[:e.nbytes], data[e.key])
        e = f.plan[(1, "exp_avg_sq")]
        as_f32 = aligned_empty(e.nbytes).view(torch.float32)
        f.read(e.key, as_f32).wait(60)
        assert torch.equal(as_f32.view(torch.uint8), data[e.key])


def test_typed_tensor_write(tmp_path):
    plan = plan_extents([("bf16", 5000 * 2), ("fp32", 3000 * 4)])
    src = {"bf16": aligned_empty(10000).view(torch.bfloat16), "fp32": aligned_empty(12000).view(torch.float32)}
    src["bf16"].copy_(torch.randn(5000))
    src["fp32"].copy_(torch.randn(3000))
    with _open(tmp_path, 2, plan=plan) as f:
        for k, t in src.items():
            f.write(k, t).wait(60)
        for k, t in src.items():
            out = torch.empty_like(t)  # may be unaligned: only checked, never silently used
            if out.data_ptr() % IO_ALIGN:
                out = aligned_empty(t.numel() * t.element_size()).view(t.dtype)
            f.read(k, out, verify=True).wait(60)
            assert torch.equal(out, t)


@pytest.mark.parametrize("direct", [None, False])
def test_checksum_detects_corruption(tmp_path, direct):
    key = (1, "exp_avg")
    with _open(tmp_path, 2, direct) as f:
        f.write(key, _random_bytes(SIZES[key], 7)).wait(60)
        f.flush()
        e = f.plan[key]
        bad_at = e.offset + BS + 5  # inside the second request
        with open(f.path, "r+b") as raw:
            raw.seek(bad_at)
            b = raw.read(1)
            raw.seek(bad_at)
            raw.write(bytes([b[0] ^ 0xFF]))
            raw.flush()
            os.fsync(raw.fileno())
        with pytest.raises(ChecksumError) as ei:
            f.read(key, aligned_empty(SIZES[key]), verify=True).wait(60)
        msg = str(ei.value)
        assert repr(key) in msg and f.path in msg and f"offset {e.offset + BS}" in msg and "Fix:" in msg
        f.read(key, aligned_empty(SIZES[key])).wait(60)  # without verify the read itself succeeds
        with pytest.raises(ChecksumError, match="never written"):
            f.read((0, "param"), aligned_empty(1), verify=True).wait(60)


def test_buffer_checks(tmp_path):
    key = (1, "param")
    with _open(tmp_path) as f:
        with pytest.raises(NVMeError, match="not 4096-byte aligned") as ei:
            f.write(key, aligned_empty(SIZES[key] + 1)[1:])
        assert "aligned_empty" in str(ei.value)
        with pytest.raises(NVMeError, match="has 100 bytes"):
            f.write(key, aligned_empty(100))
        with pytest.raises(NVMeError, match="contiguous host"):
            f.read(key, aligned_empty(2 * SIZES[key])[::2])
        with pytest.raises(NVMeError, match="no extent"):
            f.write((7, "param"), aligned_empty(1))
    with pytest.raises(NVMeError, match="closed"):
        f.write(key, aligned_empty(SIZES[key]))


def test_enospc_on_preallocate(tmp_path, monkeypatch):
    def full(fd, off, n):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(NVMeError) as ei:
        _open(tmp_path, setting="offload.optimizer.path")
    msg = str(ei.value)
    need = _plan().file_bytes
    assert "offload.optimizer.path=" in msg and "tierlift-rank00003.extents" in msg
    assert f"({need} bytes)" in msg and "free" in msg and "Fix:" in msg and "cpu" in msg
    assert not os.listdir(tmp_path / "nvme")  # nothing half-made is left behind


def test_file_mode_keep_and_delete(tmp_path):
    old = os.umask(0)  # the mode must not depend on the umask
    try:
        f = _open(tmp_path)
    finally:
        os.umask(old)
    assert os.path.basename(f.path) == "tierlift-rank00003.extents"
    assert stat.S_IMODE(os.stat(f.path).st_mode) == 0o600
    assert os.path.getsize(f.path) == f.plan.file_bytes
    f.flush()
    assert stat.S_IMODE(os.stat(f.sidecar_path).st_mode) == 0o600
    f.close()
    f.close()  # idempotent
    assert not os.path.exists(f.path) and not os.path.exists(f.sidecar_path)


def test_second_opener_is_refused(tmp_path):
    with _open(tmp_path) as f:
        with pytest.raises(NVMeError, match="in use by another process"):
            _open(tmp_path)
        assert os.path.exists(f.path)  # the refused opener must not delete the owner's file


def test_reopen_existing_verifies_across_block_sizes(tmp_path):
    data = {k: _random_bytes(n, i) for i, (k, n) in enumerate(SIZES.items())}
    with _open(tmp_path, 2, keep=True) as f:
        for k, t in data.items():
            f.write(k, t)
    assert os.path.exists(f.path) and os.path.exists(f.sidecar_path)
    # checkpoint load: another process, another block size; checksums come from the sidecar
    with _open(tmp_path, 3, existing=True, verify=True, bs=3 * 4096) as g:
        assert g.keep
        for k, n in SIZES.items():
            out = aligned_empty(n)
            g.read(k, out).wait(60)
            assert torch.equal(out, data[k])
    swapped = plan_extents(list(reversed(SIZES.items())))  # same size, other layout
    with pytest.raises(NVMeError, match="different extent plan"):
        _open(tmp_path, existing=True, plan=swapped)
    bigger = plan_extents([(k, n + 4096) for k, n in SIZES.items()])
    with pytest.raises(NVMeError, match="the plan needs"):
        _open(tmp_path, existing=True, plan=bigger)
    assert os.path.exists(f.path)  # a refused reopen leaves the kept file alone


def test_checksums_are_crc32c_and_an_older_sidecar_is_refused(tmp_path):
    import json

    from tierlift.offload.nvme_integrity import ALGORITHM, checksum

    assert ALGORITHM == "crc32c" and checksum(b"123456789") == 0xE3069283  # the CRC-32C check value
    data = {k: _random_bytes(n, i) for i, (k, n) in enumerate(SIZES.items())}
    with _open(tmp_path, 2, keep=True) as f:
        for k, t in data.items():
            f.write(k, t)
    k0 = next(iter(SIZES))
    granule, sums = f.checksum_of(k0)
    assert sums[0] == checksum(memoryview(data[k0].numpy())[:min(granule, SIZES[k0])])
    doc = json.loads(open(f.sidecar_path).read())
    doc["format"] = "tierlift-extents/1"  # written by a release that kept zlib's crc32
    open(f.sidecar_path, "w").write(json.dumps(doc))
    with pytest.raises(NVMeError, match="tierlift-extents/2") as info:
        _open(tmp_path, existing=True)
    assert len(info.value.render().splitlines()) == 1
    assert os.path.exists(f.path)


def test_concurrent_different_extents(tmp_path):
    keys = [(i, kind) for i in range(6) for kind in ("param", "exp_avg", "exp_avg_sq")]
    plan = plan_extents([(k, 2 * BS + 100 * i) for i, k in enumerate(keys)])
    data = {e.key: _random_bytes(e.nbytes, i) for i, e in enumerate(plan)}
    errors: list[BaseException] = []
    with _open(tmp_path, 4, plan=plan) as f:
        def worker(my_keys):
            try:
                for k in my_keys:
                    f.write(k, data[k])
                for k in my_keys:  # no wait in between: each read is ordered after its write
                    out = aligned_empty(data[k].numel())
                    f.read(k, out, verify=True).wait(60)
                    assert torch.equal(out, data[k])
            except BaseException as e:  # noqa: BLE001
                errors.append(e)

        threads = [threading.Thread(target=worker, args=(keys[i::3],)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors, errors


def test_same_extent_is_ordered(tmp_path):
    key = (1, "exp_avg")
    a, b = _random_bytes(SIZES[key], 1), _random_bytes(SIZES[key], 2)
    with _open(tmp_path, 4) as f:
        out1, out2 = aligned_empty(SIZES[key]), aligned_empty(SIZES[key])
        hs = [f.write(key, a), f.read(key, out1, verify=True), f.write(key, b), f.read(key, out2, verify=True)]
        for h in hs:
            h.wait(60)
        assert torch.equal(out1, a) and torch.equal(out2, b)


def test_stats(tmp_path):
    with _open(tmp_path, 2) as f:
        assert f.stats().bytes_written == 0 and f.stats().write_gbps == 0.0
        for k, n in SIZES.items():
            f.write(k, _random_bytes(n, 0))
        f.wait_all()
        for k, n in SIZES.items():
            f.read(k, aligned_empty(n), verify=True).wait(60)
        s = f.stats()
    padded = f.plan.file_bytes
    nreq = sum(len(f.plan.requests(k, BS)) for k in SIZES)
    assert s.bytes_written == padded and s.bytes_read == padded
    assert s.writes == s.reads == len(SIZES) and s.requests == 2 * nreq and s.errors == 0
    assert s.bounce_bytes > 0 and s.checksum_s > 0
    assert s.write_busy_s > 0 and s.read_busy_s > 0 and s.busy_s >= max(s.read_busy_s, s.write_busy_s)
    assert s.write_gbps > 0 and s.read_gbps > 0 and s.as_dict()["read_gbps"] == s.read_gbps


def test_short_transfers_are_retried(tmp_path, monkeypatch):
    real_pwrite, real_preadv = os.pwrite, os.preadv
    calls = {"w": 0, "r": 0}

    def short_pwrite(fd, data, off):
        calls["w"] += 1
        mv = memoryview(data)
        return real_pwrite(fd, mv[:max(1, len(mv) // 2 + 1)], off)

    def short_preadv(fd, bufs, off):
        calls["r"] += 1
        mv = memoryview(bufs[0])
        return real_preadv(fd, [mv[:max(1, len(mv) // 3 + 1)]], off)

    key = (1, "exp_avg")
    src = _random_bytes(SIZES[key], 5)
    with _open(tmp_path, 2, direct=False) as f:
        monkeypatch.setattr(os, "pwrite", short_pwrite)
        monkeypatch.setattr(os, "preadv", short_preadv)
        f.write(key, src).wait(60)
        out = aligned_empty(SIZES[key])
        f.read(key, out, verify=True).wait(60)
    assert torch.equal(out, src)
    assert calls["w"] > len(f.plan.requests(key, BS)) and calls["r"] > len(f.plan.requests(key, BS))


def test_eio_is_reported(tmp_path, monkeypatch):
    key = (1, "exp_avg")
    with _open(tmp_path, 2) as f:
        f.write(key, _random_bytes(SIZES[key], 1)).wait(60)

        def broken(fd, data, off):
            raise OSError(errno.EIO, "Input/output error")

        monkeypatch.setattr(os, "pwrite", broken)
        with pytest.raises(NVMeError) as ei:
            f.write(key, _random_bytes(SIZES[key], 2)).wait(60)
        msg = str(ei.value)
        assert "EIO" in msg and f.path in msg and repr(key) in msg and "dmesg" in msg
        assert f.stats().errors == 1 and f.checksum_of(key) is None
        with pytest.raises(ChecksumError, match="last write failed"):
            f.read(key, aligned_empty(SIZES[key]), verify=True).wait(60)


def test_direct_fallback_and_required(tmp_path, monkeypatch, caplog):
    def refuse(fd, n):
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(nvme, "_probe_direct", refuse)
    with caplog.at_level(logging.WARNING, logger="tierlift.offload.nvme"):
        with _open(tmp_path) as f:
            assert f.direct is False
            f.write((0, "param"), _random_bytes(1, 0)).wait(60)
    assert "refuses O_DIRECT" in caplog.text
    with pytest.raises(NVMeError, match="refuses O_DIRECT"):
        _open(tmp_path, direct=True)


def test_libaio_unavailable_and_gds(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "deepspeed.ops.op_builder", None)  # import fails like a missing install
    with pytest.raises(NVMeError) as ei:
        NVMeFile(str(tmp_path), 0, _plan(), AioConfig(backend="libaio"))
    assert "offload.aio.backend='libaio'" in str(ei.value) and "backend: threads" in str(ei.value)
    assert not os.path.exists(tmp_path / "tierlift-rank00000.extents")
    with pytest.raises(NVMeError, match="use_gds"):
        NVMeFile(str(tmp_path), 0, _plan(), AioConfig(backend="libaio", use_gds=True))
    assert issubclass(NVMeError, TierliftError)


@pytest.mark.gpu  # runs on the device machine, where DeepSpeed's async_io op is built against carried libaio
def test_libaio_round_trip(tmp_path):
    data = {k: _random_bytes(n, i) for i, (k, n) in enumerate(SIZES.items())}
    aio = AioConfig(block_size=BS, queue_depth=4, threads=2, backend="libaio")
    with NVMeFile(str(tmp_path), 0, _plan(), aio) as f:
        for h in [f.write(k, t) for k, t in data.items()]:
            h.wait(120)
        for k, n in SIZES.items():
            out = aligned_empty(n)
            f.read(k, out, verify=True).wait(120)
            assert torch.equal(out, data[k]), k
        assert f.stats().bytes_read == f.plan.file_bytes


def test_split_pieces_tiles_and_aligns():
    from tierlift.offload.extents import split_pieces
    assert split_pieces(0, 1024) == []
    assert split_pieces(1000, 1024) == [(0, 1000)]
    ps = split_pieces(5000, 2048)
    assert ps == [(0, 2048), (2048, 4096), (4096, 5000)]
    assert all(lo * 4 % 4096 == 0 for lo, _ in ps)  # fp32 pieces start 4 KiB-aligned
    with pytest.raises(ValueError, match="piece_numel"):
        split_pieces(10, 0)


def test_state_store_pieces_round_trip_and_read_after_write(tmp_path):
    """Whole-chunk writes land piece by piece; a piece read right after its write
    (still in flight) sees the new bytes."""
    from tierlift.offload.nvme import aligned_empty
    from tierlift.offload.nvme_state import NVMeStateStore
    from tierlift.offload.policy import AioConfig

    def alloc(sizes):
        return [aligned_empty(n) for n in sizes], lambda: None

    store = NVMeStateStore(str(tmp_path), 0, [5000, 1024], ("master", "exp_avg"), AioConfig(), alloc,
                           buffer_count=2, piece_numel=2048, setting="test")
    store.ensure_staging(5000)
    assert store.staging_numel == 2048 and store.pieces[0] == [(0, 2048), (2048, 4096), (4096, 5000)]
    full = [aligned_empty(5000 * 4).view(torch.float32).copy_(torch.arange(5000) + 10_000 * k) for k in range(2)]
    store.write_chunk(0, full)
    st = store.start_read(0, 2048, 4096)
    master, avg = store.wait_read(st)
    assert torch.equal(master, full[0][2048:4096]) and torch.equal(avg, full[1][2048:4096])
    master.add_(1.0)
    store.start_write(st)                      # write-behind...
    st2 = store.start_read(0, 2048, 4096)      # ...then read the same piece again
    assert torch.equal(store.wait_read(st2)[0], full[0][2048:4096] + 1.0)
    store.start_write(st2)
    back = [aligned_empty(5000 * 4).view(torch.float32) for _ in range(2)]
    store.read_chunk(0, back)
    assert torch.equal(back[0][:2048], full[0][:2048]) and torch.equal(back[0][2048:4096], full[0][2048:4096] + 1.0)
    store.close()
