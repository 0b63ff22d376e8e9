"""Torch dataset over an index frame, the loader factory, and the on-device normalisation; no model knowledge.

Batches travel as uint8 (4x less to decode, pin and copy than float32); :func:`normalize_on_device` turns them into
normalised floats on the accelerator.
"""

from __future__ import annotations

import atexit
import logging
import math
import multiprocessing
import os
import random
import signal
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate, get_worker_info

from fgvc.errors import CorruptImageError
from fgvc.io import decode_image, disable_opencv_threads
from fgvc.transforms import tencrop_offsets

# The signals that stop training with a checkpoint (the loop) and that loader workers ignore until then; SIGHUP is a
# closed terminal. Windows has only SIGINT and SIGTERM.
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))

log = logging.getLogger(__name__)

Sample = tuple[torch.Tensor, int, int]
Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
PREFETCH_FACTOR = 4  # batches each worker keeps ready; decoding time varies a lot between images


class FrameFiles(Dataset):
    """The image files of an index frame (columns ``path`` and ``label``) and the corrupt-image policy.

    Shared by :class:`ImageDataset` and :class:`fgvc.gpu_decode.EncodedImageDataset`, so both treat an unreadable file
    the same way: an error naming it, or (``skip_corrupt``) a warning and None, which the collate drops.
    """

    def __init__(self, frame: pd.DataFrame, skip_corrupt: bool = False):
        # numpy arrays, not lists: a forked worker that touches a list's str objects (their reference counts) gets a
        # private copy of every page it touches, ~67 MB per worker per million images by the end of an epoch.
        self._paths = np.array([os.fsencode(path) for path in frame["path"].astype(str)], dtype=np.bytes_)
        self._labels = frame["label"].to_numpy(dtype=np.int64)
        self.skip_corrupt = skip_corrupt

    def __len__(self) -> int:
        return len(self._paths)

    def path(self, index: int) -> str:
        return os.fsdecode(self._paths[index])

    def label(self, index: int) -> int:
        return int(self._labels[index])

    def decode(self, index: int) -> np.ndarray | None:
        """The RGB image of row ``index``, or None when it is unreadable and ``skip_corrupt`` is set."""
        try:
            return decode_image(self.path(index))
        except CorruptImageError:
            if not self.skip_corrupt:
                raise
            log.warning("skipping unreadable image %s", self.path(index))
            return None


class ImageDataset(FrameFiles):
    """Decoded, transformed images of an index frame (columns ``path`` and ``label``).

    Items are ``(image, label, row)``: the row index lets predictions be matched back to the frame even when
    corrupt images are skipped. The key is a row, or ``(row, sample_seed)`` from a seeded sampler: the transform is
    then reseeded for that sample, so its augmentation depends only on the seed, not on which worker draws it or
    how far the run got before a resume.
    """

    def __init__(
        self,
        frame: pd.DataFrame,
        transform: Callable[[np.ndarray], torch.Tensor],
        skip_corrupt: bool = False,
    ):
        super().__init__(frame, skip_corrupt)
        self.transform = transform

    def __getitem__(self, key: int | tuple[int, int]) -> Sample | None:
        """The sample, or None for an unreadable image when ``skip_corrupt`` (the collate drops it)."""
        if isinstance(key, tuple):
            index, sample_seed = int(key[0]), int(key[1])
            self.reseed(sample_seed)
        else:
            index = int(key)
        image = self.decode(index)
        if image is None:
            return None
        return self.transform(image), self.label(index), index

    def reseed(self, seed: int) -> None:
        """Reseed the transform's random stream (per worker, or per sample with a seeded sampler)."""
        reseed = getattr(self.transform, "reseed", None)
        if reseed is not None:
            reseed(seed)


def collate_skip_none(batch: Sequence[Sample | None]) -> Batch:
    """Collate the readable samples: ``(uint8 images, int64 labels, int64 rows)``; an all-None batch is empty."""
    kept = [sample for sample in batch if sample is not None]
    if not kept:
        empty = torch.empty(0, dtype=torch.int64)
        return torch.empty(0, dtype=torch.uint8), empty, empty.clone()
    images, labels, rows = default_collate(kept)
    return images, labels.to(torch.int64), rows.to(torch.int64)


