"""Checkpoints on disk are confined and checked: links and manifest entries never make
tierlift read or delete outside the run; a malformed file is one line naming it (exit 2
from the CLI); an unusable newest checkpoint is skipped with a warning saying why."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import pickle
import shutil
import struct

import pytest
import torch
import yaml
from safetensors.torch import save_file

from tierlift.errors import CheckpointError
from tierlift.launch.cli import main
from tierlift.parallel.comm import LocalComm
from tierlift.runtime.checkpoint import (StateSegment, latest_checkpoint, load_checkpoint, read_manifest,
                                         save_checkpoint, verify_files)
from tierlift.runtime.checkpoint_check import check_trainer_extra

SHAPES = {"w": (4, 8), "b": (8,)}


def _segments(fill: float = 0.0) -> list[StateSegment]:
    return [StateSegment(n, s, 0, math.prod(s), {"param": torch.full((math.prod(s),), fill),
                                                  "exp_avg": torch.full((math.prod(s),), -fill)})
            for n, s in SHAPES.items()]


def _save(path, step: int = 1, keep=None, extra=None) -> str:
    return save_checkpoint(path, _segments(float(step)), comm=LocalComm(), keep=keep,
                           extra={"step": step} if extra is None else extra)


def _load(path, **kw):
    segs = _segments()
    load_checkpoint(path, segs, comm=LocalComm(), **kw)
    return segs


@pytest.fixture
def warnings_seen():
    """Records of the checkpoint logger, whatever handlers earlier tests configured."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("tierlift.checkpoint")
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)


def _edit_manifest(ckpt, fn) -> None:
    path = os.path.join(ckpt, "manifest.json")
    with open(path, encoding="utf-8") as f:
        m = json.load(f)
    fn(m)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(m, f)


def _replace_rank_file(ckpt, data: bytes) -> None:
    """Put ``data`` in place of rank 0's file and make the manifest agree (size and
    sha256), so that only the file's contents are wrong."""
    with open(os.path.join(ckpt, "rank-00000.safetensors"), "wb") as f:
        f.write(data)

    def fix(m):
        m["files"][0]["bytes"] = len(data)
        m["files"][0]["sha256"] = hashlib.sha256(data).hexdigest()
    _edit_manifest(ckpt, fix)


def _cli(capsys, *args) -> tuple[int, str]:
    rc = main(list(args))
    return rc, capsys.readouterr().err


def _one_error_line(err: str) -> str:
    assert "Traceback" not in err and "tierlift bug" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("tierlift: error:")]
    assert len(lines) == 1, err
    return lines[0]


# ----------------------------------------------------------------------------- links and confinement

def test_rotation_and_cleanup_never_delete_through_links(tmp_path):
    outside = tmp_path / "elsewhere" / "step-00000001"
    _save(outside)
    before = {n: (outside / n).read_bytes() for n in os.listdir(outside)}
    ck = tmp_path / "run" / "checkpoints"
    ck.mkdir(parents=True)
    os.symlink(outside, ck / "step-00000001")
    os.symlink(outside, ck / "step-00000002.tmp-0123456789abcdef")  # named like a stale save
    for step in (3, 4, 5):
        _save(ck / f"step-{step:08d}", step, keep=1)
    assert {n: (outside / n).read_bytes() for n in os.listdir(outside)} == before
    assert sorted(os.listdir(ck)) == ["step-00000001", "step-00000002.tmp-0123456789abcdef", "step-00000005"]
    assert (ck / "step-00000001").is_symlink()


def test_saving_over_a_linked_step_dir_is_refused(tmp_path):
    outside = tmp_path / "elsewhere" / "step-00000001"
    _save(outside)
    ck = tmp_path / "run" / "checkpoints"
    ck.mkdir(parents=True)
    os.symlink(outside, ck / "step-00000002")
    with pytest.raises(CheckpointError, match="not a tierlift checkpoint"):
        _save(ck / "step-00000002", 2)
    assert read_manifest(outside)["extra"] == {"step": 1}


