"""Dataset readers: every official layout in tests/dataset_fixtures.py reads back as the fixture's own ground truth."""

from __future__ import annotations

import json
import os
import shutil
import sys
import types
from collections import Counter
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.io
from dataset_fixtures import (
    Truth,
    write_birdsnap,
    write_cars,
    write_csv,
    write_cub,
    write_flowers,
    write_folder,
    write_herbarium2019,
    write_herbarium2022,
    write_herbarium_coco,
    write_inat,
    write_nabirds,
    write_pets,
)

from fgvc.datasets import DATASETS, get_spec, list_datasets, load_index, resolve_root
from fgvc.datasets.base import stratified_holdout
from fgvc.errors import ConfigError, DataError, LayoutError

CASES = {
    "cub": ("cub", write_cub),
    "nabirds": ("nabirds", write_nabirds),
    "cars-devkit": ("cars", write_cars),
    "cars-devkit-inner": ("cars", partial(write_cars, variant="devkit_inner")),
    "cars-no-test-labels": ("cars", partial(write_cars, variant="no_test_labels")),
    "cars-kaggle": ("cars", partial(write_cars, variant="kaggle")),
    "cars-all-in-one": ("cars", partial(write_cars, variant="all_in_one")),
    "flowers": ("flowers", write_flowers),
    "pets": ("pets", write_pets),
    "birdsnap": ("birdsnap", write_birdsnap),
    "inat2017": ("inat2017", partial(write_inat, year=2017)),
    "inat2018": ("inat2018", partial(write_inat, year=2018)),
    "inat2019": ("inat2019", partial(write_inat, year=2019)),
    "inat2021": ("inat2021", partial(write_inat, year=2021)),
    "herbarium2019": ("herbarium2019", write_herbarium2019),
    "herbarium2019-small": ("herbarium2019", partial(write_herbarium2019, small=True)),
    "herbarium2020": ("herbarium2020", partial(write_herbarium_coco, year=2020)),
    "herbarium2021": ("herbarium2021", partial(write_herbarium_coco, year=2021)),
    "herbarium2022": ("herbarium2022", write_herbarium2022),
    "folder": ("folder", write_folder),
    "folder-no-splits": ("folder", partial(write_folder, with_splits=False)),
    "csv": ("csv", write_csv),
}
EXPECTED_NAMES = [
    "cub",
    "nabirds",
    "cars",
    "flowers",
    "pets",
    "birdsnap",
    "inat2017",
    "inat2018",
    "inat2019",
    "inat2021",
    "herbarium2019",
    "herbarium2020",
    "herbarium2021",
    "herbarium2022",
    "folder",
    "csv",
    "demo",
]


def assert_split(table: pd.DataFrame | None, truth: Truth, split: str) -> None:
    assert table is not None, f"{split} split missing"
    assert list(table.columns[:3]) == ["path", "label", "image_id"]
    assert table["label"].dtype == np.int64
    assert table["image_id"].tolist() == truth.ids(split)
    assert table["label"].tolist() == truth.labels(split)
    assert table["path"].tolist() == truth.paths(split)
    assert all(os.path.isabs(path) and os.path.isfile(path) for path in table["path"])


@pytest.mark.parametrize("case", list(CASES))
def test_reader_returns_the_fixture_ground_truth(case: str, tmp_path: Path) -> None:
    name, write = CASES[case]
    truth = write(tmp_path)
    official = DATASETS[name].reader(truth.root)
    assert_split(official.train, truth, "train")
    assert_split(official.test, truth, "test")
    if "val" in truth.splits:
        assert_split(official.val, truth, "val")
    else:
        assert official.val is None
    assert official.class_names == truth.class_names
    assert official.category_ids == truth.category_ids
    for expected in truth.notes:
        assert any(expected in note for note in official.notes), (expected, official.notes)


def test_registry_has_exactly_the_documented_names() -> None:
    assert sorted(DATASETS) == sorted(EXPECTED_NAMES)
    assert all(spec.name == name and spec.layout.strip() for name, spec in DATASETS.items())


def test_get_spec_unknown_name_lists_the_valid_ones() -> None:
    with pytest.raises(ConfigError) as caught:
        get_spec("cub2011")
    message = str(caught.value)
    assert "cub2011" in message and "\n" not in message
    assert all(name in message for name in EXPECTED_NAMES)


def test_list_datasets_shows_official_counts() -> None:
    table = list_datasets()
    assert table["name"].tolist() == list(DATASETS)
    cub = table.set_index("name").loc["cub"]
    assert (cub["classes"], cub["train"], cub["test"]) == (200, 5994, 5794)
    assert pd.isna(cub["val"])
    flowers = table.set_index("name").loc["flowers"]
    assert (flowers["train"], flowers["val"], flowers["test"]) == (1020, 1020, 6149)


# --- family-specific quirks ----------------------------------------------------------------------------------------


