"""A procedural fine-grained dataset for the demo, written in CUB-200-2011's official on-disk format.

`make demo` has to show the FixRes method working on a laptop CPU in minutes, without downloading anything. So the
demo draws its own "birds", all with the same body plan. As in real fine-grained data, the genus is easy (a plumage
shade and a tail shape) and the species is hard: species differ only in small details, the number of dark bars
across the body and the number of pale dots on the back. The birds sit on cluttered backgrounds (blobs, twigs, and
striped and dotted distractors) at widely varying apparent sizes and angles, so a small bird's details only survive
at a higher resolution: training at a low resolution and testing higher pays off, the effect the demo exists to show.

Tuning (ImageNet EfficientNet-Lite0 fine-tuned at 64 px with RandomResizedCrop, SGD, mean of 3 seeds): top-1 at
64 px was 47 % after 15 epochs and 60 % after 30; FixRes stage 2 at 96 px (last BN + classifier) raised these to
56 % and 69 %.

The files follow CUB-200-2011 exactly (1-based ids, single spaces, no headers), so the demo goes through the real
CUB reader. Generation is deterministic: each image draws from its own numpy Generator seeded with
``(seed, class, index)`` and the JPEG quality is fixed, so the same seed (and the same numpy and OpenCV versions)
gives byte-identical files.
"""

from __future__ import annotations

import colorsys
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from fgvc.errors import ConfigError, DataError

DATASET_DIR = "CUB_200_2011"  # the folder name the CUB reader looks for under the dataset root
DEMO_MARKER = "fgvc procedural demo dataset"  # first line of our README: only a folder carrying it is ever replaced

DEMO_SEED = 0  # the seed `make demo` uses; a fixed seed gives everyone the same images and the same numbers
NUM_CLASSES = 16  # 4 genera x 4 species: each class has siblings that differ from it in one fine detail only
IMAGES_PER_CLASS = 50  # 480 train / 320 test: at 30 a pretrained net memorises backgrounds; 50 learns the birds
TEST_FRACTION = 0.4  # CUB holds out about half; 40 % keeps 30 training images per class and tests on 20

MIN_SIDE, MAX_SIDE = 160, 320  # image sides in pixels, drawn independently: varied sizes and aspect ratios
OBJECT_SCALE = (0.3, 0.95)  # bird length / shorter image side, log-uniform: small birds need resolution
JPEG_QUALITY = 92  # fixed so that the bytes are reproducible; high enough that JPEG blocks do not hide the details
SUPERSAMPLE = 2  # birds are drawn at 2x and area-averaged: anti-aliased, so bars do not alias into other frequencies
SUPERSAMPLE_BELOW = 128  # ... when shorter than this (px); longer birds are shrunk enough by any test transform

# Genera: the coarse look, (name, plumage hue in degrees, tail-fork depth as a fraction of the tail). Shades of red
# to yellow-green about 35 degrees apart, half of them with forked tails: like a real genus, easy to tell at any
# resolution. Classes fill genus after genus.
GENERA = (
    ("Warbler", 60.0, 0.0),
    ("Finch", 25.0, 0.7),
    ("Tanager", -5.0, 0.0),
    ("Vireo", 95.0, 0.7),
    ("Sparrow", 42.0, 0.35),
    ("Bunting", 8.0, 0.35),
    ("Pipit", 78.0, 0.35),
    ("Thrush", 112.0, 0.0),
)
# Species: the fine details, the same four in every genus, (name, dark bars per body length, pale dots on the back).
# Seven bars need ~2 px each and a dot is 7 % of the bird's length wide: both blur away on small birds at low
# resolution, which is what makes testing at a higher resolution pay off.
SPECIES = (
    ("Barred", 3.5, 1),
    ("Banded", 7.0, 1),
    ("Spotted", 3.5, 3),
    ("Speckled", 7.0, 3),
)
MAX_CLASSES = len(GENERA) * len(SPECIES)

# Within-class variation: what the classifier must learn to ignore.
STRIPE_JITTER = 0.05  # relative jitter of the bar frequency, far below the gap between species
HUE_JITTER = 3.0  # degrees of plumage hue
BODY_ASPECT = (0.42, 0.62)  # body width / length: birds are fat or slim regardless of class
DOT_RADIUS = 0.035  # wing-dot radius as a fraction of the bird's length
LIGHT_GAIN = (0.75, 1.2)  # overall brightness of the scene
COLOUR_CAST = (0.92, 1.08)  # per-channel gain: shifts every hue a little, so the shade is a cue but not a label

