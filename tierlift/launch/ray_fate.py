"""The private Ray instance of ``launch_ray`` shares the driver's fate.

Without this, a SIGKILL of the driver (the ``tierlift`` process) leaves the
rank workers training and committing checkpoints for 2-3 s until they notice
that their raylet is gone, and Ray's agents (dashboard agent, runtime-env
agent) live on for 60-80 s.  Two mechanisms, both for a local instance only (a
cluster given by address is not ours to stop):

- each rank worker watches the driver's pid through a pidfd (Linux >= 5.3) on
  a daemon thread and ``os._exit``\\ s the moment the driver is gone: no step
  and no checkpoint commit runs after it (the pidfd wakes within milliseconds,
  and the checkpoint code asks it once more right before each commit's rename:
  ``checkpoint.COMMIT_CHECKS``);
- a reaper process (``python -m tierlift.launch.ray_reaper``) started before Ray
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
import subprocess
import sys
import threading

from tierlift.launch import ray_reaper
from tierlift.launch.ray_reaper import JOB_ENV
from tierlift.runtime.checkpoint import COMMIT_CHECKS

__all__ = ["JOB_ENV", "DRIVER_LOST_EXIT", "Reaper", "exit_with_driver"]

DRIVER_LOST_EXIT = 137  # as if SIGKILLed with the driver: what the user did to the job


class Reaper:
    """The reaper process of one ``launch_ray`` call: ``token`` goes into Ray's
    environment; ``close()`` after ``ray.shutdown()`` stops what Ray left behind."""

    def __init__(self) -> None:
        self.token = secrets.token_hex(16)
        env = {k: v for k, v in os.environ.items() if k != JOB_ENV}
        self._proc = subprocess.Popen([sys.executable, "-m", ray_reaper.__name__, self.token],
                                      stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                      env=env, start_new_session=True)  # a Ctrl-C for the job must not stop it

    def close(self, timeout_s: float = 10.0) -> None:
        """End of file for the reaper; wait (bounded) until it has swept and exited."""
        if self._proc.stdin is not None:
            self._proc.stdin.close()
        try:
            self._proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()


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

    def before_commit() -> None:  # the watcher may not have run yet: look again, without waiting
        if select.select([fd], [], [], 0)[0]:
            os._exit(DRIVER_LOST_EXIT)

    COMMIT_CHECKS.append(before_commit)
    threading.Thread(target=watch, name="tierlift-driver-watch", daemon=True).start()
