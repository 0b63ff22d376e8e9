"""Predict (TTA, caching, probability files), sweep, suggest-res and recipe-driven ensembles on fixture runs."""

from __future__ import annotations

import logging
import math
import os
import re
import shutil
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import tiny_config
from dataset_fixtures import write_herbarium2019, write_inat

from fgvc.engine.loaders import _load_splits
from fgvc.engine.stage import run_stage1, run_stage2
from fgvc.engine.sweep import apparent_size_factor, suggest_test_res, sweep
from fgvc.errors import ConfigError, DataError, RunExistsError, WeightsError
from fgvc.io import decode_image
from fgvc.pipeline import ensemble_recipe, train_recipe
from fgvc.predict import predict, predict_stage
from fgvc.probs import Probabilities
from fgvc.recipe import load_recipe
from fgvc.submission import SubmissionError, validate_submission


def _folder_dataset(root: Path) -> Path:
    """Generic folder layout with 64x96 / 96x64 images: with res 28 and crop_pct 0.875 the resize is exact (32)."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 4), ("test", 3)):
        for cls in ("a", "b"):
            for i in range(n):
                shape = (64, 96, 3) if i % 2 == 0 else (96, 64, 3)
                image = rng.integers(0, 256, shape, dtype=np.uint8)
                image = cv2.GaussianBlur(image, (5, 5), 0)
                path = root / split / cls / f"{cls}{i}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                cv2.imwrite(str(path), image)
    return root


def test_tencrop_equals_the_mean_of_ten_hand_made_views(tmp_path: Path) -> None:
    stage_dir = _untrained_stage1(tmp_path)
    data = tmp_path / "data"
    result = predict_stage(stage_dir, "test", 28, "tencrop", progress=False)

    from fgvc.engine.checkpoint import load_stage_model
    from fgvc.models import get_meta

    model, _, _ = load_stage_model(stage_dir)
    model.eval()
    meta = get_meta(model)
    mean, std = np.array(meta.mean, np.float32), np.array(meta.std, np.float32)
    frame = pd.DataFrame({"path": result.probs.image_ids})
    for row, image_id in enumerate(frame["path"]):
        image = decode_image(data / image_id)
        h, w = image.shape[:2]
        size = (48, 32) if w > h else (32, 48)  # (width, height) with the shorter side 32 = floor(28 / 0.875)
        resized = cv2.resize(image, size, interpolation=cv2.INTER_AREA)  # a shrink: averaged, not bicubic
        rh, rw = resized.shape[:2]
        tops = [(0, 0), (0, rw - 28), (rh - 28, 0), (rh - 28, rw - 28), ((rh - 28) // 2, (rw - 28) // 2)]
        views = [resized[y : y + 28, x : x + 28] for y, x in tops]
        views += [v[:, ::-1] for v in views]
        probs = []
        for view in views:
            x = (view.astype(np.float32) / 255 - mean) / std
            with torch.no_grad():
                logits = model(torch.from_numpy(x.transpose(2, 0, 1).copy())[None])
            probs.append(torch.softmax(logits, 1)[0].numpy())
        expected = np.mean(probs, axis=0)
        np.testing.assert_allclose(result.probs.probs[row], expected, atol=2e-3)  # stored as float16
    assert result.path.name == "test-28-tencrop.npz" and result.path.parent.name == "stage1"
    again = predict_stage(stage_dir, "test", 28, "tencrop", progress=False)
    assert again.cached and np.array_equal(again.probs.probs, result.probs.probs)


def _untrained_stage1(tmp_path: Path) -> Path:
    """A zero-epoch stage 1 (the random-init model, saved like a trained one) on :func:`_folder_dataset` at 28 px."""
    data = _folder_dataset(tmp_path / "data")
    cfg = tiny_config(data, tmp_path / "runs", data={"dataset": "folder", "root": str(data), "val_fraction": 0.0},
                      stage1={"epochs": 0, "res": 28})  # fmt: skip
    cfg.model.arch = "timm:test_resnet"
    run_stage1(cfg, progress=False)
    return cfg.run_dir() / "stage1"


def test_compile_and_cuda_graph_follow_the_flags_else_the_stage_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`fgvc predict --compile` and `--cuda-graph` (and their `--no-` forms); without them the stage's own
    `runtime.compile` and `runtime.cuda_graph` decide."""
    import fgvc.predict as predict_module

    stage_dir = _untrained_stage1(tmp_path)
    asked: list[tuple[bool, bool]] = []
    chosen = predict_module.inference_network

    def recording(model: torch.nn.Module, rt: object, compile_model: bool, cuda_graph: bool) -> torch.nn.Module:
        asked.append((compile_model, cuda_graph))
        # never compiled: only the wiring is under test here; the speed is measured in benchmarks/
        return chosen(model, rt, False, cuda_graph)  # type: ignore[arg-type]

    monkeypatch.setattr(predict_module, "inference_network", recording)
    monkeypatch.setattr(predict_module, "MIN_BATCHES_TO_CAPTURE", 1)  # this split is one batch
    plain = predict_stage(stage_dir, "test", 28, "none", progress=False)
    predict_stage(stage_dir, "test", 28, "none", force=True, progress=False, compile_model=True)
    eager = predict_stage(stage_dir, "test", 28, "none", force=True, progress=False, cuda_graph=False)
    config = stage_dir / "config.yaml"
    text = config.read_text()
    assert "compile: false" in text and "cuda_graph: true" in text  # the defaults
    config.write_text(text.replace("compile: false", "compile: true").replace("cuda_graph: true", "cuda_graph: false"))
    predict_stage(stage_dir, "test", 28, "none", force=True, progress=False)
    predict_stage(stage_dir, "test", 28, "none", force=True, progress=False, compile_model=False, cuda_graph=True)
    predict(stage_dir.parent, "test", stage=1, res=28, tta="none", force=True, progress=False, compile_model=False,
            cuda_graph=True)  # fmt: skip  (`fgvc predict` passes both on; the config still says true / false)
    assert asked == [(False, True), (True, True), (False, False), (True, False), (False, True), (False, True)]
    assert np.array_equal(plain.probs.probs, eager.probs.probs)  # on the CPU the graph flag changes nothing
    monkeypatch.setattr(predict_module, "MIN_BATCHES_TO_CAPTURE", 2)  # one batch is too short a pass to capture
    predict_stage(stage_dir, "test", 28, "none", force=True, progress=False, compile_model=False, cuda_graph=True)
    assert asked[-1] == (False, False)


def test_prediction_runs_where_asked_else_where_the_stage_trained_if_this_machine_can(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fgvc_log: pytest.LogCaptureFixture
) -> None:
    """A stage trained with `--device cuda:1` (saved in its config.yaml) on a GPU server, predicted on a laptop: predict
    refused with "use --device cpu", an option predict, sweep and ensemble did not have."""
    import fgvc.predict as predict_module

    stage_dir = _untrained_stage1(tmp_path)
    config = stage_dir / "config.yaml"
    config.write_text(config.read_text().replace("device: null", "device: cuda:1"))
    assert "device: cuda:1" in config.read_text()
    used: list[str] = []
    setup_runtime = predict_module.setup_runtime
    monkeypatch.setattr(predict_module, "setup_runtime", lambda cfg: used.append(cfg.device) or setup_runtime(cfg))
    monkeypatch.setattr(predict_module, "device_problem", lambda name: None if name == "cpu" else "none here")
    predict_module._say_once.cache_clear()
    assert predict_stage(stage_dir, "test", 28, "none", progress=False).probs is not None
    predict_stage(stage_dir, "test", 28, "none", force=True, progress=False)
    said = "the stage was trained on cuda:1, which this machine or launch cannot use: predicting on what it has"
    assert fgvc_log.text.count(said) == 1  # once, however many passes (a sweep, an ensemble)
    predict_stage(stage_dir, "test", 28, "none", force=True, progress=False, device="cpu")
    sweep(stage_dir.parent, [32], split="test", progress=False, device="cpu")  # a new resolution: a real pass
    config.write_text(config.read_text().replace("device: cuda:1", "device: cpu"))
    predict_stage(stage_dir, "test", 28, "none", force=True, progress=False)
    # not the saved cuda:1 (None: a GPU where there is one, else the CPU); a saved device this machine has is kept
    assert used == [None, None, "cpu", "cpu", "cpu"]
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match=r"^runtime.device cuda: no CUDA device is available here; run on the "
                                              r"CPU: --device cpu, or runtime.device: cpu in a recipe$"):  # fmt: skip
            predict(stage_dir.parent, "test", stage=1, tta="none", force=True, progress=False, device="cuda")
        with pytest.raises(ConfigError, match=r"^runtime.device cuda: no CUDA device"):
            sweep(stage_dir.parent, [36], split="test", progress=False, device="cuda")