# Clutter: how many of each distractor a background gets (a uniform integer in [low, high)).
BLOBS = (4, 10)  # leaves and stones
STRIPED_PATCHES = (0, 3)  # discs of bars: bars alone must not identify a species
SPECKS = (2, 10)  # pale dots like the wing dots
TWIGS = (1, 5)  # lines behind the bird
FRONT_TWIGS = (0, 2)  # lines in front of it: partial occlusion


@dataclass(frozen=True)
class DemoClass:
    """One class: its CUB-style name and the details that define it."""

    class_id: int  # 1-based, as in classes.txt
    name: str  # e.g. "Barred_Warbler"
    genus: str
    plumage_hue: float
    tail_fork: float
    stripe_cycles: float
    wing_dots: int

    @property
    def folder(self) -> str:
        return f"{self.class_id:03d}.{self.name}"


def demo_classes(num_classes: int = NUM_CLASSES) -> list[DemoClass]:
    """The first ``num_classes`` classes, genus by genus, each genus holding every species."""
    if not 2 <= num_classes <= MAX_CLASSES:
        raise ConfigError(f"demo num_classes={num_classes}: choose between 2 and {MAX_CLASSES}")
    classes = []
    for index in range(num_classes):
        genus, hue, fork = GENERA[index // len(SPECIES)]
        species, cycles, dots = SPECIES[index % len(SPECIES)]
        classes.append(DemoClass(index + 1, f"{species}_{genus}", genus, hue, fork, cycles, dots))
    return classes


# ---------------------------------------------------------------------------------------------------------------------
# Drawing: vectorised numpy and OpenCV calls on RGB uint8 canvases, no per-pixel Python.


def _hsv(hue_deg: float, sat: float, val: float) -> tuple[int, int, int]:
    """An RGB colour as the 0..255 integer tuple OpenCV's drawing calls take."""
    red, green, blue = (round(255 * c) for c in colorsys.hsv_to_rgb((hue_deg % 360.0) / 360.0, sat, val))
    return red, green, blue


def _random_colour(rng: np.random.Generator) -> tuple[int, int, int]:
    return _hsv(rng.uniform(0, 360), rng.uniform(0.1, 0.7), rng.uniform(0.2, 0.95))


def _point(rng: np.random.Generator, height: int, width: int) -> tuple[int, int]:
    return int(rng.integers(0, width)), int(rng.integers(0, height))


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A smooth colour field with blobs, twigs, and striped/dotted distractors.

    The distractors carry the same kinds of detail as the birds (bars, pale dots), so the classifier has to find the
    bird before it can read its details, as with real birds in foliage.
    """
    field = np.array([_hsv(rng.uniform(40, 220), rng.uniform(0.15, 0.6), rng.uniform(0.3, 0.85)) for _ in range(9)])
    field = cv2.resize(field.reshape(3, 3, 3).astype(np.float32), (width, height), interpolation=cv2.INTER_CUBIC)
    canvas = np.clip(field, 0, 255).astype(np.uint8)
    side = min(height, width)
    for _ in range(rng.integers(*BLOBS)):
        axes = (int(side * rng.uniform(0.04, 0.3)), int(side * rng.uniform(0.04, 0.3)))
        angle = float(rng.uniform(0, 180))
        cv2.ellipse(canvas, _point(rng, height, width), axes, angle, 0, 360, _random_colour(rng), -1, cv2.LINE_AA)
    for _ in range(rng.integers(*STRIPED_PATCHES)):
        _striped_patch(rng, canvas)
    for _ in range(rng.integers(*SPECKS)):
        radius = max(1, int(side * rng.uniform(0.005, 0.02)))
        colour = _hsv(rng.uniform(30, 60), rng.uniform(0.0, 0.3), rng.uniform(0.8, 1.0))
        cv2.circle(canvas, _point(rng, height, width), radius, colour, -1, cv2.LINE_AA)
    _twigs(rng, canvas, int(rng.integers(*TWIGS)))
    sigma = float(rng.uniform(0.0, 2.0))  # depth of field: the background is often softer than the bird
    return cv2.GaussianBlur(canvas, (0, 0), sigma) if sigma > 0.3 else canvas


def _striped_patch(rng: np.random.Generator, canvas: np.ndarray) -> None:
    """A disc of bars at a random period and angle (in place)."""
    height, width = canvas.shape[:2]
    side = min(height, width)
    cx, cy = _point(rng, height, width)
    radius = int(side * rng.uniform(0.05, 0.2))
    period = side * rng.uniform(0.015, 0.06)
    theta = rng.uniform(0, np.pi)
    top, left = max(0, cy - radius), max(0, cx - radius)
    roi = canvas[top : cy + radius + 1, left : cx + radius + 1]
    ys, xs = np.ogrid[top : top + roi.shape[0], left : left + roi.shape[1]]
    dx, dy = xs - cx, ys - cy
    bars = (dx**2 + dy**2 <= radius**2) & (np.sin(2 * np.pi * (dx * np.cos(theta) + dy * np.sin(theta)) / period) > 0)
    roi[bars] = _random_colour(rng)


def _twigs(rng: np.random.Generator, canvas: np.ndarray, count: int) -> None:
    height, width = canvas.shape[:2]
    for _ in range(count):
        start, end = _point(rng, height, width), _point(rng, height, width)
        colour = _hsv(rng.uniform(15, 40), rng.uniform(0.3, 0.7), rng.uniform(0.15, 0.45))
        cv2.line(canvas, start, end, colour, int(rng.integers(1, 4)), cv2.LINE_AA)


def _bird(rng: np.random.Generator, cls: DemoClass, canvas: np.ndarray) -> tuple[float, float, float, float]:
    """Draw one bird of ``cls`` onto ``canvas`` (in place) and return its bounding box (x, y, w, h).

    The bird lives in its own frame: u runs from the tail tip (-0.5) to the beak tip (+0.5) in units of its length,
    v across it. A random rotation, scale and position map that frame onto the canvas. Only the square around the
    bird is drawn, small birds at SUPERSAMPLE times the resolution, then area-averaged down and alpha-blended in.
    """
    height, width = canvas.shape[:2]
    side = min(height, width)
    length = side * np.exp(rng.uniform(np.log(OBJECT_SCALE[0]), np.log(OBJECT_SCALE[1])))
    theta = rng.uniform(0, 2 * np.pi)
    reach = 0.5 * length  # every part lies within half a length of the centre, so this keeps the bird in the frame
    cx = rng.uniform(reach, width - reach) if width > 2 * reach else width / 2
    cy = rng.uniform(reach, height - reach) if height > 2 * reach else height / 2
    top, left = max(0, int(cy - reach)), max(0, int(cx - reach))
    bottom, right = min(height, int(cy + reach) + 2), min(width, int(cx + reach) + 2)
    scale = SUPERSAMPLE if length < SUPERSAMPLE_BELOW else 1
    dx = ((np.arange(left * scale, right * scale, dtype=np.float32) + 0.5) / scale - cx)[None, :] / length
    dy = ((np.arange(top * scale, bottom * scale, dtype=np.float32) + 0.5) / scale - cy)[:, None] / length
    u = dx * np.float32(np.cos(theta)) + dy * np.float32(np.sin(theta))
    v = dy * np.float32(np.cos(theta)) - dx * np.float32(np.sin(theta))

    body_a, body_u = 0.27, -0.02  # the body ellipse's half-length and centre
    body = ((u - body_u) / body_a) ** 2 + (v / (body_a * rng.uniform(*BODY_ASPECT))) ** 2 <= 1.0
    head_u, head_r = 0.3, 0.1 * rng.uniform(0.9, 1.1)
    head = (u - head_u) ** 2 + v**2 <= head_r**2
    beak = (u >= head_u + 0.06) & (u <= 0.5) & (np.abs(v) <= 0.035 * (0.5 - u) / (0.5 - head_u - 0.06))
    tail_base, tail_len = -0.22, 0.28  # the tail runs from u=-0.22 back to its tip at u=-0.5
    tail_half = 0.04 + 0.07 * np.clip((tail_base - u) / tail_len, 0.0, 1.0)  # it widens towards the tip
    tail = (u <= tail_base) & (u >= tail_base - tail_len) & (np.abs(v) <= tail_half)
    tail &= u > -0.5 + cls.tail_fork * tail_len * (1.0 - np.abs(v) / tail_half)  # the fork: a V cut from the tip

    hue = cls.plumage_hue + rng.uniform(-HUE_JITTER, HUE_JITTER)
    dark = _hsv(hue + rng.uniform(-8, 8), rng.uniform(0.4, 0.7), rng.uniform(0.2, 0.35))
    cycles = cls.stripe_cycles * (1.0 + rng.uniform(-STRIPE_JITTER, STRIPE_JITTER))
    bars = body & (np.sin(2 * np.pi * cycles * (u - body_u) / (2 * body_a) + rng.uniform(0, 2 * np.pi)) > 0.2)
    dot_r = DOT_RADIUS * rng.uniform(0.9, 1.1)
    dots = np.zeros_like(body)
    for dot_u in np.linspace(-0.1, 0.1, cls.wing_dots) if cls.wing_dots > 1 else [0.0]:
        dots |= (u - body_u - dot_u) ** 2 + v**2 <= dot_r**2
    eye = (u - head_u - 0.035) ** 2 + (v - 0.03) ** 2 <= 0.018**2
    beak_colour = _hsv(rng.uniform(20, 40), rng.uniform(0.2, 0.6), rng.uniform(0.3, 0.6))
    plumage, pale, black = _hsv(hue, rng.uniform(0.55, 0.8), rng.uniform(0.7, 0.95)), _hsv(50, 0.1, 0.98), (12, 12, 12)
    # paint by numbers: later parts cover earlier ones; 0 is "no bird" and stays black
    palette = np.array([(0, 0, 0), dark, plumage, dark, pale, beak_colour, black], np.uint8)
    parts = np.zeros(u.shape, np.uint8)
    for index, part in enumerate((tail | head, body, bars, dots, beak, eye), start=1):
        parts[part] = index
    layer = palette[parts]

    size = (right - left, bottom - top)
    colour = cv2.resize(layer, size, interpolation=cv2.INTER_AREA).astype(np.float32)
    alpha = cv2.resize((body | head | beak | tail).astype(np.float32), size, interpolation=cv2.INTER_AREA)
    roi = canvas[top:bottom, left:right]
    # the layer is black outside the bird, so area-averaging premultiplied it by the coverage already
    roi[...] = np.clip(roi * (1.0 - alpha[..., None]) + colour + 0.5, 0, 255).astype(np.uint8)
    x, y, w, h = cv2.boundingRect((alpha >= 0.5).astype(np.uint8))
    return float(left + x), float(top + y), float(w), float(h)


def render_image(rng: np.random.Generator, cls: DemoClass) -> tuple[np.ndarray, tuple[float, float, float, float]]:
    """One RGB uint8 image of a bird of ``cls`` and the bird's bounding box (x, y, w, h) in pixels."""
    height, width = (int(side) for side in rng.integers(MIN_SIDE, MAX_SIDE + 1, size=2))
    canvas = _background(rng, height, width)
    box = _bird(rng, cls, canvas)
    _twigs(rng, canvas, int(rng.integers(*FRONT_TWIGS)))  # in front of the bird: partial occlusion
    tint = (rng.uniform(*COLOUR_CAST, size=3) * rng.uniform(*LIGHT_GAIN)).astype(np.float32)
    # sensor noise, uniform rather than Gaussian: the same spread at a fifth of the cost of drawing normals
    noise = (rng.random(canvas.shape, dtype=np.float32) - np.float32(0.5)) * np.float32(rng.uniform(2.5, 8.0) * 12**0.5)
    image = np.clip(canvas * tint + noise + 0.5, 0, 255).astype(np.uint8)
    return image, box


def image_rng(seed: int, class_index: int, image_index: int) -> np.random.Generator:
    """The Generator for one image: images do not depend on each other, nor on how many classes are drawn."""
    return np.random.default_rng([seed, class_index, image_index])


# ---------------------------------------------------------------------------------------------------------------------
# Writing the CUB layout.


def _test_images(seed: int, class_index: int, images_per_class: int, test_fraction: float) -> set[int]:
    """Which (0-based) images of a class go to test: a seeded draw, at least one image in each split."""
    n_test = min(images_per_class - 1, max(1, round(images_per_class * test_fraction)))
    order = np.random.default_rng([seed, class_index, 1_000_003]).permutation(images_per_class)
    return {int(i) for i in order[:n_test]}


def _write_jpeg(path: Path, rgb: np.ndarray, quality: int) -> None:
    """Encode with OpenCV in memory and write the bytes ourselves: unlike cv2.imwrite, this handles any path."""
    ok, encoded = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise DataError(f"{path}: OpenCV could not encode the demo image; check the opencv-python installation")
    path.write_bytes(encoded.tobytes())


def _write_dataset(
    out: Path, seed: int, classes: list[DemoClass], images_per_class: int, test_fraction: float, quality: int
) -> None:
    images, labels, splits, boxes = [], [], [], []
    image_id = 0
    for class_index, cls in enumerate(classes):
        (out / "images" / cls.folder).mkdir(parents=True)
        test = _test_images(seed, class_index, images_per_class, test_fraction)
        for k in range(images_per_class):
            image_id += 1
            rgb, (x, y, w, h) = render_image(image_rng(seed, class_index, k), cls)
            relative = f"{cls.folder}/{cls.name}_{k + 1:04d}.jpg"
            _write_jpeg(out / "images" / relative, rgb, quality)
            images.append(f"{image_id} {relative}")
            labels.append(f"{image_id} {cls.class_id}")
            splits.append(f"{image_id} {0 if k in test else 1}")
            boxes.append(f"{image_id} {x:.1f} {y:.1f} {w:.1f} {h:.1f}")
    tables = {
        "classes.txt": [f"{cls.class_id} {cls.folder}" for cls in classes],
        "image_class_labels.txt": labels,
        "train_test_split.txt": splits,
        "bounding_boxes.txt": boxes,
        "images.txt": images,
        "README": _readme(seed, classes, images_per_class, test_fraction),
    }
    for name, lines in tables.items():
        (out / name).write_text("\n".join(lines) + "\n")


def _readme(seed: int, classes: list[DemoClass], images_per_class: int, test_fraction: float) -> list[str]:
    lines = [
        f"{DEMO_MARKER} (seed {seed}, {len(classes)} classes x {images_per_class} images, "
        f"test fraction {test_fraction})",
        "Same layout as CUB-200-2011. Classes differ only in these details:",
        "class genus plumage_hue tail_fork stripe_cycles wing_dots",
    ]
    lines += [f"{c.folder} {c.genus} {c.plumage_hue} {c.tail_fork} {c.stripe_cycles} {c.wing_dots}" for c in classes]
    return lines


def _is_replaceable(folder: Path) -> bool:
    """An existing folder may be replaced only if it is empty or is one of our demos (never a real CUB copy)."""
    if not any(folder.iterdir()):
        return True
    readme = folder / "README"
    return readme.is_file() and readme.read_text(errors="replace").startswith(DEMO_MARKER)


def generate_demo(
    root: Path,
    seed: int = DEMO_SEED,
    num_classes: int = NUM_CLASSES,
    images_per_class: int = IMAGES_PER_CLASS,
    test_fraction: float = TEST_FRACTION,
    jpeg_quality: int = JPEG_QUALITY,
) -> Path:
    """Write the demo dataset under ``root`` and return its ``CUB_200_2011`` folder.

    The files are written into a temporary folder beside the target and renamed into place at the end, so a reader
    never sees half a dataset. An earlier demo in the same place is replaced; anything else there is left alone.
    """
    if images_per_class < 2:
        raise ConfigError(f"demo images_per_class={images_per_class}: need at least 2 (one train, one test)")
    if not 0.0 < test_fraction < 1.0:
        raise ConfigError(f"demo test_fraction={test_fraction}: choose a value strictly between 0 and 1")
    classes = demo_classes(num_classes)
    root = Path(root)
    target = root / DATASET_DIR
    if target.exists() and not (target.is_dir() and _is_replaceable(target)):
        raise DataError(f"{target}: exists and is not an fgvc demo dataset; move it away or choose another --data-root")
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{DATASET_DIR}.", dir=root))
    staging.chmod(0o755)  # mkdtemp makes it private; the dataset it becomes should be readable like any other
    try:
        _write_dataset(staging, seed, classes, images_per_class, test_fraction, jpeg_quality)
        if target.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{DATASET_DIR}.old.", dir=root))
            os.replace(target, retired / DATASET_DIR)
            os.replace(staging, target)
            shutil.rmtree(retired)
        else:
            os.replace(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return target


def ensure_demo(root: Path, seed: int = DEMO_SEED) -> Path:
    """Return the demo's ``CUB_200_2011`` folder under ``root``, generating it first if it is not there yet."""
    target = Path(root) / DATASET_DIR
    if (target / "images.txt").is_file():
        return target
    return generate_demo(root, seed=seed)
