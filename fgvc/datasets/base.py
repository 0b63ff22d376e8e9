"""The common index every dataset reader produces.

Readers parse an official on-disk format into :class:`OfficialSplits` (the splits the benchmark defines, with the
labels already mapped to 0..C-1). :func:`make_indices` then derives the splits, drawing a deterministic
stratified hold-out from train where the benchmark has no validation split.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fgvc.errors import ConfigError, DataError

SPLITS = ("train", "val", "test")
COLUMNS = ("path", "label", "image_id")


@dataclass
class DatasetIndex:
    """One split of one dataset.

    Attributes:
        frame: one row per image: ``path`` (absolute str), ``label`` (0..C-1, -1 where unknown), ``image_id`` (the id
            a Kaggle submission uses), plus optional reader-specific columns (e.g. ``bbox``).
        class_names: index -> human-readable class name.
        category_ids: index -> the dataset's original category id (what submissions report).
        name: dataset name; split: "train", "val" or "test".
        notes: things the reader noticed and the user should hear about (e.g. "312 listed images not downloaded").
        holdout: val split only: True when it is fgvc's hold-out of train (the benchmark has no val split, and
            train_on_all is off), which a model's own training split must not overlap.
    """

    frame: pd.DataFrame
    class_names: list[str]
    category_ids: list[Any]
    name: str
    split: str
    notes: list[str] = field(default_factory=list)
    holdout: bool = False

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.frame)


@dataclass
class OfficialSplits:
    """What a reader returns: the benchmark's own splits (``val`` None where there is none)."""

    train: pd.DataFrame
    test: pd.DataFrame
    class_names: list[str]
    category_ids: list[Any]
    val: pd.DataFrame | None = None
    notes: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)  # official image counts of a variant read (iNat train_mini)


Reader = Callable[[Path], OfficialSplits]


@dataclass(frozen=True)
class DatasetSpec:
    """A registry entry: the reader plus what `fgvc datasets list` and layout errors show."""

    name: str
    reader: Reader
    title: str
    layout: str  # the expected tree under the root, shown when the layout is not recognised
    classes: int | None  # official counts (None where not fixed)
    counts: dict[str, int | None]  # official image counts per split


def frame(paths: list[str], labels: list[int], image_ids: list[Any], **extra: Any) -> pd.DataFrame:
    """Build an index frame with the common columns in the common order."""
    df = pd.DataFrame({"path": paths, "label": labels, "image_id": image_ids, **extra})
    df["label"] = df["label"].astype("int64")
    return df


def stratified_holdout(train: pd.DataFrame, fraction: float, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split train into (train, val), stratified by label: from each class, the images with the smallest key
    ``hash(seed, image_id)``, about ``fraction`` of the class (largest remainders first), never a class's last image.

    Keyed on each image's id rather than drawn as a permutation of the rows: adding or removing one image (a resumed
    download, a deleted corrupt file) between stage 1 and stage 2 moves one or two images between train and val,
    where a re-drawn permutation moved most of the hold-out into training and the sweep and ensemble weights were then
    tuned on images the model had trained on.
    """
    if fraction <= 0 or len(train) < 2:
        return train, train.iloc[:0]
    n_val = max(1, round(len(train) * fraction))
    counts = train["label"].value_counts().sort_index()
    exact = counts * fraction  # a class's share depends on its own size only: other classes' changes leave it be
    cap = (counts - 1).clip(lower=0)
    quota = np.minimum(np.floor(exact), cap).astype(np.int64)
    class_key = _keys(pd.Series(counts.index, index=counts.index), seed)  # tie-break among equal remainders
    order = pd.DataFrame({"remainder": (exact - np.floor(exact)).round(9), "key": class_key})
    order = order[quota < cap].sort_values(["remainder", "key"], ascending=[False, True])
    extra = order.index[: max(0, n_val - int(quota.sum()))]
    quota[extra] += 1
    rank = _keys(train["image_id"], seed).groupby(train["label"]).rank(method="first")
    is_val = rank.to_numpy() <= train["label"].map(quota).to_numpy()
    return train[~is_val].sort_index(), train[is_val].sort_index()


def _keys(values: pd.Series, seed: int) -> pd.Series:
    """A uniform 64-bit key per value, the same in every process and on every machine (pandas' SipHash)."""
    return pd.util.hash_pandas_object(f"{seed}:" + values.astype(str), index=False)


def require_split(split: str) -> None:
    if split not in SPLITS:
        raise ConfigError(f"unknown split '{split}'; choose one of {', '.join(SPLITS)}")


def make_indices(
    spec: DatasetSpec, root: Path, val_fraction: float = 0.1, seed: int = 0, train_on_all: bool = False
) -> dict[str, DatasetIndex]:
    """Every split from one reading of ``root``: iNat 2021's metadata takes about a minute to parse, and a reader
    parses the train, val and test files whichever split is asked for."""
    root = Path(root)
    if not root.exists():
        raise DataError(
            f"{root}: dataset root not found; put the {spec.title} files there, or name their folder: --data-root "
            "(stage1, validate-submission), data.root in a recipe, or data.root in the config.yaml of the run and of "
            "its stage folders (stage2, predict, sweep, ensemble)"
        )
    official = spec.reader(root)
    train, val = official.train, official.val
    if val is None:
        train, val = stratified_holdout(train, val_fraction, seed)
    if train_on_all:
        train = pd.concat([train, val]).sort_index() if official.val is None else pd.concat([train, val])
    frames = {"train": train, "val": val, "test": official.test}
    return {
        split: DatasetIndex(
            frame=chosen.reset_index(drop=True),
            class_names=list(official.class_names),
            category_ids=list(official.category_ids),
            name=spec.name,
            split=split,
            notes=list(official.notes),
            holdout=split == "val" and official.val is None and not train_on_all and len(val) > 0,
        )
        for split, chosen in frames.items()
    }
