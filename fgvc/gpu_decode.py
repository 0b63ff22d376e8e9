"""JPEG decoding and augmentation on the accelerator (``decode: gpu``), for models the CPU cannot feed.

Why: decoding and cropping an 800x600 JPEG costs one core about 3.5 ms (OpenCV), so 16 loader workers deliver about
4,000 img/s while a ResNet-50 at 224 trains at about 4,400 img/s on an H200; nvjpeg decodes about 10,000 img/s on the
device. Here the loader workers only read the file bytes, check the header and draw each sample's random numbers;
:class:`GpuBatchPreparer` decodes the whole batch with one ``torchvision.io.decode_jpeg`` call on the device, crops and
resizes every image with one ``roi_align`` call, and flips, colour-jitters and normalises the batch in a few
vectorised kernels.

Data flow::

    EncodedImageDataset (worker) -> collate_encoded -> (EncodedBatch, labels, rows)
    -> GpuBatchPreparer(batch) on the device -> normalised float (B, 3, res, res), channels_last

Payloads: a 1-D uint8 tensor holds JPEG bytes for the device decoder; a 3-D ``(H, W, 3)`` uint8 tensor is an image the
worker already decoded with :func:`fgvc.io.decode_image`, because the device decoder would reject it or give other
pixels (PNG/GIF named .jpg, CMYK or grayscale JPEGs, EXIF-rotated photos, truncated files; see
:func:`device_decodable`). Both kinds meet in one batch.

Randomness: each sample's augmentation is a pure function of its ``sample_seed`` (from
:class:`fgvc.engine.sampling.EpochSampler`): the worker expands the seed into :data:`N_DRAWS` uniform numbers and the
preparer maps them to crop boxes, flips and jitter factors with no per-sample loop. The same (row, seed) gives the same
crop whatever batch it lands in, so resumed runs see the same augmentations.

Resampling differs from the CPU path (OpenCV bicubic): every output pixel averages a ``ceil(scale) x ceil(scale)`` grid
of bilinear samples over its footprint, i.e. bilinear when enlarging and close to area averaging when shrinking. Use
the same decode mode for stage 2 and prediction, so the BN statistics re-estimated in stage 2 see the pixels that
prediction will see.
"""

from __future__ import annotations

import io
import itertools
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import cache, lru_cache
from pathlib import Path
from typing import Any, Literal, NamedTuple, get_args

import numpy as np
import torch
from PIL import ExifTags, Image
from torchvision.io import ImageReadMode, decode_jpeg, encode_jpeg
from torchvision.ops import roi_align

from fgvc.config import Decode
from fgvc.data import FrameFiles, normalize_on_device
from fgvc.errors import ConfigError, CorruptImageError
from fgvc.io import decode_image, is_complete_jpeg, read_image_bytes
from fgvc.prefetch import PreparedRows
from fgvc.transforms import (
    RRC_RATIO,
    RRC_SCALE,
    TEST2_JITTER,
    TRAIN_JITTER,
    TRANSFORM_KINDS,
    tencrop_offsets,
    test_resize_size,
)

log = logging.getLogger(__name__)

DecodeMode = Literal["cpu", "gpu"]
DECODE_MODES: tuple[str, ...] = get_args(Decode)
CPU_IMAGES_PER_S_PER_WORKER = 250.0  # decode + crop of an 800x600 JPEG with OpenCV on one core (289 measured)
REFERENCE_SOURCE_PIXELS = 800 * 600  # the image size that figure was measured on
DEFAULT_CANVAS_BYTES = 2 << 30  # scratch for one roi_align call (canvas + stacked images); more is split in chunks

RRC_ATTEMPTS = 10  # torchvision's RandomResizedCrop tries this many boxes before falling back to a centre crop
GRAY_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R BT.601 luma, what cv2.COLOR_RGB2GRAY and torchvision use

# Layout of a sample's uniform draws: every kind reads its own slots, so adding a kind never shifts another's numbers.
N_DRAWS = 32
DRAW_SCALE = slice(0, RRC_ATTEMPTS)  # RRC area fraction, one per attempt
DRAW_LOG_RATIO = slice(RRC_ATTEMPTS, 2 * RRC_ATTEMPTS)  # RRC log aspect ratio, one per attempt
DRAW_TOP, DRAW_LEFT = 20, 21  # RRC offsets
DRAW_FLIP = 22
DRAW_JITTER = slice(23, 26)  # brightness, contrast, saturation factors
DRAW_JITTER_ORDER = slice(26, 29)  # sort keys: the order the three adjustments are applied in
DRAW_SHIFT = 29  # test2's horizontal crop offset

