"""The reaper process of a private Ray instance (``python -m tierlift.launch.ray_reaper TOKEN``).

Started by :class:`tierlift.launch.ray_fate.Reaper` before Ray; see that module
for why.  It reads its stdin, a pipe whose write end only the driver holds, until
end of file, recording once a second which processes belong to the job (their
environment carries ``TIERLIFT_RAY_JOB=TOKEN``, or they descend from one that
does), then SIGKILLs them and exits.  Standard library only: it starts in
milliseconds and holds no memory worth mentioning.
"""

from __future__ import annotations

import os
import select
import signal
import sys
import time

__all__ = ["JOB_ENV", "kill_job"]

JOB_ENV = "TIERLIFT_RAY_JOB"
_PASSES = 3  # scans of /proc, _PASS_GAP_S apart: catch a process forked during the previous pass
_PASS_GAP_S = 0.2
_TRACK_S = 1.0  # seconds between the reaper's scans while the job runs


def _scan(token: str) -> tuple[dict[int, int], set[int]]:
    """One pass over /proc: (pid -> start time, for every process) and the pids
    whose environment carries ``JOB_ENV=token``."""
    needle = f"{JOB_ENV}={token}".encode()
    started: dict[int, int] = {}
    parent: dict[int, int] = {}
    marked: set[int] = set()
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        pid = int(name)
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()  # after "(comm)", which may hold spaces
            parent[pid], started[pid] = int(fields[1]), int(fields[19])  # ppid, starttime (clock ticks)
            with open(f"/proc/{pid}/environ", "rb") as f:
                if needle in f.read().split(b"\0"):
                    marked.add(pid)
        except (OSError, ValueError, IndexError):  # gone meanwhile, or not ours to read
            continue
    # Descendants of marked processes belong to the job too: Ray's agents rewrite
    # their process title over the environment block, which then reads empty.
    children: dict[int, list[int]] = {}
    for pid, ppid in parent.items():
        children.setdefault(ppid, []).append(pid)
    job, todo = set(), list(marked)
    while todo:
        pid = todo.pop()
        if pid not in job:
            job.add(pid)
            todo.extend(children.get(pid, ()))
    return started, job


def kill_job(token: str, known: dict[int, int]) -> int:
    """SIGKILL this job's processes: those found now and those in ``known`` (pid ->
    start time, recorded while they were still linked to the job; a pid whose
    start time changed is another process now and is left alone).  Returns how many."""
    started, job = _scan(token)
    me, killed = os.getpid(), 0
    targets = {pid: started[pid] for pid in job} | known
    for pid, start in targets.items():
        if pid == me or started.get(pid) != start:
            continue
        try:
            os.kill(pid, signal.SIGKILL)
            killed += 1
        except OSError:
            continue
    return killed


def _main(token: str) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    known: dict[int, int] = {}  # this job's processes seen so far: pid -> start time
    stdin = sys.stdin.buffer.raw
    while True:
        ready, _, _ = select.select([stdin], [], [], _TRACK_S)
        if ready and not stdin.read(1 << 12):
            break  # end of file: the driver is done or dead
        if not ready:  # remember who belongs to the job while the links (parent pids) still show it
            started, job = _scan(token)
            known.update((pid, started[pid]) for pid in job)
    for i in range(_PASSES):
        if i:
            time.sleep(_PASS_GAP_S)
        kill_job(token, known)
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1]))
