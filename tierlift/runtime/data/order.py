"""The sample order: which dataset indices make global step s, and which rank gets which.

Pure functions of (dataset length, global batch size, seed, epoch), so every
rank, a resumed run and a single-process reference compute the same order
without talking to each other.

Layout of one step (GB = micro_batch_size * grad_accum_steps * world_size)::

    epoch e      = step // steps_per_epoch,  steps_per_epoch = len // GB
    global batch = order_e[s*GB : (s+1)*GB],  s = step % steps_per_epoch
    rank r       = global_batch[r*mbs*A : (r+1)*mbs*A]        (rank-major)
    micro a      = rank_part[a*mbs : (a+1)*mbs]

The tail of an epoch that does not fill a global batch is dropped (so every
step has the same size on every rank, and the loss scale never changes).

Shuffling is a keyed Feistel permutation (4 rounds of splitmix64, cycle-walked
onto range(n)) evaluated index by index: no O(n) permutation array per rank,
no O(n) work at an epoch start, and the order depends on nothing but the
integers above -- not on the torch or numpy version -- so a checkpoint resumes
to the same samples after an upgrade.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

from tierlift.errors import DataError

__all__ = ["mix64", "ShuffledOrder", "epoch_order", "steps_per_epoch", "global_step_indices", "rank_slice"]

T = TypeVar("T")
_MASK64 = (1 << 64) - 1
_GOLDEN64 = 0x9E3779B97F4A7C15
_FEISTEL_ROUNDS = 4  # Luby-Rackoff: 4 rounds of a pseudo-random function give a strong PRP
_ORDER_TAG = 0x5EED0DE5  # separates the order's hash stream from other users of mix64


def _splitmix64(x: int) -> int:
    z = (x + _GOLDEN64) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def mix64(*values: int) -> int:
    """A well-mixed 64-bit hash of a tuple of integers (stable across versions/platforms).

    Negative values hash as their 64-bit two's complement; only the low 64 bits
    of each value count.
    """
    h = _GOLDEN64
    for v in values:
        h = _splitmix64(h ^ (int(v) & _MASK64))
    return h


class ShuffledOrder(Sequence[int]):
    """A pseudo-random permutation of ``range(n)`` keyed by ``key``; ``order[i]`` in O(1)."""

    def __init__(self, n: int, key: int) -> None:
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        self.n = n
        bits = max(2, (n - 1).bit_length())
        bits += bits % 2  # balanced halves; the domain 2**bits is < 4n, so walking ends in ~2 tries
        self._half = bits // 2
        self._mask = (1 << self._half) - 1
        self._keys = [mix64(key, r) for r in range(_FEISTEL_ROUNDS)]

    def __len__(self) -> int:
        return self.n

    def _encrypt(self, x: int) -> int:
        left, right = x >> self._half, x & self._mask
        for k in self._keys:
            left, right = right, left ^ (_splitmix64(right ^ k) & self._mask)
        return (left << self._half) | right

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self.n))]
        if i < 0:
            i += self.n
        if not 0 <= i < self.n:
            raise IndexError(f"index {i} out of range for an order of {self.n}")
        # Cycle-walking: the Feistel network permutes [0, 2**bits); following a
        # value's cycle until it lands in [0, n) restricts that to a permutation of [0, n).
        x = self._encrypt(i)
        while x >= self.n:
            x = self._encrypt(x)
        return x


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool = True) -> Sequence[int]:
    """The visiting order of a dataset of ``n`` samples in ``epoch``: identity if not ``shuffle``."""
    if not shuffle:
        return range(n)
    return ShuffledOrder(n, mix64(_ORDER_TAG, seed, epoch))


def steps_per_epoch(dataset_len: int, global_batch_size: int) -> int:
    """Full global batches in one pass over the data (the partial tail is dropped)."""
    if global_batch_size < 1:
        raise ValueError(f"global_batch_size must be >= 1, got {global_batch_size}")
    steps = dataset_len // global_batch_size
    if steps < 1:
        raise DataError(f"the dataset has {dataset_len} samples, fewer than one global batch of "
                        f"{global_batch_size} (micro_batch_size x grad_accum_steps x world_size).",
                        setting="train.global_batch_size", value=global_batch_size,
                        fix="add data, shorten data.seq_len (more samples per token), or lower "
                            "train.micro_batch_size / train.grad_accum_steps / the number of ranks.")
    return steps


def global_step_indices(step: int, *, dataset_len: int, global_batch_size: int, seed: int,
                        shuffle: bool = True) -> list[int]:
    """Dataset indices of global step ``step`` (0-based, counted across epochs), rank-major.

    This is the whole batch that all ranks together consume at that step; a
    single-process reference gets identical data by using it directly.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    epoch, s = divmod(step, steps_per_epoch(dataset_len, global_batch_size))
    order = epoch_order(dataset_len, seed, epoch, shuffle)
    return [order[p] for p in range(s * global_batch_size, (s + 1) * global_batch_size)]


def rank_slice(global_batch: Sequence[T], rank: int, world_size: int, micro_batch_size: int,
               grad_accum_steps: int) -> list[list[T]]:
    """Rank ``rank``'s ``grad_accum_steps`` micro-batches (each ``micro_batch_size`` long) of a global batch."""
    per_rank = micro_batch_size * grad_accum_steps
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    if len(global_batch) != per_rank * world_size:
        raise ValueError(f"a global batch of {len(global_batch)} does not split into {world_size} ranks x "
                         f"{grad_accum_steps} micro-batches x {micro_batch_size} samples")
    mine = list(global_batch[rank * per_rank:(rank + 1) * per_rank])
    return [mine[a * micro_batch_size:(a + 1) * micro_batch_size] for a in range(grad_accum_steps)]
