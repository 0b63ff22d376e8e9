"""The configuration model: defaults, recipes, overrides and one-line errors."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import yaml

from fgvc.config import RunConfig, config_from_dict, load_config, merge, save_config
from fgvc.errors import ConfigError
from fgvc.recipe import load_recipe, resolve_run_config, select_members
from fgvc.submission import COMPETITIONS

REPO = Path(__file__).resolve().parents[1]


def test_a_partial_section_keeps_that_sections_defaults() -> None:
    cfg = config_from_dict({"stage2": {"res": 512}, "stage1": {"epochs": 3}})
    assert cfg.stage2.res == 512
    # the paper's fine-tuning lr, "0.008 ... B = 512" (section 5), per 256 images
    assert (cfg.stage2.augment, cfg.stage2.tune, cfg.stage2.lr_base) == ("test", "bn+fc", 0.008 * 256 / 512)
    assert cfg.stage1.epochs == 3 and cfg.stage1.augment == "train" and cfg.stage1.tune == "all"


def test_unknown_keys_and_bad_values_are_one_line_errors_naming_the_source() -> None:
    with pytest.raises(ConfigError) as err:
        config_from_dict({"stage1": {"lrr": 0.1}}, "recipes/x.yaml")
    message = str(err.value)
    assert message.startswith("recipes/x.yaml: unknown key 'stage1.lrr'") and "lr_base" in message
    with pytest.raises(ConfigError, match=r"invalid value for 'stage2\.tune'"):
        config_from_dict({"stage2": {"tune": "everything"}})
    with pytest.raises(ConfigError, match="unknown key 'colour'"):
        config_from_dict({"colour": "blue"})


def test_yaml_round_trip_and_file_errors(tmp_path: Path) -> None:
    cfg = config_from_dict({"data": {"dataset": "cub"}, "model": {"arch": "senet154"}, "stage1": {"res": 320}})
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg
    with pytest.raises(ConfigError, match="no such recipe"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "broken.yaml").write_text("stage1: {res: 448\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml: not valid YAML \(line"):
        load_config(tmp_path / "broken.yaml")


def test_cli_overrides_win_and_unset_flags_keep_the_recipe(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {arch: resnet50}\nstage1: {res: 384, epochs: 5}\n")
    cfg = resolve_run_config(recipe, {"stage1.epochs": 7, "stage1.lr": None})
    assert (cfg.model.arch, cfg.stage1.res, cfg.stage1.epochs, cfg.stage1.lr) == ("resnet50", 384, 7, None)
    assert merge({"a": {"b": 1, "c": 2}}, {"a.b": 3}) == {"a": {"b": 3, "c": 2}}


def test_a_new_train_resolution_takes_the_test_resolution_with_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The recipe's stage2.res is paired with its stage1.res: --res 224 over cub's 448 -> 672 adapts at 352 (1.5 x),
    not at 672; the recipe's own train resolution, or a test resolution given with it, keeps the recipe's pair."""
    assert (resolve_run_config("recipes/cub.yaml", {}).stage1.res, resolve_run_config("recipes/cub.yaml", {}).stage2.res
            ) == (448, 672)  # fmt: skip
    assert resolve_run_config("recipes/cub.yaml", {"stage1.res": 224}).stage2.res == 352  # 1.5 x 224 = 336, halves up
    assert resolve_run_config("recipes/cub.yaml", {"stage1.res": 448}).stage2.res == 672
    assert resolve_run_config("recipes/cub.yaml", {"stage1.res": 224, "stage2.res": 320}).stage2.res == 320
    recipe = tmp_path / "r.yaml"  # a plain run config (a saved config.yaml) behaves the same
    recipe.write_text("model: {arch: resnet50}\nstage1: {res: 448}\nstage2: {res: 704, epochs: 3}\n")
    with caplog.at_level(logging.INFO, logger="fgvc"):
        cfg = resolve_run_config(recipe, {"stage1.res": 320})
    assert (cfg.stage2.res, cfg.stage2.epochs) == (480, 3)
    logged = f"stage2.res 480 (1.5 x --res 320) rather than {recipe}'s 704, which went with its stage1.res 448"
    assert logged in caplog.text
    recipe.write_text("model: {arch: resnet50}\nstage1.res: 448\nstage2.res: 704\n")  # dotted keys: the same
    assert resolve_run_config(recipe, {"stage1.res": 320}).stage2.res == 480
    recipe.write_text("model: {arch: resnet50}\nstage2: {res: 704}\n")  # paired with the default 448
    assert resolve_run_config(recipe, {"stage1.res": 448}).stage2.res == 704
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="fgvc"):
        assert resolve_run_config(recipe, {"stage1.res": 320}).stage2.res == 480
    assert "which went with its stage1.res 448" in caplog.text


