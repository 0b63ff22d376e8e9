"""The command line as users meet it: one-line errors with exit code 2, exit codes of the checkers, `python -m fgvc`."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def fgvc(*args: str, cwd: Path = REPO, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "fgvc", *args], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip


def one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("fgvc: error: "), result.stderr
    return lines[0]


def test_missing_imagenet_weights_name_the_file_the_places_and_the_url(tiny_demo_root: Path, tmp_path: Path) -> None:
    result = fgvc("stage1", "--dataset", "demo", "--data-root", str(tiny_demo_root), "--arch", "senet154",
                  "--res", "32", "--out", str(tmp_path), env={"TORCH_HOME": str(tmp_path / "torch"),
                                                               "HF_HOME": str(tmp_path / "hf")})  # fmt: skip
    line = one_line_error(result)
    assert "senet154-c7b49a05.pth" in line and str(tmp_path / "torch") in line and "http" in line
    assert not (tmp_path / "demo-senet154-32" / "stage1" / "last.pt").exists()


def test_a_checkpoint_for_another_architecture_is_refused(tiny_demo_root: Path, tmp_path: Path) -> None:
    from fgvc.models import create_model

    torch.save(create_model("timm:test_efficientnet", 10).state_dict(), tmp_path / "other.pth")
    result = fgvc("stage1", "--dataset", "demo", "--data-root", str(tiny_demo_root), "--arch", "timm:test_resnet",
                  "--weights", str(tmp_path / "other.pth"), "--res", "32", "--out", str(tmp_path))  # fmt: skip
    line = one_line_error(result)
    assert "other.pth" in line and "missing" in line and "unexpected" in line


def test_a_one_image_batch_at_1x1_feature_maps_is_one_line(tiny_demo_root: Path, tmp_path: Path) -> None:
    """32 px at stride 32 leaves 1x1 maps: a training BatchNorm cannot normalise one image's one value per channel."""
    result = fgvc("stage1", "--dataset", "demo", "--data-root", str(tiny_demo_root), "--arch", "timm:test_resnet",
                  "--weights", "none", "--res", "32", "--batch-size", "1", "--epochs", "1", "--workers", "0",
                  "--out", str(tmp_path))  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("fgvc: error: ")]  # after the run's log
    assert len(errors) == 1 and "a batch of one image reached a BatchNorm layer whose feature maps are 1x1" in errors[0]
    assert errors[0].endswith("raise the stage's batch size (--batch-size) or resolution (--res, --test-res)")


