"""What a checkpoint directory holds is checked before anything is read from it.

A manifest is input like any other: a damaged or hand-edited one must give one line
naming the file and what is wrong (a :class:`CheckpointError`), never a traceback, and
must never make tierlift read outside the checkpoint.  So:

- file entries are plain ``rank-NNNNN.safetensors`` names inside the checkpoint
  directory (no ``..``, no absolute path), and the file must be a regular file, not a
  symbolic link;
- shapes are lists of non-negative integers, every piece lies inside its parameter,
  and the pieces of each (parameter, state kind) tile the whole parameter, which bounds
  every shape by the data the rank files really hold;
- a rank file's safetensors header is parsed here (bounded, JSON only) and must list
  every piece the manifest gives it, with the manifest's length, before ``safe_open``;
- the Trainer's ``extra`` (step, engine counters, data position) has the types it reads.

Pure checks and reads; nothing here writes or deletes.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
import struct
from pathlib import Path
from typing import Any

from safetensors import safe_open

from tierlift.errors import CheckpointError

__all__ = ["RANK_FILE_RE", "check_manifest", "rank_file", "check_rank_file", "open_rank_file", "check_trainer_extra",
           "link_reason"]

RANK_FILE_RE = re.compile(r"^rank-\d{5,}\.safetensors$")
_MAX_HEADER = 100 * 2**20  # bytes: safetensors' own limit on a header
_MAX_DIM = 2**48           # elements along one dimension: far past any real tensor, far below overflow
_ST_DTYPES = {"F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL"}
_FIX = "resume from (or export) an earlier checkpoint; this one is damaged or was not written by tierlift."


def _bad(where: Path | str, what: str, ckpt_dir: Path | str | None = None) -> CheckpointError:
    value = str(ckpt_dir if ckpt_dir is not None else Path(where).parent)
    return CheckpointError(f"{where} {what}", setting="checkpoint dir", value=value, fix=_FIX)


def _is_int(v: Any, lo: int = 0) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= lo


def link_reason(path: Path) -> str | None:
    """Why ``path`` must not be read or deleted as part of a checkpoint: it is a
    symbolic link (tierlift never follows links out of the run directory)."""
    if os.path.islink(path):
        return f"is a symbolic link (to {os.readlink(path)}); tierlift never reads or deletes through links"
    return None


# ----------------------------------------------------------------------------- manifest

def _check_params(m: dict, path: Path) -> dict[str, int]:
    numels = {}
    for name, spec in m["params"].items():
        shape = spec.get("shape") if isinstance(spec, dict) else None
        if not isinstance(shape, list) or not all(_is_int(d) and d <= _MAX_DIM for d in shape):
            raise _bad(path, f"gives parameter {name!r} the shape {shape!r}; a shape is a list of integers "
                             f"from 0 to {_MAX_DIM}")
        numels[name] = math.prod(shape)
    for alias, target in m["aliases"].items():
        if not isinstance(alias, str) or target not in numels:
            raise _bad(path, f"has alias {alias!r} -> {target!r}, which names no stored parameter")
    return numels


def _check_file_entry(i: int, f: Any, numels: dict[str, int], path: Path, cover: dict) -> None:
    if not isinstance(f, dict):
        raise _bad(path, f"has file entry {i} of type {type(f).__name__}; expected an object")
    name = f.get("file")
    if not isinstance(name, str) or not RANK_FILE_RE.match(name):
        raise _bad(path, f"names file {name!r} for rank {i}; a checkpoint's files are plain names inside its "
                         "directory (rank-NNNNN.safetensors), so it is not read")
    if f.get("rank") != i or not _is_int(f.get("bytes")) or not isinstance(f.get("sha256"), str):
        raise _bad(path, f"has an invalid entry for {name} (rank {f.get('rank')!r}, bytes {f.get('bytes')!r}, "
                         f"sha256 {type(f.get('sha256')).__name__}); expected rank {i}, a byte count and a hex digest")
    pieces, extra_keys = f.get("pieces"), f.get("rank_tensors", [])
    if not isinstance(pieces, list) or not isinstance(extra_keys, list) or \
            not all(isinstance(k, str) for k in extra_keys):
        raise _bad(path, f"has no valid 'pieces' / 'rank_tensors' lists for {name}")
    for p in pieces:
        ok = isinstance(p, dict) and isinstance(p.get("name"), str) and _is_int(p.get("lo")) \
            and _is_int(p.get("hi")) and isinstance(p.get("kinds"), list) \
            and all(isinstance(k, str) for k in p["kinds"])
        if not ok:
            raise _bad(path, f"has a malformed piece {p!r} for {name}")
        n = numels.get(p["name"])
        if n is None or not p["lo"] <= p["hi"] <= n:
            raise _bad(path, f"gives {name} elements [{p['lo']}, {p['hi']}) of {p['name']!r}, which "
                             f"{'is not a stored parameter' if n is None else f'has {n} elements'}")
        for k in p["kinds"]:
            cover.setdefault((p["name"], k), []).append((p["lo"], p["hi"]))


def check_manifest(m: dict, path: Path) -> None:
    """Everything a loader or the export takes from a manifest that already has the
    top-level keys with the right types (``checkpoint_io.read_manifest``)."""
    if m["world_size"] < 1:
        raise _bad(path, f"has world_size {m['world_size']}; expected 1 or more")
    numels = _check_params(m, path)
    cover: dict[tuple[str, str], list[tuple[int, int]]] = {}
    for i, f in enumerate(m["files"]):
        _check_file_entry(i, f, numels, path, cover)
    for name, n in numels.items():
        if not any(key[0] == name for key in cover) and n:
            raise _bad(path, f"lists parameter {name!r} (shape {m['params'][name]['shape']}) but no rank file "
                             "holds any of it")
    for (name, kind), ranges in cover.items():
        pos = 0
        for lo, hi in sorted(ranges):
            if lo > pos:
                break
            pos = max(pos, hi)
        if pos != numels[name]:
            raise _bad(path, f"gives {name!r} (kind {kind!r}) shape {m['params'][name]['shape']} "
                             f"({numels[name]} elements) but its rank files hold elements [0, {pos}) of it only")


# ----------------------------------------------------------------------------- rank files

def rank_file(ckpt_dir: Path, manifest: dict, r: int) -> Path:
    """The confined path of rank ``r``'s file: a regular file inside ``ckpt_dir``."""
    path = Path(ckpt_dir) / manifest["files"][r]["file"]  # a plain name (check_manifest)
    why = link_reason(path)
    if why:
        raise _bad(path, why, ckpt_dir)
    try:
        st = os.lstat(path)
    except OSError as e:
        raise _bad(path, f"cannot be read ({e.strerror})", ckpt_dir) from None
    if not stat.S_ISREG(st.st_mode):
        raise _bad(path, "is not a regular file", ckpt_dir)
    return path