_BRIGHTNESS, _CONTRAST, _SATURATION = 0, 1, 2


# ---------------------------------------------------------------------------------------------------------- worker side


class EncodedSample(NamedTuple):
    """One item of :class:`EncodedImageDataset`; ``payload`` is JPEG bytes (1-D) or a decoded ``(H, W, 3)`` image."""

    payload: torch.Tensor
    label: int
    row: int
    seed: int
    draws: torch.Tensor
    path: str


@dataclass
class EncodedBatch:
    """What the loader yields in place of an image tensor; :class:`GpuBatchPreparer` turns it into the model input.

    Attributes:
        payloads: per sample, JPEG bytes (1-D uint8) or a decoded ``(H, W, 3)`` uint8 image, all on the CPU.
        draws: ``(B, N_DRAWS)`` float64 uniform numbers, each row a function of that sample's seed.
        seeds: ``(B,)`` int64 sample seeds.
        rows: ``(B,)`` int64 rows of the index frame.
        paths: the image files, so a file the device decoder rejects can still be decoded on the CPU and named.
    """

    payloads: list[torch.Tensor]
    draws: torch.Tensor
    seeds: torch.Tensor
    rows: torch.Tensor
    paths: list[str]

    def __len__(self) -> int:
        return len(self.payloads)

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        """Cross a process boundary (loader worker -> main) with every payload's bytes in one flat tensor.

        Each tensor pickled by a DataLoader worker becomes its own shared-memory file with a descriptor and a handshake:
        a batch of 128 JPEGs would cost 128 of them (and thousands of open descriptors with 8 workers prefetching).
        """
        jpegs = [payload for payload in self.payloads if payload.dim() == 1]
        decoded = [payload for payload in self.payloads if payload.dim() != 1]
        flat = torch.cat([payload.reshape(-1) for payload in jpegs + decoded] or [torch.empty(0, dtype=torch.uint8)])
        shapes = [tuple(payload.shape) for payload in jpegs + decoded]
        is_jpeg = [payload.dim() == 1 for payload in self.payloads]
        return _rebuild_batch, (flat, shapes, is_jpeg, self.draws, self.seeds, self.rows, self.paths)

    def pin_memory(self) -> EncodedBatch:
        """Pin the decoded images so their copy to the device overlaps compute (the DataLoader calls this).

        JPEG bytes stay pageable: nvjpeg parses them on the host and stages them through its own pinned buffers.
        """
        payloads = [payload.pin_memory() if payload.dim() == 3 else payload for payload in self.payloads]
        return replace(self, payloads=payloads)


def _rebuild_batch(
    flat: torch.Tensor,
    shapes: list[tuple[int, ...]],
    is_jpeg: list[bool],
    draws: torch.Tensor,
    seeds: torch.Tensor,
    rows: torch.Tensor,
    paths: list[str],
) -> EncodedBatch:
    """Inverse of :meth:`EncodedBatch.__reduce__`: the payloads become views of the flat tensor, in their order."""
    parts = flat.split([math.prod(shape) for shape in shapes])
    # JPEG bytes are already 1-D: no per-payload call for them (this runs in the loader's thread, beside the steps)
    views = [part if len(shape) == 1 else part.view(shape) for part, shape in zip(parts, shapes, strict=True)]
    n_jpegs = sum(is_jpeg)
    jpegs, images = iter(views[:n_jpegs]), iter(views[n_jpegs:])
    payloads = [next(jpegs) if jpeg else next(images) for jpeg in is_jpeg]
    return EncodedBatch(payloads, draws, seeds, rows, paths)


def sample_draws(seed: int) -> torch.Tensor:
    """The :data:`N_DRAWS` uniform [0, 1) float64 numbers fixing one sample's augmentation; a function of seed alone."""
    generator = torch.Generator().manual_seed(int(seed))
    return torch.rand(N_DRAWS, generator=generator, dtype=torch.float64)