def test_bad_input_is_one_line_with_exit_code_2(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("stage1: {res: 448, lrr: 0.1}\n")
    assert "unknown key 'stage1.lrr'" in one_line_error(fgvc("stage1", "--recipe", str(recipe)))
    line = one_line_error(fgvc("stage1", "--dataset", "cub", "--data-root", str(tmp_path / "nowhere"),
                               "--weights", "none", "--out", str(tmp_path / "runs")))  # fmt: skip
    assert "nowhere" in line
    assert not (tmp_path / "runs").exists()  # a start that fails on its arguments leaves no (empty) run folder
    line = one_line_error(fgvc("stage1", "--dataset", "nosuchset", "--data-root", str(tmp_path)))
    assert "cub" in line  # lists the valid names
    assert "run `fgvc stage1` first" in one_line_error(fgvc("stage2", cwd=tmp_path))


def test_datasets_check_exit_codes(tmp_path: Path) -> None:
    from dataset_fixtures import write_cub

    truth = write_cub(tmp_path / "cub")
    assert fgvc("datasets", "check", "cub", "--root", str(tmp_path / "cub")).returncode == 0
    Path(truth.paths("train")[0]).unlink()
    result = fgvc("datasets", "check", "cub", "--root", str(tmp_path / "cub"))
    assert result.returncode == 1 and Path(truth.paths("train")[0]).name in result.stdout
    (tmp_path / "empty").mkdir()
    result = fgvc("datasets", "check", "cub", "--root", str(tmp_path / "empty"))
    assert result.returncode == 2 and "images.txt" in result.stdout


def test_listings_and_suggest_res() -> None:
    models = fgvc("models", "list")
    assert models.returncode == 0 and "senet154" in models.stdout and "resnext101_32x48d_wsl" in models.stdout
    datasets = fgvc("datasets", "list")
    assert datasets.returncode == 0 and "herbarium2022" in datasets.stdout
    suggest = fgvc("suggest-res", "--train-res", "224")
    assert suggest.returncode == 0 and suggest.stdout.strip() == "288"


@pytest.mark.parametrize("valid", [True, False])
def test_validate_submission_exit_codes(tmp_path: Path, valid: bool) -> None:
    path, sample = tmp_path / "sub.csv", tmp_path / "sample.csv"
    sample.write_text("id,predicted\n1,0\n2,0\n")
    path.write_text("id,predicted\n1,3 4 5 6 7\n2,1 2 3 4 5\n" if valid else "Id,predicted\n1,3\n1,4\n")
    assert "--dataset" in one_line_error(fgvc("validate-submission", str(path), "--competition", "inat2019"))
    result = fgvc("validate-submission", str(path), "--competition", "inat2019", "--sample", str(sample))
    if valid:
        assert result.returncode == 0 and "valid" in result.stdout
        assert "categories not checked" in result.stdout  # a sample lists no category set: not a silent "valid"
    else:
        assert result.returncode == 1 and "line 1" in result.stdout and "line 3" in result.stdout


def run_main(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str]:
    """``fgvc ARGS`` through the console entry point, in this process: (exit code, stderr; stdout when it is empty)."""
    from fgvc.cli import main

    monkeypatch.setattr(sys, "argv", ["fgvc", *args])
    with pytest.raises(SystemExit) as exited:
        main()
    captured = capsys.readouterr()
    return exited.value.code, captured.err if captured.err.strip() else captured.out


@pytest.mark.parametrize(
    ("args", "expected"),
    [(["stage1", "--bogus"], "No such option"), (["stage1", "--res", "abc"], "Invalid value for '--res'"),
     (["stage2", "--test-res", "x"], "Invalid value for '--test-res'"), (["nosuchcmd"], "No such command 'nosuchcmd'"),
     ([], "Usage:")],
)  # fmt: skip
def test_usage_errors_print_usage_and_exit_2_without_a_traceback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, args: list[str], expected: str
) -> None:
    code, err = run_main(monkeypatch, capsys, *args)
    assert code == 2 and expected in err and "Traceback" not in err


