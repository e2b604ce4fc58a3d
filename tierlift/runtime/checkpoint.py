"""Sharded, atomic checkpoints that load at any world size (safetensors + JSON only).

Layout of one checkpoint directory (``format_version`` 1)::

    <ckpt_dir>/rank-00000.safetensors   one file per saving rank
    <ckpt_dir>/manifest.json            written last by rank 0

Param-centric: a rank file holds, for every piece of a parameter in that rank's
shard and every state kind, a 1-D tensor keyed ``"{kind}::{name}::{lo}"`` with
elements ``[lo, hi)`` of the flattened parameter.  Nothing records the chunk layout
or world size, so a loader at another world size gathers the pieces covering the
range it needs from whichever files hold them.  Rank-local tensors (RNG states) are
keyed ``"rank::{key}"`` and only come back when the world size is unchanged; after
resharding the caller re-seeds (an RNG stream belongs to a rank, not to parameters).

The manifest holds the format version, world size, per-rank file name / size /
sha256 / piece index, the parameter table (name -> shape, registration order),
tied-weight aliases, the caller's JSON ``extra`` and the creation time.

Atomicity: every rank writes into a sibling ``<ckpt_dir>.tmp-<token>`` (token
broadcast from rank 0) and fsyncs its file; rank 0 writes and fsyncs the manifest,
then renames the temp dir into place and fsyncs the parent.  An existing
``ckpt_dir`` is swapped, never overwritten: renamed to ``.old-<token>``, the new one
renamed in, the old one deleted.  So a crash (SIGKILL included) at any point leaves
the previous checkpoint loadable: :func:`latest_checkpoint` ignores ``.tmp-`` and
``.del-`` dirs and falls back to an ``.old-`` dir whose swap was cut short; the next
save cleans or restores them.  The checkpoint dir must be on a filesystem every
rank sees (a shared one for multi-node runs).  Loading never unpickles.

Confinement: a ``step-*`` dir that is a symbolic link is never loaded, counted,
replaced or deleted (its target may lie outside the run); manifest file entries are
plain ``rank-NNNNN.safetensors`` names and rank files must be regular files; every
manifest and rank-file header is checked before use (:mod:`checkpoint_check`), so a
malformed checkpoint is one CheckpointError naming the file.  ``latest_checkpoint``
logs one warning per unusable checkpoint it passes over, with the reason.

Every entry point is collective and failure-symmetric: a rank that fails reports
through the next collective instead of raising early (which would leave the others
hanging), and then every rank raises.  The on-disk helpers live in
:mod:`tierlift.runtime.checkpoint_io`, the Hugging Face export in
:mod:`tierlift.runtime.export`.
"""

from __future__ import annotations

import datetime
import errno
import json
import math
import os
import re
import secrets
import shutil
import time
import warnings
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Collection, Iterable, Sequence

import torch

from tierlift.errors import CheckpointError, TierliftError
from tierlift.parallel.comm import Comm
from tierlift.runtime import checkpoint_io as cio
from tierlift.runtime.checkpoint_io import (FORMAT, FORMAT_VERSION, MANIFEST, latest_checkpoint, read_manifest,
                                            rotate_checkpoints, verify_files)
from tierlift.runtime.checkpoint_check import open_rank_file
from tierlift.state import StateSegment

__all__ = ["StateSegment", "save_checkpoint", "load_checkpoint", "latest_checkpoint", "read_manifest",
           "rotate_checkpoints", "verify_files", "FORMAT", "FORMAT_VERSION", "MANIFEST"]


# ----------------------------------------------------------------------------- save

def _disk_error(exc: OSError, ckpt_dir: Path, where: str) -> CheckpointError:
    prev = str(ckpt_dir) if cio.is_complete(ckpt_dir) else latest_checkpoint(ckpt_dir.parent)
    intact = f"the previous checkpoint at {prev} is intact" if prev else "no earlier checkpoint was touched"
    if exc.errno in cio.DISK_ERRNOS:
        what = "disk full" if exc.errno != errno.EIO else "I/O error (EIO)"
        return CheckpointError(f"{what} while writing checkpoint {where}: {exc.strerror}", setting="checkpoint dir",
                               value=str(ckpt_dir), fix=f"free space or point run.dir at a larger disk; {intact}.")
    return CheckpointError(f"cannot write checkpoint {where}: {exc.strerror or exc}", setting="checkpoint dir",
                           value=str(ckpt_dir), fix=f"check permissions and the path of run.dir; {intact}.")


