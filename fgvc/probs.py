"""Probability files: the only interface between predict, ensemble and submission.

One ``.npz`` per (run, stage, split, resolution, TTA) with the per-image class probabilities, the image ids the
competition uses, the labels where known, and the label -> original category id mapping, so that ensembling and
submission writing need no model, no dataset reader and no torch.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fgvc.errors import DataError
from fgvc.fileio import atomic_write


@dataclass
class Probabilities:
    """Class probabilities for one split.

    Attributes:
        probs: (N, C) float array, rows sum to 1 (stored as float16).
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
        return bool(len(self.labels)) and bool((self.labels >= 0).all())

    def save(self, path: str | Path) -> None:
        """Write atomically (temp file + rename)."""

        def write(fh: io.BufferedIOBase) -> None:
            np.savez_compressed(
                fh,
                probs=self.probs.astype(np.float16),
                image_ids=_as_plain_array(self.image_ids),
                labels=np.asarray(self.labels, dtype=np.int64),
                category_ids=_as_plain_array(self.category_ids),
                class_names=np.asarray(self.class_names, dtype=str),
                meta=np.asarray(json.dumps(self.meta)),
            )

        atomic_write(path, write)

    @classmethod
    def load(cls, path: str | Path) -> Probabilities:
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as data:
                return cls(
                    probs=data["probs"].astype(np.float32),
                    image_ids=data["image_ids"],
                    labels=data["labels"],
                    category_ids=data["category_ids"],
                    class_names=data["class_names"],
                    meta=json.loads(str(data["meta"])),
                )
        except FileNotFoundError:
            raise DataError(f"{path}: probability file not found; run `fgvc predict` first") from None
        except (OSError, KeyError, ValueError) as err:
            raise DataError(
                f"{path}: not an fgvc probability file ({err}); delete it and rerun `fgvc predict`"
            ) from None


def _as_plain_array(values: Any) -> np.ndarray:
    """Ids as int64 when they are all integers, else as unicode strings (npz without pickle)."""
    arr = np.asarray(values)
    if arr.dtype.kind in "iu":
        return arr.astype(np.int64)
    try:
        as_int = arr.astype(np.int64)
        if (as_int.astype(str) == arr.astype(str)).all():
            return as_int
    except (ValueError, TypeError):
        pass
    return arr.astype(str)