def test_bad_values_are_one_line_errors(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture,
                                        tmp_path: Path) -> None:  # fmt: skip
    recipes = {
        "dup.yaml": ("stage1: {res: 448}\nstage1: {res: 224}\n", "the key 'stage1' appears twice"),
        "flag.yaml": ("stage1: {res: true}\n", "stage1.res': expected a value, not the boolean true"),
        "section.yaml": ("data: demo\n", "'data' is 'demo', not a mapping of keys"),
        "binary.yaml": (b"\x89PNG\r\n\x1a\n\x00\xff\xfe", "not a text file"),
        "infinite.yaml": ("stage1: {lr: .inf}\n", "stage1.lr"),  # passed gt=0: a stage of NaN weights, "finished"
        "nan.yaml": ("stage2: {weight_decay: .nan}\n", "stage2.weight_decay"),
    }
    for name, (content, expected) in recipes.items():
        path = tmp_path / name
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
        code, err = run_main(monkeypatch, capsys, "stage1", "--recipe", str(path), "--workers", "0")
        assert code == 2 and expected in err and str(path) in err, (name, err)
        assert len(err.strip().splitlines()) == 1
    run = tmp_path / "run"
    for stage in ("stage1", "stage2-48"):
        (run / stage).mkdir(parents=True)
        for name in ("last.pt", "finished.json"):  # a finished stage's folder
            (run / stage / name).write_bytes(b"")
    cases = [
        (["stage1", "--lr", "-1"], "'stage1.lr': Input should be greater than 0"),
        (["stage1", "--device", "gpu7"], "'runtime.device': 'gpu7' is not a device; use cpu, cuda, cuda:N or mps"),
        (["suggest-res", "--train-res", "0"], "--train-res must be a positive number of pixels, not 0"),
        (["suggest-res", "--train-res", "448", "--crop-pct", "2"], "--crop-pct must be in (0, 1]"),
        (["suggest-res", "--train-res", "448", "--scale-min", "-1"], "must satisfy 0 < min < max <= 1"),
        (["validate-submission", str(tmp_path), "--competition", "generic"], "it is a folder, name the CSV in it"),
        (["predict", "--run", str(tmp_path), "--res", "40", "--multi-res", "32,48"], "--res and --multi-res both"),
        (["sweep", "--run", str(tmp_path), "--res", "32", "--batch-size", "0"],
         "--batch-size must be a positive number, not 0"),
        (["sweep", "--run", str(tmp_path), "--res", "0,32"], "--res must be a positive number, not 0"),
        (["stage1", "--gpus", "-2"], "--gpus -2: give the number of GPUs"),
        (["stage1", "--dataset", "demo", "--data-root", str(tmp_path / "typo"), "--weights", "none", "--out",
          str(tmp_path / "runs")],
         "no demo data there; check the path, or generate it with `fgvc demo --data-root"),
        (["stage1", "--dataset", "demo", "--weights", str(tmp_path), "--arch", "timm:test_resnet", "--out",
          str(tmp_path / "runs")],
         "a folder, not a weights file"),
        # a stage folder where the run folder is meant: it used to say "stage 1 has no checkpoint; run fgvc stage1"
        (["stage2", "--run", str(run / "stage1"), "--test-res", "48"], f"a stage folder; pass the run folder that "
                                                                        f"holds it: --run {run}"),
        (["predict", "--run", str(run / "stage2-48")], f"--run {run}"),
        (["sweep", "--run", str(run / "stage1"), "--res", "32"], f"--run {run}"),
        (["predict", "--run", str(run), "--stage", "2", "--res", "48"],
         f"{run / 'stage2-48' / 'config.yaml'}: missing; fgvc saved this folder's settings there"),
        (["stage1", "--dataset", "demo", "--name", "../elsewhere"], "'../elsewhere' is not a folder under `out`"),
    ]  # fmt: skip
    for args, expected in cases:
        code, err = run_main(monkeypatch, capsys, *args)
        assert code == 2 and err.startswith("fgvc: error: ") and expected in err, (args, err)
        assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "typo").exists()  # a mistyped demo root is not filled with a new dataset


def test_a_corrupt_image_with_loader_workers_ends_the_process(tiny_demo_root: Path, tmp_path: Path) -> None:
    """The workers ignore SIGTERM (a job scheduler's signal must reach the main process first); on an error the
    process must still end, not wait for them forever."""
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_demo_root, broken)
    for image in (broken / "CUB_200_2011" / "images").rglob("*.jpg"):
        image.write_bytes(b"not a jpeg")
    result = fgvc("stage1", "--dataset", "demo", "--data-root", str(broken), "--arch", "timm:test_resnet", "--res",
                  "32", "--weights", "none", "--workers", "2", "--out", str(tmp_path / "runs"),
                  timeout=120)  # fmt: skip
    assert result.returncode == 2 and "image is corrupt or truncated" in result.stderr


def test_main_leaves_torch_alone_when_no_process_group_was_joined(monkeypatch: pytest.MonkeyPatch) -> None:
    """A Ctrl-C during `import torch` leaves torch half-loaded with ``torch.distributed`` in ``sys.modules``. main()
    used to import fgvc.engine.runtime (hence torch) again to leave the process group, and the command died with a
    traceback and exit 1 instead of exit 130. Simulated here: torch.distributed present, fgvc.engine.runtime not."""
    import builtins
    import types

    from fgvc.cli import main

    real_import = builtins.__import__

    def guarded(name: str, *args: object, **kwargs: object) -> object:
        if name == "fgvc.engine.runtime":
            raise AssertionError("main() imported fgvc.engine.runtime")
        return real_import(name, *args, **kwargs)

    monkeypatch.setitem(sys.modules, "torch.distributed", types.ModuleType("torch.distributed"))
    monkeypatch.delitem(sys.modules, "fgvc.engine.runtime", raising=False)
    monkeypatch.setattr(sys, "argv", ["fgvc", "suggest-res", "--train-res", "448"])
    monkeypatch.setattr(builtins, "__import__", guarded)
    with pytest.raises(SystemExit) as exited:
        main()
    assert exited.value.code == 0


