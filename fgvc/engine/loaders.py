"""The data side of a stage, a prediction pass or a sweep: a split of the run's dataset, its loader at one resolution,
and where its JPEGs are decoded (``data.decode``; ``auto`` times the model to see whether the CPU would set the pace).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from functools import lru_cache, partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fgvc.config import RunConfig
from fgvc.data import (
    ImageDataset,
    OnDeviceNormalize,
    TenCropNormalize,
    build_loader,
    collate_skip_none,
    collate_tencrop,
)
from fgvc.datasets import load_indices, require_split
from fgvc.datasets.base import DatasetIndex
from fgvc.engine.runtime import Runtime, gather_objects
from fgvc.engine.sampling import EpochBatches, EpochSampler
from fgvc.io import typical_source_pixels
from fgvc.models import ModelMeta, check_resolution
from fgvc.transforms import build_transform

log = logging.getLogger("fgvc")


def load_split(cfg: RunConfig, split: str) -> DatasetIndex:
    """One split of the run's dataset. The hold-out depends on ``data.split_seed`` and the image ids only, never on
    the training seed, so ensemble members trained with different seeds share one validation set."""
    data = cfg.data
    root = data.resolved_root().resolve()
    require_split(split)
    return _load_splits(data.dataset, str(root), data.val_fraction, data.split_seed, data.train_on_all)[split]


@lru_cache(maxsize=4)
def _load_splits(
    dataset: str, root: str, val_fraction: float, split_seed: int, train_on_all: bool
) -> dict[str, DatasetIndex]:
    """Cached per process, every split from one reading: a stage reads train and val, a sweep or an ensemble the same
    (possibly large) metadata files many times."""
    return load_indices(dataset, root=Path(root), val_fraction=val_fraction, seed=split_seed,
                        train_on_all=train_on_all)  # fmt: skip


def make_loader(
    cfg: RunConfig,
    rt: Runtime,
    index: DatasetIndex,
    kind: str,
    res: int,
    batch_size: int,
    shuffle: bool,
    meta: ModelMeta,
    decode: str = "cpu",
) -> tuple[torch.utils.data.DataLoader, EpochSampler, Callable[[Any], Any]]:
    """Dataset + seeded sampler + loader for one split at one resolution, and the ``prepare`` the loops apply.

    ``decode="cpu"``: workers decode and augment (OpenCV + albumentations), uint8 batches are normalised on the device.
    ``decode="gpu"``: workers only read the file bytes; nvJPEG decodes and the augmentation runs on the device, in a
    background thread one batch ahead (:class:`fgvc.prefetch.Prefetcher`).
    """
    check_resolution(meta, res)
    sampler = EpochSampler(len(index), shuffle=shuffle, seed=cfg.runtime.seed, rank=rt.rank, world_size=rt.world_size)
    drop_last = shuffle and len(sampler) > batch_size  # this rank's shard holds more than one batch
    # training batches per epoch, and can span epochs (fgvc.engine.epochs.EpochStream); evaluation reads one pass
    batches = EpochBatches(sampler, batch_size, drop_last) if shuffle else None
    prepare: Callable[[Any], Any]  # a batch from the loader -> the model's input (GPU decode: with the kept rows)
    collate: Callable[..., Any]
    if decode == "gpu":
        from fgvc.gpu_decode import EncodedImageDataset, GpuBatchPreparer, collate_encoded

        dataset: torch.utils.data.Dataset = EncodedImageDataset(index.frame, skip_corrupt=cfg.data.skip_corrupt)
        collate = collate_encoded
        prepare = GpuBatchPreparer(kind, res, meta.mean, meta.std, rt.device, cfg.data.crop_pct, rt.channels_last,
                                   skip_corrupt=cfg.data.skip_corrupt)  # fmt: skip
    else:
        transform = build_transform(kind, res, crop_pct=cfg.data.crop_pct, interpolation=meta.interpolation)
        dataset = ImageDataset(index.frame, transform, skip_corrupt=cfg.data.skip_corrupt)
        collate = partial(collate_tencrop, res=res) if kind == "tencrop" else collate_skip_none
        normalize = TenCropNormalize if kind == "tencrop" else OnDeviceNormalize
        prepare = normalize(meta.mean, meta.std, rt.device, rt.channels_last)
    loader = build_loader(
        dataset, batch_size=batch_size, workers=cfg.data.workers, sampler=None if batches else sampler,
        drop_last=drop_last, collate_fn=collate, batch_sampler=batches,
    )  # fmt: skip
    if decode == "gpu":  # the next batches are decoded by a thread of their own while this step is queued
        from fgvc.prefetch import Prefetcher, wait_prepared

        return Prefetcher(loader, prepare, rt.device), sampler, wait_prepared  # type: ignore[return-value]
    return loader, sampler, prepare


def resolve_decode(
    cfg: RunConfig,
    rt: Runtime,
    model: nn.Module,
    res: int,
    batch_size: int,
    paths: Sequence[str] | np.ndarray = (),
    started_with: str | None = None,
) -> str:
    """``data.decode`` for this device; ``auto`` times a few synthetic steps to see if the CPU would be the limit,
    for images the size of a sample of ``paths`` (the training files). A resumed ``auto`` run keeps the decoder it
    ``started_with`` (saved in its checkpoint) where the device still has it: a new timing could switch the pixels."""
    from fgvc.gpu_decode import decode_mode, gpu_decode_available

    if cfg.data.decode == "auto" and (
        started_with == "cpu" or (started_with == "gpu" and gpu_decode_available(rt.device))
    ):
        return started_with
    estimate = pixels = None
    if cfg.data.decode == "auto" and rt.device.type == "cuda":
        estimate = measure_images_per_s(model, rt, res, batch_size)
        pixels = typical_source_pixels(paths)
    mode = decode_mode(cfg.data.decode, rt.device, estimate, cfg.data.workers, pixels)
    if estimate is not None:
        stored = f", stored images ~{pixels / 1e6:.2f} Mpx" if pixels else ""
        log.info("decode %s: the model steps at ~%.0f img/s per process at %d px%s", mode, estimate, res, stored)
    if rt.distributed:  # timings differ a little per rank; every rank must build the same kind of loader
        mode = gather_objects(rt, mode)[0]
    return mode


def measure_images_per_s(model: nn.Module, rt: Runtime, res: int, batch_size: int, steps: int = 3) -> float:
    """Forward + backward throughput on synthetic input; weights, BN statistics and RNG streams are left untouched."""
    was_training = model.training
    model.eval()  # no BN statistics update
    devices = [rt.device] if rt.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        x = torch.randn(batch_size, 3, res, res, device=rt.device).contiguous(memory_format=rt.memory_format)
        for step in range(steps + 2):
            if step == 2:
                _synchronize(rt)
                started = time.perf_counter()
            with rt.autocast():
                out = model(x)
            if any(p.requires_grad for p in model.parameters()):
                out.float().mean().backward()
        _synchronize(rt)
        elapsed = time.perf_counter() - started
    for p in model.parameters():
        p.grad = None
    model.train(was_training)
    return steps * batch_size / max(elapsed, 1e-9)


def _synchronize(rt: Runtime) -> None:
    if rt.device.type == "cuda":
        torch.cuda.synchronize(rt.device)
