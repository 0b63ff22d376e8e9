"""`--gpus N`: re-launch the same command under torchrun, one process per GPU."""

from __future__ import annotations

import os
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
    """Run ``python -m fgvc ARGV`` under torchrun on this node and return its exit code."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "fgvc"]
    return subprocess.call([*cmd, *strip_option(argv, "--gpus")])
