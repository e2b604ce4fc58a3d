"""On-disk side of tierlift checkpoints: the streaming safetensors writer, the
manifest, and finding / rotating / cleaning checkpoint directories.

See :mod:`tierlift.runtime.checkpoint` for the format and the save/load protocol.
Nothing here unpickles: files are safetensors (read through ``safe_open``) and JSON.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import math
import os
import re
import secrets
import shutil
import struct
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch

from tierlift.errors import CheckpointError
from tierlift.runtime.checkpoint_check import check_manifest, link_reason, rank_file
from tierlift.state import StreamedTensor

__all__ = ["FORMAT", "FORMAT_VERSION", "MANIFEST", "IO_PIECE_BYTES", "read_manifest", "verify_files",
           "latest_checkpoint", "rotate_checkpoints", "write_safetensors_stream", "piece_index", "iter_range",
           "is_complete", "unusable_reason"]

log = logging.getLogger("tierlift.checkpoint")

FORMAT = "tierlift-checkpoint"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
# Host memory one copy / write / read step may use (bytes): GPU state is staged to
# the host in pieces this big, never all at once.
IO_PIECE_BYTES = 64 * 2**20
_HASH_BLOCK = 8 * 2**20  # bytes read per sha256 update
_STEP_RE = re.compile(r"^step-(\d+)$")
_STALE_RE = re.compile(r"^(?P<base>.+)\.(?P<what>tmp|old|del)-(?P<token>[0-9a-f]{16})$")
RANK_PREFIX = "rank::"
DISK_ERRNOS = {errno.ENOSPC, errno.EIO, getattr(errno, "EDQUOT", errno.ENOSPC)}

_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
           torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
           torch.uint8: "U8", torch.bool: "BOOL"}


# ----------------------------------------------------------------------------- low-level I/O

def _write_all(fd: int, data: memoryview) -> None:
    """os.write until all bytes are out (a write may be partial).  The only place
    checkpoint bytes hit the disk, so tests inject ENOSPC here."""
    view = memoryview(data).cast("B")
    while view.nbytes:
        n = os.write(fd, view)
        view = view[n:]


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    t = t.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(t.view(torch.uint8).numpy())


def host_pieces(t, lo: int = 0, hi: int | None = None) -> Iterator[torch.Tensor]:
    """Elements [lo, hi) of 1-D ``t`` (a tensor or a StreamedTensor) as host tensors of
    at most IO_PIECE_BYTES."""
    hi = t.numel() if hi is None else hi
    step = max(1, IO_PIECE_BYTES // t.element_size())
    for a in range(lo, hi, step):
        b = min(hi, a + step)
        yield t.read(a, b) if isinstance(t, StreamedTensor) else t[a:b].detach().to("cpu")


def copy_into(dst, off: int, src: torch.Tensor) -> None:
    """``dst[off:off + len(src)] = src`` for a tensor or a StreamedTensor."""
    if isinstance(dst, StreamedTensor):
        dst.write(off, src)
    else:
        dst[off:off + src.numel()].copy_(src)


# (key, dtype, shape, producer of host tensors whose bytes, concatenated, are the tensor)
StreamEntry = tuple[str, torch.dtype, tuple[int, ...], Callable[[], Iterable[torch.Tensor]]]


def write_safetensors_stream(path: str | os.PathLike, entries: Sequence[StreamEntry],
                             metadata: dict[str, str]) -> tuple[int, str]:
    """Write a safetensors file piece by piece (bounded host memory) and fsync it.

    ``safetensors.torch.save_file`` needs every tensor in host memory at once; this
    writes the header from shapes alone, then streams the data.  Returns (size in
    bytes, sha256 hex of the whole file).  Refuses to overwrite (O_EXCL)."""
    header: dict[str, Any] = {"__metadata__": dict(metadata)}
    offset = 0
    for key, dtype, shape, _ in entries:
        if dtype not in _DTYPES:
            raise ValueError(f"tensor {key!r}: dtype {dtype} cannot be stored (use one of {sorted(map(str, _DTYPES))})")
        n = math.prod(shape) * dtype.itemsize
        header[key] = {"dtype": _DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the format pads the header to 8 bytes with spaces
    digest = hashlib.sha256()
    # 0o644 & ~umask: never group/world-writable, whatever the umask.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o644)
    try:
        for chunk in (memoryview(struct.pack("<Q", len(head))), memoryview(head)):
            digest.update(chunk)
            _write_all(fd, chunk)
        for key, dtype, shape, produce in entries:
            want, got = math.prod(shape) * dtype.itemsize, 0
            for t in produce():
                if t.dtype != dtype:
                    raise ValueError(f"tensor {key!r}: producer gave {t.dtype}, header says {dtype}")
                b = _tensor_bytes(t)
                digest.update(b)
                _write_all(fd, b)
                got += b.nbytes
            if got != want:
                raise ValueError(f"tensor {key!r}: producer gave {got} bytes, header says {want}")
        os.fsync(fd)
    finally:
        os.close(fd)
    return 8 + len(head) + offset, digest.hexdigest()


def _sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        while block := f.read(_HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def fsync_dir(path: str | os.PathLike) -> None:
    """Make renames/creations inside ``path`` durable (no-op where dirs can't be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_tree(path: str | os.PathLike) -> None:
    """Delete a checkpoint dir so that no partial state ever looks complete: rename
    it to ``.del-<token>`` first (loaders skip those), drop the manifest, then the rest."""
    path = Path(path)
    if path.is_symlink():  # never delete through a link: only the link itself goes
        os.unlink(path)
        return
    if not path.exists():
        return
    if not _STALE_RE.match(path.name):
        doomed = path.with_name(f"{path.name}.del-{secrets.token_hex(8)}")
        os.rename(path, doomed)
        fsync_dir(path.parent)
        path = doomed
    try:
        (path / MANIFEST).unlink()
    except FileNotFoundError:
        pass
    shutil.rmtree(path, ignore_errors=True)


# ----------------------------------------------------------------------------- manifest

def _corrupt(path: Path, what: str) -> CheckpointError:
    return CheckpointError(f"manifest {path} {what}", setting="checkpoint dir", value=str(path.parent),
                           fix="point at a complete checkpoint (latest_checkpoint(run_dir) finds the newest one).")


def read_manifest(ckpt_dir: str | os.PathLike) -> dict:
    """Parse and sanity-check ``<ckpt_dir>/manifest.json``."""
    path = Path(ckpt_dir) / MANIFEST
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise _corrupt(path, "does not exist: the directory is not a checkpoint, or its save was "
                             "interrupted before it completed") from None
    except OSError as e:
        raise _corrupt(path, f"cannot be read ({e.strerror})") from None
    try:
        m = json.loads(text)
    except ValueError as e:
        raise _corrupt(path, f"is not valid JSON ({e})") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise _corrupt(path, f"is not a tierlift checkpoint manifest (format={m.get('format') if isinstance(m, dict) else None!r})")
    if not isinstance(m.get("format_version"), int) or m["format_version"] > FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path.parent} has format_version {m.get('format_version')!r}; this "
                              f"tierlift reads up to {FORMAT_VERSION}", setting="checkpoint dir",
                              value=str(path.parent), fix="upgrade tierlift to the version that wrote it.")
    for key, typ in (("world_size", int), ("files", list), ("params", dict), ("aliases", dict), ("extra", dict)):
        if not isinstance(m.get(key), typ):
            raise _corrupt(path, f"lacks a valid {key!r} entry")
    if len(m["files"]) != m["world_size"]:
        raise _corrupt(path, f"lists {len(m['files'])} files for world_size {m['world_size']}")
    check_manifest(m, path)
    return m