def test_run_folder_name_and_learning_rate_scaling() -> None:
    cfg = RunConfig.model_validate({"data": {"dataset": "cub"}, "model": {"arch": "timm:convnext_base"}})
    assert cfg.run_dir() == Path("runs") / "cub-timm-convnext_base-448"
    cfg.stage1.batch_size, cfg.stage1.grad_accum = 64, 2
    assert cfg.stage1.resolved_lr(world_size=4) == pytest.approx(0.04 * 64 * 2 * 4 / 256)


def test_every_shipped_recipe_loads() -> None:
    recipes = sorted(Path(__file__).resolve().parents[1].glob("recipes/*.yaml"))
    assert {p.stem for p in recipes} >= {"inat2019", "herbarium2019", "cub", "cars", "flowers", "pets", "nabirds",
                                          "birdsnap", "inat2017"}  # fmt: skip
    table10 = {m.config.model.arch: (m.config.stage1.res, m.config.stage2.res, m.config.stage2.tune)
               for m in load_recipe(recipes[[p.stem for p in recipes].index("inat2019")]).members}  # fmt: skip
    assert table10 == {"se_resnext101_32x4d": (448, 704, "bn+fc"), "senet154": (448, 672, "stage+bn+fc"),
                       "inceptionresnetv2": (491, 681, "bn+fc")}  # fmt: skip
    for path in recipes:
        recipe = load_recipe(path)
        for member in recipe.members:
            assert member.config.stage2.augment == "test"
        assert select_members(recipe, [recipe.members[-1].name]) == [recipe.members[-1]]
    with pytest.raises(ConfigError, match="no member named nope; its members are "):
        select_members(load_recipe(recipes[0]), ["nope"])


def test_a_multi_member_recipe_is_not_a_stage1_config() -> None:
    path = Path(__file__).resolve().parents[1] / "recipes" / "inat2019.yaml"
    with pytest.raises(ConfigError, match="fgvc train"):
        resolve_run_config(path, {})
    single = Path(__file__).resolve().parents[1] / "recipes" / "cub.yaml"
    cfg = resolve_run_config(single, {"stage1.epochs": 1})
    assert (cfg.model.arch, cfg.stage1.res, cfg.stage1.epochs) == ("senet154", 448, 1)


def _recipe_file(tmp_path: Path, ensemble: str, members: str, competition: str = "inat2019") -> Path:
    path = tmp_path / "recipe.yaml"
    dataset = competition if competition in COMPETITIONS else "demo"
    path.write_text(f"competition: {competition}\ndata: {{dataset: {dataset}}}\nensemble: {ensemble}\n"
                    f"members:\n{members}")
    return path


TWO_MEMBERS = "  - {name: a, model: {arch: resnet50}}\n  - {name: b, model: {arch: resnet50}, weight: 2}\n"


def test_member_weights_exist_exactly_when_the_recipe_uses_them(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"members\[1\]\.weight is used only with ensemble.weights 'given'"):
        load_recipe(_recipe_file(tmp_path, "{weights: equal}", TWO_MEMBERS))
    with pytest.raises(ConfigError, match=r"members\[1\]\.weight is used only .* \(this recipe has 'search'\)"):
        load_recipe(_recipe_file(tmp_path, "{weights: search}", TWO_MEMBERS))
    with pytest.raises(ConfigError, match=r"members\[0\] has no 'weight'; ensemble.weights 'given' needs one"):
        load_recipe(_recipe_file(tmp_path, "{weights: given}", TWO_MEMBERS))
    both = TWO_MEMBERS.replace("{name: a, model: {arch: resnet50}}", "{name: a, model: {arch: resnet50}, weight: 1}")
    assert [m.weight for m in load_recipe(_recipe_file(tmp_path, "{weights: given}", both)).members] == [1, 2]


