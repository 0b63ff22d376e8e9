"""`--gpus N`: re-launch the same command under torchrun, one process per GPU."""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from typing import Any

_PR_SET_PDEATHSIG = 1  # prctl option: the signal this process gets when its parent dies (Linux)
ONCE_DIR_ENV = "FGVC_ONCE_DIR"  # set by launch_torchrun: where the ranks claim the error lines they print
LOST_CONTACT_EXIT = 3  # a rank whose collective failed because another rank ended: that rank's code is the run's


def strip_option(argv: list[str], name: str) -> list[str]:
    """``argv`` without ``name VALUE`` / ``name=VALUE``."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == name:
            skip = True
            continue
        if arg.startswith(name + "="):
            continue
        out.append(arg)
    return out


def already_distributed() -> bool:
    return "WORLD_SIZE" in os.environ


def launch_torchrun(nproc: int, argv: list[str]) -> int:
    """Run ``python -m fgvc ARGV`` under torchrun on this node and return its exit code.

    SIGINT/SIGTERM (and SIGHUP, as SIGTERM) sent to this process are passed on to torchrun, once, which passes them to
    the workers, who save a checkpoint; this process waits for them instead of leaving them orphaned. torchrun runs in
    a session of its own: a Ctrl-C in the terminal reaches this process only. Sent to the whole process group as well,
    it reached torchrun twice, and the second signal interrupted its shutdown, which then sent the workers a SIGTERM on
    top of the SIGINT, and a worker that gets two signals aborts without saving.
    """
    # "--" ends torchrun's own options: otherwise its parser takes fgvc's --run for an abbreviation of --run-path.
    # torchrun through _torchrun_main below: a rank's one-line error keeps its exit code 2, without torchrun's report.
    cmd = [sys.executable, "-m", "fgvc.engine.launch", "--standalone", f"--nproc_per_node={nproc}", "-m", "--"]
    received: list[int] = []
    child: subprocess.Popen | None = None

    def forward(signum: int, _frame: object) -> None:
        received.append(signum)
        if child is not None:
            child.send_signal(signal.SIGTERM if signum == signal.SIGHUP else signum)

    # installed before the child starts: a signal in between would kill this process and leave torchrun running
    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    # torchrun's own default for several processes, said here so that it does not print its banner about it
    env = {"OMP_NUM_THREADS": "1"} if nproc > 1 and "OMP_NUM_THREADS" not in os.environ else {}
    once_dir = tempfile.mkdtemp(prefix="fgvc-once-")
    env[ONCE_DIR_ENV] = once_dir
    try:
        child = subprocess.Popen([*cmd, "fgvc", *strip_option(argv, "--gpus")], start_new_session=True,
                                 preexec_fn=_terminate_with_parent, env=os.environ | env)  # fmt: skip
        if received:  # arrived while it started
            child.send_signal(signal.SIGTERM if received[0] == signal.SIGHUP else received[0])
        code = child.wait()
    finally:
        if child is not None and child.poll() is None:  # this process is leaving on an exception: so does torchrun
            child.terminate()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        shutil.rmtree(once_dir, ignore_errors=True)
    return 128 + received[0] if received else code


def first_to_say(line: str) -> bool:
    """Whether this process is the first of its ``--gpus`` launch to print ``line``: an error every rank hits (a
    wrong path, a finished run) was printed once per rank. Always True outside such a launch (a torchrun started by
    hand, several nodes): each process then prints its own."""
    folder = os.environ.get(ONCE_DIR_ENV)
    if not folder:
        return True
    try:
        fd = os.open(os.path.join(folder, hashlib.sha1(line.encode()).hexdigest()), os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return False
    except OSError:  # the folder is gone or unwritable: better twice than never
        return True
    os.close(fd)
    return True


def _terminate_with_parent() -> None:
    """In the child, before torchrun starts: SIGTERM when this launcher dies, even by SIGKILL (Linux's
    PR_SET_PDEATHSIG). In a session of its own torchrun no longer hears the terminal; this keeps it from outliving
    the launcher."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _torchrun_main() -> None:
    """torchrun with fgvc's exit codes: a rank's one-line error (exit 2) or a forwarded signal (128 + signal) is the
    exit code of the whole command, without torchrun's traceback and failure report after the rank's own message."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    logging.getLogger("torch.distributed.elastic").setLevel(logging.ERROR)
    # its "failed (exitcode: N) local_rank: ..." line: after a rank's own message, or replaced by _say_killed's
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").addFilter(
        lambda record: not str(record.msg).startswith("failed (exitcode")
    )
    try:
        torchrun()
    except ChildFailedError as err:
        rank, cause = first_failure(err.failures)
        if cause.exitcode < 0:
            _say_killed(rank, cause)
        sys.exit(cause.exitcode if cause.exitcode > 0 else 128 - cause.exitcode)  # killed by signal 9 -> 137
    except SignalException as err:
        sys.exit(128 + int(err.sigval))


# the other ranks, once one has failed: terminated by torchrun (SIGTERM), or left without it in a collective
_CONSEQUENCES = (-signal.SIGTERM, 128 + signal.SIGTERM, LOST_CONTACT_EXIT)


def first_failure(failures: dict[int, Any]) -> tuple[int, Any]:
    """The rank whose failure ended the run and its ``ProcessFailure``: the earliest, leaving out the ranks that ended
    because of it (:data:`_CONSEQUENCES`); of those failing in the same second (whole seconds), a killed one first
    (the others lost it), then in rank order."""
    ranked = sorted(failures.items(), key=lambda item: (item[1].exitcode in _CONSEQUENCES, item[1].timestamp,
                                                         item[1].exitcode >= 0, item[0]))  # fmt: skip
    return ranked[0]


def _say_killed(rank: int, failure: Any) -> None:
    """One line for a rank killed by a signal, which prints nothing itself: SIGKILL is what the out-of-memory killer
    sends (8 ranks x 8 loader workers of a large dataset hold many copies of its index)."""
    name = failure.signal_name()
    hint = (": most often the out-of-memory killer; try fewer --workers or a smaller --batch-size"
            if failure.exitcode == -signal.SIGKILL else "")  # fmt: skip
    print(f"fgvc: error: rank {rank} (pid {failure.pid}) was killed by {name}{hint}", file=sys.stderr)


if __name__ == "__main__":
    _torchrun_main()
