"""The training and inference loops shared by stage 1, stage 2, sweep and predict.

Batches arrive as uint8 tensors and are normalised on the device; the loop never sees the config or the CLI, only the
objects it works on.
"""

from __future__ import annotations

import math
import signal
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, nullcontext, suppress
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from fgvc.data import STOP_SIGNALS
from fgvc.engine.runtime import (
    Runtime,
    all_reduce_sum,
    any_rank,
    gather_objects,
    gather_rows_on_main,
    max_over_ranks,
)
from fgvc.errors import TrainingError
from fgvc.progress import progress_bar

if TYPE_CHECKING:
    from fgvc.engine.mixing import Mix

T = TypeVar("T")


class StopFlag:
    """Set by SIGINT/SIGTERM; the loop stops at the next optimiser step so that a checkpoint can be written."""

    def __init__(self) -> None:
        self.signum: int | None = None  # the signal this process received
        self.elsewhere: int | None = None  # the one another rank received, when only it did (stop_on_any_rank)

    def __bool__(self) -> bool:
        return self.signum is not None

    @property
    def number(self) -> int | None:
        """The signal that stopped the run, whichever rank received it: for the log and the exit code."""
        return self.signum or self.elsewhere


def stop_on_any_rank(rt: Runtime, stop: StopFlag) -> bool:
    """Whether any rank received a stop signal, on every rank (they stop at the same step). A rank that did not
    records the signal's number: rank 0 logged "signal None" and the command exited 143 for a SIGINT that reached
    another rank alone. (``signum`` stays unset: a later signal here is a first one, not an insisting second.)"""
    signum = max_over_ranks(rt, stop.signum or 0)
    if signum and not stop:
        stop.elsewhere = signum
    return bool(signum)


class Stopped(Exception):
    """An evaluation pass left early on a stop signal (every rank at the same batch): the caller saves and returns."""


INSIST_AFTER_S = 2.0  # a second signal sooner than this is the same stop request delivered twice


@contextmanager
def stop_on_signals() -> Iterator[StopFlag]:
    """Turn SIGINT/SIGTERM/SIGHUP into a flag for the duration of training (a second signal aborts at once). SIGHUP
    is a closed terminal or a dropped SSH session: it used to end the run without saving (up to an epoch lost).

    A second signal within ``INSIST_AFTER_S`` of the first is ignored: launchers and schedulers often deliver one stop
    twice (torchrun forwards a SIGINT and follows it with a SIGTERM; SLURM signals every process of a job and torchrun
    forwards it too), and aborting on it would lose the checkpoint that the first one asked for.
    """
    flag = StopFlag()
    previous = {}
    first_at = 0.0

    def handler(signum: int, _frame: object) -> None:
        nonlocal first_at
        if flag:
            if time.monotonic() - first_at < INSIST_AFTER_S:
                return
            raise KeyboardInterrupt  # a second request, later: the user insists
        flag.signum, first_at = signum, time.monotonic()

    for sig in STOP_SIGNALS:
        if sig == getattr(signal, "SIGHUP", None) and signal.getsignal(sig) == signal.SIG_IGN:
            continue  # `nohup`: the run is meant to outlive the terminal. (A shell's background job ignores SIGINT
            # too, yet an explicit `kill -INT` should still save a checkpoint: SIGINT and SIGTERM are always caught.)
        with suppress(ValueError):  # not in the main thread: leave signals alone
            previous[sig] = signal.signal(sig, handler)
    try:
        yield flag
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@dataclass
class EpochStats:
    loss: float
    images: int
    seconds: float
    lr: float
    skipped: int
    micro_steps: int  # micro-batches consumed in this epoch (including those before a resume)
    interrupted: bool = False
    data_wait_s: float = 0.0  # host time blocked on the loader, first batch included (see BatchWaits)
    first_batch_s: float = 0.0  # of which waiting for the first batch: the workers' start of the epoch

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0

    @property
    def data_wait_share(self) -> float:
        """Share of the epoch the host spent waiting for batches: near 0 when the loader keeps ahead of the model."""
        return self.data_wait_s / self.seconds if self.seconds > 0 else 0.0

    def after(self, earlier: EpochStats | None) -> EpochStats:
        """This part of an epoch joined to the part before an interruption (``earlier``, saved in the checkpoint),
        so that the epoch's row covers all of it: its loss, images, time and skipped images."""
        if earlier is None:
            return self
        images = earlier.images + self.images
        loss = (earlier.loss * earlier.images + self.loss * self.images) / max(images, 1)
        return replace(self, loss=loss, images=images, seconds=earlier.seconds + self.seconds,
                       skipped=earlier.skipped + self.skipped, data_wait_s=earlier.data_wait_s + self.data_wait_s,
                       first_batch_s=earlier.first_batch_s)  # fmt: skip