def test_search_on_a_val_split_the_members_train_on_or_on_the_test_split_is_refused(tmp_path: Path) -> None:
    members = "  - {name: a, data: {train_on_all: true}}\n"
    with pytest.raises(ConfigError, match=r"members\[0\] trains on the val split \(data.train_on_all\)"):
        load_recipe(_recipe_file(tmp_path, "{weights: search}", members))
    assert load_recipe(_recipe_file(tmp_path, "{weights: equal}", members)).members[0].config.data.train_on_all
    with pytest.raises(ConfigError, match=r"recipe.yaml: ensemble.weights 'search' with val_split 'test' would fit"):
        load_recipe(_recipe_file(tmp_path, "{weights: search, val_split: test}", "  - {name: a}\n"))
    assert load_recipe(_recipe_file(tmp_path, "{weights: equal, val_split: test}", "  - {name: a}\n")).ensemble


def test_top_k_and_competition_are_checked_when_the_recipe_loads(tmp_path: Path) -> None:
    members = "  - {name: a}\n"
    with pytest.raises(ConfigError, match=r"recipe.yaml: ensemble.top_k: herbarium2020 needs exactly 1 predictions "):
        load_recipe(_recipe_file(tmp_path, "{top_k: 7}", members, "herbarium2020"))
    with pytest.raises(ConfigError, match=r"recipe.yaml: unknown competition 'kaggle'"):
        load_recipe(_recipe_file(tmp_path, "{}", members, "kaggle"))
    assert load_recipe(_recipe_file(tmp_path, "{top_k: 3}", members, "inat2019")).ensemble.top_k == 3


def test_the_competition_follows_the_members_dataset(tmp_path: Path) -> None:
    """Without a competition key a Herbarium 2022 ensemble wrote class names into a generic CSV; a competition of
    another dataset wrote that competition's format. Both are decided when the recipe loads."""
    path = tmp_path / "r.yaml"
    path.write_text("data: {dataset: herbarium2022}\nmembers:\n  - {name: a}\n")
    assert load_recipe(path).competition == "herbarium2022"
    path.write_text("data: {dataset: cub}\nmembers:\n  - {name: a}\n")
    assert load_recipe(path).competition == "generic"
    path.write_text("competition: generic\ndata: {dataset: herbarium2022}\nmembers:\n  - {name: a}\n")
    assert load_recipe(path).competition == "generic"  # asked for: a readable top-1 file
    path.write_text("competition: inat2019\ndata: {dataset: herbarium2022}\nmembers:\n  - {name: a}\n")
    with pytest.raises(ConfigError, match=r"r.yaml: competition inat2019 scores the inat2019 test set, but the "
                                          r"members read herbarium2022; set competition: herbarium2022"):
        load_recipe(path)
    path.write_text("competition: inat2019\nmembers:\n  - {name: a, data: {dataset: inat2019}}\n"
                    "  - {name: b, data: {dataset: inat2018}}\n")
    with pytest.raises(ConfigError, match=r"members read different datasets \(inat2019, inat2018\)"):
        load_recipe(path)


def test_other_starting_weights_are_another_model() -> None:
    """A recipe member whose weights changed was skipped as finished and ensembled."""
    from fgvc.engine.resume import config_conflicts
    from fgvc.engine.run_folder import STAGE1

    saved = config_from_dict({"model": {"weights": "imagenet"}}).model_dump(mode="json")
    now = config_from_dict({"model": {"weights": "none"}})
    assert config_conflicts(saved, now, STAGE1) == ["model.weights: imagenet -> None"]


def test_a_run_name_may_hold_subfolders_but_not_leave_out(tmp_path: Path) -> None:
    """`ablation/lr005` trains into runs/ablation/lr005 (runs named so before keep working); `../x` would not be
    under runs/ at all."""
    from fgvc.engine.run_folder import require_run_folder

    assert RunConfig.model_validate({"name": "ablation/lr005"}).run_dir() == Path("runs/ablation/lr005")
    for name in ("../elsewhere", "a/../../b", "/abs", "", "."):
        with pytest.raises(ValueError, match="not a folder under `out`"):
            RunConfig.model_validate({"name": name})
    (tmp_path / "stage1" / "stage1").mkdir(parents=True)  # a run named "stage1": its folder is a run folder
    require_run_folder(tmp_path / "stage1")
    with pytest.raises(ConfigError, match=f"pass the run folder that holds it: --run {tmp_path / 'stage1'}$"):
        require_run_folder(tmp_path / "stage1" / "stage1")


