"""Atomic writes: a temp file in the same folder, fsync, then rename, so a crash never leaves half a file.

A process killed mid-write (SIGKILL, the OOM killer) runs no cleanup: its temp file stays. Temp names carry the writing
process's host and pid, and the writer holds an ``flock`` on its temp file until the rename, so that the next write
into that folder on that host removes the ones whose process is gone (a probability file's temp can be gigabytes):
never one that another host's process writes, nor a live one's (a pid that looks dead from another PID namespace, a
container on the same host name, still holds its lock). An ensemble's draft CSV (``.<competition>.<host>-<pid>.draft``)
holds no lock: it goes once its process is gone and it is older than any draft lives.
"""

from __future__ import annotations

import fcntl
import os
import re
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_leftovers(path.parent)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.{owner_tag()}.", suffix=".tmp", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        with suppress(OSError):  # held until the rename: tells a cleanup in another PID namespace this write is alive
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_name, 0o666 & ~umask)  # mkstemp makes 0600; results should be readable like any other file
        yield tmp
        with open(tmp, "rb+") as fh:
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        try:
            tmp.unlink(missing_ok=True)  # gone already after the rename
        finally:
            os.close(fd)


def at_path(err: OSError, path: str | Path) -> OSError:
    """``err`` naming ``path``: a write, a flush or an fsync that fails (a full disk) names no file, or a temp file the
    user never heard of; the CLI prints the file name and the reason (see ``fgvc.cli.main``)."""
    return OSError(err.errno, err.strerror, str(path))


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], object]) -> None:
    """Call ``write(fileobj)`` on a temp file, then move it over ``path``.

    An error writing the temp file (a full disk: a write, the flush at close or the fsync, which name no file, or the
    temp file's creation) names ``path``, the file the user knows.
    """
    try:
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            write(fh)
    except OSError as err:
        named = err.filename is not None and not Path(str(err.filename)).name.startswith(f".{Path(path).name}.")
        if named or err.errno is None:  # another file's error, or one made up by the caller's code: as it is
            raise
        raise at_path(err, path) from err


def require_writable(folder: str | Path) -> None:
    """Create ``folder`` and write a probe file there: read-only storage, a file in its place or missing permissions
    fail now, naming the folder, rather than after the hours of work whose result goes there."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=f".probe.{owner_tag()}.", suffix=".tmp", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise at_path(err, folder) from err


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda fh: fh.write(text.encode()))


DRAFT_LIFETIME_S = 6 * 3600
_OWNED = re.compile(r"\.(?P<host>[\w-]+)-(?P<pid>\d+)\.(?:\w+\.tmp|draft)$")  # .<name>.<host>-<pid>.<random>.tmp


def owner_tag() -> str:
    """``<host>-<pid>`` of this process, as its temp files' and drafts' names carry it."""
    return f"{re.sub(r'[^A-Za-z0-9_-]', '_', socket.gethostname())}-{os.getpid()}"


def remove_dead_leftovers(folder: Path) -> None:
    """Delete the hidden temp files and drafts in ``folder`` left by processes of this host that no longer run."""
    host = owner_tag().rpartition("-")[0]
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for name in names:
        owned = _OWNED.search(name) if name.startswith(".") else None
        if not owned or owned["host"] != host or process_running(int(owned["pid"])):
            continue
        if name.endswith(".draft"):  # a draft lives from its write to its publication: minutes, never hours
            with suppress(OSError):
                if time.time() - (folder / name).stat().st_mtime > DRAFT_LIFETIME_S:
                    (folder / name).unlink()
        else:
            remove_if_abandoned(folder / name)


def remove_if_abandoned(path: Path) -> None:
    """Delete ``path`` unless a live writer holds its lock. Kept when that cannot be told (a filesystem without locks)
    or the file cannot be opened or deleted (another user's, in a shared folder, is left to its owner)."""
    try:
        fd = os.open(path, os.O_RDWR)  # NFS emulates flock with fcntl locks: an exclusive one needs write access
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        path.unlink()
    except OSError:
        pass
    finally:
        os.close(fd)


def process_running(pid: int) -> bool:
    """Whether a process of this host has this pid (another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
