"""fgvc called as a library from one long-lived process (a notebook): each call leaves the process as it found it."""

from __future__ import annotations

import logging
import multiprocessing
import random
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from conftest import tiny_config

import fgvc
from fgvc.engine import stage as stage_module
from fgvc.errors import ConfigError


@pytest.fixture(scope="module")
def finished_run(tiny_demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    cfg = tiny_config(tiny_demo_root, tmp_path_factory.mktemp("runs"))
    fgvc.run_stage1(cfg, progress=False)
    return cfg.run_dir()


def _process_state() -> dict[str, object]:
    return {
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "cudnn.deterministic": torch.backends.cudnn.deterministic,
        "cudnn.benchmark": torch.backends.cudnn.benchmark,
        "torch rng": torch.get_rng_state(),
        "python rng": random.getstate(),
        "numpy rng": np.random.get_state()[1].copy(),
        "fgvc logger": (logging.getLogger("fgvc").level, logging.getLogger("fgvc").propagate),
        "fgvc handlers": list(logging.getLogger("fgvc").handlers),
    }


def _assert_same_state(before: dict[str, object], after: dict[str, object]) -> None:
    assert before.keys() == after.keys()
    for key, value in before.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, after[key]), key  # type: ignore[arg-type]
        elif isinstance(value, np.ndarray):
            np.testing.assert_array_equal(value, after[key], err_msg=key)  # type: ignore[arg-type]
        else:
            assert value == after[key], key


