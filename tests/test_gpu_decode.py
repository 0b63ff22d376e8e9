"""Device-side decoding and augmentation, run on the CPU: geometry against the CPU path, seeds, fallbacks, decode_mode.

References are computed independently of the code under test: the CPU path (OpenCV decode + albumentations), Pillow
and OpenCV for decoding, torchvision's RandomResizedCrop for the crop distribution, and hand arithmetic.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import albumentations.augmentations.pixel.functional as albu
import cv2
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.transforms import RandomResizedCrop

from fgvc import gpu_decode
from fgvc.data import TenCropNormalize, collate_tencrop, normalize_on_device
from fgvc.engine.sampling import EpochSampler
from fgvc.errors import ConfigError, CorruptImageError
from fgvc.gpu_decode import (
    DRAW_LEFT,
    DRAW_LOG_RATIO,
    DRAW_SCALE,
    DRAW_TOP,
    N_DRAWS,
    EncodedBatch,
    EncodedImageDataset,
    GpuBatchPreparer,
    collate_encoded,
    color_jitter,
    cpu_decode_images_per_s,
    crop_resize,
    decode_mode,
    decode_on_device,
    device_decodable,
    flip_flags,
    jitter_params,
    sample_draws,
    sample_rrc_boxes,
)
from fgvc.io import decode_image
from fgvc.transforms import build_transform

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
UNITS = torch.tensor(STD).view(1, 3, 1, 1) * 255  # normalised difference -> 0..255 levels
# Landscape, portrait, odd sizes, nearly square, and one smaller than the test resize (so it is enlarged).
SIZES = [(300, 400), (400, 260), (333, 500), (257, 256), (90, 120)]


pytestmark = pytest.mark.usefixtures("one_thread")  # single-threaded torch: see conftest.py


def blobs(
    height: int, width: int, seed: int, count: int = 40, sigma: tuple[float, float] = (0.035, 0.06)
) -> np.ndarray:
    """Smooth RGB image with a distinctive layout: coloured Gaussian blobs at random places over a gradient.

    Smooth, so different resampling kernels agree to within a level or two; laid out irregularly, so a crop taken a
    few pixels off, or from a wrongly resized image, differs by many levels.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    image = 40 + 60 * (xx / width)[..., None] * np.array([1.0, 0.5, 0.2])
    for _ in range(count):
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        spread = rng.uniform(*sigma) * min(height, width)
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * spread**2))
        image = image + blob[..., None] * rng.uniform(-150, 150, 3)
    return np.clip(image, 0, 255).astype(np.uint8)


def write_jpeg(path: Path, rgb: np.ndarray, quality: int = 95) -> str:
    cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    return str(path)


@pytest.fixture(scope="module")
def blob_frame(tmp_path_factory: pytest.TempPathFactory) -> pd.DataFrame:
    folder = tmp_path_factory.mktemp("blobs")
    paths = [write_jpeg(folder / f"blob_{i}.jpg", blobs(h, w, i)) for i, (h, w) in enumerate(SIZES)]
    return pd.DataFrame({"path": paths, "label": range(len(paths))})


def batch_of(frame: pd.DataFrame, seeds: list[int] | None = None, skip_corrupt: bool = False) -> EncodedBatch:
    dataset = EncodedImageDataset(frame, skip_corrupt=skip_corrupt)
    seeds = list(range(len(frame))) if seeds is None else seeds
    batch, _labels, _rows = collate_encoded([dataset[(row, seed)] for row, seed in enumerate(seeds)])
    return batch


def cpu_reference(paths: list[str], kind: str, res: int, crop_pct: float = 0.875) -> torch.Tensor:
    transform = build_transform(kind, res, crop_pct=crop_pct)
    images = [transform(decode_image(p)) for p in paths]
    if kind == "tencrop":
        batch, _labels, _rows = collate_tencrop([(image, 0, row) for row, image in enumerate(images)], res)
        return TenCropNormalize(MEAN, STD, "cpu")(batch)
    return normalize_on_device(torch.stack(images), MEAN, STD, "cpu")


