"""Test-time prediction: a trained stage -> a probability file.

Each image is decoded once; its TTA views (none, flip, or the ten crops) go through the network as one batch on the
device and their softmax outputs are averaged. Results are cached as
``<run>/predictions/<stage>/<split>-<res>-<tta>.npz`` and reused, so ensembles and sweeps never recompute what exists.
"""

from __future__ import annotations

import functools
import json
import logging
import re
from collections.abc import Iterable
from contextlib import suppress
from dataclasses import dataclass, replace
from pathlib import Path
from typing import cast, get_args

import numpy as np
import torch
from torch import nn

from fgvc.config import (
    BEST,
    CONFIG_FILE,
    FINISHED,
    LAST,
    STAGE1,
    STAGE2_PREFIX,
    TTA,
    load_config,
    stage2_dirname,
    with_overrides,
)
from fgvc.data import close_loader
from fgvc.datasets.base import DatasetIndex
from fgvc.engine.checkpoint import check_classes, check_holdout, file_identity, find_stage_checkpoint, load_stage_model
from fgvc.engine.graphs import MIN_BATCHES_TO_CAPTURE, GraphedInference
from fgvc.engine.launch import already_distributed
from fgvc.engine.loaders import load_split, make_loader
from fgvc.engine.lock import holder as lock_holder
from fgvc.engine.loop import predict_probs
from fgvc.engine.run_folder import is_finished, require_run_folder, require_saved_root
from fgvc.engine.runtime import (
    Runtime,
    broadcast_from_main,
    device_problem,
    is_main_process,
    settings_restored,
    setup_runtime,
)
from fgvc.ensemble import combine_members, equal_weights
from fgvc.errors import ConfigError, DataError, WeightsError
from fgvc.fileio import require_writable
from fgvc.io import decode_image
from fgvc.metrics import summarize
from fgvc.models import check_resolution, get_meta, model_meta
from fgvc.probs import Probabilities, as_stored, nonfinite_rows
from fgvc.transforms import tencrop_images_per_batch

log = logging.getLogger("fgvc")
TTA_CHOICES: tuple[str, ...] = get_args(TTA)


@dataclass
class PredictResult:
    path: Path
    probs: Probabilities | None  # None on the ranks but rank 0 of a DDP run: rank 0 holds and writes the matrix
    metrics: dict[str, float] | None
    cached: bool

    def held_probs(self) -> Probabilities:
        """``probs`` where this process holds them (one process, or rank 0), for callers that combine them."""
        if self.probs is None:
            raise RuntimeError(f"{self.path}: only rank 0 of a DDP run holds the probabilities")
        return self.probs


def stage_dirs(run_dir: Path) -> list[Path]:
    """Stage folders with a checkpoint: stage1 first, then stage2-<res> by resolution (finished or not)."""
    found = [
        d
        for d in run_dir.glob("stage*")
        if re.fullmatch(rf"{STAGE1}|{STAGE2_PREFIX}\d+", d.name) and ((d / LAST).is_file() or (d / BEST).is_file())
    ]
    return sorted(found, key=lambda d: (d.name != STAGE1, stage2_res(d) if d.name != STAGE1 else 0))


def stage2_res(stage_dir: Path) -> int:
    """The resolution a ``stage2-<res>`` folder was adapted to."""
    return int(stage_dir.name.split("-")[-1])


def finished_stage_dirs(run_dir: Path) -> list[Path]:
    """:func:`stage_dirs` without the interrupted stages, each skipped with a warning that says how to finish it."""
    finished = []
    for stage_dir in stage_dirs(run_dir):
        if is_finished(stage_dir):
            finished.append(stage_dir)
        else:  # its checkpoint is a model halfway through its training
            log.warning("skipped %s", unfinished_hint(stage_dir))
    return finished


def unfinished_hint(stage_dir: Path) -> str:
    """How to finish an interrupted stage, for an error message or a log line."""
    run_dir = stage_dir.parent
    if who := lock_holder(stage_dir):
        return f"{stage_dir} is not finished: {who} is training it now"
    if stage_dir.name == STAGE1:
        return f"{stage_dir} is not finished: `fgvc stage1 --recipe {run_dir / CONFIG_FILE}` resumes it"
    return f"{stage_dir} is not finished: `fgvc stage2 --run {run_dir} --test-res {stage2_res(stage_dir)}` resumes it"