class BatchWaits:
    """Times how long each ``next()`` on a loader blocks: timm's "data time".

    The loop queues step k before it asks for batch k+1, so a wait shorter than a step can still leave the device
    busy; a share of the epoch that grows beyond a few percent means the input pipeline, not the model, sets the pace.
    """

    def __init__(self) -> None:
        self.seconds = 0.0
        self.first = 0.0

    def __call__(self, batches: Iterable[T]) -> Iterator[T]:
        iterator = iter(batches)
        first = True
        while True:
            started = time.perf_counter()
            try:
                item = next(iterator)
            except StopIteration:
                return
            waited = time.perf_counter() - started
            self.seconds += waited
            if first:
                self.first, first = waited, False
            yield item


class EpochOfBatches(Protocol):
    """What the training loop reads: a loader of one epoch, or one epoch of an :class:`fgvc.engine.epochs.EpochStream`
    (``len`` is the number of batches)."""

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[Any]: ...


@contextmanager
def _single_image_batch_explained(n_images: int) -> Iterator[None]:
    """A training-mode BatchNorm cannot normalise one value per channel: torch's error, for one image whose maps are
    1x1 (32 px at stride 32), becomes a line that says which settings lead there."""
    try:
        yield
    except ValueError as err:
        if n_images != 1 or "Expected more than 1 value per channel" not in str(err):
            raise
        raise TrainingError("a batch of one image reached a BatchNorm layer whose feature maps are 1x1 at this "
                            "resolution, which it cannot normalise (a batch size of 1, or a batch that unreadable "
                            "images left with one image); raise the stage's batch size (--batch-size) or resolution "
                            "(--res, --test-res)") from None  # fmt: skip


def train_one_epoch(
    model: nn.Module,
    loader: EpochOfBatches,
    optimizer: torch.optim.Optimizer | None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    scaler: torch.amp.GradScaler | None,
    rt: Runtime,
    prepare: Callable[[torch.Tensor], torch.Tensor],
    criterion: nn.Module,
    grad_accum: int = 1,
    stop: StopFlag | None = None,
    start_micro_step: int = 0,
    batch_size: int | None = None,
    samples: int | None = None,
    desc: str = "train",
    progress: bool = True,
    mix: Mix | None = None,
    after_step: Callable[[], None] | None = None,
) -> EpochStats:
    """One pass over ``loader``; with ``optimizer=None`` only forward passes run (BN statistics re-estimation).

    ``prepare`` turns a loader batch into the normalised device tensor (see :class:`fgvc.data.OnDeviceNormalize`);
    ``mix`` then mixes images and labels (Mixup / CutMix, :mod:`fgvc.engine.mixing`) for a soft-target ``criterion``.
    ``after_step`` runs after each optimiser step (the weight average's update, :mod:`fgvc.engine.ema`).

    Stops early, at an optimiser-step boundary, when ``stop`` is set; ``micro_steps`` then says where to resume.

    ``batch_size`` and ``samples`` (how many rows the sampler yields this epoch; the last batch may be short) let
    the stats count the images that were asked for but unreadable (``skipped``).
    """
    total_loss, seen, skipped, micro = 0.0, 0, 0, start_micro_step
    pending: tuple[HostCopy, int, int] | None = None  # (loss on its way to the host, images, step)
    batch_loss = float("nan")
    started = time.perf_counter()
    bar = progress_bar(loader, desc=desc, enabled=progress and rt.is_main)
    steps_in_loader = len(loader)
    waits = BatchWaits()
    for i, (images, labels, _idx) in enumerate(waits(bar)):
        if batch_size is not None:
            requested = batch_size if samples is None else min(batch_size, samples - i * batch_size)
            skipped += requested - len(labels)
        boundary = (i + 1) % grad_accum == 0 or i + 1 == steps_in_loader
        # each optimiser step averages its own group's losses: the epoch's last group may hold fewer than grad_accum
        # micro-batches (a resume starts on a group boundary, so the groups are the same as an unbroken run's)
        group = min(grad_accum, steps_in_loader - (i - i % grad_accum))
        # A batch whose images were all unreadable is skipped, by every rank at once (DDP steps in lockstep).
        empty = any_rank(rt, len(labels) == 0) if rt.distributed else len(labels) == 0
        if empty:  # the accumulation group still ends here: its step and the schedule's must not be lost
            if boundary and optimizer is not None:
                _step_without_last_batch(optimizer, scaler, scheduler, rt)
                if after_step is not None:  # also where only the schedule advanced: one update per scheduler step
                    after_step()
        else:
            x = prepare(images)
            y = labels.to(rt.device, non_blocking=True)
            if mix is not None:
                x, y = mix(x, y)
            if optimizer is None:
                with torch.no_grad(), rt.autocast(), _single_image_batch_explained(len(labels)):
                    loss = criterion(model(x), y)
            else:
                defer_sync = rt.distributed and not boundary and hasattr(model, "no_sync")
                sync = cast(Any, model).no_sync() if defer_sync else nullcontext()  # DDP, maybe compiled
                with sync:
                    with rt.autocast(), _single_image_batch_explained(len(labels)):
                        loss = criterion(model(x), y)
                    scaled = loss / group
                    (scaler.scale(scaled) if scaler else scaled).backward()
                if boundary:
                    optimizer_step(optimizer, scaler, scheduler)
                    if after_step is not None:
                        after_step()
            # The loss is read one step late, from a copy that step queued: waiting for it waits for that step only,
            # while this one is already queued, so the device does not idle while the host prepares the next batch.
            if pending is not None:
                batch_loss = _read_loss(pending[0], pending[2])
                total_loss += batch_loss * pending[1]
            pending = (to_host_async(loss.detach()), len(labels), micro + 1)
            seen += len(labels)
        micro += 1
        elapsed = time.perf_counter() - started
        lr = optimizer.param_groups[0]["lr"] if optimizer is not None else 0.0
        shown = "-" if math.isnan(batch_loss) else f"{batch_loss:.3f}"  # nan: the first loss is read a step late
        # shown at the bar's own refresh (10 per second): refreshing at every step writes ~100 bytes per step to stderr
        bar.set_postfix(loss=shown, lr=f"{lr:.2e}", img_s=f"{seen * rt.world_size / elapsed:.0f}", refresh=False)
        if boundary and stop is not None and stop_on_any_rank(rt, stop):  # all ranks stop at the same step
            if pending is not None:
                total_loss += _read_loss(pending[0], pending[2]) * pending[1]
            return _epoch_stats(rt, total_loss, seen, skipped, started, lr, micro, waits, interrupted=True)
    if pending is not None:
        total_loss += _read_loss(pending[0], pending[2]) * pending[1]
    lr = optimizer.param_groups[0]["lr"] if optimizer is not None else 0.0
    return _epoch_stats(rt, total_loss, seen, skipped, started, lr, micro, waits)


