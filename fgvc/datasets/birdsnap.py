"""Birdsnap: the archive holds metadata only; images are scraped from Flickr with ``get_birdsnap.py``.

Many URLs are dead, so every local copy is incomplete: listed images that are not on disk are skipped and counted in
the notes. The split is the official one: ``test_images.txt`` is the test set, every other listed image is train.
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from fgvc.datasets._common import (
    absolute,
    find_base,
    first,
    first_existing,
    label_map,
    layout_error,
    map_labels,
    read_tsv,
    unique_keys,
)
from fgvc.datasets.base import OfficialSplits, frame
from fgvc.errors import DataError

NAME = "birdsnap"
TITLE = "Birdsnap"
REQUIRED = ("species.txt", "images.txt", "test_images.txt")
BOX_COLUMNS = {"bb_x1": "bbox_x1", "bb_y1": "bbox_y1", "bb_x2": "bbox_x2", "bb_y2": "bbox_y2"}
LAYOUT = """\
birdsnap/ (from birdsnap.tgz, then `python get_birdsnap.py` inside it; the root may be this folder or its parent)
  species.txt                TSV with header: id common scientific dir
  images.txt                 TSV with header: url md5 path species_id bb_x1 bb_y1 bb_x2 bb_y2 <parts...>
  test_images.txt            header `path`, then one <dir>/<n>.jpg per line
  download/images/<dir>/<n>.jpg   (what get_birdsnap.py writes; images/<dir>/<n>.jpg also accepted)"""


def read_birdsnap(root: Path) -> OfficialSplits:
    """Read the Birdsnap metadata under ``root`` (or ``root/birdsnap``), keeping the images that were downloaded."""
    base = find_base(Path(root), REQUIRED, NAME, TITLE, subdirs=("birdsnap",))
    image_dir = first_existing([base / "download" / "images", base / "images"])
    if image_dir is None:
        raise layout_error(base, "download/images/ (run get_birdsnap.py to fetch the images)", NAME, TITLE)

    species_txt, images_txt, test_txt = (base / name for name in REQUIRED)
    species = read_tsv(species_txt, ["id", "common"])
    species["id"] = _numbers(species["id"], species_txt, "id", int)
    species = unique_keys(species, "id", species_txt).sort_values("id")
    category_ids = species["id"].tolist()

    images = unique_keys(read_tsv(images_txt, ["path", "species_id", *BOX_COLUMNS]), "path", images_txt)
    images["species_id"] = _numbers(images["species_id"], images_txt, "species_id", int)
    for column in BOX_COLUMNS:
        images[column] = _numbers(images[column], images_txt, column, float)
    images["label"] = map_labels(images["species_id"].tolist(), label_map(category_ids), images_txt, "species_id",
                                 classes=species_txt)  # fmt: skip
    images["file"] = [absolute(image_dir, path) for path in images["path"]]

    test_paths = set(read_tsv(test_txt, ["path"])["path"])
    unknown = sorted(test_paths - set(images["path"]))
    if len(unknown) > len(test_paths) / 2:  # else the test set's images would silently train
        raise DataError(f"{test_txt}: {len(unknown)} of its {len(test_paths)} paths are not in {images_txt.name} "
                        f"(e.g. {unknown[0]!r}); re-extract the official files")  # fmt: skip
    is_test = images["path"].isin(test_paths)
    present = pd.Series([os.path.isfile(path) for path in images["file"]], index=images.index, dtype=bool)
    notes = _missing_notes(present, is_test, len(unknown), image_dir)

    def split_frame(rows: pd.DataFrame) -> pd.DataFrame:
        boxes = {target: rows[source].tolist() for source, target in BOX_COLUMNS.items()}
        return frame(rows["file"].tolist(), rows["label"].tolist(), rows["path"].tolist(), **boxes)

    return OfficialSplits(
        train=split_frame(images[~is_test & present]),
        test=split_frame(images[is_test & present]),
        class_names=species["common"].tolist(),
        category_ids=category_ids,
        notes=notes,
    )


def _numbers(values: pd.Series, path: Path, column: str, kind: type) -> pd.Series:
    converted = pd.to_numeric(values, errors="coerce")
    bad = converted.isna()
    if bad.any():
        line = int(bad.to_numpy().nonzero()[0][0]) + 2  # +1 for the header, +1 for 1-based lines
        raise DataError(f"{path}:{line}: {column} {first(values[bad])!r} is not a number; re-extract the file")
    return converted.astype(kind)


def _missing_notes(present: pd.Series, is_test: pd.Series, unknown_test: int, image_dir: Path) -> list[str]:
    notes = []
    missing = int((~present).sum())
    if missing:
        in_test = int((~present & is_test).sum())
        notes.append(
            f"{missing} of {len(present)} listed images not downloaded ({missing - in_test} train, {in_test} test), "
            f"skipped; rerun get_birdsnap.py to retry them ({image_dir})"
        )
    if unknown_test:
        notes.append(f"{unknown_test} paths in test_images.txt are not listed in images.txt, ignored")
    return notes
