"""Stanford Cars: MATLAB struct arrays, in two official releases.

* the devkit release: ``cars_train/``, ``cars_test/``, ``devkit/{cars_meta,cars_train_annos,cars_test_annos}.mat`` and
  the separately published ``cars_test_annos_withlabels.mat`` (at the top level as torchvision expects, or inside
  ``devkit/`` as mmpretrain expects). The Kaggle mirror nests ``cars_train/cars_train/`` and ``car_devkit/devkit/``.
* the all-in-one release: ``car_ims/`` plus ``cars_annos.mat`` (with a ``test`` flag per image).

Struct fields are read by name, never by position: the test file without labels lacks ``class``.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from fgvc.datasets._common import absolute, first, first_existing, layout_error, load_mat, mat_strings, mat_struct
from fgvc.datasets.base import OfficialSplits, frame
from fgvc.errors import DataError

NAME = "cars"
TITLE = "Stanford Cars"
BOX_FIELDS = ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2")
LAYOUT = """\
stanford_cars/ (devkit release; the root may be this folder or its parent)
  cars_train/00001.jpg ... 08144.jpg        (Kaggle mirror: cars_train/cars_train/*.jpg also accepted)
  cars_test/00001.jpg ... 08041.jpg
  cars_test_annos_withlabels.mat            (separate download; may also sit in devkit/)
  devkit/cars_meta.mat                      class_names (1,196)
  devkit/cars_train_annos.mat               annotations: bbox_x1 bbox_y1 bbox_x2 bbox_y2 class fname
  devkit/cars_test_annos.mat                (no class field: test labels unknown without the file above)
or the all-in-one release:
  car_ims/000001.jpg ... 016185.jpg
  cars_annos.mat                            annotations: relative_im_path bbox_* class test; class_names"""


def read_cars(root: Path) -> OfficialSplits:
    """Read either Stanford Cars release under ``root`` (or ``root/stanford_cars``)."""
    root = Path(root)
    for base in (root, root / "stanford_cars"):
        devkit = _find_devkit(base)
        all_in_one = (base / "cars_annos.mat").exists() and (base / "car_ims").is_dir()
        if devkit is not None and not (all_in_one and not (base / "cars_train").is_dir()):
            return _read_devkit_release(base, devkit)  # (a devkit beside the all-in-one release: for its names)
        if (base / "cars_annos.mat").exists():
            return _read_all_in_one_release(base)
    raise layout_error(root, "devkit/cars_meta.mat (or cars_annos.mat)", NAME, TITLE)


def _find_devkit(base: Path) -> Path | None:
    for devkit in (base / "devkit", base / "car_devkit" / "devkit", base / "car_devkit", base):
        if (devkit / "cars_meta.mat").exists() and (devkit / "cars_train_annos.mat").exists():
            return devkit
    return None


def _image_dir(base: Path, name: str) -> Path:
    nested = base / name / name  # the Kaggle mirror extracts each archive into a folder of the same name
    if nested.is_dir():
        return nested
    if (base / name).is_dir():
        return base / name
    raise layout_error(base, f"{name}/", NAME, TITLE)


def _read_devkit_release(base: Path, devkit: Path) -> OfficialSplits:
    meta_mat = devkit / "cars_meta.mat"
    class_names = mat_strings(load_mat(meta_mat, ["class_names"]), "class_names", meta_mat)
    train_dir, test_dir = _image_dir(base, "cars_train"), _image_dir(base, "cars_test")
    test_mat = first_existing(
        [
            base / "cars_test_annos_withlabels.mat",
            *([devkit.parent / "cars_test_annos_withlabels.mat"] if devkit != base else []),  # Kaggle's car_devkit/
            devkit / "cars_test_annos_withlabels.mat",
            devkit / "cars_test_annos.mat",
        ]
    )
    if test_mat is None:
        raise layout_error(base, "cars_test_annos_withlabels.mat", NAME, TITLE)
    train = _annotations(devkit / "cars_train_annos.mat", "fname", len(class_names), require_class=True)
    test = _annotations(test_mat, "fname", len(class_names), require_class=False)
    notes = []
    if (test["label"] < 0).all() and len(test):
        notes.append(
            f"{test_mat.name} has no labels: test labels are -1; put cars_test_annos_withlabels.mat in {base} to "
            "measure test accuracy"
        )
    return OfficialSplits(
        train=_frame(train, train_dir),
        test=_frame(test, test_dir),
        class_names=class_names,
        category_ids=list(range(1, len(class_names) + 1)),
        notes=notes,
    )


def _read_all_in_one_release(base: Path) -> OfficialSplits:
    annos_mat = base / "cars_annos.mat"
    if not (base / "car_ims").is_dir():
        raise layout_error(base, "car_ims/", NAME, TITLE)
    data = load_mat(annos_mat, ["annotations", "class_names"])
    class_names = mat_strings(data, "class_names", annos_mat)
    table = _annotations(annos_mat, "relative_im_path", len(class_names), require_class=True, data=data)
    test_flag = pd.Series(mat_struct(data, "annotations", annos_mat, ["test"])["test"])
    if not test_flag.isin([0, 1]).all():
        raise DataError(f"{annos_mat}: annotations.test must be 0 (train) or 1 (test)")
    return OfficialSplits(
        train=_frame(table[test_flag.to_numpy() == 0], base),
        test=_frame(table[test_flag.to_numpy() == 1], base),
        class_names=class_names,
        category_ids=list(range(1, len(class_names) + 1)),
    )


def _annotations(
    path: Path, file_field: str, num_classes: int, require_class: bool, data: dict | None = None
) -> pd.DataFrame:
    """The ``annotations`` struct as a table: file, boxes, and the 0-based label (-1 where the file has no class)."""
    data = data if data is not None else load_mat(path, ["annotations"])
    has_class = "class" in (data["annotations"].dtype.names or ())
    fields = [*BOX_FIELDS, file_field] + (["class"] if has_class or require_class else [])
    table = pd.DataFrame(mat_struct(data, "annotations", path, fields))
    if not has_class:
        table["class"] = 0
    not_number = pd.to_numeric(table["class"], errors="coerce").isna()
    if not_number.any():
        raise DataError(f"{path}: class {first(table['class'][not_number])!r} is not a class number; "
                        "re-extract the official file")  # fmt: skip
    bad = ~table["class"].between(0 if not has_class else 1, num_classes)
    if bad.any():
        raise DataError(f"{path}: class {first(table['class'][bad])!r} outside 1..{num_classes} (cars_meta.mat)")
    if table[file_field].isna().any():
        raise DataError(f"{path}: an annotation has an empty {file_field}; re-extract the official file")
    table["label"] = table["class"].astype("int64") - 1
    return table.rename(columns={file_field: "file"})


def _frame(table: pd.DataFrame, image_dir: Path) -> pd.DataFrame:
    return frame(
        [absolute(image_dir, name) for name in table["file"]],
        table["label"].tolist(),
        [Path(name).stem for name in table["file"]],
        **{field: table[field].astype(float).tolist() for field in BOX_FIELDS},
    )