def test_the_stage2_summary_scores_the_model_that_sweep_and_predict_use() -> None:
    """It reported the last epoch, while best.pt (what every later command loads) is the first epoch with the best
    validation top-1: 'before -> after' could show a loss for a model that had gained."""
    import pandas as pd

    from fgvc.engine.stage import StageResult

    history = pd.DataFrame({"epoch": [1, 2, 3], "val_top1": [41.67, 41.67, 37.5]})
    result = StageResult(stage_dir=Path("x"), history=history, final={"top1": 37.5})
    assert result.adapted_score() == "41.67 after adaptation (best.pt, epoch 1; last epoch 37.50)"
    result.history = pd.DataFrame({"epoch": [1, 2], "val_top1": [30.0, 40.0]})
    result.final = {"top1": 40.0}
    assert result.adapted_score() == "40.00 after adaptation (best.pt, epoch 2)"


@pytest.mark.parametrize(("flags", "expected"), [([], None), (["--cuda-graph"], True), (["--no-cuda-graph"], False)])
def test_predict_passes_cuda_graph_through(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, tmp_path: Path, flags: list[str],
    expected: bool | None,
) -> None:  # fmt: skip
    """`fgvc predict --cuda-graph/--no-cuda-graph` reaches the library call; neither leaves it to the stage config."""
    from types import SimpleNamespace

    import fgvc.predict

    calls: list[dict] = []

    def recording_predict(run_dir: Path, **kwargs: object) -> SimpleNamespace:
        calls.append(kwargs)
        return SimpleNamespace(cached=False, path=tmp_path / "p.npz", metrics=None)

    monkeypatch.setattr(fgvc.predict, "predict", recording_predict)
    code, out = run_main(monkeypatch, capsys, "predict", "--run", str(tmp_path), *flags)
    assert code in (0, None) and "wrote" in out
    assert [call["cuda_graph"] for call in calls] == [expected]


@pytest.mark.parametrize(("err", "said"), [
    (OSError(errno.EROFS, "Read-only file system", "runs/x/stage1/.lock"),
     "fgvc: error: runs/x/stage1/.lock: Read-only file system; make it writable, or write elsewhere (--out for runs)"),
    (OSError(errno.ENOSPC, "No space left on device", "runs/x/stage1/last.pt"),
     "fgvc: error: runs/x/stage1/last.pt: No space left on device; free some space and rerun"),
])  # fmt: skip
def test_a_file_system_error_names_the_path_and_the_fix(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, err: OSError, said: str
) -> None:
    """A read-only folder was told to "check the path", which is no fix."""
    import fgvc.predict

    def failing(run_dir: Path, **kwargs: object) -> None:
        raise err

    monkeypatch.setattr(fgvc.predict, "predict", failing)
    code, out = run_main(monkeypatch, capsys, "predict", "--run", "runs/x")
    assert code == 2 and out.strip() == said


@pytest.mark.parametrize(("multi_res", "cached", "said"), [("32,", True, "reused"), ("32,", False, "wrote"),
                                                         (None, True, "reused"), ("32,40", False, "wrote")])
def test_predict_says_reused_exactly_when_the_library_reused_the_file(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, tmp_path: Path, multi_res: str | None,
    cached: bool, said: str,
) -> None:  # fmt: skip
    """`--multi-res 32,` is one resolution: its file reused as is used to be reported as "wrote"."""
    from types import SimpleNamespace

    import fgvc.predict

    monkeypatch.setattr(fgvc.predict, "predict", lambda run_dir, **kwargs: SimpleNamespace(
        cached=cached, path=tmp_path / "p.npz", metrics=None))  # fmt: skip
    flags = ["--multi-res", multi_res] if multi_res else []
    code, out = run_main(monkeypatch, capsys, "predict", "--run", str(tmp_path), *flags)
    assert code in (0, None) and out.startswith(said)


