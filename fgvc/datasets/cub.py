"""CUB-200-2011: space-separated text files with 1-based integer ids, split by ``train_test_split.txt``."""

from __future__ import annotations

from pathlib import Path

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
    unique_keys,
)
from fgvc.datasets.base import OfficialSplits, frame

NAME = "cub"
TITLE = "CUB-200-2011"
REQUIRED = ("images.txt", "image_class_labels.txt", "train_test_split.txt", "classes.txt", "images")
LAYOUT = """\
CUB_200_2011/ (from CUB_200_2011.tgz; the root may be this folder or its parent)
  images.txt                 <image_id> <class folder>/<file>.jpg
  image_class_labels.txt     <image_id> <class_id 1..200>
  train_test_split.txt       <image_id> <1 train | 0 test>
  classes.txt                <class_id> <NNN.Class_name>
  bounding_boxes.txt         <image_id> <x> <y> <width> <height>   (optional)
  images/<NNN.Class_name>/<file>.jpg"""


def read_cub(root: Path) -> OfficialSplits:
    """Read the official CUB-200-2011 files under ``root`` (or ``root/CUB_200_2011``)."""
    base = find_base(Path(root), REQUIRED, NAME, TITLE, subdirs=("CUB_200_2011",))
    images_txt = base / "images.txt"
    table = unique_keys(
        read_columns(images_txt, {"image_id": int, "name": str}, free_text_last=True), "image_id", images_txt
    )
    table = attach(
        table,
        read_columns(base / "image_class_labels.txt", {"image_id": int, "class_id": int}),
        "image_id",
        base / "image_class_labels.txt",
        images_txt.name,
    )
    split_txt = base / "train_test_split.txt"
    table = attach(
        table, read_columns(split_txt, {"image_id": int, "is_train": int}), "image_id", split_txt, images_txt.name
    )
    check_flags(table["is_train"], split_txt)
    boxes_txt = base / "bounding_boxes.txt"
    if boxes_txt.exists():
        boxes = read_columns(boxes_txt, {"image_id": int, "x": float, "y": float, "w": float, "h": float})
        table = attach(table, boxes, "image_id", boxes_txt, images_txt.name)

    classes_txt = base / "classes.txt"
    classes = unique_keys(
        read_columns(classes_txt, {"class_id": int, "class_name": str}, free_text_last=True), "class_id", classes_txt
    ).sort_values("class_id")
    category_ids = classes["class_id"].tolist()
    labels_txt = base / "image_class_labels.txt"
    table["label"] = map_labels(table["class_id"].tolist(), label_map(category_ids), labels_txt, classes=classes_txt)

    def split_frame(rows: pd.DataFrame) -> pd.DataFrame:
        extra = corner_boxes(rows["x"], rows["y"], rows["w"], rows["h"]) if "x" in rows else {}
        paths = [absolute(base / "images", name) for name in rows["name"]]
        return frame(paths, rows["label"].tolist(), rows["image_id"].tolist(), **extra)

    return OfficialSplits(
        train=split_frame(table[table["is_train"] == 1]),
        test=split_frame(table[table["is_train"] == 0]),
        class_names=classes["class_name"].tolist(),
        category_ids=category_ids,
    )
