"""The procedural demo dataset: CUB-200-2011's exact on-disk format, determinism, and safe (re)generation.

The metadata files are parsed here with plain Python, independently of fgvc's CUB reader, so a format slip in the
generator cannot hide behind the same slip in the reader. A small dataset (5 classes x 4 images) keeps this fast.
"""

from __future__ import annotations

import re
from pathlib import Path

import cv2
import pytest

from fgvc import demo_data
from fgvc.demo_data import demo_classes, ensure_demo, generate_demo
from fgvc.errors import ConfigError, DataError

CLASSES, PER_CLASS, TEST_FRACTION = 5, 4, 0.25  # 5 classes reach into the second genus; 1 test image each
SMALL = {"num_classes": CLASSES, "images_per_class": PER_CLASS, "test_fraction": TEST_FRACTION}
TABLES = ("images.txt", "image_class_labels.txt", "train_test_split.txt", "classes.txt", "bounding_boxes.txt")


def read_table(path: Path) -> list[list[str]]:
    """Rows of a CUB metadata file, checking the format: single spaces, no blank lines, newline-terminated."""
    text = path.read_text()
    assert text.endswith("\n") and "\r" not in text and "\t" not in text, path
    rows = [line.split(" ") for line in text[:-1].split("\n")]
    assert all(field for row in rows for field in row), f"{path}: empty field (double space or blank line)"
    return rows


def all_files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_demo(tmp_path_factory.mktemp("demo"), seed=0, **SMALL)


def test_returns_the_cub_folder_with_every_official_file(dataset: Path) -> None:
    assert dataset.name == "CUB_200_2011"
    for name in (*TABLES, "images"):
        assert (dataset / name).exists(), name
    assert [p.name for p in dataset.parent.iterdir()] == ["CUB_200_2011"]  # no staging folder left behind
    assert dataset.stat().st_mode & 0o055 == 0o055  # readable by others, not private like a temp folder


def test_ids_are_one_based_consecutive_and_consistent(dataset: Path) -> None:
    images = read_table(dataset / "images.txt")
    n_images = CLASSES * PER_CLASS
    expected_ids = [str(i) for i in range(1, n_images + 1)]
    for name in ("images.txt", "image_class_labels.txt", "train_test_split.txt", "bounding_boxes.txt"):
        rows = read_table(dataset / name)
        assert [row[0] for row in rows] == expected_ids, name
        assert {len(row) for row in rows} == {5 if name == "bounding_boxes.txt" else 2}, name
    classes = read_table(dataset / "classes.txt")
    assert [row[0] for row in classes] == [str(i) for i in range(1, CLASSES + 1)]
    assert len(images) == n_images


def test_class_folders_and_file_names_follow_cub(dataset: Path) -> None:
    folders = {int(cid): name for cid, name in read_table(dataset / "classes.txt")}
    labels = {int(iid): int(cid) for iid, cid in read_table(dataset / "image_class_labels.txt")}
    for cid, folder in folders.items():
        match = re.fullmatch(r"(\d{3})\.([A-Z][a-z]+(?:_[A-Za-z]+)+)", folder)
        assert match and int(match.group(1)) == cid, folder
    listed = set()
    for iid, relative in read_table(dataset / "images.txt"):
        folder, file_name = relative.split("/")
        assert folder == folders[labels[int(iid)]]
        assert re.fullmatch(re.escape(folder.split(".", 1)[1]) + r"_\d{4}\.jpg", file_name), file_name
        assert (dataset / "images" / relative).is_file()
        listed.add(relative)
    on_disk = {str(p.relative_to(dataset / "images")) for p in (dataset / "images").rglob("*") if p.is_file()}
    assert on_disk == listed
    assert sorted(labels.values()) == sorted(cid for cid in folders for _ in range(PER_CLASS))


def test_every_image_in_one_split_and_every_class_in_both(dataset: Path) -> None:
    flags = {int(iid): flag for iid, flag in read_table(dataset / "train_test_split.txt")}
    labels = {int(iid): int(cid) for iid, cid in read_table(dataset / "image_class_labels.txt")}
    assert set(flags.values()) <= {"0", "1"}
    test_per_class = round(PER_CLASS * TEST_FRACTION)
    for cid in range(1, CLASSES + 1):
        class_flags = [flags[iid] for iid, label in labels.items() if label == cid]
        assert class_flags.count("0") == test_per_class
        assert class_flags.count("1") == PER_CLASS - test_per_class


def test_images_decode_at_varied_sizes_and_boxes_lie_inside(dataset: Path) -> None:
    paths = {iid: dataset / "images" / rel for iid, rel in read_table(dataset / "images.txt")}
    sizes = set()
    for iid, *box in read_table(dataset / "bounding_boxes.txt"):
        assert all(re.fullmatch(r"\d+\.\d+", value) for value in box), box  # floats, as in the official file
        image = cv2.imread(str(paths[iid]), cv2.IMREAD_UNCHANGED)
        assert image is not None and image.ndim == 3 and image.shape[2] == 3, paths[iid]
        height, width = image.shape[:2]
        assert 160 <= height <= 320 and 160 <= width <= 320
        sizes.add((height, width))
        x, y, w, h = map(float, box)
        assert w > 0 and h > 0 and x >= 0 and y >= 0 and x + w <= width and y + h <= height
        assert max(w, h) >= 0.2 * min(height, width)  # never a speck: the bird is >= 0.3 of the side, turned 45 deg
    assert len(sizes) > CLASSES * PER_CLASS // 2  # sizes and aspect ratios vary


