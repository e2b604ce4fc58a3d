"""Export a checkpoint's weights as consolidated safetensors in the Hugging Face layout.

Writes the fp32 master weights (state kind ``"param"``) under their original names
and shapes, cast to fp32 / bf16 / fp16: ``model.safetensors`` when everything fits
in ``max_shard_bytes``, else ``model-00001-of-0000N.safetensors`` shards plus
``model.safetensors.index.json`` (``{"metadata": {"total_size": bytes},
"weight_map": {name: file}}``), which ``from_pretrained`` reads.  Tied weights are
written under every name as separate copies (safetensors forbids shared storage),
except for a Hugging Face model: then the directory is one ``from_pretrained``
loads as is (config.json, generation_config.json, each tie written once; see
``export_hf``).

Each tensor is assembled from the rank-file pieces that hold it, read slice by
slice and streamed to disk, so host memory stays at one I/O slice
(``checkpoint_io.IO_PIECE_BYTES``) whatever the model or shard size.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Iterator

import torch
from tqdm import tqdm

from tierlift.errors import CheckpointError
from tierlift.runtime import checkpoint_io as cio
from tierlift.runtime.checkpoint_check import check_rank_file, open_rank_file
from tierlift.runtime.export_hf import hf_export_for, tied_names_to_drop, write_hf_metadata
from tierlift.runtime.outdir import ensure_writable_dir

__all__ = ["export_safetensors", "export_source", "EXPORT_DTYPES"]

EXPORT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Files this exporter owns in out_dir (removed before an overwrite so that a stale
# single file never sits next to a new sharded index, which would confuse loaders).
_OWN_FILES = re.compile(r"^(model(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?(\.partial)?"
                        r"|config\.json|generation_config\.json)$")
_STEP_DIR = re.compile(r"^step-(\d+)$")
INDEX_NAME = "model.safetensors.index.json"


def _plan_shards(tensors: list[tuple[str, str, tuple[int, ...]]], itemsize: int,
                 max_shard_bytes: int) -> list[list[tuple[str, str, tuple[int, ...]]]]:
    """Greedy, in order: a new shard starts when the next tensor would overflow the
    current one; a tensor larger than the limit gets a shard of its own (as HF does)."""
    shards: list[list[tuple[str, str, tuple[int, ...]]]] = [[]]
    size = 0
    for t in tensors:
        nbytes = math.prod(t[2]) * itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += nbytes
    return shards


def export_source(run_or_ckpt_dir: str | os.PathLike) -> tuple[str, int | None]:
    """The checkpoint ``export_safetensors`` exports from ``run_or_ckpt_dir`` (the
    newest complete one, or that checkpoint dir itself) and its optimizer step
    (the trainer's recorded step, else the ``step-N`` dir name; None if neither)."""
    ckpt = cio.latest_checkpoint(run_or_ckpt_dir)
    if ckpt is None:
        raise CheckpointError(f"no complete checkpoint in {run_or_ckpt_dir}", setting="checkpoint dir",
                              value=str(run_or_ckpt_dir),
                              fix="point at a run dir holding checkpoints/step-* (written when "
                                  "train.checkpoint_every > 0) or at one checkpoint dir.")
    step = cio.read_manifest(ckpt)["extra"].get("step")
    if not isinstance(step, int) or isinstance(step, bool):
        m = _STEP_DIR.match(Path(ckpt).name)
        step = int(m[1]) if m else None
    return ckpt, step


def export_safetensors(run_or_ckpt_dir: str | os.PathLike, out_dir: str | os.PathLike, dtype: str = "fp32",
                       max_shard_bytes: int = 5 * 2**30, show_progress: bool = True, *, overwrite: bool = False,
                       verify: bool = True, hf_config: Any = None) -> list[str]:
    """Write the newest complete checkpoint under ``run_or_ckpt_dir`` (or that
    checkpoint dir itself) to ``out_dir``; returns the written file paths (shards,
    then the index when sharded, then config.json and generation_config.json for
    a Hugging Face model).  ``verify`` checks every rank file's sha256 first.
    A Hugging Face model is recognised from the run's config.yaml (``model.kind:
    hf``) or given as ``hf_config`` (its ``transformers`` config, e.g. ``model.config``
    for a model trained through the Trainer API).  Refuses a non-empty ``out_dir``
    unless ``overwrite``; then only this exporter's own files (model*.safetensors,
    the index, config.json, generation_config.json) are replaced, others are kept."""
    ckpt, _ = export_source(run_or_ckpt_dir)
    if dtype not in EXPORT_DTYPES:
        raise CheckpointError("unknown export dtype", setting="dtype", value=dtype,
                              fix=f"use one of {', '.join(EXPORT_DTYPES)}.")
    if not isinstance(max_shard_bytes, int) or max_shard_bytes < 1:
        raise CheckpointError("shard size must be a positive number of bytes", setting="max_shard_bytes",
                              value=max_shard_bytes, fix="use e.g. 5 * 2**30 (5 GiB).")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out} is a file", setting="out_dir", value=str(out), fix="give a directory path.")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise CheckpointError(f"{out} is not empty", setting="out_dir", value=str(out),
                              fix="choose an empty or new directory, or pass overwrite=True.")

    manifest = cio.read_manifest(ckpt)
    if verify:
        cio.verify_files(ckpt, manifest)
    for r in range(manifest["world_size"]):  # every header checked before out_dir is touched
        check_rank_file(Path(ckpt), manifest, r)
    params, index = manifest["params"], cio.piece_index(manifest)
    tensors = [(name, name, tuple(spec["shape"])) for name, spec in params.items()]
    tensors += [(alias, target, tuple(params[target]["shape"]))
                for alias, target in manifest["aliases"].items() if alias not in params and target in params]
    hf = hf_export_for(ckpt, hf_config)
    if hf is not None:
        drop = tied_names_to_drop(hf, params, manifest["aliases"])
        tensors = [t for t in tensors if t[0] not in drop]
    for name, src, _ in tensors:
        have = {k for p in index.get(src, []) for k in p[3]}
        if "param" not in have:
            raise CheckpointError(f"parameter {src!r} has no weights (kind 'param') in the checkpoint; it holds "
                                  f"{sorted(have)}", setting="checkpoint dir", value=ckpt,
                                  fix="export a checkpoint written by tierlift's save_checkpoint.")

    out_dtype = EXPORT_DTYPES[dtype]
    shards = _plan_shards(tensors, out_dtype.itemsize, max_shard_bytes)
    n = len(shards)
    names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    ensure_writable_dir(out, setting="--out", error=CheckpointError)
    for entry in os.listdir(out):
        if _OWN_FILES.match(entry):
            os.unlink(out / entry)

    total = sum(math.prod(shape) for _, _, shape in tensors) * out_dtype.itemsize
    overflowed: list[str] = []
    written: list[str] = []
    with ExitStack() as stack:
        bar = stack.enter_context(tqdm(total=total, unit="B", unit_scale=True, desc=f"export {dtype}",
                                       disable=not show_progress))
        handles: dict[int, Any] = {}

        def open_file(r: int):
            if r not in handles:
                # confined to the checkpoint dir, header checked against the manifest
                handles[r] = stack.enter_context(open_rank_file(Path(ckpt), manifest, r))
            return handles[r]

        def produce(out_name: str, src: str, numel: int) -> Iterator[torch.Tensor]:
            flagged = False
            for _, piece in cio.iter_range(index[src], src, "param", 0, numel, open_file, ckpt):
                t = piece.to(out_dtype)
                # fp16 tops out at 65504: flag weights that the cast turned into inf.
                if out_dtype is torch.float16 and not flagged and torch.isinf(t).any() \
                        and not torch.isinf(piece).any():
                    overflowed.append(out_name)
                    flagged = True
                bar.update(t.numel() * out_dtype.itemsize)
                yield t

        for fname, shard in zip(names, shards):
            entries = [(name, out_dtype, shape, lambda name=name, src=src, shape=shape:
                        produce(name, src, math.prod(shape))) for name, src, shape in shard]
            partial = out / f"{fname}.partial"
            try:
                cio.write_safetensors_stream(partial, entries, {"format": "pt"})  # HF checks format == "pt"
            except OSError as e:
                partial.unlink(missing_ok=True)
                raise CheckpointError(f"cannot write {partial}: {e.strerror or e}", setting="out_dir",
                                      value=str(out), fix="free space on that disk or export elsewhere.") from e
            os.replace(partial, out / fname)
            written.append(str(out / fname))

    if n > 1:
        weight_map = {name: fname for fname, shard in zip(names, shards) for name, _, _ in shard}
        data = json.dumps({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))},
                          indent=2).encode()
        partial = out / f"{INDEX_NAME}.partial"
        with open(partial, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, out / INDEX_NAME)
        written.append(str(out / INDEX_NAME))
    if hf is not None:
        written += write_hf_metadata(out, hf, dtype)
    cio.fsync_dir(out)
    if overflowed:
        warnings.warn(f"fp16 export: values beyond fp16's range (65504) became inf in {overflowed[:5]}"
                      f"{' and more' if len(overflowed) > 5 else ''}; export with dtype='bf16' to keep them finite.",
                      RuntimeWarning, stacklevel=2)
    return written