@dataclass
class TenCropBatch:
    """Test-resized images of a batch, padded to its largest, and where each image's five crops start.

    What the ``tencrop`` loader yields in place of an image tensor (:func:`collate_tencrop`);
    :class:`TenCropNormalize` cuts the ten views on the device. The padding is never read: every crop lies inside its
    own image.
    """

    images: torch.Tensor  # (B, H, W, 3) uint8, each image at the top left of its slot
    offsets: torch.Tensor  # (B, 5, 2) int64 (top, left) of tl, tr, bl, br, centre
    res: int  # side of a crop

    def __len__(self) -> int:
        return len(self.images)

    def pin_memory(self) -> TenCropBatch:
        """Pinned, so the copy to the device overlaps compute (the DataLoader's pin thread calls this)."""
        return replace(self, images=self.images.pin_memory(), offsets=self.offsets.pin_memory())


def collate_tencrop(batch: Sequence[Sample | None], res: int) -> tuple[TenCropBatch, torch.Tensor, torch.Tensor]:
    """Collate :class:`fgvc.transforms.TenCrop` samples (resized ``(H, W, 3)`` images) into a :class:`TenCropBatch`.

    Unreadable samples (None) are dropped as :func:`collate_skip_none` drops them. Use with ``functools.partial`` to
    fix ``res``. A batch of landscape and portrait photos is padded to its tallest and widest image: 1.33 x the pixels
    for 4:3 photos, still under half the five crops'; only extreme mixes (a 3:1 panorama beside a 1:3 image) ship
    more than the crops would.
    """
    kept = [sample for sample in batch if sample is not None]
    images = [sample[0] for sample in kept]
    heights = np.array([image.shape[0] for image in images], dtype=np.int64)
    widths = np.array([image.shape[1] for image in images], dtype=np.int64)
    shape = (len(images), int(heights.max(initial=0)), int(widths.max(initial=0)), 3)
    padded = _batch_tensor(shape, images[0] if images else torch.empty(0, dtype=torch.uint8))
    for slot, image in zip(padded, images, strict=True):
        slot[: image.shape[0], : image.shape[1]] = image
    offsets = torch.from_numpy(tencrop_offsets(heights, widths, res).reshape(len(images), 5, 2))
    labels = torch.tensor([sample[1] for sample in kept], dtype=torch.int64)
    rows = torch.tensor([sample[2] for sample in kept], dtype=torch.int64)
    return TenCropBatch(padded, offsets, res), labels, rows


def _batch_tensor(shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """An uninitialised tensor for a collated batch; in a loader worker, in shared memory, as ``default_collate``
    allocates it (the worker then hands the batch to the main process without copying it again)."""
    if get_worker_info() is None:
        return torch.empty(shape, dtype=like.dtype)
    storage = like._typed_storage()._new_shared(math.prod(shape), device=like.device)
    return like.new(storage).view(shape)


def build_loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool = False,
    workers: int = 0,
    drop_last: bool = False,
    seed: int = 0,
    sampler: Sampler | Iterable | None = None,
    collate_fn: Callable[[Sequence[Any]], Any] = collate_skip_none,
    batch_sampler: Sampler[list[Any]] | None = None,
) -> DataLoader:
    """A DataLoader with reproducible shuffling, per-worker augmentation seeds and pinned memory where CUDA is present.

    Evaluation passes its :class:`fgvc.engine.sampling.EpochSampler` as ``sampler`` (``(row, sample_seed)`` pairs): it
    owns shuffling, sharding across ranks and the position inside an epoch, so ``shuffle`` must then be False.
    Training passes its :class:`fgvc.engine.sampling.EpochBatches` as ``batch_sampler`` instead, which also owns the
    batching (``batch_size`` and ``drop_last`` are then its own), so that one iterator can span several epochs.
    """
    if (sampler is not None or batch_sampler is not None) and shuffle:
        raise ValueError("a caller's sampler owns shuffling and sharding; pass shuffle=False")
    generator = torch.Generator()
    generator.manual_seed(seed)
    if workers > 0:
        _end_workers_at_exit()
    batching: dict[str, Any] = {"batch_sampler": batch_sampler} if batch_sampler is not None else {
        "batch_size": batch_size, "shuffle": shuffle and sampler is None, "sampler": sampler, "drop_last": drop_last}
    return DataLoader(
        dataset,
        **batching,
        num_workers=workers,
        collate_fn=collate_fn,
        pin_memory=torch.cuda.is_available(),
        worker_init_fn=seed_worker if workers > 0 else None,
        generator=generator,
        persistent_workers=workers > 0,
        prefetch_factor=PREFETCH_FACTOR if workers > 0 else None,
    )


