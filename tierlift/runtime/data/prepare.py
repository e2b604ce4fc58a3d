"""``tierlift data prepare``: text files -> Parquet token shards + meta.json.

Inputs are text files (one document each), ``.jsonl`` files (one document per
line, from its ``"text"`` field) or directories searched recursively for
``.txt`` / ``.md`` / ``.jsonl`` files (sorted by path, hidden entries skipped,
so the same inputs always give the same shards).  Each document becomes
``BOS + tokens + EOS``; the documents' ids are concatenated into one stream per
split and cut into shards of ``shard_tokens`` tokens (the last one shorter).

Eval split: with ``eval_fraction = f``, document number i (0-based, in input
order) goes to eval when ``floor((i + 1) * f) > floor(i * f)``: exactly
``floor(n * f)`` of the first n documents, spread evenly, decided while
streaming (no counting pass) and whole documents only (no document is split
between train and eval, so eval text is never trained on).

Every file is written under a temporary name and renamed, and ``meta.json`` is
written last: a crash leaves no file that a reader would take for complete.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from array import array
from typing import Any, Iterator, Sequence

from tierlift.errors import DataError
from tierlift.runtime.outdir import ensure_writable_dir
from tierlift.runtime.data.shards import (FORMAT_NAME, FORMAT_VERSION, META_FILE, SPLITS, TOKEN_COLUMN,
                                          sha256_file, shard_file_name)
from tierlift.runtime.data.tokenizer import BYTE_TOKENIZER_NAME, get_tokenizer

__all__ = ["prepare_shards", "prepare_cli", "prepare_main", "find_input_files", "DEFAULT_SHARD_TOKENS"]

# 16 Mi tokens = 64 MiB per int32 shard: large enough that per-file overhead
# (open, checksum, footer) is negligible, small enough to checksum in well under
# a second when a reader first touches it.
DEFAULT_SHARD_TOKENS = 1 << 24
TEXT_SUFFIXES = (".txt", ".md")
JSONL_SUFFIXES = (".jsonl",)
# array typecode with 4-byte items (C int on every platform torch supports).
_I32 = next(t for t in "ilh" if array(t).itemsize == 4)


def find_input_files(inputs: Sequence[str]) -> list[str]:
    """The input files, in order: explicit files as given, directories walked sorted."""
    if not inputs:
        raise DataError("no input given.", setting="TEXT", value=list(inputs),
                        fix="name text/.jsonl files or directories: `tierlift data prepare corpus/ --out DIR`.")
    files: list[str] = []
    for item in inputs:
        if os.path.isfile(item):
            files.append(os.path.abspath(item))
        elif os.path.isdir(item):
            found = []
            for root, dirs, names in os.walk(item):
                dirs[:] = [d for d in dirs if not d.startswith(".")]
                found += [os.path.relpath(os.path.join(root, n), item) for n in names
                          if not n.startswith(".") and n.lower().endswith(TEXT_SUFFIXES + JSONL_SUFFIXES)]
            # Sorted by path components (a/0.txt < a/1.txt < b.jsonl), independent of
            # the file system's listing order.
            found.sort(key=lambda rel: rel.split(os.sep))
            files += [os.path.abspath(os.path.join(item, rel)) for rel in found]
        else:
            raise DataError("does not exist.", setting="TEXT", value=item,
                            fix="give existing text/.jsonl files or directories.")
    seen: set[str] = set()
    unique = [f for f in files if not (os.path.realpath(f) in seen or seen.add(os.path.realpath(f)))]
    if not unique:
        raise DataError(f"holds no {'/'.join(TEXT_SUFFIXES + JSONL_SUFFIXES)} files.", setting="TEXT",
                        value=list(inputs), fix="point at files or directories that hold text.")
    return unique


def _iter_documents(path: str) -> Iterator[tuple[str, int]]:
    """(text, bytes of input consumed) per non-empty document of one file."""
    if path.lower().endswith(JSONL_SUFFIXES):
        with open(path, "rb") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    yield "", len(line)
                    continue
                try:
                    record = json.loads(line)
                except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                    raise DataError(f"line {lineno} is not valid JSON ({exc}).", setting="TEXT", value=path,
                                    fix="write one JSON object per line, e.g. {\"text\": \"...\"}.") from exc
                text = record.get("text") if isinstance(record, dict) else None
                if not isinstance(text, str):
                    raise DataError(f"line {lineno} has no string \"text\" field.", setting="TEXT", value=path,
                                    fix="give every line a \"text\" field holding the document.")
                yield text, len(line)
        return
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"is not UTF-8 text ({exc}).", setting="TEXT", value=path,
                        fix="convert it to UTF-8 (e.g. `iconv -t UTF-8`) or leave it out.") from exc
    yield text, len(raw)


class _SplitWriter:
    """Accumulates one split's token stream and writes full shards as it goes."""

    def __init__(self, out_dir: str, split: str, shard_tokens: int) -> None:
        self.out_dir, self.split, self.shard_tokens = out_dir, split, shard_tokens
        self.buffer = array(_I32)
        self.entries: list[dict[str, Any]] = []
        self.tokens = 0
        self.documents = 0

    def add(self, ids: list[int]) -> None:
        self.buffer.extend(ids)
        self.tokens += len(ids)
        self.documents += 1
        while len(self.buffer) >= self.shard_tokens:
            self._write(self.buffer[:self.shard_tokens])
            del self.buffer[:self.shard_tokens]

    def close(self) -> None:
        if len(self.buffer):
            self._write(self.buffer)
            self.buffer = array(_I32)

    def _write(self, tokens: array) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        name = shard_file_name(self.split, len(self.entries))
        final = os.path.join(self.out_dir, name)
        tmp = os.path.join(self.out_dir, f".{name}.tmp-{os.getpid()}")
        column = pa.Array.from_buffers(pa.int32(), len(tokens), [None, pa.py_buffer(tokens)])
        table = pa.table({TOKEN_COLUMN: column})
        # Uncompressed + plain encoding: token ids barely compress, and plain
        # pages decode at memcpy speed; one row group -> one contiguous buffer.
        pq.write_table(table, tmp, compression="none", use_dictionary=False, write_statistics=False,
                       row_group_size=len(tokens))
        os.replace(tmp, final)
        self.entries.append({"file": name, "tokens": len(tokens), "bytes": os.path.getsize(final),
                             "sha256": sha256_file(final)})