def _epoch_stats(
    rt: Runtime,
    total_loss: float,
    seen: int,
    skipped: int,
    started: float,
    lr: float,
    micro: int,
    waits: BatchWaits,
    interrupted: bool = False,
) -> EpochStats:
    """The epoch (or its part before an interruption) over every rank's shard; every rank calls it."""
    loss_sum, seen_sum, skipped_sum = all_reduce_sum(rt, [total_loss, seen, skipped])
    seen, skipped = int(seen_sum), int(skipped_sum)
    return EpochStats(loss_sum / max(seen, 1), seen, time.perf_counter() - started, lr, skipped, micro,
                      interrupted=interrupted, data_wait_s=waits.seconds, first_batch_s=waits.first)  # fmt: skip


def _step_without_last_batch(
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    rt: Runtime,
) -> None:
    """The optimiser step of an accumulation group whose last batch was unreadable on every rank.

    The group's earlier batches left gradients: they are applied, averaged over the ranks by hand, since DDP averages
    them in the backward pass of a boundary batch, which did not run. Without any, only the schedule advances, so that
    the learning rate still follows the steps of the epoch.
    """
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if not grads:
        if scheduler is not None:
            scheduler.step()
        return
    if rt.distributed:
        for grad in grads:
            torch.distributed.all_reduce(grad)
            grad /= rt.world_size
    optimizer_step(optimizer, scaler, scheduler)


HostCopy = tuple[torch.Tensor, "torch.cuda.Event | None"]


def to_host_async(value: torch.Tensor) -> HostCopy:
    """Start copying ``value`` to (pinned) host memory; read it after :func:`host_value` waited for the copy.

    ``.item()`` / ``.cpu()`` would wait for everything queued on the stream, including the steps queued after this one.
    """
    if value.device.type != "cuda":
        return value, None
    host = torch.empty(value.shape, dtype=value.dtype, pin_memory=True)
    host.copy_(value, non_blocking=True)
    done = torch.cuda.Event()
    done.record()
    return host, done


def host_value(copy: HostCopy) -> torch.Tensor:
    """The host tensor of :func:`to_host_async`, once its copy has completed."""
    host, done = copy
    if done is not None:
        done.synchronize()
    return host


def _read_loss(copy: HostCopy, step: int) -> float:
    """The loss of one step as a float (waits for that step only); a diverged loss is a one-line error."""
    value = host_value(copy).item()
    if not math.isfinite(value):
        raise TrainingError(f"loss is {value} at step {step}; lower --lr or disable --amp, then use --force")
    return value


