"""Checkpoint save / load / resharding / crash safety / export (CPU, threads as ranks)."""

from __future__ import annotations

import errno
import hashlib
import importlib
import json
import os
import pickle
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from tierlift.errors import CheckpointError
from tierlift.parallel.comm import Comm, LocalComm
from tierlift.layout import UnitSpec, plan_chunks
from tierlift.runtime import checkpoint as ckpt_mod
from tierlift.runtime import checkpoint_io, export as export_mod
from tierlift.runtime.checkpoint import (StateSegment, latest_checkpoint, load_checkpoint, read_manifest,
                                         rotate_checkpoints, save_checkpoint)
from tierlift.runtime.export import export_safetensors

REPO = Path(__file__).resolve().parents[1]
ADAMW = ("param", "exp_avg", "exp_avg_sq")
SGD = ("param", "momentum")


# ----------------------------------------------------------------------------- fake ranks

class ThreadComm(Comm):
    """Comm for ranks simulated by threads of one process (shared slots + a barrier)."""

    def __init__(self, rank: int, world_size: int, shared: dict) -> None:
        self.rank, self.world_size, self._s = rank, world_size, shared

    @classmethod
    def group(cls, world_size: int) -> list[ThreadComm]:
        # The barrier timeout turns a protocol bug (a rank skipping a collective)
        # into a failing test instead of a hang.
        shared = {"barrier": threading.Barrier(world_size, timeout=120), "slots": [None] * world_size}
        return [cls(r, world_size, shared) for r in range(world_size)]

    def barrier(self) -> None:
        self._s["barrier"].wait()

    def all_gather_object(self, obj):
        self._s["slots"][self.rank] = obj
        self.barrier()
        out = list(self._s["slots"])
        self.barrier()  # nobody overwrites a slot before everyone has read it
        return out

    def broadcast_object(self, obj, src: int = 0):
        if self.rank == src:
            self._s["slots"][src] = obj
        self.barrier()
        out = self._s["slots"][src]
        self.barrier()
        return out

    def all_reduce_sum(self, value: float) -> float:
        return float(sum(self.all_gather_object(value)))


