"""User-facing errors.

Every problem a user can fix (a wrong path, a malformed metadata file, a bad recipe key, weights that are not on
disk) is raised as an :class:`FgvcError` whose message is one line naming the file and the fix. The CLI prints the
message and exits with code 2; library callers can catch the class.
"""

from __future__ import annotations

_WORKER = "Original Traceback"  # in the message torch gives an error it re-raises from a DataLoader worker


class FgvcError(Exception):
    """A problem in the user's input, reported as one line; the CLI exits with code 2."""

    exit_code = 2

    def __init__(self, *args: object) -> None:
        """torch re-raises an error from a DataLoader worker as ``type(err)("Caught ... Original Traceback ...")``:
        the message is kept as the original's one line (its traceback's last line, after the class name)."""
        if len(args) == 1 and isinstance(args[0], str) and args[0].startswith("Caught ") and _WORKER in args[0]:
            args = (args[0].rstrip().splitlines()[-1].split(": ", 1)[-1],)
        super().__init__(*args)


class ConfigError(FgvcError):
    """A recipe or CLI value that does not fit the configuration model."""


class DataError(FgvcError):
    """A dataset root, metadata file or image that cannot be read as the official format."""


class LayoutError(DataError):
    """The dataset root does not have the expected on-disk layout."""


class CorruptImageError(DataError):
    """An image file that no decoder can read."""


class WeightsError(FgvcError):
    """Pretrained weights missing, or a checkpoint that does not fit the architecture."""


class TrainingError(FgvcError):
    """Training diverged (a non-finite loss)."""


class RunExistsError(FgvcError):
    """A finished result would be overwritten; pass --force to replace it."""


class RunBusyError(FgvcError):
    """Another process is training the same stage folder now."""