def test_cub_root_may_be_the_extracted_folder_or_its_parent(tmp_path: Path) -> None:
    truth = write_cub(tmp_path)
    inner = DATASETS["cub"].reader(tmp_path / "CUB_200_2011")
    assert_split(inner.train, truth, "train")
    assert inner.category_ids == [1, 2, 3, 10]


@pytest.mark.parametrize("name", ["inat2021", "herbarium2022"])
def test_the_parent_data_folder_is_accepted_and_a_deeper_copy_is_named(tmp_path: Path, name: str) -> None:
    """``--root datasets`` (the parent) works for every dataset; an archive unzipped one level too deep (into a folder
    named after the Kaggle competition) is not guessed at, but the error names the folder to pass."""
    write = {"inat2021": lambda root: write_inat(root, 2021), "herbarium2022": write_herbarium2022}[name]
    truth = write(tmp_path / "datasets" / name)
    assert_split(DATASETS[name].reader(tmp_path / "datasets").train, truth, "train")
    deep = tmp_path / "kaggle" / name
    (tmp_path / "datasets" / name).rename(tmp_path / "kaggle-download")
    deep.parent.mkdir()
    deep.mkdir()
    (tmp_path / "kaggle-download").rename(deep / "fgvc-competition-files")
    with pytest.raises(LayoutError, match=f"{deep / 'fgvc-competition-files'} holds it: pass --root"):
        DATASETS[name].reader(deep)


def test_cub_boxes_become_corner_columns(tmp_path: Path) -> None:
    truth = write_cub(tmp_path)
    test = DATASETS["cub"].reader(tmp_path).test
    first = test[test["image_id"] == 1].iloc[0]
    assert tuple(first[["bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2"]]) == truth.extra["first_test_box"]


def test_nabirds_keeps_uuid_ids_and_names_with_spaces(tmp_path: Path) -> None:
    write_nabirds(tmp_path)
    official = DATASETS["nabirds"].reader(tmp_path)
    assert official.category_ids == [37, 295, 313, 817]  # leaves only; internal nodes 0, 1, 22 are not classes
    assert official.class_names[2] == "Mallard (Breeding male)"
    first = official.train["image_id"].iloc[0]
    assert isinstance(first, str) and first.count("-") == 4
    assert first.replace("-", "") in official.train["path"].iloc[0]


def test_cars_boxes_and_unlabelled_test_file(tmp_path: Path) -> None:
    truth = write_cars(tmp_path, variant="no_test_labels")
    official = DATASETS["cars"].reader(tmp_path)
    first = official.train.iloc[0]
    assert tuple(first[["bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2"]]) == truth.extra["first_train_box"]
    assert (official.test["label"] == -1).all()


def test_herbarium2019_orders_folders_numerically(tmp_path: Path) -> None:
    write_herbarium2019(tmp_path)
    official = DATASETS["herbarium2019"].reader(tmp_path)
    # ImageFolder's lexicographic order would be 0, 1, 10, 11, 2, ...
    assert official.class_names[:4] == ["0", "1", "2", "3"]
    in_folder_10 = official.train[official.train["path"].str.contains(f"{os.sep}10{os.sep}")]
    assert set(in_folder_10["label"]) == {10}
    # 00000.jpg exists in every category folder, yet the train ids stay unique
    assert official.train["image_id"].is_unique
    assert official.test["image_id"].tolist() == ["00000.jpg", "00001.jpg", "00002.jpg"]


def test_herbarium2019_finds_each_split_full_size_or_small(tmp_path: Path) -> None:
    """Full-size train with the small validation and test sets, and an empty train/ left by a stopped extraction."""
    small = write_herbarium2019(tmp_path / "small", small=True)
    mixed = tmp_path / "mixed"
    full = write_herbarium2019(mixed)
    for split in ("validation", "test"):
        os.rename(mixed / split, mixed / f"small-{split}")
    official = DATASETS["herbarium2019"].reader(mixed)
    assert official.val["image_id"].tolist() == [row.image_id for row in full.splits["val"]]
    assert official.test["image_id"].tolist() == [row.image_id for row in full.splits["test"]]
    assert official.train["path"].str.contains(f"{os.sep}train{os.sep}").all() and not official.notes

    (tmp_path / "small" / "train").mkdir()  # empty: the small copy is still found
    official = DATASETS["herbarium2019"].reader(tmp_path / "small")
    assert official.train["image_id"].tolist() == [row.image_id for row in small.splits["train"]]
    assert official.train["path"].str.contains("small-train").all()

    (tmp_path / "empty" / "train").mkdir(parents=True)
    with pytest.raises(LayoutError, match="category folders"):
        DATASETS["herbarium2019"].reader(tmp_path / "empty")


def test_herbarium2020_reads_latin1_metadata(tmp_path: Path) -> None:
    write_herbarium_coco(tmp_path, 2020)
    raw = (tmp_path / "nybg2020" / "train" / "metadata.json").read_bytes()
    with pytest.raises(UnicodeDecodeError):
        raw.decode("utf-8")
    assert DATASETS["herbarium2020"].reader(tmp_path).class_names[-1] == "Solanum peñae"


