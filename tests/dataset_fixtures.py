"""Tiny copies of each dataset's official on-disk layout, and the ground truth of what was written.

Every writer lays out its metadata files exactly as the official archive does (file names, headers, separators,
``.mat`` variable names, field order and dtypes, JSON keys), with real (tiny) JPEGs, and returns a :class:`Truth`
built from its own generation loop, never from a reader. The quirks each reader must survive are written on
purpose: non-contiguous or numeric-string category ids, UUID ids, names with spaces, latin-1 JSON, test files without
annotations, images listed but never downloaded.
"""

from __future__ import annotations

import json
import uuid
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import scipy.io

SIZES = ((8, 8), (16, 12), (24, 32), (12, 20))  # (height, width): tiny but not all square


@dataclass(frozen=True)
class Row:
    image_id: Any
    label: int
    path: str  # absolute


@dataclass
class Truth:
    """What a reader must return for the fixture at ``root``."""

    root: Path
    class_names: list[str]
    category_ids: list[Any]
    splits: dict[str, list[Row]]  # "train", "val" (only where the benchmark has one), "test"; in file order
    notes: list[str] = field(default_factory=list)  # substrings the reader's notes must contain
    extra: dict[str, Any] = field(default_factory=dict)  # family-specific expectations (e.g. a bounding box)

    def ids(self, split: str) -> list[Any]:
        return [row.image_id for row in self.splits[split]]

    def labels(self, split: str) -> list[int]:
        return [row.label for row in self.splits[split]]

    def paths(self, split: str) -> list[str]:
        return [row.path for row in self.splits[split]]


def write_jpeg(path: Path) -> Path:
    """A tiny random JPEG; size and content derived from the file path so fixtures are reproducible."""
    seed = zlib.crc32(str(path).encode())
    height, width = SIZES[seed % len(SIZES)]
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    ok, encoded = cv2.imencode(".jpg", pixels)
    assert ok
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encoded.tobytes())
    return path


