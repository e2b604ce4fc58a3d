"""The private Ray instance of ``launch_ray`` shares the driver's fate.

Without this, a SIGKILL of the driver (the ``tierlift`` process) leaves the
rank workers training and committing checkpoints for 2-3 s until they notice
that their raylet is gone, and Ray's agents (dashboard agent, runtime-env
agent) live on for 60-80 s.  Two mechanisms, both for a local instance only (a
cluster given by address is not ours to stop):

- each rank worker watches the driver's pid through a pidfd (Linux >= 5.3) on
  a daemon thread and ``os._exit``\\ s the moment the driver is gone: no step
  and no checkpoint commit runs after it (the pidfd wakes within milliseconds;
  a commit is one atomic rename, so it lands whole or not at all);
- a reaper process (``python -m tierlift.launch.ray_fate``) started before Ray
  holds the read end of a pipe whose write end only the driver has (pipes are
  not inherited by Ray's processes: PEP 446).  End of file -- the driver closed
  it after ``ray.shutdown()``, or the kernel closed it when the driver died --
  makes the reaper SIGKILL every process whose environment carries this job's
  random token (``TIERLIFT_RAY_JOB``, which every Ray process inherits from the
  driver), and their descendants, and exit.  Descendants are recorded once a
  second while the job runs: when the driver dies the kernel kills gcs_server
  and raylet at once (Ray's own fate sharing), and the agents they started are
  orphaned before the reaper could follow the parent links.  Nothing else is
  touched: the token is 128 random bits, and a recorded pid is killed only while
  its start time still matches.
"""

from __future__ import annotations

import os
import secrets
import select
import signal
import subprocess
import sys
import threading
import time
__all__ = ["JOB_ENV", "DRIVER_LOST_EXIT", "Reaper", "exit_with_driver", "kill_job"]

JOB_ENV = "TIERLIFT_RAY_JOB"
DRIVER_LOST_EXIT = 137  # as if SIGKILLed with the driver: what the user did to the job
_PASSES = 3  # scans of /proc, _PASS_GAP_S apart: catch a process forked during the previous pass
_PASS_GAP_S = 0.2
_TRACK_S = 1.0  # seconds between the reaper's scans while the job runs


class Reaper:
    """The reaper process of one ``launch_ray`` call: ``token`` goes into Ray's
    environment; ``close()`` after ``ray.shutdown()`` stops what Ray left behind."""

    def __init__(self) -> None:
        self.token = secrets.token_hex(16)
        env = {k: v for k, v in os.environ.items() if k != JOB_ENV}
        self._proc = subprocess.Popen([sys.executable, "-m", __name__, self.token], stdin=subprocess.PIPE,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                                      start_new_session=True)  # a Ctrl-C meant for the job must not stop it

    def close(self, timeout_s: float = 10.0) -> None:
        """End of file for the reaper; wait (bounded) until it has swept and exited."""
        if self._proc.stdin is not None:
            self._proc.stdin.close()
        try:
            self._proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()


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


def exit_with_driver(driver_pid: int) -> None:
    """In a rank worker: exit at once when the process ``driver_pid`` ends."""
    try:
        fd = os.pidfd_open(driver_pid)
    except ProcessLookupError:
        os._exit(DRIVER_LOST_EXIT)  # gone before we looked
    except (OSError, AttributeError):  # no pidfd (old kernel): the reaper still stops this worker
        return

    def watch() -> None:
        select.select([fd], [], [])  # readable once the driver has exited
        os._exit(DRIVER_LOST_EXIT)

    threading.Thread(target=watch, name="tierlift-driver-watch", daemon=True).start()


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
