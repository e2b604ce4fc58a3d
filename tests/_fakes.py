"""Test doubles shared by several test modules."""

from __future__ import annotations


class FakeEvent:
    """Stands in for torch.cuda.Event: completes when the test says so."""

    def __init__(self, done: bool = False):
        self.done, self.synced = done, 0

    def query(self) -> bool:
        return self.done

    def synchronize(self) -> None:
        self.synced += 1
        self.done = True


def arith_samples(n: int, seed: int, vocab: int = 64, seq: int = 16) -> list:
    """``n`` learnable samples x[t] = (a + b t) mod vocab, as {input_ids, labels} dicts."""
    import torch

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        a, b = int(torch.randint(0, vocab, (1,), generator=g)), int(torch.randint(1, 4, (1,), generator=g))
        x = (a + b * torch.arange(seq + 1)) % vocab
        out.append({"input_ids": x[:-1], "labels": x[1:]})
    return out
