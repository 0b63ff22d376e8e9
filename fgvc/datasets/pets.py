"""Oxford-IIIT Pets: ``annotations/{trainval,test}.txt`` lines ``<name> <CLASS-ID 1..37> <SPECIES> <BREED ID>``.

Only the images these lists name are read: ``images/`` also holds stray ``.mat`` files, and some ``.jpg`` files are
PNG or GIF (the decoder handles those). The class name is the breed, i.e. the image name without its ``_<n>`` suffix.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from fgvc.datasets._common import (
    absolute,
    find_base,
    first,
    label_map,
    map_labels,
    read_columns,
    sort_category_ids,
    unique_keys,
)
from fgvc.datasets.base import OfficialSplits, frame
from fgvc.errors import DataError

NAME = "pets"
TITLE = "Oxford-IIIT Pets"
REQUIRED = ("annotations/trainval.txt", "annotations/test.txt", "images")
COLUMNS: dict[str, Callable[[str], Any]] = {"name": str, "class_id": int, "species": int, "breed_id": int}
LAYOUT = """\
pets/ (images.tar.gz and annotations.tar.gz extracted side by side; an oxford-iiit-pet/ subfolder is also accepted)
  images/<Breed_name>_<n>.jpg            (cats Capitalised, dogs lowercase)
  annotations/trainval.txt               <name> <CLASS-ID 1..37> <SPECIES 1 cat|2 dog> <BREED ID>
  annotations/test.txt                   same columns
  annotations/list.txt, trimaps/, xmls/  (not used)"""


def read_pets(root: Path) -> OfficialSplits:
    """Read the official Pets lists under ``root`` (or ``root/oxford-iiit-pet``)."""
    base = find_base(Path(root), REQUIRED, NAME, TITLE, subdirs=("oxford-iiit-pet",))
    lists = {split: base / "annotations" / f"{split}.txt" for split in ("trainval", "test")}
    tables = {split: unique_keys(read_columns(path, COLUMNS), "name", path) for split, path in lists.items()}
    both = pd.concat(tables.values(), ignore_index=True)
    category_ids = sort_category_ids(both["class_id"].tolist())
    class_names = _breed_names(both, category_ids, lists["trainval"])
    mapping = label_map(category_ids)

    def split_frame(split: str) -> pd.DataFrame:
        rows = tables[split]
        return frame(
            [absolute(base / "images", f"{name}.jpg") for name in rows["name"]],
            map_labels(rows["class_id"].tolist(), mapping, lists[split]),
            rows["name"].tolist(),
            species=rows["species"].tolist(),
        )

    return OfficialSplits(
        train=split_frame("trainval"), test=split_frame("test"), class_names=class_names, category_ids=category_ids
    )


def _breed_names(rows: pd.DataFrame, category_ids: list[int], path: Path) -> list[str]:
    """One breed name per class id, taken from the image names (``Abyssinian_100`` -> ``Abyssinian``)."""
    breeds = rows.assign(breed=rows["name"].str.rsplit("_", n=1).str[0]).drop_duplicates(["class_id", "breed"])
    clashing = breeds["class_id"].duplicated()
    if clashing.any():
        class_id = first(breeds["class_id"][clashing])
        found = ", ".join(breeds["breed"][breeds["class_id"] == class_id])
        raise DataError(f"{path}: class id {class_id} is given to several breeds ({found}); re-extract the lists")
    repeated = breeds["breed"].duplicated()
    if repeated.any():  # a wrong CLASS-ID on one line: two classes of one breed
        breed = first(breeds["breed"][repeated])
        ids = ", ".join(str(c) for c in sorted(breeds["class_id"][breeds["breed"] == breed]))
        raise DataError(f"{path}: breed {breed} is given several class ids ({ids}); re-extract the lists")
    names = dict(zip(breeds["class_id"], breeds["breed"], strict=True))
    return [names[category] for category in category_ids]