def test_a_device_this_machine_or_launch_cannot_use_is_a_one_line_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from fgvc.config import RuntimeConfig
    from fgvc.engine.runtime import _chosen_device, setup_runtime

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: pytest.fail(f"set_device({device}) was called"))
    with pytest.raises(ConfigError, match=r"^runtime.device cuda:2: this machine has 2 visible CUDA device\(s\), "
                                          r"cuda:0 to cuda:1; choose one with --device"):  # fmt: skip
        setup_runtime(RuntimeConfig(device="cuda:2"))
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(ConfigError, match=r"^3 processes on this machine need 3 visible GPUs, it has 2: use --gpus 2 "):
        setup_runtime(RuntimeConfig())  # --gpus 3: the third process has no GPU of its own
    with pytest.raises(ConfigError, match=r"^runtime.device cuda:0 would put all 3 processes on this machine on one"):
        setup_runtime(RuntimeConfig(device="cuda:0"))
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"^runtime.device mps: no Apple GPU \(MPS\) is available here; run on"):
        setup_runtime(RuntimeConfig(device="mps"))
    # accepted: a named GPU for one process per machine (one process, or one on each of two machines), each its own
    assert _chosen_device("cuda:1", local_world_size=1, local_rank=0) == torch.device("cuda", 1)
    assert _chosen_device("cuda", local_world_size=2, local_rank=1) == torch.device("cuda", 1)
    assert _chosen_device(None, local_world_size=2, local_rank=1) == torch.device("cuda", 1)


def test_every_resolution_is_checked_before_the_first_pass(tmp_path: Path) -> None:
    """`--multi-res 28,100000` or `sweep --res 36,5000`: the bad one used to be refused after the good one's pass."""
    stage_dir = _untrained_stage1(tmp_path)
    with pytest.raises(ConfigError, match=r"^resolution 100000 px is outside 1\.\.4096"):
        predict(stage_dir.parent, "test", stage=1, tta="none", multi_res=[28, 100000], progress=False)
    with pytest.raises(ConfigError, match=r"^resolution 5000 px is outside 1\.\.4096"):
        sweep(stage_dir.parent, [36, 5000], split="test", progress=False)
    assert not (stage_dir.parent / "predictions").exists()


