"""Whole-competition workflows on top of the stages: train every recipe member, then ensemble them into a CSV.

Members talk to the ensemble only through probability files (:mod:`fgvc.probs`), computed on demand and cached.
"""

from __future__ import annotations

import datetime as dt
import itertools
import logging
import os
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd

from fgvc.config import CONFIG_FILE, LAST, STAGE1, load_config, stage2_dirname
from fgvc.engine.loaders import load_split
from fgvc.engine.lock import holder as lock_holder
from fgvc.engine.lock import stage_lock
from fgvc.engine.resume import config_conflicts
from fgvc.engine.run_folder import is_finished, orphaned_stage2s
from fgvc.engine.stage import check_model_settings, run_stage1, run_stage2
from fgvc.ensemble import align, combine, combine_members, resolve_weights
from fgvc.errors import ConfigError, DataError, RunExistsError, WeightsError
from fgvc.fileio import owner_tag, require_writable
from fgvc.metrics import summarize
from fgvc.models import check_resolution, model_meta, weights_file
from fgvc.predict import mean_over_resolutions, predict_stage, stage_dirs
from fgvc.probs import Probabilities
from fgvc.recipe import Member, Recipe, load_recipe, member_train_command, select_members
from fgvc.submission import (
    SubmissionError,
    check_submission,
    competition_spec,
    read_checked_sample,
    write_submission,
)

log = logging.getLogger("fgvc")


def member_stage_dir(member: Member) -> Path:
    return member_steps(member)[-1][1]


def member_steps(member: Member) -> list[tuple[str, Path]]:
    """The member's stages in training order, each with its folder: stage 1, and stage 2 for a stage-2 member."""
    run_dir = member.config.run_dir()
    steps = [(STAGE1, run_dir / STAGE1)]
    if member.stage == 2:
        steps.append(("stage2", run_dir / stage2_dirname(member.config.stage2.res)))
    return steps


@dataclass
class ChangedStage:
    """A member's stage, finished or interrupted, that was trained with settings the recipe no longer has."""

    stage: str
    state: str  # "finished" or "interrupted"
    conflicts: list[str]


def changed_stage(member: Member) -> ChangedStage | None:
    """The member's first stage, finished or interrupted (a ``last.pt`` to resume), trained with settings the recipe
    no longer has; None when every such stage is the recipe's. An interrupted one counts: its stage would refuse to
    resume only once the members before it had trained, and the ``--force`` it asks for would retrain them too."""
    for stage, stage_dir in member_steps(member):
        finished = is_finished(stage_dir)
        if (finished or (stage_dir / LAST).is_file()) and (stage_dir / CONFIG_FILE).is_file():
            saved = load_config(stage_dir / CONFIG_FILE).model_dump(mode="json")  # written with its first checkpoint
            if conflicts := config_conflicts(saved, member.config, stage):
                return ChangedStage(stage, "finished" if finished else "interrupted", conflicts)
    return None


def retrained_stages(member: Member, force: bool) -> list[str]:
    """The member's stages a train run redoes even when finished: none without ``force``; with it, those from the
    first stage whose settings the recipe changed (stage 2 alone when only its settings changed: stage 1 can be days
    of work), else every stage."""
    if not force:
        return []
    stages = [stage for stage, _ in member_steps(member)]
    changed = changed_stage(member)
    return stages[stages.index(changed.stage) :] if changed else stages


def refuse_changed_members(recipe: Recipe, members: list[Member]) -> None:
    """A stage trained with settings the recipe no longer has (edited since, or another recipe sharing the run folder)
    is not the recipe's model: neither skipped nor resumed by training, nor used by the ensemble. Checked for every
    member before any work starts, so that one error lists them all, with the members alone in the command it gives."""
    changed: list[tuple[Member, str]] = []
    for member in members:
        if found := changed_stage(member):  # a changed stage 1 is retrained with its stage 2: one line is enough
            only = " (stage 2 alone: stage 1 is the recipe's)" if found.stage != STAGE1 else ""
            changed.append((member, f"member {member.name}: {found.stage} {found.state} with other settings "
                                    f"({'; '.join(found.conflicts)}){only}"))  # fmt: skip
    if not changed:
        return
    command = member_train_command(recipe, *(member for member, _ in changed))
    raise ConfigError(f"{recipe.source}: {'; '.join(why for _, why in changed)}; retrain "
                      f"{'it' if len(changed) == 1 else 'them'} with `{command} --force`")  # fmt: skip


