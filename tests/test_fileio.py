"""Atomic writes and the temp files a killed writer leaves behind."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from pathlib import Path

from fgvc.fileio import atomic_path, atomic_write_text, owner_tag


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_write_removes_the_temp_files_of_dead_writers_on_this_host_only(tmp_path: Path) -> None:
    """A SIGKILLed `fgvc predict --force` leaves half a probability file (gigabytes at iNat scale) under a temp name;
    the next write into the folder removes it, but never a temp file a live process or another machine is writing."""
    host = owner_tag().rpartition("-")[0]
    dead = tmp_path / f".test-448-tencrop.npz.{host}-{_dead_pid()}.k3x9q2ab.tmp"
    draft = tmp_path / f".inat2019.{host}-{_dead_pid()}.draft"  # a killed ensemble's checked-but-unpublished CSV
    probs_draft = tmp_path / f".inat2019.npz.{host}-{_dead_pid()}.draft"  # and the probabilities it was to publish
    fresh_draft = tmp_path / f".inat2019.{host}-{_dead_pid()}.draft"  # unlocked: only its age tells it is abandoned
    live = tmp_path / f".val-448-none.npz.{host}-{os.getppid()}.a1b2c3d4.tmp"
    other_host = tmp_path / f".test-448-tencrop.npz.{host}x-{_dead_pid()}.k3x9q2ab.tmp"
    foreign = tmp_path / ".notes.tmp"  # not written by fgvc: not its to remove
    for path in (dead, draft, probs_draft, fresh_draft, live, other_host, foreign):
        path.write_bytes(b"half")
    old = draft.stat().st_mtime - 7 * 3600
    os.utime(draft, (old, old))
    os.utime(probs_draft, (old, old))
    atomic_write_text(tmp_path / "other.csv", "a,b\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [live.name, other_host.name, foreign.name, fresh_draft.name, "other.csv"]
    )


def test_a_temp_name_says_which_process_writes_it(tmp_path: Path) -> None:
    with atomic_path(tmp_path / "best.pt") as tmp:
        tmp.write_bytes(b"x")
        assert tmp.name.startswith(f".best.pt.{owner_tag()}.") and tmp.name.endswith(".tmp")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt"]


def test_a_temp_file_whose_writer_still_holds_it_is_kept_even_if_its_pid_looks_dead(tmp_path: Path) -> None:
    """Two containers with one host name and their own PID namespaces share a folder: the other writer's pid means
    nothing here, its lock does."""
    host = owner_tag().rpartition("-")[0]
    live = tmp_path / f".test-448-tencrop.npz.{host}-{_dead_pid()}.k3x9q2ab.tmp"
    live.write_bytes(b"half")
    fd = os.open(live, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # the writer, alive in its own namespace
        atomic_write_text(tmp_path / "a.csv", "x\n")
        assert live.exists()
    finally:
        os.close(fd)  # the writer is killed: its lock goes with it
    atomic_write_text(tmp_path / "b.csv", "x\n")
    assert not live.exists()


def test_a_full_disk_names_the_file_being_written(tmp_path: Path) -> None:
    """A write or the flush at close on a full disk raises an OSError with no file name: the CLI printed a traceback."""
    import errno

    import pytest

    from fgvc.fileio import atomic_write

    def full(fh: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    target = tmp_path / "best.pt"
    target.write_text("the earlier result\n")
    with pytest.raises(OSError) as caught:
        atomic_write(target, full)
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(target)
    assert target.read_text() == "the earlier result\n" and [p.name for p in tmp_path.iterdir()] == ["best.pt"]


def test_a_folder_that_cannot_take_a_result_fails_before_the_work(tmp_path: Path, monkeypatch) -> None:
    """Read-only storage (EROFS, which root meets too) or a file in the folder's place: named now, not after hours."""
    import errno
    import tempfile

    import pytest

    from fgvc.fileio import require_writable

    require_writable(tmp_path / "new" / "predictions")  # created, and nothing left in it
    assert list((tmp_path / "new" / "predictions").iterdir()) == []
    (tmp_path / "taken").write_text("a file\n")
    with pytest.raises(FileExistsError) as caught:
        require_writable(tmp_path / "taken")
    assert caught.value.filename == str(tmp_path / "taken")

    def read_only(*args: object, **kwargs: object) -> tuple[int, str]:
        raise OSError(errno.EROFS, "Read-only file system", str(tmp_path / "mount" / ".probe.x.tmp"))

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    with pytest.raises(OSError) as caught:
        require_writable(tmp_path / "mount")
    assert caught.value.errno == errno.EROFS and caught.value.filename == str(tmp_path / "mount")
