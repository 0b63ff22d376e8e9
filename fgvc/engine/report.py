"""What a stage run tells its user: the log line of each epoch, ``metrics.csv`` and its plot, and a hint when the input
pipeline sets the pace."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from fgvc.engine.loop import EpochStats
from fgvc.fileio import atomic_write_text
from fgvc.metrics import METRIC_LABELS
from fgvc.plots import plot_training_curves


def history_row(epoch: int, stats: EpochStats) -> dict[str, Any]:
    """One epoch's line of ``metrics.csv`` before validation adds its ``val_*`` columns."""
    return {
        "epoch": epoch,
        "train_loss": round(stats.loss, 5),
        "lr": stats.lr,
        "img_per_s": round(stats.images_per_s, 1),
        "seconds": round(stats.seconds, 1),
        "data_wait": round(stats.data_wait_share, 3),
        "skipped": stats.skipped,
    }


def format_metrics(metrics: dict[str, float] | None, metric: str) -> str:
    """Top-1, top-5, mean per-class accuracy, and the leaderboard's ``metric`` (best.pt's choice) if another."""
    if not metrics:
        return "n/a"
    shown = list(dict.fromkeys(("top1", "top5", "mean_per_class", metric)))
    return "  ".join(f"{METRIC_LABELS[name]} {metrics[name]:.2f}" for name in shown)


def epoch_line(row: dict[str, Any], epochs: int, metric: str) -> str:
    val = ""
    if "val_top1" in row:
        val = " | val " + format_metrics({k[4:]: v for k, v in row.items() if k.startswith("val_")}, metric)
    return (
        f"epoch {row['epoch']}/{epochs} | loss {row['train_loss']:.4f}  lr {row['lr']:.2e}  "
        f"{row['img_per_s']:.0f} img/s  {row['seconds']:.0f} s  data wait {row.get('data_wait', 0.0):.0%}{val}"
    )


INPUT_BOUND_SHARE = 0.2  # of an epoch spent waiting for batches, above which the log says what to change


def input_bound_hint(stats: EpochStats, workers: int, decode: str, device: torch.device) -> str | None:
    """A one-line suggestion when an epoch spent more than :data:`INPUT_BOUND_SHARE` of its time waiting for data.

    On CUDA with CPU decoding the first remedy is nvJPEG (``--decode gpu``), which frees the CPU of decoding and
    augmentation; otherwise more loader processes, up to the CPU cores per process.
    """
    share = stats.data_wait_share
    if share <= INPUT_BOUND_SHARE or stats.images == 0:
        return None
    remedies = [f"more --workers (now {workers} per process, {os.cpu_count()} CPUs)"]
    if device.type == "cuda" and decode == "cpu":
        remedies.insert(0, "--decode gpu")
    tries = " or ".join(remedies)
    return f"the model waited for images {share:.0%} of the epoch: the input pipeline sets the pace; try {tries}"


def write_history(history: list[dict[str, Any]], stage_dir: Path, title: str) -> None:
    table = pd.DataFrame(history)
    atomic_write_text(stage_dir / "metrics.csv", table.to_csv(index=False))
    plot_training_curves(table, stage_dir / "curves.png", title)