def device_decodable(data: bytes) -> bool:
    """Whether the device decoder gives this file the pixels :func:`fgvc.io.decode_image` would.

    True for complete, 8-bit, 3-component YCbCr JPEGs without an EXIF rotation. The rest are decoded on the CPU:
    other formats named .jpg, CMYK/YCCK JPEGs (nvjpeg cannot convert them), RGB-coded Adobe JPEGs, grayscale JPEGs
    (rare; kept on the reference decoder rather than trusting nvjpeg's gray-to-RGB output), EXIF-rotated photos (nvjpeg
    ignores the orientation OpenCV applies) and files that do not end with the end-of-image marker (fgvc.io's
    truncation policy decides those). Pillow parses only the header here, not the scan.
    """
    if not is_complete_jpeg(data):
        return False
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.format != "JPEG" or image.mode != "RGB" or image.info.get("adobe_transform") == 0:
                return False
            return image.getexif().get(ExifTags.Base.Orientation, 1) == 1
    except Exception:  # Pillow raises many exception types on malformed headers; all mean "let the CPU decide"
        return False


class EncodedImageDataset(FrameFiles):
    """File bytes of an index frame (columns ``path`` and ``label``) for decoding on the device.

    Keys are rows, or ``(row, sample_seed)`` from a seeded sampler. Without a seed the worker draws one from its own
    torch stream (DataLoader seeds each worker differently), so augmentations still differ between samples and epochs.
    """

    def __getitem__(self, key: int | tuple[int, int]) -> EncodedSample | None:
        """The sample, or None for an unreadable image when ``skip_corrupt`` (the collate drops it)."""
        if isinstance(key, tuple):
            index, seed = int(key[0]), int(key[1])
        else:
            index, seed = int(key), int(torch.randint(0, 2**31, ()).item())
        path = self.path(index)
        data = read_image_bytes(Path(path))
        if device_decodable(data):
            payload = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        else:
            image = self.decode(index)
            if image is None:
                return None
            payload = torch.from_numpy(image)
        return EncodedSample(payload, self.label(index), index, seed, sample_draws(seed), path)


def collate_encoded(samples: Sequence[EncodedSample | None]) -> tuple[EncodedBatch, torch.Tensor, torch.Tensor]:
    """Collate the readable samples as ``(EncodedBatch, int64 labels, int64 rows)``, the loops' ``(images, y, idx)``.

    Payloads differ in size, so they stay a list; the seeds and draws travel inside the batch object because the loops
    hand only their first item to ``prepare``.
    """
    kept = [sample for sample in samples if sample is not None]
    rows = torch.tensor([sample.row for sample in kept], dtype=torch.int64)
    batch = EncodedBatch(
        payloads=[sample.payload for sample in kept],
        draws=torch.stack([s.draws for s in kept]) if kept else torch.empty((0, N_DRAWS), dtype=torch.float64),
        seeds=torch.tensor([sample.seed for sample in kept], dtype=torch.int64),
        rows=rows,
        paths=[sample.path for sample in kept],
    )
    return batch, torch.tensor([sample.label for sample in kept], dtype=torch.int64), rows.clone()


# ---------------------------------------------------------------------------------------------- parameters (CPU, numpy)