def resolve_stage(run_dir: Path, stage: int | None, res: int | None) -> Path:
    """The stage folder meant by ``--stage`` (default: stage 2 when present) and ``--res``.

    Without ``--stage`` only finished stages are chosen: an interrupted one's checkpoint is a model halfway through its
    training, and is skipped with a warning that says how to finish it. Naming the stage (``--stage 1``, or
    ``--stage 2`` with the resolution of an unfinished stage 2, or when no stage 2 has finished) uses it anyway, with
    that warning: a run stopped early on purpose stays usable.
    """
    require_run_folder(run_dir)
    dirs = stage_dirs(run_dir)
    if not dirs:
        raise DataError(f"{run_dir}: no trained stage; run `fgvc stage1` (and `fgvc stage2`) first")
    stage1, named = run_dir / STAGE1, run_dir / stage2_dirname(res) if res is not None else None
    stage2 = [d for d in dirs if d.name != STAGE1]
    finished2 = [d for d in stage2 if is_finished(d)]
    if stage == 1 or (stage is None and not finished2):
        for skipped in stage2 if stage is None else []:  # every stage 2 is unfinished: say so, and how to use one
            log.warning("skipped %s (--stage 2 --res %s uses it as it is)", unfinished_hint(skipped),
                        stage2_res(skipped))  # fmt: skip
        if stage1 not in dirs:
            raise DataError(f"{run_dir}: stage 1 has no checkpoint; run `fgvc stage1` first")
        if not is_finished(stage1) and stage is None:
            raise DataError(f"{unfinished_hint(stage1)}, or name it with --stage 1 to predict with it as it is")
        return _warn_if_unfinished(stage1)
    if not stage2:
        raise DataError(f"{run_dir}: no stage-2 run; run `fgvc stage2 --run {run_dir} --test-res R` first")
    if stage == 2 and (named in stage2 or not finished2):  # named, or the only ones there are: used as they are
        return _warn_if_unfinished(named if named in stage2 else stage2[-1])
    for skipped in (d for d in stage2 if d not in finished2):
        log.warning("skipped %s (--stage 2 --res %s uses it as it is)", unfinished_hint(skipped),
                    stage2_res(skipped))  # fmt: skip
    if named in finished2:
        return named
    return finished2[-1] if res is None else min(finished2, key=lambda d: abs(stage2_res(d) - res))


def _warn_if_unfinished(stage_dir: Path) -> Path:
    if not is_finished(stage_dir):
        log.warning("predicting with an unfinished stage: %s", unfinished_hint(stage_dir))
    return stage_dir


def stage_decode(stage_dir: Path, rt: Runtime) -> str:
    """Decode test images the way the stage was trained (the GPU path resamples slightly differently)."""
    finished = stage_dir / FINISHED
    try:
        trained = json.loads(finished.read_text()).get("decode", "cpu") if finished.is_file() else "cpu"
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        raise DataError(f"{finished}: damaged; delete it and rerun the command that trained this stage, which "
                        "rewrites it from the finished last.pt without training again") from None  # fmt: skip
    if trained != "gpu":
        return "cpu"
    from fgvc.gpu_decode import gpu_decode_available

    if gpu_decode_available(rt.device):
        return "gpu"
    log.info("%s decoded its JPEGs on the GPU, which %s cannot here: decoding on the CPU (its resizing differs "
             "slightly)", stage_dir, rt.device)  # fmt: skip
    return "cpu"


def _checkpoint_identity(stage_dir: Path) -> str:
    """Which weights produced a prediction: the checkpoint file's name, size and modification time."""
    path = find_stage_checkpoint(stage_dir)
    return file_identity(path.name, path.stat())


def _same_ids(cached: np.ndarray, current: np.ndarray) -> bool:
    """A cached file is reused only for exactly the images (and order) the split has now."""
    return len(cached) == len(current) and bool((cached.astype(str) == current.astype(str)).all())


def prediction_path(run_dir: Path, stage_dir: Path, split: str, res: int | str, tta: str) -> Path:
    return run_dir / "predictions" / stage_dir.name / f"{split}-{res}-{tta}.npz"


