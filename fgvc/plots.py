"""PNG plots of training curves and resolution sweeps (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd

from fgvc.fileio import atomic_path


def _save(fig: plt.Figure, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def plot_training_curves(history: pd.DataFrame, path: Path, title: str) -> None:
    """Training loss and validation accuracy per epoch."""
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.6))
    ax_loss.plot(history["epoch"], history["train_loss"], marker="o")
    ax_loss.set(xlabel="epoch", ylabel="training loss", title=title)
    if "val_top1" in history and history["val_top1"].notna().any():
        done = history[history["val_top1"].notna()]
        ax_acc.plot(done["epoch"], done["val_top1"], marker="o", label="top-1")
        ax_acc.plot(done["epoch"], done["val_top5"], marker="s", label="top-5")
        ax_acc.legend()
    ax_acc.set(xlabel="epoch", ylabel="validation accuracy (%)")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
    _save(fig, path)


def plot_sweep(table: pd.DataFrame, path: Path, train_res: int, title: str, metric: str = "top-1") -> None:
    """A metric (top-1 accuracy by default) versus test resolution, one line per model (the paper's Figure 5)."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for column in table.columns:
        if column == "res":
            continue
        ax.plot(table["res"], table[column], marker="o", label=column)
    ax.axvline(train_res, color="grey", linestyle=":", label=f"train res {train_res}")
    ax.set(xlabel="test resolution (px)", ylabel=f"{metric} (%)", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, path)