def test_another_dataset_on_the_command_line_leaves_the_saved_root_behind(tmp_path: Path) -> None:
    saved = tmp_path / "config.yaml"
    save_config(config_from_dict({"data": {"dataset": "demo", "root": "/data/demo"}}), saved)
    assert resolve_run_config(saved, {"data.dataset": "cub"}).data.root is None  # datasets/cub, not demo's images
    assert resolve_run_config(saved, {"data.dataset": "demo"}).data.root == "/data/demo"
    chosen = resolve_run_config(saved, {"data.dataset": "cub", "data.root": "/data/cub"})
    assert chosen.data.root == "/data/cub"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", r"no settings in it"),
        ("# only a comment\n", r"no settings in it"),
        ("members: []\n", r"'members' is empty"),
        ("ensemble: [1]\nmembers: [{name: a}]\n", r"'ensemble' must be a mapping"),
        ("ensemble: {val_split: tset}\nmembers: [{name: a}]\n", r"invalid value for 'ensemble.val_split': Input"),
        ("ensemble: {weight: equal}\n", r"unknown key 'ensemble.weight' \(did you mean 'weights'\?\); valid keys"),
        ("members: [{name: a, multi_res: [0, 448]}]\n", r"members\[0\].multi_res.0: Input should be greater than 0"),
        ("stage1.epochs: 3\nstage1: {epochs: 5}\n", r"stage1.epochs is set twice, as a dotted key and inside its"),
        ("members: [{stage2.res: 40, stage2: {res: 50}}]\n", r"members\[0\].stage2.res is set twice"),
        ("data: {dataset: cubb}\n", r"data.dataset: unknown dataset 'cubb'; choose one of cub, "),
        ("members: [{model: {arch: timm:resnet5x}}]\n", r"members\[0\].model.arch: unknown timm model 'resnet5x'"),
    ],
)
def test_empty_or_malformed_recipes_are_one_line_errors(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=rf"r\.yaml: {message}"):
        load_recipe(path)


def test_shipped_recipes_are_found_by_the_readmes_path_or_name_from_any_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An installed fgvc run outside the repository: `--recipe recipes/cub.yaml` (the README's) and `--recipe cub`."""
    monkeypatch.chdir(tmp_path)
    assert resolve_run_config("recipes/cub.yaml", {}).data.dataset == "cub"
    assert resolve_run_config("cub", {}).stage1.res == resolve_run_config("recipes/cub.yaml", {}).stage1.res
    assert [m.name for m in load_recipe("recipes/inat2019.yaml").members] == [
        m.name for m in load_recipe(REPO / "recipes" / "inat2019.yaml").members
    ]
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "cub.yaml").write_text("data: {dataset: cars}\n")  # a file of the user's own wins
    assert resolve_run_config("recipes/cub.yaml", {}).data.dataset == "cars"
    with pytest.raises(ConfigError, match=r"^mine/cub.yaml: no such recipe/config file; check the path \(shipped "
                                          r"recipes: birdsnap, cars, cub, "):  # fmt: skip
        load_recipe("mine/cub.yaml")  # another folder is the user's path, not a shipped recipe


