"""Train and test augmentations (albumentations on RGB uint8 arrays), returning uint8 CHW tensors.

Normalisation is left to the device (:func:`fgvc.data.normalize_on_device`): uint8 batches are 4x smaller to move and
the mean/std depend on the model, not on the data.

Kinds:
    train: RandomResizedCrop(scale 0.08-1, ratio 3/4-4/3) + horizontal flip + colour jitter 0.3 (the FixRes stage 1).
    test: resize the shorter side to ``floor(res / crop_pct)``, centre crop ``res`` (FixRes "test DA").
    test2: test + horizontal flip + colour jitter 0.05 + a random horizontal shift of the crop (FixRes "test DA2").
    tencrop: the test resize alone, as an ``(H, W, 3)`` image; its ten views are cut on the device
        (:func:`tencrop_offsets` says where, :class:`fgvc.data.TenCropNormalize` cuts them).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from typing import Any

import albumentations as A
import cv2
import numpy as np
import torch
from albumentations.augmentations.crops.transforms import BaseCrop
from albumentations.pytorch import ToTensorV2

from fgvc.errors import ConfigError

TRANSFORM_KINDS = ("train", "test", "test2", "tencrop")
INTERPOLATIONS = {
    "bicubic": cv2.INTER_CUBIC,
    "bilinear": cv2.INTER_LINEAR,
    "area": cv2.INTER_AREA,
    "nearest": cv2.INTER_NEAREST,
}
DOWNSCALE = "image"  # shrinking uses INTER_AREA: bicubic alone aliases fine texture (800 px photos -> 224..448 crops)
TRAIN_JITTER = 0.3
RRC_SCALE = (0.08, 1.0)  # RandomResizedCrop's area fraction; fgvc.engine.sweep's eq. 5 defaults (kept light) repeat it
RRC_RATIO = (3 / 4, 4 / 3)
TEST2_JITTER = 0.05

ImageTransformFn = Callable[[np.ndarray], torch.Tensor]


def tencrop_images_per_batch(batch_size: int) -> int:
    """Images in one 10-crop batch of ``batch_size`` views: an image's ten views go through the network together."""
    return max(1, batch_size // 10)


def test_resize_size(res: int, crop_pct: float) -> int:
    """Shorter side before the centre crop: ``floor(res / crop_pct)`` (256 for a 224 crop at 0.875), never below res."""
    if not 0 < crop_pct <= 1:
        raise ConfigError(f"crop_pct must be in (0, 1], got {crop_pct}; fix crop_pct in the recipe")
    return max(res, math.floor(res / crop_pct))


class HorizontalShiftCrop(BaseCrop):
    """Square crop of ``size`` centred vertically, at a uniformly random horizontal offset.

    FixRes test DA2 shifts the test crop sideways only; ``A.RandomCrop`` would also shift it vertically.
    """

    def __init__(self, size: int, p: float = 1.0):
        super().__init__(p=p)
        self.size = size

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        height, width = params["shape"][:2]
        if height < self.size or width < self.size:
            raise ValueError(
                f"HorizontalShiftCrop({self.size}) needs an image at least that large, got {height}x{width}"
            )
        y_min = (height - self.size) // 2  # the same centre as A.CenterCrop
        x_min = self.py_random.randint(0, width - self.size)
        return {"crop_coords": (x_min, y_min, x_min + self.size, y_min + self.size)}

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("size",)


class AlbumentationsTransform:
    """An albumentations pipeline as a plain ``image -> tensor`` callable that DataLoader workers can pickle."""

    def __init__(self, pipeline: A.Compose):
        self.pipeline = pipeline

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        return self.pipeline(image=image)["image"]

    def reseed(self, seed: int) -> None:
        """Give the pipeline a fresh random stream (forked DataLoader workers otherwise share one)."""
        _reseed(self.pipeline, seed)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.pipeline!r})"


