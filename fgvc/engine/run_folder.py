"""A run folder and its stage folders: their names, whether a stage is finished, which process may write one (its
lock), and what a retraining retires, which goes only once the new run has a checkpoint of its own.

Layout::

    runs/<name>/config.yaml         the run's resolved config (stage 1's)
    runs/<name>/stage1/             config.yaml, last.pt, best.pt, metrics.csv, curves.png, train.log, finished.json
    runs/<name>/stage2-<res>/       the same for each test resolution
    runs/<name>/predictions/<stage folder>/   probability files
    runs/<name>/sweep-<split>.*     the resolution sweep's table
"""

from __future__ import annotations

import logging
import shutil
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from fgvc.config import (
    BEST,
    CONFIG_FILE,
    FINISHED,
    LAST,
    STAGE1,
    STAGE2_PREFIX,
    RunConfig,
    save_config,
    stage2_dirname,
)
from fgvc.engine.checkpoint import save_checkpoint
from fgvc.engine.lock import holder as lock_holder
from fgvc.engine.lock import stage_lock
from fgvc.engine.runtime import Runtime, broadcast_from_main
from fgvc.errors import ConfigError, DataError, RunBusyError, RunExistsError
from fgvc.fileio import remove_if_abandoned

log = logging.getLogger("fgvc")


def claim_folder(rt: Runtime, stage_dir: Path, stage: str, opened: ExitStack) -> None:
    """Rank 0 holds the stage folder's lock until the call ends (:mod:`fgvc.engine.lock`), and a stage 2 its stage 1's
    folder's shared lock; every rank raises if another process trains there, or, for stage 1, adapts its model in a
    stage 2 that a retraining would retire."""
    busy, failure = None, None
    if rt.is_main:
        adapting = [(d, who) for d in sorted(stage_dir.parent.glob(f"{STAGE2_PREFIX}*")) if (who := lock_holder(d))]
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


def refuse_finished(stage_dir: Path, stage: str) -> None:
    """A finished stage, or for a stage 1 that has no checkpoint, stage-2 models adapted from an earlier one (its
    folder deleted): a new stage 1 would leave them marked finished, and predict and train would use them."""
    if is_finished(stage_dir):
        other = "another --name" if stage == STAGE1 else "another --test-res"
        raise RunExistsError(f"{stage_dir} is finished; pass --force to train it again (or choose {other})")
    if stage == STAGE1 and (orphaned := orphaned_stage2s(stage_dir.parent)):
        raise RunExistsError(f"{stage_dir.parent}: {', '.join(orphaned)} adapted an earlier stage 1 that is gone; "
                             "pass --force to train stage 1 again and retire them (or choose another --name)")


def orphaned_stage2s(run_dir: Path) -> list[str]:
    """The run's stage-2 folders holding a model (or its start) while stage 1 has no checkpoint: they adapted an
    earlier stage 1 whose folder was deleted, and a new stage 1 would leave them looking like its own. A finished
    stage 1 whose last.pt was deleted to save space (its best.pt kept) is no new stage 1."""
    if (run_dir / STAGE1 / LAST).is_file() or is_finished(run_dir / STAGE1):
        return []
    folders = sorted(run_dir.glob(f"{STAGE2_PREFIX}*"))
    return [d.name for d in folders if any((d / name).is_file() for name in (FINISHED, BEST, LAST))]


def require_saved_root(cfg: RunConfig, config_file: Path) -> None:
    """A run's saved dataset folder that is gone (the dataset moved, or the run was copied to another machine) is named
    as such, with the option that says where it is now, rather than as a mistyped path."""
    root = cfg.data.resolved_root()
    if cfg.data.root and not root.exists():
        raise DataError(f"{root}: the dataset this run was trained on is no longer there (data.root in {config_file}); "
                        "pass --data-root with the folder where it is now")  # fmt: skip