def test_bird_is_inside_its_box(dataset: Path) -> None:
    """The box marks where the image differs from its background: the plumage hue dominates inside it."""
    classes = {c.folder: c for c in demo_classes(CLASSES)}
    boxes = {row[0]: [round(float(v)) for v in row[1:]] for row in read_table(dataset / "bounding_boxes.txt")}
    for iid, relative in read_table(dataset / "images.txt"):
        x, y, w, h = boxes[iid]
        hsv = cv2.cvtColor(cv2.imread(str(dataset / "images" / relative)), cv2.COLOR_BGR2HSV_FULL)
        crop = hsv[y : y + h, x : x + w].reshape(-1, 3)
        hue = classes[relative.split("/")[0]].plumage_hue % 360 * 256 / 360  # OpenCV's _FULL hue is 0..255
        distance = (crop[:, 0].astype(int) - round(hue)) % 256
        near = (crop[:, 1] > 80) & ((distance <= 12) | (distance >= 244))
        assert near.sum() >= 20, relative  # tens of plumage-coloured pixels inside the box


def test_same_seed_is_byte_identical_and_another_seed_differs(dataset: Path, tmp_path: Path) -> None:
    again = generate_demo(tmp_path / "again", seed=0, **SMALL)
    assert all_files(again) == all_files(dataset)
    other = all_files(generate_demo(tmp_path / "other", seed=1, **SMALL))
    reference = all_files(dataset)
    assert other.keys() == reference.keys()  # same names and layout...
    assert all(other[name] != reference[name] for name in other if name.endswith(".jpg"))  # ...different pictures


def test_ensure_demo_keeps_an_existing_dataset(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    calls = []

    def small_generate(root: Path, seed: int) -> Path:
        calls.append(seed)
        return generate_demo(root, seed=seed, num_classes=2, images_per_class=2)

    monkeypatch.setattr(demo_data, "generate_demo", small_generate)
    first = ensure_demo(tmp_path, seed=3)
    assert calls == [3] and first == tmp_path / "CUB_200_2011"
    before = {p: p.stat().st_mtime_ns for p in first.rglob("*")}
    assert ensure_demo(tmp_path, seed=3) == first
    assert calls == [3]
    assert {p: p.stat().st_mtime_ns for p in first.rglob("*")} == before
    assert capsys.readouterr() == ("", "")  # the caller does the reporting


def test_regenerating_replaces_a_demo_but_never_foreign_data(tmp_path: Path) -> None:
    generate_demo(tmp_path / "demo", seed=0, num_classes=2, images_per_class=2)
    replaced = generate_demo(tmp_path / "demo", seed=0, num_classes=3, images_per_class=2)
    assert len(read_table(replaced / "classes.txt")) == 3
    assert [p.name for p in (tmp_path / "demo").iterdir()] == ["CUB_200_2011"]

    foreign = tmp_path / "real" / "CUB_200_2011"
    foreign.mkdir(parents=True)
    (foreign / "README").write_text("The Caltech-UCSD Birds-200-2011 dataset\n")
    with pytest.raises(DataError, match="not an fgvc demo"):
        generate_demo(tmp_path / "real", num_classes=2, images_per_class=2)
    assert [p.name for p in foreign.iterdir()] == ["README"]


def test_a_failed_generation_leaves_nothing_a_reader_would_accept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_render = demo_data.render_image
    rendered = []

    def render_then_fail(*args: object) -> object:
        rendered.append(1)
        if len(rendered) == 3:
            raise RuntimeError("disk full")
        return real_render(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(demo_data, "render_image", render_then_fail)
    with pytest.raises(RuntimeError, match="disk full"):
        generate_demo(tmp_path, num_classes=2, images_per_class=2)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "bad",
    [{"num_classes": 1}, {"num_classes": demo_data.MAX_CLASSES + 1}, {"images_per_class": 1}, {"test_fraction": 1.0}],
)
def test_bad_arguments_are_config_errors(tmp_path: Path, bad: dict[str, float]) -> None:
    with pytest.raises(ConfigError):
        generate_demo(tmp_path, **{**SMALL, **bad})  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []


def test_sixteen_classes_are_four_genera_of_four_fine_grained_species() -> None:
    classes = demo_classes(16)
    assert len({c.name for c in classes}) == 16
    genera = {c.genus for c in classes}
    assert len(genera) == 4
    for genus in genera:
        members = [c for c in classes if c.genus == genus]
        assert len({(c.plumage_hue, c.tail_fork) for c in members}) == 1  # same coarse look...
        assert len({(c.stripe_cycles, c.wing_dots) for c in members}) == 4  # ...told apart by fine details only


def test_the_fgvc_cub_reader_reads_the_demo(dataset: Path) -> None:
    from fgvc.datasets import load_index

    root = dataset.parent
    labels = {iid: int(cid) - 1 for iid, cid in read_table(dataset / "image_class_labels.txt")}
    flags = {iid: flag for iid, flag in read_table(dataset / "train_test_split.txt")}
    paths = {iid: str((dataset / "images" / rel).resolve()) for iid, rel in read_table(dataset / "images.txt")}
    names = [name for _, name in read_table(dataset / "classes.txt")]

    splits = {split: load_index("demo", split, root=root) for split in ("train", "val", "test")}
    for index in splits.values():
        assert index.class_names == names
        frame = index.frame
        for path, label, image_id in zip(frame["path"], frame["label"], frame["image_id"], strict=True):
            assert str(Path(path).resolve()) == paths[str(image_id)]
            assert label == labels[str(image_id)]
    train_ids = {str(i) for split in ("train", "val") for i in splits[split].frame["image_id"]}
    assert train_ids == {iid for iid, flag in flags.items() if flag == "1"}
    assert {str(i) for i in splits["test"].frame["image_id"]} == {iid for iid, flag in flags.items() if flag == "0"}