def test_a_misspelt_name_on_the_command_line_names_the_flag_not_the_recipe(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("data: {dataset: cub}\nmodel: {arch: resnet50}\n")
    with pytest.raises(ConfigError, match=r"^--arch: unknown architecture 'resnet5'"):
        resolve_run_config(recipe, {"model.arch": "resnet5"})
    with pytest.raises(ConfigError, match=r"^--dataset: unknown dataset 'cbu'"):
        resolve_run_config(recipe, {"data.dataset": "cbu"})
    recipe.write_text("data: {dataset: cbu}\n")
    with pytest.raises(ConfigError, match=rf"^{recipe}: data.dataset: unknown dataset 'cbu'"):
        resolve_run_config(recipe, {})


def test_resume_conflicts_compare_the_learning_rate_by_its_effect() -> None:
    """An explicit lr makes lr_base unused: a changed lr_base default must not block resuming or `fgvc train`."""
    from fgvc.engine.resume import config_conflicts
    from fgvc.engine.run_folder import STAGE1

    explicit = config_from_dict({"stage1": {"lr": 0.01, "batch_size": 32}})
    saved = explicit.model_dump(mode="json")
    saved["stage1"]["lr_base"] = 0.5
    assert config_conflicts(saved, explicit, STAGE1) == []
    saved["stage1"]["lr"] = 0.02
    assert config_conflicts(saved, explicit, STAGE1) == ["stage1.lr: 0.02 -> 0.01"]
    # from lr_base: 0.04 x 64 / 256 = 0.01, the same rate as the explicit one above
    scaled = config_from_dict({"stage1": {"lr_base": 0.04, "batch_size": 64}})
    assert config_conflicts(scaled.model_dump(mode="json"), explicit, STAGE1) == ["stage1.batch_size: 64 -> 32"]
    saved = scaled.model_dump(mode="json")
    saved["stage1"]["lr_base"] = 0.08
    assert config_conflicts(saved, scaled, STAGE1) == ["stage1.lr: 0.02 -> 0.01"]
    # 0.1 x 48 / 256 is 0.018750000000000003 in floating point: the same rate as an explicit 0.01875
    from_base = config_from_dict({"stage2": {"lr_base": 0.1, "batch_size": 48}}).model_dump(mode="json")
    explicit = config_from_dict({"stage2": {"lr": 0.01875, "lr_base": 0.1, "batch_size": 48}})
    assert config_conflicts(from_base, explicit, "stage2") == []


def test_weights_none_in_a_recipe_means_random_init_as_on_the_command_line(tmp_path: Path) -> None:
    """`weights: none` in YAML was read as a file called "none" (its error then advised `none`)."""
    from fgvc.recipe import resolve_run_config

    recipe = tmp_path / "r.yaml"
    recipe.write_text("data: {dataset: cub}\nmodel: {arch: resnet50, weights: none}\n")
    assert resolve_run_config(recipe, {}).model.weights is None
    assert resolve_run_config(None, {"model.weights": "None"}).model.weights is None  # --weights None
    assert resolve_run_config(recipe, {"model.weights": "w.pth"}).model.weights == "w.pth"


def test_top_level_recipe_mistakes_are_the_top_levels_not_the_first_members(tmp_path: Path) -> None:
    from fgvc.recipe import load_recipe

    recipe = tmp_path / "r.yaml"
    recipe.write_text("competition: generic\nensembel: {weights: equal}\nmembers:\n  - {name: a}\n")
    with pytest.raises(ConfigError, match=r"r.yaml: top level: unknown key 'ensembel' \(did you mean 'ensemble'\?\); "
                       r"valid keys there: .*competition, ensemble, members$"):  # fmt: skip
        load_recipe(recipe)
    recipe.write_text("competition: generic\npredict: {tta: tencropp}\nmembers:\n  - {name: a}\n")
    with pytest.raises(ConfigError, match=r"r.yaml: top level: invalid value for 'predict.tta'"):
        load_recipe(recipe)


def test_stage2_resolution_follows_the_train_resolution_unless_given(tmp_path: Path) -> None:
    """`fgvc stage1 --res 224` then `fgvc stage2`: adapting at the 448-px default's 672 would be 3x, not Table 10's
    1.5x. A value given anywhere (flag, dotted or nested key, a saved run's config) is kept, unless --res changes the
    train resolution the file paired it with (the next test)."""
    assert config_from_dict({}).stage2.res == RunConfig().stage2.res == 672  # 448 x 1.5
    assert config_from_dict({"stage1.res": 224}).stage2.res == 352  # 336 to the nearest multiple of 32, halves up
    assert config_from_dict({"stage1": {"res": 491}, "stage2": {"epochs": 3}}).stage2.res == 736
    assert config_from_dict({"stage1.res": 224, "stage2.res": 384}).stage2.res == 384
    assert config_from_dict({"stage1": {"res": 224}, "stage2": {"res": 320}}).stage2.res == 320
    saved = config_from_dict({"stage1.res": 224, "stage2.res": 288}).model_dump(mode="json")
    assert resolve_run_config(None, {}).stage2.res == 672
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(saved))
    assert resolve_run_config(path, {}).stage2.res == resolve_run_config(path, {"stage1.res": 224}).stage2.res == 288
    assert resolve_run_config(path, {"stage1.res": 256}).stage2.res == 384  # 1.5 x 256: the file's 288 went with 224