def latest_run(out: str | Path = "runs") -> Path:
    """The run folder whose stage-1 checkpoint was written last, named in the log: runs trained with another ``--out``
    are not under ``out``, and the newest one there may be another run than the user's."""
    candidates = sorted(Path(out).glob(f"*/{STAGE1}/{LAST}"), key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise DataError(f"{out}: no stage-1 run found; run `fgvc stage1` first or pass --run DIR")
    run_dir = candidates[-1].parent.parent
    log.info("no --run: %s, the newest stage-1 run under %s/ (--run DIR picks another, e.g. one trained with --out)",
             run_dir, out)  # fmt: skip
    return run_dir


def require_run_folder(run_dir: Path) -> None:
    """``--run runs/X/stage1`` (a stage folder, where the run folder is meant) said "stage 1 has no checkpoint; run
    `fgvc stage1` first" of a stage that has one."""
    stage_name = run_dir.name == STAGE1 or run_dir.name.startswith(STAGE2_PREFIX)
    if stage_name and (run_dir.parent / STAGE1).is_dir() and not (run_dir / STAGE1).is_dir():  # a run named stage1
        raise ConfigError(f"{run_dir}: a stage folder; pass the run folder that holds it: --run {run_dir.parent}")


def retire_old_results(run_dir: Path, stage_dir: Path, stage: str, force: bool) -> None:
    """Results the training about to start makes stale: with ``force`` the old model, and whatever was built on it.
    Its best.pt stays until the new run's first checkpoint is written (:meth:`StageWriter.save`)."""
    if force:  # called when the new run writes its first checkpoint: from then on the old one is not "the" result
        for path in built_on_old_model(run_dir, stage_dir, stage):
            if path != stage_dir / BEST:
                shutil.rmtree(path) if path.is_dir() else path.unlink()
    # predictions of an unfinished or retrained model must not be reused
    shutil.rmtree(run_dir / "predictions" / stage_dir.name, ignore_errors=True)


def built_on_old_model(run_dir: Path, stage_dir: Path, stage: str) -> list[Path]:
    """What a --force run retires: the stage's old model (its last.pt too: should the new run's first last.pt fail to
    be written, a rerun would resume the old one's and mark it finished beside the new best.pt), every sweep (one of
    its columns is that model), and for stage 1 every stage 2 adapted from it (no checkpoint left: predict and stage 2
    cannot pick them up) and all predictions."""
    paths = [stage_dir / FINISHED, stage_dir / BEST, stage_dir / LAST, *run_dir.glob("sweep-*.*")]
    if stage == STAGE1:
        paths += [old / name for old in run_dir.glob(f"{STAGE2_PREFIX}*") for name in (FINISHED, LAST, BEST)]
        paths.append(run_dir / "predictions")
    else:
        paths.append(run_dir / "predictions" / stage_dir.name)
    return [path for path in paths if path.exists()]


def is_finished(stage_dir: Path) -> bool:
    return (stage_dir / FINISHED).is_file()


class StageWriter:
    """Writes a stage run's checkpoints (rank 0 only calls it); the first write claims the folder.

    Before the first checkpoint, and not earlier, the old results (with ``force``) and whatever was built on them go
    and this run's config is written: a run that fails before it has a checkpoint of its own (a corrupt image in the
    first epoch, a crash) leaves the folder as it found it. The old best.pt goes only once the first checkpoint is
    written (the new best.pt replaces it), so that a write that fails (a full disk) leaves the old model.
    """

    def __init__(self, cfg: RunConfig, stage: str, force: bool, resumed: bool) -> None:
        self.cfg, self.stage, self.force, self.resumed = cfg, stage, force, resumed
        self.run_dir, self.stage_dir = cfg.run_dir(), stage_folder(cfg, stage)
        self.claimed = False
        # --force over earlier results: an interruption before this run's first checkpoint saves nothing rather than
        # claim the folder with a step or two of training
        self.guarded = force and bool(built_on_old_model(self.run_dir, self.stage_dir, stage))

    def save(self, name: str, ckpt: dict[str, Any]) -> None:
        """Write ``ckpt`` as ``name`` (best.pt, last.pt) in the stage folder, atomically."""
        if not self.claimed:
            retire_old_results(self.run_dir, self.stage_dir, self.stage, self.force)
            for stale in self.stage_dir.glob(".*.tmp"):  # half-written by a process killed mid-write (SIGKILL, OOM)
                remove_if_abandoned(stale)
            if not self.resumed:
                self.stage_dir.mkdir(parents=True, exist_ok=True)
                save_config(self.cfg, self.stage_dir / CONFIG_FILE)
                if self.stage == STAGE1:
                    save_config(self.cfg, self.run_dir / CONFIG_FILE)
        save_checkpoint(self.stage_dir / name, ckpt)
        if not self.claimed and not self.resumed and name != BEST:
            (self.stage_dir / BEST).unlink(missing_ok=True)  # not this run's model (a --force run's, or a failed one's)
        self.claimed = True