@settings_restored()  # seeds, cuDNN switches: the caller's again once it returns
def predict_stage(
    stage_dir: str | Path,
    split: str,
    res: int,
    tta: str,
    batch_size: int | None = None,
    workers: int | None = None,
    force: bool = False,
    progress: bool = True,
    compile_model: bool | None = None,
    skip_corrupt: bool | None = None,
    data_root: str | Path | None = None,
    cuda_graph: bool | None = None,
    device: str | None = None,
) -> PredictResult:
    """Probabilities of one stage's model on one split at one resolution (cached).

    ``compile_model``: ``torch.compile`` the network (None: as the stage was trained, ``runtime.compile``); it pays
    when the test set is large enough to amortise the compilation (see the README's Performance section).
    ``cuda_graph``: replay the forward from a CUDA graph, one launch per batch (None: ``runtime.cuda_graph``; ignored
    off CUDA and when compiling); see :mod:`fgvc.engine.graphs`.
    ``skip_corrupt``: give unreadable images uniform probabilities instead of stopping (None: as the stage was
    trained); the file records them, and a later call recomputes it once any of them reads.
    ``data_root``: where the dataset is now (None: where the stage was trained on it).
    ``device``: where the pass runs (None: :func:`prediction_device`).
    """
    stage_dir = Path(stage_dir)
    if tta not in TTA_CHOICES:
        raise ConfigError(f"unknown --tta '{tta}'; choose one of {', '.join(TTA_CHOICES)}")
    run_dir = stage_dir.parent
    path = prediction_path(run_dir, stage_dir, split, res, tta)
    saved = load_config(stage_dir / CONFIG_FILE)
    arguments = {"data.workers": workers, "data.skip_corrupt": skip_corrupt,
                 "data.root": str(data_root) if data_root is not None else None}  # None: as the stage was trained
    cfg = with_overrides(saved.model_dump(mode="json"), arguments, "the prediction's arguments")
    cfg.runtime.device = prediction_device(device, cfg.runtime.device)
    if data_root is None:
        require_saved_root(cfg, stage_dir / CONFIG_FILE)
    index = load_split(cfg, split)
    if not len(index):
        notes = f" ({'; '.join(index.notes)})" if index.notes else ""
        raise DataError(f"{cfg.data.resolved_root()}: the {split} split has no images{notes}; check the dataset folder")
    cached = None if force or not is_main_process() else _cached_probabilities(path, stage_dir, index)
    if cached is not None and not already_distributed():  # reading the file needs no device
        return PredictResult(path, cached, _metrics(cached), True)
    rt = setup_runtime(cfg.runtime)
    if broadcast_from_main(rt, cached is not None):  # rank 0 decides: every rank must take the same branch
        return PredictResult(path, cached, broadcast_from_main(rt, _metrics(cached)), True)

    require_writable(path.parent)  # read-only storage fails now, not after the pass (hours at iNat's size)
    model, ckpt, identity = load_stage_model(stage_dir)
    check_classes(ckpt, index, stage_dir, stage_dir / CONFIG_FILE)
    check_holdout(ckpt, index, stage_dir)
    rt.place(model)
    meta = get_meta(model)
    batch = batch_size or cfg.predict.batch_size
    if tta == "tencrop":
        batch = tencrop_images_per_batch(batch)
    kind = "tencrop" if tta == "tencrop" else "test"
    decode = stage_decode(stage_dir, rt)
    loader, _, prepare = make_loader(cfg, rt, index, kind, res, batch, False, meta, decode)
    compiled = cfg.runtime.compile if compile_model is None else compile_model
    graphed = cfg.runtime.cuda_graph if cuda_graph is None else cuda_graph
    # a short pass (a small holdout, a sweep's split) would spend more on the capture than its replays save
    net = inference_network(model, rt, compiled, graphed and len(loader) >= MIN_BATCHES_TO_CAPTURE)
    try:
        scores, idx = predict_probs(net, loader, rt, prepare, tta=tta, desc=f"{split}@{res}/{tta}", progress=progress)
    finally:
        close_loader(loader)
    if not rt.is_main:  # the metrics come once rank 0 has written the file
        return PredictResult(path, None, broadcast_from_main(rt, None), False)
    n_images = len(index)
    unreadable: list[int] = []
    if len(idx) == n_images:  # every image read (idx is sorted and unique): the rows are already in place
        full = scores
    else:
        full = np.full((n_images, index.num_classes), 1.0 / index.num_classes, dtype=np.float32)
        if len(idx):
            full[idx] = scores
        unreadable = np.setdiff1d(np.arange(n_images), idx).tolist()
        log.warning("%d unreadable images got uniform probabilities so that every id has a row", len(unreadable))
    if bad := nonfinite_rows(full):  # NaN weights: a file of them would pass for predictions and reach a submission
        raise WeightsError(f"{find_stage_checkpoint(stage_dir)}: the model gives NaN or infinite probabilities for "
                           f"{bad} of {n_images} images (a diverged or damaged model); retrain the stage")  # fmt: skip
    frame = index.frame
    probs = Probabilities(
        probs=as_stored(full, in_place=True),  # exactly what the file holds, so reruns agree with it
        image_ids=frame["image_id"].to_numpy(),
        labels=frame["label"].to_numpy(),
        category_ids=np.asarray(ckpt["classes"]["category_ids"]),
        class_names=np.asarray(ckpt["classes"]["names"]),
        meta={
            "run": str(run_dir),
            "stage": stage_dir.name,
            "arch": ckpt["arch"],
            "dataset": cfg.data.dataset,
            "split": split,
            "res": res,
            "tta": tta,
            "checkpoint": identity,  # the file read, even if training has replaced it since
            "unreadable": unreadable,  # rows: the file is recomputed once one of them reads
        },
    )
    probs.save(path)
    return PredictResult(path, probs, broadcast_from_main(rt, _metrics(probs)), False)