def _check_segment(seg: StateSegment) -> None:
    numel = math.prod(seg.shape)
    if not 0 <= seg.param_lo <= seg.param_hi <= numel:
        raise ValueError(f"segment {seg.name!r}: range [{seg.param_lo}, {seg.param_hi}) outside numel {numel}")
    for kind, t in seg.tensors.items():
        if t.dim() != 1 or t.numel() != seg.param_hi - seg.param_lo:
            raise ValueError(f"segment {seg.name!r} kind {kind!r}: expected a 1-D tensor of "
                             f"{seg.param_hi - seg.param_lo} elements, got shape {tuple(t.shape)}")


def _write_rank_file(path: Path, rank: int, world: int, segments: Sequence[StateSegment],
                     rank_tensors: dict[str, torch.Tensor]) -> dict:
    entries: list[cio.StreamEntry] = []
    pieces, shapes, seen = [], {}, set()
    for seg in segments:
        _check_segment(seg)
        if (seg.name, seg.param_lo) in seen:
            raise ValueError(f"two segments of {seg.name!r} start at element {seg.param_lo} on rank {rank}")
        seen.add((seg.name, seg.param_lo))
        kinds = sorted(seg.tensors)
        for kind in kinds:
            t = seg.tensors[kind]
            entries.append((f"{kind}::{seg.name}::{seg.param_lo}", t.dtype, (t.numel(),),
                            lambda t=t: cio.host_pieces(t)))
        pieces.append({"name": seg.name, "lo": seg.param_lo, "hi": seg.param_hi, "kinds": kinds})
        shapes[seg.name] = list(seg.shape)
    for key, t in rank_tensors.items():
        flat = t.detach().reshape(-1)
        entries.append((cio.RANK_PREFIX + key, t.dtype, tuple(t.shape), lambda flat=flat: cio.host_pieces(flat)))
    size, sha = cio.write_safetensors_stream(path, entries, {"format": "pt", "tierlift_rank": str(rank),
                                                          "tierlift_world_size": str(world)})
    return {"rank": rank, "file": path.name, "bytes": size, "sha256": sha, "pieces": pieces, "shapes": shapes,
            "rank_tensors": sorted(rank_tensors)}


def _param_order(reports: list[dict]) -> list[str]:
    """Best-effort registration (chunk) order of the parameters, for the manifest
    and the export.  Each rank lists its pieces in chunk order, a subsequence of the
    global order; merge the lists topologically.  Among ready names prefer the
    successor on the highest rank holding the name just placed (a parameter split
    across ranks r..r+k is followed, in its chunk, by rank r+k's next piece), else
    the earliest-seen one (the next chunk starts on rank 0)."""
    first: dict[str, tuple[int, int]] = {}
    succ: dict[str, set[str]] = {}
    indeg: dict[str, int] = {}
    nxt: dict[str, list[tuple[int, str]]] = {}  # name -> [(rank, next name on that rank)]
    for r, rep in enumerate(reports):
        names = [p["name"] for p in rep["pieces"]]
        for i, n in enumerate(names):
            first.setdefault(n, (r, i))
            succ.setdefault(n, set())
            indeg.setdefault(n, 0)
        for a, b in zip(names, names[1:]):
            if a != b and b not in succ[a]:
                succ[a].add(b)
                indeg[b] += 1
                nxt.setdefault(a, []).append((r, b))
    ready = {n for n, d in indeg.items() if d == 0}
    order: list[str] = []
    last = None
    while ready:
        pick = next((m for _, m in sorted(nxt.get(last, []), reverse=True) if m in ready), None)
        if pick is None:
            pick = min(ready, key=first.__getitem__)
        ready.discard(pick)
        order.append(pick)
        for m in succ[pick]:
            indeg[m] -= 1
            if indeg[m] == 0:
                ready.add(m)
        last = pick
    if len(order) != len(first):  # ranks disagree on the order: keep first appearance
        order = sorted(first, key=first.__getitem__)
    return order


