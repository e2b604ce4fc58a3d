"""NVMe scratch files: say where they are, close and remove them when the process exits.

A rank's extent file (and its checksum sidecar) holds optimizer state (and
parameters) only while the process runs: checkpoints copy what a resume needs, and
a new run truncates a stale file.  So the file is scratch, and by default it is
deleted when the interpreter exits (``atexit``: a return from main, ``sys.exit``,
an uncaught exception -- not SIGKILL or ``os._exit``), together with its directory
when tierlift created that directory and nothing else is left in it.
``offload.optimizer.keep_files: true`` leaves them in place.

Either way its owner (the host optimizer) is closed at exit, unless it was closed
before: its worker and the file's I/O threads still alive while Python finalises
abort the process now and then ("terminate called without an active exception",
exit 134) after a good run.  Closing the owner closes the file, which removes it
unless kept; the hook then removes the directory.

Only what tierlift created is removed: the file only while its path still names
the file this process opened (same device and inode), never a file put there
since; the directory only with ``os.rmdir`` (an empty one).
"""

from __future__ import annotations

import atexit
import logging
import os
from typing import Callable

from tierlift.offload.nvme import NVMeFile

__all__ = ["release_at_exit"]

log = logging.getLogger(__name__)


def release_at_exit(f: NVMeFile, *, keep: bool, created_dir: bool, setting: str,
                    close: Callable[[], None] | None = None) -> None:
    """Log where ``f`` lives and close it at exit (through ``close``, its owner's
    close, which must close ``f``; default ``f.close``), removing it unless ``keep``.
    ``created_dir``: ``f.dir`` did not exist before tierlift opened the file."""
    f.keep = keep  # an engine's close() before exit honours the setting too
    section = setting.rsplit(".", 1)[0]
    log.info("NVMe state of rank %d: %s (%s)", f.rank, f.path,
             f"kept after the run: {section}.keep_files is true" if keep
             else f"removed at exit; set {section}.keep_files: true to keep it")
    st = os.fstat(f._fd)
    atexit.register(_at_exit, f, close or f.close, (st.st_dev, st.st_ino),
                    f.dir if created_dir and not keep else None)


def _same_file(path: str, ident: tuple[int, int]) -> bool:
    try:
        st = os.stat(path)
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == ident


def _at_exit(f: NVMeFile, close: Callable[[], None], ident: tuple[int, int], created_dir: str | None) -> None:
    try:
        if not f.keep and not _same_file(f.path, ident):
            f.keep = True  # the path names another file now: not ours to delete
        if not f._closed:  # else the engine was closed before exit, and this file with it
            close()  # waits for I/O in flight, stops the threads; the file is unlinked unless keep
    except Exception as e:  # an exit hook must not turn a finished run into a failed one
        log.warning("could not close NVMe scratch file %s at exit: %s", f.path, e)
    if created_dir is not None:
        try:
            os.rmdir(created_dir)
        except OSError:
            pass  # not empty (another rank's file, or the user's): leave it
