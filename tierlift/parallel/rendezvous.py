"""A bounded "is every rank here?" check before collectives that run outside fit().

Inside the Trainer's loop every rank runs the same steps, so the engine's gathers
always meet.  Outside it -- a forward of the sharded model (eval, ``generate``),
``gathered_parameters()``, ``unwrap_model()``, ``trainer.full_state_dict()``,
``trainer.evaluate()`` -- user code decides who calls, and
the usual mistake (``if rank == 0: model.generate(...)``) leaves rank 0 in an
all-gather nobody else joins, silent until the process group's 30-minute timeout.
Before such a collective, every rank counts itself in under a key of the process
group's rendezvous store and waits, at most ``zero.rendezvous_timeout_s``, until
all ranks are counted; a rank that gives up takes its count back atomically
(``compare_set``), so nobody ever passes a check that another abandoned, and the
process group carries no half-done collective: the job can go on.

Cost: never inside a training step; once per checked call (an idle-phase forward:
once per unit it must gather): one store ``add`` and a few polls,
i.e. a few store round trips, ~0.1-1 ms on one host.  Keys are namespaced by
engine (engines are built in the same order on every rank) and by purpose, so two
ranks in different collectives both fail instead of meeting in the wrong one.
Rank 0 deletes each purpose's keys two checks behind: every rank has left those.
"""

from __future__ import annotations

import itertools
import time

import torch.distributed as dist

from tierlift.errors import TierliftError

__all__ = ["Rendezvous", "RanksAbsentError"]

_ENGINE_IDS = itertools.count()
_POLL_S = (0.0005, 0.02)  # first and longest sleep between polls (seconds)


class RanksAbsentError(TierliftError, RuntimeError):
    """Only some ranks entered a collective that all must enter."""


class Rendezvous:
    def __init__(self, rank: int, world_size: int, timeout_s: float) -> None:
        self.rank, self.world_size, self.timeout_s = rank, world_size, timeout_s
        self.prefix = f"tierlift/rendezvous/{next(_ENGINE_IDS)}"
        self._seq: dict[str, int] = {}
        self._store = None

    def check(self, purpose: str, doing: str) -> None:
        """Return once every rank called ``check(purpose, ...)`` as often as this one;
        raise :class:`RanksAbsentError` after ``timeout_s`` otherwise."""
        if self.world_size == 1:
            return
        if self._store is None:
            # The default group's store (private accessor, stable since torch 1.x): rank 0's TCPStore.
            self._store = dist.distributed_c10d._get_default_store()
        store, seq = self._store, self._seq.get(purpose, 0)
        key = f"{self.prefix}/{purpose}/{seq}"
        count = store.add(key, 1)
        deadline = time.monotonic() + self.timeout_s
        nap = _POLL_S[0]
        while count < self.world_size:
            if time.monotonic() >= deadline:
                absent = self._leave(store, key)
                if absent is not None:
                    raise RanksAbsentError(
                        f"{doing} is a collective every rank must enter, but only {absent + 1} of "
                        f"{self.world_size} ranks entered it within {self.timeout_s:g} s.",
                        setting="zero.rendezvous_timeout_s", value=self.timeout_s, rank=self.rank,
                        fix="run it on every rank, or for one rank alone (eval, generate) first call "
                            "`model = trainer.unwrap_model(rank0_only=True)` or enter "
                            "`with trainer.gathered_parameters():` on every rank; raise the timeout if a rank "
                            "is just slow.")
            time.sleep(nap)
            nap = min(nap * 2, _POLL_S[1])
            count = store.add(key, 0)
        self._seq[purpose] = seq + 1
        if self.rank == 0 and seq >= 2:
            store.delete_key(f"{self.prefix}/{purpose}/{seq - 2}")

    def _leave(self, store, key: str) -> int | None:
        """Take this rank's count back atomically: the others' count, or None when the last
        rank came in meanwhile (all are here).  The value written spells the number with
        rank + 1 leading zeros (the store's ``add`` still parses it), so ``compare_set``
        answering with it proves it was this rank's write, not another rank's equal number."""
        while True:
            raw = store.get(key)
            n = int(raw)
            if n >= self.world_size:
                return None
            mine = "0" * (self.rank + 1) + str(n - 1)
            if store.compare_set(key, raw, mine) == mine.encode():
                return n - 1