def _build_manifest(reports: list[dict], aliases: dict[str, str], extra: dict) -> dict:
    shapes: dict[str, list[int]] = {}
    for rep in reports:
        for name, shape in rep["shapes"].items():
            if shapes.setdefault(name, shape) != shape:
                raise ValueError(f"ranks disagree on the shape of {name!r}: {shapes[name]} vs {shape}")
    coverage: dict[tuple[str, str], list[tuple[int, int]]] = {}
    for rep in reports:
        for p in rep["pieces"]:
            for kind in p["kinds"]:
                coverage.setdefault((p["name"], kind), []).append((p["lo"], p["hi"]))
    for (name, kind), ranges in coverage.items():
        pos = 0
        for lo, hi in sorted(ranges):
            if lo > pos:
                break
            pos = max(pos, hi)
        if pos != math.prod(shapes[name]):
            raise ValueError(f"no rank holds elements from {pos} of {name!r} (kind {kind!r}): the segments "
                             f"handed to save_checkpoint do not cover the parameter")
    params = {n: {"shape": shapes[n]} for n in _param_order(reports)}
    for alias, target in aliases.items():
        if target not in params:
            raise ValueError(f"alias {alias!r} points at {target!r}, which no rank saved")
    files = [{k: rep[k] for k in ("rank", "file", "bytes", "sha256", "pieces", "rank_tensors")} for rep in reports]
    now = time.time()
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "world_size": len(reports),
            "created": datetime.datetime.fromtimestamp(now, datetime.timezone.utc).isoformat(),
            "created_unix": now, "files": files, "params": params, "aliases": dict(aliases), "extra": extra}


def _replaceable(d: Path) -> bool:
    """An existing ckpt_dir may be swapped out only if it is (what is left of) a checkpoint
    -- not a link, whose target may lie outside the run directory."""
    if d.is_symlink():
        return False
    try:
        names = os.listdir(d)
    except NotADirectoryError:
        return False
    return all(n == MANIFEST or re.fullmatch(r"rank-\d+\.safetensors", n) for n in names)


# Called right before a checkpoint is published (the rename).  A launcher adds one
# that ends the process once the job it belongs to is gone (tierlift/launch/ray_fate.py).
COMMIT_CHECKS: list[Callable[[], None]] = []