def test_inat2021_falls_back_to_train_mini_with_a_note(tmp_path: Path) -> None:
    truth = write_inat(tmp_path, 2021)
    (tmp_path / "train.json").rename(tmp_path / "train_mini.json")
    official = DATASETS["inat2021"].reader(tmp_path)
    assert_split(official.train, truth, "train")
    assert any("train_mini.json" in note for note in official.notes)


def test_inat2021_trains_on_train_mini_when_only_its_images_were_extracted(tmp_path: Path) -> None:
    """Every JSON extracted but only train_mini.tar.gz: train.json would list 2.7 M images that are not there."""
    truth = write_inat(tmp_path, 2021)
    data = json.loads((tmp_path / "train.json").read_text())
    for image in data["images"]:
        image["file_name"] = image["file_name"].replace("train/", "train_mini/", 1)
    (tmp_path / "train_mini.json").write_text(json.dumps(data))
    (tmp_path / "train").rename(tmp_path / "train_mini")
    official = DATASETS["inat2021"].reader(tmp_path)
    expected = [path.replace(f"{os.sep}train{os.sep}", f"{os.sep}train_mini{os.sep}") for path in truth.paths("train")]
    assert sorted(official.train["path"]) == sorted(expected) and all(map(os.path.isfile, expected))
    assert any("train_mini/ found" in note for note in official.notes)


def test_inat_without_test_json_gives_an_empty_test_split(tmp_path: Path) -> None:
    write_inat(tmp_path, 2019)
    (tmp_path / "test2019.json").unlink()
    official = DATASETS["inat2019"].reader(tmp_path)
    assert len(official.test) == 0
    assert any("test2019.json" in note for note in official.notes)


def test_inat2018_real_names_come_from_categories_json(tmp_path: Path) -> None:
    """The 2018 training JSON's names are obfuscated; categories.json (a list, indexed by id) has the real ones."""
    truth = write_inat(tmp_path, 2018)
    real = [{"id": category, "name": f"Species {category}", "supercategory": "Plantae"}
            for category in truth.category_ids[:-1]]  # fmt: skip
    (tmp_path / "categories.json").write_text(json.dumps(real))
    official = DATASETS["inat2018"].reader(tmp_path)
    assert official.class_names[:-1] == [f"Species {category}" for category in truth.category_ids[:-1]]
    assert official.class_names[-1] == truth.class_names[-1]  # not in categories.json: the training JSON's name
    assert official.category_ids == truth.category_ids


def test_inat_test_json_with_category_less_annotations_is_unlabelled(tmp_path: Path) -> None:
    """A third reading of the unconfirmed 2017-2019 test files: annotations that name the image but no category."""
    truth = write_inat(tmp_path, 2018)
    test_json = tmp_path / "test2018.json"
    document = json.loads(test_json.read_text())
    ids = [image["id"] for image in document["images"]]
    document["annotations"] = [{"id": i, "image_id": i} for i in ids[:2]] + [{"id": ids[2], "image_id": ids[2],
                                                                             "category_id": None}]  # fmt: skip
    test_json.write_text(json.dumps(document))
    official = DATASETS["inat2018"].reader(tmp_path)
    assert official.test["image_id"].tolist() == [row.image_id for row in truth.splits["test"]]
    assert (official.test["label"] == -1).all()
    # the labelled splits still insist on a category for every image
    val_json = tmp_path / "val2018.json"
    val = json.loads(val_json.read_text())
    del val["annotations"][0]["category_id"]
    val_json.write_text(json.dumps(val))
    with pytest.raises(DataError, match=r"val2018.json: .*'annotations' entries .*category_id"):
        DATASETS["inat2018"].reader(tmp_path)


def test_csv_labels_may_be_integers_in_numeric_order(tmp_path: Path) -> None:
    (tmp_path / "train.csv").write_text("path,label\na.jpg,10\nb.jpg,9\nc.jpg,10\n")
    official = DATASETS["csv"].reader(tmp_path)
    assert official.category_ids == [9, 10]
    assert official.train["label"].tolist() == [1, 0, 1]
    assert official.train["image_id"].tolist() == ["a.jpg", "b.jpg", "c.jpg"]


def test_csv_labels_with_leading_zeros_stay_as_written(tmp_path: Path) -> None:
    """``007`` read as 7 would be written back as 7 in a submission that expects 007."""
    (tmp_path / "train.csv").write_text("path,label\na.jpg,010\nb.jpg,007\nc.jpg,0\n")
    official = DATASETS["csv"].reader(tmp_path)
    assert official.category_ids == ["0", "007", "010"]
    assert official.train["label"].tolist() == [2, 1, 0]


# --- load_index: hold-out, train_on_all, root resolution ----------------------------------------------------------