def close_loader(loader: Any) -> None:
    """End a loader's persistent worker processes now (a :class:`fgvc.prefetch.Prefetcher`'s too).

    Otherwise they end when the loader is garbage, and a traceback that references it (a notebook keeps the last one)
    would keep them, each a copy of the parent process, alive.
    """
    loader = getattr(loader, "loader", loader)  # the DataLoader behind a Prefetcher
    iterator = getattr(loader, "_iterator", None)
    if iterator is not None and hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()
    if isinstance(loader, DataLoader):
        loader._iterator = None


@lru_cache(maxsize=1)
def _end_workers_at_exit() -> None:
    """Register (once) an exit handler that kills the loader workers still alive when the process ends.

    The workers ignore SIGTERM (see :func:`seed_worker`), and multiprocessing's own exit handler ends daemonic
    children with SIGTERM and then joins them: a run that stopped on an error (a corrupt image, a bad setting), whose
    traceback still references the loader and its workers, would wait for them forever. Handlers run last-registered
    first, so this one runs before multiprocessing's, which was registered when multiprocessing was imported.
    """
    atexit.register(_kill_daemonic_children)


def _kill_daemonic_children() -> None:
    # torch's SIGCHLD handler would raise "DataLoader worker is killed" here and leave the other workers alive
    if hasattr(signal, "SIGCHLD"):
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    workers = [child for child in multiprocessing.active_children() if child.daemon]
    for worker in workers:
        worker.kill()
    for worker in workers:
        worker.join(timeout=5)


def seed_worker(worker_id: int) -> None:
    """Seed numpy, random and the dataset's transform from the per-worker torch seed, and keep OpenCV single-threaded.

    Torch seeds each worker with ``base_seed + worker_id`` (base drawn from the loader's generator); without this,
    forked workers would share the parent's numpy and albumentations streams and augment identically.
    """
    # A SIGTERM sent to the whole process group (timeout, SLURM), or the SIGHUP of a closed terminal, must not kill the
    # workers before the main process has saved its checkpoint; it ends them itself.
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    worker_seed = torch.initial_seed() % 2**32
    np.random.seed(worker_seed)
    random.seed(worker_seed)
    disable_opencv_threads()
    info = get_worker_info()
    reseed = getattr(info.dataset, "reseed", None) if info is not None else None
    if reseed is not None:
        reseed(worker_seed)


