"""Training engine: stage 1 learns, stage 2 touches only what its policy tunes, runs resume exactly, DDP works."""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import tiny_config

from fgvc.config import CONFIG_FILE, load_config
from fgvc.engine.checkpoint import BEST, LAST, load_checkpoint, save_checkpoint
from fgvc.engine.loaders import _load_splits, load_split
from fgvc.engine.run_folder import FINISHED
from fgvc.engine.stage import run_stage1, run_stage2
from fgvc.errors import ConfigError, DataError, RunExistsError, WeightsError
from fgvc.models import get_meta
from fgvc.probs import Probabilities

REPO = Path(__file__).resolve().parents[1]


def _fgvc(*args: str, **kwargs) -> subprocess.Popen:
    # TQDM_MININTERVAL: live progress bars into the pipe, whose "img_s=" tells the tests a training step has finished
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "TQDM_MININTERVAL": "0.1"}
    for name in kwargs.get("unset", ()):  # as a user's shell may leave it
        env.pop(name, None)
    return subprocess.Popen([sys.executable, "-m", "fgvc", *args], cwd=kwargs.get("cwd", REPO), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # fmt: skip


class _Training:
    """A `fgvc` command started in a session of its own, its output read as it comes, returned once its progress bar
    has shown a finished training step: a signal sent then stops it mid-run."""

    def __init__(self, *args: str) -> None:
        import threading

        self.process = _fgvc(*args)
        self.printed: list[str] = []
        self._reader = threading.Thread(target=lambda: self.printed.extend(iter(lambda: self.process.stdout.read(1),
                                                                                "")))  # fmt: skip
        self._reader.start()
        deadline = time.time() + 300
        while "img_s=" not in self.output():
            assert time.time() < deadline and self.process.poll() is None, self.output()
            time.sleep(0.01)

    def output(self) -> str:
        return "".join(self.printed)

    def ended(self) -> tuple[int, str]:
        """The exit code and the whole output, once the command has ended."""
        self.process.wait(timeout=300)
        self._reader.join()
        return self.process.returncode, self.output()


@pytest.fixture(scope="module")
def stage1_run(tiny_demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    cfg = tiny_config(tiny_demo_root, tmp_path_factory.mktemp("runs"), stage1={"epochs": 2})
    result = run_stage1(cfg, progress=False)
    assert result.interrupted_by is None
    return cfg.run_dir()


def test_stage1_writes_the_run_folder(stage1_run: Path) -> None:
    for name in (CONFIG_FILE, f"stage1/{CONFIG_FILE}", "stage1/last.pt", "stage1/best.pt", "stage1/metrics.csv",
                 "stage1/curves.png", "stage1/train.log", f"stage1/{FINISHED}"):  # fmt: skip
        assert (stage1_run / name).is_file(), name
    history = pd.read_csv(stage1_run / "stage1" / "metrics.csv")
    assert list(history["epoch"]) == [1, 2]
    columns = {"train_loss", "lr", "img_per_s", "data_wait", "val_top1", "val_top5", "val_mean_per_class"}
    assert columns <= set(history.columns)
    cfg = load_config(stage1_run / CONFIG_FILE)
    assert cfg.stage1.epochs == 2 and cfg.model.arch == "timm:test_resnet"


def test_finished_run_is_not_overwritten_without_force(stage1_run: Path) -> None:
    cfg = load_config(stage1_run / CONFIG_FILE)
    before = (stage1_run / "stage1" / LAST).stat().st_mtime_ns
    with pytest.raises(RunExistsError, match=r"--force to train it again \(or choose another --name\)$"):
        run_stage1(cfg, progress=False)
    assert (stage1_run / "stage1" / LAST).stat().st_mtime_ns == before
    # --force with a bad input (here a CUB folder that is not there) fails before it retires anything
    missing = {"dataset": "cub", "root": str(stage1_run / "no-such-data")}
    wrong = cfg.model_copy(update={"name": stage1_run.name, "data": cfg.data.model_copy(update=missing)})
    with pytest.raises(DataError, match="no-such-data"):
        run_stage1(wrong, force=True, progress=False)
    assert (stage1_run / "stage1" / FINISHED).is_file()
    assert (stage1_run / "stage1" / LAST).stat().st_mtime_ns == before


def test_force_that_fails_in_its_first_epoch_leaves_the_finished_run_as_it_was(
    tiny_demo_root: Path, tmp_path: Path
) -> None:
    """The old result is retired when the new run writes its first checkpoint, not when it starts."""
    import shutil

    cfg = tiny_config(tiny_demo_root, tmp_path / "runs")
    run_stage1(cfg, progress=False)
    run_stage2(cfg.run_dir(), {"stage2.res": 40}, progress=False)
    stage_dir, stage2_dir = cfg.run_dir() / "stage1", cfg.run_dir() / "stage2-40"
    files = [stage_dir / name for name in (FINISHED, BEST, LAST, CONFIG_FILE)]
    files += [cfg.run_dir() / CONFIG_FILE, stage2_dir / FINISHED, stage2_dir / LAST]
    before = {path: path.read_bytes() for path in files}

    broken = tmp_path / "broken"
    shutil.copytree(tiny_demo_root, broken)
    for image in sorted((broken / "CUB_200_2011" / "images").rglob("*.jpg")):
        image.write_bytes(b"not a jpeg")  # every image: the first batch fails whatever the order
    retrain = cfg.model_copy(update={"data": cfg.data.model_copy(update={"root": str(broken)})})
    with pytest.raises(DataError, match="image is corrupt or truncated"):
        run_stage1(retrain, force=True, progress=False)
    assert {path: path.read_bytes() for path in files} == before


def test_a_stop_signal_that_reached_another_rank_alone_is_named_and_exits_with_its_code(
    tiny_demo_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A SIGINT to rank 1 alone: rank 0 logged "interrupted by signal None" and the command exited 143 (SIGTERM's
    code). Here the ranks' reduction is stood in for: from the third check on, another rank reports SIGINT."""
    import itertools
    import logging

    import fgvc.engine.loop

    checks = itertools.count()
    monkeypatch.setattr(fgvc.engine.loop, "max_over_ranks",
                        lambda rt, value: value or (signal.SIGINT if next(checks) >= 2 else 0))  # fmt: skip
    cfg = tiny_config(tiny_demo_root, tmp_path / "runs")
    with caplog.at_level(logging.INFO, logger="fgvc"):
        assert run_stage1(cfg, progress=False).interrupted_by == signal.SIGINT
    assert f"interrupted by signal {int(signal.SIGINT)}: saved" in caplog.text
    assert (cfg.run_dir() / "stage1" / LAST).is_file()


def test_stage2_skips_unreadable_images_on_request(tiny_demo_root: Path, tmp_path: Path) -> None:
    """An image that became unreadable after stage 1: the error pointed stage 2 to a --skip-corrupt it lacked."""
    import shutil

    root = tmp_path / "demo"
    shutil.copytree(tiny_demo_root, root)
    cfg = tiny_config(root, tmp_path / "runs")
    run_stage1(cfg, progress=False)
    for image in sorted((root / "CUB_200_2011" / "images").rglob("*.jpg"))[:2]:
        image.write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match=r"skip unreadable images with --skip-corrupt \(fgvc stage1, stage2, predict"):
        run_stage2(cfg.run_dir(), {"stage2.res": 40}, progress=False)
    assert run_stage2(cfg.run_dir(), {"stage2.res": 40, "data.skip_corrupt": True}, progress=False).final is not None
    assert (cfg.run_dir() / "stage2-40" / FINISHED).is_file()


class _StopAtStep:
    """Patch the loss so that its ``at``-th call sends ``signum`` to this process: a stop request that arrives in the
    middle of that training step, as a Ctrl-C or a scheduler's SIGTERM does. ``restart`` counts again for a new run."""

    def __init__(self, patch: pytest.MonkeyPatch, signum: int, at: int) -> None:
        self.signum, self.at, self.calls = signum, at, 0
        forward = torch.nn.CrossEntropyLoss.forward

        def stop_at(module: torch.nn.Module, *args: object, **kwargs: object) -> torch.Tensor:
            self.calls += 1
            if self.calls == self.at:
                os.kill(os.getpid(), self.signum)
            return forward(module, *args, **kwargs)

        patch.setattr(torch.nn.CrossEntropyLoss, "forward", stop_at)

    def restart(self, at: int) -> None:
        self.calls, self.at = 0, at


def test_a_force_run_stopped_in_its_first_epoch_leaves_the_finished_run_as_it_was(
    tiny_demo_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C one step into a mistaken --force: the stop used to save last.pt, and that first checkpoint retired the
    finished stage 1, every stage 2 built on it and their predictions. Once the new run has finished an epoch, a stop
    saves and resumes as usual."""
    cfg = tiny_config(tiny_demo_root, tmp_path / "runs", stage1={"epochs": 2})
    run_stage1(cfg, progress=False)
    run_stage2(cfg.run_dir(), {"stage2.res": 40}, progress=False)
    stage_dir, stage2_dir = cfg.run_dir() / "stage1", cfg.run_dir() / "stage2-40"
    files = [stage_dir / name for name in (FINISHED, BEST, LAST, CONFIG_FILE)]
    files += [cfg.run_dir() / CONFIG_FILE, stage2_dir / FINISHED, stage2_dir / LAST, stage2_dir / BEST]
    before = {path: path.read_bytes() for path in files}
    steps = len(load_split(cfg, "train")) // cfg.stage1.batch_size
    with monkeypatch.context() as patch:
        stop = _StopAtStep(patch, signal.SIGINT, at=1)
        assert run_stage1(cfg, force=True, progress=False).interrupted_by == signal.SIGINT
        assert {path: path.read_bytes() for path in files} == before
        stop.restart(at=steps + 1)  # the first step of epoch 2: epoch 1's checkpoint took the folder over
        assert run_stage1(cfg, force=True, progress=False).interrupted_by == signal.SIGINT
    state = load_checkpoint(stage_dir / LAST)
    assert (state["epoch"], state["micro_step"], state["finished"]) == (1, 1, False)
    assert not (stage_dir / FINISHED).exists() and not (stage2_dir / LAST).exists()
    assert run_stage1(cfg, progress=False).interrupted_by is None  # resumed without --force, as the log line says
    assert load_checkpoint(stage_dir / LAST)["finished"]


def test_an_interrupted_run_resumes_from_its_folder_alone_wherever_it_now_lives(
    tiny_demo_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stage 1: `--recipe <moved run>/config.yaml` trained a new run in ./runs (the saved `out` is relative). Stage 2:
    `--run DIR --test-res R` took the run's stage-1-time settings and refused its own interrupted stage 2."""
    import shutil

    from fgvc.recipe import resolve_run_config

    cfg = tiny_config(tiny_demo_root, tmp_path / "runs", stage1={"epochs": 2})
    steps = len(load_split(cfg, "train")) // cfg.stage1.batch_size
    with monkeypatch.context() as patch:
        _StopAtStep(patch, signal.SIGTERM, at=steps + 1)
        assert run_stage1(cfg, progress=False).interrupted_by == signal.SIGTERM
    moved = tmp_path / "elsewhere" / cfg.run_dir().name
    shutil.move(cfg.run_dir(), moved)
    monkeypatch.chdir(tmp_path)
    for saved in (moved / CONFIG_FILE, moved / "stage1" / CONFIG_FILE):
        assert resolve_run_config(saved, {}).run_dir().resolve() == moved.resolve()
    assert resolve_run_config(moved / CONFIG_FILE, {"name": "other"}).run_dir().name == "other"  # flags still win
    mine = tmp_path / "configs" / "stage1" / CONFIG_FILE  # a user's own file in a folder that happens to be "stage1"
    mine.parent.mkdir(parents=True)
    mine.write_text(f"out: {tmp_path / 'mine'}\nname: mine\n")
    assert resolve_run_config(mine, {}).run_dir() == tmp_path / "mine" / "mine"
    stale = moved / "stage1" / ".last.pt.k3x9q2ab.tmp"  # what a SIGKILL in the middle of a checkpoint write leaves
    stale.write_bytes(b"\0" * 1000)
    assert run_stage1(resolve_run_config(moved / CONFIG_FILE, {}), progress=False).interrupted_by is None
    assert "resuming" in (moved / "stage1" / "train.log").read_text()
    assert not stale.exists()  # removed when the resumed run wrote its first checkpoint (GBs each for large models)
    assert load_checkpoint(moved / "stage1" / LAST)["finished"] and not (tmp_path / "runs" / moved.name).exists()

    stage2 = {"stage2.res": 40, "stage2.epochs": 2, "stage2.lr": 0.01, "stage2.batch_size": 4}
    with monkeypatch.context() as patch:
        _StopAtStep(patch, signal.SIGTERM, at=2)
        assert run_stage2(moved, stage2, progress=False).interrupted_by == signal.SIGTERM
    assert run_stage2(moved, {"stage2.res": 40}, progress=False).interrupted_by is None  # its own settings, resumed
    assert load_config(moved / "stage2-40" / CONFIG_FILE).stage2.epochs == 2


def test_a_relative_weights_path_is_recorded_absolute_and_compared_as_the_file_it_names(
    tiny_demo_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--weights w.pth` was saved as given: the run's config.yaml, run from another folder, started from whatever
    w.pth was there, and naming the same file by its absolute path was refused as a change of settings."""
    from fgvc.models import create_model

    work, other = tmp_path / "work", tmp_path / "other"
    for folder in (work, other):
        folder.mkdir()
        torch.save(create_model("timm:test_resnet", 2).state_dict(), folder / "w.pth")
    monkeypatch.chdir(work)
    cfg = tiny_config(tiny_demo_root, tmp_path / "runs", model={"weights": "w.pth"}, stage1={"epochs": 2})
    with monkeypatch.context() as patch:
        _StopAtStep(patch, signal.SIGTERM, at=2)
        assert run_stage1(cfg, progress=False).interrupted_by == signal.SIGTERM
    run_dir = tmp_path / "runs" / cfg.run_name()
    assert load_config(run_dir / CONFIG_FILE).model.weights == str(work / "w.pth")
    monkeypatch.chdir(other)  # here w.pth is another file: not the run's start
    with pytest.raises(ConfigError, match=r"model.weights: .*work/w.pth -> .*other/w.pth"):
        run_stage1(tiny_config(tiny_demo_root, tmp_path / "runs", model={"weights": "w.pth"}, stage1={"epochs": 2}),
                   progress=False)  # fmt: skip
    monkeypatch.chdir(work)  # resumed with the relative path, and stopped again: its last.pt names the file too
    with monkeypatch.context() as patch:
        _StopAtStep(patch, signal.SIGTERM, at=2)
        assert run_stage1(cfg, progress=False).interrupted_by == signal.SIGTERM
    assert load_checkpoint(run_dir / "stage1" / LAST)["config"]["model"]["weights"] == str(work / "w.pth")
    monkeypatch.chdir(other)
    absolute = tiny_config(tiny_demo_root, tmp_path / "runs", model={"weights": str(work / "w.pth")},
                           stage1={"epochs": 2})  # fmt: skip
    assert run_stage1(absolute, progress=False).interrupted_by is None
    assert "resuming" in (run_dir / "stage1" / "train.log").read_text()


@pytest.mark.parametrize(("metric", "kept_epoch"), [("top1", 2), ("macro_f1", 1)])
def test_best_pt_is_the_epoch_the_leaderboard_ranks_highest(
    tiny_demo_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, metric: str, kept_epoch: int
) -> None:
    """Herbarium's leaderboard ranks macro F1: an epoch with a better top-1 and a worse F1 is not the one to submit."""
    import fgvc.engine.stage as stage_module

    scores = {"top1": [50.0, 60.0], "top3": [55.0, 65.0], "top5": [60.0, 70.0], "mean_per_class": [45.0, 55.0],
              "macro_f1": [40.0, 30.0]}  # fmt: skip
    epochs = iter(range(2))
    monkeypatch.setattr(stage_module, "summarize", lambda *_: (lambda e: {k: v[e] for k, v in scores.items()})(
        next(epochs)))  # fmt: skip
    monkeypatch.setattr(stage_module, "leaderboard_metric", lambda dataset: metric)
    cfg = tiny_config(tiny_demo_root, tmp_path, stage1={"epochs": 2})
    result = run_stage1(cfg, progress=False)
    stage_dir = cfg.run_dir() / "stage1"
    assert load_checkpoint(stage_dir / BEST)["epoch"] == kept_epoch == result.best_epoch()["epoch"]
    assert json.loads((stage_dir / FINISHED).read_text())["best"] == {metric: scores[metric][kept_epoch - 1]}
    assert ("macro F1" in result.adapted_score()) == (metric == "macro_f1")


def test_training_on_the_val_split_keeps_the_last_epoch_not_the_best_scoring(
    tiny_demo_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """With data.train_on_all the val split's scores are training scores: choosing on them picks the epoch that fits
    the training images best, so best.pt is the last epoch (as without a val split)."""
    import fgvc.engine.stage as stage_module

    epochs = iter([60.0, 50.0])  # the first epoch scores higher on the images it trained on
    monkeypatch.setattr(stage_module, "summarize", lambda *_: dict.fromkeys(("top1", "top5", "mean_per_class"),
                                                                             next(epochs)))  # fmt: skip
    cfg = tiny_config(tiny_demo_root, tmp_path, stage1={"epochs": 2}, data={"train_on_all": True})
    with caplog.at_level(logging.INFO, logger="fgvc"):
        result = run_stage1(cfg, progress=False)
    assert load_checkpoint(cfg.run_dir() / "stage1" / BEST)["epoch"] == 2
    assert result.best_epoch() is None and result.adapted_score() == "50.00 after adaptation"
    assert "best.pt is the last epoch, not the best-scoring one" in caplog.text


@pytest.mark.parametrize("old_format", [False, True])
def test_a_resumed_run_keeps_the_first_of_tied_epochs_and_the_metric_it_started_with(
    tiny_demo_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, old_format: bool
) -> None:
    """22 of 48 images is 45.8333...: metrics.csv rounds it, so a resume must not compare the next epoch's unrounded
    tie with the rounded copy. A last.pt of an fgvc that chose best.pt on top-1 goes on choosing on top-1."""
    import fgvc.engine.stage as stage_module

    tie = 100 * 22 / 48
    scores = {"top1": tie, "top3": tie, "top5": tie, "mean_per_class": tie, "macro_f1": tie}
    monkeypatch.setattr(stage_module, "summarize", lambda *_: dict(scores))
    monkeypatch.setattr(stage_module, "leaderboard_metric", lambda dataset: "macro_f1")
    cfg = tiny_config(tiny_demo_root, tmp_path, stage1={"epochs": 2})
    steps = len(load_split(cfg, "train")) // cfg.stage1.batch_size
    with monkeypatch.context() as patch:
        _StopAtStep(patch, signal.SIGTERM, at=steps + 1)  # the first step of epoch 2: last.pt holds epoch 1
        assert run_stage1(cfg, progress=False).interrupted_by == signal.SIGTERM
    stage_dir = cfg.run_dir() / "stage1"
    if old_format:
        state = load_checkpoint(stage_dir / LAST)
        save_checkpoint(stage_dir / LAST, state | {"best": tie})  # a plain float: top-1, as fgvc wrote it before
    result = run_stage1(cfg, progress=False)
    assert load_checkpoint(stage_dir / BEST)["epoch"] == 1 == result.best_epoch()["epoch"]
    assert result.metric == ("top1" if old_format else "macro_f1")


class _StopInEvaluation:
    """SIGTERM to this process as the ``at``-th evaluation pass (a validation, the feature cache) starts its first
    batch: a stop request that arrives while a large validation split is being scored."""

    def __init__(self, patch: pytest.MonkeyPatch, target: str, at: int = 1) -> None:
        import fgvc.engine.stage as stage_module

        original, self.calls = getattr(stage_module, target), 0

        def stopping(model: object, loader: object, *args: object, **kwargs: object) -> object:
            self.calls += 1
            if self.calls == at:
                os.kill(os.getpid(), signal.SIGTERM)
            return original(model, loader, *args, **kwargs)

        patch.setattr(stage_module, target, stopping)


def _comparable(history: pd.DataFrame) -> pd.DataFrame:
    return history[[c for c in history.columns if c == "epoch" or c == "train_loss" or c.startswith("val_")]]


def test_a_stop_during_validation_saves_the_epoch_and_the_resume_validates_it_first(
    tiny_demo_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGTERM while epoch 1 is being validated: the run used to score the whole split before saving, past a
    scheduler's grace period (SLURM: 30 s), and the SIGKILL then cost the epoch. Now it saves epoch 1 at once, and the
    resume validates it before epoch 2: the same history and best.pt as a run never stopped."""
    uninterrupted = tiny_config(tiny_demo_root, tmp_path / "a", stage1={"epochs": 2})
    reference = run_stage1(uninterrupted, progress=False)
    cfg = tiny_config(tiny_demo_root, tmp_path / "b", stage1={"epochs": 2})
    with monkeypatch.context() as patch:
        stop = _StopInEvaluation(patch, "predict_probs", at=1)
        assert run_stage1(cfg, progress=False).interrupted_by == signal.SIGTERM
    assert stop.calls == 1  # the interrupted validation did not go on to a second pass
    stage_dir = cfg.run_dir() / "stage1"
    state = load_checkpoint(stage_dir / LAST)
    assert (state["epoch"], state["micro_step"], state["val_pending"], state["finished"]) == (1, 0, True, False)
    assert not (stage_dir / BEST).exists()  # no score yet, so no best epoch
    resumed = run_stage1(cfg, progress=False)
    pd.testing.assert_frame_equal(_comparable(resumed.history), _comparable(reference.history))
    best_epoch = load_checkpoint(uninterrupted.run_dir() / "stage1" / BEST)["epoch"]
    assert load_checkpoint(stage_dir / BEST)["epoch"] == best_epoch
    assert (stage_dir / FINISHED).is_file()


def test_a_stop_during_the_last_epochs_validation_finishes_on_resume(
    tiny_demo_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = tiny_config(tiny_demo_root, tmp_path, stage1={"epochs": 1})
    with monkeypatch.context() as patch:
        _StopInEvaluation(patch, "predict_probs", at=1)
        assert run_stage1(cfg, progress=False).interrupted_by == signal.SIGTERM
    stage_dir = cfg.run_dir() / "stage1"
    assert not (stage_dir / FINISHED).exists()
    result = run_stage1(cfg, progress=False)
    assert (stage_dir / FINISHED).is_file() and result.final is not None and "val_top1" in result.history
    assert load_checkpoint(stage_dir / BEST)["epoch"] == 1


@pytest.mark.parametrize("target", ["predict_probs", "compute_cache"])
def test_a_stop_before_stage_2_trains_saves_nothing_and_a_rerun_starts_it(
    stage1_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, target: str
) -> None:
    """SIGTERM while stage 2 scores the stage-1 model or fills its feature cache: nothing is trained yet, so nothing
    is saved (the folder is not claimed) and the rerun starts stage 2 afresh."""
    import shutil

    run = tmp_path / stage1_run.name
    shutil.copytree(stage1_run, run, ignore=shutil.ignore_patterns("stage2-*", "predictions"))
    overrides = {"stage2.res": 40, "runtime.cache_features": "on" if target == "compute_cache" else "off"}
    with monkeypatch.context() as patch:
        stop = _StopInEvaluation(patch, target, at=1)
        assert run_stage2(run, overrides, progress=False).interrupted_by == signal.SIGTERM
    assert stop.calls == 1 and not (run / "stage2-40" / LAST).exists()
    assert run_stage2(run, overrides, progress=False).interrupted_by is None
    assert (run / "stage2-40" / FINISHED).is_file()


def test_classes_are_their_category_ids_names_may_change(stage1_run: Path) -> None:
    """iNat 2018's categories.json replaces the training JSON's coded names: the same classes, not a new dataset."""
    from fgvc.engine.checkpoint import check_classes

    cfg = load_config(stage1_run / CONFIG_FILE)
    index = load_split(cfg, "train")
    ckpt = load_checkpoint(stage1_run / "stage1" / BEST)
    renamed = dataclasses.replace(index, class_names=[f"real {name}" for name in index.class_names])
    check_classes(ckpt, renamed, stage1_run / "stage1", stage1_run / CONFIG_FILE)
    shifted = dataclasses.replace(index, category_ids=[*index.category_ids[1:], index.category_ids[0]])
    with pytest.raises(DataError, match="trained on other classes"):
        check_classes(ckpt, shifted, stage1_run / "stage1", stage1_run / CONFIG_FILE)


def test_a_resume_over_a_dataset_whose_classes_changed_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A resumed stage compares last.pt's classes with the data's: resumed over a copy whose class folders differ (the
    same count, every label shifted), it used to go on training with each label meaning another class."""
    from dataset_fixtures import write_folder

    root = write_folder(tmp_path / "data").root
    cfg = tiny_config(root, tmp_path / "runs", data={"dataset": "folder"}, stage1={"res": 28, "epochs": 2})
    with monkeypatch.context() as patch:
        _StopAtStep(patch, signal.SIGTERM, at=2)
        assert run_stage1(cfg, progress=False).interrupted_by == signal.SIGTERM
    last = cfg.run_dir() / "stage1" / LAST
    saved = last.read_bytes()
    first = min(path.name for path in (root / "train").iterdir())
    for split in ("train", "val"):
        (root / split / first).rename(root / split / "zz-renamed")
    _load_splits.cache_clear()  # as in a new process, which reads the folders again
    with pytest.raises(DataError, match=rf"label 0 is '{first}' in the model") as caught:
        run_stage1(cfg, progress=False)
    assert "\n" not in str(caught.value)
    assert str(caught.value).endswith("resume with the data it was trained on (--data-root), or pass --force to "
                                      "start over")  # fmt: skip
    assert last.read_bytes() == saved  # the interrupted run is left to resume on its own data


def test_stage2_force_starts_from_the_run_settings_not_the_old_stage2_flags(stage1_run: Path, tmp_path: Path) -> None:
    import shutil

    from fgvc.engine.stage import stage2_config

    run = tmp_path / stage1_run.name
    shutil.copytree(stage1_run, run)
    run_stage2(run, {"stage2.res": 40, "stage2.epochs": 2, "stage2.tune": "fc", "runtime.cache_features": "off",
                     "data.workers": 1}, progress=False)  # fmt: skip
    resumed = stage2_config(run, {"stage2.res": 40})  # resuming: its own settings, runtime and loader ones too
    assert (resumed.stage2.tune, resumed.runtime.cache_features, resumed.data.workers) == ("fc", "off", 1)
    run_cfg = load_config(run / CONFIG_FILE)
    forced = stage2_config(run, {"stage2.res": 40}, resume=False)
    assert (forced.stage2.tune, forced.runtime.cache_features) == (run_cfg.stage2.tune, run_cfg.runtime.cache_features)
    ckpt = load_checkpoint(run / "stage2-40" / LAST)
    assert ckpt["decode"] == "cpu" and ckpt["source"].startswith("stage 1 epoch")  # a resume keeps both


def _state(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["model"]


POLICY_TUNED = {
    # policy: (parameters that must change, buffers that must change) as predicates on the module names of the meta
    "fc": ("classifier", None),
    "bn+fc": ("classifier+bn", "bn"),
    "bnstats+fc": ("classifier", "bn"),
    "stage+bn+fc": ("stage+classifier+bn", "stage"),
    "bnstats": (None, "bn"),
}


@pytest.mark.parametrize("tune", list(POLICY_TUNED))
def test_stage2_changes_exactly_what_the_policy_tunes(stage1_run: Path, tune: str) -> None:
    result = run_stage2(stage1_run, {"stage2.tune": tune, "stage2.res": 40 + 8 * list(POLICY_TUNED).index(tune)},
                        progress=False)  # fmt: skip
    before = _state(stage1_run / "stage1" / BEST)
    after = _state(result.stage_dir / LAST)
    from fgvc.models import create_model

    meta = get_meta(create_model("timm:test_resnet", 4, None))
    params_rule, buffers_rule = POLICY_TUNED[tune]

    def tuned(name: str, rule: str | None) -> bool:
        if rule is None:
            return False
        prefixes = {"classifier": [meta.classifier], "bn": [meta.last_bn], "stage": list(meta.last_stage)}
        wanted = [p for part in rule.split("+") for p in prefixes[part]]
        return any(name == p or name.startswith(p + ".") for p in wanted)

    param_names = {n for n, _ in create_model("timm:test_resnet", 4, None).named_parameters()}
    changed_any = False
    for name, value in before.items():
        same = torch.equal(value, after[name])
        is_param = name in param_names
        rule = params_rule if is_param else buffers_rule
        if name.endswith("num_batches_tracked"):
            continue
        if tuned(name, rule):
            changed_any = changed_any or not same
            if is_param or name.endswith(("running_mean", "running_var")):
                assert not same, f"{tune}: {name} should have been tuned"
        else:
            assert same, f"{tune}: {name} changed but is outside the tuned set"
    assert changed_any
    assert result.before is not None and result.final is not None


def test_stage2_requires_a_finished_stage1(tiny_demo_root: Path, tmp_path: Path) -> None:
    from fgvc.config import save_config
    from fgvc.errors import DataError

    with pytest.raises(DataError, match=r"no config\.yaml"):
        run_stage2(tmp_path / "nope", {"stage2.res": 48}, progress=False)
    cfg = tiny_config(tiny_demo_root, tmp_path)
    save_config(cfg, cfg.run_dir() / CONFIG_FILE)
    save_checkpoint(cfg.run_dir() / "stage1" / LAST, {"epoch": 0})  # stopped before the end: no finished marker
    with pytest.raises(DataError, match="stage 1 is not finished"):
        run_stage2(cfg.run_dir(), {"stage2.res": 48}, progress=False)


def test_stage2_refuses_a_run_config_whose_architecture_is_not_stage_1s(stage1_run: Path, tmp_path: Path) -> None:
    """config.yaml's arch edited: stage 2 trained stage 1's model but saved the edited name, which predict then could
    not load ("checkpoint does not fit this model")."""
    run = tmp_path / stage1_run.name
    shutil.copytree(stage1_run, run, ignore=shutil.ignore_patterns("stage2-*", "predictions"))  # other tests'
    (run / CONFIG_FILE).write_text((run / CONFIG_FILE).read_text().replace("timm:test_resnet", "timm:resnet18"))
    with pytest.raises(ConfigError, match=r"config.yaml: model.arch is timm:resnet18, but stage 1 trained "
                                          r"timm:test_resnet; stage 2 adapts that model: set model.arch back"):
        run_stage2(run, {"stage2.res": 40}, progress=False)
    assert not list(run.glob("stage2-40/*.pt"))


def test_a_new_stage1_under_stage2_models_of_a_deleted_one_is_refused(stage1_run: Path, tmp_path: Path) -> None:
    """stage1/ deleted by hand, stage1 run again: the stage-2 models of the old one stayed marked finished, and
    predict and `fgvc train` took them as adapted from the new one."""
    run = tmp_path / stage1_run.name
    shutil.copytree(stage1_run, run, ignore=shutil.ignore_patterns("stage2-*", "predictions"))  # other tests'
    run_stage2(run, {"stage2.res": 36, "stage2.epochs": 0}, progress=False)
    shutil.rmtree(run / "stage1")
    cfg = load_config(run / CONFIG_FILE).model_copy(update={"out": str(tmp_path)})
    with pytest.raises(RunExistsError, match=r"stage2-36 adapted an earlier stage 1 that is gone; pass --force"):
        run_stage1(cfg, progress=False)
    assert (run / "stage2-36" / FINISHED).is_file()
    assert run_stage1(cfg, force=True, progress=False).interrupted_by is None
    assert not (run / "stage2-36" / FINISHED).exists()


def test_a_finished_stage_names_the_option_that_picks_another(stage1_run: Path) -> None:
    """stage2 has no --name (its folder is named by the resolution): the alternative to --force is another one."""
    zero = {"stage2.res": 36, "stage2.epochs": 0}  # evaluation only: finished at once
    run_stage2(stage1_run, zero, progress=False)
    with pytest.raises(RunExistsError, match=r"stage2-36 is finished; .* \(or choose another --test-res\)$"):
        run_stage2(stage1_run, zero, progress=False)


def _record_bn_batches(patch: pytest.MonkeyPatch, batches: list[torch.Tensor], stop_at: int = 0) -> None:
    """Append to ``batches`` every input of a BatchNorm in training mode (in a bnstats stage 2 only the last BN
    trains), as the layer sees it; ``stop_at``: SIGTERM during the call that makes it that long, as a Ctrl-C would."""
    forward = torch.nn.BatchNorm2d.forward

    def recording(self: torch.nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            batches.append(x.detach().clone())
            if len(batches) == stop_at:
                os.kill(os.getpid(), signal.SIGTERM)
        return forward(self, x)

    patch.setattr(torch.nn.BatchNorm2d, "forward", recording)


def test_bnstats_averages_over_every_pass_and_resumes_the_average(stage1_run: Path, tmp_path: Path) -> None:
    """`bnstats` with 2 epochs: the last BN's statistics are the average over both passes' batches (with test2 each
    pass adds differently augmented samples), also when the stage was interrupted at the end of its first epoch."""
    import shutil

    from fgvc.engine.loaders import load_split
    from fgvc.models import create_model

    runs = {}
    for name in ("straight", "resumed"):  # two copies of the finished stage-1 run
        runs[name] = tmp_path / name
        shutil.copytree(stage1_run / "stage1", runs[name] / "stage1")
        shutil.copy(stage1_run / CONFIG_FILE, runs[name] / CONFIG_FILE)
    overrides = {"stage2.tune": "bnstats", "stage2.res": 40, "stage2.epochs": 2, "stage2.augment": "test2"}
    cfg = load_config(stage1_run / CONFIG_FILE)
    steps = len(load_split(cfg, "train")) // cfg.stage2.batch_size  # drop_last: whole batches only
    assert steps >= 2
    bn = get_meta(create_model("timm:test_resnet", 4, None)).last_bn
    straight: list[torch.Tensor] = []
    resumed: list[torch.Tensor] = []
    with pytest.MonkeyPatch.context() as patch:
        _record_bn_batches(patch, straight)
        run_stage2(runs["straight"], overrides, progress=False)
    with pytest.MonkeyPatch.context() as patch:
        _record_bn_batches(patch, resumed, stop_at=steps)  # the last step of the first pass
        assert run_stage2(runs["resumed"], overrides, progress=False).interrupted_by == signal.SIGTERM
    assert load_checkpoint(runs["resumed"] / "stage2-40" / LAST)["micro_step"] == steps
    with pytest.MonkeyPatch.context() as patch:
        _record_bn_batches(patch, resumed)
        run_stage2(runs["resumed"], overrides, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(straight, resumed, strict=True))  # the resumed run saw the same
    for batches, run in ((straight, runs["straight"]), (resumed, runs["resumed"])):
        assert len(batches) == 2 * steps
        state = _state(run / "stage2-40" / LAST)
        mean = torch.stack([x.mean((0, 2, 3)) for x in batches]).mean(0)  # one equal weight per batch
        var = torch.stack([x.var((0, 2, 3), unbiased=True) for x in batches]).mean(0)
        torch.testing.assert_close(state[f"{bn}.running_mean"], mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(state[f"{bn}.running_var"], var, rtol=1e-5, atol=1e-6)
        assert int(state[f"{bn}.num_batches_tracked"]) == 2 * steps
    # test2 draws new augmentations each pass: the second pass's statistics are not the first's
    first = torch.stack([x.mean((0, 2, 3)) for x in straight[:steps]]).mean(0)
    second = torch.stack([x.mean((0, 2, 3)) for x in straight[steps:]]).mean(0)
    assert not torch.allclose(first, second, rtol=1e-4)


def test_resume_with_other_settings_is_refused(tiny_demo_root: Path, tmp_path: Path) -> None:
    cfg = tiny_config(tiny_demo_root, tmp_path, stage1={"epochs": 1})
    state_dir = cfg.run_dir() / "stage1"
    state_dir.mkdir(parents=True)
    save_checkpoint(state_dir / LAST, {"config": cfg.model_dump(mode="json") | {"stage1": {"lr": 1.0}}})
    with pytest.raises(ConfigError, match=r"stage1\.lr: 1 -> 0\.05"):
        run_stage1(cfg, progress=False)


def test_checkpoint_write_crash_keeps_the_previous_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / LAST
    save_checkpoint(path, {"epoch": 1, "w": torch.ones(3)})

    def crashing_save(obj, fh, *args, **kwargs):
        fh.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"epoch": 2, "w": torch.zeros(3)})
    monkeypatch.undo()
    state = load_checkpoint(path)
    assert state["epoch"] == 1 and torch.equal(state["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == [LAST]  # no temp file left behind


def test_a_corrupt_checkpoint_is_a_one_line_error(tmp_path: Path) -> None:
    path = tmp_path / LAST
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match=str(path)):
        load_checkpoint(path)


def _stage1_args(data_root: Path, out: Path, name: str) -> list[str]:
    return ["stage1", "--dataset", "demo", "--data-root", str(data_root), "--arch", "timm:test_resnet",
            "--weights", "none", "--res", "32", "--epochs", "20", "--batch-size", "2", "--lr", "0.02",
            "--workers", "1", "--deterministic", "--out", str(out), "--name", name, "--device", "cpu"]  # fmt: skip


@pytest.mark.slow
def test_sigterm_mid_epoch_then_resume_matches_an_uninterrupted_run(tiny_demo_root: Path, tmp_path: Path) -> None:
    straight = _fgvc(*_stage1_args(tiny_demo_root, tmp_path, "straight"))
    out, _ = straight.communicate(timeout=600)
    assert straight.returncode == 0, out

    interrupted = _Training(*_stage1_args(tiny_demo_root, tmp_path, "resumed"))
    # to the whole process group, loader worker included, as `timeout` and SLURM do; 20 epochs of 14 steps: the run
    # is far from its end
    os.killpg(interrupted.process.pid, signal.SIGTERM)
    code, out = interrupted.ended()
    assert code == 128 + signal.SIGTERM, out
    state = load_checkpoint(tmp_path / "resumed" / "stage1" / LAST)
    assert not state["finished"] and state["micro_step"] > 0  # stopped inside an epoch

    resumed = _fgvc(*_stage1_args(tiny_demo_root, tmp_path, "resumed"))
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out
    assert "resuming" in out
    a = _state(tmp_path / "straight" / "stage1" / LAST)
    b = _state(tmp_path / "resumed" / "stage1" / LAST)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.slow
def test_two_process_ddp_writes_the_same_artefacts(tiny_demo_root: Path, tmp_path: Path) -> None:
    args = ["stage1", "--dataset", "demo", "--data-root", str(tiny_demo_root), "--arch", "timm:test_resnet",
            "--weights", "none", "--res", "32", "--epochs", "1", "--batch-size", "4", "--workers", "0",
            "--out", str(tmp_path), "--device", "cpu"]  # fmt: skip
    single = _fgvc(*args, "--name", "single")
    out, _ = single.communicate(timeout=600)
    assert single.returncode == 0, out
    ddp = _fgvc(*args, "--name", "ddp", "--gpus", "2")  # fgvc relaunches itself under torchrun (gloo on CPU)
    out, _ = ddp.communicate(timeout=600)
    assert ddp.returncode == 0, out
    files = lambda d: sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file())  # noqa: E731
    assert files(tmp_path / "ddp") == files(tmp_path / "single")
    ddp_state = load_checkpoint(tmp_path / "ddp" / "stage1" / LAST)
    assert ddp_state["finished"] and ddp_state["epoch"] == 1
    history = pd.read_csv(tmp_path / "ddp" / "stage1" / "metrics.csv")
    assert not math.isnan(history["val_top1"].iloc[0])
    assert "x2" in (tmp_path / "ddp" / "stage1" / "train.log").read_text()  # world size 2 really ran
    # --run after torchrun's own options: its parser once took it for an abbreviation of --run-path
    stage2 = _fgvc("stage2", "--run", str(tmp_path / "ddp"), "--test-res", "40", "--epochs", "1", "--gpus", "2")
    out, _ = stage2.communicate(timeout=600)
    assert stage2.returncode == 0, out
    assert (tmp_path / "ddp" / "stage2-40" / FINISHED).is_file()
    assert out.count("after adaptation") == 1  # one report, not one per rank

    # prediction under --gpus: each rank scores its share, rank 0 writes the file and reports once
    predict = ("predict", "--run", str(tmp_path / "ddp"), "--split", "val", "--tta", "flip", "--workers", "0")
    multi = _fgvc(*predict, "--multi-res", "40,48", "--gpus", "2")
    out, _ = multi.communicate(timeout=600)
    assert multi.returncode == 0, out
    assert out.count("wrote ") == 1 and out.count("top-1 ") == 1, out
    files = {name: Probabilities.load(tmp_path / "ddp" / "predictions" / "stage2-40" / f"val-{name}-flip.npz")
             for name in ("40", "48", "40+48")}  # fmt: skip
    for res in ("40", "48"):  # one process recomputes each resolution: the same probabilities
        alone = _fgvc(*predict, "--res", res, "--force")
        out, _ = alone.communicate(timeout=600)
        assert alone.returncode == 0, out
        single = Probabilities.load(tmp_path / "ddp" / "predictions" / "stage2-40" / f"val-{res}-flip.npz")
        np.testing.assert_array_equal(single.image_ids, files[res].image_ids)
        np.testing.assert_allclose(single.probs, files[res].probs, atol=1e-3)  # float16 storage
    np.testing.assert_allclose(files["40+48"].probs, (files["40"].probs + files["48"].probs) / 2, atol=1e-3)
    swept = _fgvc("sweep", "--run", str(tmp_path / "ddp"), "--res", "40,48", "--workers", "0", "--gpus", "2")
    out, _ = swept.communicate(timeout=600)
    assert swept.returncode == 0, out
    assert out.count("best: ") == 1 and (tmp_path / "ddp" / "sweep-val.csv").is_file(), out


@pytest.mark.slow
def test_a_rank_error_under_gpus_is_fgvc_one_line_error_and_exit_2(tmp_path: Path) -> None:
    """A corrupt image under ``--gpus 2``: the command ends like the one-process one (exit 2, ``fgvc: error:``), not
    with exit 1 and torchrun's traceback and failure report after the error line."""
    from fgvc.demo_data import generate_demo

    root = tmp_path / "demo"
    generate_demo(root, seed=3, num_classes=4, images_per_class=6, test_fraction=0.34)
    cub = root / "CUB_200_2011"
    for line in (cub / "images.txt").read_text().splitlines():
        (cub / "images" / line.split()[1]).write_bytes(b"not a jpeg")  # every image: whichever each rank reads first
    ddp = _fgvc("stage1", "--dataset", "demo", "--data-root", str(root), "--arch", "timm:test_resnet", "--weights",
                "none", "--res", "32", "--epochs", "1", "--batch-size", "2", "--workers", "0", "--out",
                str(tmp_path / "runs"), "--device", "cpu", "--gpus", "2", unset=["OMP_NUM_THREADS"])  # fmt: skip
    out, _ = ddp.communicate(timeout=600)
    assert ddp.returncode == 2, out
    assert "fgvc: error:" in out
    assert "Traceback" not in out and "ChildFailedError" not in out, out
    assert "OMP_NUM_THREADS" not in out, out  # torchrun's banner: the launcher sets torchrun's default itself
    assert "failed (exitcode" not in out, out  # torchrun's report of the rank's exit, after the rank's own line
    empty = tmp_path / "empty"  # an error that every rank hits: printed once, not once per rank
    empty.mkdir()
    ddp = _fgvc("stage1", "--dataset", "demo", "--data-root", str(empty), "--arch", "timm:test_resnet", "--weights",
                "none", "--res", "32", "--out", str(tmp_path / "runs"), "--device", "cpu", "--gpus", "2")  # fmt: skip
    out, _ = ddp.communicate(timeout=600)
    assert ddp.returncode == 2 and out.count(f"fgvc: error: {empty}: no demo data there") == 1, out


def test_an_error_line_is_said_once_per_gpus_launch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fgvc.engine.launch import ONCE_DIR_ENV, first_to_say

    monkeypatch.delenv(ONCE_DIR_ENV, raising=False)
    assert first_to_say("fgvc: error: x") and first_to_say("fgvc: error: x")  # a torchrun of one's own: each rank
    monkeypatch.setenv(ONCE_DIR_ENV, str(tmp_path))
    assert first_to_say("fgvc: error: x") and not first_to_say("fgvc: error: x")
    assert first_to_say("fgvc: error: y")  # another rank's own error (its corrupt image) is said too


def test_the_failure_that_ended_a_gpus_run_is_the_first_one_not_the_ranks_torchrun_ended() -> None:
    from types import SimpleNamespace

    from fgvc.engine.launch import LOST_CONTACT_EXIT, first_failure

    def failure(exitcode: int, timestamp: int) -> SimpleNamespace:
        return SimpleNamespace(exitcode=exitcode, timestamp=timestamp)

    # rank 1's own error; rank 0, stopped by torchrun's SIGTERM, saved and exited 143 (the exit code was rank 0's)
    assert first_failure({0: failure(143, 10), 1: failure(2, 10)})[0] == 1
    assert first_failure({0: failure(-15, 9), 1: failure(2, 10)})[0] == 1
    assert first_failure({0: failure(1, 10), 1: failure(-9, 10)})[0] == 1  # rank 0 lost the rank that was killed
    assert first_failure({0: failure(2, 11), 1: failure(2, 10)})[0] == 1
    assert first_failure({0: failure(LOST_CONTACT_EXIT, 10), 1: failure(2, 10)})[0] == 1  # rank 0 lost rank 1
    assert first_failure({0: failure(-15, 10), 1: failure(143, 10)})[0] == 0  # all ended by SIGTERM: the first


@pytest.mark.slow
def test_a_rank_killed_under_gpus_is_named_in_one_line(tiny_demo_root: Path, tmp_path: Path) -> None:
    """SIGKILL to one rank (what the out-of-memory killer sends): the other rank printed a ~100-line traceback of its
    lost connection, and nothing said which process died or why."""
    run = _Training(*_stage1_args(tiny_demo_root, tmp_path, "ddp"), "--epochs", "50", "--gpus", "2")
    rank1 = [pid for pid in _descendants(run.process.pid)
             if b"LOCAL_RANK=1" in Path(f"/proc/{pid}/environ").read_bytes()]  # fmt: skip
    os.kill(rank1[0], signal.SIGKILL)
    code, out = run.ended()
    assert code == 128 + signal.SIGKILL, out
    assert f"fgvc: error: rank 1 (pid {rank1[0]}) was killed by SIGKILL: most often the out-of-memory killer" in out
    assert "Traceback" not in out and "failed (exitcode" not in out, out


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (Linux /proc), children before grandchildren."""
    found, queue = [], [pid]
    while queue:
        parent = queue.pop(0)
        for task in Path(f"/proc/{parent}/task").iterdir():
            children = [int(c) for c in (task / "children").read_text().split()]
            found += children
            queue += children
    return found


@pytest.mark.slow
def test_ctrl_c_on_a_ddp_run_saves_a_checkpoint_that_resumes(tiny_demo_root: Path, tmp_path: Path) -> None:
    """Ctrl-C in a terminal signals the whole foreground process group. torchrun used to get it twice (from the
    terminal and from fgvc's launcher), and its interrupted shutdown sent the workers a second signal, on which they
    aborted without saving."""
    args = [*_stage1_args(tiny_demo_root, tmp_path, "ddp"), "--gpus", "2"]
    interrupted = _Training(*args)  # a session of its own: killpg below is a terminal's Ctrl-C to exactly this command
    os.killpg(interrupted.process.pid, signal.SIGINT)
    code, out = interrupted.ended()
    assert code == 128 + signal.SIGINT, out
    state = load_checkpoint(tmp_path / "ddp" / "stage1" / LAST)
    assert not state["finished"] and len(state["rng"]) == 2  # each rank's random state
    resumed = _fgvc(*args)
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out
    assert "resuming" in out and (tmp_path / "ddp" / "stage1" / FINISHED).is_file()


def test_stage2_feature_cache_gives_the_same_weights_as_the_full_model(
    stage1_run: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    overrides = {"stage2.res": 44, "stage2.epochs": 2, "stage2.tune": "bn+fc"}
    uncached = run_stage2(stage1_run, overrides | {"runtime.cache_features": "off"}, progress=False)
    reference = _state(uncached.stage_dir / LAST)
    with caplog.at_level(logging.INFO, logger="fgvc"):
        cached = run_stage2(stage1_run, overrides | {"runtime.cache_features": "on"}, force=True, progress=False)
    assert any("feature cache on" in r.message for r in caplog.records), [r.message for r in caplog.records]
    state = _state(cached.stage_dir / LAST)
    for name, value in reference.items():
        assert torch.allclose(value.float(), state[name].float(), atol=1e-5), name
    with pytest.raises(ConfigError, match="--cache-features on"):
        run_stage2(stage1_run, overrides | {"runtime.cache_features": "on", "stage2.augment": "test2"}, force=True,
                   progress=False)  # fmt: skip
    # refused before anything was touched: even with --force the finished stage 2 is still there
    assert (cached.stage_dir / FINISHED).is_file()
    assert torch.equal(_state(cached.stage_dir / LAST)["fc.weight"], state["fc.weight"])


def test_device_decoding_trains_and_predicts_through_the_same_loops(tiny_demo_root: Path, tmp_path: Path) -> None:
    """`decode: gpu` swaps the dataset and the batch preparer only; on the CPU the same code runs end to end."""
    from fgvc.engine.loaders import load_split, make_loader
    from fgvc.engine.loop import predict_probs, train_one_epoch
    from fgvc.engine.runtime import setup_runtime
    from fgvc.models import create_model

    cfg = tiny_config(tiny_demo_root, tmp_path)
    rt = setup_runtime(cfg.runtime)
    index = load_split(cfg, "train")
    model = create_model("timm:test_resnet", index.num_classes, None)
    meta = get_meta(model)
    loader, sampler, prepare = make_loader(cfg, rt, index, "train", 32, 8, True, meta, decode="gpu")
    assert type(loader.prepare).__name__ == "GpuBatchPreparer"  # run by the prefetching thread
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    stats = train_one_epoch(model, loader, optimizer, None, None, rt, prepare, torch.nn.CrossEntropyLoss(),
                            batch_size=8, progress=False)  # fmt: skip
    assert stats.images == len(sampler) // 8 * 8 and math.isfinite(stats.loss)
    loader, _, prepare = make_loader(cfg, rt, index, "tencrop", 32, 4, False, meta, decode="gpu")
    probs, rows = predict_probs(model, loader, rt, prepare, tta="tencrop", progress=False)
    assert probs.shape == (len(index), index.num_classes) and list(rows) == list(range(len(index)))


def test_tencrop_prediction_is_the_mean_softmax_of_ten_views_cut_by_hand(tiny_demo_root: Path, tmp_path: Path) -> None:
    """The loader ships each test-resized image once; the ten views cut on the device must be exactly the four corners,
    the centre and their mirror images that torchvision's TenCrop would cut from it."""
    from fgvc.engine.loaders import make_loader
    from fgvc.engine.loop import predict_probs
    from fgvc.engine.runtime import setup_runtime
    from fgvc.io import decode_image
    from fgvc.models import create_model
    from fgvc.transforms import build_transform

    cfg = tiny_config(tiny_demo_root, tmp_path)
    rt = setup_runtime(cfg.runtime)
    index = load_split(cfg, "val")
    torch.manual_seed(0)
    model = create_model("timm:test_resnet", index.num_classes, None).eval()
    meta, res = get_meta(model), 24
    loader, _, prepare = make_loader(cfg, rt, index, "tencrop", res, 3, False, meta)
    probs, rows = predict_probs(model, loader, rt, prepare, tta="tencrop", progress=False)
    assert list(rows) == list(range(len(index)))

    resize = build_transform("tencrop", res, crop_pct=cfg.data.crop_pct, interpolation=meta.interpolation)
    mean, std = np.array(meta.mean) * 255, np.array(meta.std) * 255
    for row, path in enumerate(index.frame["path"]):
        image = resize(decode_image(path)).numpy()
        h, w = image.shape[:2]
        corners = [(0, 0), (0, w - res), (h - res, 0), (h - res, w - res), ((h - res) // 2, (w - res) // 2)]
        five = [image[y : y + res, x : x + res] for y, x in corners]
        views = np.stack(five + [crop[:, ::-1] for crop in five]).astype(np.float64)
        x = torch.from_numpy(((views - mean) / std).transpose(0, 3, 1, 2)).float()
        with torch.no_grad():
            expected = torch.softmax(model(x), dim=1).mean(0).numpy()
        np.testing.assert_allclose(probs[row], expected, atol=1e-5, err_msg=f"row {row}")


@pytest.mark.slow
def test_stage1_beats_chance_on_the_demo_data(tmp_path: Path) -> None:
    """Six epochs of EfficientNet-Lite0 from its real ImageNet weights at 64 px, on the full demo dataset (three, with
    the cosine schedule at zero by the third, left it at 11.6 % on one hold-out: learning, but too close to call)."""
    from fgvc.demo_data import generate_demo
    from fgvc.predict import predict_stage

    generate_demo(tmp_path / "demo")
    lite0 = {"arch": "timm:tf_efficientnet_lite0", "weights": "imagenet"}
    stage1 = {"res": 64, "epochs": 6, "batch_size": 32, "lr": 0.01}
    cfg = tiny_config(tmp_path / "demo", tmp_path / "runs", model=lite0, stage1=stage1)
    run_stage1(cfg, progress=False)
    result = predict_stage(cfg.run_dir() / "stage1", "test", 64, "none", progress=False)
    classes = len(result.probs.class_names)
    assert len(result.probs.labels) == 320 and classes == 16
    # chance is 6.25 %; with 320 test images its standard deviation is ~1.4 points, so 2x chance is far outside it
    assert result.metrics["top1"] > 2 * 100 / classes


@pytest.mark.parametrize("drop_last", [False, True])
def test_skipped_counts_unreadable_images_only(drop_last: bool) -> None:
    """10 rows in batches of 4 (the last one short unless dropped); rows 1 and 9 are unreadable."""
    from fgvc.data import build_loader
    from fgvc.engine.loop import train_one_epoch
    from fgvc.engine.runtime import Runtime

    class Rows(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 10

        def __getitem__(self, row: int):
            return None if row in (1, 9) else (torch.zeros(2, dtype=torch.uint8), row % 2, row)

    loader = build_loader(Rows(), batch_size=4, drop_last=drop_last)
    rt = Runtime(device=torch.device("cpu"), amp_dtype=None, channels_last=False)
    stats = train_one_epoch(
        torch.nn.Linear(2, 2), loader, None, None, None, rt, lambda x: x.float(), torch.nn.CrossEntropyLoss(),
        batch_size=4, samples=len(loader.sampler), progress=False,
    )  # fmt: skip
    # without drop_last all 10 rows are asked for; with it only the first 8 (row 9 is never read)
    assert (stats.images, stats.skipped) == ((7, 1) if drop_last else (8, 2))


class _SlowBatches:
    """Four batches, each ``delay`` seconds late: a loader that cannot keep up."""

    def __init__(self, delay: float) -> None:
        self.delay = delay

    def __len__(self) -> int:
        return 4

    def __iter__(self):
        for row in range(4):
            time.sleep(self.delay)
            yield torch.ones(2, 2), torch.tensor([0, 1]), torch.tensor([2 * row, 2 * row + 1])


class _SlowModel(torch.nn.Linear):
    def __init__(self, delay: float) -> None:
        super().__init__(2, 2)
        self.delay = delay

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(self.delay)
        return super().forward(x)


@pytest.mark.parametrize("slow", ["loader", "model"])
def test_epoch_stats_say_how_long_the_loop_waited_for_data(slow: str) -> None:
    """The wait counts the loader's delays (first batch included) and not the model's."""
    from fgvc.engine.loop import train_one_epoch
    from fgvc.engine.runtime import Runtime

    rt = Runtime(device=torch.device("cpu"), amp_dtype=None, channels_last=False)
    loader, model = _SlowBatches(0.05 if slow == "loader" else 0.0), _SlowModel(0.05 if slow == "model" else 0.0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    stats = train_one_epoch(model, loader, optimizer, None, None, rt, lambda x: x, torch.nn.CrossEntropyLoss(),
                            progress=False)  # fmt: skip
    assert stats.images == 8 and 0 <= stats.first_batch_s <= stats.data_wait_s <= stats.seconds
    if slow == "loader":
        assert stats.first_batch_s >= 0.05 and stats.data_wait_s >= 4 * 0.05
        assert stats.data_wait_share > 0.5
    else:  # 0.2 s in the model, next to nothing in the loader
        assert stats.data_wait_share < 0.5


def test_input_bound_hint_names_the_remedy_for_the_device() -> None:
    from fgvc.engine.loop import EpochStats
    from fgvc.engine.report import INPUT_BOUND_SHARE, input_bound_hint

    def stats(share: float) -> EpochStats:
        return EpochStats(0.1, 100, 10.0, 0.01, 0, 10, data_wait_s=10.0 * share)

    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert input_bound_hint(stats(INPUT_BOUND_SHARE / 2), 8, "cpu", cuda) is None
    on_cuda = input_bound_hint(stats(0.6), 8, "cpu", cuda)
    assert on_cuda is not None and "60%" in on_cuda and "--decode gpu" in on_cuda and "now 8" in on_cuda
    already_gpu = input_bound_hint(stats(0.6), 8, "gpu", cuda)
    assert already_gpu is not None and "--decode gpu" not in already_gpu and "--workers" in already_gpu
    on_cpu = input_bound_hint(stats(0.6), 2, "cpu", cpu)
    assert on_cpu is not None and "--decode gpu" not in on_cpu and "now 2" in on_cpu


def test_auto_decode_weighs_the_cpu_estimate_by_the_stored_image_size(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import cv2

    import fgvc.engine.loaders as loaders
    import fgvc.gpu_decode
    from fgvc.config import RunConfig
    from fgvc.engine.runtime import Runtime

    path = tmp_path / "big.jpg"
    cv2.imwrite(str(path), np.zeros((1200, 1600, 3), np.uint8))  # 4x the 800x600 the CPU rate was measured on
    monkeypatch.setattr(loaders, "measure_images_per_s", lambda *args: 2000.0)
    monkeypatch.setattr(fgvc.gpu_decode, "gpu_decode_available", lambda device: True)
    rt = Runtime(device=torch.device("cuda", 0), amp_dtype=None, channels_last=False)
    cfg = RunConfig.model_validate({"data": {"decode": "auto", "workers": 16}})
    # 16 workers decode ~4,000 800x600 images/s but ~1,000 of these: a 2,000 img/s model needs the GPU decoder
    assert loaders.resolve_decode(cfg, rt, torch.nn.Linear(2, 2), 32, 4, np.array([str(path)])) == "gpu"
    assert loaders.resolve_decode(cfg, rt, torch.nn.Linear(2, 2), 32, 4) == "cpu"  # sizes unknown: 800x600


def test_a_resumed_auto_run_keeps_the_decoder_it_started_with(monkeypatch: pytest.MonkeyPatch) -> None:
    """``--decode auto`` times the model; timed again at a resume it could switch the pixels mid-run."""
    import fgvc.engine.loaders as loaders
    import fgvc.gpu_decode
    from fgvc.config import RunConfig
    from fgvc.engine.runtime import Runtime

    def no_timing(*args: object) -> float:
        raise AssertionError("a resume with a saved decoder must not time the model")

    nvjpeg = {"available": True}
    monkeypatch.setattr(loaders, "measure_images_per_s", no_timing)
    monkeypatch.setattr(fgvc.gpu_decode, "gpu_decode_available", lambda device: nvjpeg["available"])
    rt = Runtime(device=torch.device("cuda", 0), amp_dtype=None, channels_last=False)
    auto, net = RunConfig.model_validate({"data": {"decode": "auto"}}), torch.nn.Linear(2, 2)
    assert loaders.resolve_decode(auto, rt, net, 32, 4, started_with="gpu") == "gpu"
    assert loaders.resolve_decode(auto, rt, net, 32, 4, started_with="cpu") == "cpu"
    explicit = RunConfig.model_validate({"data": {"decode": "cpu"}})
    assert loaders.resolve_decode(explicit, rt, net, 32, 4, started_with="gpu") == "cpu"  # a flag still wins
    nvjpeg["available"] = False  # resumed on a machine without nvJPEG: decided afresh (no estimate needed: cpu)
    monkeypatch.setattr(loaders, "measure_images_per_s", lambda *args: 1.0)
    assert loaders.resolve_decode(auto, rt, net, 32, 4, started_with="gpu") == "cpu"


def _decode_choice_on_rank(rank: int, init_file: str, out_dir: str) -> None:
    """One rank of a two-process gloo group whose ranks would choose different decoders by themselves."""
    import torch.distributed as dist

    import fgvc.gpu_decode
    from fgvc.config import RunConfig
    from fgvc.engine.loaders import resolve_decode
    from fgvc.engine.runtime import Runtime

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    fgvc.gpu_decode.decode_mode = lambda *args: "gpu" if rank == 1 else "cpu"  # rank 1 "timed" another answer
    rt = Runtime(device=torch.device("cpu"), amp_dtype=None, channels_last=False, rank=rank, world_size=2)
    mode = resolve_decode(RunConfig(), rt, torch.nn.Linear(2, 2), 32, 4)
    # per-step flags through the host-side group that setup_runtime adds under NCCL: raised on one rank, seen on both
    from fgvc.engine.runtime import any_rank

    flags = Runtime(device=torch.device("cpu"), amp_dtype=None, channels_last=False, rank=rank, world_size=2,
                    flag_group=dist.new_group(backend="gloo"))  # fmt: skip
    seen = [any_rank(flags, rank == 1), any_rank(flags, False)]
    Path(out_dir, f"rank{rank}").write_text(f"{mode} {seen}")
    dist.destroy_process_group()


def test_ranks_share_rank_zeros_decoder_choice_and_every_flag(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    mp.spawn(_decode_choice_on_rank, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    assert [(tmp_path / f"rank{r}").read_text() for r in (0, 1)] == ["cpu [True, False]", "cpu [True, False]"]


@pytest.mark.parametrize("rows", [4, 12])  # one step (caught when the epoch ends) and several (caught a step late)
def test_a_diverged_loss_is_a_one_line_error(rows: int) -> None:
    from fgvc.data import build_loader
    from fgvc.engine.loop import train_one_epoch
    from fgvc.engine.runtime import Runtime
    from fgvc.errors import TrainingError

    data = [(torch.zeros(2, dtype=torch.uint8), 0, row) for row in range(rows)]
    model = torch.nn.Linear(2, 2)
    torch.nn.init.constant_(model.bias, float("nan"))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    rt = Runtime(device=torch.device("cpu"), amp_dtype=None, channels_last=False)
    with pytest.raises(TrainingError, match=r"^loss is nan at step 1; lower --lr"):
        train_one_epoch(model, build_loader(data, batch_size=4), optimizer, None, None, rt, lambda x: x.float(),
                        torch.nn.CrossEntropyLoss(), progress=False)  # fmt: skip


def _predict_on_rank(rank: int, init_file: str, out_dir: str) -> None:
    """One rank of three: predict_probs over the readable images of this rank's evaluation shard, in blocks of 2 rows
    (5 classes, 40 B)."""
    import torch.distributed as dist

    import fgvc.engine.runtime
    from fgvc.engine.loop import predict_probs
    from fgvc.engine.runtime import Runtime, broadcast_from_main
    from fgvc.engine.sampling import EpochSampler

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=3)
    fgvc.engine.runtime.GATHER_BLOCK_BYTES = 40  # several blocks per share
    rt = Runtime(device=torch.device("cpu"), amp_dtype=None, channels_last=False, rank=rank, world_size=3)
    torch.manual_seed(0)  # the same model and images on every rank
    features, model = torch.randn(11, 4), torch.nn.Linear(4, 5)
    shard = [i for i, _seed in EpochSampler(11, shuffle=False, rank=rank, world_size=3)]  # 4, 4, 3 images
    readable = {0: [3], 1: [1, 4, 7], 2: [2, 5]}[rank]  # the others unreadable, dropped like corrupt images
    shard = [i for i in shard if i in readable]
    batches = [shard[i : i + 3] for i in range(0, len(shard), 3)]
    loader = [(features[b], torch.zeros(len(b)), torch.tensor(b)) for b in batches]
    probs, idx = predict_probs(model, loader, rt, lambda x: x, progress=False)
    told = broadcast_from_main(rt, f"rank {rank}")
    np.savez(Path(out_dir, f"rank{rank}.npz"), probs=probs, idx=idx, expected=torch.softmax(model(features), 1)
             .detach().numpy(), told=np.array(told))  # fmt: skip
    dist.destroy_process_group()


def test_ddp_predictions_are_gathered_in_dataset_order_on_rank_zero_alone(tmp_path: Path) -> None:
    """Rank 0 gets every rank's rows in dataset order, unreadable images absent; the other ranks hold nothing (the
    matrix can be 20 GB: every rank used to receive all of it). A rank's share spans several blocks."""
    import torch.multiprocessing as mp

    ranks = mp.spawn(_predict_on_rank, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=3, join=False)
    deadline = time.time() + 120
    while not ranks.join(timeout=1):  # a sender and receiver that disagree on the blocks wait for ever
        if time.time() > deadline:
            for process in ranks.processes:
                process.kill()
            pytest.fail("the ranks did not finish within 120 s")
    main, *others = (np.load(tmp_path / f"rank{r}.npz") for r in range(3))
    kept = [1, 2, 3, 4, 5, 7]  # shares [3], [1, 4, 7], [2, 5]: their concatenation is out of order
    assert main["idx"].tolist() == kept
    np.testing.assert_allclose(main["probs"], main["expected"][kept], rtol=1e-6)
    for other in others:
        assert other["probs"].shape == (0, 5) and len(other["idx"]) == 0
    assert {str(r["told"]) for r in (main, *others)} == {"rank 0"}  # what rank 0 broadcasts, every rank gets


def _stop_in_evaluation_on_rank(rank: int, init_file: str, out_dir: str, stop_rank: int, stop_at: int) -> None:
    """One rank of three with 4, 4 and 3 batches: ``stop_rank`` gets a stop signal as it reads batch ``stop_at``."""
    import torch.distributed as dist

    from fgvc.engine.loop import StopFlag, Stopped, predict_probs
    from fgvc.engine.runtime import Runtime

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=3)
    rt = Runtime(device=torch.device("cpu"), amp_dtype=None, channels_last=False, rank=rank, world_size=3)
    stop, model = StopFlag(), torch.nn.Linear(4, 5)
    shard = list(range(rank, 11, 3))  # 4, 4, 3 rows, one per batch

    class Batches:
        read = 0

        def __len__(self) -> int:
            return len(shard)

        def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
            for i, row in enumerate(shard):
                if rank == stop_rank and i == stop_at:
                    stop.signum = signal.SIGTERM
                Batches.read = i + 1
                yield torch.randn(1, 4), torch.zeros(1), torch.tensor([row])

    try:
        predict_probs(model, Batches(), rt, lambda x: x, progress=False, stop=stop)
        outcome = "finished"
    except Stopped:
        outcome = f"stopped after reading {Batches.read}"
    dist.barrier()  # every rank is still in step with the others
    Path(out_dir, f"rank{rank}.txt").write_text(outcome)
    dist.destroy_process_group()


@pytest.mark.parametrize(
    ("stop_rank", "stop_at", "expected"),
    [(1, 1, ["stopped after reading 2"] * 3),  # agreed on at batch 1, which every rank reads
     (0, 3, ["finished"] * 3)],  # batch 3 exists on two ranks only: no check there (the stage checks after the pass)
)  # fmt: skip
def test_ranks_leave_an_evaluation_pass_together_on_a_stop(
    tmp_path: Path, stop_rank: int, stop_at: int, expected: list[str]
) -> None:
    """A stop that reaches one rank during validation: the ranks, whose evaluation shards differ by a batch, must take
    the same collectives (a rank that waits in one its peers skipped hangs NCCL for ever)."""
    import torch.multiprocessing as mp

    args = (str(tmp_path / "init"), str(tmp_path), stop_rank, stop_at)
    ranks = mp.spawn(_stop_in_evaluation_on_rank, args=args, nprocs=3, join=False)
    deadline = time.time() + 120
    while not ranks.join(timeout=1):
        if time.time() > deadline:
            for process in ranks.processes:
                process.kill()
            pytest.fail("the ranks did not finish within 120 s")
    assert [(tmp_path / f"rank{r}.txt").read_text() for r in range(3)] == expected


def test_predict_probs_keeps_every_row_in_dataset_order_whatever_the_batch_sizes() -> None:
    """Batches of 1, 3 and 2 rows (the first smaller than the next: its buffer must grow), read out of order."""
    from fgvc.engine.loop import predict_probs
    from fgvc.engine.runtime import Runtime

    rt = Runtime(device=torch.device("cpu"), amp_dtype=None, channels_last=False)
    features = torch.randn(6, 4)
    order = [[4], [0, 5, 2], [1, 3]]
    loader = [(features[rows], torch.zeros(len(rows)), torch.tensor(rows)) for rows in order]
    model = torch.nn.Linear(4, 3)
    probs, idx = predict_probs(model, loader, rt, lambda x: x, progress=False)
    assert idx.tolist() == list(range(6))
    torch.testing.assert_close(torch.from_numpy(probs), torch.softmax(model(features), 1).detach())


def test_an_unreadable_batch_that_ends_an_accumulation_group_still_steps() -> None:
    """4 micro-batches, grad_accum 2, the last one all unreadable: both optimiser steps happen (the second with the
    gradient of batch 3) and no gradient is left to leak into the next epoch."""
    from fgvc.engine.loop import train_one_epoch
    from fgvc.engine.runtime import Runtime

    rt = Runtime(device=torch.device("cpu"), amp_dtype=None, channels_last=False)

    def batch(n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return torch.ones(n, 2), torch.zeros(n, dtype=torch.long), torch.arange(n)

    def run(
        loader: list, grad_accum: int = 2, schedule: Callable[[int], float] = lambda step: 1.0 / (1 + step)
    ) -> tuple[torch.nn.Linear, torch.optim.lr_scheduler.LambdaLR]:
        torch.manual_seed(0)
        model = torch.nn.Linear(2, 2)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        train_one_epoch(model, loader, optimizer, scheduler, None, rt, lambda x: x, torch.nn.CrossEntropyLoss(),
                        grad_accum=grad_accum, progress=False)  # fmt: skip
        return model, scheduler

    model, scheduler = run([batch(4), batch(4), batch(4), batch(0)])
    assert scheduler.last_epoch == 2
    assert all(p.grad is None for p in model.parameters())
    # the second step used batch 3's gradient at step 2's lr, averaged over its group of two micro-batches (the empty
    # one still counts): the batches are identical, so that is one batch per step with step 2's lr halved
    reference, _ = run([batch(4), batch(4)], 1, lambda step: (1.0, 0.25, 0.0)[step])
    torch.testing.assert_close(model.weight, reference.weight)
    torch.testing.assert_close(model.bias, reference.bias)
    # an empty group: the schedule still advances
    _, scheduler = run([batch(4), batch(4), batch(0), batch(0)])
    assert scheduler.last_epoch == 2


def test_the_epochs_last_accumulation_group_averages_over_its_own_micro_batches() -> None:
    """grad_accum k over micro-batches of b is one batch of k*b per step, also for the epoch's last group when the
    loader's length is not a multiple of k: 5 micro-batches of 4 with k = 2 are steps on 8, 8 and 4 images (the last
    one used to be divided by k, a step at half the learning rate)."""
    from fgvc.engine.loop import train_one_epoch
    from fgvc.engine.runtime import Runtime

    rt = Runtime(device=torch.device("cpu"), amp_dtype=None, channels_last=False)
    generator = torch.Generator().manual_seed(3)
    x, y = torch.randn(20, 5, generator=generator), torch.randint(0, 3, (20,), generator=generator)
    torch.manual_seed(0)
    initial = torch.nn.Linear(5, 3)

    model = copy.deepcopy(initial)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    micro = [(x[i : i + 4], y[i : i + 4], torch.arange(i, i + 4)) for i in range(0, 20, 4)]
    train_one_epoch(model, micro, optimizer, None, None, rt, lambda batch: batch, torch.nn.CrossEntropyLoss(),
                    grad_accum=2, progress=False)  # fmt: skip

    reference = copy.deepcopy(initial)
    for start, stop in ((0, 8), (8, 16), (16, 20)):  # plain SGD, one step per group on the group's mean loss
        reference.zero_grad()
        torch.nn.functional.cross_entropy(reference(x[start:stop]), y[start:stop]).backward()
        with torch.no_grad():
            for param in reference.parameters():
                param -= 0.5 * param.grad
    torch.testing.assert_close(model.weight, reference.weight)
    torch.testing.assert_close(model.bias, reference.bias)


def test_a_closed_terminal_stops_training_like_sigterm() -> None:
    """SIGHUP (a dropped SSH session) ended the run without a checkpoint; it is a stop request now, which the loader
    workers ignore like SIGINT and SIGTERM until the main process has saved."""
    from fgvc.data import STOP_SIGNALS
    from fgvc.engine import loop

    assert signal.SIGHUP in STOP_SIGNALS
    # A test run started under `nohup` inherits SIGHUP ignored, which the loop keeps ignored on purpose (see
    # test_an_ignored_stop_signal_stays_ignored): start from the default disposition a terminal session has.
    inherited = signal.signal(signal.SIGHUP, signal.SIG_DFL)
    try:
        with loop.stop_on_signals() as stop:
            os.kill(os.getpid(), signal.SIGHUP)
            assert stop.signum == signal.SIGHUP
    finally:
        signal.signal(signal.SIGHUP, inherited)


def test_an_ignored_stop_signal_stays_ignored() -> None:
    """`nohup fgvc ...` ignores SIGHUP so that the run outlives the terminal: catching it anyway stopped the run."""
    from fgvc.engine import loop

    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with loop.stop_on_signals() as stop:
            assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGHUP)
            assert not stop
    finally:
        signal.signal(signal.SIGHUP, previous)


def test_a_repeated_stop_signal_within_two_seconds_is_the_same_request(monkeypatch: pytest.MonkeyPatch) -> None:
    from fgvc.engine import loop

    with loop.stop_on_signals() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGTERM)  # torchrun's follow-up, SLURM's copy: not "the user insists"
        assert stop.signum == signal.SIGINT
        monkeypatch.setattr(loop, "INSIST_AFTER_S", 0.0)
        with pytest.raises(KeyboardInterrupt):  # a later one is
            os.kill(os.getpid(), signal.SIGINT)


def test_an_epoch_interrupted_on_its_last_step_keeps_its_whole_row(
    tiny_demo_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGTERM during an epoch's last step: the resumed run has nothing left of that epoch to train, yet its row must
    report the loss, images and time of the part trained before the stop, as the uninterrupted run's does."""
    from fgvc.engine.loaders import load_split

    straight = tiny_config(tiny_demo_root, tmp_path, stage1={"epochs": 2}, name="straight")
    run_stage1(straight, progress=False)
    steps = len(load_split(straight, "train")) // straight.stage1.batch_size  # drop_last: whole batches only
    resumed = straight.model_copy(update={"name": "resumed"})
    with monkeypatch.context() as patch:
        _StopAtStep(patch, signal.SIGTERM, at=steps)  # the epoch's last step
        assert run_stage1(resumed, progress=False).interrupted_by == signal.SIGTERM
    state = load_checkpoint(resumed.run_dir() / "stage1" / LAST)
    assert (state["epoch"], state["micro_step"]) == (0, steps)
    run_stage1(resumed, progress=False)
    a = pd.read_csv(straight.run_dir() / "stage1" / "metrics.csv")
    b = pd.read_csv(resumed.run_dir() / "stage1" / "metrics.csv")
    assert b["epoch"].tolist() == [1, 2]
    pd.testing.assert_series_equal(a["train_loss"], b["train_loss"], rtol=1e-4)
    assert (b["img_per_s"] > 0).all()  # images / unrounded seconds: 0 if the part's time were lost ("seconds" is
    # rounded to 0.1 s, which a 26-image epoch on a quiet machine rounds to 0)


def test_resume_with_another_seed_is_refused(tiny_demo_root: Path, tmp_path: Path) -> None:
    """The seed orders every epoch: a resumed epoch with another one repeats some images and never shows others."""
    cfg = tiny_config(tiny_demo_root, tmp_path, stage1={"epochs": 1})
    state_dir = cfg.run_dir() / "stage1"
    state_dir.mkdir(parents=True)
    saved = cfg.model_dump(mode="json")
    saved["runtime"]["seed"] = cfg.runtime.seed + 7
    save_checkpoint(state_dir / LAST, {"config": saved})
    with pytest.raises(ConfigError, match=r"runtime\.seed"):
        run_stage1(cfg, progress=False)


@pytest.mark.slow
def test_ddp_bnstats_epoch_with_an_unreadable_batch_on_one_rank(tmp_path: Path) -> None:
    """`bnstats` runs forward passes only (no optimiser): a rank whose batch was unreadable used to skip the stop
    check that the other rank ran, and the two processes' collectives no longer matched (gloo aborts, NCCL hangs)."""
    import shutil

    from fgvc.demo_data import generate_demo

    root = tmp_path / "demo"
    generate_demo(root, seed=3, num_classes=4, images_per_class=12, test_fraction=0.34)
    cfg = tiny_config(root, tmp_path / "runs", data={"skip_corrupt": True})
    run_stage1(cfg, progress=False)
    cub = root / "CUB_200_2011"
    paths = dict(line.split() for line in (cub / "images.txt").read_text().splitlines())
    train_ids = [line.split()[0] for line in (cub / "train_test_split.txt").read_text().splitlines()
                 if line.split()[1] == "1"]  # fmt: skip
    for image_id in train_ids[:3]:
        (cub / "images" / paths[image_id]).write_bytes(b"not a jpeg")
    stage2 = _fgvc("stage2", "--run", str(cfg.run_dir()), "--test-res", "40", "--tune", "bnstats", "--batch-size", "1",
                   "--epochs", "1", "--gpus", "2")  # fmt: skip
    out, _ = stage2.communicate(timeout=600)
    assert stage2.returncode == 0, out
    assert (cfg.run_dir() / "stage2-40" / FINISHED).is_file()
    shutil.rmtree(root)


@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 7])
def test_sampler_shards_cover_every_row_with_equal_steps(world_size: int) -> None:
    """Training: every rank the same number of samples (DDP steps in lockstep), every row in the epoch, even when the
    ranks outnumber the rows twice over; evaluation: every row exactly once, no padding."""
    from fgvc.engine.sampling import EpochSampler

    for size in (1, 2, 3, 5, 8, 13, 16):
        shards = [list(EpochSampler(size, True, seed=1, rank=r, world_size=world_size)) for r in range(world_size)]
        per_rank = -(-size // world_size)
        assert [len(shard) for shard in shards] == [per_rank] * world_size, (size, world_size)
        rows = [row for shard in shards for row, _seed in shard]
        assert set(rows) == set(range(size))
        seeds = [seed for shard in shards for _row, seed in shard]
        assert len(set(seeds)) == len(seeds)  # a padded repeat is still its own augmentation
        evaluation = [row for r in range(world_size) for row, _ in EpochSampler(size, False, rank=r,
                                                                                world_size=world_size)]  # fmt: skip
        assert sorted(evaluation) == list(range(size))
        for shuffle in (True, False):  # len() is counted, not drawn: it must match what iterating yields
            for rank in range(world_size):
                sampler = EpochSampler(size, shuffle, seed=1, rank=rank, world_size=world_size)
                for start in (0, 1, per_rank + 1):
                    sampler.set_epoch(2, start=start)
                    assert len(sampler) == len(list(sampler)), (size, world_size, shuffle, rank, start)


def test_ddp_training_batches_are_full_when_a_shard_holds_more_than_one(tiny_demo_root: Path, tmp_path: Path) -> None:
    """drop_last follows this rank's shard, ceil(N / world size): 17 images on 2 ranks in batches of 8 gave each rank
    a batch of 8 and a batch of 1 (a BatchNorm statistic from one image)."""
    from fgvc.datasets.base import DatasetIndex
    from fgvc.engine.loaders import load_split, make_loader
    from fgvc.engine.runtime import Runtime
    from fgvc.models import create_model

    cfg = tiny_config(tiny_demo_root, tmp_path)
    full = load_split(cfg, "train")
    frame = full.frame.iloc[:17].reset_index(drop=True)
    index = DatasetIndex(frame, full.class_names, full.category_ids, "demo", "train")
    meta = get_meta(create_model("timm:test_resnet", full.num_classes, None))
    for rank in (0, 1):
        rt = Runtime(device=torch.device("cpu"), amp_dtype=None, channels_last=False, rank=rank, world_size=2)
        loader, sampler, _ = make_loader(cfg, rt, index, "train", 32, 8, True, meta)
        assert len(sampler) == 9 and [len(labels) for _images, labels, _rows in loader] == [8]


def test_resume_is_refused_when_other_parameters_would_learn(
    tiny_demo_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The optimiser state is a list in parameter order: resumed onto another set of learning parameters (fgvc chose
    another last BatchNorm for the architecture since, say) it would silently drive the wrong ones."""
    cfg = tiny_config(tiny_demo_root, tmp_path, stage1={"epochs": 2})
    forward = torch.nn.CrossEntropyLoss.forward

    def stop_at_once(self, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return forward(self, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(torch.nn.CrossEntropyLoss, "forward", stop_at_once)
        assert run_stage1(cfg, progress=False).interrupted_by == signal.SIGTERM
    path = cfg.run_dir() / "stage1" / LAST
    state = load_checkpoint(path)
    assert "fc.weight" in state["learning"] and "layer4.0.bn2.weight" in state["learning"]
    save_checkpoint(path, state | {"learning": [n for n in state["learning"] if not n.startswith("layer4.0.bn2")]
                                   + ["old_bn.weight"]})  # fmt: skip
    with pytest.raises(ConfigError, match=r"other parameters learning \(then old_bn\.weight; now "
                                          r"layer4\.0\.bn2\.weight, layer4\.0\.bn2\.bias\)"):  # fmt: skip
        run_stage1(cfg, progress=False)
    save_checkpoint(path, state | {"world_size": 2})  # written by a `--gpus 2` run, resumed in one process
    with pytest.raises(ConfigError, match=r"last.pt was written by 2 processes, this run has 1: the schedule and data "
                                          r"position would not match; resume with --gpus 2 \(or as many torchrun "
                                          r"processes\), or pass --force to start over"):  # fmt: skip
        run_stage1(cfg, progress=False)


def test_a_stage_is_reloaded_with_the_input_statistics_it_was_trained_with(stage1_run: Path, tmp_path: Path) -> None:
    """The registry's normalisation for a name can change (timm's configs, deprecated names); the checkpoint keeps
    what its weights were trained with, and predict/stage 2 use that."""
    import shutil

    from fgvc.engine.checkpoint import load_stage_model
    from fgvc.models import model_meta

    run = tmp_path / "run"
    shutil.copytree(stage1_run, run)
    registry = model_meta("timm:test_resnet")
    for name in (BEST, LAST):
        path = run / "stage1" / name
        if path.is_file():
            ckpt = load_checkpoint(path)
            assert ckpt["input"] == {"mean": list(registry.mean), "std": list(registry.std),
                                     "interpolation": registry.interpolation}  # fmt: skip
            ckpt["input"] = {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "interpolation": "bilinear"}
            save_checkpoint(path, ckpt)
    model, _ckpt, _ = load_stage_model(run / "stage1")
    meta = get_meta(model)
    assert (meta.mean, meta.std, meta.interpolation) == ((0.5,) * 3, (0.25,) * 3, "bilinear")


@pytest.mark.parametrize(
    ("warmup_epochs", "steps_per_epoch", "warmup_steps"),
    [(0.0, 10, 0), (1.0, 4, 4), (0.3, 10, 3), (0.1, 5, 1), (0.5, 3, 2)],  # fractions round up to whole steps
)
def test_schedule_warms_up_linearly_to_the_peak_then_decays_to_zero(
    warmup_epochs: float, steps_per_epoch: int, warmup_steps: int
) -> None:
    from fgvc.config import StageConfig
    from fgvc.engine.optim import build_scheduler

    epochs = 3
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    stage = StageConfig(epochs=epochs, warmup_epochs=warmup_epochs, sched="cosine")
    scheduler = build_scheduler(optimizer, stage, steps_per_epoch)
    lrs = []
    for _ in range(epochs * steps_per_epoch):  # the lr each optimiser step uses
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    ramp = [(i + 1) / (warmup_steps + 1) for i in range(warmup_steps)]
    assert lrs[:warmup_steps] == pytest.approx(ramp)
    assert lrs[warmup_steps] == 1.0  # the peak, once
    decay = lrs[warmup_steps:]
    assert all(a > b for a, b in itertools.pairwise(decay))
    cosine_steps = epochs * steps_per_epoch - warmup_steps
    assert decay[-1] == pytest.approx(0.5 * (1 + math.cos(math.pi * (cosine_steps - 1) / cosine_steps)))
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0)  # after the last step


def test_an_empty_train_split_is_refused_and_a_finished_stage_survives(tiny_demo_root: Path, tmp_path: Path) -> None:
    """An empty or cut images.txt used to give epochs of nothing, exit 0 and a "finished" stage of random weights;
    with --force it replaced a good model."""
    data = tmp_path / "demo"
    shutil.copytree(tiny_demo_root, data)
    cfg = tiny_config(data, tmp_path / "runs")
    run_stage1(cfg, progress=False)
    stage_dir = cfg.run_dir() / "stage1"
    kept = {path.name: path.read_bytes() for path in stage_dir.iterdir() if path.suffix in (".pt", ".json")}
    assert FINISHED in kept
    (data / "CUB_200_2011" / "images.txt").write_text("")
    _load_splits.cache_clear()  # as in a new process, which reads the metadata again
    with pytest.raises(DataError, match="the demo train split lists no images") as caught:
        run_stage1(cfg, force=True, progress=False)
    assert "\n" not in str(caught.value) and f"fgvc datasets check demo --root {data}" in str(caught.value)
    assert {path.name: path.read_bytes() for path in stage_dir.iterdir() if path.suffix in (".pt", ".json")} == kept


def test_weights_that_turn_nan_on_an_epochs_last_step_are_refused_before_anything_is_saved(
    tiny_demo_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The loss is read a step late and checked, so an update that overflows on the last step was saved, validated
    and marked finished; with --force it replaced the good model."""
    import fgvc.engine.stage as stage_module
    from fgvc.errors import TrainingError

    cfg = tiny_config(tiny_demo_root, tmp_path / "runs")
    run_stage1(cfg, progress=False)
    stage_dir = cfg.run_dir() / "stage1"
    kept = {path.name: path.read_bytes() for path in stage_dir.iterdir() if path.suffix in (".pt", ".json")}
    epoch = stage_module.train_one_epoch

    def diverging_last_step(model: torch.nn.Module, *args: object, **kwargs: object) -> object:
        stats = epoch(model, *args, **kwargs)
        with torch.no_grad():
            next(p for p in model.parameters() if p.requires_grad).fill_(float("inf"))
        return stats

    monkeypatch.setattr(stage_module, "train_one_epoch", diverging_last_step)
    with pytest.raises(TrainingError, match="' became NaN or infinite in epoch 1; lower --lr"):
        run_stage1(cfg, force=True, progress=False)
    assert {path.name: path.read_bytes() for path in stage_dir.iterdir() if path.suffix in (".pt", ".json")} == kept


_TORCH_SAVE = torch.save


def _disk_full_on(names: tuple[str, ...]) -> Callable[..., None]:
    """torch.save as a full disk makes it fail for the checkpoint files named: its writer wraps the file's OSError in
    "unexpected pos" (torch 2.x)."""
    save = _TORCH_SAVE  # not torch.save: a test may have patched it already

    def saving(obj: object, fh: object, *args: object, **kwargs: object) -> None:
        if any(name in str(getattr(fh, "name", "")) for name in names):
            try:
                raise OSError(28, "No space left on device")
            except OSError:
                raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598") from None
        save(obj, fh, *args, **kwargs)  # type: ignore[arg-type]

    return saving


def test_a_full_disk_names_the_checkpoint_and_never_leaves_an_old_last_pt_to_resume(
    tiny_demo_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk was a traceback; a --force run whose last.pt failed left the old run's last.pt beside the new
    best.pt, and the next run "resumed" it and marked that mixture finished."""
    cfg = tiny_config(tiny_demo_root, tmp_path / "runs")
    run_stage1(cfg, progress=False)
    stage_dir = cfg.run_dir() / "stage1"
    old_best = (stage_dir / BEST).stat().st_ino  # written by rename: another file has another inode

    monkeypatch.setattr(torch, "save", _disk_full_on((BEST, LAST)))
    assert load_checkpoint(stage_dir / LAST)["finished"]
    with pytest.raises(OSError) as caught:  # the first write fails: the old model stays
        run_stage1(cfg, force=True, progress=False)
    assert caught.value.errno == 28 and caught.value.filename == str(stage_dir / BEST)
    assert (stage_dir / BEST).stat().st_ino == old_best
    assert not (stage_dir / FINISHED).exists() and not (stage_dir / LAST).exists()

    monkeypatch.setattr(torch, "save", _disk_full_on((LAST,)))
    with pytest.raises(OSError):  # best.pt written, last.pt not: nothing of the old run to resume
        run_stage1(cfg, progress=False)
    assert (stage_dir / BEST).stat().st_ino != old_best and not (stage_dir / LAST).exists()

    monkeypatch.undo()
    result = run_stage1(cfg, progress=False)  # a fresh run, not the old one's "finished" last.pt
    assert len(result.history) == 1 and (stage_dir / FINISHED).is_file()
    assert load_checkpoint(stage_dir / LAST)["finished"]


@pytest.mark.parametrize("filename", ["/runs/x/stage1/best.pt", None])
def test_a_full_disk_is_one_line_saying_to_free_space(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, filename: str | None
) -> None:
    """With the file's name where fgvc knows it; without one (an OSError from a library's write), still one line."""
    import fgvc.engine.stage as stage_module
    from fgvc.cli import main

    def full(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device", filename)

    monkeypatch.setattr(stage_module, "run_stage1", full)
    monkeypatch.setattr(sys, "argv", ["fgvc", "stage1", "--dataset", "demo", "--workers", "0"])
    with pytest.raises(SystemExit) as exited:
        main()
    err = capsys.readouterr().err
    assert exited.value.code == 2 and len(err.strip().splitlines()) == 1
    assert f"fgvc: error: {filename + ': ' if filename else ''}No space left on device; free some space" in err


def test_a_fresh_start_whose_first_checkpoint_is_last_pt_drops_an_earlier_best_pt(
    tiny_demo_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With validation every 2 epochs the first checkpoint is last.pt: a best.pt left by a failed --force run (its
    last.pt could not be written) stayed beside the new run's, and `predict --stage 1` read the old model."""
    import fgvc.engine.stage as stage_module

    cfg = tiny_config(tiny_demo_root, tmp_path / "runs", stage1={"epochs": 2, "val_every": 2})
    run_stage1(cfg, progress=False)
    stage_dir = cfg.run_dir() / "stage1"
    monkeypatch.setattr(torch, "save", _disk_full_on((LAST,)))
    with pytest.raises(OSError):
        run_stage1(cfg, force=True, progress=False)
    monkeypatch.undo()
    assert (stage_dir / BEST).is_file() and not (stage_dir / LAST).exists()  # the old model, nothing to resume
    epoch, calls = stage_module.train_one_epoch, []

    def crash_in_epoch_2(*args: object, **kwargs: object) -> object:
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("the machine went down")
        return epoch(*args, **kwargs)

    monkeypatch.setattr(stage_module, "train_one_epoch", crash_in_epoch_2)
    with pytest.raises(RuntimeError, match="went down"):
        run_stage1(cfg, progress=False)
    assert (stage_dir / LAST).is_file() and not (stage_dir / BEST).exists()


@pytest.mark.parametrize(("version", "hangs"), [
    ((3, 11, 7), True), ((3, 11, 10), False), ((3, 10, 14), True), ((3, 10, 15), False), ((3, 12, 0), False),
    ((3, 13, 1), False),
])  # fmt: skip
def test_fork_can_deadlock_on_the_releases_before_cpythons_fix(version: tuple[int, int, int], hangs: bool) -> None:
    from fgvc.engine.runtime import fork_can_deadlock

    assert fork_can_deadlock(version) is hangs


def test_a_multi_process_run_on_an_affected_python_says_so_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """gh-112275 can hang a loader worker at its fork, for good: the user learns why a run might stall, and the fix."""
    import fgvc.engine.runtime as runtime

    monkeypatch.setattr(runtime, "_fork_warned", False)
    monkeypatch.setattr(runtime, "fork_can_deadlock", lambda: True)
    monkeypatch.setattr(runtime, "_FORK_FIXED_IN", {sys.version_info[:2]: 99})
    with caplog.at_level(logging.WARNING, logger="fgvc"):
        runtime._warn_about_fork_once(world_size=1, rank=0)
        runtime._warn_about_fork_once(world_size=2, rank=1)
        assert not caplog.records
        for _ in range(2):
            runtime._warn_about_fork_once(world_size=2, rank=0)
    assert len(caplog.records) == 1
    assert "gh-112275" in caplog.records[0].message and f"{sys.version_info[0]}.{sys.version_info[1]}.99" in (
        caplog.records[0].message
    )
