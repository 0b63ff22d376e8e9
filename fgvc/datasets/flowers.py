"""Oxford 102 Flowers: ``imagelabels.mat`` (labels 1..102 per image) and ``setid.mat`` (1-based image indices).

The benchmark has an official val split; FixRes/DeiT-style results train on train+val (2,040 images), which
``train_on_all`` gives.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from fgvc.datasets._common import absolute, find_base, label_map, load_mat, mat_ints, sort_category_ids
from fgvc.datasets.base import OfficialSplits, frame
from fgvc.errors import DataError

NAME = "flowers"
TITLE = "Oxford 102 Flowers"
REQUIRED = ("imagelabels.mat", "setid.mat", "jpg")
CLASSES = 102
LAYOUT = """\
flowers/ (102flowers.tgz, imagelabels.mat and setid.mat side by side; a flowers-102/ subfolder is also accepted)
  jpg/image_00001.jpg ... image_08189.jpg
  imagelabels.mat            labels (1,8189) uint8, 1..102; entry i-1 is the label of image_{i:05d}.jpg
  setid.mat                  trnid (1,1020), valid (1,1020), tstid (1,6149): 1-based image indices"""


def read_flowers(root: Path) -> OfficialSplits:
    """Read the official Flowers-102 files under ``root`` (or ``root/flowers-102``)."""
    base = find_base(Path(root), REQUIRED, NAME, TITLE, subdirs=("flowers-102", "flowers102"))
    labels_mat, setid_mat = base / "imagelabels.mat", base / "setid.mat"
    categories = mat_ints(load_mat(labels_mat, ["labels"]), "labels", labels_mat)
    outside = (categories < 1) | (categories > CLASSES)
    if outside.any():
        raise DataError(f"{labels_mat}: label {categories[outside][0]} outside 1..{CLASSES} (image_"
                        f"{int(np.flatnonzero(outside)[0]) + 1:05d}); re-extract the official file")  # fmt: skip
    setid = load_mat(setid_mat, ["trnid", "valid", "tstid"])
    category_ids = sort_category_ids(categories.tolist())
    mapping = label_map(category_ids)
    labels = np.array([mapping[category] for category in categories.tolist()], dtype=np.int64)

    def split_frame(variable: str) -> pd.DataFrame:
        indices = mat_ints(setid, variable, setid_mat)
        outside = (indices < 1) | (indices > len(categories))
        if outside.any():
            raise DataError(
                f"{setid_mat}: {variable} holds image index {indices[outside][0]} outside 1..{len(categories)} "
                f"({labels_mat.name} has {len(categories)} labels); the two files come from different releases"
            )
        names = [f"image_{index:05d}" for index in indices.tolist()]
        paths = [absolute(base / "jpg", f"{name}.jpg") for name in names]
        return frame(paths, labels[indices - 1].tolist(), names)

    return OfficialSplits(
        train=split_frame("trnid"),
        val=split_frame("valid"),
        test=split_frame("tstid"),
        class_names=[str(category) for category in category_ids],  # the release ships no class names
        category_ids=category_ids,
        notes=["Flowers-102 papers train on train+val (2,040 images) and report test accuracy: use train_on_all"],
    )