def unusable_reason(ckpt_dir: str | os.PathLike) -> str | None:
    """Why ``ckpt_dir`` cannot be loaded (no valid manifest, a rank file missing, linked
    or of the wrong size), or None when it is complete.  Contents are checked on load."""
    d = Path(ckpt_dir)
    try:
        manifest = read_manifest(d)
    except CheckpointError as e:
        return e.message
    for f in manifest["files"]:
        p = d / f["file"]
        if link_reason(p):
            return f"{f['file']} {link_reason(p)}"
        try:
            size = os.stat(p).st_size
        except OSError as e:
            return f"{f['file']} is missing ({e.strerror})"
        if size != f["bytes"]:
            return f"{f['file']} has {size} bytes but the manifest says {f['bytes']}"
    return None


def is_complete(ckpt_dir: str | os.PathLike) -> bool:
    return unusable_reason(ckpt_dir) is None


def verify_files(ckpt_dir: str | os.PathLike, manifest: dict, ranks: Iterable[int] | None = None) -> None:
    """Check size and sha256 of the listed rank files (all when ``ranks`` is None)."""
    ckpt_dir = Path(ckpt_dir)
    for r in sorted(set(range(manifest["world_size"]) if ranks is None else ranks)):
        entry = manifest["files"][r]
        path = rank_file(ckpt_dir, manifest, r)  # confined: a regular file inside ckpt_dir
        try:
            size = os.stat(path).st_size
        except OSError as e:
            raise CheckpointError(f"checkpoint file {path} is missing ({e.strerror})", setting="checkpoint dir",
                                  value=str(ckpt_dir), fix="restore the file or resume from another checkpoint.") from None
        if size != entry["bytes"] or _sha256_file(path) != entry["sha256"]:
            raise CheckpointError(f"checkpoint file {path} is corrupt: its size/sha256 does not match the manifest "
                                  f"({size} vs {entry['bytes']} bytes)", setting="checkpoint dir", value=str(ckpt_dir),
                                  fix="resume from an earlier checkpoint (the disk or a copy damaged this one).")


