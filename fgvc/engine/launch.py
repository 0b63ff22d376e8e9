"""`--gpus N`: re-launch the same command under torchrun, one process per GPU."""

from __future__ import annotations

import os
import signal
import subprocess
import sys


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
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "--"]
    child = subprocess.Popen([*cmd, "fgvc", *strip_option(argv, "--gpus")], start_new_session=True)
    received: list[int] = []

    def forward(signum: int, _frame: object) -> None:
        received.append(signum)
        child.send_signal(signal.SIGTERM if signum == signal.SIGHUP else signum)

    forwarded = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {sig: signal.signal(sig, forward) for sig in forwarded}
    try:
        code = child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 128 + received[0] if received else code