def normalize_on_device(
    images: torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    device: torch.device | str,
    channels_last: bool = True,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Move a uint8 ``(B, 3, H, W)`` or ``(B, V, 3, H, W)`` batch to ``device`` as ``(x / 255 - mean) / std``.

    The arithmetic runs in float32 and is cast to ``dtype`` at the end. With ``channels_last`` a 5D batch is laid out
    so that ``images.flatten(0, 1)`` is a channels-last 4D view (the caller folds the views into the batch).

    Args:
        mean, std: per-channel statistics in 0..1 units, as timm and pretrainedmodels report them.
    """
    if images.dim() not in (4, 5) or images.shape[-3] != 3:
        raise ValueError(f"expected a (B, 3, H, W) or (B, V, 3, H, W) batch, got shape {tuple(images.shape)}")
    device = torch.device(device)
    shift, scale = _scaled_stats(tuple(mean), tuple(std), device)
    batch = images.to(device, non_blocking=True)
    if channels_last:
        batch = _channels_last(batch)
    batch = batch.to(torch.float32).sub_(shift).div_(scale)
    return batch if dtype == torch.float32 else batch.to(dtype)


def _channels_last(batch: torch.Tensor) -> torch.Tensor:
    if batch.dim() == 4:
        return batch.contiguous(memory_format=torch.channels_last)
    return batch.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)


@lru_cache(maxsize=16)
def _scaled_stats(
    mean: tuple[float, ...], std: tuple[float, ...], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """``255 * mean`` and ``255 * std`` as ``(3, 1, 1)`` tensors on ``device``, built once per device and model."""
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"mean and std need 3 values each, got {mean} and {std}")
    shift = torch.tensor(mean, dtype=torch.float32, device=device).mul_(255).view(3, 1, 1)
    scale = torch.tensor(std, dtype=torch.float32, device=device).mul_(255).view(3, 1, 1)
    return shift, scale


class _DeviceNormalization:
    """Where and how the batch preparers below normalise: the model's mean/std, the device, the memory format."""

    def __init__(
        self, mean: Sequence[float], std: Sequence[float], device: torch.device | str, channels_last: bool = True
    ) -> None:
        self.mean, self.std = tuple(mean), tuple(std)
        self.device = torch.device(device)
        self.channels_last = channels_last


class OnDeviceNormalize(_DeviceNormalization):
    """``loader batch -> normalised float batch on the device``: what the loops call on every batch.

    The loops receive this object instead of mean/std so that another batch preparer (e.g. JPEG decoding and
    augmentation on the GPU) can replace it without touching them.
    """

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return normalize_on_device(images, self.mean, self.std, self.device, self.channels_last)


class TenCropNormalize(_DeviceNormalization):
    """A :class:`TenCropBatch` -> its ``(B, 10, 3, res, res)`` views, normalised: tl, tr, bl, br, centre, then the
    same five mirrored (torchvision's ``TenCrop`` order).

    Each image travels once, channels last as decoded; one gather cuts the ten views (a mirrored view reads its
    columns right to left), and the channel axis moves first as a view, which is already the channels-last layout the
    model wants.
    """

    def __call__(self, batch: TenCropBatch) -> torch.Tensor:
        images, res = batch.images, batch.res
        if images.dim() != 4 or images.shape[-1] != 3 or tuple(batch.offsets.shape) != (len(images), 5, 2):
            raise ValueError(f"expected (B, H, W, 3) ten-crop images with (B, 5, 2) offsets, got shapes "
                             f"{tuple(images.shape)} and {tuple(batch.offsets.shape)}")  # fmt: skip
        images = images.to(self.device, non_blocking=True)
        corners = batch.offsets.to(self.device, non_blocking=True).repeat(1, 2, 1)  # (B, 10, 2)
        rows, columns = _view_grid(res, self.device)
        owner = torch.arange(len(images), device=self.device).view(-1, 1, 1, 1)
        ys = corners[..., 0, None, None] + rows  # (B, 10, res, 1)
        xs = corners[..., 1, None, None] + columns  # (B, 10, 1, res)
        views = images[owner, ys, xs].permute(0, 1, 4, 2, 3)  # (B, 10, res, res, 3) -> channels first, as a view
        if not self.channels_last:
            views = views.contiguous()
        return normalize_on_device(views, self.mean, self.std, self.device, self.channels_last)


@lru_cache(maxsize=8)
def _view_grid(res: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel offsets inside a view: rows ``(1, 1, res, 1)``, and columns ``(1, 10, 1, res)``, reversed for the five
    mirrored views."""
    steps = torch.arange(res, device=device)
    columns = torch.stack([steps] * 5 + [steps.flip(0)] * 5)
    return steps.view(1, 1, res, 1), columns.view(1, 10, 1, res)