def test_newest_linked_step_dir_is_skipped_with_a_warning(tmp_path, warnings_seen):
    run = tmp_path / "run"
    good = _save(run / "checkpoints" / "step-00000001")
    outside = _save(tmp_path / "elsewhere" / "step-00000009", 9)
    os.symlink(outside, run / "checkpoints" / "step-00000009")
    assert latest_checkpoint(run) == good
    msgs = [r.getMessage() for r in warnings_seen]
    assert any("step-00000009" in m and "symbolic link" in m and "using step-00000001" in m for m in msgs), msgs


@pytest.mark.parametrize("where", ["relative", "absolute", "linked"])
def test_rank_file_outside_the_checkpoint_is_refused(tmp_path, capsys, where):
    ckpt = _save(tmp_path / "run" / "checkpoints" / "step-00000001")
    stolen = tmp_path / "x.safetensors"  # a valid file outside the checkpoint
    shutil.copy(os.path.join(ckpt, "rank-00000.safetensors"), stolen)
    if where == "linked":
        os.unlink(os.path.join(ckpt, "rank-00000.safetensors"))
        os.symlink(stolen, os.path.join(ckpt, "rank-00000.safetensors"))
        expect = "symbolic link"
    else:
        entry = "../../../x.safetensors" if where == "relative" else str(stolen)
        _edit_manifest(ckpt, lambda m: m["files"][0].update(file=entry))
        expect = "plain names"
    with pytest.raises(CheckpointError, match=expect):
        _load(ckpt)
    with pytest.raises(CheckpointError, match=expect):
        verify_files(ckpt, read_manifest(ckpt))
    rc, err = _cli(capsys, "export", ckpt, "--out", str(tmp_path / "out"))
    assert rc == 2
    _one_error_line(err)
    assert not (tmp_path / "out" / "model.safetensors").exists()


# ----------------------------------------------------------------------------- malformed files

def _pickle(ckpt):
    _replace_rank_file(ckpt, pickle.dumps({"w": torch.zeros(32)}))


def _bad_header(ckpt):
    _replace_rank_file(ckpt, struct.pack("<Q", 16) + b"{not json at all" + bytes(64))


def _missing_tensor(ckpt):
    tmp = os.path.join(ckpt, "..", "other.safetensors")
    save_file({"param::w::0": torch.zeros(32)}, tmp)
    with open(tmp, "rb") as f:
        _replace_rank_file(ckpt, f.read())
    os.unlink(tmp)


def _string_shape(ckpt):
    _edit_manifest(ckpt, lambda m: m["params"]["w"].update(shape=["4", "8"]))


def _huge_shape(ckpt):
    _edit_manifest(ckpt, lambda m: m["params"]["w"].update(shape=[10 ** 9, 10 ** 9]))


def _bad_piece(ckpt):
    _edit_manifest(ckpt, lambda m: m["files"][0]["pieces"][0].update(lo="zero"))