def _read_header(path: Path, ckpt_dir: Path) -> tuple[dict, int]:
    """The JSON header of a safetensors file and the size of its data section."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            if not 2 <= n <= min(_MAX_HEADER, size - 8):
                raise _bad(path, f"is not a safetensors file (header length {n} in a file of {size} bytes)", ckpt_dir)
            header = json.loads(f.read(n))
    except OSError as e:
        raise _bad(path, f"cannot be read ({e.strerror})", ckpt_dir) from None
    except ValueError as e:  # UnicodeDecodeError included
        raise _bad(path, f"is not a safetensors file: its header is not JSON ({e})", ckpt_dir) from None
    if not isinstance(header, dict):
        raise _bad(path, "is not a safetensors file: its header is not a JSON object", ckpt_dir)
    return header, size - 8 - n


def _check_tensor(path: Path, ckpt_dir: Path, header: dict, data: int, key: str, numel: int | None) -> None:
    t = header.get(key)
    if not isinstance(t, dict):
        raise _bad(path, f"has no tensor {key!r}, which the manifest lists", ckpt_dir)
    shape, offs = t.get("shape"), t.get("data_offsets")
    ok = t.get("dtype") in _ST_DTYPES and isinstance(shape, list) and all(_is_int(d) for d in shape) \
        and isinstance(offs, list) and len(offs) == 2 and all(_is_int(o) for o in offs) \
        and offs[0] <= offs[1] <= data
    if not ok:
        raise _bad(path, f"has a malformed header entry for {key!r}: {t!r}", ckpt_dir)
    if numel is not None and shape != [numel]:
        raise _bad(path, f"holds {key!r} with shape {shape}; the manifest says {numel} elements", ckpt_dir)


def check_rank_file(ckpt_dir: Path, manifest: dict, r: int) -> Path:
    """Rank ``r``'s file, confined, with a header that holds what the manifest says."""
    ckpt_dir = Path(ckpt_dir)
    path = rank_file(ckpt_dir, manifest, r)
    header, data = _read_header(path, ckpt_dir)
    entry = manifest["files"][r]
    for p in entry["pieces"]:
        for kind in p["kinds"]:
            _check_tensor(path, ckpt_dir, header, data, f"{kind}::{p['name']}::{p['lo']}", p["hi"] - p["lo"])
    for key in entry.get("rank_tensors", []):
        _check_tensor(path, ckpt_dir, header, data, f"rank::{key}", None)
    return path


def open_rank_file(ckpt_dir: Path, manifest: dict, r: int):
    """``safe_open`` of rank ``r``'s file after :func:`check_rank_file`; the context manager."""
    path = check_rank_file(ckpt_dir, manifest, r)
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except Exception as e:  # SafetensorError and friends: what safetensors itself refuses
        raise _bad(path, f"is not a readable safetensors file ({e})", ckpt_dir) from None


# ----------------------------------------------------------------------------- the Trainer's extra

def check_trainer_extra(extra: dict, ckpt_dir: str | os.PathLike) -> None:
    """``extra`` as ``Trainer.save`` writes it: what ``Trainer.load`` reads, with its types."""
    where = Path(ckpt_dir) / "manifest.json"
    step = extra.get("step")
    if not _is_int(step):
        raise _bad(where, f"has 'extra.step' {step!r}; a Trainer checkpoint records its optimizer step as an "
                          "integer >= 0", ckpt_dir)
    engine = extra.get("engine")
    if not isinstance(engine, dict) or not _is_int(engine.get("optimizer_step")):
        raise _bad(where, f"has 'extra.engine' {engine!r}; expected an object with an integer 'optimizer_step' "
                          "(a checkpoint written by Trainer.save)", ckpt_dir)
    data = extra.get("data")
    keys = ("global_batch_size", "steps", "samples_consumed")
    if data is not None and (not isinstance(data, dict) or not all(_is_int(data.get(k)) for k in keys)):
        raise _bad(where, f"has 'extra.data' {data!r}; expected null or a data position with integer "
                          f"{', '.join(keys)}", ckpt_dir)
