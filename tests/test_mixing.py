"""Mixup / CutMix in stage 1: soft targets that match the mixed images, odd batches, and stage 2 kept unmixed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import tiny_config

from fgvc.config import StageConfig, config_from_dict
from fgvc.engine.mixing import build_mixing
from fgvc.errors import ConfigError


def _batch(n: int, classes: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(n)
    return torch.rand(n, 3, 8, 8, generator=generator), torch.arange(n) % classes


def test_no_mixing_is_plain_cross_entropy_with_the_stages_smoothing() -> None:
    mix, criterion = build_mixing(StageConfig(label_smoothing=0.1), num_classes=4)
    assert mix is None and isinstance(criterion, torch.nn.CrossEntropyLoss) and criterion.label_smoothing == 0.1


def test_mixup_targets_weigh_the_two_labels_as_the_images_are_weighed() -> None:
    """Each image is lam * itself + (1 - lam) * its mirror in the batch; its target puts lam on its own label."""
    mix, criterion = build_mixing(StageConfig(mixup=0.4), num_classes=4)
    assert mix is not None and type(criterion).__name__ == "SoftTargetCrossEntropy"
    images, labels = _batch(4)
    mixed, targets = mix(images.clone(), labels)
    lam = float(targets[0, labels[0]])  # labels 0, 1, 2, 3: image 0 is paired with image 3
    torch.testing.assert_close(mixed, lam * images + (1 - lam) * images.flip(0))
    expected = lam * torch.eye(4)[labels] + (1 - lam) * torch.eye(4)[labels.flip(0)]
    torch.testing.assert_close(targets, expected)


def test_cutmix_targets_follow_the_pasted_area() -> None:
    mix, _ = build_mixing(StageConfig(cutmix=1.0), num_classes=4)
    images, labels = _batch(4)
    mixed, targets = mix(images.clone(), labels)
    from_mirror = (mixed != images).any(dim=1).float().mean(dim=(1, 2))  # share of pixels pasted from the pair
    torch.testing.assert_close(targets[torch.arange(4), labels.flip(0)], from_mirror, atol=1e-6, rtol=0)


@pytest.mark.parametrize("n", [1, 5])
def test_an_odd_batch_mixes_all_but_its_last_image(n: int) -> None:
    """Skipped unreadable images leave odd batches; timm's Mixup needs pairs, so the last image keeps its own label."""
    mix, _ = build_mixing(StageConfig(mixup=0.4, label_smoothing=0.1), num_classes=4)
    images, labels = _batch(n)
    mixed, targets = mix(images.clone(), labels)
    assert mixed.shape == images.shape and targets.shape == (n, 4)
    torch.testing.assert_close(mixed[-1], images[-1])
    torch.testing.assert_close(targets[-1], torch.eye(4)[labels[-1]] * 0.9 + 0.1 / 4)
    torch.testing.assert_close(targets.sum(1), torch.ones(n))
    if n > 1:
        assert not torch.equal(mixed[: n - 1], images[: n - 1])


def test_stage2_refuses_mixing() -> None:
    with pytest.raises(ConfigError, match=r"r.yaml: invalid value for 'stage2': Mixup/CutMix are stage-1"):
        config_from_dict({"stage2": {"cutmix": 1.0}}, source="r.yaml")


def test_a_checkpoint_written_before_a_setting_existed_resumes_with_its_default() -> None:
    from fgvc.engine.resume import config_conflicts

    cfg = config_from_dict({})
    saved = cfg.model_dump(mode="json")
    del saved["stage1"]["mixup"], saved["stage1"]["cutmix"]
    assert config_conflicts(saved, cfg, "stage1") == []
    assert config_conflicts(saved, cfg.model_copy(update={"stage1": StageConfig(cutmix=1.0)}), "stage1")


def test_stage1_trains_with_mixup_and_cutmix(tiny_demo_root: Path, tmp_path: Path) -> None:
    from fgvc.engine.stage import run_stage1

    cfg = tiny_config(tiny_demo_root, tmp_path, stage1={"epochs": 1, "mixup": 0.4, "cutmix": 1.0})
    result = run_stage1(cfg, progress=False)
    loss = result.history["train_loss"].iloc[0]
    assert result.interrupted_by is None and 0 < loss < 10