def test_a_stage_and_a_prediction_leave_the_process_as_they_found_it(
    tiny_demo_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(1234)
    random.seed(1234)
    np.random.seed(1234)
    monkeypatch.chdir(tiny_demo_root.parent)  # a relative data root, which the run resolves for its saved config
    cfg = tiny_config(Path(tiny_demo_root.name), tmp_path / "runs", runtime={"deterministic": True, "seed": 0})
    given = cfg.model_dump()
    before = _process_state()
    fgvc.run_stage1(cfg, progress=False)
    _assert_same_state(before, _process_state())
    assert cfg.model_dump() == given  # the run filled in data.root on its own copy
    fgvc.run_predict(cfg.run_dir(), split="test", tta="none", progress=False)
    _assert_same_state(before, _process_state())


def test_a_runs_log_file_holds_that_run_only(finished_run: Path, tmp_path: Path) -> None:
    train_log = finished_run / "stage1" / "train.log"
    assert "epoch 1/1" in train_log.read_text()
    logging.getLogger("fgvc").warning("a line from whatever the caller does next")
    fgvc.run_predict(finished_run, split="test", tta="none", progress=False)
    assert "whatever the caller does next" not in train_log.read_text()


@pytest.fixture
def library_logging() -> Iterator[logging.Logger]:
    """The "fgvc" logger as a fresh library process has it (tests that ran the CLI's main here configured it)."""
    logger = logging.getLogger("fgvc")
    as_left = logger.handlers, logger.propagate, logger.level
    logger.handlers, logger.propagate = [], True
    logger.setLevel(logging.NOTSET)
    yield logger
    logger.handlers, logger.propagate = as_left[:2]
    logger.setLevel(as_left[2])


def test_a_library_caller_gets_the_log_through_its_own_logging(
    tiny_demo_root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, library_logging: logging.Logger
) -> None:
    """No console handler of fgvc's own, propagation left on: the caller's handlers (here pytest's) see the lines."""
    with caplog.at_level(logging.INFO, logger="fgvc"):
        fgvc.run_stage1(tiny_config(tiny_demo_root, tmp_path / "runs"), progress=False)
    assert "epoch 1/1" in caplog.text
    assert library_logging.handlers == [] and library_logging.propagate


def test_a_stage_shows_the_caller_what_its_logging_shows_and_writes_info_to_train_log(
    tiny_demo_root: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    library_logging: logging.Logger,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A caller at WARNING (`logging.basicConfig()`'s level) sees fgvc's warnings only; train.log gets everything."""
    load_split = stage_module.load_split

    def warning_too(*args: object) -> object:
        library_logging.warning("a warning from inside the run")
        return load_split(*args)

    monkeypatch.setattr(stage_module, "load_split", warning_too)
    cfg = tiny_config(tiny_demo_root, tmp_path / "runs")
    with caplog.at_level(logging.WARNING):
        fgvc.run_stage1(cfg, progress=False)
    train_log = (cfg.run_dir() / "stage1" / "train.log").read_text()
    assert "a warning from inside the run" in caplog.text and "epoch 1/1" not in caplog.text
    assert "a warning from inside the run" in train_log and "epoch 1/1" in train_log
    assert library_logging.level == logging.NOTSET and library_logging.propagate and not library_logging.handlers


def test_paths_may_be_given_as_strings(finished_run: Path, tmp_path: Path) -> None:
    result = fgvc.run_stage2(str(finished_run), {}, progress=False)  # at the run's stage2.res, like `fgvc stage2`
    assert result.stage_dir == finished_run / "stage2-48"
    assert fgvc.run_predict(str(finished_run), split="val", tta="none", progress=False).metrics is not None
    assert fgvc.sweep(str(finished_run), [40], split="val", progress=False).table is not None


def test_an_invalid_argument_to_a_library_call_is_a_config_error(finished_run: Path) -> None:
    with pytest.raises(ConfigError, match=r"data\.workers"):
        fgvc.run_predict(finished_run, split="test", tta="none", workers=-1, progress=False)


def test_an_error_inside_training_ends_the_loader_workers_even_while_its_traceback_is_kept(
    tiny_demo_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A notebook keeps the last traceback (sys.last_traceback), which references the loaders: their worker processes
    must not live on with it."""

    def interrupted_epoch(model: object, loader: object, *args: object, **kwargs: object) -> None:
        next(iter(loader))  # type: ignore[call-overload]  # the workers are up
        raise KeyboardInterrupt

    monkeypatch.setattr(stage_module, "train_one_epoch", interrupted_epoch)
    before = {child.pid for child in multiprocessing.active_children()}
    cfg = tiny_config(tiny_demo_root, tmp_path / "runs", data={"workers": 2})
    with pytest.raises(KeyboardInterrupt) as kept:
        fgvc.run_stage1(cfg, progress=False)
    alive = [child for child in multiprocessing.active_children() if child.pid not in before]
    assert kept.traceback and not alive


def test_opencv_keeps_the_callers_log_level(tiny_demo_root: Path) -> None:
    from fgvc.io import decode_image

    code = "import cv2; before = cv2.utils.logging.getLogLevel(); import fgvc.io; "
    code += "assert cv2.utils.logging.getLogLevel() == before"
    subprocess.run([sys.executable, "-c", code], check=True)
    level = cv2.utils.logging.getLogLevel()
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_WARNING)
    images = sorted(tiny_demo_root.rglob("*.jpg"))
    try:
        decode_image(images[0])
        assert cv2.utils.logging.getLogLevel() == cv2.utils.logging.LOG_LEVEL_WARNING
        with ThreadPoolExecutor(4) as pool:  # `fgvc datasets check --decode` decodes on threads
            list(pool.map(decode_image, images * 4))
        assert cv2.utils.logging.getLogLevel() == cv2.utils.logging.LOG_LEVEL_WARNING
    finally:
        cv2.utils.logging.setLogLevel(level)


def test_the_public_names_load_on_first_use_and_leave_pythons_random_generator_as_it_was() -> None:
    """Loading them imports rich, whose ``rich.style`` draws from Python's generator at import: a caller who seeded
    it before the first call got another sequence than on a rerun."""
    code = (
        "import random, sys, fgvc; assert 'torch' not in sys.modules and 'rich' not in sys.modules; random.seed(0); "
        "state = random.getstate(); names = [getattr(fgvc, name) for name in fgvc.__all__]; "
        "assert 'rich.style' in sys.modules and random.getstate() == state; "
        "import fgvc.predict; assert callable(fgvc.run_predict) and 'torch' in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    with pytest.raises(AttributeError, match="no attribute 'stage3'"):
        fgvc.stage3  # noqa: B018


def test_progress_bars_refresh_once_a_minute_into_a_log_file(monkeypatch: pytest.MonkeyPatch) -> None:
    """A days-long run's stderr in a SLURM or nohup file: tqdm's 10 refreshes a second stay there (~95 MB a day)."""
    import io

    from fgvc.progress import LOG_FILE_INTERVAL_S, progress_bar

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.delenv("TQDM_MININTERVAL", raising=False)
    for stream, interval in ((io.StringIO(), LOG_FILE_INTERVAL_S), (Terminal(), 0.1)):
        monkeypatch.setattr(sys, "stderr", stream)
        with progress_bar(range(3), desc="x", enabled=True) as bar:
            assert bar.mininterval == interval and (bar.maxinterval == interval or interval == 0.1)
    monkeypatch.setenv("TQDM_MININTERVAL", "5")  # the user's choice, read by tqdm itself
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    with progress_bar(range(3), desc="x", enabled=True) as bar:
        assert bar.mininterval == 5