def test_holdout_is_deterministic_disjoint_and_stratified(tmp_path: Path) -> None:
    truth = write_cub(tmp_path, per_class=10)  # 5 train images per class, 4 classes
    load = partial(load_index, "cub", root=tmp_path, val_fraction=0.2)
    train, val = load("train"), load("val")
    assert load("val").frame.equals(val.frame)
    assert set(train.frame["image_id"]).isdisjoint(val.frame["image_id"])
    assert sorted([*train.frame["image_id"], *val.frame["image_id"]]) == sorted(truth.ids("train"))
    assert len(val) == 4  # 20 * 0.2
    assert Counter(val.frame["label"]) == {0: 1, 1: 1, 2: 1, 3: 1}  # stratified: one per class
    assert load("val", seed=1).frame["image_id"].tolist() != val.frame["image_id"].tolist()
    assert load("test").frame["image_id"].tolist() == truth.ids("test")
    assert val.class_names == truth.class_names and val.category_ids == truth.category_ids
    assert (val.name, val.split) == ("cub", "val")


def test_holdout_barely_moves_when_an_image_is_added_or_removed() -> None:
    """A resumed download or a deleted corrupt image between stage 1 and stage 2 must not move the hold-out into
    training: a re-drawn permutation kept 19 of 200 validation images after one of 2,000 rows was dropped."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 50, 2000)
    train = pd.DataFrame({"path": [f"{i}.jpg" for i in range(2000)], "label": labels, "image_id": range(2000)})
    _, val = stratified_holdout(train, 0.1, seed=3)
    assert len(val) == 200
    per_class = val["label"].value_counts()
    share = train["label"].value_counts()[per_class.index] * 0.1
    assert per_class.index.size == 50 and (per_class - share).abs().max() < 1  # stratified: each class its tenth
    for changed in (train.drop(index=137), pd.concat([train, train.iloc[[5]].assign(image_id=2000)])):
        _, val_after = stratified_holdout(changed, 0.1, seed=3)
        assert len(set(val["image_id"]) ^ set(val_after["image_id"])) <= 3
    _, other_seed = stratified_holdout(train, 0.1, seed=4)
    assert len(set(val["image_id"]) & set(other_seed["image_id"])) < 60  # a new seed is a new draw (about 20 shared)


def test_holdout_never_takes_a_class_s_only_image() -> None:
    train = pd.DataFrame({"path": list("abcdef"), "label": [0, 1, 1, 2, 2, 2], "image_id": list("abcdef")})
    kept, val = stratified_holdout(train, 0.5, seed=0)
    assert set(kept["label"]) == {0, 1, 2} and 0 not in set(val["label"]) and len(val) == 3


def test_train_on_all_adds_the_holdout_back(tmp_path: Path) -> None:
    truth = write_cub(tmp_path, per_class=10)
    everything = load_index("cub", "train", root=tmp_path, val_fraction=0.2, train_on_all=True)
    assert sorted(everything.frame["image_id"]) == sorted(truth.ids("train"))
    assert len(load_index("cub", "val", root=tmp_path, val_fraction=0.2, train_on_all=True)) == 4


def test_every_split_comes_from_one_reading_of_the_metadata(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A reader parses every split's files (a minute for iNat 2021): a stage's train and val must not cost two."""
    import dataclasses

    from fgvc.datasets import load_indices

    write_cub(tmp_path, per_class=10)
    spec, reads = get_spec("cub"), []
    counting = dataclasses.replace(spec, reader=lambda root: reads.append(root) or spec.reader(root))
    monkeypatch.setitem(DATASETS, "cub", counting)
    splits = load_indices("cub", root=tmp_path, val_fraction=0.2)
    assert len(reads) == 1 and list(splits) == ["train", "val", "test"]
    for split, index in splits.items():
        pd.testing.assert_frame_equal(index.frame, load_index("cub", split, root=tmp_path, val_fraction=0.2).frame)
        assert (index.split, index.holdout) == (split, split == "val")


def test_official_val_is_used_and_train_on_all_merges_it(tmp_path: Path) -> None:
    truth = write_flowers(tmp_path)
    assert load_index("flowers", "val", root=tmp_path).frame["image_id"].tolist() == truth.ids("val")
    merged = load_index("flowers", "train", root=tmp_path, train_on_all=True).frame["image_id"].tolist()
    assert merged == truth.ids("train") + truth.ids("val")


def test_a_missing_root_names_the_setting_of_every_command(tmp_path: Path) -> None:
    """Only stage1 and validate-submission have --data-root: recipes and a run's later commands read YAML files."""
    with pytest.raises(DataError) as caught:
        load_index("cub", "train", root=tmp_path / "nowhere")
    message = str(caught.value)
    assert message.startswith(f"{tmp_path / 'nowhere'}: dataset root not found") and "\n" not in message
    assert "--data-root (stage1, validate-submission)" in message and "data.root in a recipe" in message
    assert "config.yaml of the run and of its stage folders (stage2, predict, sweep, ensemble)" in message


