"""One training process per stage folder.

A second start on the same folder (a job submitted twice, a scheduler's requeue while the old job still runs) would
resume from the same ``last.pt`` and interleave two runs' checkpoints, history and ``best.pt``. The stage holds an
advisory ``flock`` on ``<stage>/.lock`` while it trains; the kernel releases it however the holder ends (SIGKILL and
OOM kills included, and on NFS when the client's lease lapses), so there is no stale lock to clean up.
"""

from __future__ import annotations

import datetime as dt
import errno
import fcntl
import logging
import os
import re
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from fgvc.errors import RunBusyError
from fgvc.fileio import at_path, process_running

LOCK_FILE = ".lock"
_UNSUPPORTED = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}  # a filesystem without flock
log = logging.getLogger("fgvc")


@contextmanager
def stage_lock(stage_dir: Path, shared: bool = False) -> Iterator[None]:
    """Hold ``stage_dir``'s lock for the body; :class:`RunBusyError` if another process holds it.

    ``shared``: a stage 2 holds its stage 1's folder this way while it adapts that model, so that a forced retraining
    of stage 1 (which takes it exclusively) cannot retire the model under it; stage 2s at several resolutions still run
    side by side. Folders created for an exclusive lock, and its file, are gone again afterwards: a start that fails
    before its first checkpoint leaves the run folder as it found it.
    """
    created = [] if shared else _missing_folders(stage_dir)
    stage_dir.mkdir(parents=True, exist_ok=True)
    path = stage_dir / LOCK_FILE
    fd = None
    try:
        fd = _acquire(path, shared)
        yield
    finally:
        if fd is not None:
            if not shared:  # while held: a process that opened this file finds it replaced and retries
                path.unlink(missing_ok=True)
            os.close(fd)
        for folder in reversed(created):  # deepest first; only empty ones
            try:
                folder.rmdir()
            except OSError:
                break


def holder(stage_dir: Path) -> str | None:
    """Who trains ``stage_dir`` now ("pid N on host H since T"), or None if no process does."""
    path = stage_dir / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _read(fd) or "another process"
    except OSError:
        return None
    finally:
        os.close(fd)  # also releases the shared lock taken
    return None


def _acquire(path: Path, shared: bool) -> int | None:
    """The held lock's file descriptor; None where the filesystem has no locks (warned: the run is unprotected).

    A lock that stays taken for a second is another run's: :func:`holder`'s probe holds it for microseconds."""
    deadline = time.monotonic() + 1.0
    while True:
        try:  # a shared lock needs no write access: stage 1's folder may be read-only (archived, another user's)
            fd = os.open(path, (os.O_RDONLY if shared else os.O_RDWR) | os.O_CREAT, 0o666)
        except FileNotFoundError:  # a failed start beside this one removed the folder it had created
            path.parent.mkdir(parents=True, exist_ok=True)
            continue
        except OSError as err:
            if not shared or err.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise
            log.warning("%s: cannot lock a folder this process may not write; nothing stops its retraining while this "
                        "process reads its model", path.parent)  # fmt: skip
            return None
        if shared:  # a reader may create the file: the folder's owner must still open it for writing afterwards
            with suppress(OSError):
                if os.fstat(fd).st_uid == os.geteuid():
                    os.fchmod(fd, 0o666)
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            if time.monotonic() < deadline:
                os.close(fd)
                time.sleep(0.05)
                continue
            who = _read(fd)  # written by an exclusive holder only
            os.close(fd)
            if not who and not shared:  # shared holders alone: readers of the model, which a retraining would retire
                raise RunBusyError(f"{path.parent}: its model is being read by another process (a stage 2 adapting it, "
                                   "an ensemble); wait for it to end, then rerun this command") from None  # fmt: skip
            who = who or "another process"
            if shared:  # a reader of the model (stage 2, an ensemble) while it is being retrained
                raise RunBusyError(f"{path.parent} is being trained by {who}, which will replace its model; wait for "
                                   "it to end, then rerun this command") from None  # fmt: skip
            raise RunBusyError(
                f"{path.parent} is being trained by {who}; wait for it to end (a second run there would mix its "
                "checkpoints into that run's), or stop that process and rerun this command to resume"
            ) from None
        except OSError as err:
            os.close(fd)
            if err.errno not in _UNSUPPORTED:
                raise
            log.warning("%s: this filesystem takes no locks; nothing stops a second run from starting in this "
                        "folder at the same time", path.parent)  # fmt: skip
            return None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # its last holder removed the file after we opened it: lock the one at the path now
    if not shared:
        started = dt.datetime.now().isoformat(timespec="seconds")
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"pid {os.getpid()} on host {socket.gethostname()} since {started}".encode())
            os.fsync(fd)  # seen at once by other hosts (NFS caches writes), which name the holder from it
        except OSError as err:  # a full disk: these name no file
            os.close(fd)
            raise at_path(err, path) from err
    return fd


def _read(fd: int) -> str:
    """The holder the lock file names, "" where it names none, or a process of this host that is gone: a holder
    killed by SIGKILL leaves its line, which a later reader (a stage 2, an ensemble) keeps while it holds the file."""
    try:
        text = os.pread(fd, 1024, 0).decode(errors="replace").strip()
    except OSError:
        return ""
    named = re.match(r"pid (\d+) on host (\S+) ", text)
    if named and named[2] == socket.gethostname() and not process_running(int(named[1])):
        return ""
    return text


def _missing_folders(folder: Path) -> list[Path]:
    """``folder`` and its missing parents, outermost first."""
    missing: list[Path] = []
    while not folder.exists():
        missing.insert(0, folder)
        if folder.parent == folder:
            break
        folder = folder.parent
    return missing
