"""Recipes: several run configurations (ensemble members) plus how to combine them for one competition.

A recipe YAML has the keys of a :class:`fgvc.config.RunConfig` as shared defaults, plus ``competition``,
``ensemble`` and ``members``; each member is a partial RunConfig (merged over the defaults, one level deep) with an
optional ``weight``, ``stage`` and ``multi_res``. A plain RunConfig file (no ``members``) is a one-member recipe, so
`fgvc stage1 --recipe recipes/cub.yaml` and `fgvc train recipes/cub.yaml` read the same file.
"""

from __future__ import annotations

import logging
import shlex
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError

from fgvc.config import (
    BEST,
    CONFIG_FILE,
    LAST,
    STAGE1,
    STAGE2_PREFIX,
    RunConfig,
    config_from_dict,
    first_error,
    merge,
    read_yaml,
    validation_message,
    with_overrides,
)
from fgvc.errors import ConfigError
from fgvc.submission import COMPETITIONS, check_top_k, competition_spec

RECIPE_KEYS = ("competition", "ensemble", "members")
MEMBER_KEYS = ("weight", "stage", "multi_res")
log = logging.getLogger("fgvc")


class EnsembleConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    weights: Literal["equal", "given", "search"] = "equal"
    method: Literal["mean", "geometric"] = "mean"
    val_split: Literal["val", "test"] = "val"  # where member weights are searched and accuracies reported
    top_k: int | None = None  # predictions per row; None: the competition's default


class Member(BaseModel):
    """One ensemble member: a resolved run config and how its predictions enter the ensemble."""

    model_config = ConfigDict(extra="forbid")

    config: RunConfig
    weight: float | None = Field(None, gt=0)  # only with ensemble.weights: given, and then on every member
    stage: Literal[1, 2] = 2
    multi_res: list[PositiveInt] | None = Field(None, min_length=1)

    @property
    def name(self) -> str:
        return self.config.run_name()

    @property
    def test_res(self) -> int:
        return self.config.stage2.res if self.stage == 2 else self.config.stage1.res


class Recipe(BaseModel):
    model_config = ConfigDict(extra="forbid")

    source: str
    competition: str
    ensemble: EnsembleConfig
    members: list[Member]


def load_recipe(path: str | Path) -> Recipe:
    """Parse and validate a recipe file; errors name the file, the member and the key.

    A run folder's own config.yaml is a one-member recipe of that folder, wherever it lives now and whatever the
    current directory (its saved ``out`` is the relative path the run was started with); its stage 1's is a recipe
    of the stage-1 model."""
    values = read_yaml(path)
    if not any(key in values for key in RECIPE_KEYS) and (folder := _run_folder_of(Path(path))):
        values = values | folder
        if Path(path).resolve().parent.name == STAGE1:  # runs/X/stage1/config.yaml: the stage-1 model
            values["members"] = [{"stage": 1}]
    return recipe_from_values(values, str(path))


def recipe_from_values(values: dict[str, Any], source: str) -> Recipe:
    """Validate a recipe given as a mapping (a parsed YAML file, or one built in code like the demo's)."""
    shared = {k: v for k, v in values.items() if k not in RECIPE_KEYS}
    # The shared part on its own first: its mistakes are the top level's, not the first member's.
    config_from_dict(shared, source=f"{source}: top level", extra_keys=RECIPE_KEYS)
    members_raw = values.get("members", [{}])
    if not isinstance(members_raw, list):
        raise ConfigError(f"{source}: 'members' must be a list of member configs")
    if not members_raw:
        raise ConfigError(f"{source}: 'members' is empty; list at least one, or leave the key out for a single run")
    if not isinstance(values.get("ensemble") or {}, dict):
        raise ConfigError(f"{source}: 'ensemble' must be a mapping of keys (weights, method, val_split, top_k)")
    try:
        ensemble = EnsembleConfig.model_validate(values.get("ensemble") or {})
    except ValidationError as err:
        raise ConfigError(validation_message(err, source, model=EnsembleConfig, section="ensemble.")) from None
    members = []
    for i, raw in enumerate(members_raw):
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: members[{i}] must be a mapping of config keys")
        extras = {k: raw[k] for k in MEMBER_KEYS if k in raw}
        run_values = merge(shared, {k: v for k, v in raw.items() if k not in MEMBER_KEYS}, f"{source}: members[{i}]")
        cfg = config_from_dict(run_values, source=f"{source}: members[{i}]")
        prefix = f"{source}: members[{i}]." if "members" in values else f"{source}: "
        check_names(cfg, prefix.__add__)
        try:
            members.append(Member(config=cfg, **extras))
        except ValidationError as err:
            key, message = first_error(err)
            raise ConfigError(f"{source}: members[{i}].{key}: {message}") from None
    names = [m.name for m in members]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"{source}: several members write to the same run folder {duplicates}; give each a 'name' "
                          "of its own")  # fmt: skip
    competition = _competition(source, values.get("competition"), members)
    try:  # checked now, not after hours of predicting
        check_top_k(competition_spec(competition), ensemble.top_k)
    except ConfigError as err:
        raise ConfigError(f"{source}: ensemble.top_k: {err}") from None
    _check_weights(source, ensemble, members)
    return Recipe(source=source, competition=competition, ensemble=ensemble, members=members)