def test_root_comes_from_fgvc_data_then_the_working_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FGVC_DATA", str(tmp_path / "data"))
    truth = write_cub(tmp_path / "data" / "cub")
    assert load_index("cub", "test").frame["image_id"].tolist() == truth.ids("test")
    monkeypatch.delenv("FGVC_DATA")
    monkeypatch.chdir(tmp_path)
    assert resolve_root("pets") == tmp_path / "datasets" / "pets"
    truth = write_pets(tmp_path / "datasets" / "pets")
    assert load_index("pets", "test").frame["path"].tolist() == truth.paths("test")
    assert resolve_root("pets", "elsewhere") == tmp_path / "elsewhere"


def test_demo_is_generated_on_first_use(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Path] = []

    def ensure_demo(root: Path, seed: int = 0) -> Path:
        calls.append(Path(root))
        write_cub(Path(root))
        return Path(root) / "CUB_200_2011"

    monkeypatch.setitem(sys.modules, "fgvc.demo_data", types.SimpleNamespace(ensure_demo=ensure_demo))
    monkeypatch.setenv("FGVC_DATA", str(tmp_path))  # the default place of every dataset: $FGVC_DATA/<name>
    first = load_index("demo", "test", root=tmp_path / "demo")
    second = load_index("demo", "test")
    assert calls == [tmp_path / "demo"]
    assert first.frame.equals(second.frame) and first.name == "demo"
    # anywhere else (a mistyped --data-root) it is an error, and nothing is written there
    with pytest.raises(LayoutError, match=r"elsewhere: no demo data there; .* `fgvc demo --data-root .*elsewhere`"):
        load_index("demo", "test", root=tmp_path / "elsewhere")
    assert calls == [tmp_path / "demo"] and not (tmp_path / "elsewhere").exists()


# --- errors: one line, naming the file and the fix ------------------------------------------------------------------


@pytest.mark.parametrize("name", [name for name in EXPECTED_NAMES if name != "demo"])
def test_wrong_layout_raises_a_one_line_layout_error(name: str, tmp_path: Path) -> None:
    (tmp_path / "something_else.txt").write_text("not a dataset\n")
    with pytest.raises(LayoutError) as caught:
        DATASETS[name].reader(tmp_path)
    message = str(caught.value)
    assert "\n" not in message
    assert str(tmp_path) in message and f"datasets/{name}/README.md" in message


def test_layout_error_names_the_first_missing_file(tmp_path: Path) -> None:
    write_cub(tmp_path)
    (tmp_path / "CUB_200_2011" / "train_test_split.txt").unlink()
    with pytest.raises(LayoutError, match=r"CUB_200_2011: train_test_split.txt not found"):
        DATASETS["cub"].reader(tmp_path)


def test_cars_layout_error_when_images_are_missing(tmp_path: Path) -> None:
    write_cars(tmp_path)
    (tmp_path / "cars_test").rename(tmp_path / "test_images")
    with pytest.raises(LayoutError, match="cars_test/ not found"):
        DATASETS["cars"].reader(tmp_path)


def _break_line(path: Path, number: int, text: str) -> None:
    lines = path.read_text().splitlines()
    lines[number - 1] = text
    path.write_text("\n".join(lines) + "\n")


def _one_line_data_error(name: str, root: Path, *fragments: str) -> None:
    with pytest.raises(DataError) as caught:
        DATASETS[name].reader(root)
    message = str(caught.value)
    assert not isinstance(caught.value, LayoutError)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def test_malformed_text_line_names_file_and_line(tmp_path: Path) -> None:
    write_cub(tmp_path)
    _break_line(tmp_path / "CUB_200_2011" / "image_class_labels.txt", 3, "3 three")
    _one_line_data_error("cub", tmp_path, "image_class_labels.txt:3", "'3 three'")


def test_image_without_label_line_is_a_data_error(tmp_path: Path) -> None:
    write_cub(tmp_path)
    labels = tmp_path / "CUB_200_2011" / "image_class_labels.txt"
    labels.write_text("".join(labels.read_text().splitlines(keepends=True)[:-1]))
    _one_line_data_error("cub", tmp_path, "image_class_labels.txt", "no line for image_id 16")


def test_broken_json_names_file_line_and_column(tmp_path: Path) -> None:
    write_inat(tmp_path, 2019)
    (tmp_path / "val2019.json").write_text('{"images": [\n  {"id": 1,, }\n]}')
    _one_line_data_error("inat2019", tmp_path, "val2019.json:2:", ": line 2 column")  # json's reason is not cut off


def test_a_labelled_image_without_annotation_says_how_to_fix_it(tmp_path: Path) -> None:
    write_inat(tmp_path, 2019)
    data = json.loads((tmp_path / "train2019.json").read_text())
    data["annotations"] = data["annotations"][1:]
    (tmp_path / "train2019.json").write_text(json.dumps(data))
    _one_line_data_error("inat2019", tmp_path, "train2019.json", "has no annotation (1 such images)", "re-download")


