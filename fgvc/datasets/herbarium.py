"""Herbarium 2019 (folders only) and Herbarium 2020/2021/2022 (COCO-like metadata JSON).

2019 has no metadata file: the label is the integer folder name, sorted numerically (ImageFolder's lexicographic
order "0","1","10",... would not match the category ids), and file names repeat across categories, so the train/val
image id is ``<category>/<file>``; the test id is the file name the submission uses (``00123.jpg``).
2020/2021 read ``train/metadata.json`` (``file_name`` relative to ``train/``; 2020 is latin-1, not UTF-8); 2022 reads
``train_metadata.json`` with its own key names (``image_id``, ``category_id``, ``scientificName``), and its test file
is a bare list of images.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from fgvc.datasets._common import (
    absolute,
    coco_frame,
    empty_frame,
    find_base,
    json_records,
    label_map,
    layout_error,
    list_images,
    list_subdirs,
    load_json,
    sort_category_ids,
    unique_keys,
)
from fgvc.datasets.base import OfficialSplits, frame
from fgvc.errors import DataError

LAYOUT_2019 = """\
herbarium2019/ (train.tar.gz, validation.tar.gz, test.tar.gz extracted here; the small-* archives also work)
  train/<category>/<id>.jpg          category = integer folder name (0..682); ids repeat across categories
  validation/<category>/<id>.jpg     (optional)
  test/<id>.jpg                      (optional; the submission Id is the file name)"""
LAYOUT_COCO = """\
herbarium{year}/ (the Kaggle download; a nybg{year}/ subfolder is also accepted)
  train/metadata.json        images (id, file_name), annotations (image_id, category_id), categories (id, name)
  train/images/<sub1>/<sub2>/<image_id>.jpg      (file_name is relative to train/)
  test/metadata.json         (optional; images only)
  test/images/<sub>/<image_id>.jpg"""
LAYOUT_2022 = """\
herbarium2022/ (the Kaggle download)
  train_metadata.json        images (image_id, file_name), annotations (image_id, category_id),
                             categories (category_id, scientificName, ...)
  train_images/<cat[:3]>/<cat[3:]>/<image_id>.jpg   (file_name is relative to train_images/)
  test_metadata.json         (optional; a list of images: image_id, file_name)
  test_images/<idx[:3]>/test-<idx>.jpg"""


def read_herbarium2019(root: Path) -> OfficialSplits:
    """Read the Herbarium 2019 folders under ``root``: each split full-size (``train/``) or resized (``small-train/``).

    The resized copies keep the file names and ids, so each split is looked up on its own: a full-size train set with
    the small validation and test sets is a valid layout. A folder without content (an extraction that stopped early)
    does not hide the other copy.
    """
    root = Path(root)
    train_dir = _herbarium2019_split(root, "train", lambda folder: bool(list_subdirs(folder)))
    if train_dir is None:
        raise layout_error(root, "train/ (or small-train/) with category folders", "herbarium2019", "Herbarium 2019")
    val_dir = _herbarium2019_split(root, "validation", lambda folder: bool(list_subdirs(folder)))
    test_dir = _herbarium2019_split(root, "test", lambda folder: bool(list_images(folder)))
    folders = {folder.name: folder for folder in list_subdirs(train_dir)}
    not_numeric = [name for name in folders if not name.isdigit()]
    if not_numeric:
        raise DataError(
            f"{train_dir / not_numeric[0]}: category folders must be integers (0..682); is this Herbarium 2019?"
        )
    category_ids = sort_category_ids([int(name) for name in folders])
    mapping = label_map(category_ids)
    notes = []
    val = _folder_split(val_dir, mapping) if val_dir is not None else None
    if val is None:
        notes.append("validation/ (or small-validation/) not found: a validation split is held out of train instead")
    if test_dir is not None:
        tests = list_images(test_dir)
        test = frame([absolute(test_dir, p.name) for p in tests], [-1] * len(tests), [p.name for p in tests])
    else:
        test = empty_frame()
        notes.append("test/ (or small-test/) not found: the test split is empty (needed only for a submission)")
    return OfficialSplits(
        train=_folder_split(train_dir, mapping),
        val=val,
        test=test,
        class_names=[str(category) for category in category_ids],
        category_ids=category_ids,
        notes=notes,
    )


def _herbarium2019_split(root: Path, split: str, has_content: Callable[[Path], bool]) -> Path | None:
    """``root/<split>`` or ``root/small-<split>``: the first that holds something (full size first), else None."""
    folders = [root / f"{prefix}{split}" for prefix in ("", "small-")]
    return next((folder for folder in folders if folder.is_dir() and has_content(folder)), None)


def _folder_split(split_dir: Path, mapping: dict[Any, int]) -> pd.DataFrame:
    """Images under ``split_dir/<category>/``, category folders in numeric order (the label order)."""
    folders = list_subdirs(split_dir)
    unknown = [folder for folder in folders if not folder.name.isdigit() or int(folder.name) not in mapping]
    if unknown:
        raise DataError(
            f"{unknown[0]}: category {unknown[0].name!r} has no folder in train/; the archives do not match"
        )
    paths, labels, image_ids = [], [], []
    for folder in sorted(folders, key=lambda folder: int(folder.name)):
        for image in list_images(folder):
            paths.append(absolute(folder, image.name))
            labels.append(mapping[int(folder.name)])
            image_ids.append(f"{folder.name}/{image.name}")
    return frame(paths, labels, image_ids)


def read_herbarium_coco(root: Path, year: int) -> OfficialSplits:
    """Read Herbarium 2020 or 2021: ``train/metadata.json`` and the optional ``test/metadata.json``."""
    name = f"herbarium{year}"
    base = find_base(Path(root), ("train/metadata.json",), name, f"Herbarium {year}", subdirs=(f"nybg{year}",))
    train_json = base / "train" / "metadata.json"
    train_data = load_json(train_json)
    category_ids, class_names = _categories(train_data, train_json, "id", "name")
    mapping = label_map(category_ids)
    train = coco_frame(train_data, train_json, mapping, _resolver(base, "train"), labelled=True)
    del train_data
    test_json = base / "test" / "metadata.json"
    notes = []
    if test_json.exists():
        test = coco_frame(load_json(test_json), test_json, mapping, _resolver(base, "test"), labelled=False)
    else:
        test = empty_frame()
        notes.append("test/metadata.json not found: the test split is empty (needed only for a submission)")
    return OfficialSplits(train=train, test=test, class_names=class_names, category_ids=category_ids, notes=notes)


def read_herbarium2020(root: Path) -> OfficialSplits:
    return read_herbarium_coco(root, 2020)


def read_herbarium2021(root: Path) -> OfficialSplits:
    return read_herbarium_coco(root, 2021)


def read_herbarium2022(root: Path) -> OfficialSplits:
    """Read Herbarium 2022: ``train_metadata.json`` and the optional ``test_metadata.json`` (a list of images)."""
    base = find_base(
        Path(root), ("train_metadata.json",), "herbarium2022", "Herbarium 2022", subdirs=("herbarium2022",)
    )
    train_json = base / "train_metadata.json"
    train_data = load_json(train_json)
    category_ids, class_names = _categories(train_data, train_json, "category_id", "scientificName")
    mapping = label_map(category_ids)
    train = coco_frame(train_data, train_json, mapping, _resolver(base, "train_images"), True, id_key="image_id")
    del train_data
    test_json = base / "test_metadata.json"
    notes = []
    if test_json.exists():
        test_data = load_json(test_json)
        test_data = {"images": test_data} if isinstance(test_data, list) else test_data
        test = coco_frame(test_data, test_json, mapping, _resolver(base, "test_images"), False, id_key="image_id")
    else:
        test = empty_frame()
        notes.append("test_metadata.json not found: the test split is empty (needed only for a submission)")
    return OfficialSplits(train=train, test=test, class_names=class_names, category_ids=category_ids, notes=notes)


def _categories(data: Any, path: Path, id_key: str, name_key: str) -> tuple[list[Any], list[str]]:
    """Category ids in numeric order and their names (the id itself where a category has no name)."""
    categories = unique_keys(json_records(data, "categories", path, [id_key]), id_key, path)
    if categories.empty:
        raise DataError(f"{path}: no 'categories'; is this the training metadata file?")
    category_ids = sort_category_ids(categories[id_key].tolist())
    if name_key in categories:
        names = dict(zip(categories[id_key], categories[name_key].fillna("").astype(str), strict=True))
    else:
        names = {}
    return category_ids, [names.get(category) or str(category) for category in category_ids]


def _resolver(base: Path, split_dir: str) -> Callable[[str], str]:
    """``file_name`` -> absolute path: relative to ``split_dir`` unless it already starts with it."""
    prefix = f"{split_dir}/"

    def resolve(file_name: str) -> str:
        return absolute(base, file_name) if file_name.startswith(prefix) else absolute(base / split_dir, file_name)

    return resolve