def _competition(source: str, given: object, members: list[Member]) -> str:
    """The competition whose CSV the ensemble writes: the members' dataset's own when the recipe names none (a
    Herbarium 2022 ensemble must not write class names into a generic file), else the one named, which must score
    that dataset; ``generic`` (a readable top-1 file) fits any dataset."""
    datasets = list(dict.fromkeys(m.config.data.dataset for m in members))
    if len(datasets) > 1:
        raise ConfigError(f"{source}: the members read different datasets ({', '.join(datasets)}); an ensemble "
                          "combines one test set's predictions: give every member the same data.dataset")  # fmt: skip
    own = datasets[0] if datasets[0] in COMPETITIONS else "generic"
    if given is None:
        return own
    competition = str(given)
    try:
        competition_spec(competition)
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None
    if competition not in ("generic", datasets[0]):
        raise ConfigError(f"{source}: competition {competition} scores the {competition} test set, but the members "
                          f"read {datasets[0]}; set competition: {own}, or leave it out")  # fmt: skip
    return competition


def _check_weights(source: str, ensemble: EnsembleConfig, members: list[Member]) -> None:
    """Member weights exist exactly when they are used; search fits weights on neither training nor test images."""
    weighted = [i for i, m in enumerate(members) if m.weight is not None]
    if ensemble.weights == "given":
        unweighted = [i for i, m in enumerate(members) if m.weight is None]
        if unweighted:
            raise ConfigError(f"{source}: members[{unweighted[0]}] has no 'weight'; ensemble.weights 'given' needs "
                              "one on every member")  # fmt: skip
    elif weighted:
        raise ConfigError(f"{source}: members[{weighted[0]}].weight is used only with ensemble.weights 'given' (this "
                          f"recipe has '{ensemble.weights}'); set weights: given, or remove the weights")  # fmt: skip
    if ensemble.weights == "search" and ensemble.val_split == "test":
        raise ConfigError(f"{source}: ensemble.weights 'search' with val_split 'test' would fit the weights on the "
                          "test labels, and the scores it reports would not be test scores; search on val_split: val, "
                          "or use equal or given weights to report test scores")  # fmt: skip
    if ensemble.weights == "search":
        trained_on_val = [i for i, m in enumerate(members) if m.config.data.train_on_all]
        if trained_on_val:
            raise ConfigError(f"{source}: members[{trained_on_val[0]}] trains on the val split (data.train_on_all), "
                              "so ensemble.weights 'search' would fit the weights on training images; use equal or "
                              "given weights")  # fmt: skip


def select_members(recipe: Recipe, names: list[str] | None) -> list[Member]:
    """The members called ``names`` (all when None), in recipe order; an unknown name lists the valid ones."""
    if not names:
        return list(recipe.members)
    known = [m.name for m in recipe.members]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ConfigError(f"{recipe.source}: no member named {', '.join(unknown)}; its members are {', '.join(known)}")
    return [m for m in recipe.members if m.name in names]


def member_train_command(recipe: Recipe, *members: Member) -> str:
    """The command that trains exactly these members' stages from the recipe (every config key, flag or not)."""
    named = " ".join(f"--member {shlex.quote(member.name)}" for member in members)
    return f"fgvc train {shlex.quote(recipe.source)} {named}"


