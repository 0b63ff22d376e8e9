"""benchmarks/throughput.py: the quick CPU run end to end, its ratio arithmetic, and its device-decoding loader.

No timing is asserted: numbers on a shared CPU mean nothing. What is checked is that every code path of the GPU run
executes, that each timed window holds exactly the images it was planned to hold, and that the ratios in the table are
the quotients of the raw numbers written beside them.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "throughput.py"


def load_benchmark():
    """The script as a module (it is not part of the fgvc package)."""
    spec = importlib.util.spec_from_file_location("fgvc_throughput_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module through sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    return load_benchmark()


@pytest.mark.slow
def test_quick_run_writes_table_and_raw_numbers(tmp_path: Path) -> None:
    env = dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1", PYTHONUNBUFFERED="1")
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--trace", "--out", str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    [table_file] = list(tmp_path.glob("*.md"))
    [raw_file] = list(tmp_path.glob("*.json"))
    assert table_file.stem == raw_file.stem and table_file.stem.startswith("cpu-")

    raw = json.loads(raw_file.read_text())
    assert raw["device"] and raw["finished"] is True and raw["quick"] is True
    rows = {row["measurement"]: row for row in raw["rows"]}
    assert not [row for row in raw["rows"] if row["status"].startswith("failed")]

    # Every measurement of the full run has a row; the eager ones were measured on the CPU.
    measured = ["ceiling: train step", "stage 1 e2e", "reference loop (PIL, fp32, NCHW)", "ceiling: inference",
                "stage 2 epoch (bn+fc, test DA)", "inference pass (same loader)",
                "stage 2 cached: epoch 1 (cache + tail)", "stage 2 cached: epoch 2+", "10-crop predict"]  # fmt: skip
    not_measured = ["stage 1 e2e, GPU decode", "stage 1 e2e, GPU decode, compiled", "10-crop predict, compiled",
                    "10-crop predict, CUDA graph", "ceiling: train step, CUDA graph",
                    "stage 1 e2e, GPU decode, CUDA graph"]  # fmt: skip
    assert set(rows) == set(measured + not_measured)
    for name in measured:
        assert rows[name]["status"] == "ok", name
        assert rows[name]["img_per_s"] == pytest.approx(rows[name]["images"] / rows[name]["seconds"])
    assert rows["stage 1 e2e, GPU decode"]["status"].startswith("not available")
    assert rows["stage 1 e2e, GPU decode, compiled"]["status"].startswith("skipped")
    for name in ("10-crop predict, CUDA graph", "ceiling: train step, CUDA graph",
                 "stage 1 e2e, GPU decode, CUDA graph"):  # fmt: skip
        assert rows[name]["status"].startswith("not available: CUDA graphs need CUDA"), name

    # --trace: one more traced epoch after each ceiling, stage-1 and 10-crop row; chrome traces for the two end-to-end
    # rows only (a ceiling's summary is what it is compared by).
    traced = [note for note in raw["notes"] if "traced epoch (profiler on)" in note]
    assert [note.split(":")[0] for note in traced] == [
        "timm test_resnet, ceiling", "timm test_resnet, stage 1 e2e", "timm test_resnet, ceiling",
        "timm test_resnet, 10-crop predict"]  # fmt: skip
    assert sorted(path.name for path in tmp_path.glob("*-trace-*.json.gz")) == [
        f"{table_file.stem}-trace-timm-test-resnet-10-crop-predict.json.gz",
        f"{table_file.stem}-trace-timm-test-resnet-stage-1-e2e.json.gz"]  # fmt: skip
    assert raw["cpu_model"]

    # --quick: batch 8, two timed batches per window, ten views of one image per 10-crop batch (8 // 10 -> 1).
    # The counts come from fgvc's own loop statistics and predict_probs, so they check the sampler windows.
    assert rows["ceiling: train step"]["images"] == 2 * 8
    for name in ("stage 1 e2e", "reference loop (PIL, fp32, NCHW)", "stage 2 epoch (bn+fc, test DA)",
                 "inference pass (same loader)", "stage 2 cached: epoch 1 (cache + tail)", "stage 2 cached: epoch 2+"):
        assert rows[name]["images"] == 2 * 8, name  # fmt: skip
    assert rows["10-crop predict"]["images"] == 2 * 1
    # The end-to-end rows say how much of their epoch went to waiting for the loader (read next to the ratio).
    for name in ("stage 1 e2e", "stage 2 epoch (bn+fc, test DA)", "inference pass (same loader)", "10-crop predict"):
        assert "waited for data" in rows[name]["note"], name
    # Stage 2 and its inference pass alternate over three rounds; each row is its median round, the note gives all.
    for name in ("stage 2 epoch (bn+fc, test DA)", "inference pass (same loader)"):
        rounds = re.search(r"median of 3 alternating rounds \(([\d.]+) / ([\d.]+) / ([\d.]+) s", rows[name]["note"])
        assert rounds, rows[name]["note"]
        assert f"{rows[name]['seconds']:.2f}" == sorted(rounds.groups(), key=float)[1], name
    assert re.search(r"tail epochs timed: \d+", rows["stage 2 cached: epoch 2+"]["note"])
    for counter in ("pinned_new_blocks", "pinned_freed_blocks", "pinned_alloc_ms"):  # CUDA counters: absent on the CPU
        assert all(row[counter] is None for row in raw["rows"]), counter

    # Ratios are the quotients of the raw numbers.
    def rate(name: str) -> float:
        return rows[name]["images"] / rows[name]["seconds"]

    assert rows["stage 1 e2e"]["ratio"] == pytest.approx(rate("stage 1 e2e") / rate("ceiling: train step"))
    assert rows["reference loop (PIL, fp32, NCHW)"]["ratio"] == pytest.approx(
        rate("stage 1 e2e") / rate("reference loop (PIL, fp32, NCHW)")
    )
    stage2, inference = rows["stage 2 epoch (bn+fc, test DA)"], rows["inference pass (same loader)"]
    assert stage2["ratio"] == pytest.approx(stage2["seconds"] / inference["seconds"])  # same images: a time ratio
    ten_crop_budget = rate("ceiling: inference") / 10
    assert rows["10-crop predict"]["ratio"] == pytest.approx(rate("10-crop predict") / ten_crop_budget)
    assert stage2["target"] == "<= 1.10" and stage2["met"] == (stage2["ratio"] <= 1.10)

    # The markdown holds one table line per raw row, and the stdout ends with the same table.
    table_lines = [line for line in table_file.read_text().splitlines() if line.startswith("| timm test_resnet |")]
    assert len(table_lines) == len(raw["rows"])
    assert "| model | res | measurement | img/s | peak GiB | ratio |" in done.stdout


def _row(bench, arch: str, measurement: str, images: int, seconds: float, status: str = "ok"):
    return bench.Row(arch=arch, model=arch, res=224, measurement=measurement, images=images, seconds=seconds,
                     status=status)  # fmt: skip


def test_ratios_and_targets_follow_the_issue(bench) -> None:
    rows = [
        _row(bench, "senet154", bench.CEIL_TRAIN, 200, 2.0),  # 100 img/s
        _row(bench, "senet154", bench.S1, 180, 2.0),  # 90 img/s: exactly 0.90 x ceiling
        _row(bench, "senet154", bench.REF, 120, 2.0),  # 60 img/s: fgvc is 1.5 x
        _row(bench, "senet154", bench.CEIL_INFER, 300, 1.0),  # 300 img/s
        _row(bench, "senet154", bench.S2, 100, 1.2),  # 1.2 s vs the 1.0 s inference pass over the same 100 images
        _row(bench, "senet154", bench.INFER, 100, 1.0),
        _row(bench, "senet154", bench.TEN, 27, 1.0),  # 27 img/s vs 300 / 10: 0.90
        _row(bench, "resnet50", bench.CEIL_TRAIN, 100, 1.0),
        _row(bench, "resnet50", bench.S1, 50, 1.0),  # CPU decoding: shown, but the target is for GPU decoding
        _row(bench, "resnet50", bench.S1_GPU, 70, 1.0),  # eager steps: shown too; the target is on the graphed row
        _row(bench, "resnet50", bench.CEIL_TRAIN_GRAPH, 125, 1.0),  # 1.25 x the eager ceiling
        _row(bench, "resnet50", bench.S1_GPU_GRAPH, 0, 0.0, status="failed: OutOfMemoryError"),
    ]
    bench.apply_ratios(rows)
    by = {(row.arch, row.measurement): row for row in rows}
    s1 = by["senet154", bench.S1]
    assert (s1.ratio, s1.target, s1.met) == (pytest.approx(0.90), ">= 0.90", True)
    ref = by["senet154", bench.REF]
    assert (ref.ratio, ref.target, ref.met) == (pytest.approx(1.5), ">= 1.40", True)
    s2 = by["senet154", bench.S2]
    assert (s2.ratio, s2.target, s2.met) == (pytest.approx(1.2), "<= 1.10", False)
    ten = by["senet154", bench.TEN]
    assert (ten.ratio, ten.met) == (pytest.approx(0.90), True)
    assert by["senet154", bench.INFER].ratio == pytest.approx(100 / 300)
    cpu_decoding = by["resnet50", bench.S1]
    assert (cpu_decoding.ratio, cpu_decoding.target, cpu_decoding.met) == (pytest.approx(0.5), "", None)
    eager_steps = by["resnet50", bench.S1_GPU]
    assert (eager_steps.ratio, eager_steps.target, eager_steps.met) == (pytest.approx(0.7), "", None)
    assert by["resnet50", bench.CEIL_TRAIN_GRAPH].ratio == pytest.approx(1.25)
    failed = by["resnet50", bench.S1_GPU_GRAPH]
    assert (failed.ratio, failed.target, failed.met) == (None, ">= 0.80", None)
    assert by["senet154", bench.CEIL_TRAIN].ratio is None
    table = bench.markdown_table(rows)
    assert table.count("\n") == len(rows) + 1
    assert "| 0.90 | ÷ ceiling train step | >= 0.90 | yes |" in table
    assert "**no**" in table and "failed: OutOfMemoryError" in table
    rows[-1] = _row(bench, "resnet50", bench.S1_GPU_GRAPH, 100, 1.0)  # 100 img/s against its own ceiling's 125
    bench.apply_ratios(rows)
    graphed = rows[-1]
    assert (graphed.ratio, graphed.met) == (pytest.approx(0.8), True)
    rows[-2] = _row(bench, "resnet50", bench.CEIL_TRAIN_GRAPH, 80, 1.0)  # a graphed ceiling slower than the eager one
    bench.apply_ratios(rows)
    assert (graphed.ratio, graphed.met) == (pytest.approx(1.0), True)  # divided by the faster: the eager 100
    rows[-2] = _row(bench, "resnet50", bench.CEIL_TRAIN_GRAPH, 0, 0.0, status="failed: no graph")
    bench.apply_ratios(rows)
    assert graphed.ratio == pytest.approx(1.0)  # the eager ceiling alone


def test_models_run_in_the_order_given(bench) -> None:
    """A device session of 15 minutes runs the rows it needs most first: the time budget cuts the last models."""
    arches = [case.arch for case in bench.select_cases(bench.parse_args(["--models", "resnet50, senet154,resnet50"]))]
    assert arches == ["resnet50", "senet154"]
    assert [case.arch for case in bench.select_cases(bench.parse_args([]))] == [c.arch for c in bench.FULL_CASES]
    with pytest.raises(SystemExit, match="--models: unknown resnet5; choose from senet154"):
        bench.select_cases(bench.parse_args(["--models", "resnet5"]))


def test_sized_index_repeats_files_to_the_requested_count(bench, tmp_path: Path) -> None:
    from fgvc.datasets.base import DatasetIndex, frame

    paths = [str(tmp_path / f"{i}.jpg") for i in range(4)]
    index = DatasetIndex(frame(paths, [0, 1, 0, 1], paths), ["a", "b"], ["a", "b"], "folder", "train")
    sized = bench.sized_index(index, 10)
    assert len(sized) == 10 and list(sized.frame.index) == list(range(10))
    counts = sized.frame["path"].value_counts()
    assert set(counts.index) == set(paths) and counts.min() == 2 and counts.max() == 3
    assert bench.sized_index(index, 3).frame["path"].is_unique


def test_generated_jpegs_form_a_folder_dataset(bench, tmp_path: Path) -> None:
    import cv2

    sizes = bench.Sizes(6, 40, 30, 3, ceiling_warmup=1, ceiling_steps=1, warmup_batches=1, seconds=0.0, min_batches=1,
                        max_images=100)  # fmt: skip
    bench.generate_jpegs(tmp_path, sizes)
    files = sorted(tmp_path.glob("train/*/*.jpg"))
    assert len(files) == 6 and len({f.parent.name for f in files}) == 3
    image = cv2.imread(str(files[0]))
    assert image.shape == (30, 40, 3) and image.std() > 5  # textured, not flat


def test_gpu_decode_row_runs_through_the_engine_on_cpu(bench, tmp_path: Path) -> None:
    """The row the GPU run measures for ResNet-50 with ``decode: gpu``, run on the CPU (nvJPEG's CPU twin decodes)."""
    if bench.gpu_decode is None:
        pytest.skip(bench.GPU_DECODE_MISSING)
    from fgvc.engine.loaders import load_split
    from fgvc.engine.runtime import setup_runtime

    sizes, case = bench.QUICK, bench.QUICK_CASES[0]
    bench.generate_jpegs(tmp_path / "data", sizes)
    cfg = bench.run_config(case, tmp_path / "data", tmp_path / "runs", workers=0, device="cpu")
    rt = setup_runtime(cfg.runtime)
    args = bench.parse_args(["--quick", "--out", str(tmp_path / "out")])
    runner = bench.Bench(args, sizes, rt, workers=0, started=time.perf_counter())
    run = bench.CaseRun(runner, case, cfg, load_split(cfg, "train"), tmp_path / "data")
    measured = run.stage1(decode="gpu")[bench.S1_GPU]
    assert measured.status == "ok" and "nvJPEG" in measured.note
    assert measured.images == sizes.min_batches * case.batch  # no ceiling row yet: the smallest window
    # The graphed rows' code, run where GraphedTraining passes CPU batches to the model itself (CUDA captures them).
    # Uncaptured, they are failed rows without a rate: their ratios would otherwise judge eager steps.
    ceiling = run.ceiling_train(graphed=True)[bench.CEIL_TRAIN_GRAPH]
    assert ceiling.status == "failed: no graph: no step was captured" and ceiling.images == 0
    graphed = run.stage1(decode="gpu", graphed=True)[bench.S1_GPU_GRAPH]
    assert graphed.status == "failed: no graph: no step was captured" and graphed.images == 0
    with pytest.raises(ValueError, match="decodes on the GPU"):
        run.stage1(decode="cpu", graphed=True)


def test_reference_retries_at_half_batch_when_fp32_runs_out_of_memory(bench, monkeypatch, tmp_path: Path) -> None:
    attempts: list[int] = []

    def reference_at(_self, batch: int):
        attempts.append(batch)
        if len(attempts) == 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return bench.Measured(images=2 * batch, seconds=1.0, note="PIL")

    monkeypatch.setattr(bench.CaseRun, "reference_at", reference_at)
    run = bench.CaseRun.__new__(bench.CaseRun)  # only the config is needed: no model is built
    run.cfg = bench.run_config(bench.FULL_CASES[0], tmp_path, tmp_path, workers=None, device="cpu")
    measured = run.reference()[bench.REF]
    assert attempts == [32, 16]
    assert measured.images == 32 and "batch 16: batch 32 in fp32 ran out of GPU memory" in measured.note


def test_a_model_that_cannot_be_built_fails_every_row_and_the_run_goes_on(bench, monkeypatch, tmp_path: Path) -> None:
    from fgvc.engine.runtime import setup_runtime

    def no_model(*_args, **_kwargs):
        raise ImportError("No module named 'pretrainedmodels'")

    monkeypatch.setattr(bench.CaseRun, "__init__", no_model)
    case = bench.QUICK_CASES[0]
    cfg = bench.run_config(case, tmp_path, tmp_path, workers=0, device="cpu")
    args = bench.parse_args(["--quick", "--out", str(tmp_path / "out")])
    runner = bench.Bench(args, bench.QUICK, setup_runtime(cfg.runtime), workers=0, started=time.perf_counter())
    steps = bench.eager_steps(case)
    bench.run_steps(runner, case, cfg, None, tmp_path, steps)
    expected = [name for _method, names, _kwargs in steps for name in names]
    assert [row.measurement for row in runner.rows] == expected
    assert all("building the model: ImportError" in row.status for row in runner.rows)
    assert runner.failures == len(expected)
    [raw_file] = list((tmp_path / "out").glob("*.json"))
    assert len(json.loads(raw_file.read_text())["rows"]) == len(expected)


def test_pinned_pool_growth_inside_a_window_is_kept_and_said(bench, tmp_path: Path) -> None:
    """The pinned-pool counters of a timed window (CUDA only) reach the raw row, and a growth is said in its note."""
    from fgvc.engine.runtime import setup_runtime

    case = bench.QUICK_CASES[0]
    cfg = bench.run_config(case, tmp_path, tmp_path, workers=0, device="cpu")
    args = bench.parse_args(["--quick", "--out", str(tmp_path / "out")])
    runner = bench.Bench(args, bench.QUICK, setup_runtime(cfg.runtime), workers=0, started=time.perf_counter())
    grew = bench.Measured(32, 1.0, note="waited for data 1%", pinned_new_blocks=5, pinned_freed_blocks=0,
                          pinned_alloc_ms=12.3)  # fmt: skip
    runner.add(case, 48, bench.TEN, grew)
    runner.add(case, 48, bench.CEIL_INFER, bench.Measured(320, 1.0, pinned_new_blocks=0, pinned_alloc_ms=0.0))
    ten, ceiling = runner.rows
    assert ten.note == "waited for data 1%; pinned pool grew 5 blocks, 12 ms allocating"
    assert ceiling.note == ""  # no growth, nothing said
    [raw_file] = list((tmp_path / "out").glob("*.json"))
    raw_row = json.loads(raw_file.read_text())["rows"][0]
    assert (raw_row["pinned_new_blocks"], raw_row["pinned_freed_blocks"], raw_row["pinned_alloc_ms"]) == (5, 0, 12.3)


def test_stage2_profile_script_runs_every_variant(capsys: pytest.CaptureFixture[str]) -> None:
    """`benchmarks/profile_stage2.py` on a tiny model and the CPU: every variant is timed and profiled."""
    spec = importlib.util.spec_from_file_location("fgvc_profile_stage2", ROOT / "benchmarks" / "profile_stage2.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    args = ["--arch", "timm:test_resnet", "--res", "48", "--batch", "2", "--steps", "1", "--device", "cpu"]
    assert module.main([*args, "--rows", "3"]) == 0
    out = capsys.readouterr().out
    assert "cut at layer4.0" in out
    variants = ["inference", "stage 2 uncached (the model", "tail only, channels_last", "tail only, contiguous"]
    for name in variants:
        assert f"== {name}" in out and "ms per step" in out
    assert "== fgvc's loops over" in out and "train_one_epoch / predict_probs:" in out

    assert module.main([*args[:4], "--batch", "20", "--device", "cpu", "--loop-batches", "2", "--tencrop"]) == 0
    out = capsys.readouterr().out
    assert "2 images x 10 views per forward, 2 batches" in out
    assert "model alone, views on the device:" in out and "predict_probs tencrop, pinned batches:" in out
    assert "predict_probs speed / model alone:" in out and "== inference" not in out  # the stage-2 variants skipped


def test_gpu_decode_profile_script_times_each_part(capsys: pytest.CaptureFixture[str]) -> None:
    """`benchmarks/profile_gpu_decode.py` on the CPU: decode alone, decode + augment, the loop on ready batches and
    the loop fed by a Prefetcher are each timed over the same batches, and the preparer's profile is printed."""
    script = ROOT / "benchmarks" / "profile_gpu_decode.py"
    spec = importlib.util.spec_from_file_location("fgvc_profile_gpu_decode", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    args = ["--arch", "timm:test_resnet", "--res", "32", "--batch", "4", "--images", "8", "--width", "64"]
    run = [*args, "--height", "48", "--loop-batches", "3", "--device", "cpu", "--rows", "3", "--workers", "1"]
    assert module.main(run) == 0
    out = capsys.readouterr().out
    assert "2 distinct batches of 64x48 JPEGs" in out and "3 per round" in out and "1 loader workers" in out
    names = ("decode alone", "decode + augment alone", "train_one_epoch, uint8 batches on the device",
             "train_one_epoch, Prefetcher(GpuBatchPreparer)", "train_one_epoch, Prefetcher(decode + one batch resize)",
             "train_one_epoch, Prefetcher(GpuBatchPreparer), flat payloads")
    for name in names:
        assert out.count(f"   {name}: ") == 2  # its three rounds, then its img/s
    for pinning in ("pinned", "not pinned"):
        name = f"train_one_epoch, Prefetcher(DataLoader, {pinning})"
        assert out.count(f"   {name}: ") == 2 and f"   {name} / ceiling: " in out  # rounds, img/s, its ratio
    assert "decoding on the device / ceiling: " in out and "roi_align" in out  # the crops appear in the profile
    assert "torch calls per batch on the preparing thread, 4 of them the decoder" in out  # one per image on the CPU
    assert "nvidia-smi dmon" not in out  # no engines to sample on the CPU

    with pytest.raises(SystemExit, match="--images"):
        module.main([*args[:6], "--images", "2"])


def test_trace_summary_counts_device_work_launches_and_loader_waits(bench) -> None:
    """The --trace numbers from a hand-made chrome trace (times in microseconds): overlapping device intervals count
    once, profiler spans are not device work, launches count on every host thread and through both CUDA APIs, and
    the first batch's wait is reported apart from the later ones."""
    ms = 1000

    def span(name: str, cat: str, ts: float, dur: float, tid: int = 1) -> dict:
        return {"ph": "X", "name": name, "cat": cat, "ts": ts * ms, "dur": dur * ms, "tid": tid}

    events = [
        span(bench.TRACE_MARK, "gpu_user_annotation", 0, 5000, tid=7),  # the mark's copy on the device timeline
        span(bench.TRACE_MARK, "user_annotation", 0, 1000),
        span("enumerate(DataLoader)#_MultiProcessingDataLoaderIter.__next__", "user_annotation", 0, 300),
        span("enumerate(DataLoader)#_MultiProcessingDataLoaderIter.__next__", "user_annotation", 500, 20, tid=3),
        span("enumerate(DataLoader)#_MultiProcessingDataLoaderIter.__next__", "user_annotation", 800, 40, tid=3),
        span("cudaLaunchKernel", "cuda_runtime", 310, 5),
        span("cuLaunchKernelEx", "cuda_driver", 320, 5),
        span("cudaLaunchKernel", "cuda_runtime", 330, 5, tid=2),  # autograd's thread launches the backward
        span("cudaMemcpyAsync", "cuda_runtime", 340, 5),  # not a launch
        span("conv", "kernel", 300, 200, tid=7),
        span("bn", "kernel", 400, 200, tid=8),  # overlaps the conv by 100: 300..600 is 300 ms of device work
        span("copy", "gpu_memcpy", 700, 100, tid=7),
        span("flush", "gpu_user_annotation", 0, 1000, tid=7),  # a profiler span, not work
        {"ph": "i", "name": "marker", "ts": 10, "tid": 1},
    ]
    summary = bench.trace_summary({"traceEvents": events}, batches=2, images=6)
    # 400 ms of device work over 2 batches, busy 400 of 1000 ms; 4 launches / 2 batches; the first wait 300 ms, the
    # later ones (20 + 40) / 2.
    assert summary == (
        "traced epoch (profiler on): 6 images, 1.00 s; device work 200.0 ms per batch, busy 40%; 2 kernel launches "
        "per batch; loader next 300 ms for the first batch, 30.0 ms for each later one"
    )


def test_traced_epoch_profiles_a_cpu_epoch_and_writes_its_trace(bench, tmp_path: Path) -> None:
    from fgvc.config import RuntimeConfig
    from fgvc.engine.runtime import setup_runtime

    rt = setup_runtime(RuntimeConfig(device="cpu"))
    seen: list[tuple[int, int]] = []

    def run_epoch(epoch: int, n_batches: int) -> int:
        seen.append((epoch, n_batches))
        for _ in range(n_batches):
            torch.ones(8, 8) @ torch.ones(8, 8)
        return 4 * n_batches

    path = tmp_path / "trace.json.gz"
    summary = bench.traced_epoch(rt, run_epoch, 3, path)
    assert seen == [(2, 3)]
    assert summary.startswith("traced epoch (profiler on): 12 images, ") and summary.endswith("; trace trace.json.gz")
    assert "device work 0.0 ms per batch, busy 0%" in summary  # a CPU run queues nothing on a device
    with gzip.open(path, "rt") as trace:
        exported = json.load(trace)
    assert any(event.get("name") == "aten::mm" for event in exported["traceEvents"])


def _quick_memory_run(script: str, out: Path) -> tuple[Path, dict]:
    """Run a CPU memory benchmark with ``--quick`` into ``out``: its markdown table and its raw numbers."""
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--quick", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    [table_file] = list(out.glob("cpu-*-memory-*.md"))
    return table_file, json.loads(table_file.with_suffix(".json").read_text())


def test_ensemble_memory_quick_run_writes_its_table(tmp_path: Path) -> None:
    """benchmarks/ensemble_memory.py --quick: every (way, members) cell is measured and the table's "matrices" are
    the raw peaks divided by one matrix. No memory figure is asserted: that is what the benchmark reports."""
    table_file, raw = _quick_memory_run("ensemble_memory.py", tmp_path)
    assert [row["members"] for row in raw["results"]] == [1, 2, 3]
    table_rows = [line for line in table_file.read_text().splitlines() if line.startswith("| ") and "MiB" not in line]
    assert len(table_rows) == 3
    for line, row in zip(table_rows, raw["results"], strict=True):
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        assert cells[0] == str(row["members"])
        for offset, way in ((1, "all at once"), (4, "one at a time")):
            assert row[way]["peak_mib"] > 0
            assert float(cells[offset + 1]) == pytest.approx(row[way]["peak_mib"] / raw["matrix_mib"], abs=0.006)


def test_gather_memory_quick_run_writes_its_table(tmp_path: Path) -> None:
    """benchmarks/gather_memory.py --quick: both ways run on two gloo processes, rank 0 ends with every row in image
    order (the script checks it and exits non-zero otherwise), and the table lists one line per (way, rank). No memory
    figure is asserted: that is what the benchmark reports."""
    table_file, raw = _quick_memory_run("gather_memory.py", tmp_path)
    held = {way: [rec["rows_held"] for rec in records] for way, records in raw["results"].items()}
    assert held == {"all ranks": [2_000, 2_000], "rank 0": [2_000, 0]}
    table_rows = [line for line in table_file.read_text().splitlines() if line.startswith("| all") or
                  line.startswith("| rank")]  # fmt: skip
    assert len(table_rows) == 4


def test_tencrop_loader_quick_run_measures_both_ways(tmp_path: Path) -> None:
    """benchmarks/tencrop_loader.py --quick: both ways of shipping a ten-crop batch go through a real DataLoader with
    workers, for photos of one orientation and of both, and the table lists what each batch held per image. No time
    is asserted: that is what it reports. The bytes are: five (48, 48, 3) crops against one 54 x 72 test resize of a
    96 x 72 JPEG, padded to 72 x 72 in a batch that holds both orientations."""
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "tencrop_loader.py"), "--quick", "--out",
                           str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    [table_file] = list(tmp_path.glob("cpu-tencrop-loader-*.md"))
    raw = json.loads(table_file.with_suffix(".json").read_text())
    mb = {(rec["photos"].split(" ")[-1], rec["way"].split(" ")[0]): rec["mb_per_image"] for rec in raw["results"]}
    # a batch of landscape and portrait 54 x 72 resizes is padded to 72 x 72
    assert mb == {("landscape", "five"): pytest.approx(5 * 48 * 48 * 3 / 1e6),
                  ("landscape", "image"): pytest.approx(54 * 72 * 3 / 1e6),
                  ("alternating", "five"): pytest.approx(5 * 48 * 48 * 3 / 1e6),
                  ("alternating", "image"): pytest.approx(72 * 72 * 3 / 1e6)}  # fmt: skip
    for rec in raw["results"]:
        assert rec["loader_img_per_s"] > 0 and rec["worker_ms_per_image"] > 0 and rec["main_ms_per_batch"] > 0
        assert f"| {rec['photos']} | {rec['way']} |" in table_file.read_text()


def test_epoch_start_quick_run_measures_both_ways(tmp_path: Path) -> None:
    """benchmarks/epoch_start.py --quick: both ways train their epochs through fgvc's loader, every epoch is recorded,
    and the table has a row per way. No time is asserted: that is what it reports (tests/test_epochs.py shows the
    next epoch loading early)."""
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "epoch_start.py"), "--quick", "--out",
                           str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    [table_file] = list(tmp_path.glob("cpu-epoch-start-*.md"))
    raw = json.loads(table_file.with_suffix(".json").read_text())
    assert len(raw["results"]) == 2
    for way, records in raw["results"].items():
        assert [record["epoch"] for record in records] == [0, 1, 2]
        assert all(record["seconds"] > 0 for record in records)
        assert f"| {way} |" in table_file.read_text()
