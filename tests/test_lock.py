"""One training process per stage folder (fgvc.engine.lock): a second start is refused, a dead holder frees it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tiny_config

from fgvc.engine.lock import LOCK_FILE, holder, stage_lock
from fgvc.engine.stage import run_stage1, run_stage2
from fgvc.errors import DataError, RunBusyError
from fgvc.pipeline import ensemble_recipe
from fgvc.predict import predict


def test_a_held_folder_refuses_a_second_holder_and_names_the_first(tmp_path: Path) -> None:
    stage_dir = tmp_path / "runs" / "x" / "stage1"
    assert holder(stage_dir) is None
    with stage_lock(stage_dir):
        who = holder(stage_dir)
        assert who is not None and who.startswith(f"pid {os.getpid()} on host ")
        with pytest.raises(RunBusyError, match=rf"{stage_dir} is being trained by pid {os.getpid()} on host "), \
                stage_lock(stage_dir):  # fmt: skip
            pass
        assert holder(stage_dir) == who  # the refused attempt took nothing from the holder
    assert holder(stage_dir) is None
    assert not (tmp_path / "runs").exists()  # the folders made for the lock held nothing else: gone with it
    with stage_lock(stage_dir):
        (stage_dir / "last.pt").write_bytes(b"")
    assert sorted(p.name for p in stage_dir.iterdir()) == ["last.pt"]  # a folder with results stays, the lock goes


def test_a_killed_holder_frees_the_folder(tmp_path: Path) -> None:
    """SIGKILL runs no cleanup: the kernel releases the lock with the process, so a requeued job can resume."""
    stage_dir = tmp_path / "run" / "stage1"
    code = (f"import time; from pathlib import Path; from fgvc.engine.lock import stage_lock\n"
            f"with stage_lock(Path({str(stage_dir)!r})):\n    print('held', flush=True); time.sleep(60)")  # fmt: skip
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "held"
        assert holder(stage_dir) == (stage_dir / LOCK_FILE).read_text() and f"pid {child.pid} " in holder(stage_dir)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert (stage_dir / LOCK_FILE).exists()  # left behind by the kill, and no obstacle:
    assert holder(stage_dir) is None
    with stage_lock(stage_dir):
        assert f"pid {os.getpid()} " in str(holder(stage_dir))


def test_a_second_start_of_a_training_stage_is_refused_and_the_others_say_who_trains(
    tiny_demo_root: Path, tmp_path: Path
) -> None:
    """A double submit or a requeue while the first job lives must not resume from the same last.pt beside it; stage 2,
    predict and the ensemble say the stage is being trained rather than offering the command that would start a
    second one."""
    cfg = tiny_config(tiny_demo_root, tmp_path / "runs")
    stage1 = cfg.run_dir() / "stage1"
    with stage_lock(stage1):  # another process training stage 1 (the lock is per open file: this refuses too)
        with pytest.raises(RunBusyError, match=rf"{stage1} is being trained by pid {os.getpid()} "):
            run_stage1(cfg, progress=False)
        assert sorted(p.name for p in stage1.iterdir()) == [LOCK_FILE]  # the refused start wrote nothing
    run_stage1(cfg, progress=False, force=False)
    assert not (stage1 / LOCK_FILE).exists()
    (stage1 / "finished.json").rename(stage1 / "finished.moved")  # stage 1 "still training" from here on
    with stage_lock(stage1):
        with pytest.raises(RunBusyError, match=r"stage 1 is not finished, pid \d+ on host .* is training it"):
            run_stage2(cfg.run_dir(), {"stage2.res": 40}, progress=False)
        with pytest.raises(DataError, match=r"stage1 is not finished: pid \d+ on host .* is training it now"):
            predict(cfg.run_dir(), split="val", tta="none", progress=False)
        recipe = tmp_path / "r.yaml"
        recipe.write_text(f"competition: generic\nout: {tmp_path / 'runs'}\nmembers:\n  - name: {cfg.run_dir().name}\n"
                          f"    stage: 1\n    data: {{dataset: demo, root: {tiny_demo_root}, workers: 0, "
                          f"val_fraction: 0.2}}\n    model: {{arch: 'timm:test_resnet', weights: null}}\n"
                          f"    stage1: {{res: 32, epochs: 1, batch_size: 8, lr: 0.05}}\n"
                          f"    runtime: {{deterministic: true, seed: 0}}\n")  # fmt: skip
        with pytest.raises(DataError) as refused:
            ensemble_recipe(recipe, tmp_path / "submissions", progress=False)
        assert f"{cfg.run_dir().name} is being trained by pid {os.getpid()} " in str(refused.value)
        assert "produce it with" not in str(refused.value)
    (stage1 / "finished.moved").rename(stage1 / "finished.json")


def test_a_forced_stage_1_waits_for_a_stage_2_adapting_its_model(tiny_demo_root: Path, tmp_path: Path) -> None:
    cfg = tiny_config(tiny_demo_root, tmp_path / "runs")
    run_stage1(cfg, progress=False)
    stage2 = cfg.run_dir() / "stage2-40"
    with stage_lock(stage2):
        before = (cfg.run_dir() / "stage1" / "best.pt").stat().st_mtime_ns
        with pytest.raises(RunBusyError, match=rf"{stage2} is being trained by .* which --force would retire"):
            run_stage1(cfg, force=True, progress=False)
        assert (cfg.run_dir() / "stage1" / "best.pt").stat().st_mtime_ns == before


def test_stage_2_holds_its_stage_1_shared_and_a_retraining_stage_1_refuses_it(
    tiny_demo_root: Path, tmp_path: Path
) -> None:
    """A forced stage 1 keeps its old finished.json until its first checkpoint: a stage 2 started meanwhile must not
    adapt the model that is about to be retired. Stage 2s at two resolutions share stage 1 without trouble."""
    cfg = tiny_config(tiny_demo_root, tmp_path / "runs")
    run_stage1(cfg, progress=False)
    stage1 = cfg.run_dir() / "stage1"
    busy = rf"{stage1} is being trained by pid {os.getpid()} "
    with stage_lock(stage1), pytest.raises(RunBusyError, match=busy):  # `fgvc stage1 --force` retraining it
        run_stage2(cfg.run_dir(), {"stage2.res": 40}, progress=False)
    assert not (cfg.run_dir() / "stage2-40").exists()
    with stage_lock(stage1, shared=True), stage_lock(stage1, shared=True):  # two stage 2s adapting it
        assert holder(stage1) is None  # nobody trains stage 1 itself
        assert run_stage2(cfg.run_dir(), {"stage2.res": 40}, progress=False).final is not None


def test_a_probe_for_the_holder_never_refuses_a_start(tmp_path: Path) -> None:
    """`holder` takes the lock shared for a moment: a start at that instant retries instead of reporting a run that
    does not exist (predict and the ensemble probe while a job starts)."""
    import threading

    stage_dir = tmp_path / "run" / "stage1"
    stage_dir.mkdir(parents=True)
    done = threading.Event()

    def probe() -> None:
        while not done.is_set():
            holder(stage_dir)

    prober = threading.Thread(target=probe)
    prober.start()
    try:
        for _ in range(300):
            with stage_lock(stage_dir):
                pass
    finally:
        done.set()
        prober.join()


def test_the_lock_outlives_no_holder_that_fails(tiny_demo_root: Path, tmp_path: Path) -> None:
    """A start that fails (here on a missing dataset) releases the folder at once and leaves no run folder."""
    cfg = tiny_config(tmp_path / "nowhere", tmp_path / "runs")
    with pytest.raises(DataError):
        run_stage1(cfg, progress=False)
    assert not (tmp_path / "runs").exists()
    with stage_lock(cfg.run_dir() / "stage1"):  # free again (a held lock raises at once: nothing waits)
        assert holder(cfg.run_dir() / "stage1") is not None


def test_stage_2_runs_beside_a_stage_1_folder_it_may_not_write(
    tiny_demo_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stage 1 on read-only or archived storage (or another user's) can still be adapted: its shared lock is skipped
    with a warning, where it used to be an OSError."""
    import errno

    import fgvc.engine.lock as lock_module

    cfg = tiny_config(tiny_demo_root, tmp_path / "runs")
    run_stage1(cfg, progress=False)
    stage1_lock = cfg.run_dir() / "stage1" / LOCK_FILE
    real_open = os.open

    def read_only_stage1(path: object, flags: int, *args: object) -> int:
        if Path(str(path)) == stage1_lock:
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(lock_module.os, "open", read_only_stage1)
    assert run_stage2(cfg.run_dir(), {"stage2.res": 40}, progress=False).final is not None
    assert not stage1_lock.exists()


