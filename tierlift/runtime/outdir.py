"""Output directories the user names (``--run-dir``, ``export --out``, ``data
prepare --out``): created if missing and proven writable before any work starts.

Permission bits alone do not answer "can I write here": root ignores them, a
read-only mount, ``/proc`` or ``/sys`` refuse writes whatever the bits say, and a
regular file somewhere in the path makes every child path invalid.  So the check
creates the directory and then a probe file in it (removed at once), and turns
each failure into one line naming the setting, the path and the fix.
"""

from __future__ import annotations

import errno
import os
import tempfile

from tierlift.errors import TierliftError

__all__ = ["ensure_writable_dir", "write_text_atomic"]


def _file_in_path(path: str) -> str | None:
    """The first component of ``path`` that exists and is not a directory."""
    parts = os.path.abspath(path).split(os.sep)
    for i in range(2, len(parts) + 1):
        prefix = os.sep.join(parts[:i])
        if os.path.lexists(prefix) and not os.path.isdir(prefix):
            return prefix
    return None


def ensure_writable_dir(path: str | os.PathLike, *, setting: str, error: type[TierliftError]) -> str:
    """Create ``path`` (with parents) and check that a file can be written in it.

    Returns the absolute path.  Raises ``error`` with one line otherwise; nothing
    that existed before is touched (only the missing directories and a probe
    file, removed again, are created).
    """
    path = os.path.abspath(os.fspath(path))
    fix = "give a writable directory (not a file, not on a read-only mount, not under /proc or /sys)."
    blocker = _file_in_path(path)
    if blocker is not None:
        what = "is a file" if blocker == path else f"has a file in its path ({blocker})"
        raise error(f"{what}, so it cannot be a directory.", setting=setting, value=path, fix=fix)
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise error(f"cannot create the directory: {exc.strerror or exc}.", setting=setting, value=path,
                    fix=fix) from None
    if not os.path.isdir(path):  # e.g. a dangling symlink that makedirs accepted
        raise error("is not a directory.", setting=setting, value=path, fix=fix)
    try:
        fd, probe = tempfile.mkstemp(prefix=".tierlift-probe-", dir=path)
    except OSError as exc:
        why = "read-only file system" if exc.errno == errno.EROFS else (exc.strerror or str(exc))
        raise error(f"cannot write a file there: {why}.", setting=setting, value=path, fix=fix) from None
    os.close(fd)
    os.unlink(probe)
    return path


def write_text_atomic(path: str, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename, so a
    reader never sees half a file and a failed write leaves the old one."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