def run_ranks(world: int, fn):
    """Run fn(comm) on ``world`` threads; returns (results, exceptions) per rank."""
    comms = ThreadComm.group(world)
    results, errors = [None] * world, [None] * world

    def body(r):
        try:
            results[r] = fn(comms[r])
        except BaseException as e:  # noqa: BLE001 - reported to the test
            # No barrier.abort() here: a rank raising after the last collective
            # would break peers still waking from it; the barrier timeout covers hangs.
            errors[r] = e

    threads = [threading.Thread(target=body, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, errors


def run_ok(world: int, fn):
    results, errors = run_ranks(world, fn)
    for e in errors:
        if e is not None:
            raise e
    return results


# ----------------------------------------------------------------------------- model state

PARAMS = {  # registration order, as the engine would see it
    "embed.weight": (37, 12),
    "blocks.0.attn.weight": (12, 12),
    "blocks.0.attn.bias": (12,),
    "blocks.0.mlp.weight": (24, 12),
    "blocks.1.attn.weight": (12, 12),
    "blocks.1.attn.bias": (12,),
    "blocks.1.mlp.weight": (24, 12),
    "norm.weight": (12,),
}
ALIASES = {"lm_head.weight": "embed.weight"}


def units(params=PARAMS):
    groups: dict[str, list] = {}
    for name, shape in params.items():
        unit = ".".join(name.split(".")[:2]) if name.startswith("blocks.") else ""
        groups.setdefault(unit, []).append((name, shape))
    return [UnitSpec(u, tuple(ps)) for u, ps in groups.items()]


def full_state(seed: int = 0, params=PARAMS, kinds=ADAMW) -> dict[str, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return {k: {n: torch.randn(*s, generator=g) for n, s in params.items()} for k in kinds}


def make_segments(rank: int, world: int, state=None, params=PARAMS, kinds=ADAMW) -> list[StateSegment]:
    """This rank's pieces as the engine lays them out (small alignment so that
    parameters straddle rank boundaries); zeros when ``state`` is None."""
    layout = plan_chunks(units(params), world, align_bytes=64)
    segs = []
    for s in layout.segments(rank):
        tensors = {}
        for k in kinds:
            src = state[k][s.param.name].reshape(-1)[s.param_lo:s.param_hi] if state else None
            tensors[k] = src.clone() if src is not None else torch.zeros(s.param_hi - s.param_lo)
        segs.append(StateSegment(s.param.name, s.param.shape, s.param_lo, s.param_hi, tensors))
    return segs


def assemble(seg_lists, params=PARAMS, kinds=ADAMW) -> dict[str, dict[str, torch.Tensor]]:
    out = {k: {n: torch.full((torch.Size(s).numel(),), float("nan")) for n, s in params.items()} for k in kinds}
    for segs in seg_lists:
        for s in segs:
            for k, t in s.tensors.items():
                out[k][s.name][s.param_lo:s.param_hi] = t
    return {k: {n: t.reshape(params[n]) for n, t in d.items()} for k, d in out.items()}


def save_world(path, world, state, extra=None, rank_tensors=True, keep=None, kinds=ADAMW, params=PARAMS):
    def fn(comm):
        rt = {"cpu_rng": torch.get_rng_state(), "marker": torch.tensor([comm.rank, 7], dtype=torch.int64)}
        return save_checkpoint(path, make_segments(comm.rank, world, state, params, kinds), comm=comm,
                               extra=extra if extra is not None else {"step": 5, "loss_scale": 1024.0},
                               rank_tensors=rt if rank_tensors else None, aliases=ALIASES, keep=keep)
    return run_ok(world, fn)[0]


def load_world(path, world, params=PARAMS, kinds=ADAMW, **kw):
    segs = [make_segments(r, world, None, params, kinds) for r in range(world)]
    res = run_ok(world, lambda comm: load_checkpoint(path, segs[comm.rank], comm=comm, **kw))
    return assemble(segs, params, kinds), res


def assert_state_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        for n in a[k]:
            assert torch.equal(a[k][n], b[k][n]), (k, n)


# ----------------------------------------------------------------------------- round trips

@pytest.mark.parametrize("save_w,load_w", [(1, 1), (2, 2), (2, 3), (3, 1), (1, 4)])
def test_round_trip_and_resharding(tmp_path, save_w, load_w):
    state = full_state(seed=save_w * 10 + load_w)
    path = save_world(tmp_path / "run" / "checkpoints" / "step-00000005", save_w, state)
    loaded, results = load_world(path, load_w)
    assert_state_equal(loaded, state)
    for rank, (extra, rank_tensors) in enumerate(results):
        assert extra == {"step": 5, "loss_scale": 1024.0}
        if save_w == load_w:  # rank-local state only comes back at the same world size
            assert rank_tensors["marker"].tolist() == [rank, 7]
            assert rank_tensors["cpu_rng"].dtype == torch.uint8
        else:
            assert rank_tensors == {}


def test_pieces_from_several_files_and_small_io_slices(tmp_path, monkeypatch):
    # Slices of 64 bytes force every read/write through many bounded pieces.
    monkeypatch.setattr(checkpoint_io, "IO_PIECE_BYTES", 64)
    state = full_state(seed=3)
    path = save_world(tmp_path / "c", 3, state)
    m = read_manifest(path)
    holders = {f["rank"] for f in m["files"] for p in f["pieces"] if p["name"] == "blocks.0.mlp.weight"}
    assert len(holders) >= 2  # the test exercises a parameter split over rank files
    loaded, _ = load_world(path, 2)
    assert_state_equal(loaded, state)


def test_manifest_contents_and_files(tmp_path):
    path = save_world(tmp_path / "run" / "checkpoints" / "step-00000001", 2, full_state(), extra={"step": 1})
    m = read_manifest(path)
    assert m["format_version"] == 1 and m["world_size"] == 2
    # chunk order (the engine's registration order) survives merging the ranks' lists
    assert list(m["params"]) == [p.name for c in plan_chunks(units(), 2, align_bytes=64) for p in c.params]
    assert {n: tuple(v["shape"]) for n, v in m["params"].items()} == PARAMS
    assert m["aliases"] == ALIASES and m["extra"] == {"step": 1} and m["created"]
    for f in m["files"]:
        p = Path(path) / f["file"]
        assert p.stat().st_size == f["bytes"]
        assert hashlib.sha256(p.read_bytes()).hexdigest() == f["sha256"]
        assert not p.stat().st_mode & 0o002  # never world-writable
        with safe_open(str(p), framework="pt") as sf:
            keys = set(sf.keys())
        assert keys == {f"{k}::{pc['name']}::{pc['lo']}" for pc in f["pieces"] for k in pc["kinds"]} | \
            {"rank::" + k for k in f["rank_tensors"]}
    assert sorted(os.listdir(Path(path).parent)) == ["step-00000001"]  # no temp dirs left


def test_overwrite_existing_checkpoint_swaps(tmp_path):
    path = tmp_path / "checkpoints" / "step-00000002"
    save_world(path, 2, full_state(seed=1), extra={"v": 1})
    save_world(path, 2, full_state(seed=2), extra={"v": 2})
    loaded, results = load_world(path, 2)
    assert_state_equal(loaded, full_state(seed=2))
    assert results[0][0] == {"v": 2}
    assert sorted(os.listdir(path.parent)) == ["step-00000002"]


def test_refuses_to_replace_a_foreign_directory(tmp_path):
    target = tmp_path / "notes"
    target.mkdir()
    (target / "important.txt").write_text("x")
    with pytest.raises(CheckpointError, match="not a tierlift checkpoint"):
        save_world(target, 1, full_state())
    assert (target / "important.txt").read_text() == "x"


# ----------------------------------------------------------------------------- errors

def test_flipped_byte_is_detected(tmp_path):
    path = Path(save_world(tmp_path / "c", 2, full_state()))
    f = path / "rank-00001.safetensors"
    data = bytearray(f.read_bytes())
    data[-3] ^= 0x10  # inside the tensor data: still parses, only the checksum can tell
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt") as ei:
        load_world(path, 2)
    assert "rank-00001.safetensors" in str(ei.value) and ei.value.fix
    load_world(path, 2, verify=False)  # the bytes are readable; verification is what catches it


def test_manifest_missing_or_corrupt(tmp_path):
    path = Path(save_world(tmp_path / "c", 1, full_state()))
    (path / "manifest.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON") as ei:
        read_manifest(path)
    assert str(path / "manifest.json") in str(ei.value)
    (path / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="does not exist"):
        read_manifest(path)
    assert latest_checkpoint(path) is None


def test_shape_mismatch_names_parameter_and_shapes(tmp_path):
    path = save_world(tmp_path / "c", 2, full_state())
    other = dict(PARAMS, **{"blocks.1.mlp.weight": (32, 12)})
    with pytest.raises(CheckpointError) as ei:
        load_world(path, 2, params=other)
    msg = str(ei.value)
    assert "blocks.1.mlp.weight" in msg and "(24, 12)" in msg and "(32, 12)" in msg and ei.value.fix


def test_missing_parameter(tmp_path):
    path = save_world(tmp_path / "c", 1, full_state())
    other = dict(PARAMS, **{"extra.weight": (4, 4)})
    with pytest.raises(CheckpointError, match="'extra.weight'.*not in the checkpoint"):
        load_world(path, 2, params=other)


def test_missing_kind_sgd_checkpoint_into_adamw(tmp_path):
    state = full_state(kinds=SGD)
    path = save_world(tmp_path / "c", 2, state, kinds=SGD)
    with pytest.raises(CheckpointError) as ei:
        load_world(path, 2, kinds=ADAMW)
    msg = str(ei.value)
    assert "exp_avg" in msg and "momentum" in msg and "kinds=('param',)" in ei.value.fix
    # weights only: the optimizer state starts fresh
    segs = [make_segments(r, 3, None, PARAMS, ADAMW) for r in range(3)]
    run_ok(3, lambda comm: load_checkpoint(path, segs[comm.rank], comm=comm, kinds=("param",)))
    got = assemble(segs)
    for n in PARAMS:
        assert torch.equal(got["param"][n], state["param"][n])
        assert torch.equal(got["exp_avg"][n], torch.zeros(PARAMS[n]))


def test_load_via_alias_name(tmp_path):
    # A model whose engine stores the tied weight under the alias still loads.
    state = full_state()
    path = save_world(tmp_path / "c", 1, state)
    seg = StateSegment("lm_head.weight", PARAMS["embed.weight"], 0, 37 * 12, {"param": torch.zeros(37 * 12)})
    load_checkpoint(path, [seg], comm=LocalComm())
    assert torch.equal(seg.tensors["param"], state["param"]["embed.weight"].reshape(-1))


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EIO])
def test_disk_full_leaves_previous_intact(tmp_path, monkeypatch, code):
    parent = tmp_path / "run" / "checkpoints"
    prev = save_world(parent / "step-00000001", 2, full_state(seed=1), extra={"v": 1})
    real_write = checkpoint_io._write_all
    calls = {"n": 0}
    lock = threading.Lock()

    def failing_write(fd, data):
        with lock:
            calls["n"] += 1
            n = calls["n"]
        if n > 6:  # some bytes reach the disk first, as on a real full disk
            raise OSError(code, os.strerror(code))
        real_write(fd, data)

    monkeypatch.setattr(checkpoint_io, "_write_all", failing_write)
    for target in (parent / "step-00000002", parent / "step-00000001"):  # new dir, and replacing the old one
        calls["n"] = 0
        _, errors = run_ranks(2, lambda comm: save_checkpoint(
            target, make_segments(comm.rank, 2, full_state(seed=2)), comm=comm, extra={"v": 2}))
        assert all(isinstance(e, CheckpointError) for e in errors), errors
        own = [e for e in errors if ("disk full" if code == errno.ENOSPC else "I/O error") in e.message]
        assert own, [str(e) for e in errors]
        assert own[0].setting == "checkpoint dir" and f"previous checkpoint at {prev}" in own[0].fix
        assert sorted(os.listdir(parent)) == ["step-00000001"]  # temp dir removed, nothing half-written
    monkeypatch.setattr(checkpoint_io, "_write_all", real_write)
    assert latest_checkpoint(tmp_path / "run") == prev
    loaded, results = load_world(prev, 2)
    assert_state_equal(loaded, full_state(seed=1))
    assert results[0][0] == {"v": 1}


def test_bug_on_one_rank_fails_all_ranks_without_hanging(tmp_path):
    def fn(comm):
        segs = make_segments(comm.rank, 2, full_state())
        if comm.rank == 1:
            segs[0].tensors["param"] = torch.zeros(3)  # wrong length: an engine bug
        return save_checkpoint(tmp_path / "c", segs, comm=comm, extra={})
    _, errors = run_ranks(2, fn)
    assert isinstance(errors[1], ValueError)
    assert isinstance(errors[0], CheckpointError) and "rank 1" in str(errors[0])
    assert not (tmp_path / "c").exists() and os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------- finding / rotation

def test_rotation_keeps_newest(tmp_path):
    run = tmp_path / "run"
    for step in range(1, 6):
        save_world(run / "checkpoints" / f"step-{step:08d}", 2, full_state(seed=step), extra={"step": step}, keep=2)
    assert sorted(os.listdir(run / "checkpoints")) == ["step-00000004", "step-00000005"]
    assert latest_checkpoint(run) == str((run / "checkpoints" / "step-00000005").absolute())
    assert rotate_checkpoints(run / "checkpoints", 1) == [str((run / "checkpoints" / "step-00000004").absolute())]
    assert os.listdir(run / "checkpoints") == ["step-00000005"]
    with pytest.raises(CheckpointError, match="keep_checkpoints"):
        rotate_checkpoints(run / "checkpoints", 0)


def test_latest_checkpoint_skips_incomplete_and_stale(tmp_path):
    run = tmp_path / "run"
    assert latest_checkpoint(run) is None
    good = save_world(run / "checkpoints" / "step-00000010", 1, full_state())
    # leftovers of interrupted saves: a temp dir (even a complete-looking one), a
    # step dir without manifest, one with a missing rank file
    stale = run / "checkpoints" / "step-00000030.tmp-0123456789abcdef"
    stale.mkdir()
    for f in os.listdir(good):
        (stale / f).write_bytes((Path(good) / f).read_bytes())
    (run / "checkpoints" / "step-00000020").mkdir()
    partial = run / "checkpoints" / "step-00000015"
    partial.mkdir()
    (partial / "manifest.json").write_bytes((Path(good) / "manifest.json").read_bytes())
    for arg in (run, run / "checkpoints", good):
        assert latest_checkpoint(arg) == good
    # the next save cleans the temp dir
    save_world(run / "checkpoints" / "step-00000040", 1, full_state())
    assert not stale.exists()


def test_interrupted_swap_falls_back_to_old_and_is_restored(tmp_path):
    parent = tmp_path / "checkpoints"
    good = Path(save_world(parent / "step-00000003", 1, full_state(seed=3), extra={"v": 3}))
    # crash between "rename old aside" and "rename new in"
    old = parent / "step-00000003.old-00000000000000aa"
    os.rename(good, old)
    assert latest_checkpoint(tmp_path) == str(old)
    _, res = load_world(latest_checkpoint(tmp_path), 1)
    assert res[0][0] == {"v": 3}
    save_world(parent / "step-00000004", 1, full_state(seed=4))
    assert sorted(os.listdir(parent)) == ["step-00000003", "step-00000004"]


# ----------------------------------------------------------------------------- SIGKILL

_CRASH_SCRIPT = r"""
import sys, torch
from tierlift.parallel.comm import LocalComm
from tierlift.runtime.checkpoint import StateSegment, save_checkpoint
run, version = sys.argv[1], int(sys.argv[2])
N = 1 << 19  # elements per tensor: 2 MiB fp32, 24 MiB per save
bufs = {f"p{i}": {k: torch.empty(N) for k in ("param", "exp_avg", "exp_avg_sq")} for i in range(4)}
segs = [StateSegment(n, (N,), 0, N, d) for n, d in bufs.items()]
while True:
    for i, d in enumerate(bufs.values()):
        for j, t in enumerate(d.values()):
            t.fill_(float(version))
            t[0] = i * 10 + j
    # two saves per step dir: the second replaces the first (the swap path)
    save_checkpoint(f"{run}/checkpoints/step-{version // 2:08d}", segs, comm=LocalComm(),
                    extra={"version": version}, keep=2)
    print(version, flush=True)
    version += 1
"""


@pytest.mark.slow  # four subprocesses (torch import each); no timing assertions
def test_sigkill_during_saves_leaves_a_complete_checkpoint(tmp_path):
    script = tmp_path / "saver.py"
    script.write_text(_CRASH_SCRIPT)
    run = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    rng = random.Random(1234)
    done: set[int] = set()
    start = 1
    N = 1 << 19
    for _ in range(4):
        proc = subprocess.Popen([sys.executable, str(script), str(run), str(start)], stdout=subprocess.PIPE,
                                text=True, env=env)
        try:
            for _ in range(rng.randint(1, 3)):
                line = proc.stdout.readline()
                assert line, "saver died"
                done.add(int(line))
            time.sleep(rng.uniform(0.0, 0.2))  # land somewhere inside the next save
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        done.update(int(x) for x in proc.stdout.read().split())
        proc.stdout.close()

        latest = latest_checkpoint(run)
        assert latest is not None
        segs = [StateSegment(f"p{i}", (N,), 0, N, {k: torch.empty(N) for k in ADAMW}) for i in range(4)]
        extra, _ = load_checkpoint(latest, segs, comm=LocalComm(), verify=True)
        v = extra["version"]
        # a fully written version: one that reported done, or the in-flight one if
        # its rename landed before the kill; never older than the newest done one
        assert v in done or v == max(done) + 1
        assert v >= max(done)
        for i, s in enumerate(segs):
            for j, k in enumerate(ADAMW):
                t = s.tensors[k]
                assert t[0].item() == i * 10 + j and bool((t[1:] == v).all()), (latest, k)
        start = max(done | {v}) + 1
    # the next save cleans every leftover of the killed ones
    save_world(run / "checkpoints" / "step-99999999", 1, full_state(), keep=2)
    assert all(".tmp-" not in n and ".old-" not in n and ".del-" not in n for n in os.listdir(run / "checkpoints"))


# ----------------------------------------------------------------------------- export

def test_export_sharded_bf16_and_single_fp32(tmp_path):
    state = full_state(seed=9)
    run = tmp_path / "run"
    save_world(run / "checkpoints" / "step-00000007", 2, state)
    out = tmp_path / "hf"
    files = export_safetensors(run, out, dtype="bf16", max_shard_bytes=700, show_progress=False)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = [Path(f).name for f in files[:-1]]
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert set(index["weight_map"]) == set(PARAMS) | set(ALIASES)
    assert set(index["weight_map"].values()) == set(shards)
    got = {}
    for s in shards:
        d = load_file(out / s)
        with safe_open(str(out / s), framework="pt") as sf:
            assert sf.metadata()["format"] == "pt"
        assert all(index["weight_map"][k] == s for k in d)
        got.update(d)
    assert index["metadata"]["total_size"] == sum(t.numel() * 2 for t in got.values())
    for n in PARAMS:
        assert got[n].dtype == torch.bfloat16 and got[n].shape == PARAMS[n]
        assert torch.equal(got[n], state["param"][n].to(torch.bfloat16))
    assert torch.equal(got["lm_head.weight"], got["embed.weight"])  # tied: a separate copy

    with pytest.raises(CheckpointError, match="not empty"):
        export_safetensors(run, out, show_progress=False)
    files = export_safetensors(run / "checkpoints" / "step-00000007", out, overwrite=True, show_progress=False)
    assert [Path(f).name for f in files] == ["model.safetensors"]
    assert sorted(os.listdir(out)) == ["model.safetensors"]  # stale shards and index are gone
    d = load_file(out / "model.safetensors")
    for n in PARAMS:
        assert d[n].dtype == torch.float32 and torch.equal(d[n], state["param"][n])

    with pytest.raises(CheckpointError, match="dtype"):
        export_safetensors(run, tmp_path / "x", dtype="int8", show_progress=False)
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        export_safetensors(tmp_path / "nothing", tmp_path / "y", show_progress=False)


def test_export_loads_with_hf_from_pretrained(tmp_path):
    transformers = importlib.import_module("transformers")
    cfg = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=2, n_head=2)
    torch.manual_seed(0)
    ref = transformers.GPT2LMHeadModel(cfg)
    sd = {n: p.detach().float() for n, p in ref.named_parameters()}  # tied lm_head appears once
    params = {n: tuple(t.shape) for n, t in sd.items()}
    aliases = {"lm_head.weight": "transformer.wte.weight"}
    state = {"param": sd}

    def fn(comm):
        return save_checkpoint(tmp_path / "c", make_segments(comm.rank, 2, state, params, ("param",)), comm=comm,
                               extra={}, aliases=aliases)
    run_ok(2, fn)
    out = tmp_path / "hf"
    export_safetensors(tmp_path / "c", out, dtype="fp32", max_shard_bytes=20_000, show_progress=False)
    assert (out / "model.safetensors.index.json").exists()
    cfg.save_pretrained(out)
    model = transformers.GPT2LMHeadModel.from_pretrained(out)
    for n, p in model.state_dict().items():
        if n in sd:
            assert torch.equal(p, sd[n]), n
    assert torch.equal(model.lm_head.weight, sd["transformer.wte.weight"])


