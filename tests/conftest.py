"""Shared fixtures: a small procedural dataset in CUB format and a factory of tiny run configs."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from fgvc.config import RunConfig

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Single-threaded torch for a test: small ops run faster without thread hand-offs on the 2-core machines."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def fgvc_log(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """Records of the "fgvc" logger, each once: it may not propagate to the root (the CLI turns that off in this
    process), and where it does, caplog's handler on the root would see every record a second time (counts of a line
    then depended on whether a CLI test ran earlier in the process)."""
    logger = logging.getLogger("fgvc")
    level, propagate = logger.level, logger.propagate
    logger.addHandler(caplog.handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    yield caplog
    logger.removeHandler(caplog.handler)
    logger.setLevel(level)
    logger.propagate = propagate


@pytest.fixture(scope="session")
def tiny_demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 classes x 12 images of the procedural demo data, written in CUB-200-2011's format."""
    from fgvc.demo_data import generate_demo

    root = tmp_path_factory.mktemp("demo")
    generate_demo(root, seed=3, num_classes=4, images_per_class=12, test_fraction=0.34)
    return root


def tiny_config(data_root: Path, out: Path, **sections: dict) -> RunConfig:
    """A run of the tiny timm test ResNet at small resolutions, deterministic, no workers."""
    values: dict = {
        "out": str(out),
        "data": {"dataset": "demo", "root": str(data_root), "workers": 0, "val_fraction": 0.2},
        "model": {"arch": "timm:test_resnet", "weights": None},
        "stage1": {"res": 32, "epochs": 1, "batch_size": 8, "lr": 0.05},
        "stage2": {"res": 48, "epochs": 1, "batch_size": 8, "lr": 0.05, "augment": "test", "tune": "bn+fc"},
        "predict": {"batch_size": 8},
        "runtime": {"deterministic": True, "seed": 0},
    }
    for key, update in sections.items():
        values[key] = {**values.get(key, {}), **update} if isinstance(update, dict) else update
    return RunConfig.model_validate(values)
