"""Stage 1 and stage 2 of the FixRes recipe: one training routine, two configurations.

Stage 1 fine-tunes the whole ImageNet-pretrained network at the train resolution with RandomResizedCrop. Stage 2 loads
the stage-1 weights, freezes all but the tuned parts (``tune`` policy from the model registry) and fine-tunes at the
test resolution with the test-time augmentation. Both resume from ``last.pt`` after an interruption.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import signal
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass, replace
from functools import lru_cache, partial
from pathlib import Path
from typing import Any, cast

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from fgvc.config import CONFIG_FILE, RunConfig, RuntimeConfig, StageConfig, load_config, save_config, with_overrides
from fgvc.data import (
    ImageDataset,
    OnDeviceNormalize,
    TenCropNormalize,
    build_loader,
    close_loader,
    collate_skip_none,
    collate_tencrop,
)
from fgvc.datasets import load_indices, require_split
from fgvc.datasets.base import DatasetIndex
from fgvc.engine.checkpoint import (
    BEST,
    LAST,
    load_checkpoint,
    load_checkpoint_identified,
    load_model_state,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from fgvc.engine.ema import WeightAverage
from fgvc.engine.epochs import EpochStream, epoch_batches
from fgvc.engine.feature_cache import (
    FeatureCache,
    Split,
    cache_bytes_estimate,
    cache_dtype,
    compute_cache,
    default_budget_bytes,
    require_cacheable,
    should_cache,
    split_model,
    train_one_epoch_cached,
)
from fgvc.engine.graphs import GraphedTraining
from fgvc.engine.lock import holder as lock_holder
from fgvc.engine.lock import stage_lock
from fgvc.engine.loop import EpochStats, StopFlag, Stopped, predict_probs, stop_on_signals, train_one_epoch
from fgvc.engine.mixing import build_mixing
from fgvc.engine.runtime import (
    Runtime,
    any_rank,
    barrier,
    broadcast_from_main,
    gather_objects,
    settings_restored,
    setup_runtime,
)
from fgvc.engine.sampling import EpochBatches, EpochSampler
from fgvc.errors import ConfigError, DataError, RunBusyError, RunExistsError, TrainingError, WeightsError
from fgvc.fileio import atomic_write_text, remove_if_abandoned
from fgvc.io import typical_source_pixels
from fgvc.logs import run_log
from fgvc.metrics import METRIC_LABELS, summarize
from fgvc.models import (
    ModelMeta,
    check_policy,
    check_resolution,
    create_model,
    get_meta,
    model_meta,
    rgb,
    set_meta,
    set_train_mode,
    set_trainable,
    unwrap_model,
    weights_file,
)
from fgvc.models.weights import nonfinite_weight
from fgvc.plots import plot_training_curves
from fgvc.submission import leaderboard_metric
from fgvc.transforms import build_transform

log = logging.getLogger("fgvc")
STAGE1 = "stage1"
FINISHED = "finished.json"  # written last: a cheap "this stage is done" marker with its final metrics


def stage2_dirname(res: int) -> str:
    return f"stage2-{res}"


@dataclass
class StageResult:
    """What a stage run produced."""

    stage_dir: Path
    history: pd.DataFrame
    before: dict[str, float] | None = None  # stage 2: the stage-1 model at the test resolution
    final: dict[str, float] | None = None  # validation metrics of the last epoch
    interrupted_by: int | None = None  # signal number when stopped by SIGINT/SIGTERM
    metric: str = "top1"  # what best.pt was chosen on: the dataset's leaderboard metric

    def best_epoch(self) -> dict[str, Any] | None:
        """The history row of the epoch ``best.pt`` holds (the first with the best validation ``metric``), if any."""
        column = f"val_{self.metric}"
        if column not in self.history or self.history[column].isna().all():
            return None
        return self.history.loc[self.history[column].idxmax()].to_dict()

    def adapted_score(self) -> str:
        """Top-1 of best.pt (the model sweep and predict use), and the last epoch's where that is another epoch."""
        best, last_top1 = self.best_epoch(), (self.final or {}).get("top1", float("nan"))
        if best is None:
            return f"{last_top1:.2f} after adaptation"
        chosen = "" if self.metric == "top1" else f", {METRIC_LABELS[self.metric]} {best[f'val_{self.metric}']:.2f}"
        last = "" if best["epoch"] == self.history["epoch"].iloc[-1] else f"; last epoch {last_top1:.2f}"
        return f"{best['val_top1']:.2f} after adaptation (best.pt, epoch {int(best['epoch'])}{chosen}{last})"


# ---------------------------------------------------------------------------------------------------------------------
# Helpers shared with predict and sweep


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


