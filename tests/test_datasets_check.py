"""``check_dataset``: exit 0 on a clean copy, 1 with missing or unreadable files, 2 for an unknown layout."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.io
from dataset_fixtures import FLOWERS_SETS, write_csv, write_cub, write_flowers, write_pets
from test_datasets import CASES

from fgvc.datasets import DATASETS
from fgvc.datasets.check import check_dataset
from fgvc.errors import ConfigError


def test_clean_copy_exits_0_with_counts_per_split(tmp_path: Path) -> None:
    truth = write_cub(tmp_path)
    report = check_dataset("cub", root=tmp_path, decode=True, progress=False)
    assert report.exit_code == 0
    counts = {split.split: (split.images, split.classes, split.labelled, split.missing) for split in report.splits}
    assert counts == {"train": (8, 4, 8, 0), "test": (8, 4, 8, 0)}  # 4 classes x 4 images, every other one test
    assert len(truth.splits["train"]) == 8 and report.num_classes == len(truth.class_names)
    assert [split.unreadable for split in report.splits] == [0, 0]
    text = report.render()
    assert "5994" in text and "5794" in text and "200" in text  # the official counts, for comparison
    assert "result: OK" in text
    assert "the train metadata lists 8 images where the official release has 5,994" in text


def test_metadata_that_lists_no_image_is_a_problem(tmp_path: Path) -> None:
    """An empty images.txt used to read as two empty splits and 'result: OK'."""
    write_cub(tmp_path)
    (tmp_path / "CUB_200_2011" / "images.txt").write_text("")
    report = check_dataset("cub", root=tmp_path, progress=False)
    assert report.exit_code == 1 and report.empty_splits == ["train"]  # an empty test split alone is allowed
    assert "splits without images" in report.render() and "problems found" in report.render()


def test_missing_and_corrupt_images_exit_1_and_are_listed(tmp_path: Path) -> None:
    truth = write_cub(tmp_path)
    missing, corrupt = truth.paths("train")[0], truth.paths("test")[-1]
    Path(missing).unlink()
    Path(corrupt).write_bytes(b"\xff\xd8\xff\xe0 definitely not the rest of a JPEG")

    listed_only = check_dataset("cub", root=tmp_path, decode=False, progress=False)
    assert listed_only.exit_code == 1
    assert listed_only.missing == [missing] and listed_only.unreadable == []
    assert "add --decode" in listed_only.render()

    decoded = check_dataset("cub", root=tmp_path, decode=True, workers=2, progress=False)
    assert decoded.exit_code == 1
    assert decoded.missing == [missing]
    assert [path for path, _ in decoded.unreadable] == [corrupt]
    by_split = {split.split: (split.missing, split.unreadable) for split in decoded.splits}
    assert by_split == {"train": (1, 0), "test": (0, 1)}
    text = decoded.render()
    assert "missing files: 1" in text and missing in text
    assert "unreadable images: 1" in text and corrupt in text
    assert "problems found" in text


def test_images_in_another_format_behind_a_jpg_name_are_readable(tmp_path: Path) -> None:
    write_pets(tmp_path)  # Abyssinian_1.jpg is a PNG, as some real Pets files are
    report = check_dataset("pets", root=tmp_path, decode=True, progress=False)
    assert report.exit_code == 0, report.render()


def test_wrong_layout_exits_2_and_shows_the_expected_tree(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    report = check_dataset("cub", root=tmp_path, progress=False)
    assert report.exit_code == 2
    text = report.render()
    assert "images.txt not found" in text and "datasets/cub/README.md" in text
    for line in DATASETS["cub"].layout.splitlines():
        assert line in text


def test_missing_root_exits_2(tmp_path: Path) -> None:
    report = check_dataset("nabirds", root=tmp_path / "nowhere", progress=False)
    assert report.exit_code == 2
    assert "nowhere" in report.render()


def test_malformed_metadata_exits_2_with_the_file_and_line(tmp_path: Path) -> None:
    write_cub(tmp_path)
    (tmp_path / "CUB_200_2011" / "classes.txt").write_text("1 001.A\ntwo 002.B\n")
    report = check_dataset("cub", root=tmp_path, progress=False)
    assert report.exit_code == 2
    assert "classes.txt:2" in report.render() and "expected layout" not in report.render()  # the files are there


def test_duplicate_image_ids_exit_1(tmp_path: Path) -> None:
    """Flowers' setid.mat naming one image twice: the reader takes it, the check lists it."""
    write_flowers(tmp_path)
    sets = {name: list(indices) for name, indices in FLOWERS_SETS.items()}
    sets["tstid"].append(sets["tstid"][0])
    scipy.io.savemat(tmp_path / "setid.mat", {name: np.array([v], dtype=np.uint16) for name, v in sets.items()})
    report = check_dataset("flowers", root=tmp_path, progress=False)
    assert report.exit_code == 1
    assert report.duplicate_ids == [f"test: image_{sets['tstid'][0]:05d}"]


def test_a_csv_listing_an_image_twice_is_unreadable(tmp_path: Path) -> None:
    """The CSV reader refuses it (training would use the image twice), like the readers of the official formats."""
    write_csv(tmp_path)
    (tmp_path / "test.csv").write_text("path\nimgs/g.jpg\nimgs/g.jpg\n")
    report = check_dataset("csv", root=tmp_path, progress=False)
    assert report.exit_code == 2
    assert "test.csv:3: path 'imgs/g.jpg' is listed twice" in report.render()
    assert "expected layout" not in report.render()


def test_unknown_dataset_name_is_a_config_error() -> None:
    with pytest.raises(ConfigError):
        check_dataset("imagenet", progress=False)


@pytest.mark.parametrize("case", sorted(CASES))
def test_check_prints_the_right_counts_for_every_family(tmp_path: Path, case: str) -> None:
    name, writer = CASES[case]
    truth = writer(tmp_path)
    report = check_dataset(name, root=tmp_path, progress=False)
    assert report.exit_code == 0, report.render()
    counts = {split.split: split.images for split in report.splits if split.images}
    expected = {split: len(rows) for split, rows in truth.splits.items() if rows}
    assert counts == expected
    assert report.num_classes == len(truth.class_names)
    text = report.render()
    for split, n in expected.items():
        assert split in text and str(n) in text