def test_json_with_the_wrong_keys_is_a_data_error(tmp_path: Path) -> None:
    write_herbarium2022(tmp_path)
    data = json.loads((tmp_path / "train_metadata.json").read_text())
    for image in data["images"]:
        image["id"] = image.pop("image_id")  # 2020-style keys in a 2022 file
    (tmp_path / "train_metadata.json").write_text(json.dumps(data))
    _one_line_data_error("herbarium2022", tmp_path, "train_metadata.json", "'image_id'")


@pytest.mark.parametrize(
    ("mutate", "fragments"),
    [
        (lambda data: data["images"][0].update(file_name=7), ("file_name '7' (a number)", "must be a string")),
        (lambda data: data.update(images=[1, 2]), ("'images' entries must be JSON objects, found a number",)),
        (lambda data: data["annotations"][0].update(category_id=[1, 2]), ("category_id '[1, 2]' (a list)",)),
    ],
    ids=["file-name-number", "images-not-objects", "category-id-list"],
)
def test_json_values_of_the_wrong_type_are_data_errors(tmp_path: Path, mutate, fragments: tuple[str, ...]) -> None:
    """They used to end in a TypeError traceback (exit 1) deep in the reader."""
    write_inat(tmp_path, 2019)
    data = json.loads((tmp_path / "train2019.json").read_text())
    mutate(data)
    (tmp_path / "train2019.json").write_text(json.dumps(data))
    _one_line_data_error("inat2019", tmp_path, "train2019.json", *fragments)


def test_a_damaged_compressed_mat_is_a_data_error(tmp_path: Path) -> None:
    """Bit rot inside a compressed variable raised zlib.error: a traceback, exit 1."""
    write_flowers(tmp_path)
    labels = tmp_path / "imagelabels.mat"
    scipy.io.savemat(labels, {"labels": np.arange(1, 2001, dtype=np.uint16)[None] % 102 + 1}, do_compression=True)
    raw = bytearray(labels.read_bytes())
    raw[200:216] = bytes(255 - b for b in raw[200:216])
    labels.write_bytes(bytes(raw))
    _one_line_data_error("flowers", tmp_path, "imagelabels.mat", "not a readable MATLAB file")


def test_flowers_label_outside_1_to_102_is_a_data_error(tmp_path: Path) -> None:
    write_flowers(tmp_path)
    labels = scipy.io.loadmat(tmp_path / "imagelabels.mat")["labels"]
    labels[0, 4] = 0
    scipy.io.savemat(tmp_path / "imagelabels.mat", {"labels": labels})
    _one_line_data_error("flowers", tmp_path, "imagelabels.mat", "label 0 outside 1..102", "image_00005")


def test_cars_class_that_is_not_a_number_is_a_data_error(tmp_path: Path) -> None:
    write_cars(tmp_path)
    annos = tmp_path / "devkit" / "cars_train_annos.mat"
    data = scipy.io.loadmat(annos)
    data["annotations"]["class"][0, 1] = np.array(["seven"])
    scipy.io.savemat(annos, {"annotations": data["annotations"]})
    _one_line_data_error("cars", tmp_path, "cars_train_annos.mat", "class 'seven' is not a class number")


def test_a_byte_order_mark_is_not_data(tmp_path: Path) -> None:
    """A metadata file re-saved by a Windows editor starts with a BOM; it is not part of the first id."""
    truth = write_cub(tmp_path)
    images = tmp_path / "CUB_200_2011" / "images.txt"
    images.write_bytes(b"\xef\xbb\xbf" + images.read_bytes())
    assert load_index("cub", "test", root=tmp_path).frame["image_id"].tolist() == truth.ids("test")


def test_mat_with_the_wrong_variables_is_a_data_error(tmp_path: Path) -> None:
    write_cars(tmp_path)
    scipy.io.savemat(tmp_path / "devkit" / "cars_meta.mat", {"names": np.zeros((1, 3))})
    _one_line_data_error("cars", tmp_path, "cars_meta.mat", "'class_names'", "names")


def test_unreadable_mat_is_a_data_error(tmp_path: Path) -> None:
    write_flowers(tmp_path)
    (tmp_path / "setid.mat").write_bytes(b"this is not a MATLAB file at all" * 8)
    _one_line_data_error("flowers", tmp_path, "setid.mat")


@pytest.mark.parametrize("size", [20, 126])
def test_a_mat_shorter_than_its_header_is_a_data_error(tmp_path: Path, size: int) -> None:
    """An error page saved by curl, or a download cut off early: from 20 to 126 bytes, scipy raised IndexError."""
    write_flowers(tmp_path)
    (tmp_path / "imagelabels.mat").write_bytes(b"<html><head><title>404 Not Found</title></head>".ljust(size))
    _one_line_data_error("flowers", tmp_path, "imagelabels.mat", "official archive")


def test_flowers_index_outside_the_labels_is_a_data_error(tmp_path: Path) -> None:
    write_flowers(tmp_path)
    scipy.io.savemat(
        tmp_path / "setid.mat",
        {
            "trnid": np.array([[1, 99]], np.uint16),
            "valid": np.array([[2]], np.uint16),
            "tstid": np.array([[3]], np.uint16),
        },
    )
    _one_line_data_error("flowers", tmp_path, "setid.mat", "trnid", "99")