@pytest.mark.parametrize(("flags", "expected"), [([], False), (["--cuda-graph"], True), (["--no-cuda-graph"], False)])
def test_stage1_cuda_graph_sets_runtime_cuda_graph_train(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, flags: list[str], expected: bool
) -> None:
    """`fgvc stage1 --cuda-graph` replays the training steps from CUDA graphs (``runtime.cuda_graph_train``, off by
    default); `fgvc stage2` passes the flag on as an override of the stage-1 config, None when not given."""
    from types import SimpleNamespace

    import fgvc.engine.stage

    seen: list[object] = []
    done = SimpleNamespace(interrupted_by=0, before=None, final=None)
    monkeypatch.setattr(fgvc.engine.stage, "run_stage1",
                        lambda cfg, force: seen.append(cfg.runtime.cuda_graph_train) or done)  # fmt: skip
    monkeypatch.setattr(fgvc.engine.stage, "run_stage2",
                        lambda run_dir, overrides, force: seen.append(overrides["runtime.cuda_graph_train"]) or done)
    code, _ = run_main(monkeypatch, capsys, "stage1", "--dataset", "folder", *flags)
    assert code in (0, None) and seen == [expected]
    code, _ = run_main(monkeypatch, capsys, "stage2", "--run", "runs/x", *flags)
    assert code in (0, None) and seen == [expected, None if not flags else expected]


@pytest.mark.parametrize(
    ("flags", "expected"), [([], None), (["--skip-corrupt"], True), (["--no-skip-corrupt"], False)]
)
def test_stage2_skip_corrupt_overrides_stage_1s_setting(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, flags: list[str], expected: bool | None
) -> None:
    from types import SimpleNamespace

    import fgvc.engine.stage

    seen: list[object] = []
    done = SimpleNamespace(interrupted_by=0, before=None, final=None)
    monkeypatch.setattr(fgvc.engine.stage, "run_stage2",
                        lambda run_dir, overrides, force: seen.append(overrides["data.skip_corrupt"]) or done)
    code, _ = run_main(monkeypatch, capsys, "stage2", "--run", "runs/x", *flags)
    assert code in (0, None) and seen == [expected]


def test_stage1_ema_decay_sets_the_weight_average(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    from types import SimpleNamespace

    import fgvc.engine.stage

    seen: list[float] = []
    done = SimpleNamespace(interrupted_by=0)
    monkeypatch.setattr(fgvc.engine.stage, "run_stage1", lambda cfg, force: seen.append(cfg.stage1.ema_decay) or done)
    for flags in ([], ["--ema-decay", "0.9998"]):
        code, _ = run_main(monkeypatch, capsys, "stage1", "--dataset", "folder", *flags)
        assert code in (0, None)
    assert seen == [0.0, 0.9998]
    code, err = run_main(monkeypatch, capsys, "stage1", "--dataset", "folder", "--ema-decay", "1")
    assert code == 2 and "stage1.ema_decay" in err and "\n" not in err.strip(), err


def test_predict_and_sweep_take_a_device(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """Not the device the stage trained on (runtime.device in its config.yaml): the machine predicting may lack it."""
    from types import SimpleNamespace

    import pandas as pd

    import fgvc.engine.sweep
    import fgvc.predict

    seen: list[object] = []
    predicted = SimpleNamespace(cached=False, path=Path("p.npz"), metrics=None)
    swept = SimpleNamespace(table=pd.DataFrame({"res": [32]}), best_model="stage1", best_res=32, metric="top1",
                            best_score=1.0, csv_path="s.csv", png_path="s.png")  # fmt: skip
    monkeypatch.setattr(fgvc.predict, "predict", lambda *a, **k: seen.append(k["device"]) or predicted)
    monkeypatch.setattr(fgvc.engine.sweep, "sweep", lambda *a, **k: seen.append(k["device"]) or swept)
    for command in (["predict"], ["sweep", "--res", "32"]):
        for flags in ([], ["--device", "cpu"]):
            code, _ = run_main(monkeypatch, capsys, *command, "--run", "runs/x", *flags)
            assert code in (0, None)
    assert seen == [None, "cpu", None, "cpu"]
