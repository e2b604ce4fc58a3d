"""Quiet an NVMe file's worker threads before the interpreter finalizes.

``fit()`` returns with NVMe requests still in flight (write-behind of the last
step's state, prefetches), on daemon worker threads that run torch ops and
``pread``/``pwrite`` into pinned buffers.  If the script simply ends, Python
finalizes while such a thread is inside a torch (C++) call: when it comes back
for the GIL it is unwound by ``pthread_exit`` through C++ frames that do not
allow it, and the process aborts ("terminate called without an active
exception", exit 134; torchrun reports exit 1) after a perfectly good run.
Seen on CPU in about 1 of 15 runs of a single-rank script with parameters and
optimizer state on NVMe.

So every file registers an ``atexit`` hook (a weak reference: it keeps nothing
alive) that waits for the file's pending requests and stops and joins its
workers.  ``atexit`` hooks run before finalization, last registered first: this
one runs before the pinned-memory finalizers (registered at import) unmap the
buffers the workers read into, and before ``shutdown_distributed``.  The waits
are bounded (``EXIT_WAIT_S`` each): a run that failed mid-step may hold requests
that never finish, and exiting must not hang on them.  The file itself is left
to ``close()`` / ``tierlift.offload.scratch``.
"""

from __future__ import annotations

import atexit
import weakref
from typing import Any

__all__ = ["stop_workers_at_exit", "EXIT_WAIT_S"]

EXIT_WAIT_S = 30.0  # seconds, per wait: pending I/O, then each worker's join


def stop_workers_at_exit(f: Any) -> None:
    """Register the exit hook for ``f`` (an ``NVMeFile`` whose workers are started)."""
    atexit.register(_stop_workers, weakref.ref(f))


def _stop_workers(ref: "weakref.ref[Any]") -> None:
    f = ref()
    if f is None or f._closed:  # collected, or closed (workers joined) already
        return
    with f._idle:
        f._idle.wait_for(lambda: f._pending == 0, timeout=EXIT_WAIT_S)
    for _ in f._workers:
        f._q.put(None)  # each worker exits at its next get()
    for t in f._workers:
        t.join(timeout=EXIT_WAIT_S)