def build_scheduler(
    optimizer: torch.optim.Optimizer, stage: StageConfig, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step schedule: linear warmup to the peak, reached on the first step after it (a fractional warmup rounds up
    to whole steps, so 0.1 epoch is never none), then cosine / step (/10 every ``step_epochs``) / constant."""
    total = max(1, stage.epochs * steps_per_epoch)
    warmup = math.ceil(stage.warmup_epochs * steps_per_epoch - 1e-9)  # 0.3 * 10 is 3.0000000000000004

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if stage.sched == "cosine":
            progress = (step - warmup) / max(1, total - warmup)
            return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
        if stage.sched == "step":
            return 0.1 ** ((step // steps_per_epoch) // stage.step_epochs)
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def build_optimizer(model: nn.Module, stage: StageConfig, lr: float) -> torch.optim.Optimizer | None:
    """SGD with momentum (the paper) or AdamW over the trainable parameters; no weight decay on biases and norms."""
    if not any(p.requires_grad for p in model.parameters()):
        return None
    import timm.optim

    name = "momentum" if stage.opt == "sgd" else "adamw"  # timm's "sgd" is Nesterov; the paper uses plain momentum
    kwargs: dict[str, Any] = {"momentum": stage.momentum} if stage.opt == "sgd" else {}
    return timm.optim.create_optimizer_v2(model, opt=name, lr=lr, weight_decay=stage.weight_decay, **kwargs)


def class_info(index: DatasetIndex) -> dict[str, list]:
    def plain(v: Any) -> Any:
        return v.item() if hasattr(v, "item") else v

    return {"names": list(index.class_names), "category_ids": [plain(c) for c in index.category_ids]}


def check_classes(ckpt: dict[str, Any], index: DatasetIndex, stage_dir: Path, config: Path) -> None:
    """The checkpoint's classes must be the dataset's, in the same order: a renamed, added or removed class folder
    would otherwise shift every label silently (accuracies, ensembles and submissions would all be wrong).

    A class is its category id: names alone may change (iNat 2018/2019's real names from categories.json replace the
    training JSON's codes). ``config`` is the file whose ``data.root`` was read: every command that gets here reads it
    from a run's config.yaml, so that is where the fix goes."""
    trained, now = ckpt["classes"], class_info(index)
    if trained["category_ids"] == now["category_ids"]:
        return
    was = list(zip(trained["names"], trained["category_ids"], strict=True))
    is_ = list(zip(now["names"], now["category_ids"], strict=True))
    if len(was) != len(is_):
        why = f"{len(was)} classes, the dataset now {len(is_)}"
    else:
        i = next(i for i, (a, b) in enumerate(zip(was, is_, strict=True)) if a != b)
        part = 0 if was[i][0] != is_[i][0] else 1  # the name, else the category id
        why = f"label {i} is {was[i][part]!r} in the model, {is_[i][part]!r} in the dataset"
    raise DataError(
        f"{stage_dir}: the model was trained on other classes than the {index.name} {index.split} split has ({why}); "
        f"set data.root in {config} to the data it was trained on"
    )


HOLDOUT_KEYED = "2026-11-27"  # fgvc drew the hold-out as a permutation of train before this date (see check_holdout)


def holdout_digest(index: DatasetIndex) -> str | None:
    """A fingerprint of a val split that fgvc held out of train (None for a benchmark's own val split)."""
    if not index.holdout:
        return None
    ids = "\n".join(sorted(map(str, index.frame["image_id"])))
    return hashlib.sha256(ids.encode()).hexdigest()[:16]


def check_holdout(ckpt: dict[str, Any], index: DatasetIndex, stage_dir: Path) -> None:
    """Warn when ``index`` (a val split) is not the hold-out the model was trained beside: some of its images may then
    have been training images, and val scores, sweeps and ensemble weights on it are optimistic."""
    now = holdout_digest(index)
    if now is None or ckpt.get("holdout", "") == now:
        return
    if "holdout" not in ckpt:
        log.warning("%s was trained by an fgvc older than %s, which drew the validation hold-out differently: most of "
                    "today's %s val images were training images for it, so scores on val are optimistic; retrain "
                    "stage 1 with --force for a clean hold-out", stage_dir, HOLDOUT_KEYED, index.name)  # fmt: skip
    else:
        log.warning("%s: the validation hold-out changed since this model was trained (images were added to or removed "
                    "from the dataset): a few val images may have been training images for it", stage_dir)  # fmt: skip


def find_stage_checkpoint(stage_dir: Path) -> Path:
    """best.pt when validation picked one, else last.pt."""
    for name in (BEST, LAST):
        if (stage_dir / name).is_file():
            return stage_dir / name
    raise DataError(f"{stage_dir}: no checkpoint (best.pt / last.pt); run the stage first")


def load_stage_model(stage_dir: Path) -> tuple[nn.Module, dict[str, Any], str]:
    """Rebuild the model of a finished stage from its folder alone (architecture and classes come from the file);
    with the identity of the checkpoint file read (:func:`fgvc.engine.checkpoint.load_checkpoint_identified`)."""
    path = find_stage_checkpoint(stage_dir)
    ckpt, identity = load_checkpoint_identified(path)
    model = create_model(ckpt["arch"], ckpt["num_classes"], None)
    load_model_state(model, ckpt["model"], path)
    if key := nonfinite_weight(model, model.state_dict()):  # before a prediction pass, not after it
        raise WeightsError(f"{path}: '{key}' holds NaN or infinite values (the run diverged); retrain the stage with a "
                           "lower --lr")  # fmt: skip
    use_saved_input(model, ckpt)
    return model, ckpt, identity


def saved_input(meta: ModelMeta) -> dict[str, Any]:
    """What the weights expect of their input, saved with them: the registry's answer for a name can change (timm's
    configs, fgvc's resolution of deprecated names), the trained weights' expectation does not."""
    return {"mean": list(meta.mean), "std": list(meta.std), "interpolation": meta.interpolation}


def use_saved_input(model: nn.Module, ckpt: dict[str, Any]) -> None:
    """Give ``model`` the normalisation and resize interpolation its checkpoint was trained with (where it says)."""
    saved = ckpt.get("input")
    if saved:
        set_meta(model, replace(get_meta(model), mean=rgb(saved["mean"]), std=rgb(saved["std"]),
                                interpolation=saved["interpolation"]))  # fmt: skip


def latest_run(out: str | Path = "runs") -> Path:
    """The run folder whose stage-1 checkpoint was written last."""
    candidates = sorted(Path(out).glob(f"*/{STAGE1}/{LAST}"), key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise DataError(f"{out}: no stage-1 run found; run `fgvc stage1` first or pass --run DIR")
    return candidates[-1].parent.parent


def require_run_folder(run_dir: Path) -> None:
    """``--run runs/X/stage1`` (a stage folder, where the run folder is meant) said "stage 1 has no checkpoint; run
    `fgvc stage1` first" of a stage that has one."""
    stage_name = run_dir.name == STAGE1 or run_dir.name.startswith("stage2-")
    if stage_name and (run_dir.parent / STAGE1).is_dir() and not (run_dir / STAGE1).is_dir():  # a run named stage1
        raise ConfigError(f"{run_dir}: a stage folder; pass the run folder that holds it: --run {run_dir.parent}")


def config_conflicts(saved: dict[str, Any], cfg: RunConfig, stage: str) -> list[str]:
    """Settings that differ between the checkpoint's config and this command (resuming would mix two runs)."""
    current = cfg.model_dump(mode="json")
    defaults = RunConfig().model_dump(mode="json")  # a setting added since the checkpoint had its default then
    section = "stage1" if stage == STAGE1 else "stage2"
    out = []
    checks = [("data", "dataset"), ("data", "val_fraction"), ("data", "train_on_all"), ("data", "crop_pct")]
    checks += [("data", "split_seed"), ("runtime", "seed")]  # the seed orders every epoch and seeds the augmentation
    checks += [("model", "arch"), ("model", "weights")]  # another start is another model
    checks += [(section, key) for key in current[section] if key not in _NOT_COMPARED]
    for sec, key in checks:
        old, new = saved.get(sec, {}).get(key, defaults[sec][key]), current[sec][key]
        if old != new:
            out.append(f"{sec}.{key}: {old} -> {new}")
    old_lr, new_lr = _learning_rate(saved.get(section, {})), _learning_rate(current[section])
    if not math.isclose(old_lr, new_lr, rel_tol=1e-9):  # by their effect: an unused lr_base default is no conflict
        out.append(f"{section}.lr: {old_lr:.9g} -> {new_lr:.9g}")
    return out


def _differ(saved: list[str], now: list[str]) -> str:
    """The first parameter names only one of two lists has, for a one-line message."""
    gone, new = [n for n in saved if n not in now][:2], [n for n in now if n not in saved][:2]
    parts = ([f"then {', '.join(gone)}"] if gone else []) + ([f"now {', '.join(new)}"] if new else [])
    return "; ".join(parts) or "the same names in another order"


_NOT_COMPARED = ("val_every", "lr", "lr_base")


def _learning_rate(section: dict[str, Any]) -> float:
    """The single-process learning rate of a stage section as saved (fgvc wrote it: no validation needed)."""
    return StageConfig.model_construct(**section).resolved_lr()


# ---------------------------------------------------------------------------------------------------------------------
# The stage runner


def train_stage(cfg: RunConfig, stage: str, force: bool = False, progress: bool = True) -> StageResult:
    """Train stage 1 (``stage="stage1"``) or stage 2 (``"stage2"``) as configured; resume when possible.

    SIGINT/SIGTERM are caught from the start: training stops at the next optimiser step and saves ``last.pt``.
    """
    cfg = cfg.model_copy(deep=True)  # the run fills in settings (data.root); the caller's object stays as given
    stage_dir = stage_folder(cfg, stage)
    with stop_on_signals() as stop, run_log(stage_dir / "train.log"), settings_restored(), ExitStack() as opened:
        return _train_stage(cfg, stage, force, progress, stop, opened)


def _claim_folder(rt: Runtime, stage_dir: Path, stage: str, opened: ExitStack) -> None:
    """Rank 0 holds the stage folder's lock until the call ends (:mod:`fgvc.engine.lock`), and a stage 2 its stage 1's
    folder's shared lock; every rank raises if another process trains there, or, for stage 1, adapts its model in a
    stage 2 that a retraining would retire."""
    busy, failure = None, None
    if rt.is_main:
        adapting = [(d, who) for d in sorted(stage_dir.parent.glob("stage2-*")) if (who := lock_holder(d))]
        if stage == STAGE1 and adapting:  # said before stage 1's own lock, which their shared locks refuse anyway
            busy = (f"{adapting[0][0]} is being trained by {adapting[0][1]} from this stage 1's model, which --force "
                    "would retire; wait for it to end, or stop it first")  # fmt: skip
        try:
            if busy is None:
                opened.enter_context(stage_lock(stage_dir))
            if busy is None and stage != STAGE1:  # the stage-1 model must stay while it is adapted
                opened.enter_context(stage_lock(stage_dir.parent / STAGE1, shared=True))
        except RunBusyError as err:
            busy = str(err)
        except OSError as err:  # e.g. a folder it may not write: the other ranks must not wait for rank 0 forever
            failure = err
    busy, reason = broadcast_from_main(rt, (busy, None if failure is None else f"{type(failure).__name__}: {failure}"))
    if failure is not None:
        raise failure
    if reason is not None:
        raise RuntimeError(f"rank 0 could not lock {stage_dir} ({reason})")
    if busy is not None:
        raise RunBusyError(busy)


def stage_folder(cfg: RunConfig, stage: str) -> Path:
    """``<run>/stage1`` or ``<run>/stage2-<res>``."""
    return cfg.run_dir() / (STAGE1 if stage == STAGE1 else stage2_dirname(cfg.stage2.res))


def _train_stage(
    cfg: RunConfig, stage: str, force: bool, progress: bool, stop: StopFlag, opened: ExitStack
) -> StageResult:
    """``opened`` ends the loaders' worker processes however the call ends (an error's traceback, which a notebook
    keeps, would otherwise keep them alive)."""
    stage_cfg = cfg.stage1 if stage == STAGE1 else cfg.stage2
    run_dir = cfg.run_dir()
    stage_dir = stage_folder(cfg, stage)
    rt = setup_runtime(cfg.runtime)
    if not force:
        _refuse_finished(stage_dir, stage)  # said first: a finished stage's lock may be held by a stage 2 adapting it
    _claim_folder(rt, stage_dir, stage, opened)

    state = None if force else _resumable_state(cfg, stage, stage_dir)
    check_model_settings(cfg, stage, rt.world_size)  # before a long dataset read, as is a missing weights file:
    if stage == STAGE1 and state is None:
        weights_file(cfg.model.arch, cfg.model.weights)
    train_index, val_index = load_split(cfg, "train"), load_split(cfg, "val")
    if len(train_index) == 0:  # an empty or cut metadata file: epochs of nothing would end "finished"
        name, root = cfg.data.dataset, cfg.data.resolved_root()
        raise DataError(f"{root}: the {name} train split lists no images; re-extract its metadata files (`fgvc "
                        f"datasets check {name} --root {root}` checks them)")  # fmt: skip
    if state is not None:
        check_holdout(state, val_index, stage_dir)
    for note in train_index.notes:
        log.info("note: %s", note)
    num_classes = train_index.num_classes
    model, source = _starting_model(cfg, stage, state, stage_dir, train_index, val_index)
    meta = get_meta(model)
    set_trainable(model, stage_cfg.tune)
    rt.place(model)
    average = WeightAverage(model, stage_cfg.ema_decay) if stage_cfg.ema_decay else None
    if average is not None and state is not None:
        average.load(state["model"], state["ema_updates"])
    evaluated = average.module if average is not None else model  # the stage's model: validated and saved

    decode = resolve_decode(cfg, rt, model, stage_cfg.res, stage_cfg.batch_size, train_index.frame["path"].to_numpy(),
                            started_with=state.get("decode") if state is not None else None)  # fmt: skip
    train_loader, train_sampler, prepare = make_loader(
        cfg, rt, train_index, stage_cfg.augment, stage_cfg.res, stage_cfg.batch_size, True, meta, decode
    )
    opened.callback(close_loader, train_loader)
    if len(val_index):  # built once: its worker processes persist across epochs
        val_loader, _, val_prepare = make_loader(
            cfg, rt, val_index, "test", stage_cfg.res, stage_cfg.batch_size, False, meta, decode
        )
        opened.callback(close_loader, val_loader)

    def validate() -> dict[str, float] | None:
        """Top-1 / top-5 / mean per-class accuracy on the val split at the stage's resolution (test augmentation);
        None when a stop signal cut it short (on every rank alike)."""
        try:
            probs, rows = predict_probs(evaluated, val_loader, rt, val_prepare, desc=f"val@{stage_cfg.res}",
                                        progress=progress, stop=stop)  # fmt: skip
        except Stopped:
            return None
        metrics = summarize(probs, val_index.frame["label"].to_numpy()[rows]) if rt.is_main else {}
        return broadcast_from_main(rt, metrics)  # every rank takes the same best-checkpoint decisions

    resume_hint = "rerun the same command without --force to resume" if force else "rerun the same command to resume"

    def stopped_before_training(during: str) -> StageResult:
        """A stop signal while no training step has run since the last checkpoint: nothing new to save."""
        again = "the earlier results are untouched; rerun with --force to start it again" if force else resume_hint
        log.info("interrupted by signal %s during %s; nothing new to save; %s", stop.signum, during, again)
        return StageResult(stage_dir=stage_dir, history=pd.DataFrame(history), before=before, metric=metric,
                           interrupted_by=stop.signum or signal.SIGTERM)  # fmt: skip

    train_batches = epoch_batches(train_loader)
    steps_per_epoch = max(1, math.ceil(train_batches.batches_in() / stage_cfg.grad_accum))
    lr = stage_cfg.resolved_lr(rt.world_size)
    optimizer = build_optimizer(model, stage_cfg, lr)
    scheduler = build_scheduler(optimizer, stage_cfg, steps_per_epoch) if optimizer else None
    scaler = torch.amp.GradScaler("cuda") if rt.needs_grad_scaler and optimizer else None
    mix, criterion = build_mixing(stage_cfg, num_classes)
    if stage != STAGE1 and cfg.runtime.cache_features == "on":
        require_cacheable(stage_cfg.augment, stage_cfg.tune, rt.world_size)
    start_epoch, start_micro, best, history, before = 0, 0, -1.0, [], None
    metric = leaderboard_metric(cfg.data.dataset)  # best.pt is the epoch the leaderboard would rank highest
    partial: EpochStats | None = None
    learning = [name for name, param in unwrap_model(model).named_parameters() if param.requires_grad]
    if state is not None:
        if state.get("learning", learning) != learning:  # the optimiser state would go to other parameters
            raise ConfigError(
                f"{stage_dir}/{LAST} was trained with other parameters learning ({_differ(state['learning'], learning)}"
                f"): fgvc's choice for {cfg.model.arch} / tune {stage_cfg.tune} changed since; pass --force to restart"
            )
        if optimizer is not None:
            optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        if state.get("world_size", 1) != rt.world_size:
            raise ConfigError(
                f"{stage_dir}/{LAST} was written by {state.get('world_size', 1)} processes, this run has "
                f"{rt.world_size}: the schedule and data position would not match; resume with "
                f"{state.get('world_size', 1)} processes or pass --force"
            )
        start_epoch, start_micro = state["epoch"], state["micro_step"]
        history, before = state["history"], state.get("before")
        saved_best = state.get("best", -1.0)
        if isinstance(saved_best, dict) and metric in saved_best:  # unrounded, unlike the history's copy
            best = saved_best[metric]
        else:  # written by an fgvc that kept best.pt on top-1: this run goes on choosing the way it started
            metric, best = "top1", float(saved_best) if not isinstance(saved_best, dict) else -1.0
        if start_micro and state.get("partial"):  # the interrupted epoch's part before the stop
            partial = EpochStats(**state["partial"])
        rngs = state["rng"]  # one per rank (a dict: written by an fgvc that saved rank 0's only)
        set_rng_state(rngs[rt.rank] if isinstance(rngs, list) else rngs)
        if start_epoch >= stage_cfg.epochs:  # the process that saved the last epoch stopped before finished.json
            log.info("%s: training had finished (epoch %d); writing its results", stage_dir, start_epoch)
        else:
            log.info("resuming %s from epoch %d, step %d", stage_dir, start_epoch + 1, start_micro)
    else:
        cfg.data.root = str(cfg.data.resolved_root().resolve())  # the run folder must not depend on the cwd
        if stage != STAGE1 and len(val_index):
            before = validate()
            if before is None:
                return stopped_before_training("the validation before adaptation")
            log.info("stage-1 model at %d px before adaptation: %s", stage_cfg.res, _fmt(before, metric))

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info(
        "%s %s: %s on %s | %d train / %d val images, %d classes | res %d, aug %s, tune %s (%.2fM trainable) | "
        "lr %.3g, batch %d x%d x accum %d%s | from %s",
        stage, cfg.run_name(), cfg.model.arch, rt.describe(), len(train_index), len(val_index), num_classes,
        stage_cfg.res, stage_cfg.augment, stage_cfg.tune, trainable / 1e6, lr, stage_cfg.batch_size,
        rt.world_size, stage_cfg.grad_accum, f" | weight average {stage_cfg.ema_decay:g}" if average else "", source,
    )  # fmt: skip

    claimed = False
    # --force over earlier results: they go at this run's first checkpoint, so an interruption before its first epoch
    # ends saves nothing rather than claim the folder with a step or two of training
    guarded = force and bool(_built_on_old_model(run_dir, stage_dir, stage))

    def save(name: str, ckpt: dict[str, Any]) -> None:
        """Write a checkpoint of this run (rank 0 only calls it).

        Before the first one, and not earlier, the old results (with --force) and whatever was built on them go and
        this run's config is written: a run that fails before it has a checkpoint of its own (a corrupt image in the
        first epoch, a crash) leaves the folder as it found it. The old best.pt goes only once the first checkpoint is
        written (the new best.pt replaces it), so that a write that fails (a full disk) leaves the old model.
        """
        nonlocal claimed
        if not claimed:
            _retire_old_results(run_dir, stage_dir, stage, force)
            for stale in stage_dir.glob(".*.tmp"):  # half-written files of a process killed mid-write (SIGKILL, OOM)
                remove_if_abandoned(stale)
            if state is None:
                stage_dir.mkdir(parents=True, exist_ok=True)
                save_config(cfg, stage_dir / CONFIG_FILE)
                if stage == STAGE1:
                    save_config(cfg, run_dir / CONFIG_FILE)
        save_checkpoint(stage_dir / name, ckpt)
        if not claimed and state is None and name != BEST:  # not this run's model (a --force run's, or a failed one's)
            (stage_dir / BEST).unlink(missing_ok=True)
        claimed = True

    def checkpoint(epoch: int, micro: int, finished: bool, rngs: Sequence[object]) -> dict[str, Any]:
        """The resumable state; ``rngs`` holds every rank's RNG state (:func:`gather_objects`, called by all)."""
        averaged = {"trained": unwrap_model(model).state_dict(), "ema_updates": average.updates} if average else {}
        return averaged | {
            "model": unwrap_model(evaluated).state_dict(),
            "optimizer": optimizer.state_dict() if optimizer else None,
            "scheduler": scheduler.state_dict() if scheduler else None,
            "scaler": scaler.state_dict() if scaler else None,
            "epoch": epoch,
            "micro_step": micro,
            "best": {metric: best},
            "history": history,
            "before": before,
            "finished": finished,
            "rng": rngs,
            "config": cfg.model_dump(mode="json"),
            "arch": cfg.model.arch,
            "input": saved_input(meta),
            "num_classes": num_classes,
            "classes": class_info(train_index),
            "holdout": holdout_digest(val_index),
            "res": stage_cfg.res,
            "stage": stage,
            "world_size": rt.world_size,
            "learning": learning,
            "decode": decode,
            "source": source,  # the starting point, with the weights file "imagenet" was on this machine
        }

    def record_epoch(done: int, metrics: dict[str, float] | None, due: bool) -> bool:
        """Epoch ``done`` (``history[-1]``) ends: its validation metrics, the log line, best.pt when the leaderboard
        metric improved, last.pt. Returns whether its validation is pending: ``due`` but cut short by a stop signal,
        so that a resume runs it first."""
        nonlocal best
        row = history[-1]
        if metrics is not None:
            row.update({f"val_{k}": round(v, 3) for k, v in metrics.items()})
            result.final = metrics
        improved = metrics is not None and metrics[metric] > best
        if metrics is not None and improved:
            best = metrics[metric]
        pending = due and metrics is None
        log.info(_epoch_line(row, stage_cfg.epochs, metric) + (" | val cut short" if pending else ""))
        rngs = gather_objects(rt, rng_state())
        if rt.is_main:
            state_now = checkpoint(done, 0, done == stage_cfg.epochs and not pending, rngs) | {"val_pending": pending}
            if improved or not len(val_index):
                keep = ("model", "arch", "input", "num_classes", "classes", "holdout", "config", "epoch", "res",
                        "stage", "best")  # fmt: skip
                save(BEST, {k: state_now[k] for k in keep} | {"metrics": metrics})
            save(LAST, state_now)
            _write_history(history, stage_dir, f"{cfg.run_name()} {stage}")
        barrier(rt)
        return pending

    result = StageResult(stage_dir=stage_dir, history=pd.DataFrame(history), before=before, metric=metric)
    if state is not None and state.get("val_pending"):  # the interruption came during that epoch's validation
        log.info("validating epoch %d first: a stop signal cut its validation short", start_epoch)
        metrics = validate()
        if metrics is None:
            return stopped_before_training(f"epoch {start_epoch}'s validation")
        record_epoch(start_epoch, metrics, True)

    split, cache = None, None
    if stage != STAGE1 and start_epoch < stage_cfg.epochs:
        split = stage2_split(cfg, rt, model, stage_cfg)
        try:
            cache = _feature_cache(cfg, rt, split, stage_cfg, train_index, meta, decode, progress, stop)
        except Stopped:
            return stopped_before_training("the feature cache's computation")
    # Stage 2 leaves each rank's tuned BN statistics to its own shard, averaged at each epoch's end (distribute_bn):
    # DDP's default, rank 0's buffers copied to every rank before each forward, would keep rank 0's shard alone in them.
    broadcast_buffers = stage == STAGE1
    net = _training_module(model, rt, cfg.runtime, optimizer is not None, stage_cfg.grad_accum, broadcast_buffers)
    input_hint_given = False
    # One loader iterator for every epoch left: the workers load the next epoch while this one ends and validates.
    stream = EpochStream(train_loader, start_epoch, stage_cfg.epochs, start_micro * stage_cfg.batch_size)
    opened.callback(stream.close)
    for epoch in range(start_epoch, stage_cfg.epochs):
        micro = start_micro if epoch == start_epoch else 0
        train_sampler.set_epoch(epoch, start=micro * stage_cfg.batch_size)
        set_train_mode(model, stage_cfg.tune)
        bn_reset = _prepare_bnstats(model, stage_cfg.tune, restart=epoch == 0 and micro == 0)
        desc = f"{stage} {epoch + 1}/{stage_cfg.epochs}"
        if cache is not None and split is not None:  # frozen trunk computed once: only the tail runs
            stats = train_one_epoch_cached(
                split.tail, cache, train_sampler, stage_cfg.batch_size, train_batches.drop_last, optimizer, scheduler,
                scaler, rt, criterion, grad_accum=stage_cfg.grad_accum, stop=stop, start_micro_step=micro, desc=desc,
                progress=progress,
            )  # fmt: skip
        else:
            stats = train_one_epoch(
                net, stream.epoch(epoch), optimizer, scheduler, scaler, rt, prepare, criterion,
                grad_accum=stage_cfg.grad_accum, stop=stop, start_micro_step=micro,
                batch_size=stage_cfg.batch_size, samples=len(train_sampler), desc=desc, progress=progress, mix=mix,
                after_step=average.update if average is not None else None,
            )  # fmt: skip
        stats = stats.after(partial if epoch == start_epoch else None)
        if optimizer is not None:
            _require_finite_weights(model, epoch + 1)
        bn_reset()
        # Each rank saw its own shard: average the BN statistics so that the saved model uses them all. Not after an
        # interruption in stage 1: there DDP copies rank 0's buffers to every rank before each forward, so rank 0's
        # (saved in last.pt) are what an uninterrupted run would have continued from.
        if rt.distributed:
            from timm.utils import distribute_bn

            if not (stats.interrupted and broadcast_buffers):
                distribute_bn(model, rt.world_size, reduce=True)
            # Each rank's average took in its own statistics too (timm's train.py averages them as well). Also on an
            # interruption: the update is linear, so averaging now ends the epoch at the same mean as averaging later.
            if average is not None:
                distribute_bn(average.module, rt.world_size, reduce=True)
        if stats.interrupted:
            rngs = gather_objects(rt, rng_state())
            result.interrupted_by = stop.signum or signal.SIGTERM
            result.history = pd.DataFrame(history)  # with this call's epochs
            if guarded and not claimed:  # a Ctrl-C right after a mistaken --force must not cost the old models
                log.info("interrupted by signal %s before the first epoch of this --force run ended: nothing saved, "
                         "the earlier results in %s are untouched (rerun with --force to retrain it)", stop.signum,
                         stage_dir)  # fmt: skip
                return result
            if rt.is_main:
                save(LAST, checkpoint(epoch, stats.micro_steps, False, rngs) | {"partial": asdict(stats)})
            log.info("interrupted by signal %s: saved %s (epoch %d, step %d); %s", stop.signum, stage_dir / LAST,
                     epoch + 1, stats.micro_steps, resume_hint)  # fmt: skip
            return result
        history.append(_history_row(epoch + 1, stats))
        due = bool(len(val_index)) and ((epoch + 1) % stage_cfg.val_every == 0 or epoch + 1 == stage_cfg.epochs)
        pending = record_epoch(epoch + 1, validate() if due else None, due)
        if not input_hint_given and (hint := input_bound_hint(stats, cfg.data.workers, decode, rt.device)):
            log.info(hint)
            input_hint_given = True
        if any_rank(rt, bool(stop)):
            after = f"epoch {epoch + 1}" + (" (its validation runs first on resume)" if pending else "")
            log.info("interrupted by signal %s after %s; %s", stop.signum, after, resume_hint)
            result.interrupted_by = stop.signum or signal.SIGTERM
            result.history = pd.DataFrame(history)  # with this call's epochs
            return result
    if stage_cfg.epochs == 0:  # evaluation-only stage (e.g. a zero-epoch baseline)
        rngs = gather_objects(rt, rng_state())
        if rt.is_main:
            save(LAST, checkpoint(0, 0, True, rngs))
    result.history = pd.DataFrame(history)
    if result.final is None and history:
        last_row = history[-1]
        result.final = {k[4:]: v for k, v in last_row.items() if k.startswith("val_")} or None
    if rt.is_main:
        if history and start_epoch >= stage_cfg.epochs:  # resumed from a finished last.pt: the process that wrote it
            _write_history(history, stage_dir, f"{cfg.run_name()} {stage}")  # may have died before the table
        summary = {"stage": stage, "epochs": stage_cfg.epochs, "res": stage_cfg.res, "best": {metric: best},
                   "final": result.final, "before": before, "decode": decode, "source": source}  # fmt: skip
        atomic_write_text(stage_dir / FINISHED, json.dumps(summary, indent=2))
    return result


def _require_finite_weights(model: nn.Module, epoch: int) -> None:
    """Every step's loss is checked, but an update that overflows on an epoch's last step leaves NaN weights with no
    loss after them to show it, and they would be saved, validated and marked finished."""
    learned = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
    if key := nonfinite_weight(model, learned):
        raise TrainingError(f"'{key}' became NaN or infinite in epoch {epoch}; lower --lr or disable --amp, then use "
                            "--force")  # fmt: skip


def _resumable_state(cfg: RunConfig, stage: str, stage_dir: Path) -> dict[str, Any] | None:
    """The interrupted run's ``last.pt`` to resume (None: a fresh start); a finished stage, or a checkpoint written
    with other settings, is refused (``--force`` starts over without calling this)."""
    _refuse_finished(stage_dir, stage)
    if not (stage_dir / LAST).is_file():
        return None
    state = load_checkpoint(stage_dir / LAST)
    conflicts = config_conflicts(state["config"], cfg, stage)
    if conflicts:
        raise ConfigError(
            f"{stage_dir}/{LAST} was written with other settings ({'; '.join(conflicts)}); "
            "rerun with the original settings to resume, or pass --force to restart"
        )
    return state


def check_model_settings(cfg: RunConfig, stage: str, world_size: int = 1) -> None:
    """A :class:`ConfigError` if the architecture cannot run the stage's resolution (or stage 2's tune policy, or a
    forced feature cache)."""
    meta = model_meta(cfg.model.arch)
    check_resolution(meta, (cfg.stage1 if stage == STAGE1 else cfg.stage2).res)
    if stage == STAGE1:
        return
    check_policy(meta, cfg.stage2.tune)
    if cfg.runtime.cache_features == "on":
        require_cacheable(cfg.stage2.augment, cfg.stage2.tune, world_size)
        if cfg.runtime.compile:
            raise ConfigError("--cache-features on: the cache cannot cut a compiled model; drop --compile or use "
                              "--cache-features auto or off")  # fmt: skip
        _require_cuttable(meta, cfg.stage2.tune)


def _require_cuttable(meta: ModelMeta, tune: str) -> None:
    """Whether ``meta.arch`` can be cut before ``tune``'s part, asked of a random-init copy on the CPU at its native
    size (where the cut is does not depend on the weights or the resolution)."""
    with torch.random.fork_rng(devices=[]):
        model = create_model(meta.arch, 2, None).eval()
        example = torch.randn(2, 3, meta.input_size, meta.input_size)
    set_trainable(model, tune)
    if split_model(model, tune, example) is None:
        raise ConfigError(f"--cache-features on: {meta.arch} cannot be cut before its tuned part for tune '{tune}' "
                          "(the log says why); use --cache-features auto or off")  # fmt: skip


def _refuse_finished(stage_dir: Path, stage: str) -> None:
    if is_finished(stage_dir):
        other = "another --name" if stage == STAGE1 else "another --test-res"
        raise RunExistsError(f"{stage_dir} is finished; pass --force to train it again (or choose {other})")


def _starting_model(
    cfg: RunConfig,
    stage: str,
    state: dict[str, Any] | None,
    stage_dir: Path,
    train_index: DatasetIndex,
    val_index: DatasetIndex,
) -> tuple[nn.Module, str]:
    """The model the stage trains (stage 1: the pretrained network with a new head; stage 2: stage 1's best.pt;
    either from ``state`` when resuming) and a line saying where it started from, for the log and the checkpoints."""
    run_dir = cfg.run_dir()
    if stage == STAGE1:
        model = create_model(cfg.model.arch, train_index.num_classes, cfg.model.weights if state is None else None)
        started_from = weights_file(cfg.model.arch, cfg.model.weights) if state is None else None
        source = f"weights {cfg.model.weights}" if cfg.model.weights else "random initialisation (no weights)"
        if started_from is not None:  # "imagenet" is whichever cache holds the file: record which one it was
            source += f" ({started_from}, {started_from.stat().st_size:,} bytes)"
    else:
        model, ckpt1, _ = load_stage_model(run_dir / STAGE1)
        check_classes(ckpt1, train_index, run_dir / STAGE1, run_dir / CONFIG_FILE)
        check_holdout(ckpt1, val_index, run_dir / STAGE1)
        source = f"stage 1 epoch {ckpt1['epoch']}"
    if state is not None:
        # with a weight average, "model" is the average and "trained" the optimiser's weights (fgvc.engine.ema)
        load_model_state(model, state.get("trained", state["model"]), stage_dir / LAST)
        use_saved_input(model, state)
        source = state.get("source", source)
    return model, source


def _training_module(
    model: nn.Module, rt: Runtime, runtime: RuntimeConfig, learns: bool, grad_accum: int, broadcast_buffers: bool
) -> nn.Module:
    """What the uncached loop calls: the model, in DDP when several processes learn, compiled on request, or with its
    steps replayed from CUDA graphs (``runtime.cuda_graph_train``) where they can be. Autograd starts at the first
    tuned module, so a frozen trunk records nothing without a no_grad wrapper."""
    net = model
    if rt.distributed and learns:
        net = DistributedDataParallel(net, device_ids=[rt.device.index] if rt.device.type == "cuda" else None,
                                      broadcast_buffers=broadcast_buffers)  # fmt: skip
    if runtime.cuda_graph_train and learns:
        why_not = training_graph_obstacle(rt, grad_accum, runtime.compile)
        if why_not is None:
            return GraphedTraining(net, rt.amp_dtype)
        log.info("runtime.cuda_graph_train: training without CUDA graphs, %s", why_not)
    return cast(nn.Module, torch.compile(net)) if runtime.compile else net


def training_graph_obstacle(rt: Runtime, grad_accum: int, compiled: bool) -> str | None:
    """Why a training step cannot be replayed from CUDA graphs here (None: it can)."""
    if compiled:
        return "under --compile (torch.compile makes its own choices)"
    if rt.device.type != "cuda":
        return f"CUDA graphs need a CUDA device, not {rt.device.type}"
    if rt.distributed:
        return "not under DDP (its gradient hooks run outside the graphs)"
    if grad_accum != 1:
        return f"grad_accum {grad_accum}: a replay overwrites the gradients a previous micro-batch left"
    return None


def _history_row(epoch: int, stats: EpochStats) -> dict[str, Any]:
    """One epoch's line of ``metrics.csv`` before validation adds its ``val_*`` columns."""
    return {
        "epoch": epoch,
        "train_loss": round(stats.loss, 5),
        "lr": stats.lr,
        "img_per_s": round(stats.images_per_s, 1),
        "seconds": round(stats.seconds, 1),
        "data_wait": round(stats.data_wait_share, 3),
        "skipped": stats.skipped,
    }


def _retire_old_results(run_dir: Path, stage_dir: Path, stage: str, force: bool) -> None:
    """Results the training about to start makes stale: with ``force`` the old model, and whatever was built on it.
    Its best.pt stays until the new run's first checkpoint is written (``save`` in :func:`_train_stage`)."""
    if force:  # called when the new run writes its first checkpoint: from then on the old one is not "the" result
        for path in _built_on_old_model(run_dir, stage_dir, stage):
            if path != stage_dir / BEST:
                shutil.rmtree(path) if path.is_dir() else path.unlink()
    # predictions of an unfinished or retrained model must not be reused
    shutil.rmtree(run_dir / "predictions" / stage_dir.name, ignore_errors=True)


def _built_on_old_model(run_dir: Path, stage_dir: Path, stage: str) -> list[Path]:
    """What a --force run retires: the stage's old model (its last.pt too: should the new run's first last.pt fail to
    be written, a rerun would resume the old one's and mark it finished beside the new best.pt), every sweep (one of
    its columns is that model), and for stage 1 every stage 2 adapted from it (no checkpoint left: predict and stage 2
    cannot pick them up) and all predictions."""
    paths = [stage_dir / FINISHED, stage_dir / BEST, stage_dir / LAST, *run_dir.glob("sweep-*.*")]
    if stage == STAGE1:
        paths += [old / name for old in run_dir.glob("stage2-*") for name in (FINISHED, LAST, BEST)]
        paths.append(run_dir / "predictions")
    else:
        paths.append(run_dir / "predictions" / stage_dir.name)
    return [path for path in paths if path.exists()]


def is_finished(stage_dir: Path) -> bool:
    return (stage_dir / FINISHED).is_file()


def stage2_split(cfg: RunConfig, rt: Runtime, model: nn.Module, stage_cfg: StageConfig) -> Split | None:
    """The model cut before its tuned part (for the feature cache), or None where it cannot be cut.

    None under ``--compile`` too: the trunk stops the model's forward with an exception, which compiled code cannot.
    """
    if stage_cfg.tune == "all" or cfg.runtime.compile:
        return None
    devices = [rt.device] if rt.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):  # a resumed run must draw the same random numbers as an unbroken one
        example = torch.randn(2, 3, stage_cfg.res, stage_cfg.res, device=rt.device).contiguous(
            memory_format=rt.memory_format
        )
    return split_model(model, stage_cfg.tune, example)


def _feature_cache(
    cfg: RunConfig,
    rt: Runtime,
    split: Split | None,
    stage_cfg: StageConfig,
    index: DatasetIndex,
    meta: ModelMeta,
    decode: str,
    progress: bool,
    stop: StopFlag,
) -> FeatureCache | None:
    """Stage 2 with the deterministic test augmentation: run the frozen trunk once, train the tail on its output.

    Raises :class:`fgvc.engine.loop.Stopped` when ``stop`` is set while the trunk runs."""
    mode = cfg.runtime.cache_features
    if mode == "off":
        return None
    should, reason = should_cache(mode, stage_cfg.augment, stage_cfg.tune, 0, 1, rt.world_size)
    if not should:  # wrong setting for a cache (random augmentation, several processes): no need to look further
        log.info(reason)
        return None
    if split is None:
        why = "under --compile" if cfg.runtime.compile else f"for tune '{stage_cfg.tune}' (the log says why)"
        if mode == "on":
            raise ConfigError(f"--cache-features on: {cfg.model.arch} cannot be cut before its tuned part {why}; "
                              "use --cache-features auto or off")  # fmt: skip
        log.info("feature cache not used: %s cannot be cut before its tuned part %s", cfg.model.arch, why)
        return None
    estimate = cache_bytes_estimate(split, len(index), stage_cfg.res, cache_dtype(rt))
    should, reason = should_cache(mode, stage_cfg.augment, stage_cfg.tune, estimate, default_budget_bytes(rt.device))
    log.info("%s (cut at %s)", reason, split.cut)
    if not should:
        return None
    loader, _, prepare = make_loader(cfg, rt, index, "test", stage_cfg.res, stage_cfg.batch_size, False, meta, decode)
    try:
        return compute_cache(split.trunk, loader, prepare, rt, progress=progress, stop=stop)
    finally:
        close_loader(loader)


def _prepare_bnstats(model: nn.Module, tune: str, restart: bool = True) -> Any:
    """For ``bnstats``: the last BN's statistics as one cumulative average over all the stage's passes; returns an
    undo (the momentum).

    Only the stage's start (``restart``) resets them: each later pass, with the random ``test2`` augmentation, adds
    samples. A resumed stage continues the average: the statistics and ``num_batches_tracked`` are in the checkpoint.
    """
    if tune != "bnstats":
        return lambda: None
    bn = dict(model.named_modules())[get_meta(model).last_bn]
    momentum = bn.momentum
    if restart:
        bn.reset_running_stats()
    bn.momentum = None

    def restore() -> None:
        bn.momentum = momentum

    return restore


def _fmt(metrics: dict[str, float] | None, metric: str) -> str:
    """Top-1, top-5, mean per-class accuracy, and the leaderboard's ``metric`` (best.pt's choice) if another."""
    if not metrics:
        return "n/a"
    shown = list(dict.fromkeys(("top1", "top5", "mean_per_class", metric)))
    return "  ".join(f"{METRIC_LABELS[name]} {metrics[name]:.2f}" for name in shown)


def _epoch_line(row: dict[str, Any], epochs: int, metric: str) -> str:
    val = ""
    if "val_top1" in row:
        val = " | val " + _fmt({k[4:]: v for k, v in row.items() if k.startswith("val_")}, metric)
    return (
        f"epoch {row['epoch']}/{epochs} | loss {row['train_loss']:.4f}  lr {row['lr']:.2e}  "
        f"{row['img_per_s']:.0f} img/s  {row['seconds']:.0f} s  data wait {row.get('data_wait', 0.0):.0%}{val}"
    )


INPUT_BOUND_SHARE = 0.2  # of an epoch spent waiting for batches, above which the log says what to change


def input_bound_hint(stats: EpochStats, workers: int, decode: str, device: torch.device) -> str | None:
    """A one-line suggestion when an epoch spent more than :data:`INPUT_BOUND_SHARE` of its time waiting for data.

    On CUDA with CPU decoding the first remedy is nvJPEG (``--decode gpu``), which frees the CPU of decoding and
    augmentation; otherwise more loader processes, up to the CPU cores per process.
    """
    share = stats.data_wait_share
    if share <= INPUT_BOUND_SHARE or stats.images == 0:
        return None
    remedies = [f"more --workers (now {workers} per process, {os.cpu_count()} CPUs)"]
    if device.type == "cuda" and decode == "cpu":
        remedies.insert(0, "--decode gpu")
    tries = " or ".join(remedies)
    return f"the model waited for images {share:.0%} of the epoch: the input pipeline sets the pace; try {tries}"


def _write_history(history: list[dict[str, Any]], stage_dir: Path, title: str) -> None:
    table = pd.DataFrame(history)
    atomic_write_text(stage_dir / "metrics.csv", table.to_csv(index=False))
    plot_training_curves(table, stage_dir / "curves.png", title)


# ---------------------------------------------------------------------------------------------------------------------
# Entry points used by the CLI


def run_stage1(cfg: RunConfig, force: bool = False, progress: bool = True) -> StageResult:
    """`fgvc stage1`: fine-tune the pretrained model on the dataset at ``cfg.stage1.res`` into ``<run>/stage1``.

    Resumes from ``last.pt`` when the folder holds an unfinished run with the same settings; ``force`` replaces a
    finished one (and what was built on it). ``cfg`` comes from :func:`fgvc.recipe.resolve_run_config` or
    ``RunConfig.model_validate({...})``; it is not changed.
    """
    return train_stage(cfg, STAGE1, force=force, progress=progress)


def stage2_config(run_dir: str | Path, overrides: dict[str, Any], resume: bool = True) -> RunConfig:
    """The run's saved config with the stage-2 section (and runtime knobs) overridden.

    With ``resume`` (not --force), where a stage 2 at the requested resolution has a checkpoint, its saved config is
    the base (its stage-2 section, runtime knobs, loader settings): `fgvc stage2 --run DIR --test-res R` resumes it with
    the settings it was started with, without retyping every flag. A --force run starts from the run's settings and
    the flags given.
    """
    require_run_folder(Path(run_dir))
    values = load_config(_stage2_base(Path(run_dir), overrides, resume)).model_dump(mode="json")
    cfg = with_overrides(values, overrides, "command line")
    # The run folder is the one given, wherever it lives now.
    return cfg.model_copy(update={"name": Path(run_dir).name, "out": str(Path(run_dir).parent)})


def _stage2_base(run_dir: Path, overrides: dict[str, Any], resume: bool) -> Path:
    """The config file :func:`stage2_config` starts from: the started stage 2's when resuming it, else the run's."""
    cfg_path = run_dir / CONFIG_FILE
    if not cfg_path.is_file():
        raise DataError(f"{run_dir}: no {CONFIG_FILE}; pass --run with a folder written by `fgvc stage1`")
    res = _override(overrides, "stage2", "res") or load_config(cfg_path).stage2.res
    started = run_dir / stage2_dirname(res)
    if resume and (started / LAST).is_file() and (started / CONFIG_FILE).is_file():
        return started / CONFIG_FILE
    return cfg_path


def require_saved_root(cfg: RunConfig, config_file: Path) -> None:
    """A run's saved dataset folder that is gone (the dataset moved, or the run was copied to another machine) is named
    as such, with the option that says where it is now, rather than as a mistyped path."""
    root = cfg.data.resolved_root()
    if cfg.data.root and not root.exists():
        raise DataError(f"{root}: the dataset this run was trained on is no longer there (data.root in {config_file}); "
                        "pass --data-root with the folder where it is now")  # fmt: skip


def run_stage2(
    run_dir: str | Path, overrides: dict[str, Any], force: bool = False, progress: bool = True
) -> StageResult:
    """`fgvc stage2`: adapt a finished stage 1 of ``run_dir`` to the test resolution into ``<run>/stage2-<res>``.

    ``overrides``: settings over the run's saved config, as dotted keys (``{"stage2.res": 672, "stage2.tune":
    "bn+fc"}``) or nested sections. Resumes and refuses to overwrite like :func:`run_stage1`.
    """
    run_dir = Path(run_dir)
    cfg = stage2_config(run_dir, overrides, resume=not force)
    if not (run_dir / STAGE1 / LAST).is_file():
        raise DataError(f"{run_dir}: stage 1 has no checkpoint; run `fgvc stage1` first")
    if not is_finished(run_dir / STAGE1):
        if who := lock_holder(run_dir / STAGE1):
            raise RunBusyError(f"{run_dir}: stage 1 is not finished, {who} is training it; run stage 2 once it ends")
        raise DataError(f"{run_dir}: stage 1 is not finished; rerun `fgvc stage1` with the same settings to finish it")
    if _override(overrides, "data", "root") is None:
        require_saved_root(cfg, _stage2_base(run_dir, overrides, resume=not force))
    return train_stage(cfg, "stage2", force=force, progress=progress)


def _override(overrides: dict[str, Any], section: str, key: str) -> Any:
    """The value ``overrides`` give ``section.key``, as a dotted key or in a nested section (None: not given)."""
    nested = overrides.get(section)
    dotted = overrides.get(f"{section}.{key}")
    return dotted if dotted is not None else nested.get(key) if isinstance(nested, dict) else None