# ----------------------------------------------------------------------------- finding / rotating

def _step_dirs(parent: Path) -> list[tuple[int, Path]]:
    """(step, dir) of every step dir under ``parent``, including an ``.old-`` dir
    left by a swap that was cut short (its final name is then missing)."""
    out = []
    try:
        names = os.listdir(parent)
    except OSError:
        return out
    for name in names:
        m = _STEP_RE.match(name)
        if m:
            out.append((int(m[1]), parent / name))
            continue
        s = _STALE_RE.match(name)
        if s and s["what"] == "old" and (m := _STEP_RE.match(s["base"])) and not (parent / s["base"]).exists():
            out.append((int(m[1]), parent / name))
    return sorted(out)


def _checkpoints_parent(run_or_parent: Path) -> Path:
    return run_or_parent / "checkpoints" if (run_or_parent / "checkpoints").is_dir() else run_or_parent


def latest_checkpoint(run_or_ckpt_dir: str | os.PathLike) -> str | None:
    """Newest complete checkpoint: ``run_or_ckpt_dir`` itself when it is one, else the
    highest ``step-*`` with a manifest and all its files under ``<dir>/checkpoints``
    (or under ``<dir>`` when it is the checkpoints dir).  None when there is none."""
    p = Path(run_or_ckpt_dir)
    if (p / MANIFEST).is_file():
        why = unusable_reason(p)
        if why:
            _warn_skipped([(p, why)], None, listed=False)
        return None if why else str(p)
    skipped = []
    for _, d in reversed(_step_dirs(_checkpoints_parent(p))):
        why = link_reason(d) or unusable_reason(d)  # a linked step dir may point outside the run
        if why is None:
            _warn_skipped(skipped, d)
            return str(d)
        skipped.append((d, why))
    _warn_skipped(skipped, None)
    return None


_warned: set[tuple[str, str]] = set()  # (dir, reason) this process already reported


