"""Stage 1 and stage 2 of the FixRes recipe: one training routine, two configurations.

Stage 1 fine-tunes the whole ImageNet-pretrained network at the train resolution with RandomResizedCrop. Stage 2 loads
the stage-1 weights, freezes all but the tuned parts (``tune`` policy from the model registry) and fine-tunes at the
test resolution with the test-time augmentation. Both resume from ``last.pt`` after an interruption.

The routine reads in the order it runs: claim the stage folder, read the data, build the model, its loaders and
optimiser, resume or start, train epoch by epoch, checkpoint. Its parts live in modules of their own: the run folder
and its lock (:mod:`fgvc.engine.run_folder`), whether and how a stage resumes (:mod:`fgvc.engine.resume`), the loaders
(:mod:`fgvc.engine.loaders`), the optimiser and schedule (:mod:`fgvc.engine.optim`), the step loop
(:mod:`fgvc.engine.loop`) and what the user is told (:mod:`fgvc.engine.report`).
"""

from __future__ import annotations

import json
import logging
import math
import signal
import warnings
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

import pandas as pd
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from fgvc.config import (
    BEST,
    CONFIG_FILE,
    FINISHED,
    LAST,
    STAGE1,
    RunConfig,
    RuntimeConfig,
    StageConfig,
    load_config,
    stage2_dirname,
    with_overrides,
)
from fgvc.data import (
    close_loader,
)
from fgvc.datasets.base import DatasetIndex
from fgvc.engine.checkpoint import (
    check_classes,
    check_holdout,
    class_info,
    holdout_digest,
    load_model_state,
    load_stage_model,
    rng_state,
    saved_input,
    use_saved_input,
)
from fgvc.engine.ema import WeightAverage
from fgvc.engine.epochs import EpochStream, epoch_batches
from fgvc.engine.feature_cache import (
    FeatureCache,
    Split,
    cache_bytes_estimate,
    compute_cache,
    default_budget_bytes,
    require_cacheable,
    should_cache,
    split_model,
    train_one_epoch_cached,
)
from fgvc.engine.graphs import GraphedTraining
from fgvc.engine.loaders import load_split, make_loader, resolve_decode
from fgvc.engine.lock import holder as lock_holder
from fgvc.engine.loop import StopFlag, Stopped, predict_probs, stop_on_any_rank, stop_on_signals, train_one_epoch
from fgvc.engine.mixing import build_mixing
from fgvc.engine.optim import build_optimizer, build_scheduler
from fgvc.engine.report import epoch_line, format_metrics, history_row, input_bound_hint, write_history
from fgvc.engine.resume import StartPoint, resumable_state, resume_training
from fgvc.engine.run_folder import (
    StageWriter,
    claim_folder,
    is_finished,
    refuse_finished,
    require_run_folder,
    require_saved_root,
    stage_folder,
)
from fgvc.engine.runtime import (
    Runtime,
    barrier,
    broadcast_from_main,
    gather_objects,
    settings_restored,
    setup_runtime,
)
from fgvc.errors import ConfigError, DataError, RunBusyError, TrainingError
from fgvc.fileio import atomic_write_text
from fgvc.logs import run_log
from fgvc.metrics import METRIC_LABELS, summarize
from fgvc.models import (
    ModelMeta,
    check_policy,
    check_resolution,
    create_model,
    get_meta,
    model_meta,
    set_train_mode,
    set_trainable,
    unwrap_model,
    weights_file,
)
from fgvc.models.weights import nonfinite_weight
from fgvc.submission import leaderboard_metric

log = logging.getLogger("fgvc")