def test_cars_class_outside_the_meta_is_a_data_error(tmp_path: Path) -> None:
    write_cars(tmp_path)
    scipy.io.savemat(tmp_path / "devkit" / "cars_meta.mat", {"class_names": np.array([["only one"]], dtype=object)})
    _one_line_data_error("cars", tmp_path, "cars_train_annos.mat", "outside 1..1")


def test_birdsnap_bad_number_names_the_line(tmp_path: Path) -> None:
    write_birdsnap(tmp_path)
    images = tmp_path / "birdsnap" / "images.txt"
    lines = images.read_text().splitlines()
    fields = lines[2].split("\t")
    fields[3] = "two"
    lines[2] = "\t".join(fields)
    images.write_text("\n".join(lines) + "\n")
    _one_line_data_error("birdsnap", tmp_path, "images.txt:3", "species_id", "'two'")


@pytest.mark.parametrize(("name", "writer", "classes", "listing"), [
    ("birdsnap", write_birdsnap, "birdsnap/species.txt", "images.txt"),
    ("cub", write_cub, "CUB_200_2011/classes.txt", "image_class_labels.txt"),
])  # fmt: skip
def test_a_cut_class_list_is_named_beside_the_file_that_uses_the_missing_class(
    tmp_path: Path, name: str, writer: Callable[[Path], object], classes: str, listing: str
) -> None:
    """A class list cut short (an interrupted extraction) used to be reported against the image list alone."""
    writer(tmp_path)
    path = tmp_path / classes
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:-1]) + "\n")  # the last class's line lost
    kept = len(lines) - 1 - (name == "birdsnap")  # species.txt has a header line
    _one_line_data_error(name, tmp_path, listing, f"is not in {path} ({kept} classes)", "re-extract them")


def test_herbarium2019_non_numeric_folder_is_a_data_error(tmp_path: Path) -> None:
    write_herbarium2019(tmp_path, num_classes=3)
    (tmp_path / "train" / "misc").mkdir()
    _one_line_data_error("herbarium2019", tmp_path, "misc", "integers")


def test_csv_label_unknown_to_train_names_the_line(tmp_path: Path) -> None:
    write_csv(tmp_path)
    (tmp_path / "val.csv").write_text("path,label\nimgs/e.jpg,Finch\nimgs/f.jpg,Robin\n")
    _one_line_data_error("csv", tmp_path, "val.csv:3", "'Robin'")


@pytest.mark.parametrize("split", ["train", "test"])
def test_a_csv_listing_one_path_twice_is_a_data_error(tmp_path: Path, split: str) -> None:
    """Training used the image twice, and a test copy made predict's file refused by ensemble with the wrong fix."""
    write_csv(tmp_path)
    table = tmp_path / f"{split}.csv"
    lines = table.read_text().splitlines()
    table.write_text("\n".join([*lines, lines[1]]) + "\n")
    _one_line_data_error("csv", tmp_path, f"{split}.csv:{len(lines) + 1}", repr(lines[1].split(",")[0]), "twice")


def test_csv_without_label_column_is_a_data_error(tmp_path: Path) -> None:
    (tmp_path / "train.csv").write_text("file,class\na.jpg,x\n")
    _one_line_data_error("csv", tmp_path, "train.csv", "'path'")


@pytest.mark.parametrize("name", ["valid", "validation"])
def test_folder_val_may_be_named_valid_or_validation(tmp_path: Path, name: str) -> None:
    """Kaggle's train/valid/test ImageFolder datasets: valid/ used to be ignored and a hold-out drawn from train."""
    truth = write_folder(tmp_path)
    (tmp_path / "val").rename(tmp_path / name)
    val = load_index("folder", "val", root=tmp_path).frame
    moved = [path.replace(f"{os.sep}val{os.sep}", f"{os.sep}{name}{os.sep}") for path in truth.paths("val")]
    assert val["path"].tolist() == moved
    assert sorted(load_index("folder", "train", root=tmp_path).frame["path"]) == sorted(truth.paths("train"))
    shutil.copytree(tmp_path / name, tmp_path / "val")  # two validation folders: which one is meant?
    _one_line_data_error("folder", tmp_path, f"both val/ and {name}/ exist")
    shutil.rmtree(tmp_path / "val")
    shutil.rmtree(tmp_path / name)
    (tmp_path / name).mkdir()  # empty: not a validation split of no images, but a hold-out of train, with a note
    official = DATASETS["folder"].reader(tmp_path)
    assert official.val is None and any(f"{name}: no images" in note for note in official.notes)


