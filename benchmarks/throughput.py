"""One run that measures fgvc's images/s and peak memory against the model-only ceiling and the public FixRes loop.

Why: a training toolkit is only as fast as its slowest stage, and the GPU hides which one that is. Every measurement
here runs in the same process on the same device, so the ratios (fgvc / ceiling, fgvc / reference) hold even where
absolute numbers differ between machines. Per model, in this order:

(a) ceilings: synthetic uint8 batches already on the device through the same model, precision and memory format
    (a train step at the train resolution, inference at the test resolution; no per-step host sync);
(b) stage 1 end to end: generated 800x600 JPEGs through fgvc's loader, augmentation and ``train_one_epoch``
    (and, where ``fgvc.gpu_decode`` and nvJPEG are present, with the JPEGs decoded on the device);
(c) the reference loop as the public FixRes code trains: PIL + torchvision transforms, fp32, NCHW, normalised on the
    CPU, same batch and loader workers;
(d) stage 2 end to end (``bn+fc`` with the test augmentation) against an inference pass over the same loader, then
    with the frozen-trunk feature cache (epoch 1 builds it, epochs 2.. run the tail only);
(e) 10-crop prediction through fgvc's ``tencrop`` transform and ``predict_probs``, against the inference ceiling / 10;
then ``torch.compile`` for stage 1 and 10-crop prediction (by default only where compiling is cheap: ResNet-50 on CUDA).

Each row times a fixed number of batches after warm-up batches that absorb worker start-up, cuDNN autotuning and
compilation; timers are CUDA-synchronised and the peak memory counter is reset per row. Results are rewritten after
every row (a timeout keeps what was measured) as ``<out>/<device>-<date>.md`` and ``.json``.

Usage::

    python benchmarks/throughput.py                # the full GPU run (~5-6 min on one H100/H200)
    python benchmarks/throughput.py --quick        # CPU smoke run of every code path with a tiny model and tiny sizes
    python benchmarks/throughput.py --out DIR      # write the results to DIR instead of benchmarks/results
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import gzip
import json
import math
import os
import platform
import re
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from multiprocessing.pool import ThreadPool
from pathlib import Path
from typing import Any, cast

import cv2
import numpy as np
import pandas as pd
import torch
import torchvision
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, SubsetRandomSampler
from torchvision import transforms as tvt

from fgvc.config import RunConfig, config_from_dict, merge
from fgvc.data import PREFETCH_FACTOR, OnDeviceNormalize
from fgvc.datasets.base import DatasetIndex
from fgvc.engine.epochs import EpochStream, epoch_batches
from fgvc.engine.graphs import GraphedInference, GraphedTraining
from fgvc.engine.loaders import load_split, make_loader
from fgvc.engine.loop import BatchWaits, EpochStats, optimizer_step, predict_probs, train_one_epoch
from fgvc.engine.optim import build_optimizer, build_scheduler
from fgvc.engine.runtime import Runtime, setup_runtime
from fgvc.engine.sampling import EpochSampler
from fgvc.engine.stage import stage2_split
from fgvc.fileio import atomic_write_text
from fgvc.logs import log_to_console
from fgvc.models import create_model, get_meta, set_train_mode, set_trainable
from fgvc.transforms import tencrop_images_per_batch, test_resize_size

try:  # written alongside this benchmark; absent modules give "not available" rows, never a number
    from fgvc import gpu_decode
except ImportError as err:
    gpu_decode, GPU_DECODE_MISSING = None, f"fgvc.gpu_decode cannot be imported ({err})"
else:
    GPU_DECODE_MISSING = ""
try:
    from fgvc.engine import feature_cache
except ImportError as err:
    feature_cache, FEATURE_CACHE_MISSING = None, f"fgvc.engine.feature_cache cannot be imported ({err})"
else:
    FEATURE_CACHE_MISSING = ""

RESULTS_DIR = Path(__file__).resolve().parent / "results"
TRACE_MARK = "fgvc-bench: traced epoch"  # the main thread's outermost event
DEVICE_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")  # chrome-trace categories of work on the device
TRACE_BATCHES = 10  # batches (steps) in a --trace epoch: enough to see a pattern, a few MB of trace
REFERENCE_SLOWDOWN = 1.5  # expected fgvc / reference speed, only used to size the reference's timing window

# Measurement names: the rows of the table, and the keys of ratios and targets.
CEIL_TRAIN = "ceiling: train step"
CEIL_TRAIN_GRAPH = "ceiling: train step, CUDA graph"
CEIL_INFER = "ceiling: inference"
S1 = "stage 1 e2e"
S1_GPU = "stage 1 e2e, GPU decode"
S1_GPU_GRAPH = "stage 1 e2e, GPU decode, CUDA graph"
REF = "reference loop (PIL, fp32, NCHW)"
S2 = "stage 2 epoch (bn+fc, test DA)"
INFER = "inference pass (same loader)"
S2_C1 = "stage 2 cached: epoch 1 (cache + tail)"
S2_C2 = "stage 2 cached: epoch 2+"
TEN = "10-crop predict"
S1_COMP = "stage 1 e2e, compiled"
S1_GPU_COMP = "stage 1 e2e, GPU decode, compiled"
TEN_COMP = "10-crop predict, compiled"
TEN_GRAPH = "10-crop predict, CUDA graph"


# ---------------------------------------------------------------------------------------------------------------------
# What is measured, and at which sizes


@dataclass(frozen=True)
class ModelCase:
    """One architecture at the resolutions the issue names."""

    arch: str
    label: str
    train_res: int
    test_res: int
    batch: int
    cheap_compile: bool  # compiled by default (--compile auto) on CUDA
    gpu_decode: bool  # also measure stage 1 with the JPEGs decoded on the device


@dataclass(frozen=True)
class Sizes:
    """How much data and how many steps: the only difference between the full run and ``--quick``."""

    images: int  # distinct JPEGs generated (tiled when a window needs more)
    width: int
    height: int
    classes: int
    ceiling_warmup: int  # steps
    ceiling_steps: int  # at least; a ceiling window also lasts about `seconds`
    warmup_batches: int  # per end-to-end row, before the timed epoch
    seconds: float  # wanted length of a timed window (end-to-end rows: at the ceiling's speed)
    min_batches: int
    max_images: int  # cap on one window (CPU-bound rows run slower than the ceiling that sized them)


FULL_CASES = (
    ModelCase("senet154", "SENet-154", 448, 672, 32, cheap_compile=False, gpu_decode=False),
    ModelCase("inceptionresnetv2", "InceptionResNet-V2", 491, 681, 32, cheap_compile=False, gpu_decode=False),
    ModelCase("resnet50", "ResNet-50", 224, 384, 128, cheap_compile=True, gpu_decode=True),
)
QUICK_CASES = (ModelCase("timm:test_resnet", "timm test_resnet", 32, 48, 8, cheap_compile=True, gpu_decode=True),)
FULL = Sizes(3000, 800, 600, 50, ceiling_warmup=5, ceiling_steps=20, warmup_batches=3, seconds=6.0, min_batches=10,
             max_images=16_000)  # fmt: skip
QUICK = Sizes(64, 96, 72, 4, ceiling_warmup=1, ceiling_steps=2, warmup_batches=1, seconds=0.0, min_batches=2,
              max_images=16_000)  # fmt: skip


@dataclass(frozen=True)
class RatioRule:
    """``ratio = img/s of numerator / (img/s of denominator * scale)`` for one row, within one model."""

    numerator: str
    denominator: str
    meaning: str
    scale: float = 1.0
    or_faster: str = ""  # another denominator row: the faster of the two divides


# Time ratios over the same images are written as inverse throughput ratios (t_a / t_b = rate_b / rate_a).
RATIOS: dict[str, RatioRule] = {
    S1: RatioRule(S1, CEIL_TRAIN, "÷ ceiling train step"),
    S1_GPU: RatioRule(S1_GPU, CEIL_TRAIN, "÷ ceiling train step"),
    CEIL_TRAIN_GRAPH: RatioRule(CEIL_TRAIN_GRAPH, CEIL_TRAIN, "÷ eager ceiling train step"),
    S1_GPU_GRAPH: RatioRule(S1_GPU_GRAPH, CEIL_TRAIN_GRAPH, "÷ the faster ceiling train step (graphed or eager)",
                            or_faster=CEIL_TRAIN),
    REF: RatioRule(S1, REF, "fgvc stage 1 e2e ÷ this"),
    S2: RatioRule(INFER, S2, "epoch time ÷ inference pass time"),
    INFER: RatioRule(INFER, CEIL_INFER, "÷ ceiling inference"),
    S2_C1: RatioRule(S2, S2_C1, "epoch time ÷ uncached epoch time"),
    S2_C2: RatioRule(S2_C1, S2_C2, "epoch time ÷ cached epoch 1 time"),
    TEN: RatioRule(TEN, CEIL_INFER, "÷ (ceiling inference / 10)", scale=0.1),
    S1_COMP: RatioRule(S1_COMP, S1, "÷ eager stage 1 e2e"),
    S1_GPU_COMP: RatioRule(S1_GPU_COMP, S1_GPU, "÷ eager stage 1 e2e, GPU decode"),
    TEN_COMP: RatioRule(TEN_COMP, TEN, "÷ eager 10-crop"),
    TEN_GRAPH: RatioRule(TEN_GRAPH, TEN, "÷ eager 10-crop"),
}

# The issue's targets: (measurement, arch or None for every model) -> (comparison, value). ResNet-50's is set on the
# options made for a model that fast: GPU decoding ("CPU decoding cannot feed it") and the training step replayed from
# CUDA graphs (runtime.cuda_graph_train), against a ceiling replayed the same way. Its CPU-decoding and eager
# GPU-decoding rows are shown without a target.
TARGETS: dict[tuple[str, str | None], tuple[str, float]] = {
    (S1, "senet154"): (">=", 0.90),
    (S1, "inceptionresnetv2"): (">=", 0.90),
    (S1_GPU_GRAPH, "resnet50"): (">=", 0.80),
    (REF, "senet154"): (">=", 1.40),
    (S2, None): ("<=", 1.10),
    (TEN, None): (">=", 0.90),
}


# ---------------------------------------------------------------------------------------------------------------------
# Results


@dataclass
class Measured:
    """What one timed window produced; ``status`` other than "ok" explains why there is no number."""

    images: int = 0
    seconds: float = 0.0
    peak_gib: float | None = None
    warmup_s: float | None = None
    status: str = "ok"
    note: str = ""
    pinned_new_blocks: int | None = None  # blocks the pinned-host pool created inside the timed window (CUDA only)
    pinned_freed_blocks: int | None = None  # cached pinned blocks handed back to CUDA inside the window
    pinned_alloc_ms: float | None = None  # time spent in CUDA's pinned allocations inside the window

    @classmethod
    def missing(cls, status: str) -> Measured:
        return cls(status=status)


MeasureFn = Callable[[], dict[str, Measured]]


@dataclass
class Row:
    """One line of the table, with the raw numbers behind it."""

    arch: str
    model: str
    res: int
    measurement: str
    images: int | None = None
    seconds: float | None = None
    peak_gib: float | None = None
    warmup_s: float | None = None
    status: str = "ok"
    note: str = ""
    ratio: float | None = None
    ratio_is: str = ""
    target: str = ""
    met: bool | None = None
    pinned_new_blocks: int | None = None
    pinned_freed_blocks: int | None = None
    pinned_alloc_ms: float | None = None

    @property
    def img_per_s(self) -> float | None:
        if self.status != "ok" or not self.images or not self.seconds:
            return None
        return self.images / self.seconds


def apply_ratios(rows: Sequence[Row]) -> None:
    """Fill ratio, target and met? from the other rows of the same model (baselines may come after the row)."""
    rates = {(row.arch, row.measurement): row.img_per_s for row in rows}
    for row in rows:
        rule = RATIOS.get(row.measurement)
        target = TARGETS.get((row.measurement, row.arch)) or TARGETS.get((row.measurement, None))
        row.target = f"{target[0]} {target[1]:.2f}" if target else ""
        row.ratio_is = rule.meaning if rule else ""
        row.ratio, row.met = None, None
        if rule is None:
            continue
        numerator, denominator = rates.get((row.arch, rule.numerator)), rates.get((row.arch, rule.denominator))
        if rule.or_faster:  # the faster of the two that were measured
            denominator = max(filter(None, [denominator, rates.get((row.arch, rule.or_faster))]), default=None)
        if numerator and denominator:
            row.ratio = numerator / (denominator * rule.scale)
            if target:
                row.met = row.ratio >= target[1] if target[0] == ">=" else row.ratio <= target[1]


def _rate(value: float | None) -> str:
    """Images/s: whole numbers from 100 up, three significant digits below (CPU smoke runs)."""
    if value is None:
        return "—"
    return f"{value:.0f}" if value >= 100 else f"{value:.3g}"


def _fixed(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def markdown_table(rows: Sequence[Row]) -> str:
    head = "| model | res | measurement | img/s | peak GiB | ratio | ratio is | target | met? | note |"
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for row in rows:
        met = {True: "yes", False: "**no**", None: ""}[row.met]
        note = row.note if row.status == "ok" else f"{row.status}. {row.note}".strip(". ")
        cells = [row.model, str(row.res), row.measurement, _rate(row.img_per_s), _fixed(row.peak_gib),
                 _fixed(row.ratio), row.ratio_is, row.target, met, note.replace("|", "/")]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------------
# Synthetic JPEGs like the competitions ship


def _write_jpeg(job: tuple[str, int, int, int]) -> int:
    """One photo-like JPEG (smooth noise over four octaves plus sensor grain, quality 90); returns its size.

    Pure smooth noise compresses to a few KB; the octaves and the grain bring an 800x600 file to ~100 KB, so decoding
    costs what it costs on real photos.
    """
    path, seed, width, height = job
    rng = np.random.default_rng(seed)
    image = np.full((height, width, 3), 128.0, np.float32)
    for cells, amplitude in ((3, 70.0), (12, 40.0), (48, 22.0), (160, 10.0)):
        grid = rng.standard_normal((max(2, round(cells * height / width)), cells, 3), dtype=np.float32) * amplitude
        image += cv2.resize(grid, (width, height), interpolation=cv2.INTER_CUBIC)
    image += rng.standard_normal(image.shape, dtype=np.float32) * 3.0
    ok, encoded = cv2.imencode(".jpg", cv2.convertScaleAbs(image), [cv2.IMWRITE_JPEG_QUALITY, 90])
    if not ok:
        raise RuntimeError(f"OpenCV could not encode {path}")
    Path(path).write_bytes(encoded.tobytes())
    return len(encoded)


def generate_jpegs(root: Path, sizes: Sizes) -> float:
    """Write ``root/train/<class>/*.jpg`` (fgvc's generic ``folder`` layout) in parallel; returns the mean KB."""
    return write_photos(root, sizes.images, sizes.width, sizes.height, sizes.classes)[1]


def write_photos(root: Path, count: int, width: int, height: int, classes: int = 1) -> tuple[list[str], float]:
    """Write ``count`` photo-like JPEGs as ``root/train/<class>/*.jpg`` in parallel: their paths, and the mean KB."""
    jobs = []
    for i in range(count):
        folder = root / "train" / f"class_{i % classes:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        jobs.append((str(folder / f"img_{i:05d}.jpg"), i, width, height))
    # Threads, not forked processes: OpenCV and NumPy release the GIL for the heavy parts, and a fork of a process that
    # already runs torch's and OpenCV's thread pools can deadlock in the child (it hung a test run here).
    threads = cv2.getNumThreads()
    cv2.setNumThreads(1)  # one OpenCV thread per writer
    try:
        with ThreadPool(min(16, os.cpu_count() or 1)) as pool:
            written = pool.map(_write_jpeg, jobs, chunksize=16)
    finally:
        cv2.setNumThreads(threads)
    return [job[0] for job in jobs], float(np.mean(written)) / 1024 if written else 0.0


def sized_index(index: DatasetIndex, count: int) -> DatasetIndex:
    """``count`` rows of the index in a fixed shuffled order, the files repeated when more rows than files are needed.

    Repeating is honest for throughput: every row is still decoded and augmented from its file.
    """
    base = index.frame.sample(frac=1.0, random_state=0)
    reps = math.ceil(count / len(base))
    frame = pd.concat([base] * reps, ignore_index=True).iloc[:count].reset_index(drop=True)
    return dataclasses.replace(index, frame=frame)


# ---------------------------------------------------------------------------------------------------------------------
# Timing


@dataclass
class Timer:
    seconds: float = 0.0
    peak_gib: float | None = None


def _sync(rt: Runtime) -> None:
    if rt.device.type == "cuda":
        torch.cuda.synchronize(rt.device)


@contextmanager
def measure(rt: Runtime) -> Iterator[Timer]:
    """Wall time of the block with the device drained at both ends, and the peak memory allocated inside it."""
    timer = Timer()
    _sync(rt)
    if rt.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(rt.device)
    started = time.perf_counter()
    yield timer
    _sync(rt)
    timer.seconds = time.perf_counter() - started
    if rt.device.type == "cuda":
        timer.peak_gib = torch.cuda.max_memory_allocated(rt.device) / 2**30


def pinned_counters(rt: Runtime) -> dict[str, float]:
    """The CUDA pinned-host pool's running totals: blocks created, blocks handed back, microseconds spent creating
    them (empty off CUDA; a counter this torch lacks is absent)."""
    if rt.device.type != "cuda" or not hasattr(torch.cuda, "host_memory_stats"):
        return {}
    stats = torch.cuda.host_memory_stats()
    keys = {"new": "num_host_alloc", "freed": "num_host_free", "alloc_us": "host_alloc_time.total"}
    return {name: float(stats[key]) for name, key in keys.items() if key in stats}


def grow_pinned_pool(rt: Runtime, batch_nbytes: int, workers: int, batch: int, extra: Sequence[int] = ()) -> None:
    """Grow the pinned-host pool for batches of ``batch_nbytes`` as far as a loader's first epoch grows it.

    The loader's pin thread holds one pinned block per tensor of each batch it has ready (up to ``PREFETCH_FACTOR`` x
    workers batches), and the pool keeps its blocks, in power-of-two sizes, for the rest of the process. A run grows
    it once, in its first epoch; a 3-batch warm-up does not, so without this the first window of each size in the
    whole benchmark (in the 2026-11-26 runs: SENet-154's stage-2 epoch, 41 MiB batches, the only stage-2 row above its
    target) pays ~30 ``cudaHostAlloc`` calls that the rows after it do not. The windows measure an epoch of a run, not
    its first one. Until 2026-11-27 only the images' blocks were grown, not those of the batch's labels and rows
    (``batch`` int64 each) or of ``extra`` tensors (a ten-crop batch's offsets): a possible source of the 8-283 blocks
    the pool still created inside the 2026-11-27 windows. Another: the pool recycles freed blocks only up to the oldest
    one whose last copy the device has not finished (``process_events`` stops there), so a host running ahead of the
    device can make new blocks while finished ones wait behind it.
    """
    if rt.device.type != "cuda" or workers <= 0:
        return
    count = PREFETCH_FACTOR * workers + 2
    sizes = [batch_nbytes, 8 * batch, 8 * batch, *extra]
    blocks = [torch.empty(size, dtype=torch.uint8, pin_memory=True) for size in sizes for _ in range(count)]
    del blocks  # never used by a copy: straight back to the pool's free list


def timed_epochs(rt: Runtime, run_epoch: Callable[[int, int], int], warmup: int, batches: int) -> Measured:
    """A warm-up epoch of ``warmup`` batches, then a timed epoch of ``batches``; ``run_epoch(epoch, n)`` -> images.

    Both are complete epochs (the sampler starts late instead of the loop stopping early), so the timed epoch starts
    with persistent workers and an empty prefetch queue, as every epoch of a real run does.
    """
    started = time.perf_counter()
    run_epoch(0, warmup)
    _sync(rt)
    warmup_s = time.perf_counter() - started
    before = pinned_counters(rt)
    with measure(rt) as timer:
        images = run_epoch(1, batches)
    after = pinned_counters(rt)

    def delta(name: str) -> float | None:
        return after[name] - before[name] if name in before and name in after else None

    new, freed, alloc_us = delta("new"), delta("freed"), delta("alloc_us")
    return Measured(images, timer.seconds, timer.peak_gib, warmup_s,
                    pinned_new_blocks=None if new is None else int(new),
                    pinned_freed_blocks=None if freed is None else int(freed),
                    pinned_alloc_ms=None if alloc_us is None else alloc_us / 1e3)  # fmt: skip


def median_round(rounds: Sequence[Measured]) -> Measured:
    """The round with the median time (the faster middle one of an even count), its note listing every round."""
    ranked = sorted(rounds, key=lambda measured: measured.seconds)
    chosen = ranked[(len(ranked) - 1) // 2]
    times = " / ".join(f"{measured.seconds:.2f}" for measured in rounds)
    spread = (ranked[-1].seconds - ranked[0].seconds) / statistics.median(m.seconds for m in rounds) if rounds else 0
    summary = f"median of {len(rounds)} alternating rounds ({times} s, spread {spread:.0%})"
    return dataclasses.replace(chosen, note=f"{chosen.note}; {summary}" if chosen.note else summary)


def waited_note(wait_s: float, first_s: float, seconds: float) -> str:
    """Where an end-to-end epoch lost time to its loader: the host's wait for batches, and the first batch's part.

    Read with the ratio: a row below its target with a small wait lost its time on the device side.
    """
    share = wait_s / seconds if seconds > 0 else 0.0
    return f"waited for data {share:.0%} of the epoch, {first_s:.2f} s of it for the first batch"


def traced_epoch(rt: Runtime, run_epoch: Callable[[int, int], int], batches: int, path: Path | None) -> str:
    """One more epoch of ``batches`` under torch.profiler: the device's work per batch, the host's launches and waits.

    Why: an end-to-end row below its ceiling with little wait for data lost its time between the loader's batch and
    the device, which the ratios alone cannot show. The device time per batch, set against the ceiling's traced steps,
    says whether the device did more work than the model (extra copies or kernels) or simply waited for the host.
    The profiler slows every launch on the host, so a loop that reads results back each batch (fgvc's) looks launch-
    bound here even where it is not: the traced wall time is not comparable to the rows, the device time is. The
    chrome trace goes to ``path`` (gzipped), when given, for a closer look.
    """
    from torch.profiler import ProfilerActivity, profile, record_function

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if rt.device.type == "cuda" else [])
    _sync(rt)
    with profile(activities=activities) as prof, record_function(TRACE_MARK):
        images = run_epoch(2, batches)
        _sync(rt)
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        text = trace.read_text()
    if path is not None:
        with gzip.open(path, "wt") as out:
            out.write(text)
    return trace_summary(json.loads(text), batches, images) + (f"; trace {path.name}" if path else "")


def trace_summary(trace: dict[str, Any], batches: int, images: int) -> str:
    """The numbers :func:`traced_epoch` reports, read from a chrome trace as torch.profiler exports it.

    Launches and loader reads are counted on every host thread: a training step's backward kernels are launched from
    autograd's own thread, and with ``decode: gpu`` the loader is read by the prefetching thread.
    """
    spans = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X"]
    mark = next(e for e in spans if e.get("name") == TRACE_MARK and e.get("cat") == "user_annotation")
    device = sorted((e["ts"], e["ts"] + e["dur"]) for e in spans if e.get("cat") in DEVICE_CATEGORIES)
    busy, reach = 0.0, -math.inf
    for start, end in device:  # the union of the device's kernel and copy intervals
        busy += max(0.0, end - max(start, reach))
        reach = max(reach, end)
    host = [e for e in spans if e.get("cat") not in DEVICE_CATEGORIES and e is not mark]
    waits = sorted((e["ts"], e["dur"]) for e in host if "DataLoader" in e.get("name", ""))
    launches = sum(1 for e in host if e.get("cat") in ("cuda_runtime", "cuda_driver") and "Launch" in e.get("name", ""))
    per = max(batches, 1)
    first = waits[0][1] / 1e3 if waits else 0.0
    later = sum(dur for _ts, dur in waits[1:]) / 1e3 / max(len(waits) - 1, 1)
    seconds, share = mark["dur"] / 1e6, busy / max(mark["dur"], 1)
    return (f"traced epoch (profiler on): {images} images, {seconds:.2f} s; device work {busy / 1e3 / per:.1f} ms per "
            f"batch, busy {share:.0%}; {launches / per:.0f} kernel launches per batch; loader next "
            f"{first:.0f} ms for the first batch, {later:.1f} ms for each later one")


def steps_epoch(step: Callable[[], None], batch: int) -> Callable[[int, int], int]:
    """A ceiling's ``step`` as ``run_epoch(epoch, n) -> images``, for :func:`traced_epoch`."""

    def run_epoch(_epoch: int, n_batches: int) -> int:
        for _ in range(n_batches):
            step()
        return n_batches * batch

    return run_epoch


def timed_steps(
    rt: Runtime, step: Callable[[], None], warmup: int, steps: int, batch: int, seconds: float = 0.0
) -> Measured:
    """``warmup`` steps, then a timed window of at least ``steps`` steps and about ``seconds`` long.

    The window is as long as the end-to-end rows' windows: a ceiling timed over a second or less swings with the
    clocks (two H200 runs gave InceptionResNet-V2 252 and 443 img/s over 20 steps).
    """
    started = time.perf_counter()
    for _ in range(warmup):
        step()
    _sync(rt)
    probe = time.perf_counter()
    step()
    _sync(rt)
    step_s = time.perf_counter() - probe
    warmup_s = time.perf_counter() - started
    steps = max(steps, math.ceil(seconds / max(step_s, 1e-6)))
    with measure(rt) as timer:
        for _ in range(steps):
            step()
    return Measured(steps * batch, timer.seconds, timer.peak_gib, warmup_s)


# ---------------------------------------------------------------------------------------------------------------------
# The benchmark run: rows, budget, files


def cpu_model() -> str:
    """The host CPU's model name: the rows that launch many small kernels depend on it as much as on the GPU."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def device_name(rt: Runtime) -> str:
    if rt.device.type == "cuda":
        return torch.cuda.get_device_name(rt.device)
    cpu = platform.processor() or platform.machine()
    try:
        models = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")]  # fmt: skip
        cpu = models[0] if models else cpu
    except OSError:
        pass
    return f"CPU {cpu} ({os.cpu_count()} logical cores)"


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60] or "device"


class Bench:
    """Runs measurements as rows under a wall-time budget and rewrites the result files after every row."""

    def __init__(self, args: argparse.Namespace, sizes: Sizes, rt: Runtime, workers: int, started: float) -> None:
        self.args, self.sizes, self.rt, self.workers = args, sizes, rt, workers
        self.rows: list[Row] = []
        self.failures = 0
        self.skipped_steps = skipped_steps(args)
        self.started = started  # the budget counts from here (the start of main)
        self.device = device_name(rt)
        stamp = datetime.now()
        self.date = stamp.isoformat(timespec="seconds")
        out = Path(args.out) if args.out else RESULTS_DIR
        self.base = out / f"{slug(self.device) if rt.device.type == 'cuda' else 'cpu'}-{stamp:%Y-%m-%d-%H%M%S}"
        self.notes: list[str] = []

    def log(self, message: str) -> None:
        print(f"[{time.perf_counter() - self.started:6.1f} s {datetime.now():%H:%M:%S}] {message}", flush=True)

    def rate(self, arch: str, measurement: str) -> float | None:
        found = [row.img_per_s for row in self.rows if row.arch == arch and row.measurement == measurement]
        return found[-1] if found else None

    def window(self, rate_hint: float | None, batch: int, seconds: float, max_images: int) -> int:
        """Timed batches for a window of about ``seconds`` at ``rate_hint`` img/s, within the size limits."""
        wanted = math.ceil(rate_hint * seconds / batch) if rate_hint else 0
        return max(self.sizes.min_batches, min(wanted, max_images // batch))

    def trace(self, case: ModelCase, name: str, run_epoch: Callable[[int, int], int], batches: int) -> None:
        """With ``--trace``: profile one more epoch (ceilings: steps) of the row just measured; see traced_epoch."""
        if not self.args.trace:
            return
        path = None  # a ceiling's summary is what it is compared by; its trace would be the largest
        if name not in (CEIL_TRAIN, CEIL_TRAIN_GRAPH, CEIL_INFER):
            path = self.base.parent / f"{self.base.name}-trace-{slug(case.label)}-{slug(name)}.json.gz"
            path.parent.mkdir(parents=True, exist_ok=True)
        summary = traced_epoch(self.rt, run_epoch, min(batches, TRACE_BATCHES), path)
        self.log(f"  {name}: {summary}")
        self.notes.append(f"{case.label}, {name}: {summary}")

    def over_budget(self) -> bool:
        return time.perf_counter() - self.started > self.args.budget_s

    def budget_status(self) -> str:
        return f"skipped: time budget of {self.args.budget_s:.0f} s spent (--budget-s)"

    def run(self, case: ModelCase, res: int, names: Sequence[str], measure_fn: MeasureFn) -> None:
        """Run one measurement that yields the rows ``names``; a failure becomes failed rows and the run goes on."""
        if self.over_budget():
            for name in names:
                self.add(case, res, name, Measured.missing(self.budget_status()))
            return
        self.log(f"{case.label} @{res}: {', '.join(names)} ...")
        try:
            results = measure_fn()
        except Exception as err:  # a benchmark records what broke and measures the rest
            traceback.print_exc()
            message = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
            results = {name: Measured.missing(f"failed: {type(err).__name__}: {message}") for name in names}
        finally:
            gc.collect()
            if self.rt.device.type == "cuda":
                torch.cuda.empty_cache()
        for name in names:
            self.add(case, res, name, results.get(name) or Measured.missing("failed: not measured"))

    def add(self, case: ModelCase, res: int, name: str, measured: Measured) -> None:
        row = Row(arch=case.arch, model=case.label, res=res, measurement=name, status=measured.status,
                  note=measured.note, peak_gib=measured.peak_gib, warmup_s=measured.warmup_s,
                  pinned_new_blocks=measured.pinned_new_blocks, pinned_freed_blocks=measured.pinned_freed_blocks,
                  pinned_alloc_ms=measured.pinned_alloc_ms)  # fmt: skip
        if measured.pinned_new_blocks:  # each one a cudaHostAlloc inside the timed window
            spent = f", {measured.pinned_alloc_ms:.0f} ms allocating" if measured.pinned_alloc_ms is not None else ""
            grew = f"pinned pool grew {measured.pinned_new_blocks} blocks{spent}"
            row.note = f"{row.note}; {grew}" if row.note else grew
        if measured.status == "ok":
            row.images, row.seconds = measured.images, measured.seconds
        elif measured.status.startswith("failed"):
            self.failures += 1
        self.rows.append(row)
        apply_ratios(self.rows)
        if row.status == "ok":
            peak = f", peak {row.peak_gib:.2f} GiB" if row.peak_gib is not None else ""
            warm = f", warm-up {row.warmup_s:.1f} s" if row.warmup_s is not None else ""
            self.log(f"  {name}: {row.img_per_s:.1f} img/s ({row.images} images in {row.seconds:.2f} s{warm}{peak})")
        else:
            self.log(f"  {name}: {row.status}")
        self.write(finished=False)

    def summary(self) -> str:
        judged = [row for row in self.rows if row.target]
        met = sum(row.met is True for row in judged)
        return f"targets met: {met} of {len(judged)} (rows without a measured ratio count as not met)"

    def markdown(self) -> str:
        rt = self.rt
        precision = {None: "fp32", torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast"}[rt.amp_dtype]
        layout = "channels_last" if rt.channels_last else "NCHW"
        header = [
            f"# fgvc throughput: {self.device}",
            "",
            f"{self.date}; torch {torch.__version__}, torchvision {torchvision.__version__}; fgvc runs {precision}, "
            f"{layout}; {self.workers} loader workers for fgvc and the reference; {os.cpu_count()} CPUs "
            f"({cpu_model()}); "
            f"{self.sizes.images} generated {self.sizes.width}x{self.sizes.height} JPEGs; "
            f"command: `{' '.join(['python', *sys.argv])}`",
            "",
        ]
        notes = [f"- {note}" for note in self.notes]
        return "\n".join([*header, markdown_table(self.rows), "", self.summary(), "", *notes, ""])

    def write(self, finished: bool) -> None:
        self.base.parent.mkdir(parents=True, exist_ok=True)
        raw = {
            "device": self.device,
            "date": self.date,
            "finished": finished,
            "elapsed_s": round(time.perf_counter() - self.started, 1),
            "quick": self.args.quick,
            "argv": sys.argv,
            "torch": torch.__version__,
            "torchvision": torchvision.__version__,
            "cuda": torch.version.cuda,
            "python": platform.python_version(),
            "cpu_count": os.cpu_count(),
            "cpu_model": cpu_model(),
            "workers": self.workers,
            "runtime": self.rt.describe(),
            "sizes": dataclasses.asdict(self.sizes),
            "notes": self.notes,
            "rows": [dataclasses.asdict(row) | {"img_per_s": row.img_per_s} for row in self.rows],
        }
        atomic_write_text(self.base.with_suffix(".json"), json.dumps(raw, indent=2))
        atomic_write_text(self.base.with_suffix(".md"), self.markdown())


# ---------------------------------------------------------------------------------------------------------------------
# One model's measurements


def graph_checked(measured: Measured, net: GraphedTraining, timed_steps: int) -> Measured:
    """A row meant to replay its training steps from CUDA graphs: a failed row, without a rate, unless the graphs were
    captured and (``timed_steps`` > 0) replayed every timed step. Otherwise its ratio would judge eager steps."""
    if not net.captured:
        return Measured.missing(f"failed: no graph: {net.eager_reason or 'no step was captured'}")
    if net.replays < timed_steps:
        return Measured.missing(f"failed: {net.replays} of the {timed_steps} timed steps replayed from CUDA graphs")
    replayed = f"{timed_steps} timed steps" if timed_steps else "every timed step"
    measured.note = "; ".join(filter(None, [measured.note, f"{replayed} replayed from CUDA graphs"]))
    return measured


def gpu_decode_unavailable(rt: Runtime) -> str:
    """Why JPEGs cannot be decoded on this device, or "" when they can."""
    if gpu_decode is None:
        return f"not available: {GPU_DECODE_MISSING}"
    if not gpu_decode.gpu_decode_available(rt.device):
        return f"not available: decoding JPEGs on the device needs CUDA with nvJPEG (device: {rt.device})"
    return ""


class CaseRun:
    """The measurements of one model; all of them use fgvc's own config, loaders, loops and optimiser."""

    def __init__(self, bench: Bench, case: ModelCase, cfg: RunConfig, index: DatasetIndex, data_root: Path) -> None:
        self.bench, self.case, self.cfg, self.index, self.data_root = bench, case, cfg, index, data_root
        self.rt = bench.rt
        self.sizes = bench.sizes
        self.model = create_model(cfg.model.arch, index.num_classes, None)  # random init: speed needs no weights
        self.model.to(self.rt.device, memory_format=self.rt.memory_format)
        self.meta = get_meta(self.model)
        self.prepare = OnDeviceNormalize(self.meta.mean, self.meta.std, self.rt.device, self.rt.channels_last)

    # -- helpers --------------------------------------------------------------------------------------------------

    def rate(self, measurement: str) -> float | None:
        return self.bench.rate(self.case.arch, measurement)

    def synthetic(self, res: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        images = torch.randint(0, 256, (batch, 3, res, res), dtype=torch.uint8, device=self.rt.device)
        labels = torch.randint(0, self.index.num_classes, (batch,), device=self.rt.device)
        return images, labels

    def training_parts(self, stage: str, steps_per_epoch: int) -> tuple[Any, Any, Any, nn.Module]:
        """Optimizer, scheduler, scaler and loss exactly as ``train_stage`` builds them for ``stage``."""
        stage_cfg = self.cfg.stage1 if stage == "stage1" else self.cfg.stage2
        set_trainable(self.model, stage_cfg.tune)
        optimizer = build_optimizer(self.model, stage_cfg, stage_cfg.resolved_lr(self.rt.world_size))
        scheduler = build_scheduler(optimizer, stage_cfg, steps_per_epoch) if optimizer else None
        scaler = torch.amp.GradScaler("cuda") if self.rt.needs_grad_scaler and optimizer else None
        return optimizer, scheduler, scaler, nn.CrossEntropyLoss(label_smoothing=stage_cfg.label_smoothing)

    def compiled(self) -> nn.Module:
        return torch.compile(self.model)

    # -- (a) ceilings ---------------------------------------------------------------------------------------------

    def ceiling_train(self, graphed: bool = False) -> dict[str, Measured]:
        """fgvc's train step on batches already on the device; ``graphed``: replayed as runtime.cuda_graph_train
        replays it (the warm-up steps include the capture)."""
        s1 = self.cfg.stage1
        images, labels = self.synthetic(s1.res, s1.batch_size)
        optimizer, _scheduler, scaler, criterion = self.training_parts("stage1", 1)
        set_train_mode(self.model, s1.tune)
        net = GraphedTraining(self.model, self.rt.amp_dtype) if graphed else self.model

        def step() -> None:
            with self.rt.autocast():
                loss = criterion(net(self.prepare(images)), labels)
            (scaler.scale(loss) if scaler else loss).backward()
            optimizer_step(optimizer, scaler)

        sizes = self.sizes
        measured = timed_steps(self.rt, step, sizes.ceiling_warmup, sizes.ceiling_steps, s1.batch_size, sizes.seconds)
        name = CEIL_TRAIN_GRAPH if graphed else CEIL_TRAIN
        if isinstance(net, GraphedTraining):  # captured in the warm-up: every timed step replays, unless it gave up
            measured = graph_checked(measured, net, 0)
        self.bench.trace(self.case, name, steps_epoch(step, s1.batch_size), measured.images // s1.batch_size)
        return {name: measured}

    def ceiling_infer(self) -> dict[str, Measured]:
        res, batch = self.cfg.stage2.res, self.case.batch
        images, _labels = self.synthetic(res, batch)
        self.model.eval()

        def step() -> None:
            with torch.no_grad(), self.rt.autocast():
                self.model(self.prepare(images))

        sizes = self.sizes
        measured = timed_steps(self.rt, step, sizes.ceiling_warmup, sizes.ceiling_steps, batch, sizes.seconds)
        self.bench.trace(self.case, CEIL_INFER, steps_epoch(step, batch), measured.images // batch)
        return {CEIL_INFER: measured}

    # -- (b) stage 1 end to end -----------------------------------------------------------------------------------

    def stage1(self, decode: str = "cpu", compiled: bool = False, graphed: bool = False) -> dict[str, Measured]:
        """fgvc's stage-1 epochs over the generated JPEGs; ``graphed``: with runtime.cuda_graph_train (captured in the
        warm-up epoch), measured with GPU decoding only."""
        if graphed and (compiled or decode != "gpu"):
            raise ValueError("the CUDA-graph stage-1 row decodes on the GPU and is not compiled")
        s1, sizes = self.cfg.stage1, self.sizes
        # a graphed row captures at its second batch: in the warm-up epoch, so that the timed one only replays
        warmup = max(sizes.warmup_batches, 2) if graphed else sizes.warmup_batches
        batch = s1.batch_size
        batches = self.bench.window(self.rate(CEIL_TRAIN), batch, sizes.seconds, sizes.max_images)
        batches = max(batches, warmup + 1)
        index = sized_index(self.index, batches * batch)  # the timed epoch is a whole epoch of this index
        loader, sampler, prepare = make_loader(self.cfg, self.rt, index, s1.augment, s1.res, batch, True, self.meta,
                                               decode)  # fmt: skip
        # As train_stage reads its epochs: one loader iterator for the warm-up epoch (its last batches, a resume's
        # start) and the timed one, so the workers load the timed epoch while the warm-up ends.
        stream = EpochStream(loader, 0, 2, start=(batches - warmup) * batch)
        workers = self.cfg.data.workers
        how = f"nvJPEG + augmentation on the device, {workers} workers read bytes" if decode == "gpu" else (
            f"OpenCV + albumentations in {workers} workers")  # fmt: skip
        optimizer, scheduler, scaler, criterion = self.training_parts("stage1", epoch_batches(loader).batches_in())
        net = self.compiled() if compiled else GraphedTraining(self.model, self.rt.amp_dtype) if graphed else self.model
        if decode == "cpu":  # uint8 (B, 3, res, res) batches through the pin thread
            grow_pinned_pool(self.rt, batch * 3 * s1.res**2, workers, batch)

        last: list[EpochStats] = []

        def run_epoch(epoch: int, n_batches: int) -> int:
            sampler.set_epoch(epoch, start=len(index) - n_batches * batch)
            epoch_batches: Any = stream.epoch(epoch) if epoch < stream.last else loader  # --trace: a later epoch
            assert len(epoch_batches) == n_batches, (epoch, len(epoch_batches), n_batches)
            set_train_mode(self.model, s1.tune)
            if isinstance(net, GraphedTraining):
                net.replays = 0  # the note counts the timed epoch's
            stats = train_one_epoch(net, epoch_batches, optimizer, scheduler, scaler, self.rt, prepare, criterion,
                                    grad_accum=s1.grad_accum, batch_size=batch, progress=False)  # fmt: skip
            last[:] = [stats]
            return stats.images

        try:
            measured = timed_epochs(self.rt, run_epoch, warmup, batches)
        finally:  # a prefetching thread (GPU decoding) ends with the stream
            stream.close()
        stats = last[0]
        measured.note = how + ("; warm-up includes compilation" if compiled else "") + "; " + waited_note(
            stats.data_wait_s, stats.first_batch_s, stats.seconds)  # fmt: skip
        if isinstance(net, GraphedTraining):  # run_epoch counted the timed epoch's replays
            measured = graph_checked(measured, net, batches)
        name = S1_GPU_GRAPH if graphed else {(False, "cpu"): S1, (False, "gpu"): S1_GPU, (True, "cpu"): S1_COMP,
                                             (True, "gpu"): S1_GPU_COMP}[(compiled, decode)]  # fmt: skip
        self.bench.trace(self.case, name, run_epoch, batches)  # after the note: it runs the epoch function again
        return {name: measured}

    # -- (c) the public FixRes way --------------------------------------------------------------------------------

    def reference(self) -> dict[str, Measured]:
        """The reference at fgvc's batch; at half of it when fp32 does not fit (said in the note, never hidden)."""
        batch = self.cfg.stage1.batch_size
        try:
            return {REF: self.reference_at(batch)}
        except torch.cuda.OutOfMemoryError:
            pass  # retried outside the handler, so that the failed attempt's tensors are already freed
        gc.collect()
        torch.cuda.empty_cache()
        measured = self.reference_at(batch // 2)
        measured.note += f"; batch {batch // 2}: batch {batch} in fp32 ran out of GPU memory"
        return {REF: measured}

    def reference_at(self, batch: int) -> Measured:
        """ImageFolder + PIL/torchvision transforms normalised on the CPU, fp32, NCHW, plain SGD: FixRes's loop."""
        s1, sizes, rt = self.cfg.stage1, self.sizes, self.rt
        hint = self.rate(S1) or self.rate(CEIL_TRAIN)
        batches = self.bench.window(hint / REFERENCE_SLOWDOWN if hint else None, batch, sizes.seconds, sizes.max_images)
        transform = tvt.Compose([
            tvt.RandomResizedCrop(s1.res), tvt.RandomHorizontalFlip(), tvt.ColorJitter(0.3, 0.3, 0.3), tvt.ToTensor(),
            tvt.Normalize(self.meta.mean, self.meta.std),
        ])  # fmt: skip
        dataset = torchvision.datasets.ImageFolder(str(self.data_root / "train"), transform)
        sampler = SubsetRandomSampler([], generator=torch.Generator().manual_seed(0))
        workers = self.cfg.data.workers
        loader = DataLoader(dataset, batch_size=batch, sampler=sampler, num_workers=workers, drop_last=True,
                            pin_memory=rt.device.type == "cuda", persistent_workers=workers > 0)  # fmt: skip
        order = np.random.default_rng(0).permutation(len(dataset))
        grow_pinned_pool(rt, batch * 3 * s1.res**2 * 4, workers, batch)  # float32 batches
        set_trainable(self.model, "all")
        self.model.to(memory_format=torch.contiguous_format)
        optimizer = torch.optim.SGD(self.model.parameters(), lr=s1.resolved_lr(), momentum=0.9, weight_decay=1e-4)
        criterion = nn.CrossEntropyLoss()

        def run_epoch(_epoch: int, n_batches: int) -> int:
            sampler.indices = np.resize(order, n_batches * batch).tolist()
            self.model.train()
            seen = 0
            for images, labels in loader:
                images, labels = images.to(rt.device, non_blocking=True), labels.to(rt.device, non_blocking=True)
                loss = criterion(self.model(images), labels)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                loss.item()  # the reference logs the running loss every step
                seen += len(labels)
            return seen

        try:
            measured = timed_epochs(rt, run_epoch, sizes.warmup_batches, batches)
        finally:
            self.model.zero_grad(set_to_none=True)
            self.model.to(memory_format=rt.memory_format)
        measured.note = f"PIL + torchvision transforms in {workers} workers"
        return measured

    # -- (d) stage 2 ----------------------------------------------------------------------------------------------

    def stage2(self) -> dict[str, Measured]:
        """Stage-2 epochs and an inference pass over the same loader and images, then stage 2 with the feature cache.

        The two alternate over ``--stage2-rounds`` rounds (stage 2 first in odd rounds, the inference pass first in
        even ones) and each row is its median round: a cost that only the first long epoch over a loader pays cannot
        decide the ratio, and the note shows the spread that the 1.10 target is read against.
        """
        s2, sizes, rt = self.cfg.stage2, self.sizes, self.rt
        batch = s2.batch_size
        batches = self.bench.window(self.rate(CEIL_INFER), batch, sizes.seconds / 2, sizes.max_images // 2)
        index = sized_index(self.index, max(batches, sizes.warmup_batches) * batch)
        loader, sampler, prepare = make_loader(self.cfg, rt, index, s2.augment, s2.res, batch, True, self.meta)
        grow_pinned_pool(rt, batch * 3 * s2.res**2, self.cfg.data.workers, batch)
        optimizer, scheduler, scaler, criterion = self.training_parts("stage2", len(loader))
        split = self.split()
        waited: dict[str, str] = {}

        def train_epoch(epoch: int, n_batches: int) -> int:
            sampler.set_epoch(epoch, start=len(index) - n_batches * batch)
            set_train_mode(self.model, s2.tune)
            stats = train_one_epoch(self.model, loader, optimizer, scheduler, scaler, rt, prepare, criterion,
                                    grad_accum=s2.grad_accum, batch_size=batch, progress=False)  # fmt: skip
            waited[S2] = waited_note(stats.data_wait_s, stats.first_batch_s, stats.seconds)
            return stats.images

        def inference_epoch(epoch: int, n_batches: int) -> int:
            sampler.set_epoch(epoch, start=len(index) - n_batches * batch)
            waits = BatchWaits()
            started = time.perf_counter()
            _probs, rows = predict_probs(self.model, loader, rt, prepare, progress=False, waits=waits)
            waited[INFER] = waited_note(waits.seconds, waits.first, time.perf_counter() - started)
            return len(rows)

        epochs = {S2: train_epoch, INFER: inference_epoch}
        rounds: dict[str, list[Measured]] = {S2: [], INFER: []}
        for round_ in range(self.bench.args.stage2_rounds):
            for name in (S2, INFER) if round_ % 2 == 0 else (INFER, S2):
                measured = timed_epochs(rt, epochs[name], sizes.warmup_batches, batches)
                measured.note = waited[name]
                rounds[name].append(measured)
        results = {name: median_round(runs) for name, runs in rounds.items()}
        results[S2].note = f"tune {s2.tune}, augment {s2.augment}, uncached; {results[S2].note}"
        try:
            drop_last = epoch_batches(loader).drop_last
            results |= self.stage2_cached(split, index, sampler, drop_last, optimizer, scheduler, scaler,
                                          criterion)  # fmt: skip
        except Exception as err:  # the uncached numbers above still stand
            traceback.print_exc()
            failed = Measured.missing(f"failed: {type(err).__name__}: {str(err).strip()[:200]}")
            results |= {S2_C1: failed, S2_C2: failed}
        return results

    def split(self) -> Any:
        """The model cut before its stage-2 tuned part by ``train_stage``'s own rule (None where it cannot be)."""
        return stage2_split(self.cfg, self.rt, self.model, self.cfg.stage2) if feature_cache is not None else None

    def stage2_cached(
        self,
        split: Any,
        index: DatasetIndex,
        sampler: EpochSampler,
        drop_last: bool,
        optimizer: Any,
        scheduler: Any,
        scaler: Any,
        criterion: nn.Module,
    ) -> dict[str, Measured]:
        """Epoch 1 = computing the trunk's output once + a tail epoch; epoch 2 = a tail epoch (as ``train_stage``)."""
        if feature_cache is None:
            missing = Measured.missing(f"not available: {FEATURE_CACHE_MISSING}")
            return {S2_C1: missing, S2_C2: missing}
        s2, rt = self.cfg.stage2, self.rt
        if split is None:
            missing = Measured.missing(f"not available: {self.case.label} cannot be cut before its tuned part")
            return {S2_C1: missing, S2_C2: missing}
        cache_loader, _, prepare = make_loader(self.cfg, rt, index, "test", s2.res, s2.batch_size, False, self.meta)

        def tail_epoch(cache: Any, epoch: int) -> int:
            sampler.set_epoch(epoch)
            set_train_mode(self.model, s2.tune)
            stats = feature_cache.train_one_epoch_cached(split.tail, cache, sampler, s2.batch_size, drop_last,
                                                         optimizer, scheduler, scaler, rt, criterion, progress=False)
            return stats.images

        with measure(rt) as first:
            cache = feature_cache.compute_cache(split.trunk, cache_loader, prepare, rt, progress=False)
            images = tail_epoch(cache, 2)
        tail_epochs, images_again = 0, 0
        with measure(rt) as second:  # one SENet-154 tail epoch takes ~0.07 s on an H200: time ~1 s of them
            started = time.perf_counter()
            while tail_epochs == 0 or (time.perf_counter() - started < self.sizes.seconds / 6 and tail_epochs < 100):
                images_again += tail_epoch(cache, 3 + tail_epochs)
                tail_epochs += 1
        where = "device" if cache.features.device.type != "cpu" else "host"
        note = f"cut at {split.cut}, {cache.nbytes / 2**20:.3g} MiB of features on the {where}"
        return {
            S2_C1: Measured(images, first.seconds, first.peak_gib,
                            note=f"{note}; its loader's {self.cfg.data.workers} workers start inside the window"),
            S2_C2: Measured(images_again, second.seconds, second.peak_gib,
                            note=f"{note}; tail epochs timed: {tail_epochs}"),
        }

    # -- (e) 10-crop prediction -----------------------------------------------------------------------------------

    def tencrop(self, compiled: bool = False, graphed: bool = False) -> dict[str, Measured]:
        res, sizes, rt = self.cfg.stage2.res, self.sizes, self.rt
        per_batch = tencrop_images_per_batch(self.cfg.predict.batch_size)  # as predict_stage batches them
        ceiling = self.rate(CEIL_INFER)
        batches = self.bench.window(ceiling / 10 if ceiling else None, per_batch, sizes.seconds, sizes.max_images)
        index = sized_index(self.index, max(batches, sizes.warmup_batches) * per_batch)
        loader, sampler, prepare = make_loader(self.cfg, rt, index, "tencrop", res, per_batch, False, self.meta)
        net = self.compiled() if compiled else self.model
        if graphed:  # as predict_stage wraps it with runtime.cuda_graph
            net = self.primed_graph(res, per_batch * 10)
        short = test_resize_size(res, self.cfg.data.crop_pct)  # the loader ships each image's test resize once
        long = round(max(sizes.width, sizes.height) * short / min(sizes.width, sizes.height))
        grow_pinned_pool(rt, per_batch * short * long * 3, self.cfg.data.workers, per_batch,
                         extra=[per_batch * 5 * 2 * 8])  # the crops' offsets

        waits: list[BatchWaits] = []

        def run_epoch(epoch: int, n_batches: int) -> int:
            sampler.set_epoch(epoch, start=len(index) - n_batches * per_batch)
            waits[:] = [BatchWaits()]
            if isinstance(net, GraphedInference):
                net.replays = 0  # the note counts the timed epoch's
            _probs, rows = predict_probs(net, loader, rt, prepare, tta="tencrop", progress=False, waits=waits[0])
            return len(rows)

        measured = timed_epochs(rt, run_epoch, sizes.warmup_batches, batches)
        compiling = "; warm-up includes compilation" if compiled else ""
        measured.note = f"{per_batch} images x 10 views per forward{compiling}; " + waited_note(
            waits[0].seconds, waits[0].first, measured.seconds)  # fmt: skip
        name = TEN_COMP if compiled else TEN_GRAPH if graphed else TEN
        if graphed:
            measured.note += "; " + self.graph_agreement(cast(GraphedInference, net), res, per_batch * 10)
        self.bench.trace(self.case, name, run_epoch, batches)
        return {name: measured}

    def primed_graph(self, res: int, views: int) -> GraphedInference:
        """The model wrapped as ``runtime.cuda_graph`` wraps it, already captured and checked on random views of the
        10-crop batch's shape and layout.

        Why before the timed epochs and before the pinned pool is grown: a capture empties the caching allocators,
        pinned host memory included, which the timed epoch would otherwise pay for and the eager row does not. In a
        real prediction that is a one-off cost at the second batch.
        """
        net = GraphedInference(self.model, self.rt.amp_dtype)
        net.eval()
        with torch.no_grad(), self.rt.autocast():
            for _ in range(3):  # seen, captured, then replayed and checked on a batch the capture did not see
                net(self.prepare(self.synthetic(res, views)[0]))
        return net

    def graph_agreement(self, net: GraphedInference, res: int, views: int) -> str:
        """How many batches the timed epoch replayed, and how far a replay's probabilities are from the eager
        model's on one more batch of random views."""
        if not net.captured:
            return f"no graph: {net.eager_reason or 'no batch of the captured shape'}"
        replays = net.replays
        x = self.prepare(self.synthetic(res, views)[0])
        with torch.no_grad(), self.rt.autocast():
            graphed = F.softmax(net(x).float(), dim=1)
            eager = F.softmax(self.model(x).float(), dim=1)
        difference = (graphed - eager).abs().max().item()
        return f"{replays} batches of the timed epoch replayed; graph vs eager: max |probability difference| " + (
            f"{difference:.1e}")  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------------
# Driving it


def run_config(case: ModelCase, data_root: Path, out: Path, workers: int | None, device: str | None) -> RunConfig:
    """fgvc's defaults with the overrides a user would pass for this model and the generated folder dataset.

    Overrides are merged into the defaults as the CLI does, so stage 2 keeps fgvc's ``bn+fc`` / ``test`` policy.
    """
    overrides: dict[str, Any] = {
        "name": "bench", "out": str(out), "data.dataset": "folder", "data.root": str(data_root),
        "data.val_fraction": 0.0, "model.arch": case.arch, "model.weights": None, "stage1.res": case.train_res,
        "stage1.batch_size": case.batch, "stage2.res": case.test_res, "stage2.batch_size": case.batch,
        "predict.batch_size": case.batch, "runtime.device": device,
    }  # fmt: skip
    if workers is not None:
        overrides["data.workers"] = workers  # else fgvc's default, min(8, CPU count)
    return config_from_dict(merge(RunConfig().model_dump(mode="json"), overrides), source="benchmarks/throughput.py")


def compile_skip_reason(case: ModelCase, mode: str, rt: Runtime) -> str:
    """Why compiled rows are skipped for ``case`` ("" to measure them)."""
    if mode == "all":
        return ""
    if mode == "none":
        return "skipped: --compile none"
    if rt.device.type != "cuda":
        return "skipped: compile is measured on CUDA only (on the CPU it times a C++ build); --compile all forces it"
    if not (os.environ.get("CC") or shutil.which("gcc") or shutil.which("clang")):  # where Triton looks
        return "skipped: no C compiler ($CC, gcc, clang), which Triton needs to build its kernel launchers"
    if not case.cheap_compile:
        return f"skipped: compiling {case.label} takes minutes; --compile all measures it"
    return ""


Step = tuple[str, list[str], dict[str, Any]]  # CaseRun method, the rows it yields, its keyword arguments
STEP_METHODS = ("ceiling_train", "stage1", "reference", "ceiling_infer", "stage2", "tencrop")
TRAIN_RES_ROWS = {CEIL_TRAIN, CEIL_TRAIN_GRAPH, S1, S1_GPU, S1_GPU_GRAPH, REF, S1_COMP, S1_GPU_COMP}


def eager_steps(case: ModelCase) -> list[Step]:
    """(a)-(e) for one model, the rows the targets need first (a time-budget cut drops the last ones)."""
    steps: list[Step] = [("ceiling_train", [CEIL_TRAIN], {}), ("stage1", [S1], {})]
    if case.gpu_decode:  # and its training step replayed from CUDA graphs, against a ceiling replayed the same way
        steps += [("stage1", [S1_GPU], {"decode": "gpu"}), ("ceiling_train", [CEIL_TRAIN_GRAPH], {"graphed": True}),
                  ("stage1", [S1_GPU_GRAPH], {"decode": "gpu", "graphed": True})]  # fmt: skip
    steps += [("reference", [REF], {}), ("ceiling_infer", [CEIL_INFER], {}),
              ("stage2", [S2, INFER, S2_C1, S2_C2], {}), ("tencrop", [TEN], {}),
              ("tencrop", [TEN_GRAPH], {"graphed": True})]  # fmt: skip
    return steps


def compiled_steps(case: ModelCase) -> list[Step]:
    """Stage 1 compiled with the decoding its target is set on: where the loader limits a CPU-decoding run, a compiled
    model would only wait faster."""
    stage1 = ("stage1", [S1_GPU_COMP], {"compiled": True, "decode": "gpu"}) if case.gpu_decode else (
        "stage1", [S1_COMP], {"compiled": True})  # fmt: skip
    return [stage1, ("tencrop", [TEN_COMP], {"compiled": True})]


def run_steps(bench: Bench, case: ModelCase, cfg: RunConfig, index: DatasetIndex, data_root: Path,
              steps: list[Step]) -> None:  # fmt: skip
    """Run ``steps`` on one model, built at the first step that is not skipped; a failed build fails every row."""
    run: CaseRun | None = None
    for position, (method, names, kwargs) in enumerate(steps):
        res = case.train_res if names[0] in TRAIN_RES_ROWS else case.test_res
        unavailable = gpu_decode_unavailable(bench.rt) if kwargs.get("decode") == "gpu" else ""
        if kwargs.get("graphed") and bench.rt.device.type != "cuda":
            unavailable = f"not available: CUDA graphs need CUDA (device: {bench.rt.device})"
        if method in bench.skipped_steps:
            unavailable = f"skipped: --skip {method}"
        if unavailable or bench.over_budget():
            for name in names:
                bench.add(case, res, name, Measured.missing(unavailable or bench.budget_status()))
            continue
        if run is None:
            try:
                run = CaseRun(bench, case, cfg, index, data_root)
            except Exception as err:
                traceback.print_exc()
                failed = Measured.missing(f"failed: building the model: {type(err).__name__}: {err}")
                for _method, rest, _kwargs in steps[position:]:
                    for name in rest:
                        bench.add(case, case.train_res if name in TRAIN_RES_ROWS else case.test_res, name, failed)
                return
        bench.run(case, res, names, partial(getattr(run, method), **kwargs))


def run_compiled(bench: Bench, case: ModelCase, cfg: RunConfig, index: DatasetIndex, data_root: Path) -> None:
    """torch.compile rows, after every eager row: compiling is the most expensive and least essential part."""
    why = compile_skip_reason(case, bench.args.compile, bench.rt)
    if why:
        bench.add(case, case.train_res, S1_GPU_COMP if case.gpu_decode else S1_COMP, Measured.missing(why))
        bench.add(case, case.test_res, TEN_COMP, Measured.missing(why))
        return
    run_steps(bench, case, cfg, index, data_root, compiled_steps(case))
    torch._dynamo.reset()


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="CPU smoke run: tiny model, tiny images, 2 steps a row")
    parser.add_argument("--out", help=f"folder for <device>-<date>.md/.json (default {RESULTS_DIR})")
    parser.add_argument("--models", help="comma-separated architectures, measured in this order (default: all of "
                        "the run, SENet-154 first)")  # fmt: skip
    parser.add_argument("--workers", type=int, help="loader workers for fgvc and the reference (default: fgvc's)")
    parser.add_argument("--device", help="torch device (default: cuda when present; --quick: cpu)")
    parser.add_argument("--compile", choices=("auto", "all", "none"), default="auto",
                        help="auto: compile the cheap models on CUDA; all: every model; none")  # fmt: skip
    parser.add_argument("--skip", default="", help="comma-separated measurements not to run this time, listed as "
                        f"skipped in the table: {', '.join(STEP_METHODS)}")  # fmt: skip
    parser.add_argument("--stage2-rounds", type=_positive, default=3,
                        help="alternating rounds of the stage-2 epoch and the inference pass; each row is its median")
    parser.add_argument("--trace", action="store_true",
                        help="after each ceiling, stage-1 and 10-crop row, profile one more epoch: device work per "
                        "batch, kernel launches, loader waits; a gzipped chrome trace of each end-to-end row next to "
                        "the results")  # fmt: skip
    parser.add_argument("--budget-s", type=float, default=470.0,
                        help="start no new measurement after this many seconds (rows left are marked skipped)")
    return parser.parse_args(argv)


def skipped_steps(args: argparse.Namespace) -> set[str]:
    """The measurements ``--skip`` names (an unknown name ends the run before anything is generated)."""
    names = {name.strip() for name in args.skip.split(",") if name.strip()}
    unknown = sorted(names - set(STEP_METHODS))
    if unknown:
        raise SystemExit(f"--skip: unknown {', '.join(unknown)}; choose from {', '.join(STEP_METHODS)}")
    return names


def select_cases(args: argparse.Namespace) -> tuple[ModelCase, ...]:
    """The models of the run, in the order ``--models`` names them: the rows a short device session needs most can
    run first, before the time budget cuts the rest."""
    cases = QUICK_CASES if args.quick else FULL_CASES
    if not args.models:
        return cases
    wanted = list(dict.fromkeys(name.strip() for name in args.models.split(",") if name.strip()))
    by_arch = {case.arch: case for case in cases}
    unknown = [name for name in wanted if name not in by_arch]
    if unknown:
        raise SystemExit(f"--models: unknown {', '.join(unknown)}; choose from {', '.join(c.arch for c in cases)}")
    return tuple(by_arch[name] for name in wanted)


def main(argv: Sequence[str] | None = None) -> int:
    started = time.perf_counter()
    args = parse_args(argv)
    skipped_steps(args)  # fail fast, before the JPEGs are generated
    sizes, cases = (QUICK if args.quick else FULL), select_cases(args)
    device = args.device or ("cpu" if args.quick else None)
    if args.quick:
        torch.set_num_threads(1)  # the loader workers need the other cores
    with tempfile.TemporaryDirectory(prefix="fgvc-bench-") as tmp:
        data_root = Path(tmp) / "data"
        kib = generate_jpegs(data_root, sizes)
        configs = {case.arch: run_config(case, data_root, Path(tmp) / "runs", args.workers, device) for case in cases}
        first = configs[cases[0].arch]
        rt = setup_runtime(first.runtime)
        log_to_console()
        bench = Bench(args, sizes, rt, first.data.workers, started)
        bench.log(f"{sizes.images} JPEGs of {kib:.0f} KiB on average written in {time.perf_counter() - started:.1f} s")
        bench.log(f"device: {bench.device} ({rt.describe()}); results: {bench.base}.md/.json")
        index = load_split(first, "train")
        for case in cases:
            run_steps(bench, case, configs[case.arch], index, data_root, eager_steps(case))
        for case in cases:
            run_compiled(bench, case, configs[case.arch], index, data_root)
        bench.notes.append(f"generated JPEGs: {kib:.0f} KiB on average; total wall time "
                           f"{time.perf_counter() - bench.started:.0f} s")  # fmt: skip
        bench.write(finished=True)
    print()
    print(markdown_table(bench.rows))
    print()
    print(bench.summary())
    print(f"wrote {bench.base}.md and {bench.base}.json")
    return 1 if bench.failures else 0


if __name__ == "__main__":
    sys.exit(main())
