"""Parsing helpers shared by the dataset readers.

Every reader turns a problem with the user's files into a one-line :class:`LayoutError` (the expected files are not
where the official archive puts them) or :class:`DataError` (a metadata file is there but cannot be parsed), naming
the file, the line where there is one, and the README that explains the layout.
"""

from __future__ import annotations

import csv
import json
import os
import warnings
import zlib
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.io

from fgvc.datasets.base import frame
from fgvc.errors import DataError, LayoutError

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"})


def readme(name: str) -> str:
    """Where the layout and the download are described: in fgvc's source tree, which an installed wheel lacks."""
    return f"datasets/{name}/README.md"


def layout_error(root: Path, missing: str, name: str, title: str, found: Path | None = None) -> LayoutError:
    hint = f"; {found} holds it: pass --root {found} (or data.root in the recipe)" if found else ""
    return LayoutError(
        f"{root}: {missing} not found, so this is not the {title} layout{hint}; "
        f"run `fgvc datasets check {name}` for the expected tree ({readme(name)} in fgvc's source tree says where to "
        "download it)"
    )


def find_base(root: Path, required: Sequence[str], name: str, title: str, subdirs: Sequence[str] = ()) -> Path:
    """Return ``root`` or the first ``root/<subdir>`` (or ``root/<name>``) holding every required entry.

    Users point the root either at the folder the archive extracts to or at its parent (``datasets/``), so both are
    accepted. The error names the first missing entry in the candidate that came closest, and a folder one level
    further down that holds everything (an archive unzipped into a folder named after the Kaggle competition).
    """
    candidates = list(dict.fromkeys([root, *(root / sub for sub in subdirs), root / name]))
    for base in candidates:
        if all((base / entry).exists() for entry in required):
            return base
    closest = max(candidates, key=lambda base: sum((base / entry).exists() for entry in required))
    missing = next(entry for entry in required if not (closest / entry).exists())
    deeper = (child for base in candidates if base.is_dir() for child in sorted(base.iterdir()) if child.is_dir())
    found = next((child for child in deeper if all((child / entry).exists() for entry in required)), None)
    raise layout_error(closest, missing, name, title, found)


def first(values: pd.Series) -> Any:
    """The first value as a plain Python object, so messages read ``16``, not ``np.int64(16)``."""
    value = values.iloc[0]
    return value.item() if isinstance(value, np.generic) else value


def first_existing(candidates: Iterable[Path]) -> Path | None:
    return next((path for path in candidates if path.exists()), None)


def absolute(base: Path, relative: str) -> str:
    """Absolute path string without resolving symlinks (data folders are often symlinked; keep the user's view)."""
    return os.path.abspath(os.path.join(base, relative))


def read_columns(path: Path, columns: dict[str, Callable[[str], Any]], free_text_last: bool = False) -> pd.DataFrame:
    """Read a whitespace-separated text file without header (CUB/NABirds/Pets style), one row per line.

    Args:
        columns: column name -> converter (``int``, ``float``, ``str``) applied to each field.
        free_text_last: the last column may contain spaces (NABirds class names), so split at most ``n-1`` times.

    Blank lines and ``#`` comment lines are skipped. A line with the wrong number of fields or a field the converter
    rejects raises :class:`DataError` with ``file:line``.
    """
    names = list(columns)
    converters = list(columns.values())
    rows: list[list[Any]] = []
    try:
        with open(path, encoding="utf-8-sig") as fh:  # -sig: a byte-order mark from a Windows editor is not data
            for lineno, line in enumerate(fh, 1):
                text = line.strip()
                if not text or text.startswith("#"):
                    continue
                fields = text.split(maxsplit=len(names) - 1) if free_text_last else text.split()
                if len(fields) != len(names):
                    raise DataError(
                        f"{path}:{lineno}: expected {len(names)} fields <{'> <'.join(names)}>, found {len(fields)} "
                        f"in {text[:80]!r}; re-extract the file from the official archive"
                    )
                try:
                    rows.append([convert(field) for convert, field in zip(converters, fields, strict=True)])
                except ValueError:
                    raise DataError(
                        f"{path}:{lineno}: cannot parse {text[:80]!r} as <{'> <'.join(names)}>; "
                        "re-extract the file from the official archive"
                    ) from None
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{path}: not UTF-8 text ({exc.reason}); re-extract the file from the official archive"
        ) from None
    return pd.DataFrame(rows, columns=names)