def test_inference_network_graphs_only_on_cuda_and_compiling_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    from fgvc.engine.graphs import GraphedInference
    from fgvc.predict import inference_network

    model = torch.nn.Linear(2, 2)
    cuda = SimpleNamespace(device=torch.device("cuda"), amp_dtype=torch.bfloat16)  # building the wrapper needs no GPU
    cpu = SimpleNamespace(device=torch.device("cpu"), amp_dtype=None)
    graphed = inference_network(model, cuda, False, True)  # type: ignore[arg-type]
    assert isinstance(graphed, GraphedInference) and graphed.model is model and graphed.autocast_dtype == torch.bfloat16
    assert inference_network(model, cpu, False, True) is model  # type: ignore[arg-type]
    assert inference_network(model, cuda, False, False) is model  # type: ignore[arg-type]
    compiled: list[torch.nn.Module] = []
    monkeypatch.setattr(torch, "compile", lambda m, *a, **k: compiled.append(m) or m)
    assert inference_network(model, cuda, True, True) is model and compiled == [model]  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def adapted_run(tiny_demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    cfg = tiny_config(tiny_demo_root, tmp_path_factory.mktemp("runs"))
    run_stage1(cfg, progress=False)
    run_stage2(cfg.run_dir(), {"stage2.res": 48}, progress=False)
    return cfg.run_dir()


def test_predict_writes_a_probability_file_with_ids_and_labels(adapted_run: Path) -> None:
    result = predict(adapted_run, split="test", tta="flip", progress=False)
    assert result.path == adapted_run / "predictions" / "stage2-48" / "test-48-flip.npz"
    probs = Probabilities.load(result.path)
    assert probs.probs.shape == (len(probs.image_ids), 4)
    np.testing.assert_allclose(probs.probs.sum(1), 1.0, atol=5e-3)
    assert probs.has_labels and result.metrics is not None and 0 <= result.metrics["top1"] <= 100
    assert probs.meta["tta"] == "flip" and probs.meta["stage"] == "stage2-48"
    assert list(probs.category_ids) == [1, 2, 3, 4]  # CUB class ids, 1-based


def test_multi_res_averages_resolutions(adapted_run: Path) -> None:
    a = predict(adapted_run, split="val", stage=1, res=32, tta="none", progress=False).probs.probs
    b = predict(adapted_run, split="val", stage=1, res=40, tta="none", progress=False).probs.probs
    both = predict(adapted_run, split="val", stage=1, tta="none", multi_res=[32, 40], progress=False)
    np.testing.assert_allclose(both.probs.probs, (a + b) / 2, atol=2e-3)
    assert both.path.name == "val-32+40-none.npz"
    assert not both.cached  # the average is written anew even though both resolutions' files were reused
    one = predict(adapted_run, split="val", stage=1, tta="none", multi_res=[32], progress=False)
    assert one.cached and one.path.name == "val-32-none.npz"  # `--multi-res 32,`: the one file, reused


def test_a_stage_trained_with_gpu_decoding_is_predicted_on_the_cpu_with_a_note_where_the_gpu_cannot_decode(
    adapted_run: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The stage's decoder is kept where this device has it (predict and training see the same pixels); elsewhere
    the CPU decodes, and the log says so rather than switching silently."""
    import json
    import logging

    run = tmp_path / adapted_run.name
    shutil.copytree(adapted_run, run, ignore=shutil.ignore_patterns("predictions"))
    marker = run / "stage2-48" / "finished.json"
    marker.write_text(json.dumps(json.loads(marker.read_text()) | {"decode": "gpu"}))
    with caplog.at_level(logging.INFO, logger="fgvc"):
        result = predict(run, split="val", tta="none", progress=False)
    assert result.probs.probs.shape[0] > 0
    assert any("decoded its JPEGs on the GPU, which cpu cannot here: decoding on the CPU" in r.message
               for r in caplog.records), [r.message for r in caplog.records]  # fmt: skip


def test_sweep_writes_table_and_plot(adapted_run: Path) -> None:
    result = sweep(adapted_run, [32, 48, 40, 32], split="val", progress=False)
    assert list(result.table["res"]) == [32, 40, 48]  # each once: a repeated one was a second row
    assert list(result.table.columns) == ["res", "stage1", "stage2-48"]
    assert result.csv_path.is_file() and result.png_path.read_bytes()[:4] == b"\x89PNG"
    assert (result.csv_path.name, result.png_path.name) == ("sweep-val.csv", "sweep-val.png")  # one pair per split
    best = result.table.set_index("res")[result.best_model][result.best_res]
    assert best == result.table[["stage1", "stage2-48"]].to_numpy().max() == pytest.approx(result.best_score)
    assert result.metric == "top1"  # the demo has no leaderboard


def test_sweep_refuses_an_unlabelled_split_before_any_pass(tmp_path: Path) -> None:
    """A Kaggle test split has no labels: the sweep said so only after its first whole pass (hours on iNat)."""
    recipe_path, _ = _one_epoch_recipe(tmp_path, "  - {name: only, stage: 1}\n")
    train_recipe(recipe_path, progress=False)
    run = tmp_path / "runs" / "only"
    for image in sorted((tmp_path / "data" / "test").glob("*/*.png")):  # a flat test/ folder: no labels
        image.rename(image.parent.parent / f"{image.parent.name}-{image.name}")
    _load_splits.cache_clear()  # read once per process: a new command would read the moved files
    with pytest.raises(DataError, match=r"the test split has no labels; sweep needs a labelled split"):
        sweep(run, [28, 32], split="test", progress=False)
    assert not (run / "predictions").exists()


def test_sweep_names_a_moved_dataset_and_an_empty_split_as_predict_does(tmp_path: Path) -> None:
    recipe_path, _ = _one_epoch_recipe(tmp_path, "  - {name: only, stage: 1}\n")  # val_fraction 0: no val images
    train_recipe(recipe_path, progress=False)
    run = tmp_path / "runs" / "only"
    with pytest.raises(DataError, match=r"the val split has no images"):
        sweep(run, [28], split="val", progress=False)
    (tmp_path / "data").rename(tmp_path / "moved")
    with pytest.raises(DataError, match=r"the dataset this run was trained on is no longer there .* --data-root"):
        sweep(run, [28], split="test", progress=False)
    assert list(sweep(run, [28], split="test", data_root=tmp_path / "moved", progress=False).table["res"]) == [28]


def test_sweep_scores_the_datasets_leaderboard_metric(
    adapted_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a Herbarium run the resolution to submit at is the one with the best macro F1, not the best top-1."""
    import fgvc.engine.sweep as sweep_module

    run = tmp_path / adapted_run.name
    shutil.copytree(adapted_run, run)
    monkeypatch.setattr(sweep_module, "leaderboard_metric", lambda dataset: "macro_f1")
    result = sweep(run, [32, 40], split="val", progress=False)
    for res in (32, 40):
        scored = predict(run, split="val", stage=1, res=res, tta="none", progress=False).metrics
        assert result.table.set_index("res")["stage1"][res] == pytest.approx(scored["macro_f1"], abs=1e-3)
    assert result.metric == "macro_f1" and result.best_score == result.table[["stage1", "stage2-48"]].to_numpy().max()


def test_a_forced_stage2_retires_the_sweeps_that_scored_its_old_model(adapted_run: Path, tmp_path: Path) -> None:
    run = tmp_path / adapted_run.name
    shutil.copytree(adapted_run, run)
    sweep(run, [32, 48], split="val", progress=False)
    assert (run / "sweep-val.csv").is_file()
    run_stage2(run, {"stage2.res": 48, "stage2.epochs": 1}, force=True, progress=False)
    assert not list(run.glob("sweep-*"))  # its stage2-48 column was the old model's


def _copy_with_an_interrupted_stage2(adapted_run: Path, tmp_path: Path) -> Path:
    """The fixture run plus stage2-64 as an interrupted stage 2 leaves it: last.pt without finished.json."""
    run = tmp_path / adapted_run.name
    shutil.copytree(adapted_run, run)
    shutil.copytree(run / "stage2-48", run / "stage2-64")
    (run / "stage2-64" / "finished.json").unlink()
    return run


def test_a_damaged_finished_marker_is_a_one_line_error(adapted_run: Path, tmp_path: Path) -> None:
    run = tmp_path / adapted_run.name
    shutil.copytree(adapted_run, run)
    marker = run / "stage2-48" / "finished.json"
    marker.write_text(marker.read_text()[:10])
    shutil.rmtree(run / "predictions", ignore_errors=True)  # a cached file is reused without reading the marker
    with pytest.raises(DataError, match=r"finished.json: damaged; delete it and rerun the command that trained"):
        predict(run, split="val", tta="none", progress=False)


def test_a_model_trained_beside_another_hold_out_is_flagged_on_val(
    adapted_run: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A run from before the hold-out was keyed on image ids (no fingerprint in its checkpoints) validated on images it
    had trained on, silently; so would a run whose dataset gained or lost images since."""
    from fgvc.config import load_config
    from fgvc.engine.checkpoint import BEST, holdout_digest, load_checkpoint, save_checkpoint
    from fgvc.engine.loaders import load_split

    cfg = load_config(adapted_run / "config.yaml")
    val = load_split(cfg, "val")
    assert val.holdout and load_checkpoint(adapted_run / "stage1" / BEST)["holdout"] == holdout_digest(val)
    assert not load_split(cfg, "test").holdout
    caplog.clear()
    predict(adapted_run, split="val", stage=1, tta="none", progress=False)
    assert "hold-out" not in caplog.text
    for change, expected in ((lambda c: c.pop("holdout"), "older than 2026-11-27"),
                             (lambda c: c.update(holdout="0123456789abcdef"), "hold-out changed since")):  # fmt: skip
        run = tmp_path / expected.split()[0]
        shutil.copytree(adapted_run, run)
        shutil.rmtree(run / "predictions", ignore_errors=True)
        ckpt = load_checkpoint(run / "stage1" / BEST)
        change(ckpt)
        save_checkpoint(run / "stage1" / BEST, ckpt)
        caplog.clear()
        predict(run, split="val", stage=1, tta="none", progress=False)
        assert expected in caplog.text, caplog.text


def test_a_model_of_nan_weights_and_a_file_of_nan_rows_are_refused(adapted_run: Path, tmp_path: Path) -> None:
    """A diverged stage (trained before its weights were checked) used to give a file of NaN rows, "top-1 25.00", and
    an ensemble took it in and submitted class 0 for every image, as "validated"."""
    from fgvc.engine.checkpoint import BEST, load_checkpoint, save_checkpoint

    run = tmp_path / "diverged"
    shutil.copytree(adapted_run, run)
    shutil.rmtree(run / "predictions", ignore_errors=True)
    ckpt = load_checkpoint(run / "stage1" / BEST)
    weights = {k: v.clone() for k, v in ckpt["model"].items()}
    next(v for v in ckpt["model"].values() if v.is_floating_point()).fill_(float("nan"))
    save_checkpoint(run / "stage1" / BEST, ckpt)
    with pytest.raises(WeightsError, match=r"best\.pt: '.+' holds NaN or infinite values \(the run diverged\)"):
        predict(run, split="test", stage=1, tta="none", progress=False)  # refused before the pass
    # finite weights whose forward is NaN (a negative BatchNorm variance): the probabilities are checked too
    ckpt["model"] = weights
    next(v for k, v in ckpt["model"].items() if k.endswith("running_var")).fill_(-1.0)
    save_checkpoint(run / "stage1" / BEST, ckpt)
    with pytest.raises(WeightsError, match=r"best\.pt: the model gives NaN or infinite probabilities for \d+ of"):
        predict(run, split="test", stage=1, tta="none", progress=False)
    assert not (run / "predictions").exists() or not list((run / "predictions").rglob("*.npz"))

    good = Probabilities.load(predict(adapted_run, split="test", stage=1, tta="none", progress=False).path)
    good.probs[1] = np.nan
    good.save(tmp_path / "nan.npz")
    with pytest.raises(DataError, match=r"nan\.npz: 1 of \d+ rows hold NaN or infinite probabilities; delete it"):
        Probabilities.load(tmp_path / "nan.npz")


def test_a_prediction_that_could_not_be_written_fails_before_the_pass(
    adapted_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read-only run folder (archived runs, another user's) failed only once every image was scored."""
    import fgvc.predict as predict_module

    run = tmp_path / "run"
    shutil.copytree(adapted_run, run)
    shutil.rmtree(run / "predictions", ignore_errors=True)
    (run / "predictions").write_text("a file where the folder goes\n")
    monkeypatch.setattr(predict_module, "predict_probs", lambda *a, **k: pytest.fail("the pass ran"))
    with pytest.raises(OSError) as caught:
        predict(run, split="test", stage=1, tta="none", progress=False)
    assert str(run / "predictions") in str(caught.value.filename)


def test_predict_and_sweep_use_only_finished_stages_unless_one_is_named(
    adapted_run: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An interrupted stage's checkpoint is a half-trained model: never picked by default (a warning says how to
    finish it); named with --stage, it is used as it is, with that warning (a run stopped early on purpose)."""
    run = _copy_with_an_interrupted_stage2(adapted_run, tmp_path)
    hint = f"{run / 'stage2-64'} is not finished: `fgvc stage2 --run {run} --test-res 64`"
    for res in (None, 72, 64):  # by default: the finished stage 2, whatever --res is nearest to
        caplog.clear()
        assert predict(run, split="val", res=res, tta="none", progress=False).probs.meta["stage"] == "stage2-48"
        assert hint in caplog.text
    caplog.clear()
    assert predict(run, split="val", stage=2, res=64, tta="none", progress=False).probs.meta["stage"] == "stage2-64"
    assert "predicting with an unfinished stage" in caplog.text and hint in caplog.text
    assert list(sweep(run, [32, 64], split="val", progress=False).table.columns) == ["res", "stage1", "stage2-48"]
    (run / "stage2-48" / "finished.json").unlink()  # no finished stage 2: the default falls back to stage 1
    caplog.clear()
    assert predict(run, split="val", tta="none", progress=False).probs.meta["stage"] == "stage1"
    assert hint in caplog.text  # not silently: the user may think the adapted model made these predictions
    assert predict(run, split="val", stage=2, tta="none", progress=False).probs.meta["stage"] == "stage2-64"
    (run / "stage1" / "finished.json").unlink()
    resumes = r"stage1 is not finished: `fgvc stage1 --recipe .*config.yaml` resumes it, or name it with --stage 1"
    with pytest.raises(DataError, match=resumes):
        predict(run, split="val", tta="none", progress=False)
    caplog.clear()
    assert predict(run, split="val", stage=1, tta="none", progress=False).probs.meta["stage"] == "stage1"
    assert "predicting with an unfinished stage" in caplog.text
    with pytest.raises(DataError, match="no finished stage"):
        sweep(run, [32], split="val", progress=False)


def test_sweep_of_a_run_trained_on_val_warns(
    adapted_run: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """With data.train_on_all the val split was trained on: a sweep there scores training images."""
    run = tmp_path / adapted_run.name
    shutil.copytree(adapted_run, run)
    logger = logging.getLogger("fgvc")
    logger.addHandler(caplog.handler)  # fgvc's logger does not propagate to the root one caplog listens to
    try:
        sweep(run, [32], split="val", progress=False)
        assert "train_on_all" not in caplog.text
        config = run / "config.yaml"
        config.write_text(config.read_text().replace("train_on_all: false", "train_on_all: true"))
        sweep(run, [32], split="val", progress=False)
    finally:
        logger.removeHandler(caplog.handler)
    assert "data.train_on_all is set, so the val split was trained on" in caplog.text


def test_suggest_res_matches_eq5_by_hand() -> None:
    # F = 2/3 (1 - 0.08^1.5) / (1 - 0.08) = 2/3 * 0.9773726 / 0.92 = 0.7082410
    assert apparent_size_factor((0.08, 1.0)) == pytest.approx(0.708241, abs=1e-6)
    exact, rounded = suggest_test_res(224, 0.875, (0.08, 1.0))
    assert exact == pytest.approx(0.875 * 224 / 0.708241, rel=1e-6)  # 276.75
    assert rounded == 288
    # A narrower scale range (0.25, 1): s- = 0.5, F = 2/3 * (1 - 0.125) / (1 - 0.25) = 0.7777...
    exact, rounded = suggest_test_res(448, 1.0, (0.25, 1.0))
    assert exact == pytest.approx(448 / (2 / 3 * 0.875 / 0.75), rel=1e-9)  # 576.0
    assert rounded == 576
    assert math.isclose(apparent_size_factor((0.25, 1.0)), 7 / 9)


def _recipe(tmp_path: Path, competition: str, dataset: str, root: Path, weights: str) -> Path:
    text = f"""
competition: {competition}
out: {tmp_path / 'runs'}
data: {{dataset: {dataset}, root: {root}, workers: 0}}
model: {{weights: null}}
stage1: {{res: 32, epochs: 1, batch_size: 4, lr: 0.02}}
stage2: {{res: 40, epochs: 1, batch_size: 4, lr: 0.02, augment: test}}
predict: {{tta: flip, batch_size: 4}}
runtime: {{deterministic: true}}
ensemble: {{weights: {weights}, method: mean}}
members:
  - name: {competition}-a
    model: {{arch: "timm:test_resnet"}}
    stage2: {{tune: bn+fc}}
  - name: {competition}-b
    model: {{arch: "timm:test_efficientnet"}}
    stage: 1
"""
    path = tmp_path / f"{competition}.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("competition", "writer", "header"),
    [("inat2019", lambda root: write_inat(root, 2019), "id,predicted"),
     ("herbarium2019", write_herbarium2019, "Id,Category")],
)  # fmt: skip
def test_ensemble_on_fixture_runs_writes_a_valid_csv(tmp_path: Path, competition: str, writer, header: str) -> None:
    root = tmp_path / competition
    writer(root)
    recipe_path = _recipe(tmp_path, competition, competition, root, "search")
    outcomes = train_recipe(recipe_path, progress=False)
    assert [(o.member, o.stage, o.status) for o in outcomes] == [
        (f"{competition}-a", "stage1", "trained"), (f"{competition}-a", "stage2", "trained"),
        (f"{competition}-b", "stage1", "trained"),
    ]  # fmt: skip
    again = train_recipe(recipe_path, progress=False)
    assert {o.status for o in again} == {"skipped (finished)"}

    outcome = ensemble_recipe(recipe_path, tmp_path / "submissions", progress=False)
    lines = outcome.submission.read_text().splitlines()
    assert lines[0] == header
    assert outcome.submission.name.startswith(f"{competition}-")
    from fgvc.datasets import load_index

    test = load_index(competition, "test", root=root)
    assert len(lines) == len(test) + 1
    assert sorted(line.split(",")[0] for line in lines[1:]) == sorted(str(i) for i in test.frame["image_id"])
    validate_submission(outcome.submission, competition, test.frame["image_id"], test.category_ids)
    table = outcome.table
    assert list(table["member"])[:2] == [f"{competition}-a", f"{competition}-b"]
    assert table["weight"].iloc[:2].sum() == pytest.approx(1.0, abs=0.01)
    # hill climbing never loses to equal weights on the split it searched
    from fgvc.ensemble import combine
    from fgvc.metrics import topk_accuracy

    recipe = load_recipe(recipe_path)
    from fgvc.pipeline import member_probabilities

    val = [member_probabilities(recipe, m, "val", progress=False) for m in recipe.members]
    from fgvc.ensemble import align

    val = align(val)
    equal = topk_accuracy(combine([p.probs for p in val]), val[0].labels, 1)
    searched = topk_accuracy(combine([p.probs for p in val], outcome.weights), val[0].labels, 1)
    assert searched >= equal


def test_missing_member_prints_the_command_that_produces_it(tmp_path: Path, tiny_demo_root: Path) -> None:
    from fgvc.errors import DataError

    recipe_path = _recipe(tmp_path, "generic", "demo", tiny_demo_root, "equal")
    with pytest.raises(DataError) as err:
        ensemble_recipe(recipe_path, tmp_path / "submissions", progress=False)
    message = str(err.value)  # every missing member, before any prediction
    assert message.endswith(f"produce them with: fgvc train {recipe_path} --member generic-a --member generic-b")
    assert "\n" not in message
    assert not (tmp_path / "submissions").exists()

    # the printed command for one member trains that member and nothing else; then only the other one is named
    outcomes = train_recipe(recipe_path, progress=False, members=["generic-a"])
    assert [(o.member, o.stage, o.status) for o in outcomes] == [
        ("generic-a", "stage1", "trained"), ("generic-a", "stage2", "trained")
    ]  # fmt: skip
    assert not (tmp_path / "runs" / "generic-a" / "predictions").exists()
    with pytest.raises(DataError, match=r"produce it with: fgvc train \S+ --member generic-b$"):
        ensemble_recipe(recipe_path, tmp_path / "submissions", progress=False)
    train_recipe(recipe_path, progress=False, members=["generic-b"])
    with pytest.raises(DataError, match=r"sample_submision\.csv: sample submission not found"):  # a typo, early
        ensemble_recipe(recipe_path, tmp_path / "submissions", tmp_path / "sample_submision.csv", progress=False)
    other = tmp_path / "other_sample.csv"  # a generic sample takes any header: its ids say it is another test set's
    other.write_text("Id,Predicted\n999999,0\n")
    with pytest.raises(SubmissionError, match=rf"^{re.escape(str(other))}: its 1 ids are not the test split's"):
        ensemble_recipe(recipe_path, tmp_path / "submissions", other, progress=False)
    (tmp_path / "a_file").write_text("not a folder\n")
    with pytest.raises(FileExistsError) as caught:  # --out naming a file: before the predictions, not after
        ensemble_recipe(recipe_path, tmp_path / "a_file", progress=False)
    assert caught.value.filename == str(tmp_path / "a_file")
    assert not list((tmp_path / "runs").glob("*/predictions"))


def test_predictions_of_a_retrained_model_are_not_reused(tiny_demo_root: Path, tmp_path: Path) -> None:
    cfg = tiny_config(tiny_demo_root, tmp_path / "runs")
    run_stage1(cfg, progress=False)
    run_stage2(cfg.run_dir(), {"stage2.res": 40}, progress=False)
    first = predict(cfg.run_dir(), split="val", stage=1, tta="none", progress=False)
    assert predict(cfg.run_dir(), split="val", stage=1, tta="none", progress=False).cached
    run_stage1(cfg.model_copy(update={"runtime": cfg.runtime.model_copy(update={"seed": 1})}), force=True,
               progress=False)  # fmt: skip
    again = predict(cfg.run_dir(), split="val", stage=1, tta="none", progress=False)
    assert not again.cached and again.probs.meta["checkpoint"] != first.probs.meta["checkpoint"]
    stale = cfg.run_dir() / "stage2-40"  # adapted from the old stage-1 model: no checkpoint of it may stay usable
    assert not [name for name in ("finished.json", "last.pt", "best.pt") if (stale / name).exists()]
    default = predict(cfg.run_dir(), split="val", tta="none", progress=False)  # the latest stage with a checkpoint
    assert default.probs.meta["stage"] == "stage1"
    # a checkpoint replaced behind fgvc's back (copied in from another machine): the file, not the folder, decides
    best = cfg.run_dir() / "stage1" / "best.pt"
    best.write_bytes(best.read_bytes())
    os.utime(best, ns=(best.stat().st_atime_ns, best.stat().st_mtime_ns + 10**9))
    assert not predict(cfg.run_dir(), split="val", stage=1, tta="none", progress=False).cached


def test_a_checkpoint_replaced_while_a_prediction_runs_does_not_inherit_its_file(
    tiny_demo_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A training run with --force may replace best.pt while `fgvc predict` reads the old one: the file written names
    the weights it came from, so the new checkpoint's first prediction computes its own instead of reusing it."""
    import fgvc.predict as predict_module

    cfg = tiny_config(tiny_demo_root, tmp_path / "runs")
    run_stage1(cfg, progress=False)
    best = cfg.run_dir() / "stage1" / "best.pt"
    original = predict_module.predict_probs

    def replaced_meanwhile(*args: object, **kwargs: object) -> object:
        out = original(*args, **kwargs)  # type: ignore[arg-type]
        retrained = best.with_name("retrained.pt")
        retrained.write_bytes(best.read_bytes())
        os.utime(retrained, ns=(best.stat().st_atime_ns, best.stat().st_mtime_ns + 10**9))
        os.replace(retrained, best)  # as an atomic checkpoint write does
        return out

    monkeypatch.setattr(predict_module, "predict_probs", replaced_meanwhile)
    during = predict(cfg.run_dir(), split="val", stage=1, tta="none", progress=False)
    monkeypatch.undo()
    after = predict(cfg.run_dir(), split="val", stage=1, tta="none", progress=False)
    assert not after.cached and after.probs.meta["checkpoint"] != during.probs.meta["checkpoint"]
    assert predict(cfg.run_dir(), split="val", stage=1, tta="none", progress=False).cached


def test_a_run_whose_dataset_moved_is_told_where_it_is_now(tiny_demo_root: Path, tmp_path: Path) -> None:
    """A run keeps the absolute dataset folder it trained on. Once the dataset moves (another disk, another machine),
    stage 2, predict, sweep and the ensemble take the new folder (--data-root, or the recipe's data.root); without it
    the error says the run's dataset is gone and names the option, not "check the path"."""
    data = tmp_path / "data"
    shutil.copytree(tiny_demo_root, data)
    cfg = tiny_config(data, tmp_path / "runs")
    run_stage1(cfg, progress=False)
    run_dir = cfg.run_dir()
    expected = predict(run_dir, split="val", tta="none", progress=False)
    data.rename(tmp_path / "moved")
    gone = rf"{data}: the dataset this run was trained on is no longer there .*; pass --data-root with the folder"
    with pytest.raises(DataError, match=gone):
        predict(run_dir, split="val", tta="none", force=True, progress=False)
    with pytest.raises(DataError, match=gone):
        run_stage2(run_dir, {"stage2.res": 40}, progress=False)
    moved = predict(run_dir, split="val", tta="none", force=True, progress=False, data_root=tmp_path / "moved")
    assert not moved.cached and np.array_equal(moved.probs.probs, expected.probs.probs)
    assert sweep(run_dir, [32], progress=False, data_root=tmp_path / "moved").table["res"].tolist() == [32]
    result = run_stage2(run_dir, {"stage2.res": 40, "data.root": str(tmp_path / "moved")}, progress=False)
    assert result.final is not None
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"competition: generic\nout: {tmp_path / 'runs'}\nmembers:\n  - name: {run_dir.name}\n"
                      f"    stage: 2\n    data: {{dataset: demo, root: {tmp_path / 'moved'}, workers: 0, "
                      f"val_fraction: 0.2}}\n    model: {{arch: 'timm:test_resnet', weights: null}}\n"
                      f"    stage1: {{res: 32, epochs: 1, batch_size: 8, lr: 0.05}}\n"
                      f"    stage2: {{res: 48, epochs: 1, batch_size: 8, lr: 0.05, augment: test, tune: bn+fc}}\n"
                      f"    predict: {{tta: none}}\n    runtime: {{deterministic: true, seed: 0}}\n")  # fmt: skip
    trained = train_recipe(recipe, progress=False)  # stage 1 finished; stage 2 reads the recipe's folder
    assert [(o.stage, o.status) for o in trained] == [("stage1", "skipped (finished)"), ("stage2", "trained")]
    outcome = ensemble_recipe(recipe, tmp_path / "submissions", progress=False)
    assert outcome.submission.is_file()


def test_stored_probabilities_keep_their_relative_precision_down_the_tail(tmp_path: Path) -> None:
    """Confident rows over 5,000 classes: float16 probabilities would zero or coarsen most of the tail, which reorders
    the 2nd-5th guesses that top-5 and top-3 submissions score. The stored file keeps every value to < 1%."""
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (50, 5000)).astype(np.float32)
    logits[:, 0] += 40  # top-1 near 1, the rest between ~1e-30 and ~1e-10
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    path = tmp_path / "p.npz"
    Probabilities(probs, np.arange(50), np.full(50, -1), np.arange(5000), np.arange(5000).astype(str)).save(path)
    loaded = Probabilities.load(path).probs
    assert (loaded > 0).all()
    np.testing.assert_allclose(loaded.sum(1), 1.0, rtol=1e-5)
    tail = probs > np.exp(-32)  # float16 steps by 2^-6 in [-32, -16), by 2^-5 below
    relative = np.abs(loaded[tail] / probs[tail] - 1)
    assert relative.max() < 0.01
    # the second to fifth guesses stay in order wherever they are more than 2% apart
    order = np.argsort(-probs, axis=1)[:, :5]
    ranked = np.take_along_axis(probs, order, axis=1)
    clear = (ranked[:, :-1] / ranked[:, 1:] > 1.02).all(1)
    assert clear.sum() > 25
    np.testing.assert_array_equal(np.argsort(-loaded, axis=1)[clear, :5], order[clear])


def test_a_cached_prediction_file_that_cannot_be_read_is_recomputed(adapted_run: Path) -> None:
    first = predict(adapted_run, split="val", stage=1, tta="none", progress=False)
    first.path.write_bytes(b"not a zip file")
    again = predict(adapted_run, split="val", stage=1, tta="none", progress=False)
    assert not again.cached
    np.testing.assert_array_equal(again.probs.probs, first.probs.probs)
    assert predict(adapted_run, split="val", stage=1, tta="none", progress=False).cached


def test_an_unreadable_test_image_is_skipped_on_request_and_recomputed_once_it_reads(tmp_path: Path) -> None:
    root = _folder_dataset(tmp_path / "data")
    cfg = tiny_config(root, tmp_path / "runs", data={"dataset": "folder", "val_fraction": 0.0}, stage1={"res": 28})
    run_stage1(cfg, progress=False)
    image = root / "test" / "b" / "b1.png"
    good = image.read_bytes()
    image.write_bytes(good[: len(good) // 3])  # a download cut short
    with pytest.raises(DataError, match="--skip-corrupt"):
        predict(cfg.run_dir(), split="test", stage=1, tta="none", progress=False)
    skipped = predict(cfg.run_dir(), split="test", stage=1, tta="none", progress=False, skip_corrupt=True)
    row = skipped.probs.image_ids.tolist().index("test/b/b1.png")
    assert skipped.probs.meta["unreadable"] == [row]
    np.testing.assert_allclose(skipped.probs.probs[row], [0.5, 0.5])
    assert predict(cfg.run_dir(), split="test", stage=1, tta="none", progress=False).cached  # still unreadable
    image.write_bytes(good)  # re-downloaded: the uniform row is stale
    fixed = predict(cfg.run_dir(), split="test", stage=1, tta="none", progress=False)
    assert not fixed.cached and fixed.probs.meta["unreadable"] == []
    assert not np.allclose(fixed.probs.probs[row], [0.5, 0.5])


def test_an_unreadable_image_is_not_scored(tmp_path: Path) -> None:
    """Its uniform row's tie goes to the first class: an unreadable image of that class scored as a hit, so
    `predict --skip-corrupt` (and the ensemble's table) reported a higher accuracy the more images were unreadable."""
    from dataclasses import replace

    from fgvc.ensemble import align
    from fgvc.metrics import summarize

    root = _folder_dataset(tmp_path / "data")
    cfg = tiny_config(root, tmp_path / "runs", data={"dataset": "folder", "val_fraction": 0.0}, stage1={"res": 28})
    run_stage1(cfg, progress=False)
    image = root / "test" / "a" / "a1.png"
    image.write_bytes(image.read_bytes()[:100])
    result = predict(cfg.run_dir(), split="test", stage=1, tta="none", progress=False, skip_corrupt=True)
    probs = result.probs
    assert probs is not None and result.metrics is not None
    row = probs.image_ids.tolist().index("test/a/a1.png")
    assert probs.labels[row] == 0 and probs.meta["unreadable"] == [row]
    readable = np.arange(len(probs.labels)) != row
    assert result.metrics == summarize(probs.probs[readable], probs.labels[readable])
    reversed_rows = replace(probs, probs=probs.probs[::-1], image_ids=probs.image_ids[::-1], labels=probs.labels[::-1])
    _, aligned = align([probs, replace(reversed_rows, meta=probs.meta | {"unreadable": [len(readable) - 1 - row]})])
    assert aligned.meta["unreadable"] == [row]  # a member's rows put in the first one's order: its note follows them


def test_predicting_on_a_dataset_whose_classes_changed_is_a_one_line_error(tmp_path: Path) -> None:
    root = _folder_dataset(tmp_path / "data")
    cfg = tiny_config(root, tmp_path / "runs", data={"dataset": "folder", "val_fraction": 0.0}, stage1={"res": 28})
    run_stage1(cfg, progress=False)
    predict(cfg.run_dir(), split="test", stage=1, tta="none", progress=False)  # a cached file does not hide it
    for split in ("train", "test"):
        (root / split / "a").rename(root / split / "z")  # same count, every label shifted
    _load_splits.cache_clear()  # as in a new process, which reads the folders again
    with pytest.raises(DataError, match=r"label 0 is 'a' in the model, 'b' in the dataset") as caught:
        predict(cfg.run_dir(), split="test", stage=1, tta="none", progress=False)
    assert "\n" not in str(caught.value)  # predict has no --data-root: the fix is the stage's config.yaml
    assert str(caught.value).endswith(
        f"set data.root in {cfg.run_dir() / 'stage1' / 'config.yaml'} to the data it was trained on"
    )


def test_predict_without_tta_follows_the_runs_predict_setting(adapted_run: Path) -> None:
    config = adapted_run / "stage2-48" / "config.yaml"
    original = config.read_text()
    assert "tta: tencrop" in original
    config.write_text(original.replace("tta: tencrop", "tta: flip"))
    try:
        result = predict(adapted_run, split="val", progress=False)
    finally:
        config.write_text(original)
    assert result.path.name == "val-48-flip.npz" and result.probs.meta["tta"] == "flip"


def _trained_fixed_weights_recipe(tmp_path: Path, data: str = "val_fraction: 0.0", ensemble: str = "") -> Path:
    """A generic recipe of one trained stage-1 member, ensembled with equal weights, on a folder without a val split
    (by default: ``data`` and ``ensemble`` add keys)."""
    root = _folder_dataset(tmp_path / "data")
    recipe_path = tmp_path / "generic.yaml"
    recipe_path.write_text(f"""competition: generic
out: {tmp_path / 'runs'}
data: {{dataset: folder, root: {root}, workers: 0, {data}}}
model: {{arch: "timm:test_resnet", weights: null}}
stage1: {{res: 28, epochs: 1, batch_size: 4}}
predict: {{tta: none, batch_size: 4}}
runtime: {{deterministic: true}}
ensemble: {{weights: equal{ensemble}}}
members:
  - {{name: only, stage: 1}}
""")
    train_recipe(recipe_path, progress=False)
    return recipe_path


def test_ensemble_with_fixed_weights_needs_no_val_split_and_never_reuses_a_csv_name(tmp_path: Path) -> None:
    recipe_path = _trained_fixed_weights_recipe(tmp_path)
    first = ensemble_recipe(recipe_path, tmp_path / "submissions", progress=False)
    second = ensemble_recipe(recipe_path, tmp_path / "submissions", progress=False)
    assert first.submission != second.submission and first.submission.is_file() and second.submission.is_file()
    assert first.submission.read_text() == second.submission.read_text()
    assert first.table["val_top1"].isna().all()  # no validation images: no scores, but a submission
    assert not list((tmp_path / "submissions").glob(".*draft"))


def test_the_ensemble_table_is_named_after_the_split_it_scores(tmp_path: Path) -> None:
    recipe_path = _trained_fixed_weights_recipe(tmp_path, ensemble=", val_split: test")  # the folder's test is labelled
    table = ensemble_recipe(recipe_path, tmp_path / "submissions", progress=False).table
    assert not any(column.startswith("val_") for column in table.columns)
    test_scores = predict_stage(tmp_path / "runs" / "only" / "stage1", "test", 28, "none", progress=False).metrics
    assert test_scores is not None and table["test_top1"].iloc[0] == pytest.approx(test_scores["top1"], abs=0.01)


def test_an_ensemble_scoring_members_on_the_val_split_they_trained_on_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    recipe_path = _trained_fixed_weights_recipe(tmp_path, data="val_fraction: 0.5, train_on_all: true")
    with caplog.at_level(logging.WARNING, logger="fgvc"):
        table = ensemble_recipe(recipe_path, tmp_path / "submissions", progress=False).table
    assert table["val_top1"].notna().all()
    assert "members only trained on the val split (data.train_on_all), so the val scores below are scores on " \
        "training images" in caplog.text


def test_ensemble_predicts_on_the_recipes_device_else_the_members_where_this_machine_can(tmp_path: Path) -> None:
    recipe_path = _trained_fixed_weights_recipe(tmp_path)
    saved = tmp_path / "runs" / "only" / "stage1" / "config.yaml"
    saved.write_text(saved.read_text().replace("device: null", "device: cuda:1"))  # trained on a GPU server's 2nd GPU
    assert "device: cuda:1" in saved.read_text()
    assert ensemble_recipe(recipe_path, tmp_path / "submissions", progress=False).submission.is_file()
    if torch.cuda.is_available():
        return
    shutil.rmtree(tmp_path / "runs" / "only" / "predictions")  # cached files need no device: predict again
    on_cuda = recipe_path.read_text().replace("{deterministic: true}", "{deterministic: true, device: cuda}")
    recipe_path.write_text(on_cuda)
    with pytest.raises(ConfigError, match=r"^runtime.device cuda: no CUDA device is available here"):
        ensemble_recipe(recipe_path, tmp_path / "submissions", progress=False)


def _one_epoch_recipe(tmp_path: Path, members: str) -> tuple[Path, str]:
    """A generic recipe of one-epoch stage-1 members on a small folder dataset: its path and its text."""
    root = _folder_dataset(tmp_path / "data")
    recipe_path = tmp_path / "generic.yaml"
    text = f"""competition: generic
out: {tmp_path / 'runs'}
data: {{dataset: folder, root: {root}, workers: 0, val_fraction: 0.0}}
model: {{arch: "timm:test_resnet", weights: null}}
stage1: {{res: 28, epochs: 1, batch_size: 4}}
members:
{members}"""
    recipe_path.write_text(text)
    return recipe_path, text


def test_train_and_ensemble_refuse_a_finished_member_whose_recipe_changed(tmp_path: Path) -> None:
    recipe_path, text = _one_epoch_recipe(tmp_path, "  - {name: only, stage: 1}\n")
    train_recipe(recipe_path, progress=False)
    assert {o.status for o in train_recipe(recipe_path, progress=False)} == {"skipped (finished)"}
    recipe_path.write_text(text.replace("epochs: 1", "epochs: 5"))
    with pytest.raises(ConfigError, match=r"member only: stage1 finished with other settings \(stage1.epochs: 1 -> 5\)"
                       r"; retrain it with `fgvc train .* --member only --force`"):  # fmt: skip
        train_recipe(recipe_path, progress=False)
    # the ensemble would submit the 1-epoch model as the recipe's 5-epoch one: refused the same way, nothing written
    with pytest.raises(ConfigError, match=r"member only: stage1 finished with other settings \(stage1.epochs: 1 -> 5"):
        ensemble_recipe(recipe_path, tmp_path / "submissions", progress=False)
    assert not (tmp_path / "submissions").exists() or not list((tmp_path / "submissions").iterdir())


def test_force_after_a_stage2_edit_retrains_stage2_and_keeps_stage1(tmp_path: Path) -> None:
    """Stage 2's epochs edited: `train --force` redoes the 1-3 epoch stage 2, not the days of stage 1 under it; with
    nothing edited, --force retrains every stage."""
    from fgvc.models import create_model

    start = tmp_path / "start.pth"  # stage 1's starting weights: gone by the time stage 2 is edited (another machine)
    torch.save(create_model("timm:test_resnet", 2).state_dict(), start)
    member = f"  - {{name: a, stage: 2, model: {{weights: {start}}}, stage2: {{res: 32, epochs: 1}}}}\n"
    recipe_path, text = _one_epoch_recipe(tmp_path, member)
    train_recipe(recipe_path, progress=False)
    best1 = tmp_path / "runs" / "a" / "stage1" / "best.pt"
    stage1_model = best1.read_bytes()
    start.unlink()
    recipe_path.write_text(text.replace("epochs: 1}}", "epochs: 2}}"))
    with pytest.raises(ConfigError, match=r"member a: stage2 finished with other settings \(stage2.epochs: 1 -> 2\) "
                                          r"\(stage 2 alone: stage 1 is the recipe's\); retrain it with"):  # fmt: skip
        train_recipe(recipe_path, progress=False)
    outcomes = train_recipe(recipe_path, force=True, progress=False)
    assert [(o.stage, o.status) for o in outcomes] == [("stage1", "skipped (finished)"), ("stage2", "trained")]
    assert best1.read_bytes() == stage1_model
    assert len(pd.read_csv(tmp_path / "runs" / "a" / "stage2-32" / "metrics.csv")) == 2
    with pytest.raises(WeightsError, match=r"start\.pth"):  # unchanged: --force retrains everything, from the weights
        train_recipe(recipe_path, force=True, progress=False)
    torch.save(create_model("timm:test_resnet", 2).state_dict(), start)
    again = train_recipe(recipe_path, force=True, progress=False)
    assert [(o.stage, o.status) for o in again] == [("stage1", "trained"), ("stage2", "trained")]


def test_an_interrupted_member_whose_recipe_changed_is_refused_up_front_and_forced_alone(tmp_path: Path) -> None:
    """b's stage 1 was interrupted, then its recipe edited: the stage itself refused to resume only after a had been
    visited, asking for a --force that, for the whole recipe, retrains a too. Now the refusal comes first and names b
    alone; an interrupted stage 2 is redone alone, as a finished one is."""
    members = "  - {name: a, stage: 1}\n  - {name: b, stage: 2, stage1: {lr: 0.01}, stage2: {res: 32, epochs: 1}}\n"
    recipe_path, text = _one_epoch_recipe(tmp_path, members)
    train_recipe(recipe_path, progress=False)
    runs = tmp_path / "runs"
    (runs / "b" / "stage1" / "finished.json").unlink()  # as an interruption leaves it: last.pt, no finished.json
    recipe_path.write_text(text.replace("lr: 0.01", "lr: 0.02"))
    a_model = (runs / "a" / "stage1" / "best.pt").read_bytes()
    with pytest.raises(ConfigError, match=r"member b: stage1 interrupted with other settings \(stage1.lr: 0.01 -> "
                                          r"0.02\); retrain it with `fgvc train .* --member b --force`$"):  # fmt: skip
        train_recipe(recipe_path, progress=False)
    outcomes = train_recipe(recipe_path, force=True, progress=False, members=["b"])
    assert [(o.stage, o.status) for o in outcomes] == [("stage1", "trained"), ("stage2", "trained")]
    assert (runs / "a" / "stage1" / "best.pt").read_bytes() == a_model
    (runs / "b" / "stage2-32" / "finished.json").unlink()
    recipe_path.write_text(text.replace("lr: 0.01", "lr: 0.02").replace("epochs: 1}}", "epochs: 2}}"))
    with pytest.raises(ConfigError, match=r"member b: stage2 interrupted with other settings \(stage2.epochs: 1 -> 2"
                                          r"\) \(stage 2 alone: stage 1 is the recipe's\)"):  # fmt: skip
        train_recipe(recipe_path, progress=False)
    b_stage1 = (runs / "b" / "stage1" / "best.pt").read_bytes()
    outcomes = train_recipe(recipe_path, force=True, progress=False, members=["b"])
    assert [(o.stage, o.status) for o in outcomes] == [("stage1", "skipped (finished)"), ("stage2", "trained")]
    assert (runs / "b" / "stage1" / "best.pt").read_bytes() == b_stage1


def test_an_ensemble_holds_its_members_models_against_a_forced_retraining(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`fgvc train --force` during an ensemble replaced a member's model between its val and test predictions: the
    submission came from another model than the weights and table were fitted on, and said nothing."""
    import fgvc.pipeline as pipeline
    from fgvc.config import load_config
    from fgvc.engine.lock import stage_lock
    from fgvc.errors import RunBusyError

    recipe_path, _ = _one_epoch_recipe(tmp_path, "  - {name: a, stage: 1}\n")
    train_recipe(recipe_path, progress=False)
    stage1 = tmp_path / "runs" / "a" / "stage1"
    with stage_lock(stage1), pytest.raises(RunBusyError, match=r"stage1 is being trained by .*, which will replace its"
                                                                 r" model; wait for it to end"):  # fmt: skip
        ensemble_recipe(recipe_path, tmp_path / "submissions", progress=False)
    assert not (tmp_path / "submissions").exists() or not list((tmp_path / "submissions").iterdir())
    refused: list[str] = []
    original = pipeline.member_probabilities

    def retrain_meanwhile(*args: object, **kwargs: object) -> object:
        try:  # what a second terminal's `fgvc train --force` does while this ensemble predicts
            run_stage1(load_config(stage1 / "config.yaml"), force=True, progress=False)
        except RunBusyError as err:
            refused.append(str(err))
        return original(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(pipeline, "member_probabilities", retrain_meanwhile)
    assert ensemble_recipe(recipe_path, tmp_path / "submissions", progress=False).submission.is_file()
    assert refused and all("stage1: its model is being read by another process (a stage 2 adapting it, an "
                           "ensemble); wait for it to end" in why for why in refused)  # fmt: skip


def test_members_holding_out_other_images_are_refused_before_any_prediction(tmp_path: Path) -> None:
    members = "".join(f"  - {{name: {name}, stage: 1, data: {{val_fraction: {fraction}}}}}\n"
                      for name, fraction in (("a", 0.25), ("b", 0.5)))  # fmt: skip
    recipe_path, _ = _one_epoch_recipe(tmp_path, members)
    train_recipe(recipe_path, progress=False)
    with pytest.raises(ConfigError, match=r"members a and b have different val images \(data.val_fraction 0.25 vs "
                                          r"0.5\); give every member the same dataset and hold-out"):
        ensemble_recipe(recipe_path, tmp_path / "submissions", progress=False)
    assert not list((tmp_path / "runs").glob("*/predictions"))


def test_changed_members_are_all_refused_before_any_training(tmp_path: Path) -> None:
    """Two members edited since they finished and a third not trained yet: one error names both edited members, and
    the third is not trained first (hours, on a real recipe) only to fail on the others after it."""
    members = "  - {name: a, stage: 1}\n  - {name: b, stage: 1, stage1: {lr: 0.01}}\n"
    recipe_path, text = _one_epoch_recipe(tmp_path, members)
    train_recipe(recipe_path, progress=False)
    edited = text.replace("res: 28, epochs: 1", "res: 28, epochs: 2") + "  - {name: c, stage: 1}\n"
    recipe_path.write_text(edited)
    with pytest.raises(ConfigError) as refused:
        train_recipe(recipe_path, progress=False)
    message = str(refused.value)
    assert "member a: stage1 finished with other settings (stage1.epochs: 1 -> 2)" in message
    assert "member b: stage1 finished with other settings (stage1.epochs: 1 -> 2)" in message
    assert message.endswith("retrain them with `fgvc train " + str(recipe_path) + " --member a --member b --force`")
    assert not (tmp_path / "runs" / "c").exists()
    assert [o.status for o in train_recipe(recipe_path, progress=False, members=["c"])] == ["trained"]
    assert (tmp_path / "runs" / "c").is_dir()


def test_stage2_models_under_a_deleted_stage1_are_refused_before_any_training(tmp_path: Path) -> None:
    """Member a's stage1/ deleted by hand, its stage-2 model left: the refusal came only once member b, listed
    before it, had trained (hours on a real recipe); it now comes first, naming a alone in the command it gives."""
    members = "  - {name: b, stage: 1}\n  - {name: a, stage: 2, stage2: {res: 32, epochs: 1}}\n"
    recipe_path, _ = _one_epoch_recipe(tmp_path, members)
    train_recipe(recipe_path, progress=False, members=["a"])
    shutil.rmtree(tmp_path / "runs" / "a" / "stage1")
    with pytest.raises(RunExistsError, match=r"member a: stage2-32 adapted an earlier stage 1 that is gone \(.*runs/a"
                                             r"\); train it again and retire those models with `fgvc train .* "
                                             r"--member a --force`"):  # fmt: skip
        train_recipe(recipe_path, progress=False)
    assert not (tmp_path / "runs" / "b").exists()
    assert [o.status for o in train_recipe(recipe_path, progress=False, members=["a"], force=True)] == ["trained"] * 2
    (tmp_path / "runs" / "a" / "stage1" / "last.pt").unlink()  # deleted to save space: best.pt is the model
    assert {o.status for o in train_recipe(recipe_path, progress=False, members=["a"])} == {"skipped (finished)"}


def test_missing_member_weights_are_all_refused_before_any_training(tmp_path: Path) -> None:
    """A mistyped weights file on the third member is found before the first two train (hours on a real recipe), and
    one error names every member that lacks its file; a member that already started (a last.pt) needs none."""
    members = (f"  - {{name: a, stage: 1}}\n  - {{name: b, stage: 1, model: {{weights: {tmp_path / 'b.pth'}}}}}\n"
               f"  - {{name: c, stage: 1, model: {{weights: {tmp_path / 'c.pth'}}}}}\n")  # fmt: skip
    recipe_path, _ = _one_epoch_recipe(tmp_path, members)
    with pytest.raises(WeightsError) as refused:
        train_recipe(recipe_path, progress=False)
    message = str(refused.value)
    assert "member b: " + str(tmp_path / "b.pth") + ": no such weights file" in message
    assert "member c: " + str(tmp_path / "c.pth") + ": no such weights file" in message
    assert "member a" not in message and not (tmp_path / "runs").exists()
    (tmp_path / "runs" / "b" / "stage1").mkdir(parents=True)
    (tmp_path / "runs" / "b" / "stage1" / "last.pt").write_bytes(b"")  # started: resumes, its weights are not read
    with pytest.raises(WeightsError) as refused:
        train_recipe(recipe_path, progress=False)
    assert "member b" not in str(refused.value) and "member c: " in str(refused.value)


class _LeftAndTop(torch.nn.Module):
    """Two logits, 10 x the mean of the image's left half and of its top half: a horizontal flip changes the first, a
    vertical flip the second, and every image gives its own."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        return 10 * torch.stack([x[..., : w // 2].mean((1, 2, 3)), x[..., : h // 2, :].mean((1, 2, 3))], dim=1)


def test_flip_and_tencrop_average_each_images_own_views() -> None:
    from fgvc.engine.loop import _views_probs

    torch.manual_seed(0)
    model = _LeftAndTop()

    def soft(x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(model(x), 1)

    images = torch.rand(3, 3, 8, 8)
    mirrored = (soft(images) + soft(images.flip(-1))) / 2
    torch.testing.assert_close(_views_probs(model, images, "flip", False), mirrored)
    assert not torch.allclose(mirrored, (soft(images) + soft(images.flip(-2))) / 2, atol=1e-3)  # flips tell apart
    views = torch.rand(3, 10, 3, 8, 8)  # ten-crop: (images, views, ...) from the loader
    own = torch.stack([soft(views[i]).mean(0) for i in range(3)])
    torch.testing.assert_close(_views_probs(model, views, "tencrop", False), own)
    assert not torch.allclose(own, soft(views.flatten(0, 1)).view(10, 3, -1).mean(0), atol=1e-3)  # mixing would show


def test_digit_string_ids_keep_their_leading_zeros(tmp_path: Path) -> None:
    """Herbarium 2019 ids are file names, a folder dataset's may be zero-padded numbers: written back as given."""
    ids, categories = np.array(["0001", "0002"]), np.array(["0", "007"])
    path = tmp_path / "p.npz"
    Probabilities(np.full((2, 2), 0.5, np.float32), ids, np.full(2, -1), categories, categories).save(path)
    loaded = Probabilities.load(path)
    assert loaded.image_ids.tolist() == ["0001", "0002"] and loaded.category_ids.tolist() == ["0", "007"]
    numbers = tmp_path / "n.npz"
    Probabilities(np.full((2, 2), 0.5, np.float32), np.array(["12", "3"]), np.full(2, -1), categories, categories).save(
        numbers
    )
    assert Probabilities.load(numbers).image_ids.tolist() == [12, 3]  # plain integers stay integers (Kaggle's ids)


def test_integer_ids_past_int64_are_kept_as_strings(tmp_path: Path) -> None:
    """A folder dataset's class folder '12345678901234567890' is a number no int64 holds: saved as written."""
    huge = [12345678901234567890, 2]  # as the generic CSV reader makes them: Python ints
    path = tmp_path / "p.npz"
    Probabilities(np.full((2, 2), 0.5, np.float32), np.array(["a", "b"]), np.full(2, -1),
                  np.asarray(huge, dtype=object), np.array(["12345678901234567890", "2"])).save(path)  # fmt: skip
    assert Probabilities.load(path).category_ids.tolist() == ["12345678901234567890", "2"]
    unsigned = tmp_path / "u.npz"
    Probabilities(np.full((2, 2), 0.5, np.float32), np.array([2**63, 1], dtype=np.uint64), np.full(2, -1),
                  np.array([0, 1]), np.array(["0", "1"])).save(unsigned)  # fmt: skip
    assert Probabilities.load(unsigned).image_ids.tolist() == [str(2**63), "1"]  # not wrapped to a negative number


def test_a_prediction_file_of_other_images_is_replaced_only_with_force(tmp_path: Path) -> None:
    """The same checkpoint on another copy of the split (a test image gone): the finished file stays."""
    root = _folder_dataset(tmp_path / "data")
    cfg = tiny_config(root, tmp_path / "runs", data={"dataset": "folder", "val_fraction": 0.0}, stage1={"res": 28})
    run_stage1(cfg, progress=False)
    first = predict(cfg.run_dir(), split="test", stage=1, tta="none", progress=False)
    kept = first.path.read_bytes()
    other = tmp_path / "other"
    shutil.copytree(root, other)
    (other / "test" / "b" / "b1.png").unlink()
    wanted = r"test-28-none\.npz: computed by this checkpoint for other images \(6, 1 of them not in the 5 the "
    with pytest.raises(DataError, match=wanted + r"split has now: .*\); move the file away, or `fgvc predict \.\.\. "
                                                 r"--force` replaces it"):  # fmt: skip
        predict(cfg.run_dir(), split="test", stage=1, tta="none", progress=False, data_root=other)
    assert first.path.read_bytes() == kept
    replaced = predict(cfg.run_dir(), split="test", stage=1, tta="none", progress=False, data_root=other, force=True)
    assert len(replaced.probs.image_ids) == 5 and not replaced.cached


def test_a_single_runs_config_is_a_recipe_of_that_folder_from_any_directory(
    tiny_demo_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`fgvc ensemble runs/X/config.yaml` from elsewhere: the run's relative out must not start a new run under the
    current directory, and a stage 2 adapted at another resolution than the config's is named, not retrained."""
    monkeypatch.chdir(tmp_path)
    cfg = tiny_config(tiny_demo_root, Path("runs"))  # relative, as `fgvc stage1` saves it
    run_stage1(cfg, progress=False)
    run_dir = (tmp_path / cfg.run_dir()).resolve()
    run_stage2(run_dir, {"stage2.res": 40}, progress=False)  # `fgvc stage2 --test-res 40`; the config says 48
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert load_recipe(run_dir / "config.yaml").members[0].config.run_dir().resolve() == run_dir
    with pytest.raises(DataError, match=rf"no finished checkpoint for .*{run_dir / 'stage2-48'}.*has "
                                        rf"{run_dir / 'stage2-40'} finished \(to ensemble one, set its stage2.res\)"):
        ensemble_recipe(run_dir / "config.yaml", elsewhere / "submissions", progress=False)
    outcome = ensemble_recipe(run_dir / "stage2-40" / "config.yaml", elsewhere / "submissions", progress=False)
    assert outcome.table["res"].tolist()[0] == 40 and outcome.submission.is_file()
    stage1 = ensemble_recipe(run_dir / "stage1" / "config.yaml", elsewhere / "submissions", progress=False)
    assert (stage1.table["stage"].tolist()[0], stage1.table["res"].tolist()[0]) == (1, 32)
    assert not (elsewhere / "runs").exists()


def test_predicting_the_val_split_a_run_trained_on_says_so(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = _folder_dataset(tmp_path / "data")
    cfg = tiny_config(root, tmp_path / "runs", data={"dataset": "folder", "val_fraction": 0.5, "train_on_all": True},
                      stage1={"res": 28})  # fmt: skip
    run_stage1(cfg, progress=False)
    caplog.clear()  # stage 1's own lines say train_on_all too
    with caplog.at_level(logging.WARNING, logger="fgvc"):
        predict(cfg.run_dir(), split="test", stage=1, tta="none", progress=False)
        assert "train_on_all" not in caplog.text
        predict(cfg.run_dir(), split="val", stage=1, tta="none", progress=False)
    assert "data.train_on_all is set, so the val split was trained on and its scores are scores on training images" \
        in caplog.text


def test_without_run_the_run_picked_is_named(adapted_run: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The newest run under runs/ may be another than the user's (one trained with --out elsewhere): the log says."""
    from fgvc.engine.run_folder import latest_run

    with caplog.at_level(logging.INFO, logger="fgvc"):
        assert latest_run(adapted_run.parent) == adapted_run
    assert f"no --run: {adapted_run}, the newest stage-1 run under {adapted_run.parent}/ (--run DIR" in caplog.text


@pytest.mark.parametrize("damage", ["truncated", "empty", "flipped"])
def test_a_damaged_probability_file_is_a_data_error_and_predict_recomputes_it(
    adapted_run: Path, tmp_path: Path, damage: str
) -> None:
    """A file cut short or altered in a copy of the run folder (fgvc's own writes are atomic) raised BadZipFile or
    EOFError with a traceback; it is a one-line DataError, so a cached prediction is recomputed."""
    path = tmp_path / "p.npz"
    categories = np.array([3, 7])
    Probabilities(np.full((2, 2), 0.5, np.float32), np.array([1, 2]), np.full(2, -1), categories, categories).save(path)
    data = bytearray(path.read_bytes())
    if damage == "flipped":
        data[len(data) // 3] ^= 0xFF
    path.write_bytes(bytes(data[: len(data) // 2] if damage == "truncated" else b"" if damage == "empty" else data))
    with pytest.raises(DataError, match=r"p.npz: not an fgvc probability file .*; delete it and rerun `fgvc predict`"):
        Probabilities.load(path)
    run = tmp_path / "run"
    shutil.copytree(adapted_run, run)
    first = predict(run, split="val", tta="none", progress=False)
    first.path.write_bytes(path.read_bytes())
    again = predict(run, split="val", tta="none", progress=False)
    assert not again.cached and Probabilities.load(again.path).probs.shape == first.probs.probs.shape
