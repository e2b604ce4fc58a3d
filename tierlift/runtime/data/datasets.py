"""Map-style datasets of next-token samples: Parquet token shards and a synthetic set.

Every item is ``{"input_ids": LongTensor[seq_len], "labels": LongTensor[seq_len]}``
with ``labels[t] = input_ids[t + 1]`` in the underlying token stream (sample i
covers stream tokens ``[i*seq_len, i*seq_len + seq_len + 1)``; consecutive
samples share one token so every stream position is a label exactly once).
"""

from __future__ import annotations

import bisect
import os
from typing import Any

import torch
from torch.utils.data import Dataset

from tierlift.errors import DataError
from tierlift.runtime.data.config import DataConfig
from tierlift.runtime.data.order import mix64
from tierlift.runtime.data.shards import (REPREPARE_FIX, SPLITS, check_shard_files, load_shard_tokens,
                                          read_meta)

__all__ = ["TokenShardDataset", "SyntheticDataset", "build_dataset", "synthetic_eval_seed"]

_SYNTH_TAG = 0x5A_17_4E_71  # separates the synthetic data's hash stream from the sample order's
_EVAL_TAG = 0xE7A1


def _window(tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """seq_len + 1 stream tokens -> inputs and their next-token labels (int64)."""
    t = tokens.to(torch.long)
    return {"input_ids": t[:-1], "labels": t[1:]}



def _sample_index(i: int, n: int) -> int:
    """``i`` as a non-negative index into ``n`` samples (negative counts from the end)."""
    i = int(i)
    if i < 0:
        i += n
    if not 0 <= i < n:
        raise IndexError(f"sample {i} out of range for {n} samples")
    return i

class TokenShardDataset(Dataset):
    """Samples cut from the concatenated token stream of one split of a shard directory.

    Shards are loaded lazily, the first time a sample touches them, and kept:
    memory is 4 bytes per token of the shards touched (per process).  meta.json
    and the presence and size of every shard are checked here; a shard's
    checksum, row count and id range when it is loaded (``verify_checksums``).
    ``setting`` names the config key the directory came from, for errors.
    """

    def __init__(self, path: str, seq_len: int, split: str = "train", *, verify_checksums: bool = True,
                 setting: str = "data.path") -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.path = os.path.abspath(path)
        self.seq_len = int(seq_len)
        self.split = split
        self.verify_checksums = verify_checksums
        self.meta = read_meta(self.path, setting=setting)
        self.entries: list[dict[str, Any]] = list(self.meta["shards"].get(split, []))
        self.total_tokens = int(self.meta["tokens"].get(split, 0))
        if not self.entries:
            raise DataError(f"has no {split!r} shards.", setting=setting, value=path,
                            fix="prepare eval data with `tierlift data prepare ... --eval-fraction 0.01`, or "
                                "point data.eval_path at a separately prepared directory."
                            if split == "eval" else REPREPARE_FIX)
        check_shard_files(self.path, self.entries)
        self._starts = [0]  # stream offset of each shard's first token
        for e in self.entries:
            self._starts.append(self._starts[-1] + e["tokens"])
        self._len = (self.total_tokens - 1) // self.seq_len
        if self._len < 1:
            raise DataError(f"the {split} split of {path} has {self.total_tokens} tokens, too few for one "
                            f"sample of seq_len + 1 = {self.seq_len + 1}.", setting="data.seq_len",
                            value=self.seq_len, fix="lower data.seq_len or prepare more text.")
        self._cache: dict[int, torch.Tensor] = {}

    @property
    def vocab_size(self) -> int:
        """The vocab_size of the tokenizer the shards were written with."""
        return int(self.meta["vocab_size"])

    @property
    def tokenizer_name(self) -> str:
        return str(self.meta.get("tokenizer", ""))

    def __len__(self) -> int:
        return self._len

    def _shard(self, k: int) -> torch.Tensor:
        tokens = self._cache.get(k)
        if tokens is None:
            tokens = load_shard_tokens(self.path, self.entries[k], self.vocab_size,
                                       verify_checksum=self.verify_checksums)
            self._cache[k] = tokens
        return tokens

    def stream_tokens(self, start: int, stop: int) -> torch.Tensor:
        """Tokens ``[start, stop)`` of the split's concatenated stream (int32 copy)."""
        if not 0 <= start <= stop <= self.total_tokens:
            raise IndexError(f"token range [{start}, {stop}) is outside [0, {self.total_tokens})")
        pieces = []
        k = bisect.bisect_right(self._starts, start) - 1
        pos = start
        while pos < stop:
            shard_start = self._starts[k]
            hi = min(stop, self._starts[k + 1])
            pieces.append(self._shard(k)[pos - shard_start:hi - shard_start])
            pos = hi
            k += 1
        return torch.cat(pieces) if pieces else torch.empty(0, dtype=torch.int32)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        i = _sample_index(i, self._len)
        start = i * self.seq_len
        return _window(self.stream_tokens(start, start + self.seq_len + 1))

    def __getstate__(self) -> dict[str, Any]:
        # DataLoader workers / Ray actors get the paths, not the loaded shards.
        state = dict(self.__dict__)
        state["_cache"] = {}
        return state


class SyntheticDataset(Dataset):
    """Deterministic arithmetic sequences: cheap to generate and quickly learnable.

    Sample i is ``(start + stride * t) mod m`` for t = 0..seq_len, with start in
    [0, m) and stride in [1, 4] drawn from a hash of (seed, i) -- no RNG state, so any
    sample can be produced in any order, on any rank, identically.
    m = min(vocab_size, 256): keeping ids in a small range lets a tiny model see
    each id often, so the loss falls clearly within a few hundred steps (from
    ln(vocab_size) towards ~0 once the stride is read off the first tokens; a
    bigram model alone reaches ln(4) ~ 1.39).
    """

    MAX_STRIDE = 4
    ALPHABET_CAP = 256

    def __init__(self, n_samples: int, seq_len: int, vocab_size: int, seed: int = 0) -> None:
        if n_samples < 0 or seq_len < 1:
            raise ValueError(f"need n_samples >= 0 and seq_len >= 1, got {n_samples}, {seq_len}")
        if vocab_size < 2:
            raise DataError("is too small for the synthetic data (it needs at least 2 ids).",
                            setting="model.vocab_size", value=vocab_size, fix="use model.vocab_size >= 2.")
        self.n_samples = int(n_samples)
        self.seq_len = int(seq_len)
        self.vocab_size = int(vocab_size)
        self.seed = int(seed)
        self.alphabet = min(self.vocab_size, self.ALPHABET_CAP)
        self._max_stride = min(self.MAX_STRIDE, self.alphabet - 1)
        self._steps = torch.arange(self.seq_len + 1, dtype=torch.long)

    def __len__(self) -> int:
        return self.n_samples

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        i = _sample_index(i, self.n_samples)
        h = mix64(_SYNTH_TAG, self.seed, i)
        start = h % self.alphabet
        stride = 1 + (h >> 32) % self._max_stride
        return _window((start + stride * self._steps) % self.alphabet)


def synthetic_eval_seed(seed: int) -> int:
    """The synthetic eval set's seed: a separate stream, never a neighbour's train seed."""
    return mix64(_EVAL_TAG, seed) >> 1


def _tokenizer_identity(meta: dict[str, Any]) -> tuple[Any, ...]:
    # A tokenizer.json is identified by content, not path: the same file may be
    # mounted at different places on different nodes.
    return (meta.get("tokenizer_kind"), meta.get("tokenizer_sha256"), meta["vocab_size"])


def _check_vocab(ds: TokenShardDataset, model_vocab_size: int, setting: str) -> None:
    if ds.vocab_size > model_vocab_size:
        raise DataError(f"is smaller than the vocab_size {ds.vocab_size} of the tokenizer "
                        f"{ds.tokenizer_name!r} that wrote {setting}={ds.path} (token ids up to "
                        f"{ds.vocab_size - 1} would index past the embedding).",
                        setting="model.vocab_size", value=model_vocab_size,
                        fix=f"set model.vocab_size to at least {ds.vocab_size}.")


def build_dataset(cfg: DataConfig, vocab_size: int, split: str = "train") -> Dataset | None:
    """The train or eval dataset of ``cfg`` for a model with ``vocab_size`` ids; None = no eval data.

    Synthetic: ``synthetic_samples`` train samples from ``data.seed``, and
    ``synthetic_eval_samples`` eval samples from :func:`synthetic_eval_seed`.
    Parquet: the train split of ``data.path``; for eval, ``data.eval_path`` (its
    eval split, else its train split) or else the eval split of ``data.path``.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if cfg.source == "synthetic":
        if split == "train":
            return SyntheticDataset(cfg.synthetic_samples, cfg.seq_len, vocab_size, cfg.seed)
        if cfg.synthetic_eval_samples == 0:
            return None
        return SyntheticDataset(cfg.synthetic_eval_samples, cfg.seq_len, vocab_size, synthetic_eval_seed(cfg.seed))
    if cfg.source != "parquet":
        raise DataError("is not a known data source.", setting="data.source", value=cfg.source,
                        fix="use 'synthetic' or 'parquet'.")
    if split == "train":
        ds = TokenShardDataset(cfg.path, cfg.seq_len, "train", setting="data.path")
        _check_vocab(ds, vocab_size, "data.path")
        return ds
    if cfg.eval_path:
        meta = read_meta(cfg.eval_path, setting="data.eval_path")
        which = "eval" if meta["tokens"].get("eval", 0) else "train"
        ds = TokenShardDataset(cfg.eval_path, cfg.seq_len, which, setting="data.eval_path")
        train_meta = read_meta(cfg.path, setting="data.path")
        if _tokenizer_identity(meta) != _tokenizer_identity(train_meta):
            raise DataError(f"was tokenized with {meta.get('tokenizer')!r} (vocab_size {meta['vocab_size']}) "
                            f"but data.path with {train_meta.get('tokenizer')!r} (vocab_size "
                            f"{train_meta['vocab_size']}); eval loss would be meaningless.",
                            setting="data.eval_path", value=cfg.eval_path,
                            fix="prepare the eval text with the same --tokenizer as the training data.")
        _check_vocab(ds, vocab_size, "data.eval_path")
        return ds
    meta = read_meta(cfg.path, setting="data.path")
    if not meta["tokens"].get("eval", 0):
        return None
    ds = TokenShardDataset(cfg.path, cfg.seq_len, "eval", setting="data.path")
    _check_vocab(ds, vocab_size, "data.path")
    return ds