def _prepare_out_dir(out_dir: str, overwrite: bool) -> None:
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise DataError("exists and is not a directory.", setting="--out", value=out_dir,
                        fix="choose a directory path for the shards.")
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        if not overwrite:
            raise DataError("exists and is not empty; refusing to mix new shards with old files.",
                            setting="--out", value=out_dir,
                            fix="choose a new --out directory, or pass --overwrite to replace the shards there.")
        # Drop meta.json first: if we crash below, the directory reads as incomplete.
        meta = os.path.join(out_dir, META_FILE)
        if os.path.exists(meta):
            os.remove(meta)
        for name in os.listdir(out_dir):
            ours = name.endswith(".parquet") and name.startswith(tuple(f"{s}-" for s in SPLITS))
            if ours or (name.startswith(".") and ".tmp-" in name):
                os.remove(os.path.join(out_dir, name))
    ensure_writable_dir(out_dir, setting="--out", error=DataError)


def _tokenize_into(files: list[str], tok: Any, writers: dict[str, _SplitWriter], eval_fraction: float,
                   show_progress: bool) -> tuple[int, int]:
    """Stream every document into its split's writer; returns (documents, skipped empty)."""
    from tqdm import tqdm

    total_bytes = sum(os.path.getsize(f) for f in files)
    doc_index = 0
    skipped = 0
    with tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc="tokenizing",
              disable=not show_progress, file=sys.stderr) as bar:
        for path in files:
            for text, nbytes in _iter_documents(path):
                bar.update(nbytes)
                if not text:
                    skipped += 1
                    continue
                held_out = math.floor((doc_index + 1) * eval_fraction) > math.floor(doc_index * eval_fraction)
                writers["eval" if held_out else "train"].add(tok.encode_document(text))
                doc_index += 1
            bar.set_postfix(tokens=writers["train"].tokens + writers["eval"].tokens, refresh=False)
    for w in writers.values():
        w.close()
    return doc_index, skipped