@pytest.mark.parametrize("train", ["missing", "a file"])
def test_split_folders_without_train_are_not_taken_for_classes(tmp_path: Path, train: str) -> None:
    """train.zip not extracted yet: val/ and test/ used to become a two-class dataset, with only a note."""
    write_folder(tmp_path)
    shutil.rmtree(tmp_path / "train")
    if train == "a file":
        (tmp_path / "train").write_bytes(b"PK")
    (tmp_path / "test" / "crane").mkdir()  # labelled test images: test/ holds a class folder too
    shutil.copy(tmp_path / "val" / "crane" / "v.jpg", tmp_path / "test" / "crane" / "t.jpg")
    _one_line_data_error("folder", tmp_path, "test/, val/ but no train/ folder", str(tmp_path / "train"))
    flat = tmp_path / "flat"  # a class that happens to bear a split's name, among others: a flat dataset as before
    for name in ("valid", "invalid"):
        shutil.copytree(tmp_path / "val" / "crane", flat / name)
    assert load_index("folder", "train", root=flat).class_names == ["invalid", "valid"]


def test_folder_class_unknown_to_train_is_a_data_error(tmp_path: Path) -> None:
    write_folder(tmp_path)
    (tmp_path / "val" / "owl").mkdir()
    (tmp_path / "val" / "owl" / "x.jpg").write_bytes((tmp_path / "val" / "crane" / "v.jpg").read_bytes())
    _one_line_data_error("folder", tmp_path, "owl")


def test_pets_line_with_another_breeds_class_id_is_a_data_error(tmp_path: Path) -> None:
    """`Abyssinian_4 38 1 1`: one wrong CLASS-ID made a second "Abyssinian" class that `datasets check` passed."""
    write_pets(tmp_path)
    trainval = tmp_path / "annotations" / "trainval.txt"
    line = next(x for x in trainval.read_text().splitlines() if x.startswith("Abyssinian_3 "))
    other_id = max(int(x.split()[1]) for x in trainval.read_text().splitlines()) + 1
    trainval.write_text(trainval.read_text().replace(line, f"Abyssinian_3 {other_id} 1 1"))
    _one_line_data_error("pets", tmp_path, "trainval.txt", "breed Abyssinian is given several class ids")


@pytest.mark.parametrize("ending", ["\t", " "])
def test_birdsnap_lines_ending_in_whitespace_keep_the_official_split(ending: str, tmp_path: Path) -> None:
    """A tab ending each data line (not the header) used to shift every field (pandas read the first as an index
    column) and a trailing space changed every path: either way no test path matched images.txt, and the whole test
    set silently became training images."""
    truth = write_birdsnap(tmp_path)
    for name in ("test_images.txt", "images.txt", "species.txt"):
        path = truth.root / "birdsnap" / name
        header, *rows = path.read_text().splitlines()
        path.write_text("".join(f"{line}\n" for line in [header, *(row + ending for row in rows)]))
    official = DATASETS["birdsnap"].reader(truth.root)
    assert_split(official.train, truth, "train")
    assert_split(official.test, truth, "test")


def test_birdsnap_test_paths_that_match_nothing_are_an_error(tmp_path: Path) -> None:
    truth = write_birdsnap(tmp_path)
    test_txt = truth.root / "birdsnap" / "test_images.txt"
    lines = test_txt.read_text().splitlines()
    test_txt.write_text("\n".join([lines[0], *(f"other/{line}" for line in lines[1:])]) + "\n")
    with pytest.raises(DataError, match=r"test_images\.txt: 4 of its 4 paths are not in images\.txt \(e\.g\. 'other/"):
        DATASETS["birdsnap"].reader(truth.root)


def test_cars_all_in_one_release_beside_a_devkit_is_read(tmp_path: Path) -> None:
    """Prep scripts fetch car_devkit.tgz next to car_ims/ + cars_annos.mat for its class names: there is no cars_train/
    then, and the all-in-one release must be read rather than the layout refused."""
    truth = write_cars(tmp_path / "all", variant="all_in_one")
    devkit_truth = write_cars(tmp_path / "devkit")
    shutil.copytree(devkit_truth.root / "devkit", truth.root / "devkit")
    official = DATASETS["cars"].reader(truth.root)
    assert_split(official.train, truth, "train")
    assert_split(official.test, truth, "test")


def test_cars_kaggle_labelled_test_file_in_car_devkit_is_found(tmp_path: Path) -> None:
    truth = write_cars(tmp_path, variant="kaggle")
    (truth.root / "cars_test_annos_withlabels.mat").rename(truth.root / "car_devkit" / "cars_test_annos_withlabels.mat")
    official = DATASETS["cars"].reader(truth.root)
    assert_split(official.test, truth, "test")  # labelled, not -1
    assert not official.notes


def test_nabirds_boxes_written_as_floats_are_read(tmp_path: Path) -> None:
    truth = write_nabirds(tmp_path)
    boxes = truth.root / "nabirds" / "bounding_boxes.txt"
    boxes.write_text("".join(f"{line.split()[0]} {' '.join(f'{float(v):.1f}' for v in line.split()[1:])}\n"
                             for line in boxes.read_text().splitlines()))  # fmt: skip
    assert_split(DATASETS["nabirds"].reader(truth.root).train, truth, "train")
