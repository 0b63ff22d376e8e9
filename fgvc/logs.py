"""fgvc's log: the console for the command line, and a stage's ``train.log`` for the length of one call.

A library (a notebook, a script) owns its process's logging: fgvc adds no console handler there, and the caller's
logging shows during a stage what it showed before (:func:`run_log`). Only the CLI calls :func:`log_to_console`.
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

LOGGER = logging.getLogger("fgvc")


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


class _RunLog(logging.FileHandler):
    """A log file created with its folder on the first message (``delay=True``): a run that fails on its arguments
    leaves no empty run folder behind."""

    def _open(self) -> io.TextIOWrapper:
        Path(self.baseFilename).parent.mkdir(parents=True, exist_ok=True)
        return super()._open()


def log_to_console() -> None:
    """The command line's output: fgvc's INFO lines, unprefixed, on stderr, from rank 0 only (the other ranks of a
    torchrun job still print warnings, through logging's last-resort handler)."""
    for handler in [h for h in LOGGER.handlers if getattr(h, "_fgvc_console", False)]:
        LOGGER.removeHandler(handler)
    LOGGER.setLevel(logging.INFO)
    LOGGER.propagate = False
    if _is_main_process():
        console = logging.StreamHandler()
        console.setFormatter(logging.Formatter("%(message)s"))
        console._fgvc_console = True  # type: ignore[attr-defined]
        LOGGER.addHandler(console)


class _UpToCaller(logging.Handler):
    """Hands records at or above its level to the parent loggers' handlers, as propagation would: what the caller's
    logging showed before :func:`run_log` lowered the "fgvc" logger to INFO for a run's log file."""

    def emit(self, record: logging.LogRecord) -> None:
        if LOGGER.parent is not None:
            LOGGER.parent.callHandlers(record)


@contextmanager
def run_log(path: Path) -> Iterator[None]:
    """fgvc's records, INFO and up, also go to ``path`` while the block runs (rank 0 only): a run's own record, and
    nothing of the calls made after it.

    The caller's logging goes on showing what it showed before: the logger is lowered to INFO for the file, and
    the caller's handlers (on this logger, or reached by propagation) keep the threshold they had.
    """
    if not _is_main_process():
        yield
        return
    run_file = _RunLog(path, delay=True)
    run_file.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    run_file.setLevel(logging.INFO)
    level, propagate, shown = LOGGER.level, LOGGER.propagate, LOGGER.getEffectiveLevel()
    raised = {handler: handler.level for handler in LOGGER.handlers if handler.level < shown}
    up = _UpToCaller(shown) if propagate and shown > logging.INFO else None
    for handler in raised:
        handler.setLevel(shown)
    if up is not None:
        LOGGER.propagate = False
        LOGGER.addHandler(up)
    LOGGER.setLevel(min(shown, logging.INFO))
    LOGGER.addHandler(run_file)
    try:
        yield
    finally:
        for added in (run_file, up):
            if added is not None:
                LOGGER.removeHandler(added)
        run_file.close()
        for handler, handler_level in raised.items():
            handler.setLevel(handler_level)
        LOGGER.setLevel(level)
        LOGGER.propagate = propagate