def prepare_shards(inputs: Sequence[str], out_dir: str, tokenizer: str = BYTE_TOKENIZER_NAME,
                   shard_tokens: int = DEFAULT_SHARD_TOKENS, eval_fraction: float = 0.0,
                   show_progress: bool = True, overwrite: bool = False) -> dict[str, Any]:
    """Tokenize ``inputs`` into Parquet shards under ``out_dir``; returns the meta dict.

    ``tokenizer``: "byte" or a local tokenizer.json path; ``shard_tokens``:
    tokens per shard file; ``eval_fraction``: share of documents held out as the
    eval split (0 = none).  The returned dict is meta.json plus ``out_dir``.
    """
    if isinstance(shard_tokens, bool) or not isinstance(shard_tokens, int) or shard_tokens < 1:
        raise DataError("must be a positive integer.", setting="--shard-tokens", value=shard_tokens,
                        fix=f"use e.g. {DEFAULT_SHARD_TOKENS}.")
    if not (isinstance(eval_fraction, (int, float)) and 0.0 <= eval_fraction < 1.0):
        raise DataError("must be in [0, 1).", setting="--eval-fraction", value=eval_fraction,
                        fix="use e.g. 0.01 to hold out 1% of the documents, or 0 for none.")
    tok = get_tokenizer(tokenizer)
    files = find_input_files(inputs)
    out_dir = os.path.abspath(out_dir)
    _prepare_out_dir(out_dir, overwrite)

    writers = {s: _SplitWriter(out_dir, s, shard_tokens) for s in SPLITS}
    try:
        doc_index, skipped = _tokenize_into(files, tok, writers, eval_fraction, show_progress)
        if writers["train"].tokens == 0:
            raise DataError(f"hold no text ({skipped} empty documents, {writers['eval'].documents} held out).",
                            setting="TEXT", value=list(inputs), fix="give inputs with non-empty documents.")
        if eval_fraction > 0 and writers["eval"].documents == 0:
            raise DataError(f"holds out no document: {doc_index} documents x {eval_fraction} < 1.",
                            setting="--eval-fraction", value=eval_fraction,
                            fix=(f"use --eval-fraction >= {1 / doc_index:.3g}, or " if doc_index >= 2 else "")
                            + "split the text into more documents (files or .jsonl lines), or prepare eval "
                              "text into its own directory for data.eval_path.")
    except BaseException:
        # Leave --out as it was (minus old shards under --overwrite): a half-written
        # directory would only make the next attempt fail on "not empty".
        for name in os.listdir(out_dir):
            if any(name == e["file"] for w in writers.values() for e in w.entries) or \
                    name.endswith(f".tmp-{os.getpid()}"):
                os.remove(os.path.join(out_dir, name))
        raise

    meta: dict[str, Any] = {"format": FORMAT_NAME, "version": FORMAT_VERSION, **tok.describe(),
                            "dtype": "int32", "column": TOKEN_COLUMN, "shard_tokens": shard_tokens,
                            "eval_fraction": float(eval_fraction), "inputs": files,
                            "skipped_empty_documents": skipped,
                            "documents": {s: w.documents for s, w in writers.items()},
                            "tokens": {s: w.tokens for s, w in writers.items()},
                            "shards": {s: w.entries for s, w in writers.items()}}
    tmp = os.path.join(out_dir, f".{META_FILE}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=1)
        f.write("\n")
    os.replace(tmp, os.path.join(out_dir, META_FILE))
    return {**meta, "out_dir": out_dir}


def prepare_cli(inputs: Sequence[str], out: str, tokenizer: str = BYTE_TOKENIZER_NAME,
                shard_tokens: int = DEFAULT_SHARD_TOKENS, eval_fraction: float = 0.0,
                overwrite: bool = False) -> int:
    """What ``tierlift data prepare`` runs: prepare, print a summary, return 0.

    A :class:`DataError` propagates, so the CLI's single handler prints it and
    exits 2 like every other user error (with a traceback under ``--debug``).
    """
    meta = prepare_shards(inputs, out, tokenizer=tokenizer, shard_tokens=shard_tokens,
                          eval_fraction=eval_fraction, show_progress=sys.stderr.isatty(), overwrite=overwrite)
    for split in SPLITS:
        if meta["tokens"][split]:
            print(f"{split}: {meta['documents'][split]} documents, {meta['tokens'][split]} tokens "
                  f"in {len(meta['shards'][split])} shards")
    print(f"tokenizer {meta['tokenizer']} (vocab_size {meta['vocab_size']}); wrote {meta['out_dir']}")
    print(f"train with: data: {{source: parquet, path: {meta['out_dir']}}} and model.vocab_size >= "
          f"{meta['vocab_size']}")
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tierlift data prepare",
                                description="Tokenize text files into Parquet token shards.")
    p.add_argument("inputs", nargs="+", metavar="TEXT", help=".txt/.md/.jsonl files or directories")
    p.add_argument("--out", required=True, help="output directory (must be new or empty)")
    p.add_argument("--tokenizer", default=BYTE_TOKENIZER_NAME, help="'byte' or a local tokenizer.json")
    p.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS, help="tokens per shard file")
    p.add_argument("--eval-fraction", type=float, default=0.0, help="share of documents held out for eval")
    p.add_argument("--overwrite", action="store_true", help="replace shards in a non-empty --out")
    return p


def prepare_main(argv: Sequence[str] | None = None) -> int:
    """Parse ``tierlift data prepare`` arguments (``argv`` without the command words) and run it.

    For a CLI that hands over its argument list; a :class:`DataError` is
    printed (setting, value, fix) and gives exit code 2.
    """
    args = _parser().parse_args(argv)
    try:
        return prepare_cli(args.inputs, args.out, args.tokenizer, args.shard_tokens, args.eval_fraction,
                           args.overwrite)
    except DataError as exc:
        print(f"error: {exc.render()}", file=sys.stderr)
        return 2