def read_tsv(path: Path, required: Sequence[str]) -> pd.DataFrame:
    """Read a tab-separated file with a header line (Birdsnap), checking that the required columns are present.

    Values are stripped, and a tab ending each line (one field more than the header) is not read as an index column:
    either used to shift or change every path, which then matched nothing in the other files."""
    try:
        with warnings.catch_warnings():  # "loss of data": the empty fields after the trailing tabs
            warnings.simplefilter("ignore", pd.errors.ParserWarning)
            table = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False, quoting=csv.QUOTE_NONE,
                                index_col=False)  # fmt: skip
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as exc:
        message = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise DataError(f"{path}: not a tab-separated table ({message}); re-extract the official file") from None
    table.columns = [str(column).strip() for column in table.columns]
    table = table.apply(lambda column: column.str.strip())
    return require_columns(table, path, required)


def require_columns(table: pd.DataFrame, path: Path, required: Sequence[str]) -> pd.DataFrame:
    missing = [column for column in required if column not in table.columns]
    if missing:
        raise DataError(
            f"{path}: column '{missing[0]}' missing (found {', '.join(map(str, table.columns)) or 'none'}); "
            f"the header must name {', '.join(required)}"
        )
    return table


def load_json(path: Path) -> Any:
    """Load a JSON file; UTF-8 first, then latin-1 (the Herbarium 2020 metadata is not valid UTF-8)."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    del raw  # not held next to the text and the parsed objects: ~2 GB for iNat 2021's train.json
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(
            f"{path}:{exc.lineno}:{exc.colno}: invalid JSON ({exc.msg}: line {exc.lineno} column {exc.colno}); "
            "re-download or re-extract the file"
        ) from None


def json_records(data: Any, key: str, path: Path, fields: Sequence[str]) -> pd.DataFrame:
    """The list ``data[key]`` as a frame with the given fields checked (missing key: empty frame)."""
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object with '{key}', found {type(data).__name__}")
    records = data.get(key) or []
    if not isinstance(records, list):
        raise DataError(f"{path}: '{key}' must be a list, found {type(records).__name__}")
    not_object = next((record for record in records if not isinstance(record, dict)), None)
    if not_object is not None:
        raise DataError(f"{path}: '{key}' entries must be JSON objects, found {_json_type(not_object)} "
                        f"{str(not_object)[:40]!r}; is this the official file?")  # fmt: skip
    table = pd.DataFrame.from_records(records) if records else pd.DataFrame(columns=list(fields))
    missing = [name for name in fields if name not in table.columns]
    if missing:
        raise DataError(f"{path}: '{key}' entries lack the key '{missing[0]}'; is this the right year's file?")
    if table[list(fields)].isna().any().any():
        raise DataError(f"{path}: some '{key}' entries have no value for one of {', '.join(fields)}")
    for name in fields:  # ids are numbers or strings, file names strings: anything else fails far from here
        column = table[name]
        if isinstance(column.dtype, pd.StringDtype) or (name != "file_name" and pd.api.types.is_numeric_dtype(column)):
            continue  # typed by pandas already: no per-value look (millions of rows in iNat 2021)
        allowed = (str,) if name == "file_name" else (str, int, float, np.integer, np.floating)
        wrong = column[~column.map(lambda value, allowed=allowed: isinstance(value, allowed))]
        if len(wrong):
            expected = "a string" if name == "file_name" else "a number or a string"
            raise DataError(f"{path}: '{key}' entry with {name} {str(first(wrong))[:40]!r} ({_json_type(first(wrong))})"
                            f"; {name} must be {expected}: is this the official file?")  # fmt: skip
    return table


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
    return next((name for kind, name in names.items() if isinstance(value, kind)), "a number")


def load_mat(path: Path, variables: Sequence[str]) -> dict[str, Any]:
    """Load a MATLAB file with ``squeeze_me=False`` (shapes stay as MATLAB wrote them) and check its variables."""
    try:
        data = scipy.io.loadmat(path, squeeze_me=False)
    except (ValueError, TypeError, IndexError, OSError, RuntimeError, zlib.error, scipy.io.matlab.MatReadError) as exc:
        # v7.3 (HDF5): RuntimeError; a damaged compressed variable: zlib.error; shorter than a MATLAB header (an error
        # page saved by curl, a cut-off download): IndexError
        raise DataError(
            f"{path}: not a readable MATLAB file ({exc}); re-extract it from the official archive"
        ) from None
    missing = [name for name in variables if name not in data]
    if missing:
        found = ", ".join(name for name in data if not name.startswith("__")) or "none"
        raise DataError(f"{path}: variable '{missing[0]}' not found (found {found}); is this the official file?")
    return data


def mat_scalar(value: Any) -> Any:
    """Unwrap a loadmat value ((1,1) numbers, (1,) strings, object cells around either) into a Python scalar."""
    array = np.asarray(value)
    while array.dtype == object and array.size == 1:
        array = np.asarray(array.ravel()[0])
    if array.size != 1:
        return str(array.ravel()[0]) if array.dtype.kind == "U" and array.size else None
    item = array.ravel()[0]
    return str(item) if array.dtype.kind == "U" else item.item()


def mat_struct(data: dict[str, Any], variable: str, path: Path, fields: Sequence[str]) -> dict[str, list[Any]]:
    """Fields of a MATLAB struct array as lists of scalars, looked up by name (the field order varies by file)."""
    array = np.asarray(data[variable])
    names = array.dtype.names or ()
    missing = [name for name in fields if name not in names]
    if missing:
        raise DataError(
            f"{path}: '{variable}' has no field '{missing[0]}' (fields: {', '.join(names) or 'none'}); "
            "is this the official file?"
        )
    flat = array.ravel()
    return {name: [mat_scalar(item[name]) for item in flat] for name in fields}


def mat_strings(data: dict[str, Any], variable: str, path: Path) -> list[str]:
    """A MATLAB cell array of strings (e.g. ``class_names``) as a list."""
    values = [mat_scalar(item) for item in np.asarray(data[variable], dtype=object).ravel()]
    if not all(isinstance(value, str) for value in values):
        raise DataError(f"{path}: '{variable}' is not a cell array of strings; is this the official file?")
    return values


def mat_ints(data: dict[str, Any], variable: str, path: Path) -> np.ndarray:
    """A numeric MATLAB vector (labels, 1-based indices) as a flat int64 array."""
    array = np.asarray(data[variable])
    if array.dtype.kind not in "iuf" or (array.dtype.kind == "f" and not np.all(np.mod(array, 1) == 0)):
        raise DataError(f"{path}: '{variable}' must hold integers, found {array.dtype}; is this the official file?")
    return array.astype(np.int64).ravel()


def list_images(folder: Path, recursive: bool = False) -> list[Path]:
    """Image files in ``folder`` (and below it when ``recursive``), sorted; hidden files (macOS ``._*``) skipped."""
    entries = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(
        entry
        for entry in entries
        if entry.is_file()
        and not any(part.startswith(".") for part in entry.relative_to(folder).parts)
        and entry.suffix.lower() in IMAGE_SUFFIXES
    )


def list_subdirs(folder: Path) -> list[Path]:
    return sorted(entry for entry in folder.iterdir() if entry.is_dir() and not entry.name.startswith("."))


def sort_category_ids(ids: Iterable[Any]) -> list[Any]:
    """Unique category ids in numeric order where they are all numbers (or digit strings), else in string order."""
    unique = list(dict.fromkeys(ids))
    if all(isinstance(value, (int, np.integer)) for value in unique):
        return sorted(unique)
    if all(isinstance(value, str) and value.isdigit() for value in unique):
        return sorted(unique, key=lambda value: (int(value), value))
    return sorted(unique, key=str)


def label_map(category_ids: Sequence[Any]) -> dict[Any, int]:
    return {category: index for index, category in enumerate(category_ids)}


def map_labels(
    categories: Sequence[Any], mapping: dict[Any, int], path: Path, what: str = "category", classes: Path | None = None
) -> list[int]:
    """Translate original category ids to label indices; an id outside the class list raises :class:`DataError`
    naming the file of the class list too (``classes``) where it is another file: a cut one is the likelier fault."""
    try:
        return [mapping[category] for category in categories]
    except KeyError as exc:
        listed = f"{classes} ({len(mapping)} classes)" if classes is not None else "the class list"
        raise DataError(
            f"{path}: {what} {exc.args[0]!r} is not in {listed}; the metadata files disagree (one may be cut short): "
            "re-extract them"
        ) from None


def empty_frame() -> pd.DataFrame:
    return frame([], [], [])


def attach(table: pd.DataFrame, other: pd.DataFrame, key: str, path: Path, listed_in: str) -> pd.DataFrame:
    """Left-join ``other`` (read from ``path``) onto ``table`` by ``key``, requiring exactly one row per key."""
    duplicated = other[key].duplicated()
    if duplicated.any():
        raise DataError(f"{path}: {key} {first(other[key][duplicated])!r} is listed twice; re-extract the file")
    absent = ~table[key].isin(other[key])
    if absent.any():
        raise DataError(
            f"{path}: no line for {key} {first(table[key][absent])!r} (listed in {listed_in}); "
            "the metadata files come from different copies, re-extract them together"
        )
    return table.merge(other, on=key, how="left")


def unique_keys(table: pd.DataFrame, key: str, path: Path) -> pd.DataFrame:
    duplicated = table[key].duplicated()
    if duplicated.any():
        raise DataError(f"{path}: {key} {first(table[key][duplicated])!r} is listed twice; re-extract the file")
    return table


def check_flags(values: pd.Series, path: Path, allowed: Sequence[int] = (0, 1)) -> None:
    bad = ~values.isin(list(allowed))
    if bad.any():
        raise DataError(f"{path}: split flag {first(values[bad])!r} is not one of {', '.join(map(str, allowed))}")


def corner_boxes(x: pd.Series, y: pd.Series, width: pd.Series, height: pd.Series) -> dict[str, list[float]]:
    """``x y w h`` boxes as the corner columns every reader uses (``bbox_x1 bbox_y1 bbox_x2 bbox_y2``, pixels)."""
    x, y = x.astype(float), y.astype(float)
    return {
        "bbox_x1": x.tolist(),
        "bbox_y1": y.tolist(),
        "bbox_x2": (x + width.astype(float)).tolist(),
        "bbox_y2": (y + height.astype(float)).tolist(),
    }


def coco_frame(
    data: Any,
    path: Path,
    mapping: dict[Any, int],
    to_path: Callable[[str], str],
    labelled: bool,
    id_key: str = "id",
) -> pd.DataFrame:
    """One split of a COCO-style file (iNat, Herbarium): ``images`` joined to ``annotations`` on the image id.

    Args:
        mapping: original category id -> label index (from the training file's categories).
        to_path: ``file_name`` -> absolute image path.
        labelled: every image must have an annotation (train/val); otherwise missing labels become -1 (test).
        id_key: the image id key in ``images`` ("id"; Herbarium 2022 uses "image_id").
    """
    images = json_records(data, "images", path, [id_key, "file_name"])[[id_key, "file_name"]]
    images = unique_keys(images.rename(columns={id_key: "image_key"}), "image_key", path)
    # A test file may carry annotations without categories (the 2017-2019 test files are unconfirmed): no labels.
    annotations = json_records(data, "annotations", path, ["image_id", "category_id"] if labelled else ["image_id"])
    if "category_id" not in annotations.columns:
        annotations = annotations.assign(category_id=None)
    annotations = annotations.dropna(subset=["category_id"]).drop_duplicates("image_id")[["image_id", "category_id"]]
    if annotations.empty:  # test files have no annotations at all
        table = images.assign(category_id=None)
    else:
        try:
            table = images.merge(annotations.rename(columns={"image_id": "image_key"}), on="image_key", how="left")
        except ValueError:
            raise DataError(f"{path}: image ids in 'images' and 'annotations' have different types") from None
    unlabelled = table["category_id"].isna()
    if labelled and unlabelled.any():
        raise DataError(
            f"{path}: image id {first(table['image_key'][unlabelled])!r} has no annotation ({int(unlabelled.sum())} "
            "such images); every image of a labelled split needs one: re-download the file, or remove those images"
        )
    labels = pd.Series(-1, index=table.index, dtype="int64")
    known = ~unlabelled
    if known.any():
        labels[known] = map_labels(table.loc[known, "category_id"].tolist(), mapping, path)
    paths = [to_path(file_name) for file_name in table["file_name"]]
    return frame(paths, labels.tolist(), table["image_key"].tolist())