def optimizer_step(
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
) -> None:
    """Apply the accumulated gradients (through the fp16 grad scaler when there is one) and advance the schedule."""
    if scaler:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if scheduler is not None:
        scheduler.step()


def _views_probs(model: nn.Module, x: torch.Tensor, tta: str, channels_last: bool) -> torch.Tensor:
    """Softmax probabilities averaged over the TTA views of each image; ``x`` is (B,3,H,W) or (B,V,3,H,W)."""
    if x.dim() == 5:  # pre-made views (ten-crop): one batched forward over all of them
        b, v = x.shape[:2]
        flat = x.flatten(0, 1)
        if channels_last:
            flat = flat.contiguous(memory_format=torch.channels_last)
        probs = F.softmax(model(flat).float(), dim=1)
        return probs.view(b, v, -1).mean(1)
    if tta == "flip":
        probs = F.softmax(model(torch.cat([x, x.flip(3)])).float(), dim=1)
        return probs.view(2, x.shape[0], -1).mean(0)
    return F.softmax(model(x).float(), dim=1)


@torch.no_grad()
def predict_probs(
    model: nn.Module,
    loader: DataLoader,
    rt: Runtime,
    prepare: Callable[[torch.Tensor], torch.Tensor],
    tta: str = "none",
    desc: str = "eval",
    progress: bool = True,
    waits: BatchWaits | None = None,
    stop: StopFlag | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Class probabilities for every image of the loader's dataset, gathered on rank 0.

    Returns ``(probs (N, C) float32, dataset indices (N,))`` sorted by dataset index; images dropped as corrupt are
    absent from the indices. Under DDP the other ranks get empty arrays (:func:`gather_rows_on_main`). ``waits``,
    when given, times the loader (see :class:`BatchWaits`).

    Raises :class:`Stopped` once ``stop`` is set (training's validation: a scheduler's grace period after SIGTERM is
    shorter than a large validation split). The ranks' shards may differ by a batch: they agree on the batches all
    of them have, so the check is a collective every rank reaches.
    """
    model.eval()
    rows = _Rows(len(loader))
    indices: list[np.ndarray] = []
    pending: HostCopy | None = None
    checked = 0 if stop is None else min(gather_objects(rt, len(loader)))
    bar = progress_bar(loader, desc=desc, enabled=progress and rt.is_main)
    for i, (images, _labels, idx) in enumerate((waits or BatchWaits())(bar)):
        if i < checked and stop is not None and stop_on_any_rank(rt, stop):
            raise Stopped
        if len(idx) == 0:
            continue
        x = prepare(images)
        with rt.autocast():
            probs = _views_probs(model, x, tta, rt.channels_last)
        # Read back one batch late, for the same reason as the loss in train_one_epoch: the device keeps working.
        if pending is not None:
            rows.append(host_value(pending).numpy())  # copied out: the pinned buffer goes back to its pool
        pending = to_host_async(probs)
        indices.append(idx.numpy())
    if pending is not None:
        rows.append(host_value(pending).numpy())
    probs_all = rows.filled()
    idx_all = np.concatenate(indices) if indices else np.zeros(0, np.int64)
    if rt.distributed:  # rank 0 alone holds the whole matrix
        return gather_rows_on_main(rt, probs_all, idx_all)
    if not (np.diff(idx_all) > 0).all():  # a loader that reads in dataset order needs no reordered copy
        order = np.argsort(idx_all, kind="stable")
        probs_all, idx_all = probs_all[order], idx_all[order]
    return probs_all, idx_all


class _Rows:
    """Probability rows appended into one array, sized from the first batch times the number of batches.

    A list of per-batch chunks concatenated at the end holds every row twice; at iNat 2021's 500,000 x 10,000 test
    matrix that is 40 GB instead of 20.
    """

    def __init__(self, batches: int) -> None:
        self.batches = batches
        self.array: np.ndarray | None = None
        self.count = 0

    def append(self, block: np.ndarray) -> None:
        if self.array is None:
            self.array = np.empty((max(self.batches, 1) * len(block), block.shape[1]), dtype=np.float32)
        if self.count + len(block) > len(self.array):  # a later batch larger than the first: grow (rare)
            grown = np.empty((2 * len(self.array) + len(block), self.array.shape[1]), dtype=np.float32)
            grown[: self.count] = self.array[: self.count]
            self.array = grown
        self.array[self.count : self.count + len(block)] = block
        self.count += len(block)

    def filled(self) -> np.ndarray:
        return self.array[: self.count] if self.array is not None else np.zeros((0, 0), np.float32)
