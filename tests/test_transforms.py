"""Augmentations: sizes and crops computed by hand with cv2.resize and numpy slicing."""

from __future__ import annotations

import pickle

import cv2
import numpy as np
import pytest
import torch

from fgvc.data import TenCropNormalize, collate_tencrop
from fgvc.errors import ConfigError
from fgvc.transforms import TRANSFORM_KINDS, HorizontalShiftCrop, build_transform
from fgvc.transforms import test_resize_size as resize_size  # aliased so pytest does not collect it as a test


def pattern(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def hwc(tensor: torch.Tensor) -> np.ndarray:
    return tensor.permute(1, 2, 0).numpy()


def ten_views(images: list[torch.Tensor], res: int, channels_last: bool = True) -> torch.Tensor:
    """The ``(B, 10, 3, res, res)`` views fgvc makes of ``tencrop`` outputs, in 0..255 units (mean 0, std 1/255)."""
    batch, _labels, _rows = collate_tencrop([(image, 0, row) for row, image in enumerate(images)], res)
    return TenCropNormalize((0.0, 0.0, 0.0), (1 / 255,) * 3, "cpu", channels_last)(batch)


@pytest.mark.parametrize(
    ("res", "crop_pct", "expected"),
    [(224, 0.875, 256), (288, 0.9, 320), (384, 0.875, 438), (224, 1.0, 224), (15, 0.5, 30)],
)
def test_resize_size_is_floor_of_res_over_crop_pct(res: int, crop_pct: float, expected: int) -> None:
    assert resize_size(res, crop_pct) == expected


@pytest.mark.parametrize("crop_pct", [0.0, -0.5, 1.2])
def test_resize_size_rejects_crop_pct_outside_unit_interval(crop_pct: float) -> None:
    with pytest.raises(ConfigError, match="crop_pct"):
        resize_size(224, crop_pct)


@pytest.mark.parametrize("kind", TRANSFORM_KINDS)
@pytest.mark.parametrize("shape", [(40, 60), (60, 40), (9, 11)], ids=["landscape", "portrait", "tiny"])
def test_every_kind_gives_uint8_at_res(kind: str, shape: tuple[int, int]) -> None:
    out = build_transform(kind, 16, seed=0)(pattern(*shape))
    if kind == "tencrop":  # the test resize alone, HWC: the views are cut on the device
        assert out.shape[2] == 3 and min(out.shape[:2]) == resize_size(16, 0.875)
        assert (out.shape[0] > out.shape[1]) == (shape[0] > shape[1])
    else:
        assert out.shape == (3, 16, 16)
    assert out.dtype == torch.uint8
    assert int(out.max()) > 1  # raw 0..255 values, not scaled or normalised


@pytest.mark.parametrize("kind", ["test", "tencrop"])
def test_deterministic_kinds_keep_a_flat_image_flat(kind: str) -> None:
    out = build_transform(kind, 16)(np.full((30, 50, 3), 77, np.uint8))
    assert torch.equal(out, torch.full_like(out, 77))


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear", "area", "nearest"])
def test_test_is_shorter_side_resize_then_centre_crop(interpolation: str) -> None:
    image = pattern(20, 30)
    flag = {"bicubic": cv2.INTER_CUBIC, "bilinear": cv2.INTER_LINEAR, "area": cv2.INTER_AREA}.get(
        interpolation, cv2.INTER_NEAREST
    )
    # res 16 at crop_pct 0.5: shorter side (height 20) -> 32, width 30 -> 48; centre 16x16 at y 8, x 16
    expected = cv2.resize(image, (48, 32), interpolation=flag)[8:24, 16:32]
    transform = build_transform("test", 16, crop_pct=0.5, interpolation=interpolation)
    np.testing.assert_array_equal(hwc(transform(image)), expected)
    np.testing.assert_array_equal(hwc(transform(image)), expected)  # deterministic


def test_shrinking_averages_pixels_instead_of_aliasing() -> None:
    """Downscaling goes through INTER_AREA whatever the interpolation: fine stripes must become flat grey."""
    image = pattern(40, 60)
    expected = cv2.resize(image, (48, 32), interpolation=cv2.INTER_AREA)[8:24, 16:32]
    np.testing.assert_array_equal(hwc(build_transform("test", 16, crop_pct=0.5)(image)), expected)
    stripes = np.zeros((1200, 1600, 3), np.uint8)
    stripes[:, ::2] = 255  # one-pixel stripes: ideally flat ~128 after a 4.7x shrink
    out = hwc(build_transform("test", 224)(stripes)).astype(np.float32)
    aliased = cv2.resize(stripes, (341, 256), interpolation=cv2.INTER_CUBIC).astype(np.float32)
    assert aliased.std() > 60  # what plain bicubic makes of it
    assert out.std() < 20 and abs(out.mean() - 127.5) < 3


def test_test_resizes_width_of_a_portrait_image() -> None:
    """The reference code sets the height to the target; the shorter side (here the width) must be set instead."""
    image = pattern(60, 40)
    expected = cv2.resize(image, (32, 48), interpolation=cv2.INTER_AREA)[16:32, 8:24]
    out = build_transform("test", 16, crop_pct=0.5, interpolation="bilinear")(image)
    np.testing.assert_array_equal(hwc(out), expected)


def test_test_centre_offset_rounds_down() -> None:
    image = pattern(40, 60)
    # res 15 at 0.5: shorter side 40 -> 30, width 60 -> 45; offsets (30-15)//2 = 7 and (45-15)//2 = 15
    expected = cv2.resize(image, (45, 30), interpolation=cv2.INTER_AREA)[7:22, 15:30]
    np.testing.assert_array_equal(hwc(build_transform("test", 15, crop_pct=0.5)(image)), expected)


def test_crop_pct_one_crops_the_whole_shorter_side() -> None:
    image = pattern(16, 24)
    out = build_transform("test", 16, crop_pct=1.0, interpolation="nearest")(image)
    np.testing.assert_array_equal(hwc(out), image[:, 4:20])


def coded_image() -> np.ndarray:
    """32x64 binary image: white lines on rows 8 and 23 (the rows a 16-pixel centred crop starts and ends on),
    and rows 10..15 holding the 6 bits of each column's index, so any crop can be located after thresholding."""
    image = np.zeros((32, 64), np.uint8)
    image[[8, 23]] = 255
    columns = np.arange(64)
    for bit in range(6):
        image[10 + bit] = np.where((columns >> bit) & 1, 255, 0)
    return np.repeat(image[..., None], 3, axis=2)


def test_test2_shifts_horizontally_only_and_uniformly() -> None:
    image = coded_image()
    # res 16 at crop_pct 0.5: 32x64 resized to shorter side 32 is unchanged; valid x offsets are 0..48
    transform = build_transform("test2", 16, crop_pct=0.5, interpolation="nearest", seed=0)
    offsets, flips = [], []
    for _ in range(600):
        binary = hwc(transform(image))[..., 0] > 128  # colour jitter 0.05 cannot move a value across 128
        assert binary[0].all() and binary[15].all(), "a vertical shift moved the marker rows"
        assert not binary[[1, 8, 9, 14]].any()
        columns = sum(binary[2 + bit].astype(int) << bit for bit in range(6))
        steps = np.diff(columns)
        assert (steps == 1).all() or (steps == -1).all(), "the crop is not one contiguous 16-column window"
        flips.append(int(steps[0]) == -1)
        offsets.append(int(columns.min()))
    assert min(offsets) == 0 and max(offsets) == 48
    assert len(set(offsets)) >= 45  # 600 uniform draws over 49 offsets miss at most a few
    # flip and shift are independent draws: each half of the offset range sees both orientations about equally
    for half in (np.array(offsets) < 24, np.array(offsets) >= 24):
        assert 0.3 < np.array(flips)[half].mean() < 0.7


def test_horizontal_shift_crop_alone_keeps_rows() -> None:
    image = np.arange(20 * 30, dtype=np.uint8).reshape(20, 30, 1).repeat(3, axis=2)
    crop = HorizontalShiftCrop(10)
    for _ in range(50):
        out = crop(image=image)["image"]
        x = int(out[0, 0, 0]) - 5 * 30  # value = row * 30 + column; first row of the crop is row (20-10)//2 = 5
        np.testing.assert_array_equal(out, image[5:15, x : x + 10])


def test_tencrop_views_match_hand_crops() -> None:
    image = pattern(40, 60)
    resized = cv2.resize(image, (48, 32), interpolation=cv2.INTER_AREA)  # shorter side 40 -> 32 (shrink: area)
    tl, tr = resized[0:16, 0:16], resized[0:16, 32:48]
    bl, br = resized[16:32, 0:16], resized[16:32, 32:48]
    centre = resized[8:24, 16:32]
    five = [tl, tr, bl, br, centre]
    out = build_transform("tencrop", 16, crop_pct=0.5, interpolation="bilinear")(image)
    np.testing.assert_array_equal(out.numpy(), resized)
    # On the device: the five and their mirror images, channels first, as (x / 255 - mean) / std.
    for channels_last in (True, False):
        views = ten_views([out], 16, channels_last)[0]
        assert views.shape == (10, 3, 16, 16)
        assert views.is_contiguous(memory_format=torch.channels_last) == channels_last
        for i, view in enumerate(five + [view[:, ::-1] for view in five]):
            np.testing.assert_array_equal(hwc(views[i].round().to(torch.uint8)), view, err_msg=f"view {i}")


def test_tencrop_batch_of_mixed_sizes_cuts_each_image_in_its_own_frame() -> None:
    """Landscape, portrait and square images of different sizes share one padded batch; each image's views come
    from its own pixels at its own corners, and the padding never shows."""
    shapes = [(40, 60), (70, 36), (30, 30), (33, 50)]
    transform = build_transform("tencrop", 12, crop_pct=0.5)
    resized = [transform(pattern(*shape, seed=i)) for i, shape in enumerate(shapes)]
    views = ten_views(resized, 12).round().to(torch.uint8)
    assert views.shape == (len(shapes), 10, 3, 12, 12)
    for b, image in enumerate(resized):
        h, w = image.shape[:2]
        crops = [image[y : y + 12, x : x + 12] for y, x in
                 [(0, 0), (0, w - 12), (h - 12, 0), (h - 12, w - 12), ((h - 12) // 2, (w - 12) // 2)]]  # fmt: skip
        for i, crop in enumerate(crops + [crop.flip(1) for crop in crops]):
            np.testing.assert_array_equal(hwc(views[b, i]), crop.numpy(), err_msg=f"image {b}, view {i}")


def test_tencrop_collate_drops_unreadable_samples_and_keeps_their_rows_out() -> None:
    image = build_transform("tencrop", 8)(pattern(20, 30))
    batch, labels, rows = collate_tencrop([None, (image, 4, 7), None], 8)
    assert len(batch) == 1 and labels.tolist() == [4] and rows.tolist() == [7]
    assert tuple(image.shape) == (9, 14, 3)  # shorter side floor(8 / 0.875) = 9
    assert batch.offsets.tolist() == [[[0, 0], [0, 6], [1, 0], [1, 6], [0, 3]]]  # (top, left) of 8 px crops
    empty, labels, rows = collate_tencrop([None, None], 8)
    assert len(empty) == 0 and len(labels) == 0 and len(rows) == 0


def test_tencrop_centre_is_the_test_crop() -> None:
    image = pattern(45, 37)
    tencrop = build_transform("tencrop", 15, crop_pct=0.7)(image)
    single = build_transform("test", 15, crop_pct=0.7)(image)
    assert torch.equal(ten_views([tencrop], 15)[0, 4].round().to(torch.uint8), single)


def test_train_is_random_and_reproducible_by_seed() -> None:
    image = pattern(50, 70)
    first = build_transform("train", 24, seed=1)
    again = build_transform("train", 24, seed=1)
    other = build_transform("train", 24, seed=2)
    a, b, c = first(image), again(image), other(image)
    assert a.shape == (3, 24, 24)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(first(image), a)  # a new draw on every call


def test_reseed_restarts_the_stream() -> None:
    image = pattern(50, 70)
    transform = build_transform("train", 24, seed=5)
    outputs = [transform(image) for _ in range(3)]
    transform.reseed(5)
    assert all(torch.equal(transform(image), out) for out in outputs)


def test_seeded_steps_draw_different_numbers() -> None:
    """``Compose.set_random_seed`` hands every step the same seed, tying e.g. the flip to the crop; ours must not."""
    transform = build_transform("test2", 16, seed=0)
    for reseeded in (False, True):
        if reseeded:
            transform.reseed(7)
        draws = [step.py_random.random() for step in transform.pipeline.transforms]
        numpy_draws = [step.random_generator.random() for step in transform.pipeline.transforms]
        assert len(set(draws)) == len(draws) and len(set(numpy_draws)) == len(numpy_draws)


@pytest.mark.parametrize("kind", TRANSFORM_KINDS)
def test_transforms_pickle_for_worker_processes(kind: str) -> None:
    image = pattern(30, 40)
    transform = build_transform(kind, 16, seed=3)
    copy = pickle.loads(pickle.dumps(transform))
    assert torch.equal(copy(image), transform(image))


def test_unknown_kind_names_the_valid_ones() -> None:
    with pytest.raises(ConfigError, match="train, test, test2, tencrop"):
        build_transform("val", 224)


def test_unknown_interpolation_names_the_valid_ones() -> None:
    with pytest.raises(ConfigError, match="bicubic, bilinear, area, nearest"):
        build_transform("test", 224, interpolation="lanczos")


def test_the_eq5_defaults_are_the_scale_fgvc_trains_with() -> None:
    """`fgvc suggest-res` solves eq. 5 for the RandomResizedCrop range of the train transform (both CPU and GPU)."""
    import inspect

    from fgvc.engine.sweep import apparent_size_factor, suggest_test_res
    from fgvc.transforms import RRC_SCALE

    for function in (apparent_size_factor, suggest_test_res):
        assert inspect.signature(function).parameters["scale"].default == RRC_SCALE
