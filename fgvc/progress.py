"""Progress bars that stay readable in a terminal or a notebook and small in a log file."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from typing import Any

from tqdm import tqdm

LOG_FILE_INTERVAL_S = 60.0  # between refreshes when stderr is a file: each one stays there (~100 bytes)


def progress_bar(iterable: Iterable[Any] | None = None, *, desc: str, enabled: bool, **options: Any) -> tqdm:
    """tqdm on stderr, refreshed live in a terminal or a notebook and once a minute into a file.

    A days-long run under SLURM or nohup writes its stderr to a file, where tqdm's 10 refreshes a second would add
    about 95 MB a day, all on one carriage-return-joined line. ``TQDM_MININTERVAL`` (seconds) in the environment sets
    the interval instead, as it does for tqdm itself.
    """
    options = {"leave": False, "dynamic_ncols": True} | options
    live = sys.stderr.isatty() or "ipykernel" in sys.modules
    try:  # read here too: tqdm reads its TQDM_* variables once, when it is imported
        chosen: float | None = float(os.environ["TQDM_MININTERVAL"])
    except (KeyError, ValueError):
        chosen = None
    if chosen is not None:
        options = {"mininterval": chosen} | options
    elif not live:  # maxinterval too: tqdm's monitor thread would refresh 10 s after each refresh
        options = {"mininterval": LOG_FILE_INTERVAL_S, "maxinterval": LOG_FILE_INTERVAL_S} | options
    return tqdm(iterable, desc=desc, disable=not enabled, **options)
