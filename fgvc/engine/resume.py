"""Whether a stage run may continue from its ``last.pt``, and the state it continues with.

A checkpoint written with other settings, by another number of processes or with other parameters learning is refused
(``--force`` starts over). Its classes and validation hold-out are compared with the dataset's by the stage itself
(:func:`fgvc.engine.checkpoint.check_classes`, :func:`fgvc.engine.checkpoint.check_holdout`), as for any checkpoint.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fgvc.config import LAST, STAGE1, ModelConfig, RunConfig, StageConfig
from fgvc.engine.checkpoint import load_checkpoint, set_rng_state
from fgvc.engine.loop import EpochStats
from fgvc.engine.run_folder import refuse_finished
from fgvc.engine.runtime import Runtime
from fgvc.errors import ConfigError

log = logging.getLogger("fgvc")


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
        if (sec, key) == ("model", "weights"):  # one file, named relative to the working directory or not
            old, new = (ModelConfig(weights=value).resolved_weights() for value in (old, new))
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


def resumable_state(cfg: RunConfig, stage: str, stage_dir: Path) -> dict[str, Any] | None:
    """The interrupted run's ``last.pt`` to resume (None: a fresh start); a finished stage, or a checkpoint written
    with other settings, is refused (``--force`` starts over without calling this)."""
    refuse_finished(stage_dir, stage)
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


@dataclass
class StartPoint:
    """Where a stage run starts: the epoch and micro-batch, the epochs already done and best.pt's score so far."""

    metric: str  # what best.pt is chosen on: the dataset's leaderboard metric
    best: float = -1.0  # best.pt's score on it (unrounded, unlike the history's copy)
    start_epoch: int = 0
    start_micro: int = 0  # micro-batches of start_epoch already trained
    history: list[dict[str, Any]] = field(default_factory=list)  # metrics.csv's rows
    before: dict[str, float] | None = None  # stage 2: the stage-1 model at the test resolution
    partial: EpochStats | None = None  # the interrupted epoch's part before the stop


def resume_training(
    state: dict[str, Any],
    stage_dir: Path,
    learning: list[str],
    optimizer: torch.optim.Optimizer | None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    scaler: torch.amp.GradScaler | None,
    rt: Runtime,
    metric: str,
    what: str,
) -> StartPoint:
    """Load ``state`` (a ``last.pt``) into this run's optimiser, schedule, grad scaler and random generators, and
    return where it had got to. ``learning``: the names of the parameters that learn now; ``what``: the architecture
    and tune policy, for the message when those differ from the checkpoint's."""
    if state.get("learning", learning) != learning:  # the optimiser state would go to other parameters
        raise ConfigError(
            f"{stage_dir}/{LAST} was trained with other parameters learning ({_differ(state['learning'], learning)}"
            f"): fgvc's choice for {what} changed since; pass --force to restart"
        )
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    if (then := state.get("world_size", 1)) != rt.world_size:
        again = "without --gpus" if then == 1 else f"with --gpus {then} (or as many torchrun processes)"
        raise ConfigError(
            f"{stage_dir}/{LAST} was written by {_processes(then)}, this run has {rt.world_size}: the schedule and "
            f"data position would not match; resume {again}, or pass --force to start over"
        )
    point = StartPoint(metric, start_epoch=state["epoch"], start_micro=state["micro_step"], history=state["history"],
                       before=state.get("before"))  # fmt: skip
    saved_best = state.get("best", -1.0)
    if isinstance(saved_best, dict) and metric in saved_best:
        point.best = saved_best[metric]
    else:  # written by an fgvc that kept best.pt on top-1: this run goes on choosing the way it started
        point.metric, point.best = "top1", float(saved_best) if not isinstance(saved_best, dict) else -1.0
    if point.start_micro and state.get("partial"):
        point.partial = EpochStats(**state["partial"])
    rngs = state["rng"]  # one per rank (a dict: written by an fgvc that saved rank 0's only)
    set_rng_state(rngs[rt.rank] if isinstance(rngs, list) else rngs)
    return point


def _processes(count: int) -> str:
    return f"{count} process" if count == 1 else f"{count} processes"
