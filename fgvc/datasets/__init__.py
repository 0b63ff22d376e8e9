"""The dataset registry: one reader per official on-disk format, looked up by name.

``load_index(name, split)`` is what the rest of fgvc calls; it finds the root (explicit, else ``$FGVC_DATA/<name>``,
else ``datasets/<name>``), parses the official files and returns one split as a :class:`DatasetIndex`.
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from fgvc.datasets import birdsnap, cars, cub, flowers, generic, herbarium, inat, nabirds, pets
from fgvc.datasets.base import SPLITS, DatasetIndex, DatasetSpec, OfficialSplits, Reader, make_indices, require_split
from fgvc.errors import ConfigError, LayoutError

DEMO_LAYOUT = (
    "demo/ (generated on first use by fgvc.demo_data.ensure_demo: a tiny synthetic dataset in CUB-200-2011 format)\n"
    + cub.LAYOUT.split("\n", 1)[1]
)


def _spec(name: str, reader: Reader, title: str, layout: str, classes: int | None, *counts: int | None) -> DatasetSpec:
    return DatasetSpec(name, reader, title, layout, classes, dict(zip(SPLITS, counts, strict=True)))


DATASETS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        _spec("cub", cub.read_cub, cub.TITLE, cub.LAYOUT, 200, 5994, None, 5794),
        _spec("nabirds", nabirds.read_nabirds, nabirds.TITLE, nabirds.LAYOUT, 555, 23929, None, 24633),
        _spec("cars", cars.read_cars, cars.TITLE, cars.LAYOUT, 196, 8144, None, 8041),
        _spec("flowers", flowers.read_flowers, flowers.TITLE, flowers.LAYOUT, 102, 1020, 1020, 6149),
        _spec("pets", pets.read_pets, pets.TITLE, pets.LAYOUT, 37, 3680, None, 3669),
        _spec("birdsnap", birdsnap.read_birdsnap, birdsnap.TITLE, birdsnap.LAYOUT, 500, 47386, None, 2443),
        _spec("inat2017", inat.read_inat2017, "iNaturalist 2017", inat.layout(2017), 5089, 579184, 95986, 182707),
        _spec("inat2018", inat.read_inat2018, "iNaturalist 2018", inat.layout(2018), 8142, 437513, 24426, 149394),
        _spec("inat2019", inat.read_inat2019, "iNaturalist 2019", inat.layout(2019), 1010, 265213, 3030, 35350),
        _spec("inat2021", inat.read_inat2021, "iNaturalist 2021", inat.layout(2021), 10000, 2686843, 100000, 500000),
        _spec(
            "herbarium2019",
            herbarium.read_herbarium2019,
            "Herbarium 2019",
            herbarium.LAYOUT_2019,
            683,
            34225,
            2679,
            9565,
        ),
        _spec(
            "herbarium2020",
            herbarium.read_herbarium2020,
            "Herbarium 2020",
            herbarium.LAYOUT_COCO.format(year=2020),
            None,
            1030747,
            None,
            138292,
        ),
        _spec(
            "herbarium2021",
            herbarium.read_herbarium2021,
            "Herbarium 2021",
            herbarium.LAYOUT_COCO.format(year=2021),
            None,
            2257759,
            None,
            243020,
        ),
        _spec(
            "herbarium2022",
            herbarium.read_herbarium2022,
            "Herbarium 2022",
            herbarium.LAYOUT_2022,
            15501,
            839772,
            None,
            210407,
        ),
        _spec("folder", generic.read_folder, "image folder", generic.FOLDER_LAYOUT, None, None, None, None),
        _spec("csv", generic.read_csv, "CSV lists", generic.CSV_LAYOUT, None, None, None, None),
        _spec("demo", cub.read_cub, "demo (synthetic, CUB format)", DEMO_LAYOUT, None, None, None, None),
    )
}


def get_spec(name: str) -> DatasetSpec:
    """The registry entry for ``name``; an unknown name lists the valid ones."""
    try:
        return DATASETS[name]
    except KeyError:
        raise ConfigError(f"unknown dataset '{name}'; choose one of {', '.join(DATASETS)}") from None


def resolve_root(name: str, root: str | Path | None = None) -> Path:
    """The dataset folder: ``root`` if given, else ``$FGVC_DATA/<name>``, else ``datasets/<name>`` under the cwd."""
    if root is not None:
        return Path(root).expanduser().absolute()
    base = os.environ.get("FGVC_DATA")
    return (Path(base).expanduser() if base else Path("datasets")).absolute() / name


def load_index(
    name: str,
    split: str,
    root: str | Path | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    train_on_all: bool = False,
) -> DatasetIndex:
    """One split of dataset ``name``; ``val`` is a stratified hold-out of train where the benchmark has none."""
    require_split(split)
    return load_indices(name, root, val_fraction=val_fraction, seed=seed, train_on_all=train_on_all)[split]


def load_indices(
    name: str, root: str | Path | None = None, val_fraction: float = 0.1, seed: int = 0, train_on_all: bool = False
) -> dict[str, DatasetIndex]:
    """Every split of dataset ``name`` (train, val, test) from one reading of its metadata."""
    resolved = _ready_root(name, resolve_root(name, root))
    return make_indices(get_spec(name), resolved, val_fraction=val_fraction, seed=seed, train_on_all=train_on_all)


def _ready_root(name: str, root: Path) -> Path:
    """Generate the demo data on first use at its default place; every other dataset must already be on disk.

    Only at the default place: a mistyped ``--data-root`` must be an error, not a new dataset written there.
    """
    if name != "demo" or any((base / "images.txt").exists() for base in (root, root / "CUB_200_2011")):
        return root
    if root.resolve() != resolve_root(name, None).resolve():
        raise LayoutError(f"{root}: no demo data there; check the path, or generate it with `fgvc demo --data-root "
                          f"{root}` (which then runs the whole demo, a few minutes)")  # fmt: skip
    from fgvc.demo_data import ensure_demo  # the demo generator is only needed for this dataset

    return Path(ensure_demo(root))


def list_datasets() -> pd.DataFrame:
    """One row per registered dataset: official class and image counts, and the first line of its layout."""
    return pd.DataFrame(
        [
            {
                "name": spec.name,
                "title": spec.title,
                "classes": spec.classes,
                **{split: spec.counts.get(split) for split in SPLITS},
                "layout": spec.layout.splitlines()[0],
            }
            for spec in DATASETS.values()
        ]
    ).astype({"classes": "Int64", "train": "Int64", "val": "Int64", "test": "Int64"})


__all__ = [
    "DATASETS",
    "DatasetIndex",
    "DatasetSpec",
    "OfficialSplits",
    "get_spec",
    "list_datasets",
    "load_index",
    "load_indices",
    "require_split",
    "resolve_root",
]
