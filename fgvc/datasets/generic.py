"""Datasets in no benchmark's format: an ImageFolder-style tree, or CSV files listing ``path,label``.

Both use the class names as category ids (numeric order where every name is a number, else string order), and the
path relative to the root as the image id.
"""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from fgvc.datasets._common import (
    absolute,
    empty_frame,
    label_map,
    layout_error,
    list_images,
    list_subdirs,
    require_columns,
    sort_category_ids,
)
from fgvc.datasets.base import OfficialSplits, frame
from fgvc.errors import DataError

FOLDER_LAYOUT = """\
<root>/ (any image folder tree; classes are the folder names)
  train/<class>/**/*.jpg       (required)
  val/<class>/**/*.jpg         (optional, also named valid/ or validation/; otherwise a hold-out of train)
  test/<class>/**/*.jpg        (optional; or test/*.jpg without labels)
or, without split folders, everything is train:
  <class>/**/*.jpg"""
CSV_LAYOUT = """\
<root>/ (train.csv, optional val.csv and test.csv, listing path,label)
  train.csv                    columns path,label (path relative to <root>; label a class name or an integer)
  val.csv                      (optional) same columns
  test.csv                     (optional) path[,label]
  <the image files the CSVs name>"""
VAL_DIRS = ("val", "valid", "validation")  # the names Kaggle's ImageFolder datasets use
_INTEGER = re.compile(r"0|-?[1-9]\d*")  # as int() writes it: "007" stays a string, or a submission would say 7


def read_folder(root: Path) -> OfficialSplits:
    """Read ``root/train/<class>/*`` (+ optional ``val/``, ``test/``), or ``root/<class>/*`` as train only."""
    root = Path(root)
    split_layout = (root / "train").is_dir()
    train_dir = root / "train" if split_layout else root
    class_dirs = [folder for folder in list_subdirs(train_dir) if list_images(folder, recursive=True)]
    if not class_dirs:
        raise layout_error(root, "train/<class>/ image folders", "folder", "image folder")
    names = {folder.name for folder in class_dirs}
    split_names = sorted(names) if not split_layout and names <= {*VAL_DIRS, "test"} else []
    if split_names:  # val/ and test/ without train/ (not extracted yet, or misnamed): not classes
        raise DataError(f"{root}: {'/, '.join(split_names)}/ but no train/ folder; put the training images in "
                        f"{root / 'train'}/<class>/")  # fmt: skip
    category_ids = sort_category_ids([folder.name for folder in class_dirs])
    mapping = label_map(category_ids)
    notes = []
    if not split_layout:
        notes.append(f"{root}: no train/ folder, so every class folder is train (a hold-out gives val)")
    val_dirs = [root / name for name in VAL_DIRS if (root / name).is_dir()] if split_layout else []
    for empty in [folder for folder in val_dirs if not list_images(folder, recursive=True)]:
        notes.append(f"{empty}: no images, so the validation split is a hold-out of train")
        val_dirs.remove(empty)
    if len(val_dirs) > 1:
        raise DataError(f"{root}: both {val_dirs[0].name}/ and {val_dirs[1].name}/ exist; keep one validation folder")
    test_dir = root / "test"
    return OfficialSplits(
        train=_folder_frame(root, train_dir, mapping, allow_unlabelled=False),
        val=_folder_frame(root, val_dirs[0], mapping, allow_unlabelled=False) if val_dirs else None,
        test=_folder_frame(root, test_dir, mapping, allow_unlabelled=True)
        if split_layout and test_dir.is_dir()
        else empty_frame(),
        class_names=list(category_ids),
        category_ids=category_ids,
        notes=notes,
    )


def _folder_frame(root: Path, split_dir: Path, mapping: dict[str, int], allow_unlabelled: bool) -> pd.DataFrame:
    """Images under ``split_dir/<class>/``; with ``allow_unlabelled``, images directly in ``split_dir`` get -1."""
    files: list[tuple[Path, int]] = []
    if allow_unlabelled:
        files += [(image, -1) for image in list_images(split_dir)]
    for folder in list_subdirs(split_dir):
        images = list_images(folder, recursive=True)
        if images and folder.name not in mapping:
            raise DataError(f"{folder}: class {folder.name!r} has no folder in train; rename it or add train images")
        files += [(image, mapping[folder.name]) for image in images]
    return frame(
        [absolute(image.parent, image.name) for image, _ in files],
        [label for _, label in files],
        [image.relative_to(root).as_posix() for image, _ in files],
    )


def read_csv(root: Path) -> OfficialSplits:
    """Read ``root/train.csv`` (+ optional ``val.csv``, ``test.csv``) with columns ``path,label``."""
    root = Path(root)
    train_csv = root / "train.csv"
    if not train_csv.is_file():
        raise layout_error(root, "train.csv", "csv", "CSV")
    train = _read_table(train_csv, "train")
    numeric = all(_INTEGER.fullmatch(label) for label in train["label"])
    category_ids = sort_category_ids([int(label) if numeric else label for label in train["label"]])
    mapping = label_map(category_ids)

    def split_frame(path: Path, table: pd.DataFrame) -> pd.DataFrame:
        labels = []
        for line, label in enumerate(table["label"], 2):
            key = int(label) if numeric and _INTEGER.fullmatch(label) else label
            if label == "":
                labels.append(-1)  # only test rows may be unlabelled (checked in _read_table)
            elif key in mapping:
                labels.append(mapping[key])
            else:
                raise DataError(f"{path}:{line}: label {label!r} does not occur in train.csv")
        return frame([absolute(root, image) for image in table["path"]], labels, table["path"].tolist())

    val_csv, test_csv = root / "val.csv", root / "test.csv"
    return OfficialSplits(
        train=split_frame(train_csv, train),
        val=split_frame(val_csv, _read_table(val_csv, "val")) if val_csv.is_file() else None,
        test=split_frame(test_csv, _read_table(test_csv, "test")) if test_csv.is_file() else empty_frame(),
        class_names=[str(category) for category in category_ids],
        category_ids=category_ids,
    )


def _read_table(path: Path, split: str) -> pd.DataFrame:
    """A split CSV with stripped labels; only the test CSV may lack labels."""
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        message = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise DataError(f"{path}: not a CSV table ({message}); the first line must be the header path,label") from None
    table = require_columns(table, path, ["path"] if split == "test" else ["path", "label"])
    if "label" not in table:
        table["label"] = ""
    empty_paths = table["path"].str.strip() == ""
    if empty_paths.any():
        raise DataError(f"{path}:{int(empty_paths.to_numpy().nonzero()[0][0]) + 2}: empty path")
    repeated = table["path"].duplicated()
    if repeated.any():  # one image id twice: its rows would count twice in training, and a submission refuses them
        line = int(repeated.to_numpy().nonzero()[0][0]) + 2
        raise DataError(f"{path}:{line}: path {table['path'][repeated].iloc[0]!r} is listed twice; keep one line")
    table["label"] = table["label"].str.strip()
    unlabelled = table["label"] == ""
    if split != "test" and unlabelled.any():
        line = int(unlabelled.to_numpy().nonzero()[0][0]) + 2
        raise DataError(f"{path}:{line}: empty label; every {split} image needs one")
    return table