DAMAGE = {  # what is done -> what the one line must say
    "pickle": (_pickle, "is not a safetensors file"),
    "bad_header": (_bad_header, "header is not JSON"),
    "missing_tensor": (_missing_tensor, "has no tensor"),
    "string_shape": (_string_shape, "shape ['4', '8']"),
    "huge_shape": (_huge_shape, "hold elements [0, 32) of it only"),
    "bad_piece": (_bad_piece, "malformed piece"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_malformed_checkpoint_is_one_line_naming_the_file(tmp_path, capsys, warnings_seen, damage):
    do, says = DAMAGE[damage]
    run = tmp_path / "run"
    ckpt = _save(run / "checkpoints" / "step-00000001")
    do(ckpt)
    with pytest.raises(CheckpointError) as ei:
        _load(ckpt)
    assert says in str(ei.value) and ckpt in str(ei.value), str(ei.value)
    for i, target in enumerate((ckpt, str(run))):  # one checkpoint dir, or the run dir (newest checkpoint)
        rc, err = _cli(capsys, "export", target, "--out", str(tmp_path / f"out{i}"))
        assert rc == 2, err
        assert not os.listdir(tmp_path / f"out{i}") if os.path.exists(tmp_path / f"out{i}") else True
        line = _one_error_line(err)
        said = [line] + [r.getMessage() for r in warnings_seen]
        assert any(says in s and ckpt in s for s in said), said


@pytest.mark.parametrize("extra,says", [({}, "'extra.step' None"), ({"step": "abc"}, "'extra.step' 'abc'"),
                                        ({"step": 3, "engine": []}, "'extra.engine' []")])
def test_trainer_extra_is_checked_before_any_state_is_read(tmp_path, extra, says):
    ckpt = _save(tmp_path / "step-00000001", extra=extra)
    segs = _segments(fill=7.0)
    with pytest.raises(CheckpointError, match="manifest.json has " + says.replace("[", r"\[").replace("]", r"\]")):
        load_checkpoint(ckpt, segs, comm=LocalComm(), check_extra=check_trainer_extra)
    assert all(abs(float(t[0])) == 7.0 for s in segs for t in s.tensors.values() if t.numel()), "state was touched"


# ----------------------------------------------------------------------------- through `tierlift train --resume`

CFG = {
    "model": {"kind": "gpt", "vocab_size": 64, "d_model": 32, "n_layers": 1, "n_heads": 4, "max_seq_len": 16},
    "data": {"source": "synthetic", "seq_len": 16, "synthetic_samples": 256},
    "train": {"micro_batch_size": 2, "max_steps": 4, "checkpoint_every": 2, "log_every": 2},
    "run": {"device": "cpu", "backend": "local", "nproc": 1},
}


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A 4-step run with checkpoints at steps 2 and 4 (copied by each test)."""
    d = tmp_path_factory.mktemp("trained")
    cfg = d / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(CFG))
    assert main(["train", str(cfg), "--run-dir", str(d / "run")]) == 0
    return d


def _copy_run(trained_run, tmp_path):
    shutil.copytree(trained_run / "run", tmp_path / "run", symlinks=True)
    return str(trained_run / "cfg.yaml"), tmp_path / "run"


@pytest.mark.parametrize("damage", ["empty_extra", "string_step", "pickle"])
def test_resume_from_a_malformed_checkpoint_is_one_line(trained_run, tmp_path, capsys, damage):
    cfg, run = _copy_run(trained_run, tmp_path)
    ckpt = str(run / "checkpoints" / "step-00000004")
    if damage == "empty_extra":
        _edit_manifest(ckpt, lambda m: m.update(extra={}))
    elif damage == "string_step":
        _edit_manifest(ckpt, lambda m: m["extra"].update(step="four"))
    else:
        _pickle(ckpt)
    capsys.readouterr()
    rc, err = _cli(capsys, "train", cfg, "--run-dir", str(run), "--resume")
    assert rc == 2, err
    line = _one_error_line(err)
    assert ckpt in line, line


def test_unusable_newest_checkpoint_is_skipped_with_a_warning(trained_run, tmp_path, capsys, warnings_seen):
    cfg, run = _copy_run(trained_run, tmp_path)
    newest = run / "checkpoints" / "step-00000004"
    with open(newest / "rank-00000.safetensors", "r+b") as f:
        f.truncate(100)
    capsys.readouterr()
    rc, err = _cli(capsys, "export", str(run), "--out", str(tmp_path / "out"))
    assert rc == 0, err
    msgs = [r.getMessage() for r in warnings_seen]
    want = [m for m in msgs if str(newest) in m and "has 100 bytes" in m and "using step-00000002" in m]
    assert want, msgs
    warnings_seen.clear()
    again = tmp_path / "again"  # a fresh path: a process reports each skipped checkpoint once
    shutil.copytree(run, again, symlinks=True)
    rc, err = _cli(capsys, "train", cfg, "--run-dir", str(again), "--resume")
    assert rc == 0, err
    msgs = [r.getMessage() for r in warnings_seen]
    assert any(str(again / "checkpoints" / "step-00000004") in m and "using step-00000002" in m for m in msgs), msgs
    with open(again / "summary.json", encoding="utf-8") as f:
        assert json.load(f)["start_step"] == 2  # resumed from the older checkpoint
