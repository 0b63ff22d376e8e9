"""Probability files: the only interface between predict, ensemble and submission.

One ``.npz`` per (run, stage, split, resolution, TTA) with the per-image class probabilities, the image ids the
competition uses, the labels where known, and the label -> original category id mapping, so that ensembling and
submission writing need no model, no dataset reader and no torch.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from fgvc.errors import DataError
from fgvc.fileio import atomic_write
from fgvc.metrics import UNKNOWN_LABEL


@dataclass
class Probabilities:
    """Class probabilities for one split.

    Attributes:
        probs: (N, C) float array, rows sum to 1 (stored as float16 log-probabilities, see :func:`as_stored`).
        image_ids: (N,) ids as the competition writes them (int ids are kept as int64, others as str).
        labels: (N,) int64 label indices, -1 where unknown (test splits).
        category_ids: (C,) the dataset's original category id of each label index.
        class_names: (C,) human-readable names.
        meta: free-form provenance (run, arch, stage, split, res, tta, dataset).
    """

    probs: np.ndarray
    image_ids: np.ndarray
    labels: np.ndarray
    category_ids: np.ndarray
    class_names: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n, c = self.probs.shape
        if len(self.image_ids) != n or len(self.labels) != n:
            raise ValueError(f"probabilities for {n} images but {len(self.image_ids)} ids / {len(self.labels)} labels")
        if len(self.category_ids) != c or len(self.class_names) != c:
            raise ValueError(f"{c} classes but {len(self.category_ids)} category ids / {len(self.class_names)} names")

    @property
    def has_labels(self) -> bool:
        """Some rows are labelled (and were readable): metrics (over those rows) and weight search apply."""
        return bool((self.scored_labels() >= 0).any())

    def scored_labels(self) -> np.ndarray:
        """The labels that metrics score against: unknown (-1) also for the images that were unreadable when the file
        was computed (meta ``unreadable``). Their uniform rows are no prediction: the tie went to the first class and
        scored a hit wherever that was the label. Training's validation skips them alike."""
        rows = self.meta.get("unreadable") or []
        if not rows:
            return self.labels
        labels = np.array(self.labels, dtype=np.int64)
        labels[rows] = UNKNOWN_LABEL
        return labels

    def save(self, path: str | Path) -> None:
        """Write atomically (temp file + rename)."""

        def write(fh: IO[bytes]) -> None:
            np.savez(  # uncompressed: zlib shrank float16 log-probabilities by ~20% at 8 MB/s (21 min at iNat 2021)
                fh,
                log_probs=to_storage(self.probs),
                image_ids=_as_plain_array(self.image_ids),
                labels=np.asarray(self.labels, dtype=np.int64),
                category_ids=_as_plain_array(self.category_ids),
                class_names=np.asarray(self.class_names, dtype=str),
                meta=np.asarray(json.dumps(self.meta)),
            )

        atomic_write(path, write)

    @classmethod
    def load(cls, path: str | Path) -> Probabilities:
        """Read a file :meth:`save` wrote; a damaged one, or one with rows that are not probabilities (NaN), is a
        one-line :class:`DataError` naming it."""
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as data:
                loaded = cls(
                    probs=from_storage(data["log_probs"]),
                    image_ids=data["image_ids"],
                    labels=data["labels"],
                    category_ids=data["category_ids"],
                    class_names=data["class_names"],
                    meta=json.loads(str(data["meta"])),
                )
        except FileNotFoundError:
            raise DataError(f"{path}: probability file not found; run `fgvc predict` first") from None
        except (OSError, KeyError, ValueError, EOFError, RuntimeError, zipfile.BadZipFile) as err:  # a cut copy
            raise DataError(
                f"{path}: not an fgvc probability file ({err}); delete it and rerun `fgvc predict`"
            ) from None
        if bad := nonfinite_rows(loaded.probs):  # an ensemble would weigh them in and submit class 0 for every row
            raise DataError(f"{path}: {bad} of {len(loaded.probs)} rows hold NaN or infinite probabilities; delete it "
                            "and rerun `fgvc predict` (with a model whose weights are finite)")  # fmt: skip
        return loaded


_TINY = np.finfo(np.float32).tiny  # log(0) would be -inf: the smallest normal float32 stands for 0
_ROWS_PER_BLOCK = 4096  # temporaries stay at a few rows even for iNat 2021's 500,000 x 10,000 test matrix (20 GB)


def nonfinite_rows(probs: np.ndarray) -> int:
    """How many rows hold a NaN or an infinity (a model whose weights diverged), one block of rows at a time."""
    return sum(int((~np.isfinite(probs[rows].sum(axis=1))).sum()) for rows in row_blocks(len(probs)))


def row_blocks(n_rows: int) -> Iterator[slice]:
    """Slices of a few thousand rows: (N, C) work done per block keeps its temporaries small."""
    return (slice(start, start + _ROWS_PER_BLOCK) for start in range(0, n_rows, _ROWS_PER_BLOCK))


def to_storage(probs: np.ndarray) -> np.ndarray:
    """(N, C) probabilities as float16 log-probabilities: 2 bytes per value and a relative error that does not grow
    as the probability shrinks (below 0.8% for every probability above e^-32 = 1.3e-14, below 3.2% down to 1e-38).

    Why not float16 probabilities: below 6e-5 they step by 6e-8 and below 3e-8 they are 0, which reorders the 2nd-5th
    classes of confident rows over thousands of classes (iNat 2017 scores a top-5, 2018 a top-3) and feeds zeros to
    geometric means. A float16 in [-32, -16) steps by 2^-6, so the probability is off by at most exp(2^-7) - 1.
    """
    probs = np.asarray(probs)
    out = np.empty(probs.shape, dtype=np.float16)
    for rows in row_blocks(len(probs)):
        block = np.maximum(probs[rows], _TINY, dtype=np.float32)
        out[rows] = np.log(block, out=block)
    return out


def from_storage(log_probs: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """The float32 probabilities of :func:`to_storage`'s output, rows renormalised to sum to 1 (into ``out``)."""
    log_probs = np.asarray(log_probs)
    out = np.empty(log_probs.shape, dtype=np.float32) if out is None else out
    for rows in row_blocks(len(log_probs)):
        block = out[rows]
        np.exp(log_probs[rows], out=block, dtype=np.float32)
        sums = block.sum(axis=1, keepdims=True)
        block /= np.where(sums > 0, sums, 1.0)
    return out


def as_stored(probs: np.ndarray, in_place: bool = False) -> np.ndarray:
    """``probs`` exactly as a save/load round trip returns them (results computed now agree with the file's);
    ``in_place`` overwrites ``probs`` (float32) rather than allocating another (N, C) array."""
    return from_storage(to_storage(probs), out=probs if in_place else None)


def _as_plain_array(values: Any) -> np.ndarray:
    """Ids as int64 when they are all integers, else as unicode strings (npz without pickle)."""
    arr = np.asarray(values)
    if arr.dtype.kind == "i" or (arr.dtype.kind == "u" and (arr.size == 0 or arr.max() <= np.iinfo(np.int64).max)):
        return arr.astype(np.int64)
    try:
        as_int = arr.astype(np.int64)
        if (as_int.astype(str) == arr.astype(str)).all():
            return as_int
    except (ValueError, TypeError, OverflowError):  # overflow: past int64 (a class folder "12345678901234567890")
        pass
    return arr.astype(str)
