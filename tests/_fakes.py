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