def _run_folder_of(config_file: Path) -> dict[str, str]:
    """``out`` and ``name`` of the run folder that holds ``config_file`` (its ``config.yaml``, or a stage's), so
    that `fgvc stage1 --recipe runs/X/config.yaml` resumes that folder wherever it lives now and whatever the current
    directory; nothing for any other file. The saved ``out`` is the relative path the run was started with."""
    if config_file.name != CONFIG_FILE:
        return {}
    folder = config_file.resolve().parent
    in_stage = folder.name == STAGE1 or folder.name.startswith(STAGE2_PREFIX)
    run_dir = folder.parent if in_stage else folder
    stage1 = run_dir / STAGE1
    if not ((stage1 / CONFIG_FILE).is_file() and any((stage1 / name).is_file() for name in (LAST, BEST))):
        return {}  # not a folder fgvc trained in: a user's own config.yaml keeps its out and name
    return {"out": str(run_dir.parent), "name": run_dir.name}


def resolve_run_config(recipe: str | Path | None, overrides: dict[str, Any]) -> RunConfig:
    """Config for one run: a RunConfig file or a one-member recipe, with CLI overrides (unset flags are None)."""
    values: dict[str, Any] = {}
    if recipe:
        raw = read_yaml(recipe)
        if any(k in raw for k in RECIPE_KEYS):
            members = load_recipe(recipe).members
            if len(members) != 1:
                raise ConfigError(
                    f"{recipe} defines {len(members)} members; train them all with `fgvc train {recipe}`, or copy "
                    "one member into its own file"
                )
            values = members[0].config.model_dump(mode="json")
        else:
            values = raw | _run_folder_of(Path(recipe))
    values, paired = _test_res_follows_train_res(merge({}, values, str(recipe)), overrides)  # dotted keys nested
    data = given if isinstance(given := values.get("data"), dict) else {}
    dataset = overrides.get("data.dataset")
    if dataset is not None and dataset != data.get("dataset") and overrides.get("data.root") is None:
        values = merge(values, {"data.root": None})  # a saved run's absolute root belongs to its own dataset
    cfg = with_overrides(values, overrides, str(recipe) if recipe else "command line")
    flags = {"data.dataset": "--dataset", "model.arch": "--arch"}
    check_names(cfg, lambda key: flags[key] if overrides.get(key) is not None else f"{recipe or 'command line'}: {key}")
    if paired is not None and paired[1] != cfg.stage2.res:
        log.info("stage2.res %d (1.5 x --res %d) rather than %s's %d, which went with its stage1.res %s; `fgvc stage2 "
                 "--test-res R` adapts at another", cfg.stage2.res, cfg.stage1.res, recipe, paired[1],
                 paired[0])  # fmt: skip
    return cfg


def _test_res_follows_train_res(
    values: dict[str, Any], overrides: dict[str, Any]
) -> tuple[dict[str, Any], tuple[Any, Any] | None]:
    """``values`` without their ``stage2.res`` when ``--res`` changes the train resolution it was paired with, and
    that pair (train, test resolution; None when kept): the recipe's 448 -> 672 run at ``--res 224`` adapts at 352
    (1.5 x, ``default_test_res``), not at 672, a ratio of 3 that costs points (paper, Table 5). A test resolution given
    with the flag is kept, and ``fgvc stage2 --test-res`` still picks any other."""
    stage1, stage2 = values.get("stage1"), values.get("stage2")
    train_res = overrides.get("stage1.res")
    if train_res is None or overrides.get("stage2.res") is not None or not isinstance(stage2, dict):
        return values, None
    recipe_train_res = stage1.get("res") if isinstance(stage1, dict) else None
    recipe_train_res = RunConfig().stage1.res if recipe_train_res is None else recipe_train_res  # the default's pair
    if "res" not in stage2 or recipe_train_res == train_res:
        return values, None
    kept = {key: value for key, value in stage2.items() if key != "res"}
    return values | {"stage2": kept}, (recipe_train_res, stage2["res"])


def check_names(cfg: RunConfig, where: Callable[[str], str]) -> None:
    """An unknown dataset or architecture is an error when the recipe loads, naming where it was written
    (``where(key)``: the file and key, or the flag), not when the run reaches it."""
    from fgvc.datasets import get_spec
    from fgvc.models.registry import model_spec

    for key, check, value in (("data.dataset", get_spec, cfg.data.dataset), ("model.arch", model_spec, cfg.model.arch)):
        try:
            check(value)
        except ConfigError as err:
            raise ConfigError(f"{where(key)}: {err}") from None