def test_a_lock_file_naming_a_dead_process_of_this_host_names_nobody(tmp_path: Path) -> None:
    """A stage 2 SIGKILLed in its first epoch leaves its line in .lock; an ensemble reading the folder later kept the
    file, and a retraining was told a dead process trained there ("or stop that process")."""
    import socket

    stage_dir = tmp_path / "stage2-48"
    stage_dir.mkdir()
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    (stage_dir / LOCK_FILE).write_text(f"pid {child.pid} on host {socket.gethostname()} since 2026-11-28T08:00:00")
    reading = pytest.raises(RunBusyError, match=r"stage2-48: its model is being read by another process")
    with stage_lock(stage_dir, shared=True), reading, stage_lock(stage_dir):  # an ensemble reads; a retraining starts
        pass
    assert (os.stat(stage_dir / LOCK_FILE).st_mode & 0o777) == 0o666  # its owner can still open it to write


def test_a_lock_file_a_reader_creates_stays_writable_for_the_folders_owner(tmp_path: Path) -> None:
    """Created by a reader (another user's ensemble) with mode 0644, .lock refused its owner's next training with a
    raw PermissionError."""
    stage_dir = tmp_path / "stage1"
    stage_dir.mkdir()
    old = os.umask(0o022)
    try:
        with stage_lock(stage_dir, shared=True):
            pass
    finally:
        os.umask(old)
    assert (os.stat(stage_dir / LOCK_FILE).st_mode & 0o777) == 0o666