def refuse_orphaned_stage2s(recipe: Recipe, members: list[Member]) -> None:
    """Stage-2 models under a member's deleted stage 1 (:func:`~fgvc.engine.run_folder.orphaned_stage2s`): the
    member's new stage 1 would refuse to start only once the members before it had trained. Checked up front."""
    orphaned = [(member, names) for member in members if (names := orphaned_stage2s(member.config.run_dir()))]
    if not orphaned:
        return
    why = "; ".join(f"member {member.name}: {', '.join(names)} adapted an earlier stage 1 that is gone ("
                    f"{member.config.run_dir()})" for member, names in orphaned)  # fmt: skip
    command = member_train_command(recipe, *(member for member, _ in orphaned))
    raise RunExistsError(f"{recipe.source}: {why}; train {'it' if len(orphaned) == 1 else 'them'} again and retire "
                         f"those models with `{command} --force`")  # fmt: skip


def refuse_other_holdouts(recipe: Recipe, split: str) -> None:
    """Members whose ``split`` holds other images (a hold-out drawn with another ``data.val_fraction`` or
    ``data.split_seed``, another copy of the dataset) cannot be scored or weighted together."""
    first = recipe.members[0]
    ids = set(load_split(first.config, split).frame["image_id"].astype(str))
    for member in recipe.members[1:]:
        if set(load_split(member.config, split).frame["image_id"].astype(str)) == ids:
            continue
        a, b = first.config.data, member.config.data
        pairs = {"data.root": (member_data_root(first), member_data_root(member)),
                 "data.val_fraction": (a.val_fraction, b.val_fraction), "data.split_seed": (a.split_seed, b.split_seed)}
        differ = [f"{key} {mine} vs {theirs}" for key, (mine, theirs) in pairs.items() if mine != theirs]
        why = "; ".join(differ) if differ else "the same settings: the dataset's files differ"
        raise ConfigError(f"{recipe.source}: members {first.name} and {member.name} have different {split} images "
                          f"({why}); give every member the same dataset and hold-out")  # fmt: skip


def _other_stage2s(member: Member) -> list[str]:
    """The member's finished stage-2 folders at other test resolutions than the recipe's."""
    if member.stage != 2:
        return []
    own = member_stage_dir(member)
    return [str(d) for d in stage_dirs(own.parent) if d.name != STAGE1 and d != own and is_finished(d)]


def member_data_root(member: Member) -> str:
    """Where the recipe says the member's dataset is now (its data.root, else $FGVC_DATA or ./datasets): stage 2 and
    predictions read it there, wherever stage 1 found it (the dataset moved, or the run was copied)."""
    return str(member.config.data.resolved_root().resolve())


def refuse_unrunnable_members(recipe: Recipe, members: list[Member], retrain: dict[str, list[str]]) -> None:
    """Each unfinished stage's resolution and tune policy, and the extra test resolutions, checked against the
    member's architecture before any member trains: one that cannot run its stage 2 used to fail only after its whole
    stage 1. (The test resolution is the last stage's own, checked with it.)"""
    problems: list[str] = []
    for member in members:
        try:
            for stage, stage_dir in member_steps(member):
                if stage in retrain[member.name] or not is_finished(stage_dir):
                    check_model_settings(member.config, stage)
            for res in member.multi_res or []:
                check_resolution(model_meta(member.config.model.arch), res)
        except ConfigError as err:
            problems.append(f"member {member.name}: {err}")
    if problems:
        raise ConfigError(f"{recipe.source}: {'; '.join(problems)}")


def refuse_missing_weights(recipe: Recipe, members: list[Member], retrain: dict[str, list[str]]) -> None:
    """Every member that will start stage 1 from its weights needs the file now, not after the members before it
    have trained for hours: checked before any work starts, one error for them all."""
    missing: list[str] = []
    for member in members:
        stage1_dir = member_steps(member)[0][1]
        if STAGE1 not in retrain[member.name] and (is_finished(stage1_dir) or (stage1_dir / LAST).is_file()):
            continue  # finished or resumed: its weights were read at its start
        try:
            weights_file(member.config.model.arch, member.config.model.weights)
        except WeightsError as err:
            missing.append(f"member {member.name}: {err}")
    if missing:
        raise WeightsError(f"{recipe.source}: {'; '.join(missing)}")


@dataclass
class TrainOutcome:
    member: str
    stage: str
    status: str  # "trained", "skipped (finished)" or "interrupted"
    interrupted_by: int | None = None


