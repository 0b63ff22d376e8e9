"""Resolution sweep (accuracy versus test resolution) and the paper's eq. 5 test-resolution suggestion."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from fgvc.config import CONFIG_FILE, load_config
from fgvc.errors import ConfigError, DataError
from fgvc.fileio import atomic_write_text
from fgvc.metrics import METRIC_LABELS
from fgvc.plots import plot_sweep
from fgvc.submission import leaderboard_metric

log = logging.getLogger("fgvc")


def apparent_size_factor(scale: tuple[float, float] = (0.08, 1.0)) -> float:
    """E[sigma] for RandomResizedCrop, whose area fraction sigma^2 is uniform in ``scale`` (paper eq. 5).

    ``F = 2/3 * (s+^3 - s-^3) / (s+^2 - s-^2)`` with ``s- = sqrt(scale[0])``, ``s+ = sqrt(scale[1])``; ~0.708 for
    the default (0.08, 1).
    """
    lo, hi = math.sqrt(scale[0]), math.sqrt(scale[1])
    if hi <= lo:
        raise ConfigError(f"RandomResizedCrop scale range {scale} must have min < max")
    return 2.0 / 3.0 * (hi**3 - lo**3) / (hi**2 - lo**2)


def suggest_test_res(
    train_res: int, crop_pct: float = 0.875, scale: tuple[float, float] = (0.08, 1.0), multiple: int = 32
) -> tuple[float, int]:
    """Test crop size at which objects appear as large as in training (eq. 5 solved for E[r_test/r_train] = 1).

    With the test resize ``K_img = K_test / crop_pct``: ``F * K_img / K_train = 1``, so
    ``K_test = crop_pct * K_train / F``. Returns (exact value, value rounded to the nearest ``multiple``).
    """
    if train_res < 1:
        raise ConfigError(f"--train-res must be a positive number of pixels, not {train_res}")
    if not 0 < crop_pct <= 1:
        raise ConfigError(f"--crop-pct must be in (0, 1] (the centre crop's share of the resized side), not {crop_pct}")
    if not 0 < scale[0] < scale[1] <= 1:
        raise ConfigError(f"RandomResizedCrop scale {scale} must satisfy 0 < min < max <= 1 (area fractions)")
    exact = crop_pct * train_res / apparent_size_factor(scale)
    return exact, max(multiple, round(exact / multiple) * multiple)


@dataclass
class SweepResult:
    table: pd.DataFrame  # one row per resolution, one column per model (``metric``, %)
    metric: str  # the dataset's leaderboard metric (fgvc.submission.leaderboard_metric)
    best_model: str
    best_res: int
    best_score: float
    csv_path: Path
    png_path: Path


def sweep(
    run_dir: str | Path,
    resolutions: list[int],
    split: str = "val",
    batch_size: int | None = None,
    workers: int | None = None,
    progress: bool = True,
    data_root: str | Path | None = None,
    device: str | None = None,
) -> SweepResult:
    """The leaderboard metric (:func:`fgvc.submission.leaderboard_metric`: top-1 for most datasets) of the stage-1
    model and of every finished stage-2 model at each test resolution (test augmentation)."""
    from fgvc.engine.loaders import load_split
    from fgvc.engine.run_folder import require_run_folder, require_saved_root
    from fgvc.engine.runtime import is_main_process
    from fgvc.predict import finished_stage_dirs, predict_stage, require_positive, require_resolutions

    run_dir = Path(run_dir)
    if not resolutions:
        raise ConfigError("--res needs at least one resolution, e.g. --res 384,448,512")
    require_positive(("--batch-size", batch_size), *(("--res", r) for r in resolutions))
    require_run_folder(run_dir)
    dirs = finished_stage_dirs(run_dir)
    if not dirs:
        raise DataError(f"{run_dir}: no finished stage; run `fgvc stage1` first")
    cfg = load_config(run_dir / CONFIG_FILE)
    require_resolutions(cfg.model.arch, resolutions)
    metric = leaderboard_metric(cfg.data.dataset)
    if cfg.data.train_on_all and split == "val" and is_main_process():
        log.warning("%s: data.train_on_all is set, so the val split was trained on and this sweep scores training "
                    "images; sweep a run without it to choose the resolution", run_dir)  # fmt: skip
    if data_root is None:  # the dataset moved: said as such, as predict says it
        require_saved_root(cfg, run_dir / CONFIG_FILE)
    moved = {"data": cfg.data.model_copy(update={"root": str(data_root)})} if data_root is not None else {}
    labels = load_split(cfg.model_copy(update=moved), split).frame["label"]
    no_labels = f"{run_dir}: the {split} split has no labels; sweep needs a labelled split (--split val)"
    if len(labels) and not (labels >= 0).any():  # not after a pass over it (an empty split: predict says so)
        raise DataError(no_labels)
    table = pd.DataFrame({"res": sorted(set(resolutions))})
    for stage_dir in dirs:
        column = []
        for res in table["res"]:
            result = predict_stage(stage_dir, split, int(res), "none", batch_size, workers, progress=progress,
                                   data_root=data_root, device=device)  # fmt: skip
            if result.metrics is None:  # checked above (this narrows the type)
                raise DataError(no_labels)
            column.append(round(result.metrics[metric], 3))
        table[stage_dir.name] = column
    long = table.melt(id_vars="res", var_name="model", value_name="score")
    best = long.loc[long["score"].idxmax()]
    # One pair of files per split: a sweep of the test split does not replace the validation sweep. A rerun on the
    # same split replaces its own (a report, recomputed in seconds from the cached probability files).
    csv_path, png_path = run_dir / f"sweep-{split}.csv", run_dir / f"sweep-{split}.png"
    if is_main_process():  # under torchrun every rank has the table; one writes it
        atomic_write_text(csv_path, table.to_csv(index=False))
        label = METRIC_LABELS[metric]
        plot_sweep(table, png_path, cfg.stage1.res, f"{run_dir.name}: {label} on {split} vs test resolution", label)
    return SweepResult(table, metric, str(best["model"]), int(best["res"]), float(best["score"]), csv_path, png_path)