def _commit(tmp: Path, final: Path, token: str, manifest: dict) -> list[str]:
    """Rank 0: manifest into the temp dir, then swap it into place.  Returns warnings
    about cleanup that failed after the new checkpoint was already in place."""
    data = json.dumps(manifest, indent=1).encode()
    fd = os.open(tmp / MANIFEST, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        cio._write_all(fd, memoryview(data))
        os.fsync(fd)
    finally:
        os.close(fd)
    cio.fsync_dir(tmp)  # rank files and manifest durable before the rename publishes them
    for check in COMMIT_CHECKS:
        check()  # may end the process: then nothing is published
    if not final.exists():
        os.rename(tmp, final)
        cio.fsync_dir(final.parent)
        return []
    old = final.with_name(f"{final.name}.old-{token}")
    os.rename(final, old)
    try:
        os.rename(tmp, final)
    except OSError:
        os.rename(old, final)
        raise
    cio.fsync_dir(final.parent)
    try:
        cio.remove_tree(old)  # a crash before this completes: .old is ignored, cleaned next save
    except OSError as e:
        return [f"could not delete the replaced checkpoint {old}: {e}"]
    return []


def _payload(e: BaseException) -> dict[str, Any]:
    """A picklable description of an error, to re-raise it on the other ranks.  Any
    TierliftError keeps its one line (e.g. a checksum mismatch of NVMe-resident state)."""
    if isinstance(e, TierliftError):
        return {"message": e.message, "setting": e.setting, "value": None if e.value is None else str(e.value),
                "fix": e.fix}
    return {"message": f"{type(e).__name__}: {e}", "setting": None, "value": None,
            "fix": "this is a tierlift bug; report it with the traceback of the failing rank."}


def _raise_remote(p: dict[str, Any], prefix: str, rank: int) -> None:
    raise CheckpointError(f"{prefix}{p['message']}", setting=p["setting"], value=p["value"], fix=p["fix"], rank=rank)


def _reraise_own(e: BaseException, rank: int) -> None:
    if isinstance(e, CheckpointError):
        e.rank = rank
        e.args = (e.render(),)
    raise e


def save_checkpoint(ckpt_dir: str | os.PathLike, segments: Iterable[StateSegment], *, comm: Comm, extra: dict,
                    rank_tensors: dict[str, torch.Tensor] | None = None, aliases: dict[str, str] | None = None,
                    keep: int | None = None) -> str:
    """Collective: every rank calls it with its own segments (any device) and its
    rank-local tensors (e.g. RNG states).  ``extra`` (JSON-able) and ``aliases``
    (tied name -> stored name) are taken from rank 0.  With ``keep``, the oldest
    complete ``step-*`` siblings beyond the newest ``keep`` are deleted afterwards.
    Returns the checkpoint path.  Raises CheckpointError on every rank when any rank
    fails; the previous checkpoint and ``ckpt_dir`` are then untouched."""
    final = Path(ckpt_dir).absolute()
    segments = list(segments)
    rank_tensors = dict(rank_tensors or {})

    # 1. Rank 0 checks the target, cleans what interrupted saves left, creates the temp dir.
    plan: dict[str, Any] = {}
    if comm.rank == 0:
        try:
            if keep is not None and (not isinstance(keep, int) or keep < 1):
                raise CheckpointError("must keep at least one checkpoint", setting="train.keep_checkpoints",
                                      value=keep, fix="set it to 1 or more.")
            json.dumps(extra)  # fail before writing gigabytes
            if final.exists() and not _replaceable(final):
                raise CheckpointError(f"{final} exists and is not a tierlift checkpoint; refusing to replace it",
                                      setting="checkpoint dir", value=str(final),
                                      fix="move that directory away or choose another run.dir.")
            final.parent.mkdir(parents=True, exist_ok=True)
            cio.cleanup_stale(final.parent)
            token = secrets.token_hex(8)
            (final.parent / f"{final.name}.tmp-{token}").mkdir(mode=0o755)
            plan = {"token": token}
        except OSError as e:
            plan = {"error": _payload(_disk_error(e, final, str(final.parent)))}
        except Exception as e:
            plan = {"error": _payload(e)}
    plan = comm.broadcast_object(plan, src=0)
    if "error" in plan:
        _raise_remote(plan["error"], "checkpoint not written: ", comm.rank)
    token = plan["token"]
    tmp = final.parent / f"{final.name}.tmp-{token}"

    # 2. Every rank writes its file.  Failures are reported, not raised, so that all
    # ranks still reach the collectives below (a raise here would hang the others).
    own_exc: BaseException | None = None
    fname = tmp / f"rank-{comm.rank:05d}.safetensors"
    try:
        report: dict[str, Any] = _write_rank_file(fname, comm.rank, comm.world_size, segments, rank_tensors)
    except OSError as e:
        own_exc = _disk_error(e, final, str(fname))
        report = {"error": _payload(own_exc)}
    except Exception as e:
        own_exc = e
        report = {"error": _payload(e)}
    reports = comm.all_gather_object(report)

    # 3. Rank 0 checks, writes the manifest and swaps the checkpoint in.
    status: dict[str, Any] = {}
    if comm.rank == 0:
        failed = [(r, rep["error"]) for r, rep in enumerate(reports) if "error" in rep]
        try:
            if failed:
                r, p = failed[0]
                status = {"error": dict(p, message=f"rank {r}: {p['message']}")}
            else:
                for rep in reports:
                    if not (tmp / rep["file"]).is_file():
                        raise CheckpointError(f"rank {rep['rank']} wrote {rep['file']} but rank 0 cannot see it in "
                                              f"{tmp}", setting="checkpoint dir", value=str(final),
                                              fix="put run.dir on a filesystem shared by all nodes.")
                warns = _commit(tmp, final, token, _build_manifest(reports, aliases or {}, extra))
                if keep is not None:
                    try:
                        cio.rotate_checkpoints(final.parent, keep)
                    except OSError as e:  # the new checkpoint is committed; old ones just stay
                        warns.append(f"could not delete old checkpoints in {final.parent}: {e}")
                status = {"path": str(final), "warnings": warns}
        except OSError as e:
            status = {"error": _payload(_disk_error(e, final, str(tmp / MANIFEST)))}
        except Exception as e:
            status = {"error": _payload(e)}
        if "error" in status:
            shutil.rmtree(tmp, ignore_errors=True)
    status = comm.broadcast_object(status, src=0)
    if own_exc is not None:
        _reraise_own(own_exc, comm.rank)
    if "error" in status:
        _raise_remote(status["error"], "checkpoint not written: ", comm.rank)
    for w in status["warnings"] if comm.rank == 0 else []:
        warnings.warn(w, RuntimeWarning, stacklevel=2)
    return status["path"]


# ----------------------------------------------------------------------------- load

def _load_local(ckpt_dir: Path, segments: Sequence[StateSegment], comm: Comm, verify: bool,
                kinds: Collection[str] | None, check_extra: Callable[[dict, Path], None] | None) -> tuple[dict, dict]:
    manifest = read_manifest(ckpt_dir)
    if check_extra is not None:  # before any state is touched
        check_extra(manifest["extra"], ckpt_dir)
    params, aliases, index = manifest["params"], manifest["aliases"], cio.piece_index(manifest)
    err = dict(setting="checkpoint dir", value=str(ckpt_dir))
    jobs, needed_files = [], set()
    for seg in segments:
        _check_segment(seg)
        stored = seg.name if seg.name in params else aliases.get(seg.name)
        if stored not in params:
            raise CheckpointError(f"parameter {seg.name!r} (shape {tuple(seg.shape)}) is not in the checkpoint",
                                  **err, fix="resume with the model config the checkpoint was saved with "
                                             "(model.*), or start a fresh run.")
        ck_shape = tuple(params[stored]["shape"])
        if ck_shape != tuple(seg.shape):
            raise CheckpointError(f"parameter {seg.name!r} has shape {ck_shape} in the checkpoint but "
                                  f"{tuple(seg.shape)} in the model", **err,
                                  fix="resume with the model config the checkpoint was saved with (model.*).")
        want = set(seg.tensors) if kinds is None else set(seg.tensors) & set(kinds)
        have = {k for p in index.get(stored, []) for k in p[3]}
        if want - have:
            raise CheckpointError(f"parameter {seg.name!r}: state {sorted(want - have)} is not in the checkpoint "
                                  f"(it holds {sorted(have)}; the optimizer needs {sorted(want)})", **err,
                                  fix="resume with the optimizer the checkpoint was saved with (optimizer.*), or "
                                      "load weights only with load_checkpoint(..., kinds=('param',)).")
        for kind in sorted(want):
            covering = [p for p in index[stored] if p[1] > seg.param_lo and p[0] < seg.param_hi]
            needed_files.update(p[2] for p in covering)
            jobs.append((seg, stored, kind, covering))
    same_world = manifest["world_size"] == comm.world_size
    if same_world:
        needed_files.add(comm.rank)
    if verify:
        verify_files(ckpt_dir, manifest, needed_files)
    rank_tensors: dict[str, torch.Tensor] = {}
    with ExitStack() as stack:
        handles: dict[int, Any] = {}

        def open_file(r: int):
            if r not in handles:
                handles[r] = stack.enter_context(open_rank_file(ckpt_dir, manifest, r))
            return handles[r]

        for seg, stored, kind, covering in jobs:
            dst = seg.tensors[kind]
            for off, src in cio.iter_range(covering, stored, kind, seg.param_lo, seg.param_hi, open_file, ckpt_dir):
                cio.copy_into(dst, off, src)
        if same_world:
            f = open_file(comm.rank)
            for key in manifest["files"][comm.rank].get("rank_tensors", []):
                rank_tensors[key] = f.get_tensor(cio.RANK_PREFIX + key)
    return manifest["extra"], rank_tensors


def load_checkpoint(ckpt_dir: str | os.PathLike, segments: Iterable[StateSegment], *, comm: Comm, verify: bool = True,
                    kinds: Collection[str] | None = None,
                    check_extra: Callable[[dict, Path], None] | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
    """Collective: fill every segment's tensors in place from the checkpoint, at any
    world size.  ``verify`` checks the sha256 of the files this rank reads.  ``kinds``
    limits the state kinds loaded (e.g. ``("param",)`` for weights only).  ``check_extra
    (extra, ckpt_dir)`` refuses an ``extra`` the caller cannot use, before any state is read.

    Returns (extra, rank_tensors); rank_tensors are this rank's saved rank-local
    tensors when the world size is unchanged, else ``{}`` (re-seed the RNGs then).
    Raises CheckpointError on every rank when any rank fails."""
    ckpt_dir = Path(ckpt_dir)
    own_exc: BaseException | None = None
    result: tuple[dict, dict] = ({}, {})
    try:
        result = _load_local(ckpt_dir, list(segments), comm, verify, kinds, check_extra)
    except Exception as e:  # includes bugs / unreadable files: still join the collective below
        own_exc = e
    msgs = comm.all_gather_object(None if own_exc is None else _payload(own_exc))
    if own_exc is not None:
        _reraise_own(own_exc, comm.rank)
    failed = [(r, m) for r, m in enumerate(msgs) if m is not None]
    if failed:
        r, p = failed[0]
        _raise_remote(p, f"rank {r} could not load checkpoint {ckpt_dir}: ", comm.rank)
    return result