# ----------------------------------------------------------------------------- no pickles

def test_loading_never_unpickles(tmp_path, monkeypatch):
    for mod in (ckpt_mod, checkpoint_io, export_mod):
        src = Path(mod.__file__).read_text()
        assert "torch.load" not in src and "import pickle" not in src and "weights_only" not in src
    path = save_world(tmp_path / "run" / "checkpoints" / "step-00000001", 2, full_state())

    def refuse(*a, **k):
        raise AssertionError("unpickling during checkpoint load")
    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    # the thread Comm passes objects in memory, so any unpickling would be the loader's
    loaded, _ = load_world(path, 3)
    assert_state_equal(loaded, full_state())
    export_safetensors(tmp_path / "run", tmp_path / "hf", show_progress=False)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_segments_round_trip(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint_io, "IO_PIECE_BYTES", 256)  # many bounded device->host copies
    state = full_state(seed=11)

    def gpu_segments(rank, world, st):
        segs = make_segments(rank, world, st)
        for s in segs:
            s.tensors = {k: t.cuda() for k, t in s.tensors.items()}
        return segs
    path = run_ok(2, lambda comm: save_checkpoint(tmp_path / "c", gpu_segments(comm.rank, 2, state),
                                                  comm=comm, extra={}))[0]
    segs = [gpu_segments(r, 3, None) for r in range(3)]
    run_ok(3, lambda comm: load_checkpoint(path, segs[comm.rank], comm=comm))
    for lst in segs:
        for s in lst:
            for t in s.tensors.values():
                assert t.is_cuda
            s.tensors = {k: t.cpu() for k, t in s.tensors.items()}
    assert_state_equal(assemble(segs), state)