def _lines(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")


def _labels_of(category_ids: list[Any]) -> dict[Any, int]:
    """Label index of each category id: position in numeric order (computed here, independently of the readers)."""
    return {category: index for index, category in enumerate(sorted(category_ids))}


# ---------------------------------------------------------------------------------------------------------------------
# CUB-200-2011


CUB_CLASSES = {
    1: "001.Black_footed_Albatross",
    2: "002.Laysan_Albatross",
    3: "003.Sooty_Albatross",
    10: "010.Red_winged_Blackbird",
}


def write_cub(root: Path, per_class: int = 4) -> Truth:
    """``root/CUB_200_2011/`` with 1-based ids, image 1 a test image, float ``x y w h`` boxes.

    The class ids are 1, 2, 3, 10 (the real ones are 1..200; 10 after 3 checks numeric order).
    """
    base = root / "CUB_200_2011"
    labels = _labels_of(list(CUB_CLASSES))
    images, class_labels, split_lines, boxes = [], [], [], []
    splits: dict[str, list[Row]] = {"train": [], "test": []}
    image_id = 0
    for class_id, class_name in CUB_CLASSES.items():
        for n in range(per_class):
            image_id += 1
            bird = class_name.split(".", 1)[1]
            name = f"{class_name}/{bird}_{n:04d}_{image_id}.jpg"
            path = write_jpeg(base / "images" / name)
            is_train = int(n % 2 == 1)  # image 1 (n = 0) is a test image, as in the official split
            images.append(f"{image_id} {name}")
            class_labels.append(f"{image_id} {class_id}")
            split_lines.append(f"{image_id} {is_train}")
            boxes.append(f"{image_id} {float(n + 1)} {float(n + 2)} {float(3 + n)} {float(4)}")
            splits["train" if is_train else "test"].append(Row(image_id, labels[class_id], str(path)))
    _lines(base / "images.txt", images)
    _lines(base / "image_class_labels.txt", class_labels)
    _lines(base / "train_test_split.txt", split_lines)
    _lines(base / "classes.txt", [f"{class_id} {name}" for class_id, name in CUB_CLASSES.items()])
    _lines(base / "bounding_boxes.txt", boxes)
    (base / "README").write_text("CUB-200-2011 fixture\n")
    return Truth(
        root=root,
        class_names=list(CUB_CLASSES.values()),
        category_ids=sorted(CUB_CLASSES),
        splits=splits,
        extra={"first_test_box": (1.0, 2.0, 4.0, 6.0)},  # image 1: x=1 y=2 w=3 h=4 -> corners
    )


# ---------------------------------------------------------------------------------------------------------------------
# NABirds


NABIRDS_TAXONOMY = {  # the whole tree, internal nodes included (official classes.txt has ids 0..1010)
    0: ("Birds", None),
    1: ("Ducks, Geese, and Swans", 0),
    22: ("Owls", 0),
    37: ("Barn Owl", 22),
    295: ("Wood Duck", 1),
    313: ("Mallard (Breeding male)", 1),
    817: ("Great Horned Owl", 22),
}
NABIRDS_LEAVES = (817, 37, 313, 295)  # leaf ids used by images, written out of order


def write_nabirds(root: Path, per_class: int = 3) -> Truth:
    """``root/nabirds/`` with UUID ids (dashes in the lists, none in file names) and non-contiguous leaf ids."""
    base = root / "nabirds"
    rng = np.random.default_rng(7)
    labels = _labels_of(list(NABIRDS_LEAVES))
    images, class_labels, split_lines, boxes, sizes = [], [], [], [], []
    splits: dict[str, list[Row]] = {"train": [], "test": []}
    for class_id in NABIRDS_LEAVES:
        for n in range(per_class):
            image_uuid = uuid.UUID(bytes=rng.bytes(16), version=4)
            name = f"{class_id:04d}/{image_uuid.hex}.jpg"
            path = write_jpeg(base / "images" / name)
            is_train = int(n != 1)
            images.append(f"{image_uuid} {name}")
            class_labels.append(f"{image_uuid} {class_id}")
            split_lines.append(f"{image_uuid} {is_train}")
            boxes.append(f"{image_uuid} {n} {n + 1} {10 + n} {12}")
            sizes.append(f"{image_uuid} 32 24")
            splits["train" if is_train else "test"].append(Row(str(image_uuid), labels[class_id], str(path)))
    _lines(base / "images.txt", images)
    _lines(base / "image_class_labels.txt", class_labels)
    _lines(base / "train_test_split.txt", split_lines)
    _lines(base / "bounding_boxes.txt", boxes)
    _lines(base / "sizes.txt", sizes)
    _lines(base / "classes.txt", [f"{class_id} {name}" for class_id, (name, _) in NABIRDS_TAXONOMY.items()])
    _lines(
        base / "hierarchy.txt",
        [f"{child} {parent}" for child, (_, parent) in NABIRDS_TAXONOMY.items() if parent is not None],
    )
    leaves = sorted(NABIRDS_LEAVES)
    return Truth(
        root=root,
        class_names=[NABIRDS_TAXONOMY[class_id][0] for class_id in leaves],
        category_ids=leaves,
        splits=splits,
    )


# ---------------------------------------------------------------------------------------------------------------------
# Stanford Cars


CARS_CLASSES = ["AM General Hummer SUV 2000", "Acura RL Sedan 2012", "Audi TT RS Coupe 2012"]
CARS_TRAIN = [3, 1, 2, 1, 3, 2]  # 1-based class of 00001.jpg, 00002.jpg, ...
CARS_TEST = [2, 2, 1, 3]


def _mat_number(value: int) -> np.ndarray:
    """A (1,1) number with the smallest unsigned dtype, as MATLAB stores the devkit's integers."""
    return np.array([[value]], dtype=np.uint8 if value < 256 else np.uint16)


def _struct_array(records: list[dict[str, Any]], fields: list[str]) -> np.ndarray:
    """A (1,N) MATLAB struct array with the fields in the given order (savemat writes it as ``struct``)."""
    array = np.empty((1, len(records)), dtype=[(name, object) for name in fields])
    for index, record in enumerate(records):
        for name in fields:
            value = record[name]
            array[name][0, index] = np.array([value]) if isinstance(value, str) else _mat_number(value)
    return array


def _cell_strings(values: list[str]) -> np.ndarray:
    cell = np.empty((1, len(values)), dtype=object)
    for index, value in enumerate(values):
        cell[0, index] = np.array([value])
    return cell


def _car_records(classes: list[int], with_class: bool, name_digits: int = 5) -> list[dict[str, Any]]:
    records = []
    for index, class_id in enumerate(classes):
        record: dict[str, Any] = {
            "bbox_x1": 3 + index,
            "bbox_y1": 2,
            "bbox_x2": 300 + index,  # > 255: stored as uint16, like the real files
            "bbox_y2": 20,
            "fname": f"{index + 1:0{name_digits}d}.jpg",
        }
        if with_class:
            record["class"] = class_id
        records.append(record)
    return records


CAR_FIELDS = ["bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname"]
CAR_TEST_FIELDS_NO_LABELS = ["bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "fname"]


def write_cars(root: Path, variant: str = "devkit") -> Truth:
    """Stanford Cars in one of its releases.

    Args:
        variant: "devkit" (``cars_test_annos_withlabels.mat`` at the top level, torchvision-style), "devkit_inner"
            (inside ``devkit/``, mmpretrain-style), "no_test_labels" (only ``devkit/cars_test_annos.mat``), "kaggle"
            (``cars_train/cars_train/``, ``car_devkit/devkit/``) or "all_in_one" (``car_ims/`` + ``cars_annos.mat``).
    """
    if variant == "all_in_one":
        return _write_cars_all_in_one(root)
    kaggle = variant == "kaggle"
    devkit = root / ("car_devkit/devkit" if kaggle else "devkit")
    devkit.mkdir(parents=True)
    scipy.io.savemat(devkit / "cars_meta.mat", {"class_names": _cell_strings(CARS_CLASSES)})
    train_records = _car_records(CARS_TRAIN, with_class=True)
    scipy.io.savemat(devkit / "cars_train_annos.mat", {"annotations": _struct_array(train_records, CAR_FIELDS)})
    test_unlabelled = _car_records(CARS_TEST, with_class=False)
    scipy.io.savemat(
        devkit / "cars_test_annos.mat", {"annotations": _struct_array(test_unlabelled, CAR_TEST_FIELDS_NO_LABELS)}
    )
    test_records = _car_records(CARS_TEST, with_class=True)
    if variant in ("devkit", "kaggle"):
        scipy.io.savemat(
            root / "cars_test_annos_withlabels.mat", {"annotations": _struct_array(test_records, CAR_FIELDS)}
        )
    elif variant == "devkit_inner":
        scipy.io.savemat(
            devkit / "cars_test_annos_withlabels.mat", {"annotations": _struct_array(test_records, CAR_FIELDS)}
        )
    labelled_test = variant != "no_test_labels"
    splits: dict[str, list[Row]] = {}
    for split, records in (("train", train_records), ("test", test_records)):
        folder = root / f"cars_{split}" / (f"cars_{split}" if kaggle else "")
        splits[split] = [
            Row(
                record["fname"][:-4],
                record["class"] - 1 if split == "train" or labelled_test else -1,
                str(write_jpeg(folder / record["fname"])),
            )
            for record in records
        ]
    return Truth(
        root=root,
        class_names=CARS_CLASSES,
        category_ids=[1, 2, 3],
        splits=splits,
        notes=[] if labelled_test else ["no labels"],
        extra={"first_train_box": (3.0, 2.0, 300.0, 20.0)},
    )


def _write_cars_all_in_one(root: Path) -> Truth:
    classes = CARS_TRAIN + CARS_TEST
    records = []
    splits: dict[str, list[Row]] = {"train": [], "test": []}
    for index, class_id in enumerate(classes):
        name = f"car_ims/{index + 1:06d}.jpg"
        is_test = int(index % 3 == 2)  # train and test interleaved, as in cars_annos.mat
        records.append(
            {
                "relative_im_path": name,
                "bbox_x1": 1,
                "bbox_y1": 1,
                "bbox_x2": 30,
                "bbox_y2": 20,
                "class": class_id,
                "test": is_test,
            }
        )
        path = write_jpeg(root / name)
        splits["test" if is_test else "train"].append(Row(f"{index + 1:06d}", class_id - 1, str(path)))
    fields = ["relative_im_path", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "test"]
    scipy.io.savemat(
        root / "cars_annos.mat",
        {"annotations": _struct_array(records, fields), "class_names": _cell_strings(CARS_CLASSES)},
    )
    return Truth(root=root, class_names=CARS_CLASSES, category_ids=[1, 2, 3], splits=splits)


# ---------------------------------------------------------------------------------------------------------------------
# Oxford 102 Flowers


FLOWERS_LABELS = [1, 2, 102, 2, 1, 102, 1, 2, 102, 102, 1, 2]  # imagelabels.mat: label of image_00001.jpg, ...
FLOWERS_SETS = {
    "trnid": [5, 2, 3],
    "valid": [11, 8, 6],
    "tstid": [12, 1, 4, 7, 9, 10],
}  # not sorted, like the real file


def write_flowers(root: Path) -> Truth:
    """``jpg/``, ``imagelabels.mat`` (``labels`` (1,N) uint8) and ``setid.mat`` (uint16 1-based indices)."""
    for index in range(1, len(FLOWERS_LABELS) + 1):
        write_jpeg(root / "jpg" / f"image_{index:05d}.jpg")
    scipy.io.savemat(root / "imagelabels.mat", {"labels": np.array([FLOWERS_LABELS], dtype=np.uint8)})
    scipy.io.savemat(
        root / "setid.mat", {name: np.array([indices], dtype=np.uint16) for name, indices in FLOWERS_SETS.items()}
    )
    labels = _labels_of(sorted(set(FLOWERS_LABELS)))
    splits = {
        split: [
            Row(f"image_{index:05d}", labels[FLOWERS_LABELS[index - 1]], str(root / "jpg" / f"image_{index:05d}.jpg"))
            for index in FLOWERS_SETS[variable]
        ]
        for split, variable in (("train", "trnid"), ("val", "valid"), ("test", "tstid"))
    }
    return Truth(root=root, class_names=["1", "2", "102"], category_ids=[1, 2, 102], splits=splits)


# ---------------------------------------------------------------------------------------------------------------------
# Oxford-IIIT Pets


PETS_BREEDS = {
    1: ("Abyssinian", 1, 1),
    2: ("american_bulldog", 2, 1),
    34: ("Sphynx", 1, 12),
    37: ("yorkshire_terrier", 2, 25),
}
PETS_LIST_HEADER = [
    "#Image CLASS-ID SPECIES BREED ID",
    "#ID: 1:37 Class ids",
    "#SPECIES: 1:Cat 2:Dog",
    "#BREED ID: 1-25:Cat 1:12:Dog",
    "#All images with 1st letter as captial are cat images",
    "#images with small first letter are dog images",
]


def write_pets(root: Path, per_class: int = 3) -> Truth:
    """``images/`` and ``annotations/{list,trainval,test}.txt``; list.txt has the six ``#`` lines, the others none.

    ``images/`` also gets a stray ``.mat`` file and a PNG named ``.jpg`` (both happen in the real archive).
    """
    labels = _labels_of(list(PETS_BREEDS))
    lines: dict[str, list[str]] = {"trainval": [], "test": []}
    splits: dict[str, list[Row]] = {"train": [], "test": []}
    for class_id, (breed, species, breed_id) in PETS_BREEDS.items():
        for n in range(1, per_class + 1):
            name = f"{breed}_{n}"
            path = write_jpeg(root / "images" / f"{name}.jpg")
            split = "test" if n == 2 else "trainval"
            lines[split].append(f"{name} {class_id} {species} {breed_id}")
            splits["test" if split == "test" else "train"].append(Row(name, labels[class_id], str(path)))
    png_as_jpg = root / "images" / "Abyssinian_1.jpg"
    _, encoded = cv2.imencode(".png", np.zeros((8, 8, 3), dtype=np.uint8))
    png_as_jpg.write_bytes(encoded.tobytes())
    (root / "images" / "Abyssinian_101.mat").write_bytes(b"MATLAB 5.0 MAT-file")
    _lines(root / "annotations" / "list.txt", PETS_LIST_HEADER + lines["trainval"] + lines["test"])
    _lines(root / "annotations" / "trainval.txt", lines["trainval"])
    _lines(root / "annotations" / "test.txt", lines["test"])
    return Truth(
        root=root,
        class_names=[PETS_BREEDS[class_id][0] for class_id in sorted(PETS_BREEDS)],
        category_ids=sorted(PETS_BREEDS),
        splits=splits,
    )


# ---------------------------------------------------------------------------------------------------------------------
# Birdsnap


BIRDSNAP_SPECIES = {
    1: ("Acadian Flycatcher", "Empidonax virescens"),
    2: ("Acorn Woodpecker", "Melanerpes formicivorus"),
    3: ("Coopers Hawk", "Accipiter cooperii"),
}
BIRDSNAP_PARTS = [
    "back",
    "beak",
    "belly",
    "breast",
    "crown",
    "forehead",
    "left_cheek",
    "left_eye",
    "left_leg",
    "left_wing",
    "nape",
    "right_cheek",
    "right_eye",
    "right_leg",
    "right_wing",
    "tail",
    "throat",
]


def write_birdsnap(root: Path, per_class: int = 4) -> Truth:
    """``root/birdsnap/`` metadata TSVs with headers, images under ``download/images/``; two listed images absent.

    Absent: the first image of species 1 (a train image) and the last test image of species 3.
    """
    base = root / "birdsnap"
    labels = _labels_of(list(BIRDSNAP_SPECIES))
    species_rows = ["id\tcommon\tscientific\tdir"]
    header = ["url", "md5", "path", "species_id", "bb_x1", "bb_y1", "bb_x2", "bb_y2"]
    header += [f"{part}_{axis}" for part in BIRDSNAP_PARTS for axis in ("x", "y")]
    image_rows = ["\t".join(header)]
    test_rows = ["path"]
    splits: dict[str, list[Row]] = {"train": [], "test": []}
    absent = {"Acadian_Flycatcher/0001.jpg", "Coopers_Hawk/0003.jpg"}
    for species_id, (common, scientific) in BIRDSNAP_SPECIES.items():
        folder = common.replace(" ", "_")
        species_rows.append(f"{species_id}\t{common}\t{scientific}\t{folder}")
        for n in range(per_class):
            rel = f"{folder}/{n:04d}.jpg"
            parts = ["-1"] * (2 * len(BIRDSNAP_PARTS))
            box = [str(n), str(n + 1), str(20 + n), str(30)]
            url = f"http://farm{n}.staticflickr.com/{species_id}/{n}_abc.jpg"
            image_rows.append("\t".join([url, f"{species_id:02d}{n:030d}", rel, str(species_id), *box, *parts]))
            is_test = n == 3 or (n == 1 and species_id == 2)
            if is_test:
                test_rows.append(rel)
            if rel in absent:
                continue
            path = write_jpeg(base / "download" / "images" / rel)
            splits["test" if is_test else "train"].append(Row(rel, labels[species_id], str(path)))
    _lines(base / "species.txt", species_rows)
    _lines(base / "images.txt", image_rows)
    _lines(base / "test_images.txt", test_rows)
    (base / "get_birdsnap.py").write_text("# downloads the images listed in images.txt\n")
    return Truth(
        root=root,
        class_names=[BIRDSNAP_SPECIES[species_id][0] for species_id in sorted(BIRDSNAP_SPECIES)],
        category_ids=sorted(BIRDSNAP_SPECIES),
        splits=splits,
        notes=["2 of 12 listed images not downloaded (1 train, 1 test)"],
    )


# ---------------------------------------------------------------------------------------------------------------------
# iNaturalist


INAT_CATEGORIES = {  # category_id -> (name, supercategory); listed out of order in the JSON
    12: ("Yucca schidigera", "Plantae"),
    0: ("Danaus plexippus", "Insecta"),
    7: ("Lithobates catesbeianus", "Amphibia"),
    3: ("Agave parryi", "Plantae"),
}
INAT_FILES = {
    2017: ("train2017.json", "val2017.json", "test2017.json"),
    2018: ("train2018.json", "val2018.json", "test2018.json"),
    2019: ("train2019.json", "val2019.json", "test2019.json"),
    2021: ("train.json", "val.json", "public_test.json"),
}


def _inat_category(year: int, category_id: int) -> dict[str, Any]:
    name, supercategory = INAT_CATEGORIES[category_id]
    genus = name.split()[0]
    if year == 2017:
        return {"id": category_id, "name": name, "supercategory": supercategory}
    taxonomy = {"kingdom": "Animalia", "phylum": "Chordata", "class": "X", "order": "Y", "family": "Z", "genus": genus}
    if year == 2019:  # no supercategory key in 2019
        return {"id": category_id, "name": name, **taxonomy}
    category = {"id": category_id, "name": name, "supercategory": supercategory, **taxonomy}
    if year == 2021:
        folder = f"{category_id:05d}_Animalia_Chordata_X_Y_Z_{name.replace(' ', '_')}"
        category |= {"common_name": name, "specific_epithet": name.split()[-1], "image_dir_name": folder}
    return category


def _inat_image_path(year: int, split: str, category_id: int, stem: str) -> str:
    name, supercategory = INAT_CATEGORIES[category_id]
    if year == 2017:
        return f"train_val_images/{supercategory}/{name}/{stem}.jpg"  # species-name folders, with a space
    if year in (2018, 2019):
        return f"train_val{year}/{supercategory}/{category_id}/{stem}.jpg"
    return f"{split}/{_inat_category(2021, category_id)['image_dir_name']}/{stem}.jpg"


def write_inat(root: Path, year: int, train_per_class: int = 3) -> Truth:
    """The iNaturalist ``year`` JSON files and image tree; val has one image per class, test ids follow val's.

    The annotations list is shuffled relative to images (readers must join on ``image_id``). The 2019 and 2021 test
    files have no ``annotations``/``categories`` keys; the 2017/2018 ones carry empty lists.
    """
    rng = np.random.default_rng(year)
    labels = _labels_of(list(INAT_CATEGORIES))
    categories = [_inat_category(year, category_id) for category_id in INAT_CATEGORIES]
    next_id = 0
    splits: dict[str, list[Row]] = {}
    documents: dict[str, dict[str, Any]] = {}
    plan = {"train": train_per_class, "val": 1}
    for split, per_class in plan.items():
        images, annotations, rows = [], [], []
        for category_id in INAT_CATEGORIES:
            for _ in range(per_class):
                stem = f"{zlib.crc32(f'{year}{split}{next_id}'.encode()):08x}"
                file_name = _inat_image_path(year, split, category_id, stem)
                path = write_jpeg(root / file_name)
                images.append({"id": next_id, "width": 8, "height": 8, "file_name": file_name, "license": 1})
                annotations.append({"id": next_id, "image_id": next_id, "category_id": category_id})
                rows.append(Row(next_id, labels[category_id], str(path)))
                next_id += 1
        order = rng.permutation(len(annotations))
        documents[split] = {
            "info": {"year": year},
            "images": images,
            "annotations": [annotations[i] for i in order],
            "categories": categories,
            "licenses": [{"id": 1, "name": "CC BY"}],
        }
        splits[split] = rows
    test_images, test_rows = [], []
    for _ in range(3):
        stem = f"{zlib.crc32(f'{year}test{next_id}'.encode()):08x}"
        file_name = {2017: "test2017", 2018: "test2018", 2019: "test2019", 2021: "public_test"}[year] + f"/{stem}.jpg"
        path = write_jpeg(root / file_name)
        test_images.append({"id": next_id, "width": 8, "height": 8, "file_name": file_name, "license": 1})
        test_rows.append(Row(next_id, -1, str(path)))
        next_id += 1
    documents["test"] = {"info": {"year": year}, "images": test_images, "licenses": [{"id": 1, "name": "CC BY"}]}
    if year in (2017, 2018):
        documents["test"] |= {"annotations": [], "categories": []}
    splits["test"] = test_rows
    for split, file_name in zip(("train", "val", "test"), INAT_FILES[year], strict=True):
        (root / file_name).write_text(json.dumps(documents[split]), encoding="utf-8")
    ordered = sorted(INAT_CATEGORIES)
    return Truth(
        root=root,
        class_names=[INAT_CATEGORIES[category_id][0] for category_id in ordered],
        category_ids=ordered,
        splits=splits,
    )


# ---------------------------------------------------------------------------------------------------------------------
# Herbarium


def write_herbarium2019(root: Path, num_classes: int = 12, small: bool = False) -> Truth:
    """``train/0..11/``, ``validation/``, ``test/``: numeric folders, file names repeated across categories."""
    prefix = "small-" if small else ""
    splits: dict[str, list[Row]] = {"train": [], "val": [], "test": []}
    for category in range(num_classes):  # numeric order == label order; lexicographic would put 10, 11 after 1
        for n in range(2):
            path = write_jpeg(root / f"{prefix}train" / str(category) / f"{n:05d}.jpg")
            splits["train"].append(Row(f"{category}/{n:05d}.jpg", category, str(path)))
        path = write_jpeg(root / f"{prefix}validation" / str(category) / f"{category + 100:05d}.jpg")
        splits["val"].append(Row(f"{category}/{category + 100:05d}.jpg", category, str(path)))
    for n in range(3):
        path = write_jpeg(root / f"{prefix}test" / f"{n:05d}.jpg")
        splits["test"].append(Row(f"{n:05d}.jpg", -1, str(path)))
    ids = list(range(num_classes))
    return Truth(root=root, class_names=[str(category) for category in ids], category_ids=ids, splits=splits)


HERBARIUM_CATEGORIES = {104: "Solanum peñae", 3: "Abies alba", 15: "Acer rubrum"}  # ñ is not ASCII: latin-1 in 2020


def write_herbarium_coco(root: Path, year: int, per_class: int = 2) -> Truth:
    """Herbarium 2020 (under ``nybg2020/``, metadata.json in latin-1) or 2021 (at the root, UTF-8)."""
    base = root / "nybg2020" if year == 2020 else root
    labels = _labels_of(list(HERBARIUM_CATEGORIES))
    images, annotations, rows = [], [], []
    image_id = 1000
    for category_id in HERBARIUM_CATEGORIES:
        for _ in range(per_class):
            file_name = f"images/{category_id // 100:03d}/{category_id % 100:02d}/{image_id}.jpg"
            path = write_jpeg(base / "train" / file_name)
            images.append({"id": image_id, "file_name": file_name, "width": 8, "height": 8, "license": 0})
            annotation = {"id": image_id, "image_id": image_id, "category_id": category_id}
            annotation |= {"region_id": 1} if year == 2020 else {"institution_id": 2}
            annotations.append(annotation)
            rows.append(Row(image_id, labels[category_id], str(path)))
            image_id += 1
    categories = [
        {"id": category_id, "name": name, "family": "F", "genus": name.split()[0]}
        if year == 2020
        else {"id": category_id, "name": name, "family": "F", "order": "O"}
        for category_id, name in HERBARIUM_CATEGORIES.items()
    ]
    side = {"regions": [{"id": 1, "name": "Andes"}]} if year == 2020 else {"institutions": [{"id": 2, "name": "NY"}]}
    train = {"annotations": annotations, "categories": categories, "images": images, "info": {}, "licenses": []}
    test_images, test_rows = [], []
    for index in range(3):
        file_name = f"images/{index // 1000:03d}/{index}.jpg"
        path = write_jpeg(base / "test" / file_name)
        test_images.append({"id": index, "file_name": file_name, "width": 8, "height": 8, "license": 0})
        test_rows.append(Row(index, -1, str(path)))
    test = {"images": test_images, "info": {}, "licenses": []}
    encoding = "latin-1" if year == 2020 else "utf-8"
    (base / "train" / "metadata.json").write_bytes(json.dumps(train | side, ensure_ascii=False).encode(encoding))
    (base / "test" / "metadata.json").write_bytes(json.dumps(test, ensure_ascii=False).encode(encoding))
    ordered = sorted(HERBARIUM_CATEGORIES)
    return Truth(
        root=root,
        class_names=[HERBARIUM_CATEGORIES[category_id] for category_id in ordered],
        category_ids=ordered,
        splits={"train": rows, "test": test_rows},
    )


def write_herbarium2022(root: Path, per_class: int = 2) -> Truth:
    """``train_metadata.json`` with 2022's keys (``image_id``, ``category_id``, ``scientificName``) and a test file
    that is a bare list of images, as on Kaggle."""
    labels = _labels_of(list(HERBARIUM_CATEGORIES))
    images, annotations, rows = [], [], []
    for category_id in HERBARIUM_CATEGORIES:
        for n in range(1, per_class + 1):
            image_id = f"{category_id:05d}__{n:03d}"
            file_name = f"{category_id // 100:03d}/{category_id % 100:02d}/{image_id}.jpg"
            path = write_jpeg(root / "train_images" / file_name)
            images.append({"image_id": image_id, "file_name": file_name, "license": 0})
            annotations.append({"image_id": image_id, "category_id": category_id, "genus_id": 1, "institution_id": 0})
            rows.append(Row(image_id, labels[category_id], str(path)))
    categories = [
        {
            "category_id": category_id,
            "scientificName": name,
            "authors": "L.",
            "family": "F",
            "genus": name.split()[0],
            "species": name.split()[1],
        }
        for category_id, name in HERBARIUM_CATEGORIES.items()
    ]
    train = {
        "annotations": annotations,
        "categories": categories,
        "genera": [{"genus_id": 1, "genus": "Abies"}],
        "images": images,
        "distances": [],
        "licenses": [],
        "institutions": [],
    }
    (root / "train_metadata.json").write_text(json.dumps(train), encoding="utf-8")
    test_images, test_rows = [], []
    for index in range(3):
        file_name = f"{index // 1000:03d}/test-{index:06d}.jpg"
        path = write_jpeg(root / "test_images" / file_name)
        test_images.append({"image_id": str(index), "file_name": file_name, "license": 0})
        test_rows.append(Row(str(index), -1, str(path)))
    (root / "test_metadata.json").write_text(json.dumps(test_images), encoding="utf-8")
    ordered = sorted(HERBARIUM_CATEGORIES)
    return Truth(
        root=root,
        class_names=[HERBARIUM_CATEGORIES[category_id] for category_id in ordered],
        category_ids=ordered,
        splits={"train": rows, "test": test_rows},
    )


# ---------------------------------------------------------------------------------------------------------------------
# Generic folder and CSV


FOLDER_CLASSES = ("sparrow", "Heron", "crane")  # string order: Heron, crane, sparrow


def write_folder(root: Path, with_splits: bool = True, per_class: int = 3) -> Truth:
    """``train/<class>/`` (+ ``val/<class>/`` and an unlabelled flat ``test/``), or bare ``<class>/`` folders."""
    ordered = sorted(FOLDER_CLASSES)
    labels = {name: index for index, name in enumerate(ordered)}
    splits: dict[str, list[Row]] = {"train": [], "test": []}
    train_dir = root / "train" if with_splits else root
    for name in ordered:  # the reader lists folders and files in sorted order
        for n in range(per_class):
            path = write_jpeg(train_dir / name / f"img_{n}.jpg")
            splits["train"].append(Row(path.relative_to(root).as_posix(), labels[name], str(path)))
    (train_dir / "crane" / "notes.txt").write_text("not an image\n")
    if with_splits:
        splits["val"] = []
        for name in ordered:
            path = write_jpeg(root / "val" / name / "v.jpg")
            splits["val"].append(Row(path.relative_to(root).as_posix(), labels[name], str(path)))
        for n in range(2):
            path = write_jpeg(root / "test" / f"t{n}.jpg")
            splits["test"].append(Row(path.relative_to(root).as_posix(), -1, str(path)))
    return Truth(root=root, class_names=ordered, category_ids=ordered, splits=splits)


def write_csv(root: Path) -> Truth:
    """``train.csv``/``val.csv`` with ``path,label`` (class names) and ``test.csv`` with only ``path``."""
    rows = {
        "train": [("imgs/a.jpg", "wren"), ("imgs/b.jpg", "Finch"), ("imgs/c.jpg", "wren"), ("imgs/d.jpg", "Finch")],
        "val": [("imgs/e.jpg", "Finch"), ("imgs/f.jpg", "wren")],
        "test": [("imgs/g.jpg", None), ("imgs/h.jpg", None)],
    }
    labels = {"Finch": 0, "wren": 1}
    splits: dict[str, list[Row]] = {}
    for split, entries in rows.items():
        header = "path" if split == "test" else "path,label"
        lines = [header] + [rel if label is None else f"{rel},{label}" for rel, label in entries]
        _lines(root / f"{split}.csv", lines)
        splits[split] = [
            Row(rel, -1 if label is None else labels[label], str(write_jpeg(root / rel))) for rel, label in entries
        ]
    return Truth(root=root, class_names=["Finch", "wren"], category_ids=["Finch", "wren"], splits=splits)