def prediction_device(asked: str | None, trained_on: str | None) -> str | None:
    """Where a prediction runs: ``asked``; else the stage's own device where this machine and this launch can use it;
    else None (a GPU where there is one). A run trained on a server's ``cuda:1`` is often predicted elsewhere."""
    if asked is not None or not trained_on:
        return asked
    if device_problem(trained_on) is None:
        if trained_on == "cpu" and torch.cuda.is_available():
            _say_once("the stage was trained on the CPU: predicting there too")
        return trained_on
    _say_once(f"the stage was trained on {trained_on}, which this machine or launch cannot use: predicting on what it "
              "has")  # fmt: skip
    return None


@functools.cache
def _say_once(what: str) -> None:
    """Once per process: a sweep or an ensemble predicts many times from the same stages."""
    log.info("%s (--device, or runtime.device in a recipe, chooses)", what)


def _metrics(probs: Probabilities | None) -> dict[str, float] | None:
    """Accuracy figures where the split has labels (None on a DDP rank that holds no matrix)."""
    if probs is None or not probs.has_labels:
        return None
    if unreadable := probs.meta.get("unreadable"):
        log.info("the %d unreadable images are not scored", len(unreadable))
    return summarize(probs.probs, probs.scored_labels())


def _cached_probabilities(path: Path, stage_dir: Path, index: DatasetIndex) -> Probabilities | None:
    """The file at ``path`` if this checkpoint computed it for these images; else None (the reason is logged).

    A file this checkpoint computed for other images is a finished result (hours of 10-crop at iNat's size) of another
    copy or version of the split: a ``DataError`` rather than a silent recompute over it (``--force`` replaces it).
    One of another checkpoint is stale (retraining removes them; a copied run folder can still hold one)."""
    if not path.is_file():
        return None
    try:
        probs = Probabilities.load(path)
    except DataError:  # a cache: damaged, or written by an older fgvc, it is simply recomputed
        log.info("%s cannot be read (an older fgvc's format, or damaged): recomputing", path)
        return None
    same_images = _same_ids(probs.image_ids, index.frame["image_id"].to_numpy())
    same_classes = _same_ids(probs.category_ids, np.asarray(index.category_ids))  # else check_classes explains
    if probs.meta.get("checkpoint") != _checkpoint_identity(stage_dir):
        log.info("%s was computed by another checkpoint: recomputing", path)
        return None
    if not same_classes:  # the model's classes are not the dataset's any more: check_classes refuses the pass
        return None
    if not same_images:
        now = set(index.frame["image_id"].astype(str))
        gone = sum(str(image_id) not in now for image_id in probs.image_ids)
        raise DataError(f"{path}: computed by this checkpoint for other images ({len(probs.image_ids)}, {gone} of "
                        f"them not in the {len(index)} the split has now: another copy or version of the dataset, or "
                        "--data-root); move the file away, or `fgvc predict ... --force` replaces it")  # fmt: skip
    return probs if _still_unreadable(path, probs, index) else None


def inference_network(model: nn.Module, rt: Runtime, compile_model: bool, cuda_graph: bool) -> nn.Module:
    """What prediction runs: the model compiled, its forward replayed from a CUDA graph (on CUDA only), or the model.

    Compiling wins when both are asked: a compiled forward is another program to capture, and ``torch.compile`` has
    its own graph mode (``mode="reduce-overhead"``).
    """
    if compile_model:
        return cast(nn.Module, torch.compile(model))
    if cuda_graph and rt.device.type == "cuda":
        return GraphedInference(model, rt.amp_dtype)
    return model