def levels(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Absolute difference of two normalised batches in 0..255 units."""
    return ((a - b) * UNITS).abs()


def with_draws(batch: EncodedBatch, **slots: float | list[float]) -> EncodedBatch:
    """The batch with the named draw slots (e.g. DRAW_FLIP=0.1) set, to one value or one value per sample."""
    draws = batch.draws.clone()
    for name, value in slots.items():
        slot = getattr(gpu_decode, name)
        column = torch.tensor(value, dtype=torch.float64)
        draws[:, slot] = column.view(-1, 1) if isinstance(slot, slice) and column.dim() == 1 else column
    return EncodedBatch(batch.payloads, draws, batch.seeds, batch.rows, batch.paths)


def resized_width(height: int, width: int, shorter: int) -> int:
    """The width after resizing the shorter side to ``shorter``, rounded like albumentations' SmallestMaxSize."""
    return round(width * (shorter / min(height, width)))


# ------------------------------------------------------------------------------------------------ test-time geometry


@pytest.mark.parametrize(("res", "crop_pct"), [(96, 0.875), (112, 0.875), (80, 0.6)])
def test_test_kind_matches_the_cpu_path(blob_frame: pd.DataFrame, res: int, crop_pct: float) -> None:
    """Same region, same size: the two paths differ only by their resampling kernels.

    The CPU path resizes with OpenCV bicubic, the device path averages bilinear samples (area-like when shrinking).
    On these smooth images the kernels agree to a fraction of a level on average and a few levels at worst (JPEG
    decoding is identical: both use libjpeg-turbo). A crop displaced by 3 pixels differs by several levels on average.
    """
    out = GpuBatchPreparer("test", res, MEAN, STD, "cpu", crop_pct=crop_pct)(batch_of(blob_frame))
    assert out.shape == (len(SIZES), 3, res, res)
    assert out.dtype == torch.float32
    assert out.is_contiguous(memory_format=torch.channels_last)
    reference = cpu_reference(blob_frame["path"].tolist(), "test", res, crop_pct)
    diff = levels(out, reference)
    assert (diff.mean(dim=(1, 2, 3)) < 0.8).all(), diff.mean(dim=(1, 2, 3))
    assert (diff.amax(dim=(1, 2, 3)) < 8).all(), diff.amax(dim=(1, 2, 3))
    displaced = levels(reference[..., 3:], reference[..., :-3]).mean(dim=(1, 2, 3))
    assert (displaced > 2.5).all(), "the test images are too smooth to tell a displaced crop apart"


def test_tencrop_views_match_the_cpu_tencrop(blob_frame: pd.DataFrame) -> None:
    batch = batch_of(blob_frame)
    out = GpuBatchPreparer("tencrop", 64, MEAN, STD, "cpu")(batch)
    assert out.shape == (len(SIZES), 10, 3, 64, 64)
    assert out.flatten(0, 1).is_contiguous(memory_format=torch.channels_last)
    reference = cpu_reference(blob_frame["path"].tolist(), "tencrop", 64)
    per_view = levels(out, reference).mean(dim=(2, 3, 4))
    assert (per_view < 0.8).all(), per_view
    centre = GpuBatchPreparer("test", 64, MEAN, STD, "cpu")(batch)
    torch.testing.assert_close(out[:, 4], centre)


@pytest.mark.parametrize("kind", ["test", "tencrop"])
def test_flat_images_stay_flat_at_every_edge(tmp_path: Path, kind: str) -> None:
    """Crops that touch the right or bottom edge of an image smaller than the padded canvas are not darkened."""
    shapes = [(30, 50), (50, 30), (64, 80), (17, 23)]
    flat = [np.full((h, w, 3), 180, np.uint8) for h, w in shapes]
    paths = [write_jpeg(tmp_path / f"flat_{i}.jpg", image) for i, image in enumerate(flat)]
    batch = batch_of(pd.DataFrame({"path": paths, "label": 0}))
    assert all(payload.dim() == 1 for payload in batch.payloads)
    assert all((decode_image(path) == 180).all() for path in paths)  # a flat grey survives JPEG exactly
    out = GpuBatchPreparer(kind, 16, (0.0, 0.0, 0.0), (1 / 255, 1 / 255, 1 / 255), "cpu", crop_pct=0.5)(batch)
    torch.testing.assert_close(out, torch.full_like(out, 180.0), atol=1e-3, rtol=0)


def test_chunked_canvas_gives_the_same_crops(blob_frame: pd.DataFrame) -> None:
    """A canvas budget smaller than the batch splits it into several roi_align calls; the crops do not change."""
    images = decode_on_device(batch_of(blob_frame), torch.device("cpu"))
    rng = np.random.default_rng(0)
    owners = rng.integers(0, len(images), 12)
    heights = np.array([image.shape[1] for image in images])[owners]
    widths = np.array([image.shape[2] for image in images])[owners]
    boxes = sample_rrc_boxes(heights, widths, rng.random((12, N_DRAWS)))
    whole = crop_resize(images, boxes, owners, 24)
    one_image_per_call = crop_resize(images, boxes, owners, 24, canvas_bytes=1)
    torch.testing.assert_close(one_image_per_call, whole)


def test_a_crop_does_not_depend_on_its_batch_mates_whatever_their_shapes() -> None:
    """Images of repeated shapes, not side by side in the batch, share one canvas (filled shape by shape): every crop
    equals the same crop cut from a canvas holding its image alone, with or without the canvas split into chunks."""
    rng = np.random.default_rng(3)
    shapes = [(20, 30), (30, 20), (20, 30), (17, 23), (30, 20), (20, 30), (9, 40)]
    images = [torch.from_numpy(rng.uniform(0, 255, (3, h, w)).astype(np.float32)) for h, w in shapes]
    owners = np.concatenate([np.arange(len(images)), rng.integers(0, len(images), 9)])
    heights = np.array([image.shape[1] for image in images])[owners]
    widths = np.array([image.shape[2] for image in images])[owners]
    boxes = sample_rrc_boxes(heights, widths, rng.random((len(owners), N_DRAWS)))
    alone = torch.cat([crop_resize([images[o]], boxes[i : i + 1], np.array([0]), 12) for i, o in enumerate(owners)])
    torch.testing.assert_close(crop_resize(images, boxes, owners, 12), alone, atol=1e-4, rtol=0)
    torch.testing.assert_close(crop_resize(images, boxes, owners, 12, canvas_bytes=3 * 4 * 30 * 30 * 3), alone,
                               atol=1e-4, rtol=0)  # fmt: skip


def test_the_canvas_filled_shape_by_shape_equals_one_filled_image_by_image() -> None:
    """uint8 images (contiguous, and HWC arrays seen as CHW like the CPU-decoded fallbacks), equal shapes apart or side
    by side: the canvas is bit for bit the one a copy per image and an edge copy per padded side give."""
    rng = np.random.default_rng(4)
    shapes = [(20, 30), (30, 20), (30, 20), (30, 20), (9, 40), (20, 30)]  # one run of three, mixed layouts
    images = [torch.from_numpy(rng.integers(0, 256, (3, h, w), dtype=np.uint8)) for h, w in shapes[:3]]
    hwc = [torch.from_numpy(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in shapes[3:]]
    images += [image.permute(2, 0, 1) for image in hwc]
    expected = torch.empty((len(images), 3, 30, 40), dtype=torch.float32)
    for slot, image in enumerate(images):
        height, width = image.shape[1:]
        expected[slot, :, :height, :width] = image
        expected[slot, :, :height, width:] = image[:, :, width - 1 :]
        expected[slot, :, height:] = expected[slot, :, height - 1 : height]
    assert torch.equal(gpu_decode._padded_canvas(images, torch.device("cpu")), expected)


def test_shrinking_averages_each_output_pixels_footprint() -> None:
    """At an integer factor the samples land on pixel centres: the result is OpenCV's area resize, not aliased noise."""
    noise = np.random.default_rng(0).uniform(0, 255, (64, 96, 3)).astype(np.float32)
    image = torch.from_numpy(noise).permute(2, 0, 1)
    boxes = np.array([[0.0, 0.0, 64.0, 64.0], [32.0, 0.0, 96.0, 64.0]])  # 64x64 squares shrunk 8x
    out = crop_resize([image], boxes, np.array([0, 0]), 8).permute(0, 2, 3, 1).numpy()
    for view, (x1, _y1, x2, _y2) in zip(out, boxes.astype(int), strict=True):
        expected = cv2.resize(noise[:, x1:x2], (8, 8), interpolation=cv2.INTER_AREA)
        np.testing.assert_allclose(view, expected, atol=1e-3)


def test_enlarging_is_bilinear_with_replicated_edges() -> None:
    noise = np.random.default_rng(1).uniform(0, 255, (10, 14, 3)).astype(np.float32)
    image = torch.from_numpy(noise).permute(2, 0, 1)
    out = crop_resize([image], np.array([[2.0, 0.0, 12.0, 10.0]]), np.array([0]), 25)[0].permute(1, 2, 0).numpy()
    expected = cv2.resize(noise[:, 2:12], (25, 25), interpolation=cv2.INTER_LINEAR)
    # OpenCV resizes the 10x10 crop alone and replicates its edges; inside, both interpolate the same pixels.
    np.testing.assert_allclose(out[1:-1, 1:-1], expected[1:-1, 1:-1], atol=1e-3)


# ------------------------------------------------------------------------------------------------------------ test2


def test_test2_with_neutral_draws_is_the_test_crop_and_flips_on_demand(blob_frame: pd.DataFrame) -> None:
    """Jitter draws of 0.5 mean factors of exactly 1; a shift draw of 0.5 picks the centre offset for these sizes."""
    batch = batch_of(blob_frame)
    test = GpuBatchPreparer("test", 64, MEAN, STD, "cpu")(batch)
    test2 = GpuBatchPreparer("test2", 64, MEAN, STD, "cpu")
    # Shorter side floor(64 / 0.875) = 73; the shift draw u gives offset floor(u * (W' - 63)): aim at the centre.
    widths = [resized_width(h, w, 73) for h, w in SIZES]
    neutral = {"DRAW_JITTER": 0.5, "DRAW_SHIFT": [((w - 64) // 2 + 0.5) / (w - 63) for w in widths]}
    torch.testing.assert_close(test2(with_draws(batch, DRAW_FLIP=0.9, **neutral)), test)
    torch.testing.assert_close(test2(with_draws(batch, DRAW_FLIP=0.1, **neutral)), test.flip(-1))


def test_test2_shift_moves_the_crop_horizontally_only(blob_frame: pd.DataFrame) -> None:
    batch = batch_of(blob_frame)
    test2 = GpuBatchPreparer("test2", 64, MEAN, STD, "cpu")
    left = test2(with_draws(batch, DRAW_FLIP=0.9, DRAW_JITTER=0.5, DRAW_SHIFT=0.0))
    right = test2(with_draws(batch, DRAW_FLIP=0.9, DRAW_JITTER=0.5, DRAW_SHIFT=0.999))
    # Shift 0 starts the crop at the resized image's left edge: compare with the CPU resize, cropped by hand.
    for i, path in enumerate(blob_frame["path"]):
        h, w = SIZES[i]
        size = (resized_width(h, w, 73), resized_width(w, h, 73))
        resized = cv2.resize(decode_image(path), size, interpolation=cv2.INTER_CUBIC)
        top = (resized.shape[0] - 64) // 2
        for out, x in ((left, 0), (right, resized.shape[1] - 64)):
            crop = torch.from_numpy(np.ascontiguousarray(resized[top : top + 64, x : x + 64])).permute(2, 0, 1)
            expected = normalize_on_device(crop[None], MEAN, STD, "cpu")
            assert levels(out[i : i + 1], expected).mean() < 0.8


# ------------------------------------------------------------------------------------------------------------ train


def test_train_output_shape_layout_and_range(blob_frame: pd.DataFrame) -> None:
    out = GpuBatchPreparer("train", 48, MEAN, STD, "cpu")(batch_of(blob_frame))
    assert out.shape == (len(SIZES), 3, 48, 48)
    assert out.is_contiguous(memory_format=torch.channels_last)
    pixels = out * UNITS + torch.tensor(MEAN).view(1, 3, 1, 1) * 255
    assert pixels.min() >= -1e-3 and pixels.max() <= 255 + 1e-3  # the jitter clips to the uint8 range


def test_train_is_a_function_of_the_sample_seeds(blob_frame: pd.DataFrame) -> None:
    prepare = GpuBatchPreparer("train", 32, MEAN, STD, "cpu")
    seeds = [11, 22, 33, 44, 55]
    first = prepare(batch_of(blob_frame, seeds))
    again = prepare(batch_of(blob_frame, seeds))
    assert torch.equal(first, again)
    other = prepare(batch_of(blob_frame, [s + 1 for s in seeds]))
    assert all(not torch.allclose(first[i], other[i]) for i in range(len(seeds)))
    # A sample's crop does not depend on its batch mates (nor on the padded canvas they share).
    alone = prepare(batch_of(blob_frame.iloc[[2]].reset_index(drop=True), [33]))
    torch.testing.assert_close(alone[0], first[2], atol=1e-5, rtol=0)


def test_dataset_carries_seed_and_its_draws(blob_frame: pd.DataFrame) -> None:
    dataset = EncodedImageDataset(blob_frame)
    sample = dataset[(3, 1234)]
    assert (sample.row, sample.label, sample.seed) == (3, 3, 1234)
    expected = torch.rand(N_DRAWS, generator=torch.Generator().manual_seed(1234), dtype=torch.float64)
    assert torch.equal(sample.draws, expected)
    torch.manual_seed(0)
    unseeded = [dataset[0].seed for _ in range(5)]
    assert len(set(unseeded)) == 5  # without a sampler seed each fetch draws a fresh one


def test_flip_draw_mirrors_the_output(blob_frame: pd.DataFrame) -> None:
    """Flipping commutes with the jitter (a per-pixel map plus image-wide means), so only the flip draw differs."""
    batch = batch_of(blob_frame)
    prepare = GpuBatchPreparer("train", 40, MEAN, STD, "cpu")
    kept = prepare(with_draws(batch, DRAW_FLIP=0.7))
    mirrored = prepare(with_draws(batch, DRAW_FLIP=0.2))
    torch.testing.assert_close(mirrored, kept.flip(-1), atol=1e-4, rtol=0)


def test_flips_happen_about_half_the_time() -> None:
    draws = torch.stack([sample_draws(seed) for seed in range(2000)]).numpy()
    rate = flip_flags(draws).mean()
    assert 0.45 < rate < 0.55  # 2000 fair coins: standard deviation 0.011


def test_jitter_factors_and_orders() -> None:
    draws = torch.stack([sample_draws(seed) for seed in range(600)]).numpy()
    params = jitter_params(draws, 0.3)
    assert params.factors.min() >= 0.7 and params.factors.max() <= 1.3
    assert params.factors.min() < 0.72 and params.factors.max() > 1.28  # the whole range is used
    assert (np.sort(params.order, axis=1) == [0, 1, 2]).all()
    assert len({tuple(order) for order in params.order}) == 6  # every order of the three adjustments occurs


@pytest.mark.parametrize("order", [(0, 1, 2), (2, 0, 1), (1, 2, 0)])
def test_color_jitter_matches_albumentations_adjustments(order: tuple[int, int, int]) -> None:
    """Brightness 1.25, contrast 0.8, saturation 1.3 applied in ``order``, against albumentations' uint8 functions.

    albumentations rounds to uint8 after each adjustment (and rounds the luma it blends with); the device path keeps
    floats. Three roundings of half a level, amplified by later factors up to 1.3, stay within 3 levels; a wrong
    blend target or luma weight would be tens of levels off.
    """
    image = np.random.default_rng(1).integers(0, 256, (12, 10, 3), dtype=np.uint8)
    factors = (1.25, 0.8, 1.3)
    adjust = (albu.adjust_brightness_torchvision, albu.adjust_contrast_torchvision, albu.adjust_saturation_torchvision)
    expected = image
    for op in order:
        expected = adjust[op](expected, factors[op])
    pixels = torch.from_numpy(image).permute(2, 0, 1)[None].float()
    out = color_jitter(pixels, torch.tensor([factors]), torch.tensor([order]))
    diff = np.abs(out[0].permute(1, 2, 0).numpy() - expected.astype(np.float64))
    assert diff.max() <= 3.0 and diff.mean() < 1.0


# ---------------------------------------------------------------------------------------------------- RRC box sampler


def test_rrc_boxes_are_whole_pixels_inside_the_image() -> None:
    rng = np.random.default_rng(0)
    n = 4000
    heights, widths = rng.integers(5, 600, n), rng.integers(5, 600, n)
    boxes = sample_rrc_boxes(heights, widths, rng.random((n, N_DRAWS)))
    x1, y1, x2, y2 = boxes.T
    assert (boxes == np.round(boxes)).all()
    assert (x1 >= 0).all() and (y1 >= 0).all() and (x2 <= widths).all() and (y2 <= heights).all()
    assert (x2 - x1 >= 1).all() and (y2 - y1 >= 1).all()


def test_rrc_boxes_respect_scale_and_ratio() -> None:
    """On images whose own aspect ratio is allowed (so even the fallback, the whole image, is in range)."""
    rng = np.random.default_rng(1)
    n = 4000
    heights = rng.integers(30, 600, n)
    widths = np.round(heights * np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3), n))).astype(np.int64)
    widths = np.clip(widths, np.ceil(heights * 3 / 4), np.floor(heights * 4 / 3)).astype(np.int64)
    boxes = sample_rrc_boxes(heights, widths, rng.random((n, N_DRAWS)))
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    # Rounding each side to whole pixels moves area and ratio by at most half a pixel per side.
    max_area = (w + 0.5) * (h + 0.5) / (heights * widths)
    min_area = (w - 0.5) * (h - 0.5) / (heights * widths)
    assert (max_area >= 0.08).all() and (min_area <= 1.0).all()
    assert ((w + 0.5) / (h - 0.5) >= 3 / 4).all() and ((w - 0.5) / (h + 0.5) <= 4 / 3).all()


def test_rrc_first_fitting_attempt_is_used() -> None:
    """By hand: a 100x200 image. Attempt 1 (area 0.54 at ratio 1) needs 104x104 > height 100; attempt 2 (40x40)
    fits and is taken, although the later attempts (59x59) fit too."""
    draws = np.zeros((1, N_DRAWS))
    draws[0, DRAW_SCALE] = [0.5, 0.0, *[0.1] * 8]  # area fractions 0.08 + 0.92 * u: 0.54, 0.08 = 1600 px, 0.172
    draws[0, DRAW_LOG_RATIO] = 0.5  # log-uniform midpoint of [3/4, 4/3]: ratio 1
    draws[0, DRAW_TOP], draws[0, DRAW_LEFT] = 0.999, 0.5
    box = sample_rrc_boxes(np.array([100]), np.array([200]), draws)[0]
    # 40x40; top floor(0.999 * (100 - 40 + 1)) = 60 (the lowest place), left floor(0.5 * (200 - 40 + 1)) = 80
    np.testing.assert_array_equal(box, [80, 60, 120, 100])


@pytest.mark.parametrize(
    ("height", "width", "expected"),
    [
        (10, 1000, [493, 0, 506, 10]),  # too wide: full height, width round(10 * 4/3) = 13, centred
        (1000, 10, [0, 493, 10, 506]),  # too tall: full width, height round(10 / (3/4)) = 13, centred
    ],
)
def test_rrc_falls_back_to_a_centre_crop(height: int, width: int, expected: list[int]) -> None:
    """Any box of 8 % of the area at ratio <= 4/3 is taller (wider) than 10 px, so all ten attempts fail."""
    draws = np.random.default_rng(3).random((1, N_DRAWS))
    np.testing.assert_array_equal(sample_rrc_boxes(np.array([height]), np.array([width]), draws)[0], expected)


def test_rrc_distribution_matches_torchvision() -> None:
    """Mean area fraction, mean aspect ratio and fallback-prone shapes agree with torchvision's get_params."""
    n, height, width = 3000, 120, 300
    image = torch.empty(1, height, width)
    torch.manual_seed(0)
    reference = np.array([RandomResizedCrop.get_params(image, [0.08, 1.0], [3 / 4, 4 / 3]) for _ in range(n)])
    ref_h, ref_w = reference[:, 2], reference[:, 3]
    boxes = sample_rrc_boxes(np.full(n, height), np.full(n, width), np.random.default_rng(0).random((n, N_DRAWS)))
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    area, ref_area = w * h / (height * width), ref_w * ref_h / (height * width)
    assert abs(area.mean() - ref_area.mean()) < 0.025  # each mean has a standard error of about 0.005
    assert abs(np.log(w / h).mean() - np.log(ref_w / ref_h).mean()) < 0.03
    assert abs((h == height).mean() - (ref_h == height).mean()) < 0.04  # boxes as tall as the image


# ----------------------------------------------------------------------------------------------- fallbacks and skips


def write_special_files(tmp_path: Path) -> dict[str, str]:
    """Files the device decoder must not get: each is decoded on the CPU by fgvc.io.decode_image instead."""
    rgb = blobs(40, 56, 7, count=6, sigma=(0.2, 0.3))  # small and smooth: kernels agree closely at this size
    files = {"jpeg": write_jpeg(tmp_path / "plain.jpg", rgb)}
    _ok, png = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    (tmp_path / "png.jpg").write_bytes(png.tobytes())
    files["png"] = str(tmp_path / "png.jpg")
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.jpg", "JPEG", quality=95)
    files["cmyk"] = str(tmp_path / "cmyk.jpg")
    Image.fromarray(rgb).convert("L").save(tmp_path / "gray.jpg", "JPEG", quality=95)
    files["gray"] = str(tmp_path / "gray.jpg")
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: viewers (and OpenCV) rotate it 90 degrees clockwise
    Image.fromarray(rgb).save(tmp_path / "rotated.jpg", "JPEG", quality=95, exif=exif)
    files["rotated"] = str(tmp_path / "rotated.jpg")
    data = Path(files["jpeg"]).read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(data[: len(data) // 2])
    files["truncated"] = str(tmp_path / "truncated.jpg")
    (tmp_path / "noise.jpg").write_bytes(np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8).tobytes())
    files["noise"] = str(tmp_path / "noise.jpg")
    (tmp_path / "padded.jpg").write_bytes(data + b"\x00\x00\r\n")
    files["padded"] = str(tmp_path / "padded.jpg")
    return files


def test_header_check_sends_only_plain_jpegs_to_the_device(tmp_path: Path) -> None:
    files = write_special_files(tmp_path)
    decodable = {name: device_decodable(Path(path).read_bytes()) for name, path in files.items()}
    assert decodable == {
        "jpeg": True,
        "padded": True,  # bytes after the end-of-image marker are harmless
        "png": False,
        "cmyk": False,
        "gray": False,
        "rotated": False,
        "truncated": False,
        "noise": False,
    }


@pytest.mark.parametrize("name", ["png", "cmyk", "gray", "rotated"])
def test_undecodable_files_travel_decoded_by_the_cpu_path(tmp_path: Path, name: str) -> None:
    path = write_special_files(tmp_path)[name]
    sample = EncodedImageDataset(pd.DataFrame({"path": [path], "label": [0]}))[0]
    assert sample.payload.dim() == 3
    np.testing.assert_array_equal(sample.payload.numpy(), decode_image(path))
    if name == "rotated":
        assert sample.payload.shape[:2] == (56, 40)  # 40x56 stored, shown rotated by a quarter turn


def test_plain_jpeg_travels_as_its_file_bytes(tmp_path: Path) -> None:
    path = write_special_files(tmp_path)["jpeg"]
    sample = EncodedImageDataset(pd.DataFrame({"path": [path], "label": [0]}))[0]
    assert sample.payload.dtype == torch.uint8 and sample.payload.dim() == 1
    assert sample.payload.numpy().tobytes() == Path(path).read_bytes()


@pytest.mark.parametrize("name", ["truncated", "noise"])
def test_corrupt_files_raise_or_are_skipped(tmp_path: Path, name: str) -> None:
    frame = pd.DataFrame({"path": [write_special_files(tmp_path)[name]], "label": [0]})
    with pytest.raises(CorruptImageError, match="skip-corrupt"):
        EncodedImageDataset(frame)[0]
    assert EncodedImageDataset(frame, skip_corrupt=True)[0] is None


def test_mixed_batch_skips_corrupt_rows_and_matches_the_cpu_path(tmp_path: Path) -> None:
    files = write_special_files(tmp_path)
    names = ["jpeg", "png", "truncated", "cmyk", "rotated", "noise", "gray"]
    frame = pd.DataFrame({"path": [files[name] for name in names], "label": range(len(names))})
    dataset = EncodedImageDataset(frame, skip_corrupt=True)
    batch, labels, rows = collate_encoded([dataset[(i, i)] for i in range(len(names))])
    kept = [0, 1, 3, 4, 6]
    assert rows.tolist() == kept and labels.tolist() == kept and batch.rows.tolist() == kept
    assert [p.dim() for p in batch.payloads] == [1, 3, 3, 3, 3]
    out = GpuBatchPreparer("test", 32, MEAN, STD, "cpu")(batch)
    reference = cpu_reference([files[names[i]] for i in kept], "test", 32)
    assert (levels(out, reference).mean(dim=(1, 2, 3)) < 1.0).all()


def test_a_batch_crosses_processes_with_all_its_payloads_in_one_tensor(tmp_path: Path) -> None:
    """What a loader worker sends: one flat byte tensor holding the JPEG bytes and the decoded fallbacks, in order."""
    import pickle

    files = write_special_files(tmp_path)
    names = ["jpeg", "png", "jpeg", "cmyk"]
    frame = pd.DataFrame({"path": [files[name] for name in names], "label": range(len(names))})
    dataset = EncodedImageDataset(frame)
    batch, _labels, _rows = collate_encoded([dataset[(i, i)] for i in range(len(names))])
    assert [p.dim() for p in batch.payloads] == [1, 3, 1, 3]
    _rebuild, parts = batch.__reduce__()
    assert sum(isinstance(part, torch.Tensor) and part.dim() == 1 and part.dtype == torch.uint8 for part in parts) == 1
    assert not any(isinstance(part, list) and any(isinstance(x, torch.Tensor) for x in part) for part in parts)
    copy = pickle.loads(pickle.dumps(batch))
    assert [p.dim() for p in copy.payloads] == [1, 3, 1, 3]
    for mine, theirs in zip(batch.payloads, copy.payloads, strict=True):
        assert torch.equal(mine, theirs)
    assert copy.paths == batch.paths and torch.equal(copy.draws, batch.draws) and torch.equal(copy.rows, batch.rows)
    out = GpuBatchPreparer("test", 32, MEAN, STD, "cpu")
    assert torch.equal(out(copy), out(batch))


def test_device_decoder_rejection_falls_back_to_the_cpu_decoder(tmp_path: Path) -> None:
    """A payload that passed as JPEG but that the decoder rejects is decoded from its path; its batch mates too."""
    files = write_special_files(tmp_path)
    good = EncodedImageDataset(pd.DataFrame({"path": [files["jpeg"]], "label": [0]}))[(0, 0)]
    png_bytes = torch.frombuffer(bytearray(Path(files["png"]).read_bytes()), dtype=torch.uint8)
    smuggled = good._replace(payload=png_bytes, path=files["png"], row=1)
    batch, _labels, _rows = collate_encoded([good, smuggled])
    images = decode_on_device(batch, torch.device("cpu"))
    expected = decode_image(files["jpeg"]), decode_image(files["png"])
    for image, reference in zip(images, expected, strict=True):
        np.testing.assert_array_equal(image.permute(1, 2, 0).numpy(), reference)


def test_pinning_pins_decoded_images_and_leaves_jpeg_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The DataLoader's pin thread calls EncodedBatch.pin_memory; pinning itself needs CUDA, so it is stubbed here."""
    files = write_special_files(tmp_path)
    frame = pd.DataFrame({"path": [files["jpeg"], files["png"]], "label": [0, 1]})
    batch = batch_of(frame)
    pinned_shapes = []

    def fake_pin(tensor: torch.Tensor) -> torch.Tensor:
        pinned_shapes.append(tuple(tensor.shape))
        return tensor.clone()

    monkeypatch.setattr(torch.Tensor, "pin_memory", fake_pin)
    pinned = batch.pin_memory()
    assert pinned_shapes == [(40, 56, 3)]
    assert pinned.payloads[0] is batch.payloads[0] and pinned.payloads[1] is not batch.payloads[1]
    assert torch.equal(pinned.payloads[1], batch.payloads[1]) and torch.equal(pinned.draws, batch.draws)


def test_collate_of_nothing_is_an_empty_batch() -> None:
    batch, labels, rows = collate_encoded([None, None])
    assert len(batch) == 0 and labels.shape == (0,) and rows.shape == (0,)
    assert batch.draws.shape == (0, N_DRAWS)


@pytest.mark.parametrize("workers", [0, 2])  # with workers every batch crosses a process boundary
def test_loader_with_the_epoch_sampler_feeds_the_preparer(blob_frame: pd.DataFrame, workers: int) -> None:
    """The seeded sampler's (row, seed) keys go through a DataLoader; the same epoch twice gives the same batches."""
    sampler = EpochSampler(len(blob_frame), shuffle=True, seed=5)
    loader = DataLoader(EncodedImageDataset(blob_frame), batch_size=2, sampler=sampler, collate_fn=collate_encoded,
                        num_workers=workers)  # fmt: skip
    prepare = GpuBatchPreparer("train", 24, MEAN, STD, "cpu")

    def epoch() -> tuple[list[torch.Tensor], list[int]]:
        outs, rows = [], []
        for batch, labels, idx in loader:
            outs.append(prepare(batch))
            rows += idx.tolist()
            assert labels.tolist() == idx.tolist()  # the fixture's label is its row
        return outs, rows

    first, first_rows = epoch()
    second, second_rows = epoch()
    assert sorted(first_rows) == list(range(len(blob_frame))) and first_rows == second_rows
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


@pytest.mark.parametrize(("kind", "shape"), [("test", (0, 3, 16, 16)), ("tencrop", (0, 10, 3, 16, 16))])
def test_an_empty_batch_gives_an_empty_tensor(kind: str, shape: tuple[int, ...]) -> None:
    batch, _labels, _rows = collate_encoded([None])
    assert GpuBatchPreparer(kind, 16, MEAN, STD, "cpu")(batch).shape == shape


def test_preparer_rejects_bad_settings() -> None:
    with pytest.raises(ConfigError, match="unknown transform"):
        GpuBatchPreparer("rotate", 32, MEAN, STD, "cpu")
    with pytest.raises(ConfigError, match="crop_pct"):
        GpuBatchPreparer("test", 32, MEAN, STD, "cpu", crop_pct=1.5)


# -------------------------------------------------------------------------------------------------------- decode_mode


def test_cpu_decode_estimate() -> None:
    assert cpu_decode_images_per_s(16) == 16 * 250
    assert cpu_decode_images_per_s(0) == 250  # the main process decodes
    assert cpu_decode_images_per_s(8, source_pixels=2 * 800 * 600) == 8 * 125  # twice the pixels, half the rate


@pytest.mark.parametrize("requested", ["cpu", "gpu", "auto"])
def test_decode_mode_is_cpu_on_a_cpu_device(requested: str) -> None:
    assert decode_mode(requested, "cpu", model_images_per_s_estimate=1e6, workers=1) == "cpu"


def test_gpu_decoding_is_unavailable_without_cuda() -> None:
    assert not gpu_decode.gpu_decode_available(torch.device("cpu"))


@pytest.fixture
def nvjpeg(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, bool]]:
    """Pretend the device is CUDA with (or without) a working nvjpeg; the rule itself needs no GPU."""
    state = {"available": True}
    monkeypatch.setattr(gpu_decode, "gpu_decode_available", lambda device: state["available"])
    yield state


@pytest.mark.parametrize(
    ("estimate", "workers", "expected"),
    [
        (4365.0, 16, "gpu"),  # ResNet-50 at 224 on an H200 outruns 16 workers (4,000 img/s)
        (176.0, 16, "cpu"),  # SENet-154 at 448: the CPU keeps up easily
        (3999.0, 16, "cpu"),
        (None, 16, "cpu"),  # no estimate: stay on the reference path
    ],
)
def test_auto_picks_gpu_only_when_the_cpu_is_the_bottleneck(
    nvjpeg: dict[str, bool], estimate: float | None, workers: int, expected: str
) -> None:
    assert decode_mode("auto", "cuda", model_images_per_s_estimate=estimate, workers=workers) == expected


def test_auto_accounts_for_large_source_images(nvjpeg: dict[str, bool]) -> None:
    # 16 workers on 4x the reference pixels: ~1,000 img/s, slower than a 2,000 img/s model
    assert decode_mode("auto", "cuda", 2000.0, workers=16, source_pixels=4 * 800 * 600) == "gpu"
    assert decode_mode("auto", "cuda", 2000.0, workers=16) == "cpu"


def test_decode_mode_without_nvjpeg(nvjpeg: dict[str, bool]) -> None:
    nvjpeg["available"] = False
    assert decode_mode("auto", "cuda", 1e6, workers=1) == "cpu"
    with pytest.raises(ConfigError, match="nvJPEG"):
        decode_mode("gpu", "cuda")


def test_explicit_requests_on_cuda(nvjpeg: dict[str, bool]) -> None:
    assert decode_mode("gpu", "cuda") == "gpu"
    assert decode_mode("cpu", "cuda", 1e6) == "cpu"
    with pytest.raises(ConfigError, match="unknown decode mode"):
        decode_mode("nvdec", "cuda")


@pytest.mark.parametrize("skip_corrupt", [True, False])
def test_a_jpeg_whose_data_no_decoder_reads_is_skipped_like_on_the_cpu_path(tmp_path: Path, skip_corrupt: bool) -> None:
    """The workers check a JPEG's markers only; a file with intact markers and damaged data reaches the device decoder
    and its CPU fallback, and both fail. With skip_corrupt its row leaves the batch (labels and rows with it), as the
    CPU path drops it; without, the error names the file."""
    from fgvc.prefetch import Prefetcher, wait_prepared

    rng = np.random.default_rng(0)
    paths = []
    for i in range(3):
        path = tmp_path / f"img{i}.jpg"
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path, "JPEG")
        if i == 1:  # a damaged scan between intact start and end markers
            data = path.read_bytes()
            path.write_bytes(data[:400] + rng.integers(0, 255, 2000, dtype=np.uint8).tobytes() + b"\xff\xd9")
        paths.append(str(path))
    frame = pd.DataFrame({"path": paths, "label": [5, 6, 7]})
    loader = DataLoader(EncodedImageDataset(frame, skip_corrupt=skip_corrupt), batch_size=3, collate_fn=collate_encoded)
    prepare = GpuBatchPreparer("test", 32, MEAN, STD, "cpu", skip_corrupt=skip_corrupt)
    batches = Prefetcher(loader, prepare, torch.device("cpu"))
    if not skip_corrupt:
        with pytest.raises(CorruptImageError, match=r"img1\.jpg"):
            list(batches)
        return
    [(prepared, labels, rows)] = list(batches)
    assert rows.tolist() == [0, 2] and labels.tolist() == [5, 7]
    readable = collate_encoded([loader.dataset[0], loader.dataset[2]])[0]
    expected = GpuBatchPreparer("test", 32, MEAN, STD, "cpu")(readable)
    torch.testing.assert_close(wait_prepared(prepared), expected)
