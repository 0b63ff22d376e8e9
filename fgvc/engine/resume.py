"""Whether a stage run may continue from its ``last.pt``, and the state it continues with.

A checkpoint written with other settings, for other classes, by another number of processes or with other parameters
learning is refused (``--force`` starts over); a validation hold-out that changed since is warned about.
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fgvc.config import RunConfig, StageConfig
from fgvc.datasets.base import DatasetIndex
from fgvc.engine.checkpoint import LAST, load_checkpoint, set_rng_state
from fgvc.engine.loop import EpochStats
from fgvc.engine.run_folder import STAGE1, refuse_finished
from fgvc.engine.runtime import Runtime
from fgvc.errors import ConfigError, DataError

log = logging.getLogger("fgvc")


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
class Progress:
    """Where a stage run stands: the epoch and optimiser step it starts at, the epochs done and best.pt's score."""

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
) -> Progress:
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
    if state.get("world_size", 1) != rt.world_size:
        raise ConfigError(
            f"{stage_dir}/{LAST} was written by {state.get('world_size', 1)} processes, this run has "
            f"{rt.world_size}: the schedule and data position would not match; resume with "
            f"{state.get('world_size', 1)} processes or pass --force"
        )
    progress = Progress(metric, start_epoch=state["epoch"], start_micro=state["micro_step"], history=state["history"],
                        before=state.get("before"))  # fmt: skip
    saved_best = state.get("best", -1.0)
    if isinstance(saved_best, dict) and metric in saved_best:
        progress.best = saved_best[metric]
    else:  # written by an fgvc that kept best.pt on top-1: this run goes on choosing the way it started
        progress.metric, progress.best = "top1", float(saved_best) if not isinstance(saved_best, dict) else -1.0
    if progress.start_micro and state.get("partial"):
        progress.partial = EpochStats(**state["partial"])
    rngs = state["rng"]  # one per rank (a dict: written by an fgvc that saved rank 0's only)
    set_rng_state(rngs[rt.rank] if isinstance(rngs, list) else rngs)
    return progress