@dataclass
class StageResult:
    """What a stage run produced."""

    stage_dir: Path
    history: pd.DataFrame
    before: dict[str, float] | None = None  # stage 2: the stage-1 model at the test resolution
    final: dict[str, float] | None = None  # validation metrics of the last epoch
    interrupted_by: int | None = None  # signal number when stopped by SIGINT/SIGTERM
    metric: str = "top1"  # what best.pt was chosen on: the dataset's leaderboard metric
    chosen: bool = True  # False: best.pt is the last epoch (data.train_on_all trains on the val split)

    def best_epoch(self) -> dict[str, Any] | None:
        """The history row of the epoch ``best.pt`` holds (the first with the best validation ``metric``), if one was
        chosen."""
        column = f"val_{self.metric}"
        if not self.chosen or column not in self.history or self.history[column].isna().all():
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
# The stage runner


def train_stage(cfg: RunConfig, stage: str, force: bool = False, progress: bool = True) -> StageResult:
    """Train stage 1 (``stage="stage1"``) or stage 2 (``"stage2"``) as configured; resume when possible.

    SIGINT/SIGTERM are caught from the start: training stops at the next optimiser step and saves ``last.pt``.
    """
    cfg = cfg.model_copy(deep=True)  # the run fills in settings (data.root); the caller's object stays as given
    stage_dir = stage_folder(cfg, stage)
    with stop_on_signals() as stop, run_log(stage_dir / "train.log"), settings_restored(), ExitStack() as opened:
        return _train_stage(cfg, stage, force, progress, stop, opened)