def predict(
    run_dir: str | Path,
    split: str = "test",
    stage: int | None = None,
    res: int | None = None,
    tta: str | None = None,
    multi_res: list[int] | None = None,
    batch_size: int | None = None,
    workers: int | None = None,
    force: bool = False,
    progress: bool = True,
    compile_model: bool | None = None,
    skip_corrupt: bool | None = None,
    data_root: str | Path | None = None,
    cuda_graph: bool | None = None,
    device: str | None = None,
) -> PredictResult:
    """`fgvc predict`: one stage, one split, one or several resolutions (their softmax outputs averaged).

    ``tta`` None: the run's ``predict.tta`` (``tencrop`` unless its recipe says otherwise).
    """
    run_dir = Path(run_dir)
    if stage not in (None, 1, 2):
        raise ConfigError(f"--stage is 1 or 2, not {stage}")
    if res is not None and multi_res:
        raise ConfigError("--res and --multi-res both choose the resolution; give one (--multi-res 640,672 averages)")
    require_positive(("--res", res), ("--batch-size", batch_size), *(("--multi-res", r) for r in multi_res or []))
    stage_dir = resolve_stage(run_dir, stage, res if not multi_res else multi_res[0])
    cfg = load_config(stage_dir / CONFIG_FILE)
    default_res = stage2_res(stage_dir) if stage_dir.name != STAGE1 else cfg.stage1.res
    resolutions = multi_res or [res or default_res]
    require_resolutions(cfg.model.arch, resolutions)
    tta = tta or cfg.predict.tta
    if cfg.data.train_on_all and split == "val" and is_main_process():  # as sweep says (ensembles say it once)
        log.warning("%s: data.train_on_all is set, so the val split was trained on and its scores are scores on "
                    "training images", run_dir)  # fmt: skip
    options = (batch_size, workers, force, progress, compile_model, skip_corrupt, data_root, cuda_graph, device)
    if len(resolutions) == 1:
        return predict_stage(stage_dir, split, resolutions[0], tta, *options)
    path = prediction_path(run_dir, stage_dir, split, "+".join(str(r) for r in resolutions), tta)
    if not is_main_process():  # this rank helps compute each resolution; rank 0 averages and writes them
        for r in resolutions:
            predict_stage(stage_dir, split, r, tta, *options)
        return PredictResult(path, None, None, cached=False)
    parts = (  # one resolution's matrix in memory at a time, next to the running mean
        predict_stage(stage_dir, split, r, tta, *options).held_probs() for r in resolutions
    )
    averaged = mean_over_resolutions(parts, resolutions)
    averaged.save(path)
    return PredictResult(path, averaged, _metrics(averaged), cached=False)  # the average is written anew each time


def require_resolutions(arch: str, resolutions: Iterable[int]) -> None:
    """Every resolution checked before the first pass: with several (--multi-res, a sweep) a bad last one used to be
    refused only after the passes before it (hours at iNat's size)."""
    meta = model_meta(arch)
    for res in resolutions:
        check_resolution(meta, res)


def require_positive(*named: tuple[str, int | None]) -> None:
    """A one-line error for the first option given a value below 1 (None: not given)."""
    for name, value in named:
        if value is not None and value < 1:
            raise ConfigError(f"{name} must be a positive number, not {value}")


def mean_over_resolutions(parts: Iterable[Probabilities], resolutions: list[int]) -> Probabilities:
    """The mean of one model's probabilities at several test resolutions (meta ``res`` "a+b"), taken one matrix at a
    time: ``parts`` may be a generator that predicts or loads each."""
    mean = combine_members(parts, equal_weights(len(resolutions)))
    return replace(mean, meta=mean.meta | {"res": "+".join(str(r) for r in resolutions)})


def _still_unreadable(path: Path, probs: Probabilities, index: DatasetIndex) -> bool:
    """Whether the images ``path`` gave uniform probabilities (unreadable then) are all still unreadable: a file
    re-downloaded since makes the cached rows wrong, so the file is recomputed."""
    rows = probs.meta.get("unreadable") or []
    if not rows:
        return True
    paths = index.frame["path"].to_numpy()
    readable = 0
    for row in rows:
        with suppress(DataError):
            decode_image(paths[row])
            readable += 1
    if readable:
        log.info("%s: %d of the %d images unreadable when it was computed read now: recomputing", path, readable,
                 len(rows))  # fmt: skip
        return False
    log.warning("%s: reused with %d unreadable images at uniform probabilities", path, len(rows))
    return True
