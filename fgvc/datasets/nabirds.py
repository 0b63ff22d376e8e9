"""NABirds: CUB-like text files, but UUID image ids and a taxonomy whose leaf class ids are not contiguous.

``classes.txt`` lists every node of the taxonomy (internal ones included), so the classes are the ids that actually
occur in ``image_class_labels.txt``, sorted numerically (555 in the official release).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from fgvc.datasets._common import (
    absolute,
    attach,
    check_flags,
    corner_boxes,
    find_base,
    label_map,
    map_labels,
    read_columns,
    sort_category_ids,
    unique_keys,
)
from fgvc.datasets.base import OfficialSplits, frame
from fgvc.errors import DataError

NAME = "nabirds"
TITLE = "NABirds"
REQUIRED = ("images.txt", "image_class_labels.txt", "train_test_split.txt", "classes.txt", "images")
LAYOUT = """\
nabirds/ (from nabirds.tar.gz; the root may be this folder or its parent)
  images.txt                 <uuid-with-dashes> <NNNN>/<uuid-without-dashes>.jpg
  image_class_labels.txt     <uuid> <class_id>            (555 distinct, non-contiguous leaf ids)
  train_test_split.txt       <uuid> <1 train | 0 test>
  classes.txt                <class_id> <name with spaces>  (whole taxonomy, internal nodes included)
  bounding_boxes.txt         <uuid> <x> <y> <width> <height>   (optional)
  hierarchy.txt, sizes.txt, photographers.txt, parts/   (not used)
  images/<NNNN>/<uuid-without-dashes>.jpg"""


def read_nabirds(root: Path) -> OfficialSplits:
    """Read the official NABirds files under ``root`` (or ``root/nabirds``)."""
    base = find_base(Path(root), REQUIRED, NAME, TITLE, subdirs=("nabirds",))
    images_txt = base / "images.txt"
    table = unique_keys(
        read_columns(images_txt, {"image_id": str, "name": str}, free_text_last=True), "image_id", images_txt
    )
    labels_txt = base / "image_class_labels.txt"
    table = attach(
        table, read_columns(labels_txt, {"image_id": str, "class_id": int}), "image_id", labels_txt, "images.txt"
    )
    split_txt = base / "train_test_split.txt"
    table = attach(
        table, read_columns(split_txt, {"image_id": str, "is_train": int}), "image_id", split_txt, "images.txt"
    )
    check_flags(table["is_train"], split_txt)
    boxes_txt = base / "bounding_boxes.txt"
    if boxes_txt.exists():
        columns: dict[str, Callable[[str], Any]] = {"image_id": str, "x": float, "y": float, "w": float, "h": float}
        table = attach(table, read_columns(boxes_txt, columns), "image_id", boxes_txt, "images.txt")

    classes_txt = base / "classes.txt"
    classes = read_columns(classes_txt, {"class_id": int, "class_name": str}, free_text_last=True)
    names = dict(zip(unique_keys(classes, "class_id", classes_txt)["class_id"], classes["class_name"], strict=True))
    category_ids = sort_category_ids(table["class_id"].tolist())
    unnamed = [category for category in category_ids if category not in names]
    if unnamed:
        raise DataError(f"{classes_txt}: class id {unnamed[0]} (used in image_class_labels.txt) has no name line")
    table["label"] = map_labels(table["class_id"].tolist(), label_map(category_ids), labels_txt)

    def split_frame(rows: pd.DataFrame) -> pd.DataFrame:
        extra = corner_boxes(rows["x"], rows["y"], rows["w"], rows["h"]) if "x" in rows else {}
        paths = [absolute(base / "images", name) for name in rows["name"]]
        return frame(paths, rows["label"].tolist(), rows["image_id"].tolist(), **extra)

    return OfficialSplits(
        train=split_frame(table[table["is_train"] == 1]),
        test=split_frame(table[table["is_train"] == 0]),
        class_names=[names[category] for category in category_ids],
        category_ids=category_ids,
    )