def _train_stage(
    cfg: RunConfig, stage: str, force: bool, progress: bool, stop: StopFlag, opened: ExitStack
) -> StageResult:
    """``opened`` ends the loaders' worker processes however the call ends (an error's traceback, which a notebook
    keeps, would otherwise keep them alive)."""
    stage_cfg = cfg.stage1 if stage == STAGE1 else cfg.stage2
    stage_dir = stage_folder(cfg, stage)
    rt = setup_runtime(cfg.runtime)
    if not force:
        refuse_finished(stage_dir, stage)  # said first: a finished stage's lock may be held by a stage 2 adapting it
    claim_folder(rt, stage_dir, stage, opened)

    state = None if force else resumable_state(cfg, stage, stage_dir)
    check_model_settings(cfg, stage, rt.world_size)  # before a long dataset read, as is a missing weights file:
    if stage == STAGE1 and state is None:
        weights_file(cfg.model.arch, cfg.model.weights)
    train_index, val_index = load_split(cfg, "train"), load_split(cfg, "val")
    if len(train_index) == 0:  # an empty or cut metadata file: epochs of nothing would end "finished"
        name, root = cfg.data.dataset, cfg.data.resolved_root()
        raise DataError(f"{root}: the {name} train split lists no images; re-extract its metadata files (`fgvc "
                        f"datasets check {name} --root {root}` checks them)")  # fmt: skip
    if state is not None:  # the same classes (a --data-root whose class folders changed would shift every label)
        if "classes" in state:
            check_classes(state, train_index, stage_dir, None)
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
        log.info("interrupted by signal %s during %s; nothing new to save; %s", stop.number, during, again)
        return StageResult(stage_dir=stage_dir, history=pd.DataFrame(history), before=before, metric=metric,
                           interrupted_by=stop.number or signal.SIGTERM)  # fmt: skip

    train_batches = epoch_batches(train_loader)
    steps_per_epoch = max(1, math.ceil(train_batches.batches_in() / stage_cfg.grad_accum))
    lr = stage_cfg.resolved_lr(rt.world_size)
    optimizer = build_optimizer(model, stage_cfg, lr)
    scheduler = build_scheduler(optimizer, stage_cfg, steps_per_epoch) if optimizer else None
    scaler = torch.amp.GradScaler("cuda") if rt.needs_grad_scaler and optimizer else None
    mix, criterion = build_mixing(stage_cfg, num_classes)
    if stage != STAGE1 and cfg.runtime.cache_features == "on":
        require_cacheable(stage_cfg.augment, stage_cfg.tune, rt.world_size)
    metric = leaderboard_metric(cfg.data.dataset)  # best.pt is the epoch the leaderboard would rank highest
    chooses = bool(len(val_index)) and not cfg.data.train_on_all  # else best.pt is the last epoch
    if len(val_index) and cfg.data.train_on_all:
        log.info("data.train_on_all: the val split is trained on, so its scores are scores on training images and "
                 "best.pt is the last epoch, not the best-scoring one")  # fmt: skip
    learning = [name for name, param in unwrap_model(model).named_parameters() if param.requires_grad]
    if state is not None:
        position = resume_training(state, stage_dir, learning, optimizer, scheduler, scaler, rt, metric,
                                   f"{cfg.model.arch} / tune {stage_cfg.tune}")  # fmt: skip
    else:
        position = StartPoint(metric)
    start_epoch, start_micro, history, before = (position.start_epoch, position.start_micro, position.history,
                                                 position.before)  # fmt: skip
    metric, best, partial = position.metric, position.best, position.partial
    # saved as the file it names: every checkpoint's config must resume from any directory (the resume check compared
    # the resolved files, so a resumed run's relative path names the saved one)
    cfg.model.weights = cfg.model.resolved_weights()
    if state is not None:
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
            log.info("stage-1 model at %d px before adaptation: %s", stage_cfg.res, format_metrics(before, metric))

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info(
        "%s %s: %s on %s | %d train / %d val images, %d classes | res %d, aug %s, tune %s (%.2fM trainable) | "
        "lr %.3g, batch %d x%d x accum %d%s | from %s",
        stage, cfg.run_name(), cfg.model.arch, rt.describe(), len(train_index), len(val_index), num_classes,
        stage_cfg.res, stage_cfg.augment, stage_cfg.tune, trainable / 1e6, lr, stage_cfg.batch_size,
        rt.world_size, stage_cfg.grad_accum, f" | weight average {stage_cfg.ema_decay:g}" if average else "", source,
    )  # fmt: skip

    writer = StageWriter(cfg, stage, force, resumed=state is not None)  # the old results go at its first checkpoint

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
        log.info(epoch_line(row, stage_cfg.epochs, metric) + (" | val cut short" if pending else ""))
        rngs = gather_objects(rt, rng_state())
        if rt.is_main:
            state_now = checkpoint(done, 0, done == stage_cfg.epochs and not pending, rngs) | {"val_pending": pending}
            if improved or not chooses:
                keep = ("model", "arch", "input", "num_classes", "classes", "holdout", "config", "epoch", "res",
                        "stage", "best")  # fmt: skip
                writer.save(BEST, {k: state_now[k] for k in keep} | {"metrics": metrics})
            writer.save(LAST, state_now)
            write_history(history, stage_dir, f"{cfg.run_name()} {stage}")
        barrier(rt)
        return pending

    result = StageResult(stage_dir=stage_dir, history=pd.DataFrame(history), before=before, metric=metric,
                         chosen=chooses)  # fmt: skip
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
        if rt.distributed:
            _average_bn_over_ranks(model, average, rt.world_size, keep_rank0=stats.interrupted and broadcast_buffers)
        if stats.interrupted:
            rngs = gather_objects(rt, rng_state())
            result.interrupted_by = stop.number or signal.SIGTERM
            result.history = pd.DataFrame(history)  # with this call's epochs
            if not rt.is_main:  # rank 0 writes, and logs
                return result
            if writer.guarded and not writer.claimed:  # a Ctrl-C just after a mistaken --force keeps the old models
                log.info("interrupted by signal %s before the first epoch of this --force run ended: nothing saved, "
                         "the earlier results in %s are untouched (rerun with --force to retrain it)", stop.number,
                         stage_dir)  # fmt: skip
                return result
            writer.save(LAST, checkpoint(epoch, stats.micro_steps, False, rngs) | {"partial": asdict(stats)})
            log.info("interrupted by signal %s: saved %s (epoch %d, step %d); %s", stop.number, stage_dir / LAST,
                     epoch + 1, stats.micro_steps, resume_hint)  # fmt: skip
            return result
        history.append(history_row(epoch + 1, stats))
        due = bool(len(val_index)) and ((epoch + 1) % stage_cfg.val_every == 0 or epoch + 1 == stage_cfg.epochs)
        pending = record_epoch(epoch + 1, validate() if due else None, due)
        if not input_hint_given and (hint := input_bound_hint(stats, cfg.data.workers, decode, rt.device)):
            log.info(hint)
            input_hint_given = True
        if stop_on_any_rank(rt, stop):
            after = f"epoch {epoch + 1}" + (" (its validation runs first on resume)" if pending else "")
            log.info("interrupted by signal %s after %s; %s", stop.number, after, resume_hint)
            result.interrupted_by = stop.number or signal.SIGTERM
            result.history = pd.DataFrame(history)  # with this call's epochs
            return result
    if stage_cfg.epochs == 0:  # evaluation-only stage (e.g. a zero-epoch baseline)
        rngs = gather_objects(rt, rng_state())
        if rt.is_main:
            writer.save(LAST, checkpoint(0, 0, True, rngs))
    result.history = pd.DataFrame(history)
    if result.final is None and history:
        last_row = history[-1]
        result.final = {k[4:]: v for k, v in last_row.items() if k.startswith("val_")} or None
    if rt.is_main:
        if history and start_epoch >= stage_cfg.epochs:  # resumed from a finished last.pt: the process that wrote it
            write_history(history, stage_dir, f"{cfg.run_name()} {stage}")  # may have died before the table
        summary = {"stage": stage, "epochs": stage_cfg.epochs, "res": stage_cfg.res, "best": {metric: best},
                   "final": result.final, "before": before, "decode": decode, "source": source}  # fmt: skip
        atomic_write_text(stage_dir / FINISHED, json.dumps(summary, indent=2))
    return result


