"""iNaturalist 2017/2018/2019/2021: COCO-style JSON files define the splits.

One image tarball holds train and val together, so the split comes only from ``train*.json`` / ``val*.json``;
labels come from joining ``annotations`` to ``images`` on ``image_id`` (not from the folder names, which are species
names in 2017 and category ids later). The test JSON has no annotations: its labels are -1. ``file_name`` is relative
to the root where the archives were extracted.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from fgvc.datasets._common import (
    absolute,
    coco_frame,
    empty_frame,
    find_base,
    json_records,
    label_map,
    load_json,
    sort_category_ids,
    unique_keys,
)
from fgvc.datasets.base import OfficialSplits
from fgvc.errors import DataError

SPLIT_FILES = {
    2017: ("train2017.json", "val2017.json", "test2017.json"),
    2018: ("train2018.json", "val2018.json", "test2018.json"),
    2019: ("train2019.json", "val2019.json", "test2019.json"),
    2021: ("train.json", "val.json", "public_test.json"),
}
REAL_NAMES = "categories.json"  # categories.json.tar.gz, 2018 and 2019: the real species names
IMAGE_TREES = {
    2017: "train_val_images/<supercategory>/<species name>/<md5>.jpg   test2017/<md5>.jpg",
    2018: "train_val2018/<supercategory>/<category_id>/<md5>.jpg   test2018/<md5>.jpg",
    2019: "train_val2019/<iconic category>/<category_id>/<md5>.jpg   test2019/<md5>.jpg",
    2021: "train/<NNNNN_Kingdom_..._species>/<uuid>.jpg   val/...   public_test/<uuid>.jpg",
}


def layout(year: int) -> str:
    train, val, test = SPLIT_FILES[year]
    mini = "   (or train_mini.json)" if year == 2021 else ""
    names = f"  {REAL_NAMES}   (optional: the real species names)\n" if year in (2018, 2019) else ""
    return (
        f"inat{year}/ (every archive extracted here; file_name in the JSON files is relative to this folder)\n"
        f"  {train}{mini}   images, annotations (image_id, category_id), categories (id, name)\n"
        f"  {val}\n"
        f"  {test}   (optional; images only, no annotations)\n"
        f"{names}"
        f"  {IMAGE_TREES[year]}"
    )


def read_inat(root: Path, year: int) -> OfficialSplits:
    """Read the iNaturalist ``year`` JSON files under ``root``."""
    root = Path(root)
    name, title = f"inat{year}", f"iNaturalist {year}"
    train_name, val_name, test_name = SPLIT_FILES[year]
    notes = []
    if not (root / val_name).exists() and (root / name / val_name).exists():  # the parent folder (``datasets/``)
        root = root / name
    if year == 2021 and (root / "train_mini.json").exists():
        if not (root / train_name).exists():
            train_name = "train_mini.json"
            notes.append("train.json not found: training on train_mini.json (500,000 images, 50 per class)")
        elif not (root / "train").is_dir() and (root / "train_mini").is_dir():  # every JSON, only the mini images
            train_name = "train_mini.json"
            notes.append("train/ not found, train_mini/ found: training on train_mini.json (500,000 images)")
    base = find_base(root, (train_name, val_name), name, title)

    train_json = base / train_name
    train_data = load_json(train_json)
    categories = unique_keys(json_records(train_data, "categories", train_json, ["id", "name"]), "id", train_json)
    if categories.empty:
        raise DataError(f"{train_json}: no 'categories'; is this the training JSON of iNaturalist {year}?")
    category_ids = sort_category_ids(categories["id"].tolist())
    names = dict(zip(categories["id"], categories["name"].astype(str), strict=True))
    names.update(_real_names(base / REAL_NAMES, names))
    mapping = label_map(category_ids)

    def split_frame(path: Path, data: object, labelled: bool) -> pd.DataFrame:
        return coco_frame(data, path, mapping, lambda file_name: absolute(base, file_name), labelled)

    train = split_frame(train_json, train_data, labelled=True)
    del train_data  # the 2021 training JSON is large; do not hold two copies
    val = split_frame(base / val_name, load_json(base / val_name), labelled=True)
    test_json = base / test_name
    if test_json.exists():
        test = split_frame(test_json, load_json(test_json), labelled=False)
    else:
        test = empty_frame()
        notes.append(f"{test_name} not found: the test split is empty (needed only for a submission)")
    return OfficialSplits(
        train=train,
        val=val,
        test=test,
        class_names=[names[category] for category in category_ids],
        category_ids=category_ids,
        notes=notes,
        counts={"train": 500_000} if train_name == "train_mini.json" else {},  # 50 images of each of 10,000 species
    )


def _real_names(path: Path, names: dict) -> dict:
    """The de-obfuscated names of ``categories.json`` (2018, 2019: the training JSON's names are codes), for the
    categories it shares with the training JSON; nothing when the file is absent."""
    if not path.is_file():
        return {}
    data = load_json(path)
    records = json_records({"categories": data} if isinstance(data, list) else data, "categories", path, ["id", "name"])
    real = dict(zip(records["id"], records["name"].astype(str), strict=True))
    return {category: real[category] for category in names if category in real}


def read_inat2017(root: Path) -> OfficialSplits:
    return read_inat(root, 2017)


def read_inat2018(root: Path) -> OfficialSplits:
    return read_inat(root, 2018)


def read_inat2019(root: Path) -> OfficialSplits:
    return read_inat(root, 2019)


def read_inat2021(root: Path) -> OfficialSplits:
    return read_inat(root, 2021)