def train_recipe(
    recipe: Recipe | str | Path, force: bool = False, progress: bool = True, members: list[str] | None = None
) -> list[TrainOutcome]:
    """Stage 1 then stage 2 for every member (or the ones named), skipping the stages that are already finished.

    Naming members lets an ensemble train on several machines at once, one member each, from the same recipe.
    ``force`` retrains finished stages too, as :func:`retrained_stages` says.
    """
    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    selected = select_members(recipe, members)
    if not force:
        refuse_changed_members(recipe, selected)
        refuse_orphaned_stage2s(recipe, selected)
    retrain = {member.name: retrained_stages(member, force) for member in selected}  # member name -> stages
    refuse_unrunnable_members(recipe, selected, retrain)
    refuse_missing_weights(recipe, selected, retrain)
    outcomes: list[TrainOutcome] = []
    for position, member in enumerate(selected):
        cfg, run_dir = member.config, member.config.run_dir()
        if force and STAGE1 not in retrain[member.name]:
            log.info("%s: only stage 2's settings changed: stage 1 is kept", member.name)
        for stage, stage_dir in member_steps(member):
            if is_finished(stage_dir) and stage not in retrain[member.name]:
                outcomes.append(TrainOutcome(member.name, stage, "skipped (finished)"))
                log.info("%s %s: finished earlier, skipped", member.name, stage)
                continue
            force_stage = stage in retrain[member.name]
            if stage == STAGE1:
                result = run_stage1(cfg, force=force_stage, progress=progress)
            else:
                overrides = {"stage2": cfg.stage2.model_dump(mode="json"), "runtime": cfg.runtime.model_dump(),
                             "data.root": member_data_root(member)}  # fmt: skip
                result = run_stage2(run_dir, overrides, force=force_stage, progress=progress)
            if result.interrupted_by:
                outcomes.append(TrainOutcome(member.name, stage, "interrupted", result.interrupted_by))
                not_reached = selected[position + 1 :]
                if force and not_reached:  # a rerun without --force resumes this member and skips these
                    log.info("not retrained yet by this --force run: %s; after resuming %s, retrain them with "
                             "`%s --force`", ", ".join(m.name for m in not_reached), member.name,
                             member_train_command(recipe, *not_reached))  # fmt: skip
                return outcomes
            outcomes.append(TrainOutcome(member.name, stage, "trained"))
    return outcomes


def member_probabilities(recipe: Recipe, member: Member, split: str, progress: bool = True) -> Probabilities:
    """The member's (cached) probabilities on ``split``: its TTA, at its resolution(s), averaged over resolutions."""
    stage_dir = member_stage_dir(member)
    if not is_finished(stage_dir):
        command = member_train_command(recipe, member)
        raise DataError(f"member {member.name}: no finished checkpoint in {stage_dir}; produce it with: {command}")
    refuse_changed_members(recipe, [member])
    tta = member.config.predict.tta
    skip = member.config.data.skip_corrupt or None  # the recipe may allow it for prediction alone
    resolutions = member.multi_res or [member.test_res]
    root = member_data_root(member)
    device = member.config.runtime.device  # the recipe's, as it reads now (None: the stage's own, where usable)
    parts = (predict_stage(stage_dir, split, r, tta, progress=progress, skip_corrupt=skip, data_root=root,
                           device=device).held_probs() for r in resolutions)  # fmt: skip
    return next(parts) if len(resolutions) == 1 else mean_over_resolutions(parts, resolutions)


@dataclass
class EnsembleOutcome:
    table: pd.DataFrame  # one row per member plus the ensemble: weight and validation accuracy
    weights: np.ndarray
    submission: Path
    probabilities: Probabilities  # the ensemble's test probabilities


