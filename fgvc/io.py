"""Image decoding: one function for train and test, so both see exactly the same pixels.

OpenCV decodes first (fast, applies EXIF orientation, drops alpha, expands grayscale, maps 16-bit to 8-bit). Pillow is
the fallback for what OpenCV cannot read (e.g. odd files named ``.jpg``) and the judge of truncated JPEGs.

Truncation policy: a JPEG with no end-of-image marker after its last scan, or that OpenCV refuses, is kept only if
Pillow can load it completely; otherwise it is corrupt. Bytes after the marker (maker notes, a second embedded picture,
padding) are harmless. Older OpenCV builds return a half-grey image for a truncated JPEG with only a warning, so the
marker check keeps the policy the same whichever OpenCV is installed. A JPEG that runs into padding (zeros) with no end
marker is corrupt without asking Pillow, which reads the zeros as image data: a download cut off into a file allocated
at full size.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageOps

from fgvc.errors import CorruptImageError, DataError

_JPEG_START = b"\xff\xd8"
_JPEG_END = b"\xff\xd9"
_JPEG_SCAN = b"\xff\xda"  # start of scan: entropy-coded data follows, in which 0xff is never followed by 0xd9 or 0xda
_PADDING = b"\x00\r\n\t "  # bytes some writers append after the end-of-image marker


_silenced_lock = threading.Lock()
_silenced_depth = 0
_callers_level = 0


@contextmanager
def _opencv_silenced() -> Iterator[None]:
    """Libjpeg/libpng messages go through OpenCV's logger (its ERROR level included, e.g. "imdecode_(''): can't read
    header" for a cut-off GIF); a broken file is reported by our own exception instead, with its name.

    Silenced while any decode runs (threads decode at once in `fgvc datasets check --decode`): the first one in saves
    the caller's level, the last one out restores it, so the rest of the process keeps OpenCV's messages.
    """
    global _silenced_depth, _callers_level
    with _silenced_lock:
        if _silenced_depth == 0:
            _callers_level = cv2.utils.logging.getLogLevel()
            cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
        _silenced_depth += 1
    try:
        yield
    finally:
        with _silenced_lock:
            _silenced_depth -= 1
            if _silenced_depth == 0:
                cv2.utils.logging.setLogLevel(_callers_level)


def disable_opencv_threads() -> None:
    """Stop OpenCV from starting its own thread pool; DataLoader workers already use every core."""
    cv2.setNumThreads(0)


def decode_image(path: str | Path) -> np.ndarray:
    """Read an image file as a contiguous ``(H, W, 3)`` uint8 RGB array, upright per its EXIF orientation.

    Raises:
        DataError: the file does not exist or cannot be read.
        CorruptImageError: no decoder can read the whole image.
    """
    path = Path(path)
    data = read_image_bytes(path)
    if cut_off_and_padded(data):
        raise _corrupt(path)
    image = _decode_with_opencv(data)
    if image is not None and not looks_truncated(data):
        return image
    fallback = _decode_with_pillow(data)
    if fallback is None:
        raise _corrupt(path)
    # OpenCV's result is complete once Pillow has read all the data; prefer it so every file goes through one decoder.
    return image if image is not None else fallback


def _corrupt(path: Path) -> CorruptImageError:
    return CorruptImageError(
        f"{path}: image is corrupt or truncated; re-download it, or skip unreadable images with --skip-corrupt "
        "(fgvc stage1, stage2, predict) or data.skip_corrupt: true in the recipe"
    )


def read_image_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: image file not found; check the dataset root or re-download the dataset") from None
    except OSError as err:
        raise DataError(f"{path}: cannot read image file ({err.strerror or err}); check its permissions") from None


def _decode_with_opencv(data: bytes) -> np.ndarray | None:
    """IMREAD_COLOR gives 8-bit BGR whatever the source depth or channels; None where OpenCV cannot decode."""
    if not data:
        return None
    try:
        with _opencv_silenced():
            bgr = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    except cv2.error:
        return None
    if bgr is None:
        return None
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def is_complete_jpeg(data: bytes) -> bool:
    """Starts with the JPEG start-of-image marker and ends (bar padding) with the end-of-image marker."""
    return data.startswith(_JPEG_START) and data.rstrip(_PADDING).endswith(_JPEG_END)


def _ends_after_last_scan(data: bytes) -> bool:
    """The end-of-image marker follows the last scan's data (an EXIF thumbnail's marker lies before the main scans)."""
    last_scan = data.rfind(_JPEG_SCAN)
    return last_scan >= 0 and data.find(_JPEG_END, last_scan) >= 0


def looks_truncated(data: bytes) -> bool:
    """A JPEG whose last scan is not followed by the end-of-image marker lost its tail."""
    return data.startswith(_JPEG_START) and not _ends_after_last_scan(data)


_PADDED_TAIL = 16  # bytes of padding that no data runs into: a JPEG's data may end in "ff 00" (byte stuffing)


def cut_off_and_padded(data: bytes) -> bool:
    """A JPEG whose data runs into padding with no end-of-image marker before it (see the module's policy)."""
    stripped = data.rstrip(_PADDING)
    padded = len(data) - len(stripped) >= _PADDED_TAIL
    return padded and looks_truncated(stripped)


def _decode_with_pillow(data: bytes) -> np.ndarray | None:
    """Fully load with Pillow (truncation raises); None where Pillow cannot read every byte of the image."""
    try:
        with Image.open(io.BytesIO(data)) as opened:
            opened.load()
            upright = ImageOps.exif_transpose(opened)
            return np.array(upright.convert("RGB"), dtype=np.uint8)
    except Exception:  # Pillow's decoders raise many exception types on malformed input; all mean "unreadable"
        return None


def typical_source_pixels(paths: Sequence[str | Path] | np.ndarray, samples: int = 16) -> float | None:
    """Median stored width x height over ``samples`` evenly spaced files, from their headers only (Pillow reads the
    size without decoding); None when none can be read. Decoding time grows with it, so ``--decode auto`` scales its
    CPU estimate by it."""
    if not len(paths):
        return None
    picks = np.unique(np.linspace(0, len(paths) - 1, num=min(samples, len(paths))).round().astype(int))
    sizes = []
    for i in picks:
        # a missing or odd file is the loader's business, not this estimate's
        with suppress(Exception), Image.open(paths[i]) as opened:
            sizes.append(opened.size[0] * opened.size[1])
    return float(np.median(sizes)) if sizes else None