def _average_bn_over_ranks(model: nn.Module, average: WeightAverage | None, world_size: int, keep_rank0: bool) -> None:
    """Each rank saw its own shard: average the BN statistics so that the saved model uses them all.

    ``keep_rank0`` (an interruption in stage 1) leaves the model's: there DDP copies rank 0's buffers to every rank
    before each forward, so rank 0's (saved in last.pt) are what an uninterrupted run would have continued from. The
    weight average's are averaged in every case: each rank's average took in its own statistics (timm's train.py
    averages them too), and the update is linear, so averaging at an interruption ends the epoch at the same mean as
    averaging later.
    """
    from timm.utils import distribute_bn

    if not keep_rank0:
        distribute_bn(model, world_size, reduce=True)
    if average is not None:
        distribute_bn(average.module, world_size, reduce=True)


def _require_finite_weights(model: nn.Module, epoch: int) -> None:
    """Every step's loss is checked, but an update that overflows on an epoch's last step leaves NaN weights with no
    loss after them to show it, and they would be saved, validated and marked finished."""
    learned = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
    if key := nonfinite_weight(model, learned):
        raise TrainingError(f"'{key}' became NaN or infinite in epoch {epoch}; lower --lr or disable --amp, then use "
                            "--force")  # fmt: skip


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
        if ckpt1["arch"] != cfg.model.arch:  # the run's config.yaml edited: its checkpoints would name another model
            raise ConfigError(f"{run_dir / CONFIG_FILE}: model.arch is {cfg.model.arch}, but stage 1 trained "
                              f"{ckpt1['arch']}; stage 2 adapts that model: set model.arch back to {ckpt1['arch']} "
                              f"(another architecture is another run: `fgvc stage1 --arch`)")  # fmt: skip
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
        with warnings.catch_warnings():  # torch 2.14 deprecates the argument, yet its warning says to keep it for
            # False (its successor still syncs the buffers at the start: no equivalent yet); printed by every rank
            warnings.filterwarnings("ignore", message="`broadcast_buffers` is deprecated", category=FutureWarning)
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
    return split_model(model, stage_cfg.tune, example, rt.autocast)


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
    estimate = cache_bytes_estimate(split, len(index), stage_cfg.res, split.feature_dtype)
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