def ensemble_recipe(
    recipe: Recipe | str | Path,
    out_dir: str | Path = "submissions",
    sample: str | Path | None = None,
    progress: bool = True,
) -> EnsembleOutcome:
    """Predict missing members, weight them on the validation split, write and validate the Kaggle CSV.

    Each finished member's stage folders are held with shared locks until the submission is written: a ``--force``
    retraining of a member (which locks them exclusively) is refused meanwhile, rather than replace the model between
    its val and test predictions, and an ensemble is refused while one runs.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # one process combines: the other ranks would hold no matrices
        raise ConfigError("fgvc ensemble runs in one process, not under torchrun: predict the members on several GPUs "
                          "first with `fgvc predict --run RUN --split val|test --gpus N` (the files are reused), then "
                          "run `fgvc ensemble` alone")  # fmt: skip
    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    with ExitStack() as held:
        for member in recipe.members:
            for _, step_dir in member_steps(member):
                if is_finished(step_dir):
                    held.enter_context(stage_lock(step_dir, shared=True))
        return _ensemble(recipe, Path(out_dir), sample, progress)


def _ensemble(recipe: Recipe, out: Path, sample: str | Path | None, progress: bool) -> EnsembleOutcome:
    refuse_changed_members(recipe, recipe.members)  # before hours of prediction, not after
    spec = competition_spec(recipe.competition)
    ens = recipe.ensemble
    missing = [m for m in recipe.members if not is_finished(member_stage_dir(m))]
    if missing:  # all of them, now: not one per run after the others' predictions
        training = {m.name: who for m in missing for _, step_dir in member_steps(m) if (who := lock_holder(step_dir))}
        idle = [m for m in missing if m.name not in training]
        busy = "".join(f"; {name} is being trained by {who}" for name, who in training.items())
        command = f"; produce {'it' if len(idle) == 1 else 'them'} with: {member_train_command(recipe, *idle)}"
        elsewhere = [f"{m.name} has {', '.join(found)} finished (to ensemble one, set its stage2.res)"
                     for m in missing if (found := _other_stage2s(m))]  # fgvc stage2 --test-res R: another folder
        raise DataError(f"{recipe.source}: no finished checkpoint for {', '.join(m.name for m in missing)} "
                        f"({', '.join(str(member_stage_dir(m)) for m in missing)}){busy}"
                        f"{''.join(f'; {line}' for line in elsewhere)}{command if idle else ''}")  # fmt: skip
    header = None  # the sample's header, when given, wins over the built-in one
    if sample is not None:  # read now: a missing file, another competition's or another test set's sample fails
        test_ids = load_split(recipe.members[0].config, "test").frame["image_id"].tolist()  # before any prediction
        header, _, problems = read_checked_sample(Path(sample), spec, test_ids)
        if problems:
            raise SubmissionError(problems[0])
    require_writable(out)  # now, not after the predictions (hours on iNat)
    # The val split fits the weights (search) or only fills the report: without images it is skipped in the latter case.
    search = ens.weights == "search"
    validate = search or bool(len(load_split(recipe.members[0].config, ens.val_split)))
    if not validate:
        log.info("the %s split has no images: the table has no validation scores", ens.val_split)
    else:  # now, not once every member's 10-crop has run and the files fail to align
        refuse_other_holdouts(recipe, ens.val_split)
    trained_on = [m.name for m in recipe.members if m.config.data.train_on_all]
    if validate and ens.val_split == "val" and trained_on:  # search refuses them when the recipe loads
        log.warning("%s: members %s trained on the val split (data.train_on_all), so the val scores below are "
                    "scores on training images", recipe.source, ", ".join(trained_on))  # fmt: skip
    report = _Report(recipe, scored=validate, metric=spec.metric, split=ens.val_split)
    if search:  # the search compares every member on every row: these matrices are all held at once
        val = align([member_probabilities(recipe, m, ens.val_split, progress) for m in recipe.members])
        if not val[0].has_labels:
            raise ConfigError(f"{recipe.source}: ensemble.weights 'search' needs a labelled {ens.val_split} split")
        weights = resolve_weights("search", val_probs=[p.probs for p in val], labels=val[0].scored_labels(),
                                  method=ens.method, metric=spec.metric)  # fmt: skip
        for position in range(len(val)):  # no loop variable left holding a member after `del val`
            report(position, val[position])
        report.ensemble(replace(val[0], probs=combine([p.probs for p in val], weights, ens.method)))
        del val
    else:  # fixed weights: each member's matrix is loaded, scored, added and dropped in turn
        given = [m.weight or 0.0 for m in recipe.members] if ens.weights == "given" else None
        weights = resolve_weights(ens.weights, given=given, method=ens.method, n_members=len(recipe.members))
        if validate:
            val_members = (member_probabilities(recipe, m, ens.val_split, progress) for m in recipe.members)
            report.ensemble(combine_members(val_members, weights, ens.method, visit=report))
    test_members = (member_probabilities(recipe, m, "test", progress) for m in recipe.members)
    combined = combine_members(test_members, weights, ens.method, visit=None if validate else report)
    table = report.table(weights, ens.method)
    combined = replace(
        combined,
        meta={"recipe": recipe.source, "members": [m.name for m in recipe.members], "weights": weights.tolist()},
    )
    draft = out / f".{recipe.competition}.{owner_tag()}.draft"  # one per process; a killed one's goes on the next write
    try:  # the final name appears only once the file passed every check
        write_submission(combined, spec.name, draft, k=ens.top_k, header=header)
        test = load_split(recipe.members[0].config, "test")  # the ids come from the dataset, not from the members
        problems = check_submission(draft, spec.name, test, sample)
        if problems:  # named after what it was checked against
            against = f"the sample {sample}" if sample is not None else f"the {spec.name} test split"
            more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
            raise SubmissionError(f"{out}: no submission written, it does not match {against}: {problems[0]}{more}")
        path = _publish(draft, combined, out, recipe.competition)
    finally:
        draft.unlink(missing_ok=True)
    return EnsembleOutcome(table, weights, path, combined)


def _publish(draft: Path, combined: Probabilities, out_dir: Path, competition: str) -> Path:
    """Give the checked CSV its name, ``<competition>-<date>-<time>.csv`` (``-2``, ``-3``... when that name or its
    .npz is taken), and put the probabilities it came from next to it under the same stem.

    The probabilities are written first, under a draft name (minutes at iNat's size): a process killed meanwhile
    leaves no CSV without its .npz. The CSV's name is claimed with a hard link, which fails on an existing file (or,
    without hard links, by creating it exclusively): two ensembles finishing in the same second keep both
    submissions, where checking the name and then renaming onto it lets the second replace the first. The .npz then
    takes the same stem by a rename.
    """
    probs_draft = out_dir / f".{competition}.npz.{owner_tag()}.draft"  # fileio.remove_dead_leftovers knows the form
    try:
        combined.save(probs_draft)
        path = _claim_name(draft, out_dir, f"{competition}-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}")
        try:
            os.replace(probs_draft, path.with_suffix(".npz"))
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        return path
    finally:
        probs_draft.unlink(missing_ok=True)


def _claim_name(draft: Path, out_dir: Path, stem: str) -> Path:
    """The first free ``<stem>[-n].csv`` in ``out_dir`` (its .npz free too), holding ``draft``'s content."""
    for n in itertools.count(1):
        path = out_dir / (f"{stem}.csv" if n == 1 else f"{stem}-{n}.csv")
        if path.with_suffix(".npz").exists():
            continue
        try:
            os.link(draft, path)
            return path
        except FileExistsError:
            continue
        except OSError:  # a file system without hard links: claim the name by creating it, then fill it
            try:
                os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            except FileExistsError:
                continue
            try:
                os.replace(draft, path)
            except BaseException:
                path.unlink(missing_ok=True)  # not an empty CSV under a submission's name
                raise
            return path
    raise AssertionError("unreachable")