class TenCrop:
    """The test resize alone, as one ``(H, W, 3)`` HWC uint8 tensor: the ten views are cut from it on the device.

    Why: the five crops of a 681 px ten-crop hold 2.9 times the pixels of the resized image they come from (7.0 MB
    against 2.4 MB from an 800x600 photo), and the workers' copy into them cost more than the resize itself. The image
    travels once; :func:`fgvc.data.collate_tencrop` pads a batch to its largest image and records where each crop
    starts (:func:`tencrop_offsets`), and :class:`fgvc.data.TenCropNormalize` cuts the five and their mirror images
    with one gather.
    """

    def __init__(self, res: int, resize: A.Compose):
        self.res = res
        self.resize = resize

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(self.resize(image=image)["image"]))

    def reseed(self, seed: int) -> None:
        """Deterministic; present so every transform answers the same calls."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(res={self.res}, resize={self.resize!r})"


def tencrop_offsets(heights: np.ndarray, widths: np.ndarray, res: int) -> np.ndarray:
    """``(B, 5, 2)`` top-left corners ``(top, left)`` of the five crops of side ``res`` in images of these sizes.

    The order is torchvision's ``TenCrop``: tl, tr, bl, br, centre (the mirror images follow in the same order). The
    centre rounds its offset down as ``A.CenterCrop`` does, so the centre view is the single-crop ``test`` input.
    """
    bottom, right = np.asarray(heights) - res, np.asarray(widths) - res
    zero = np.zeros_like(bottom)
    tops = np.stack([zero, zero, bottom, bottom, bottom // 2], axis=1)
    lefts = np.stack([zero, right, zero, right, right // 2], axis=1)
    return np.stack([tops, lefts], axis=2)


def build_transform(
    kind: str,
    res: int,
    crop_pct: float = 0.875,
    interpolation: str = "bicubic",
    seed: int | None = None,
) -> ImageTransformFn:
    """Build the ``kind`` transform at resolution ``res``: an RGB uint8 ``(H, W, 3)`` array -> uint8 tensor.

    Args:
        kind: one of :data:`TRANSFORM_KINDS`.
        res: output side in pixels.
        crop_pct: test crop side / resized shorter side (ignored by ``train``).
        interpolation: one of :data:`INTERPOLATIONS`.
        seed: seeds the random stream (None: a fresh one); DataLoader workers reseed it per worker anyway.

    Returns:
        A picklable callable giving ``(3, res, res)``, or for ``tencrop`` the resized ``(H, W, 3)`` image with
        ``min(H, W) >= res`` (see :class:`TenCrop`).
    """
    if kind not in TRANSFORM_KINDS:
        raise ConfigError(f"unknown transform '{kind}'; choose one of {', '.join(TRANSFORM_KINDS)}")
    if res < 1:
        raise ConfigError(f"resolution must be a positive number of pixels, not {res}")
    flag = _interpolation_flag(interpolation)
    if kind == "train":
        steps = _train_steps(res, flag)
    else:
        size = test_resize_size(res, crop_pct)
        steps = [A.SmallestMaxSize(max_size=size, interpolation=flag, area_for_downscale=DOWNSCALE)]
        if kind == "tencrop":
            return TenCrop(res, A.Compose(steps))
        steps += _test2_steps(res) if kind == "test2" else [A.CenterCrop(height=res, width=res)]
    pipeline = A.Compose([*steps, ToTensorV2()])
    if seed is not None:
        _reseed(pipeline, seed)
    return AlbumentationsTransform(pipeline)


def _train_steps(res: int, flag: int) -> list[A.BasicTransform]:
    return [
        A.RandomResizedCrop(
            size=(res, res), scale=RRC_SCALE, ratio=RRC_RATIO, interpolation=flag, area_for_downscale=DOWNSCALE
        ),
        A.HorizontalFlip(p=0.5),
        A.ColorJitter(brightness=TRAIN_JITTER, contrast=TRAIN_JITTER, saturation=TRAIN_JITTER, hue=0.0, p=1.0),
    ]


def _test2_steps(res: int) -> list[A.BasicTransform]:
    return [
        HorizontalShiftCrop(res),
        A.HorizontalFlip(p=0.5),
        A.ColorJitter(brightness=TEST2_JITTER, contrast=TEST2_JITTER, saturation=TEST2_JITTER, hue=0.0, p=1.0),
    ]


def _interpolation_flag(name: str) -> int:
    if name not in INTERPOLATIONS:
        raise ConfigError(f"unknown interpolation '{name}'; choose one of {', '.join(INTERPOLATIONS)}")
    return INTERPOLATIONS[name]


def _reseed(pipeline: A.Compose, seed: int) -> None:
    """One shared stream for the whole pipeline.

    ``Compose.set_random_seed`` would give every step its own copy of the same seed, so e.g. the flip and the crop
    would draw identical numbers; sharing one generator keeps the steps independent.
    """
    pipeline.set_random_state(np.random.default_rng(seed), random.Random(seed))
