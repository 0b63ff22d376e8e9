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

    SIGINT/SIGTERM sent to this process are passed on to torchrun (which passes them to the workers, who save a
    checkpoint), and this process waits for them instead of leaving them orphaned.
    """
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "fgvc"]
    child = subprocess.Popen([*cmd, *strip_option(argv, "--gpus")])
    received: list[int] = []

    def forward(signum: int, _frame: object) -> None:
        received.append(signum)
        child.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 128 + received[0] if received else code