class _Report:
    """The ensemble's table, one row per member, filled while each member's probabilities are loaded (the only time
    they are in memory), then the ensemble's row."""

    def __init__(self, recipe: Recipe, scored: bool, metric: str, split: str) -> None:
        self.members = recipe.members
        self.split = split  # the columns say where the scores come from: val, or test (CUB's labelled test split)
        self.scored = scored  # False: the rows come from the test split, whose labels (CUB has them) are not shown
        self.metrics = list(dict.fromkeys(("top1", "top5", metric)))  # and the leaderboard's (macro F1, top-3)
        self.rows: list[dict[str, object]] = [{} for _ in self.members]
        self.ensemble_scores = self._scores(None)

    def __call__(self, position: int, probs: Probabilities) -> None:
        member = self.members[position]
        meta = probs.meta
        about = {"member": member.name, "stage": member.stage, "res": meta.get("res"), "tta": meta.get("tta")}
        self.rows[position] = about | self._scores(probs if self.scored else None)

    def ensemble(self, combined: Probabilities) -> None:
        """The ensemble's validation scores (the matrix can go once they are taken)."""
        self.ensemble_scores = self._scores(combined)

    def table(self, weights: np.ndarray, method: str) -> pd.DataFrame:
        rows = [row | {"weight": round(float(weight), 3)} for row, weight in zip(self.rows, weights, strict=True)]
        rows.append({"member": f"ensemble ({method})", "stage": "", "res": "", "tta": "", "weight": 1.0}
                    | self.ensemble_scores)  # fmt: skip
        scores = [f"{self.split}_{m}" for m in self.metrics]
        return pd.DataFrame(rows)[["member", "stage", "res", "tta", "weight", *scores]]

    def _scores(self, probs: Probabilities | None) -> dict[str, float | None]:
        scores = summarize(probs.probs, probs.scored_labels()) if probs is not None and probs.has_labels else {}
        return {f"{self.split}_{m}": round(scores[m], 2) if scores else None for m in self.metrics}
