"""Settings an architecture cannot run are refused before any data is read or any member trains."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import tiny_config

from fgvc.engine import stage
from fgvc.errors import ConfigError
from fgvc.models import check_resolution, model_meta
from fgvc.pipeline import train_recipe


def test_a_size_an_architecture_cannot_take_is_one_line_with_sizes_that_work() -> None:
    """DLA's levels must line up after down- and up-sampling: 48 px fails deep inside timm (it used to be a 220-line
    traceback after the dataset read); 32 and 64 px work."""
    meta = model_meta("timm:dla34")
    with pytest.raises(ConfigError) as refused:
        check_resolution(meta, 48)
    message = str(refused.value)
    assert message.startswith("timm:dla34 cannot take 48 px images (RuntimeError: ") and "\n" not in message
    assert message.endswith("sizes near it that work: 32 or 64")
    for size in (32, 64, 224):
        check_resolution(meta, size)
    check_resolution(model_meta("timm:resnet18"), 37)  # global pooling takes any size


def test_stage_settings_the_model_cannot_run_fail_before_the_dataset_is_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_reading(*_: object) -> None:
        raise AssertionError("the dataset was read before the settings were checked")

    monkeypatch.setattr(stage, "load_split", no_reading)
    cfg = tiny_config(tmp_path / "data", tmp_path / "runs", model={"arch": "timm:dla34"}, stage1={"res": 48})
    with pytest.raises(ConfigError, match="timm:dla34 cannot take 48 px images"):
        stage.run_stage1(cfg, progress=False)
    # `--res 100000` (a typo) used to end in OpenCV's out-of-memory traceback from a loader worker
    cfg = tiny_config(tmp_path / "data", tmp_path / "runs", stage1={"res": 100000})
    with pytest.raises(ConfigError, match=r"^resolution 100000 px is outside 1\.\.4096"):
        stage.run_stage1(cfg, progress=False)
    check_resolution(model_meta("timm:resnet18"), 4096)  # the largest accepted size
    with pytest.raises(ConfigError, match=r"4097 px is outside 1\.\.4096"):
        check_resolution(model_meta("timm:resnet18"), 4097)
    cfg = tiny_config(tmp_path / "data", tmp_path / "runs", model={"arch": "timm:convnext_atto"})
    with pytest.raises(ConfigError, match="tune 'bn\\+fc' needs a BatchNorm"):
        stage.check_model_settings(cfg, "stage2")
    cfg = tiny_config(tmp_path / "data", tmp_path / "runs", runtime={"cache_features": "on", "compile": True})
    with pytest.raises(ConfigError, match="--cache-features on: the cache cannot cut a compiled model"):
        stage.check_model_settings(cfg, "stage2")
    stage.check_model_settings(cfg.model_copy(update={"runtime": cfg.runtime.model_copy(update={"compile": False})}),
                               "stage2")  # a cache the test ResNet can have  # fmt: skip
    assert not (tmp_path / "runs").exists()


def test_a_recipe_member_that_cannot_run_its_stage_2_is_refused_before_any_member_trains(tmp_path: Path) -> None:
    """ConvNeXt has no BatchNorm for bn+fc, and a ViT with 16 px patches takes no 40 px images: said when `fgvc
    train` starts, for both, not after hours of the first member's stage 1."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"""competition: generic
out: {tmp_path / 'runs'}
data: {{dataset: demo, root: {tmp_path / 'data'}, workers: 0}}
model: {{weights: null}}
stage1: {{res: 32, epochs: 1, batch_size: 4}}
stage2: {{res: 48, epochs: 1, batch_size: 4}}
members:
  - {{name: fine, stage: 1, model: {{arch: "timm:test_resnet"}}}}
  - {{name: convnext, stage: 2, model: {{arch: "timm:convnext_atto"}}}}
  - {{name: vit, stage: 2, model: {{arch: "timm:vit_tiny_patch16_224"}}, stage2: {{res: 40, tune: fc}}}}
""")
    with pytest.raises(ConfigError) as refused:
        train_recipe(recipe, progress=False)
    message = str(refused.value)
    assert "member convnext: tune 'bn+fc' needs a BatchNorm" in message
    assert "member vit: timm:vit_tiny_patch16_224 takes resolutions divisible by its patch size 16, not 40" in message
    assert "member fine" not in message and not (tmp_path / "runs").exists()


def test_a_forced_feature_cache_that_cannot_be_built_is_an_error_not_a_log_line(
    tiny_demo_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--cache-features on` asks for the cache: where the model cannot be cut (timm's DenseNet for stage+bn+fc), the
    run says so and stops, as it does for the other settings that rule the cache out, instead of running uncached."""
    cfg = tiny_config(tiny_demo_root, tmp_path / "runs")
    stage.run_stage1(cfg, progress=False)
    monkeypatch.setattr(stage, "split_model", lambda *_: None)  # as split_model answers for such a model
    with pytest.raises(ConfigError, match=r"--cache-features on: timm:test_resnet cannot be cut before its tuned part "
                                          r"for tune 'bn\+fc'.*; use --cache-features auto or off"):  # fmt: skip
        stage.run_stage2(cfg.run_dir(), {"stage2.res": 40, "runtime.cache_features": "on"}, progress=False)
    assert stage.run_stage2(cfg.run_dir(), {"stage2.res": 40}, progress=False).final is not None  # auto: uncached