def _warn_skipped(skipped: list[tuple[Path, str]], used: Path | None, listed: bool = True) -> None:
    """One warning line per unusable checkpoint passed over, naming the one used instead
    (resume and export would otherwise fall back to an older one without a word)."""
    for d, why in skipped:
        if (str(d), why) not in _warned:
            _warned.add((str(d), why))
            tail = f"using {used.name}" if used is not None else "no older complete checkpoint" if listed else \
                "it cannot be loaded"
            log.warning("skipped checkpoint %s: %s; %s", d, why, tail)


def rotate_checkpoints(parent: str | os.PathLike, keep: int) -> list[str]:
    """Delete the oldest complete ``step-*`` checkpoints under ``parent`` beyond the
    newest ``keep`` (the newest is never deleted).  Returns the removed paths.  A linked
    step dir is neither counted nor deleted: its target may lie outside the run."""
    if not isinstance(keep, int) or keep < 1:
        raise CheckpointError("must keep at least one checkpoint", setting="train.keep_checkpoints", value=keep,
                              fix="set it to 1 or more.")
    complete = [d for _, d in _step_dirs(Path(parent))
                if _STEP_RE.match(d.name) and not d.is_symlink() and is_complete(d)]
    doomed = complete[:-keep]
    for d in doomed:
        remove_tree(d)
    return [str(d) for d in doomed]


def cleanup_stale(parent: Path) -> None:
    """Remove what interrupted saves left: ``.tmp-`` and ``.del-`` dirs go; an
    ``.old-`` dir goes when its checkpoint was swapped in, else it is restored."""
    try:
        names = os.listdir(parent)
    except OSError:
        return
    for name in names:
        s = _STALE_RE.match(name)
        if not s or (parent / name).is_symlink() or not (parent / name).is_dir():
            continue  # a link is not ours to restore or delete (it may point outside the run)
        base = parent / s["base"]
        if s["what"] == "old" and not base.exists() and is_complete(parent / name):
            os.rename(parent / name, base)
            fsync_dir(parent)
        else:
            remove_tree(parent / name)


# ----------------------------------------------------------------------------- load

def piece_index(manifest: dict) -> dict[str, list[tuple[int, int, int, tuple[str, ...]]]]:
    """name -> [(lo, hi, rank file index, kinds)] sorted by lo."""
    index: dict[str, list[tuple[int, int, int, tuple[str, ...]]]] = {}
    for f in manifest["files"]:
        for p in f["pieces"]:
            index.setdefault(p["name"], []).append((p["lo"], p["hi"], f["rank"], tuple(p["kinds"])))
    for v in index.values():
        v.sort()
    return index


def iter_range(pieces: Sequence[tuple[int, int, int, tuple[str, ...]]], name: str, kind: str, lo: int, hi: int,
               open_file: Callable[[int], Any], ckpt_dir: str | os.PathLike) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield (offset from ``lo``, host tensor) covering elements [lo, hi) of (name,
    kind) in order, in slices of at most IO_PIECE_BYTES, reading only the needed
    bytes of the stored pieces (``pieces`` from :func:`piece_index`)."""
    pos = lo
    for p_lo, p_hi, r, kinds in pieces:
        if pos >= hi:
            break
        if kind not in kinds or p_hi <= pos:
            continue
        if p_lo > pos:
            break
        end = min(hi, p_hi)
        sl = open_file(r).get_slice(f"{kind}::{name}::{p_lo}")
        step = max(1, IO_PIECE_BYTES // 4)  # elements per read; state is fp32 (4 bytes)
        for a in range(pos, end, step):
            b = min(end, a + step)
            yield a - lo, sl[a - p_lo:b - p_lo]
        pos = end
    if pos < hi:
        raise CheckpointError(f"checkpoint has no data for elements [{pos}, {hi}) of {name!r} (kind {kind!r})",
                              setting="checkpoint dir", value=str(ckpt_dir),
                              fix="the checkpoint is damaged; resume from an earlier one.")
