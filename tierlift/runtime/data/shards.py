"""The on-disk format of a token shard directory (written by ``tierlift data prepare``).

A directory holds ``train-00000.parquet``, ``train-00001.parquet``, ... and
optionally ``eval-00000.parquet``, ...: each a Parquet file with one int32
column ``tokens`` (uncompressed, no dictionary encoding, one row group) holding
a slice of the split's token stream, and a ``meta.json`` written last (its
presence marks a complete directory)::

    {"format": "tierlift-token-shards", "version": 1,
     "tokenizer": "byte", "tokenizer_kind": "byte", "vocab_size": 258,
     "bos_id": 256, "eos_id": 257,
     "tokens": {"train": N, "eval": M}, "documents": {"train": n, "eval": m},
     "shards": {"train": [{"file": "train-00000.parquet", "tokens": N0,
                           "bytes": B0, "sha256": "..."}, ...],
                "eval": [...]}, ...}

Readers trust nothing: :func:`read_meta` checks the structure, and
:func:`load_shard_tokens` checks size, checksum, column type, row count and id
range of a shard before a sample is cut from it.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from typing import Any

import torch

from tierlift.errors import DataError

__all__ = ["META_FILE", "FORMAT_NAME", "FORMAT_VERSION", "SPLITS", "TOKEN_COLUMN", "shard_file_name",
           "sha256_file", "read_meta", "check_shard_files", "load_shard_tokens", "REPREPARE_FIX"]

META_FILE = "meta.json"
FORMAT_NAME = "tierlift-token-shards"
FORMAT_VERSION = 1
SPLITS = ("train", "eval")
TOKEN_COLUMN = "tokens"
REPREPARE_FIX = "re-run `tierlift data prepare TEXT... --out DIR --overwrite` to rebuild the shards."


def shard_file_name(split: str, index: int) -> str:
    return f"{split}-{index:05d}.parquet"


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _bad_meta(path: str, why: str) -> DataError:
    return DataError(f"is not a valid shard directory index: {why}", setting="meta.json", value=path,
                     fix=REPREPARE_FIX)


def read_meta(directory: str, *, setting: str = "data.path") -> dict[str, Any]:
    """Load and structurally check ``directory/meta.json``; ``setting`` names where the path came from."""
    path = os.path.join(directory, META_FILE)
    if not os.path.isfile(path):
        raise DataError("has no meta.json, so it is not a (complete) directory of token shards.",
                        setting=setting, value=directory,
                        fix="point the setting at the --out directory of `tierlift data prepare`, or "
                            + REPREPARE_FIX)
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _bad_meta(path, f"unreadable JSON ({exc}).") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise _bad_meta(path, f"'format' is not {FORMAT_NAME!r}.")
    if meta.get("version") != FORMAT_VERSION:
        raise _bad_meta(path, f"format version {meta.get('version')!r}; this tierlift reads {FORMAT_VERSION}.")
    vocab = meta.get("vocab_size")
    if not isinstance(vocab, int) or vocab < 1:
        raise _bad_meta(path, f"vocab_size {vocab!r} is not a positive integer.")
    shards, tokens = meta.get("shards"), meta.get("tokens")
    if not isinstance(shards, dict) or not isinstance(tokens, dict):
        raise _bad_meta(path, "'shards' and 'tokens' must be mappings by split.")
    for split in SPLITS:
        entries = shards.get(split, [])
        if not isinstance(entries, list):
            raise _bad_meta(path, f"shards[{split!r}] is not a list.")
        total = 0
        for e in entries:
            if not (isinstance(e, dict) and isinstance(e.get("file"), str) and isinstance(e.get("tokens"), int)
                    and isinstance(e.get("bytes"), int) and isinstance(e.get("sha256"), str)
                    and e["tokens"] >= 1 and os.path.basename(e["file"]) == e["file"]):
                raise _bad_meta(path, f"malformed shard entry {e!r} in split {split!r}.")
            total += e["tokens"]
        if total != tokens.get(split, 0):
            raise _bad_meta(path, f"split {split!r} lists {total} tokens in its shards but "
                                  f"tokens[{split!r}] = {tokens.get(split)!r}.")
    return meta


def check_shard_files(directory: str, entries: list[dict[str, Any]]) -> None:
    """Cheap check of every shard of a split: present, with the recorded size.

    Run when a dataset opens, so a missing or truncated shard fails at start-up
    rather than hours into a run; the checksum is checked when a shard is loaded.
    """
    for e in entries:
        path = os.path.join(directory, e["file"])
        if not os.path.isfile(path):
            raise DataError("is missing (listed in meta.json).", setting="shard", value=path, fix=REPREPARE_FIX)
        size = os.path.getsize(path)
        if size != e["bytes"]:
            raise DataError(f"has {size} bytes but meta.json records {e['bytes']}: the shard is truncated "
                            "or was replaced.", setting="shard", value=path, fix=REPREPARE_FIX)


def load_shard_tokens(directory: str, entry: dict[str, Any], vocab_size: int, *,
                      verify_checksum: bool = True) -> torch.Tensor:
    """The shard's tokens as a 1-D int32 tensor, after checking it against meta.json.

    Reads with ``pq.read_table(path, memory_map=True)``; a shard written by
    ``prepare`` is one row group, so the tensor is a zero-copy view of the
    decoded Arrow buffer (memory: 4 bytes per token).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = os.path.join(directory, entry["file"])
    check_shard_files(directory, [entry])
    if verify_checksum:
        digest = sha256_file(path)
        if digest != entry["sha256"]:
            raise DataError(f"has sha256 {digest[:16]}... but meta.json records {entry['sha256'][:16]}...: "
                            "the shard is corrupt.", setting="shard", value=path, fix=REPREPARE_FIX)
    try:
        table = pq.read_table(path, columns=[TOKEN_COLUMN], memory_map=True)
    except Exception as exc:  # pyarrow raises ArrowInvalid / OSError / KeyError variants
        raise DataError(f"could not be read as a Parquet token shard ({exc}).", setting="shard", value=path,
                        fix=REPREPARE_FIX) from exc
    column = table.column(TOKEN_COLUMN)
    if column.type != pa.int32() or column.null_count or table.num_rows != entry["tokens"]:
        raise DataError(f"holds {table.num_rows} {column.type} tokens ({column.null_count} null) but meta.json "
                        f"records {entry['tokens']} int32 tokens.", setting="shard", value=path, fix=REPREPARE_FIX)
    parts = []
    with warnings.catch_warnings():
        # Arrow buffers are read-only; torch warns because it cannot mark the
        # tensor read-only.  Samples are always copied out, never written back.
        warnings.simplefilter("ignore", UserWarning)
        for chunk in column.chunks:
            if len(chunk) == 0:
                continue
            parts.append(torch.frombuffer(chunk.buffers()[1], dtype=torch.int32, count=len(chunk),
                                          offset=chunk.offset * 4))
    tokens = parts[0] if len(parts) == 1 else torch.cat(parts)
    lo, hi = int(tokens.min()), int(tokens.max())
    if lo < 0 or hi >= vocab_size:
        raise DataError(f"holds token ids in [{lo}, {hi}] but the tokenizer's vocab_size is {vocab_size}.",
                        setting="shard", value=path, fix=REPREPARE_FIX)
    return tokens
