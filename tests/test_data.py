"""Dataset + loader over real JPEGs on disk, skipping corrupt files, and the on-device normalisation."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from fgvc.data import (
    ImageDataset,
    TenCropBatch,
    TenCropNormalize,
    build_loader,
    collate_skip_none,
    collate_tencrop,
    normalize_on_device,
)
from fgvc.errors import CorruptImageError
from fgvc.transforms import build_transform

RES = 16
COLOURS = [(200, 20, 20), (20, 200, 20), (20, 20, 200), (200, 200, 20), (20, 200, 200), (200, 20, 200), (90, 90, 90)]


pytestmark = pytest.mark.usefixtures("one_thread")  # single-threaded torch: see conftest.py


@pytest.fixture
def image_frame(tmp_path: Path) -> pd.DataFrame:
    """Seven flat-colour JPEGs (24x32); label = colour index % 3."""
    paths = []
    for i, colour in enumerate(COLOURS):
        path = tmp_path / f"img_{i}.jpg"
        Image.new("RGB", (32, 24), colour).save(path, "JPEG", quality=95)
        paths.append(str(path))
    return pd.DataFrame({"path": paths, "label": [i % 3 for i in range(len(paths))], "image_id": range(len(paths))})


def with_corrupt_file(frame: pd.DataFrame, tmp_path: Path) -> tuple[pd.DataFrame, int]:
    """Append a JPEG cut in half; return the frame and the corrupt row."""
    data = Path(frame["path"][0]).read_bytes()
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(data[: len(data) // 2])
    row = len(frame)
    extra = pd.DataFrame({"path": [str(broken)], "label": [1], "image_id": [row]})
    return pd.concat([frame, extra], ignore_index=True), row


def collect(loader) -> tuple[list[torch.Tensor], np.ndarray, np.ndarray]:
    images, labels, rows = [], [], []
    for batch_images, batch_labels, batch_rows in loader:
        assert batch_images.dtype == torch.uint8
        assert batch_labels.dtype == torch.int64 and batch_rows.dtype == torch.int64
        images.append(batch_images)
        labels.append(batch_labels.numpy())
        rows.append(batch_rows.numpy())
    return images, np.concatenate(labels), np.concatenate(rows)


def test_item_is_image_label_row(image_frame: pd.DataFrame) -> None:
    dataset = ImageDataset(image_frame, build_transform("test", RES))
    image, label, row = dataset[4]
    assert len(dataset) == 7
    assert image.shape == (3, RES, RES) and image.dtype == torch.uint8
    assert (label, row) == (1, 4)
    assert isinstance(label, int)
    assert np.abs(image[:, 8, 8].numpy().astype(int) - np.array(COLOURS[4])).max() <= 8


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_covers_every_row_once(image_frame: pd.DataFrame, workers: int) -> None:
    loader = build_loader(ImageDataset(image_frame, build_transform("test", RES)), 3, shuffle=True, workers=workers)
    images, labels, rows = collect(loader)
    assert [tuple(batch.shape) for batch in images] == [(3, 3, RES, RES), (3, 3, RES, RES), (1, 3, RES, RES)]
    assert sorted(rows) == list(range(7))
    np.testing.assert_array_equal(labels, image_frame["label"].to_numpy()[rows])
    centres = torch.cat(images)[:, :, 8, 8].numpy().astype(int)
    assert np.abs(centres - np.array(COLOURS)[rows]).max() <= 8  # each image travels with its own row


@pytest.mark.parametrize("workers", [0, 2])
def test_tencrop_batches_carry_each_image_once_with_its_crop_corners(
    image_frame: pd.DataFrame, tmp_path: Path, workers: int
) -> None:
    """The loader ships the resized image (padded to the batch's largest), not the five crops; a portrait image in a
    batch of landscape ones keeps its own size and corners, also through a worker's shared memory."""
    portrait = tmp_path / "portrait.jpg"
    Image.new("RGB", (24, 40), (10, 120, 240)).save(portrait, "JPEG", quality=95)
    frame = pd.concat([image_frame, pd.DataFrame({"path": [str(portrait)], "label": [0], "image_id": [7]})],
                      ignore_index=True)  # fmt: skip
    collate = partial(collate_tencrop, res=RES)
    dataset = ImageDataset(frame, build_transform("tencrop", RES))
    batches = list(build_loader(dataset, 4, shuffle=False, workers=workers, collate_fn=collate))
    assert [type(batch) for batch, _, _ in batches] == [TenCropBatch, TenCropBatch]
    assert [tuple(batch.images.shape) for batch, _, _ in batches] == [(4, 18, 24, 3), (4, 30, 24, 3)]
    assert [rows.tolist() for _, _, rows in batches] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    last, _, _ = batches[1]
    assert last.offsets[3].tolist() == [[0, 0], [0, 2], [14, 0], [14, 2], [7, 1]]  # the 30 x 18 portrait
    assert last.offsets[0].tolist() == [[0, 0], [0, 8], [2, 0], [2, 8], [1, 4]]  # an 18 x 24 landscape
    centre = last.images[3, 7 : 7 + RES, 1 : 1 + RES].reshape(-1, 3).float().mean(0)
    assert (centre - torch.tensor([10.0, 120.0, 240.0])).abs().max() <= 8  # the portrait's own pixels


def test_drop_last_drops_the_short_batch(image_frame: pd.DataFrame) -> None:
    dataset = ImageDataset(image_frame, build_transform("test", RES))
    _, _, rows = collect(build_loader(dataset, 3, shuffle=False, workers=0, drop_last=True))
    assert list(rows) == list(range(6))


def test_shuffle_order_follows_the_seed(image_frame: pd.DataFrame) -> None:
    dataset = ImageDataset(image_frame, build_transform("test", RES))

    def order(seed: int) -> list[int]:
        return list(collect(build_loader(dataset, 7, shuffle=True, workers=0, seed=seed))[2])

    assert order(3) == order(3)
    assert order(3) != order(4)
    assert list(collect(build_loader(dataset, 7, shuffle=False, workers=0))[2]) == list(range(7))


@pytest.mark.parametrize("workers", [0, 2])
def test_skip_corrupt_drops_the_file_and_the_count_shows(
    image_frame: pd.DataFrame, tmp_path: Path, workers: int
) -> None:
    frame, bad_row = with_corrupt_file(image_frame, tmp_path)
    dataset = ImageDataset(frame, build_transform("test", RES), skip_corrupt=True)
    assert dataset[bad_row] is None
    _, _, rows = collect(build_loader(dataset, 4, shuffle=False, workers=workers))
    assert len(dataset) - len(rows) == 1
    assert sorted(rows) == list(range(7))


@pytest.mark.parametrize("workers", [0, 2])
def test_corrupt_file_error_names_it(image_frame: pd.DataFrame, tmp_path: Path, workers: int) -> None:
    frame, _ = with_corrupt_file(image_frame, tmp_path)
    loader = build_loader(ImageDataset(frame, build_transform("test", RES)), 4, shuffle=False, workers=workers)
    try:
        collect(loader)
    except CorruptImageError as err:
        message = str(err)
        # torch re-raises a worker's error from a frame that the traceback keeps alive, so the loader would only be
        # freed by the cyclic GC, whose shutdown waits 5 s per worker; dropping the traceback frees it at once.
        err.__traceback__ = None
    else:
        pytest.fail("a corrupt image without skip_corrupt must raise")
    assert "broken.jpg" in message
    assert "\n" not in message and message.startswith(str(tmp_path))  # a library caller gets the one line too


def test_collate_of_only_unreadable_items_is_empty() -> None:
    images, labels, rows = collate_skip_none([None, None])
    assert images.numel() == labels.numel() == rows.numel() == 0
    assert (images.dtype, labels.dtype, rows.dtype) == (torch.uint8, torch.int64, torch.int64)


def test_collate_keeps_the_readable_items() -> None:
    first = (torch.zeros(3, 2, 2, dtype=torch.uint8), 5, 0)
    third = (torch.ones(3, 2, 2, dtype=torch.uint8), 7, 2)
    images, labels, rows = collate_skip_none([first, None, third])
    assert images.shape == (2, 3, 2, 2)
    assert labels.tolist() == [5, 7] and rows.tolist() == [0, 2]


def noise_frame(tmp_path: Path, rows: int) -> pd.DataFrame:
    """One noisy JPEG repeated: every difference between items then comes from the augmentation."""
    path = tmp_path / "noise.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(path)
    return pd.DataFrame({"path": [str(path)] * rows, "label": [0] * rows})


def test_workers_augment_differently_and_reproducibly(tmp_path: Path) -> None:
    """Forked workers inherit one albumentations state; without per-worker reseeding they would augment alike."""
    dataset = ImageDataset(noise_frame(tmp_path, 4), build_transform("train", RES))

    def run() -> torch.Tensor:
        return torch.cat(collect(build_loader(dataset, 1, shuffle=False, workers=2, seed=11))[0])

    first = run()
    assert not torch.equal(first[0], first[1])  # rows 0 and 1 come from different workers
    assert torch.equal(first, run())


def test_sample_seed_key_fixes_the_augmentation(tmp_path: Path) -> None:
    dataset = ImageDataset(noise_frame(tmp_path, 3), build_transform("train", RES))
    image, _, row = dataset[(2, 42)]
    assert row == 2
    assert torch.equal(dataset[(2, 42)][0], image)
    assert torch.equal(dataset[(0, 42)][0], image)  # the seed alone decides the augmentation
    assert not torch.equal(dataset[(2, 43)][0], image)


class PairSampler:
    """A minimal seeded sampler: fixed ``(row, seed)`` pairs."""

    def __init__(self, rows: int) -> None:
        self.rows = rows

    def __iter__(self):
        return iter([(row, 1000 + 7 * row) for row in reversed(range(self.rows))])

    def __len__(self) -> int:
        return self.rows


def test_seeded_sampler_batches_do_not_depend_on_workers(tmp_path: Path) -> None:
    dataset = ImageDataset(noise_frame(tmp_path, 5), build_transform("train", RES))
    runs = {}
    for workers in (0, 2):
        images, _, rows = collect(build_loader(dataset, 2, workers=workers, sampler=PairSampler(5)))
        assert list(rows) == [4, 3, 2, 1, 0]
        runs[workers] = torch.cat(images)
    assert torch.equal(runs[0], runs[2])
    assert not torch.equal(runs[0][0], runs[0][1])


def test_callers_sampler_excludes_shuffle(image_frame: pd.DataFrame) -> None:
    dataset = ImageDataset(image_frame, build_transform("test", RES))
    with pytest.raises(ValueError, match="sampler"):
        build_loader(dataset, 2, shuffle=True, sampler=PairSampler(len(image_frame)))


MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def expected_normalised(images: torch.Tensor, mean=MEAN, std=STD) -> np.ndarray:
    """The same formula in float64 numpy, channel axis third from the end."""
    x = images.numpy().astype(np.float64) / 255.0
    shape = (3, 1, 1)
    return (x - np.array(mean).reshape(shape)) / np.array(std).reshape(shape)


def test_normalize_4d_matches_numpy() -> None:
    images = torch.randint(0, 256, (2, 3, 5, 7), dtype=torch.uint8)
    out = normalize_on_device(images, MEAN, STD, "cpu")
    assert out.dtype == torch.float32 and out.shape == images.shape
    assert out.is_contiguous(memory_format=torch.channels_last)
    np.testing.assert_allclose(out.numpy(), expected_normalised(images), rtol=0, atol=1e-5)


def test_normalize_5d_keeps_views_and_flattens_to_channels_last() -> None:
    images = torch.randint(0, 256, (2, 10, 3, 4, 6), dtype=torch.uint8)
    out = normalize_on_device(images, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "cpu")
    assert out.shape == images.shape
    assert out.flatten(0, 1).is_contiguous(memory_format=torch.channels_last)
    expected = expected_normalised(images, (0.5,) * 3, (0.5,) * 3)
    np.testing.assert_allclose(out.numpy(), expected, rtol=0, atol=1e-5)


def test_normalize_without_channels_last_and_in_bfloat16() -> None:
    images = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    out = normalize_on_device(images, MEAN, STD, torch.device("cpu"), channels_last=False, dtype=torch.bfloat16)
    assert out.dtype == torch.bfloat16 and out.is_contiguous()
    np.testing.assert_allclose(out.float().numpy(), expected_normalised(images), rtol=1e-2, atol=1e-2)


def test_normalize_rejects_a_batch_without_three_channels() -> None:
    with pytest.raises(ValueError, match="shape"):
        normalize_on_device(torch.zeros(2, 4, 3, 3, dtype=torch.uint8), MEAN, STD, "cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run by benchmarks/run_on_gpu.sh)")
def test_on_cuda_tencrop_views_equal_the_cpu_ones() -> None:
    """The gather that cuts the ten views runs on the device: from pinned memory, for a batch of mixed sizes, it must
    give what the CPU gives (tests/test_transforms.py checks the CPU against crops cut by hand)."""
    generator = torch.Generator().manual_seed(0)
    shapes = [(18, 24), (30, 18), (18, 18)]
    images = [torch.randint(0, 256, (*shape, 3), dtype=torch.uint8, generator=generator) for shape in shapes]
    batch, _, _ = collate_tencrop([(image, 0, row) for row, image in enumerate(images)], RES)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    on_cpu = TenCropNormalize(mean, std, "cpu")(batch)
    samples = [(image, 0, row) for row, image in enumerate(images)]
    [pinned] = [images for images, _, _ in build_loader(samples, 3, collate_fn=partial(collate_tencrop, res=RES))]
    assert pinned.images.is_pinned() and pinned.offsets.is_pinned()  # by the loader, so the copies are asynchronous
    on_cuda = TenCropNormalize(mean, std, "cuda")(pinned)
    assert on_cuda.flatten(0, 1).is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(on_cuda.cpu(), on_cpu)
