"""Local launcher: one subprocess per rank on this machine, torchrun-compatible.

Each rank runs in its own process group so that a signal meant for one rank (or
the launcher's SIGKILL of a hung rank) also reaches the processes that rank
started (data loader workers, compile workers).  The launcher forwards SIGINT and
SIGTERM to every rank group; a second SIGINT kills them.

Sync points: the launcher polls the ranks every ``_POLL_S``; the first non-zero
exit makes it SIGTERM every other rank, wait ``grace_s`` seconds, then SIGKILL
what is left, and return that exit code.  A rank that is still in a collective
with the dead peer would otherwise hang until the process-group timeout.

Output: two reader threads per rank copy stdout and stderr to the console,
each line (or carriage-return progress update) prefixed ``[rank N]`` when there
is more than one rank, and to ``log_dir/rank-N.log``.  The console comes first:
a log that cannot be written (a full disk) costs one warning, never a rank's lines.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from typing import IO, Mapping, Sequence

from tierlift.errors import LaunchError
from tierlift.launch.ports import resolve_master_port
from tierlift.parallel.env import RANK_PREFIX_ENV, DistEnv, usable_cores

__all__ = ["launch_local", "rank_env", "pump_lines", "RankLog"]

_POLL_S = 0.1  # how often the launcher checks for exited ranks
_JOIN_S = 5.0  # how long to wait for a rank's output after it exits (grandchildren may keep the pipe)

_console_lock = threading.Lock()


class RankLog:
    """One rank's log file, shared by its stdout and stderr pumps.

    The first failed write or open (ENOSPC, EIO, a vanished mount) prints one
    warning to the console and turns the log off; the pumps keep copying every
    line to the console.  ``close`` never raises: bytes still buffered when
    the disk is full are lost from the log, not from the console.
    """

    def __init__(self, path: str, console: IO[str] | None = None) -> None:
        self.path = path
        self.console = console
        self.lock = threading.Lock()  # whole segments: stdout and stderr share the file
        self.file: IO[bytes] | None = None
        try:
            self.file = _open_log(path)
        except OSError as exc:
            self._fail(exc)

    def _fail(self, exc: OSError) -> None:
        f, self.file = self.file, None
        if f is not None:
            with contextlib.suppress(OSError):
                f.close()
        console = self.console or sys.stderr
        with contextlib.suppress(OSError, ValueError), _console_lock:
            console.write(f"tierlift: warning: cannot write {self.path} ({exc.strerror or exc}); "
                          f"this rank's output continues on the console only.\n")
            console.flush()

    def write(self, data: bytes) -> None:
        with self.lock:
            if self.file is None:
                return
            try:
                self.file.write(data)
                self.file.flush()
            except OSError as exc:
                self._fail(exc)

    def flush(self) -> None:  # write() flushes; here for pump_lines' file protocol
        pass

    def close(self) -> None:
        with self.lock:
            if self.file is not None:
                try:
                    self.file.close()
                except OSError as exc:
                    self._fail(exc)
                self.file = None


def _open_log(path: str) -> IO[bytes]:
    # Append: a resumed run keeps the earlier attempt's output in the same file.
    return open(path, "ab")


# A segment ends after "\n", or after a "\r" that is not part of "\r\n" (a
# progress bar redrawing its line): both are passed on as they come.
_SEGMENT_END = re.compile(rb"(?<=\n)|(?<=\r)(?!\n)")


def pump_lines(stream: IO[bytes], console: IO[str], prefix: str, log: IO[bytes] | None,
               log_lock: threading.Lock | None = None, errors_shown: set[bytes] | None = None) -> None:
    """Copy ``stream`` to ``console`` segment by segment (with ``prefix``) and raw to ``log``.

    Segments end at a newline or a carriage return, so a rank's progress bar
    updates in place; each is written whole under a lock so ranks do not
    interleave mid-line.  Reads bytes so invalid UTF-8 cannot kill the pump.
    ``errors_shown`` (one set shared by every rank's pumps): a ``tierlift: error:``
    line that another rank already put on the console is not repeated there (a
    collective check fails on every rank with the same words); logs keep it.
    """
    pending = b""
    try:
        while True:
            chunk = stream.read1(1 << 16)
            if not chunk:
                segments, pending = ([pending] if pending else []), b""
            else:
                *segments, pending = _SEGMENT_END.split(pending + chunk)
                if segments and not pending and segments[-1].endswith(b"\r"):
                    pending = segments.pop()  # maybe the first half of "\r\n"
            if segments and log is not None:
                # Whole segments only: the rank's stdout and stderr share this file.
                with log_lock or contextlib.nullcontext():
                    log.write(b"".join(segments))
                    log.flush()
            if segments and errors_shown is not None:
                with _console_lock:
                    segments = [seg for seg in segments if not _seen_error(seg, errors_shown)]
            if segments:
                text = "".join(prefix + seg.decode("utf-8", errors="replace") for seg in segments)
                if not chunk and not text.endswith(("\n", "\r")):
                    text += "\n"
                with _console_lock:
                    console.write(text)
                    console.flush()
            if not chunk:
                break
    except (OSError, ValueError):  # console closed under us (a pipe to `head`)
        pass
    finally:
        stream.close()


def _seen_error(segment: bytes, shown: set[bytes]) -> bool:
    """Whether ``segment`` is a tierlift error line already in ``shown`` (adds it if not)."""
    if not segment.startswith(b"tierlift: error: "):
        return False
    key = segment.rstrip(b"\r\n")
    if key in shown:
        return True
    shown.add(key)
    return False


def rank_env(dist_env: DistEnv, *, nproc: int, base: Mapping[str, str] | None = None,
             env_extra: Mapping[str, str] | None = None, run_dir: str | None = None) -> dict[str, str]:
    """The full environment of one rank: ``base`` + torchrun variables + extras."""
    env = dict(os.environ if base is None else base)
    if env_extra:
        env.update(env_extra)
    env.update(dist_env.to_environ())
    # Unbuffered output so lines reach the console while the rank runs, not at exit.
    env.setdefault("PYTHONUNBUFFERED", "1")
    # Like torchrun: N ranks sharing the cores must not each start a full-size
    # OpenMP pool (init_distributed also sets torch's intra-op threads).
    env.setdefault("OMP_NUM_THREADS", str(max(1, usable_cores() // dist_env.local_world_size)))
    # Expandable segments keep the caching allocator's fragmentation near zero when
    # activation sizes vary from unit to unit (long context: an OOM at seq 128k on an H200
    # had 48.6 GiB reserved but unallocated).  A user's own setting wins.
    env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    if run_dir is not None:
        env["TIERLIFT_RUN_DIR"] = os.path.abspath(run_dir)
    env.pop(RANK_PREFIX_ENV, None)  # inherited from an outer launch: not this launcher's doing
    if nproc > 1:  # the same condition under which launch_local and the Ray worker prefix lines
        env[RANK_PREFIX_ENV] = "1"
    return env


def _die_with_parent() -> None:
    """In the child, before exec: ask the kernel to SIGKILL this rank when the
    launcher dies (even by SIGKILL, when no handler of ours can run), so no rank
    trains on as an orphan and races a restarted job for the run directory."""
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the launcher's own handlers still stop ranks
        pass


def _signal_groups(procs: Sequence[subprocess.Popen], sig: int) -> None:
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, sig)
            except (ProcessLookupError, PermissionError):
                pass


def _stop_all(procs: Sequence[subprocess.Popen], grace_s: float) -> None:
    """SIGTERM every live rank group, then SIGKILL whatever outlives ``grace_s``."""
    _signal_groups(procs, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(p.poll() is None for p in procs):
        time.sleep(_POLL_S)
    _signal_groups(procs, signal.SIGKILL)
    for p in procs:
        p.wait()


def _exit_code(returncode: int) -> int:
    # Popen reports death by signal N as -N; shells (and torchrun) report 128 + N.
    return 128 - returncode if returncode < 0 else returncode


def _wait_for_outcome(procs: Sequence[subprocess.Popen], peer_lost_code: int | None, grace_s: float) -> int:
    """Poll the ranks until all exited 0 (returns 0) or one failed (returns its code).

    A rank exiting with ``peer_lost_code`` only lost a peer that failed first, so
    for up to ``grace_s`` the launcher waits for the peer's own failure and
    returns that code instead.
    """
    deadline = None
    while True:
        codes = [p.poll() for p in procs]
        failed = [_exit_code(c) for c in codes if c not in (None, 0)]
        primary = [c for c in failed if c != peer_lost_code]
        if primary:
            return primary[0]
        if failed and deadline is None:
            deadline = time.monotonic() + grace_s
        if None not in codes or (deadline is not None and time.monotonic() >= deadline):
            if failed:
                print("tierlift: error: rank(s) lost the connection to the other ranks and no rank said why. "
                      "Fix: rerun with --debug for each rank's traceback, and check that no rank was killed "
                      "(e.g. `dmesg` for the out-of-memory killer).", file=sys.stderr)
            return failed[0] if failed else 0
        time.sleep(_POLL_S)


def launch_local(cmd: list[str], nproc: int, *, env_extra: Mapping[str, str] | None = None,
                 log_dir: str | None = None, master_port: int = 0, run_dir: str | None = None,
                 nnodes: int = 1, node_rank: int = 0, grace_s: float = 5.0,
                 port_setting: str = "--master-port", peer_lost_code: int | None = None) -> int:
    """Run ``cmd`` as ``nproc`` ranks on this machine; return the job's exit code.

    0 when every rank exits 0; otherwise the exit code of the first rank seen
    failing (128 + N for death by signal N), after the other ranks were stopped.
    ``peer_lost_code``: the exit code by which a rank says it failed only because
    a peer went away (``tierlift train``'s workers); another rank's code wins.
    ``nnodes``/``node_rank`` are the seam for multi-node; only one node is
    implemented here.
    """
    if not cmd:
        raise LaunchError("no command given.", setting="command", value=cmd,
                          fix="put the command after --, e.g. tierlift launch --nproc 2 -- python train.py.")
    if nproc < 1:
        raise LaunchError("must be >= 1.", setting="--nproc", value=nproc, fix="give the number of ranks.")
    if nnodes != 1 or node_rank != 0:
        raise LaunchError("the local launcher runs on one node only.", setting="--nnodes", value=nnodes,
                          fix="use --backend ray for multi-node runs.")
    port = resolve_master_port(master_port, "127.0.0.1", setting=port_setting)
    logs: list[RankLog | None] = [None] * nproc
    if log_dir is not None:
        try:
            os.makedirs(log_dir, exist_ok=True)
        except OSError as exc:
            raise LaunchError(f"cannot create the log directory: {exc.strerror or exc}.", setting="--run-dir",
                              value=os.path.dirname(log_dir), fix="give a writable run directory.") from None
        logs = [RankLog(os.path.join(log_dir, f"rank-{r}.log"), sys.stderr) for r in range(nproc)]
    procs: list[subprocess.Popen] = []
    pumps: list[threading.Thread] = []
    errors_shown: set[bytes] = set()  # one rank's error line on the console, not N copies
    interrupted: list[int] = []

    def forward(signum, _frame):
        if interrupted and signum == signal.SIGINT:
            _signal_groups(procs, signal.SIGKILL)  # second Ctrl-C: stop waiting politely
        interrupted.append(signum)
        _signal_groups(procs, signum)

    in_main = threading.current_thread() is threading.main_thread()
    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)} if in_main else {}
    try:
        for r in range(nproc):
            dist_env = DistEnv(rank=r, local_rank=r, world_size=nproc, local_world_size=nproc,
                               master_addr="127.0.0.1", master_port=port, node_rank=0)
            env = rank_env(dist_env, nproc=nproc, env_extra=env_extra, run_dir=run_dir)
            try:
                p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     stdin=subprocess.DEVNULL, start_new_session=True,
                                     preexec_fn=_die_with_parent)
            except OSError as exc:
                raise LaunchError(f"cannot start the command: {exc.strerror}.", setting="command",
                                  value=cmd[0], fix="check the program name and that it is executable.") from None
            procs.append(p)
            prefix = f"[rank {r}] " if nproc > 1 else ""
            lock = threading.Lock()  # stdout and stderr of one rank share its log file
            for stream, console in ((p.stdout, sys.stdout), (p.stderr, sys.stderr)):
                t = threading.Thread(target=pump_lines,
                                     args=(stream, console, prefix, logs[r], lock, errors_shown),
                                     name=f"tierlift-rank{r}-pump", daemon=True)
                t.start()
                pumps.append(t)

        failed = _wait_for_outcome(procs, peer_lost_code, grace_s)
        if failed:
            _stop_all(procs, grace_s)
        if interrupted:
            return 128 + interrupted[0]
        return failed
    finally:
        _stop_all(procs, grace_s=0 if interrupted else grace_s)  # no-op when all have exited
        for s, h in old.items():
            signal.signal(s, h)
        for t in pumps:
            t.join(_JOIN_S)
        for f in logs:
            if f is not None:
                f.close()