def sample_rrc_boxes(
    heights: np.ndarray,
    widths: np.ndarray,
    draws: np.ndarray,
    scale: tuple[float, float] = RRC_SCALE,
    ratio: tuple[float, float] = RRC_RATIO,
) -> np.ndarray:
    """RandomResizedCrop boxes ``(B, 4)`` as ``x1, y1, x2, y2`` pixel edges, by torchvision's sampling rule.

    Up to :data:`RRC_ATTEMPTS` (area fraction, log aspect ratio) pairs are tried in order; the first box that fits is
    placed at a uniform integer offset. When none fits, the whole image is cropped to the nearest allowed aspect ratio,
    centred. All samples are drawn at once from their pre-drawn uniforms instead of in a Python loop.
    """
    h, w = heights.astype(np.float64), widths.astype(np.float64)
    area = (h * w)[:, None]
    target = area * (scale[0] + (scale[1] - scale[0]) * draws[:, DRAW_SCALE])
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = np.exp(log_lo + (log_hi - log_lo) * draws[:, DRAW_LOG_RATIO])
    cand_w = np.round(np.sqrt(target * aspect))  # half to even, as Python's round() in torchvision
    cand_h = np.round(np.sqrt(target / aspect))
    fits = (cand_w > 0) & (cand_w <= w[:, None]) & (cand_h > 0) & (cand_h <= h[:, None])
    first = fits.argmax(axis=1)
    found = fits.any(axis=1)
    pick = np.arange(len(h))
    box_w, box_h = cand_w[pick, first], cand_h[pick, first]
    top = np.floor(draws[:, DRAW_TOP] * (h - box_h + 1))
    left = np.floor(draws[:, DRAW_LEFT] * (w - box_w + 1))

    in_ratio = w / h
    fallback_w = np.where(in_ratio > ratio[1], np.round(h * ratio[1]), w)
    fallback_h = np.where(in_ratio < ratio[0], np.round(w / ratio[0]), h)
    box_w = np.where(found, box_w, fallback_w)
    box_h = np.where(found, box_h, fallback_h)
    top = np.where(found, top, (h - box_h) // 2)
    left = np.where(found, left, (w - box_w) // 2)
    return np.stack([left, top, left + box_w, top + box_h], axis=1)


def resize_crop_boxes(
    heights: np.ndarray,
    widths: np.ndarray,
    res: int,
    crop_pct: float,
    shift: np.ndarray | None = None,
) -> np.ndarray:
    """The test crop ``(B, 4)`` in source pixels: shorter side resized to ``floor(res / crop_pct)``, crop ``res``.

    Sizes and offsets are those of the CPU path (albumentations ``SmallestMaxSize`` rounds each side, ``CenterCrop``
    rounds the offset down), mapped back through the per-axis scale of the resized image so the same pixels are
    covered. With ``shift`` (test2) the horizontal offset is ``floor(shift * (W' - res + 1))`` instead of centred.
    """
    resized_h, resized_w, scale_y, scale_x = _test_resize(heights, widths, res, crop_pct)
    top = (resized_h - res) // 2
    left = (resized_w - res) // 2 if shift is None else np.floor(shift * (resized_w - res + 1))
    return np.stack([left * scale_x, top * scale_y, (left + res) * scale_x, (top + res) * scale_y], axis=1)


def tencrop_boxes(heights: np.ndarray, widths: np.ndarray, res: int, crop_pct: float) -> np.ndarray:
    """``(B, 5, 4)`` boxes of the four corner crops and the centre crop (tl, tr, bl, br, centre) of the test resize."""
    resized_h, resized_w, scale_y, scale_x = _test_resize(heights, widths, res, crop_pct)
    corners = tencrop_offsets(resized_h, resized_w, res)  # where the CPU path cuts them in the resized image
    tops, lefts = corners[..., 0], corners[..., 1]
    sy, sx = scale_y[:, None], scale_x[:, None]
    return np.stack([lefts * sx, tops * sy, (lefts + res) * sx, (tops + res) * sy], axis=2)


def _test_resize(
    heights: np.ndarray, widths: np.ndarray, res: int, crop_pct: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Resized sides as SmallestMaxSize computes them, and the source pixels per resized pixel along each axis."""
    h, w = heights.astype(np.float64), widths.astype(np.float64)
    scale = test_resize_size(res, crop_pct) / np.minimum(h, w)
    resized_h = np.maximum(1.0, np.round(h * scale))
    resized_w = np.maximum(1.0, np.round(w * scale))
    return resized_h, resized_w, h / resized_h, w / resized_w


@dataclass
class JitterParams:
    """Per-sample colour jitter: factors ``(B, 3)`` for brightness, contrast, saturation; ``order`` ``(B, 3)``."""

    factors: np.ndarray
    order: np.ndarray


def jitter_params(draws: np.ndarray, strength: float) -> JitterParams:
    """Factors uniform in ``[1 - strength, 1 + strength]`` and a uniformly random order, as ColorJitter draws them."""
    factors = 1.0 + strength * (2.0 * draws[:, DRAW_JITTER] - 1.0)
    return JitterParams(factors, np.argsort(draws[:, DRAW_JITTER_ORDER], axis=1))


def flip_flags(draws: np.ndarray) -> np.ndarray:
    """Horizontal flip with probability 0.5 per sample."""
    return draws[:, DRAW_FLIP] < 0.5


# ------------------------------------------------------------------------------------------------------- device side


class GpuBatchPreparer:
    """``EncodedBatch -> normalised float batch on the device``: the ``prepare`` the loops call, for ``decode: gpu``.

    Same contract as :class:`fgvc.data.OnDeviceNormalize`: ``(B, 3, res, res)`` float32, or ``(B, 10, 3, res, res)``
    for ``tencrop``, channels-last when asked. Kinds mirror :func:`fgvc.transforms.build_transform`:

    - train: RandomResizedCrop (scale 0.08-1, ratio 3/4-4/3), horizontal flip, colour jitter 0.3 in random order.
    - test: shorter side to ``floor(res / crop_pct)``, centre crop.
    - test2: test with a random horizontal crop offset, horizontal flip, colour jitter 0.05.
    - tencrop: the four corners and the centre of the test resize, then the same five mirrored.

    Args:
        canvas_bytes: most scratch memory for one crop-and-resize call (its float32 canvas and the stacked images that
            fill it); a batch of larger images is split into several calls (images of similar size together) instead
            of running out of memory.
    """

    def __init__(
        self,
        kind: str,
        res: int,
        mean: Sequence[float],
        std: Sequence[float],
        device: torch.device | str,
        crop_pct: float = 0.875,
        channels_last: bool = True,
        canvas_bytes: int = DEFAULT_CANVAS_BYTES,
        skip_corrupt: bool = False,
    ) -> None:
        if kind not in TRANSFORM_KINDS:
            raise ConfigError(f"unknown transform '{kind}'; choose one of {', '.join(TRANSFORM_KINDS)}")
        if res < 1:
            raise ConfigError(f"resolution must be a positive number of pixels, got {res}; fix the recipe")
        test_resize_size(res, crop_pct)  # validates crop_pct with the CPU path's message
        self.kind = kind
        self.res = res
        self.mean, self.std = tuple(mean), tuple(std)
        self.device = torch.device(device)
        self.crop_pct = crop_pct
        self.channels_last = channels_last
        self.canvas_bytes = canvas_bytes
        self.skip_corrupt = skip_corrupt

    def __call__(self, batch: EncodedBatch) -> torch.Tensor | PreparedRows:
        """The batch on the device; with ``skip_corrupt``, a file that passed the workers' check but that no decoder
        can read is dropped, and the result says which rows remain (:class:`fgvc.prefetch.PreparedRows`)."""
        decoded = decode_on_device(batch, self.device, self.skip_corrupt) if len(batch) else []
        images = [image for image in decoded if image is not None]
        if len(images) == len(batch):
            return self._prepare(images, batch.draws.numpy())
        kept = torch.tensor([image is not None for image in decoded], dtype=torch.bool)
        return PreparedRows(self._prepare(images, batch.draws.numpy()[kept.numpy()]), kept)

    def _prepare(self, images: list[torch.Tensor], draws: np.ndarray) -> torch.Tensor:
        if not images:
            views = (10,) if self.kind == "tencrop" else ()
            return torch.empty((0, *views, 3, self.res, self.res), dtype=torch.float32, device=self.device)
        heights = np.array([image.shape[1] for image in images], dtype=np.int64)
        widths = np.array([image.shape[2] for image in images], dtype=np.int64)
        if self.kind == "train":
            pixels = self._crop(images, sample_rrc_boxes(heights, widths, draws))
            pixels = self._flip_and_jitter(pixels, draws, TRAIN_JITTER)
        elif self.kind == "test2":
            boxes = resize_crop_boxes(heights, widths, self.res, self.crop_pct, shift=draws[:, DRAW_SHIFT])
            pixels = self._flip_and_jitter(self._crop(images, boxes), draws, TEST2_JITTER)
        elif self.kind == "tencrop":
            boxes = tencrop_boxes(heights, widths, self.res, self.crop_pct).reshape(-1, 4)
            views = self._crop(images, boxes, views=5).unflatten(0, (len(images), 5))
            pixels = torch.cat([views, views.flip(-1)], dim=1)
        else:
            pixels = self._crop(images, resize_crop_boxes(heights, widths, self.res, self.crop_pct))
        return normalize_on_device(pixels, self.mean, self.std, self.device, self.channels_last)

    def _crop(self, images: list[torch.Tensor], boxes: np.ndarray, views: int = 1) -> torch.Tensor:
        owners = np.repeat(np.arange(len(images)), views)
        return crop_resize(images, boxes, owners, self.res, self.canvas_bytes)

    def _flip_and_jitter(self, pixels: torch.Tensor, draws: np.ndarray, strength: float) -> torch.Tensor:
        flips = _to_device(torch.from_numpy(flip_flags(draws)), self.device).view(-1, 1, 1, 1)
        pixels = torch.where(flips, pixels.flip(-1), pixels)
        params = jitter_params(draws, strength)
        factors = _to_device(torch.from_numpy(params.factors).to(torch.float32), self.device)
        order = _to_device(torch.from_numpy(params.order), self.device)
        return color_jitter(pixels, factors, order)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(kind={self.kind!r}, res={self.res}, device={str(self.device)!r})"


def decode_on_device(
    batch: EncodedBatch, device: torch.device, skip_corrupt: bool = False
) -> list[torch.Tensor | None]:
    """Every payload as a ``(3, H, W)`` uint8 tensor on ``device``; the JPEGs in one batched decoder call.

    nvjpeg returns nothing when any image of a batch fails, so a failed batch is retried image by image, and an image
    the device decoder still rejects is decoded on the CPU by :func:`fgvc.io.decode_image` from its path, which raises
    :class:`CorruptImageError` naming the file if nothing can read it (its slot is None instead with ``skip_corrupt``:
    the workers check only a JPEG's markers, so a file with damaged data gets this far).
    """
    decoded: list[torch.Tensor | None] = [None] * len(batch)
    jpeg_slots = [i for i, payload in enumerate(batch.payloads) if payload.dim() == 1]
    if jpeg_slots:
        try:
            jpegs: list[torch.Tensor | None] = list(_decode_jpegs([batch.payloads[i] for i in jpeg_slots], device))
        except RuntimeError:
            jpegs = [_decode_one(batch.payloads[i], batch.paths[i], device, skip_corrupt) for i in jpeg_slots]
        for slot, image in zip(jpeg_slots, jpegs, strict=True):
            decoded[slot] = image
    for slot, payload in enumerate(batch.payloads):
        if payload.dim() == 3:
            decoded[slot] = _to_device(payload, device).permute(2, 0, 1)
    return decoded


def _decode_jpegs(payloads: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """One batched ``decode_jpeg`` call; on CUDA it runs on a stream of its own.

    torchvision allocates the outputs on the current stream but nvjpeg writes them from its own stream, without waiting
    for the kernels already queued there (pytorch/vision#9606). Allocated on a side stream, the outputs cannot reuse
    memory those kernels still read, so the decode may overlap the previous training step instead of waiting for it.
    """
    if device.type != "cuda":
        return decode_jpeg(payloads, mode=ImageReadMode.RGB, device=device)
    main = torch.cuda.current_stream(device)
    side = _side_stream(main.device)
    with torch.cuda.stream(side):
        images = decode_jpeg(payloads, mode=ImageReadMode.RGB, device=device)
    main.wait_stream(side)
    for image in images:
        image.record_stream(main)  # freed only once the work queued on the main stream is done with it
    return images


@cache
def _side_stream(device: torch.device) -> torch.cuda.Stream:
    return torch.cuda.Stream(device)


def _decode_one(payload: torch.Tensor, path: str, device: torch.device, skip_corrupt: bool) -> torch.Tensor | None:
    try:
        return _decode_jpegs([payload], device)[0]
    except RuntimeError as err:
        log.warning("device JPEG decoder rejected %s (%s); decoding it on the CPU", path, err)
    try:
        image = decode_image(path)
    except CorruptImageError:
        if not skip_corrupt:
            raise
        log.warning("skipping unreadable image %s", path)
        return None
    return _to_device(torch.from_numpy(image), device).permute(2, 0, 1)


def crop_resize(
    images: Sequence[torch.Tensor],
    boxes: np.ndarray,
    owners: np.ndarray,
    res: int,
    canvas_bytes: int = DEFAULT_CANVAS_BYTES,
) -> torch.Tensor:
    """Crop ``boxes`` (``x1, y1, x2, y2`` pixel edges) out of ``images[owners]`` and resize each to ``res x res``.

    The images (``(3, H, W)`` uint8, one device) are padded into one float canvas by repeating their last column and
    row, so a crop touching an image's right or bottom edge sees that edge, not the padding, and a crop's pixels do
    not depend on its batch mates. ``roi_align`` (``aligned=True``: pixel i covers [i, i + 1), as in OpenCV) then
    averages ``ceil(box / res)`` bilinear samples per output pixel and axis, for all boxes in one call. The canvas is
    filled shape by shape (up to three copies for all the images of one size), so a batch of photos from a few
    cameras costs a few calls, not one per image: this runs in a thread beside the training steps, and every call it
    makes competes with their kernel launches for the interpreter.

    Returns:
        ``(len(boxes), 3, res, res)`` float32 in 0..255 units.
    """
    device = images[0].device
    heights = np.array([image.shape[1] for image in images], dtype=np.int64)
    widths = np.array([image.shape[2] for image in images], dtype=np.int64)
    out: torch.Tensor | None = None
    # a chunk's float canvas, plus the stacked copy of its images that fills it one shape at a time
    bytes_per_pixel = 4 + images[0].element_size()
    for chunk in _canvas_chunks(heights, widths, canvas_bytes, bytes_per_pixel):
        chunk = chunk[np.lexsort((widths[chunk], heights[chunk]))]  # equal shapes side by side in the canvas
        selected = np.flatnonzero(np.isin(owners, chunk))
        slot_of = np.full(len(images), -1, dtype=np.int64)
        slot_of[chunk] = np.arange(len(chunk))
        rois = np.concatenate([slot_of[owners[selected], None], boxes[selected]], axis=1)
        canvas = _padded_canvas([images[i] for i in chunk], device)
        rgb = roi_align(
            canvas,
            _to_device(torch.from_numpy(rois).to(torch.float32), device),
            output_size=(res, res),
            spatial_scale=1.0,
            sampling_ratio=-1,  # per box: ceil(box side / res) samples per output pixel, so shrinking averages
            aligned=True,
        )
        if len(selected) == len(boxes):  # one chunk (the usual case): already in box order
            return rgb
        if out is None:
            out = torch.empty((len(boxes), 3, res, res), dtype=torch.float32, device=device)
        out.index_copy_(0, _to_device(torch.from_numpy(selected), device), rgb)
    if out is None:
        raise ValueError("crop_resize needs at least one image and one box")
    return out


def _canvas_chunks(
    heights: np.ndarray, widths: np.ndarray, canvas_bytes: int, bytes_per_pixel: int
) -> list[np.ndarray]:
    """Image indices grouped so that each group's padded canvas (``bytes_per_pixel`` per padded pixel and channel) fits
    ``canvas_bytes``, at least one image each.

    Images are taken smallest first, so a few large images do not inflate the padding of all the small ones.
    """
    per_image = 3 * bytes_per_pixel
    if len(heights) * per_image * int(heights.max()) * int(widths.max()) <= canvas_bytes:  # usual: one canvas
        return [np.arange(len(heights))]
    chunks: list[list[int]] = []
    max_h = max_w = 0
    for index in np.argsort(heights * widths, kind="stable"):
        grown_h, grown_w = max(max_h, heights[index]), max(max_w, widths[index])
        if chunks and (len(chunks[-1]) + 1) * per_image * grown_h * grown_w <= canvas_bytes:
            chunks[-1].append(int(index))
            max_h, max_w = grown_h, grown_w
        else:
            chunks.append([int(index)])
            max_h, max_w = heights[index], widths[index]
    return [np.sort(np.array(chunk, dtype=np.int64)) for chunk in chunks]


def _padded_canvas(images: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor:
    """``(N, 3, Hmax, Wmax)`` float32 holding the images, each padded by repeating its last column and last row.

    Consecutive images of one shape are stacked and copied together.
    """
    max_h = max(image.shape[1] for image in images)
    max_w = max(image.shape[2] for image in images)
    canvas = torch.empty((len(images), 3, max_h, max_w), dtype=torch.float32, device=device)
    start = 0
    for (height, width), same_shape in itertools.groupby(images, key=lambda image: tuple(image.shape[1:])):
        group = list(same_shape)
        block = canvas[start : start + len(group)]
        start += len(group)
        stacked = torch.stack(group) if len(group) > 1 else group[0].unsqueeze(0)
        block[:, :, :height, :width].copy_(stacked)
        if width < max_w:
            block[:, :, :height, width:].copy_(stacked[:, :, :, width - 1 :])  # broadcast along the padding
        if height < max_h:
            block[:, :, height:].copy_(block[:, :, height - 1 : height])
    return canvas


def color_jitter(pixels: torch.Tensor, factors: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Brightness, contrast and saturation adjustments on a ``(B, 3, H, W)`` 0..255 batch, per-sample factors and order.

    Each adjustment blends the image with a target, ``x * f + target * (1 - f)``, clipped to 0..255 like the uint8 CPU
    path: black for brightness, the mean luma for contrast, the per-pixel luma for saturation (torchvision's and
    albumentations' definitions). Step k applies adjustment ``order[:, k]`` to every sample at once.

    Args:
        factors: ``(B, 3)`` brightness, contrast, saturation factors.
        order: ``(B, 3)`` permutations of ``0, 1, 2``.
    """
    weights = torch.tensor(GRAY_WEIGHTS, dtype=pixels.dtype, device=pixels.device).view(1, 3, 1, 1)
    for step in range(3):
        op = order[:, step]
        factor = factors.gather(1, op.view(-1, 1)).view(-1, 1, 1, 1)
        luma = (pixels * weights).sum(dim=1, keepdim=True)
        op = op.view(-1, 1, 1, 1)
        target = torch.where(op == _SATURATION, luma, luma.mean(dim=(2, 3), keepdim=True))
        target = torch.where(op == _BRIGHTNESS, torch.zeros_like(target), target)
        pixels = (pixels * factor + target * (1.0 - factor)).clamp_(0.0, 255.0)
    return pixels


def _to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy a CPU tensor to ``device`` without stalling the host: pinned first, so the copy is truly asynchronous."""
    if device.type != "cuda":
        return tensor.to(device)
    if not tensor.is_pinned():
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


# ---------------------------------------------------------------------------------------------------------- choosing


@lru_cache(maxsize=8)
def gpu_decode_available(device: torch.device) -> bool:
    """Whether this torchvision decodes JPEGs on ``device`` (a CUDA build with nvjpeg); probed once with a tiny JPEG."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    probe = encode_jpeg(torch.zeros((3, 16, 16), dtype=torch.uint8))
    try:
        decode_jpeg([probe], mode=ImageReadMode.RGB, device=device)
    except RuntimeError as err:
        log.info("JPEG decoding on %s is unavailable: %s", device, err)
        return False
    return True


def cpu_decode_images_per_s(workers: int, source_pixels: float | None = None) -> float:
    """Estimated images/s the loader workers decode and augment on the CPU.

    :data:`CPU_IMAGES_PER_S_PER_WORKER` per worker (the main process counts as one when ``workers`` is 0), scaled by
    :data:`REFERENCE_SOURCE_PIXELS` / ``source_pixels`` since decoding time grows with the stored image's pixel count.
    """
    per_worker = CPU_IMAGES_PER_S_PER_WORKER
    if source_pixels is not None:
        per_worker *= REFERENCE_SOURCE_PIXELS / source_pixels
    return max(workers, 1) * per_worker


def decode_mode(
    requested: str,
    device: torch.device | str,
    model_images_per_s_estimate: float | None = None,
    workers: int = 0,
    source_pixels: float | None = None,
) -> DecodeMode:
    """Where to decode JPEGs: ``requested`` ("cpu", "gpu" or "auto") resolved for ``device``.

    Rules:
        - "cpu", and any request on a non-CUDA device, gives "cpu" (the device decoder needs CUDA).
        - "gpu" on CUDA gives "gpu"; a torchvision without nvjpeg is a :class:`ConfigError`.
        - "auto" gives "gpu" only on CUDA, with nvjpeg, when the model's step throughput (images/s per process,
          measured or from the method notes) exceeds :func:`cpu_decode_images_per_s`: the CPU would be the
          bottleneck. Without an estimate it stays on the CPU path, whose pixels are the reference.
    """
    if requested not in DECODE_MODES:
        raise ConfigError(f"unknown decode mode '{requested}'; choose one of {', '.join(DECODE_MODES)}")
    device = torch.device(device)
    if requested == "cpu":
        return "cpu"
    if device.type != "cuda":
        if requested == "gpu":
            log.warning("decode=gpu needs a CUDA device; decoding on the CPU on %s", device)
        return "cpu"
    available = gpu_decode_available(device)
    if requested == "gpu":
        if not available:
            raise ConfigError(
                f"decode=gpu: this torchvision cannot decode JPEGs on {device} (built without nvJPEG); "
                "set data.decode to cpu or auto in the recipe"
            )
        return "gpu"
    if not available or model_images_per_s_estimate is None:
        return "cpu"
    cpu_rate = cpu_decode_images_per_s(workers, source_pixels)
    return "gpu" if model_images_per_s_estimate > cpu_rate else "cpu"
