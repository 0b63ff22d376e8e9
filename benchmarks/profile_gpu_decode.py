"""Where stage 1 with GPU decoding loses its time: the JPEG decoder, the augmentation, or sharing the device.

Why: on an H200 ResNet-50's stage 1 at 224 with ``decode: gpu`` ran at 0.73 of its train-step ceiling (3,128 against
4,301 img/s) while its loop waited for batches 1% of the epoch, and ``torch.compile`` did not move it (3,114). This
separates the suspects in one process, over the same JPEG bytes (runs 1-6 without loader workers):

1. ``decode alone``: :func:`fgvc.gpu_decode.decode_on_device`, i.e. one batched nvJPEG call per batch (the hardware
   JPEG engine on GPUs that have one; torchvision picks it). If this alone is near 3,100 img/s the decoder is the cap.
2. ``decode + augment alone``: :class:`fgvc.gpu_decode.GpuBatchPreparer` (decode, crop-resize, flip, jitter,
   normalise). The gap to 1 is the augmentation; its kernels' device time is printed from torch.profiler.
3. ``train_one_epoch, uint8 batches on the device``: fgvc's loop without any decoding (the ceiling).
4. ``train_one_epoch, Prefetcher(GpuBatchPreparer)``: fgvc's loop fed as ``decode: gpu`` feeds it, minus the loader
   processes. Against 3 it is the whole cost of decoding on the device; against 1 and 2, how much of it overlaps.
5. ``train_one_epoch, Prefetcher(decode + one batch resize)``: the same without fgvc's augmentation (one resize of
   the stacked batch): whether the decoder or the augmentation's share costs the speed.
6. ``train_one_epoch, Prefetcher(GpuBatchPreparer), flat payloads``: as 4, but each batch's JPEGs are views of one
   flat tensor, as they arrive from a loader worker (:meth:`fgvc.gpu_decode.EncodedBatch.__reduce__`).
7. ``train_one_epoch, Prefetcher(DataLoader, pinned)``: as 4, fed by a DataLoader whose workers read the files, with
   the pin-memory thread fgvc's loaders have on CUDA; one loader iterator runs across the rounds.
8. ``train_one_epoch, Prefetcher(DataLoader, not pinned)``: the same without the pin-memory thread. Their iterator
   runs across rounds, so each round of 7 and 8 starts with up to three batches prepared while other runs were timed
   (two queued, one in the thread's hands): the loader's cost is if anything understated.

Why 6 to 8: in the 2026-11-27 H200 run, 4 reached 0.874 of the ceiling in this script but the end-to-end row only
0.76, with the loop never waiting for a batch: they separate the loader's share (its worker results, its pin thread)
from the device work. The last section counts the torch calls the preparing thread makes per batch: each competes
with the training step's launches for Python's GIL (``benchmarks/results/nvidia-h200-2026-11-27-193317-diagnosis.md``).

While 1 runs, ``nvidia-smi dmon -s u`` samples the engines once a second: its ``jpg`` column says whether the hardware
decoder is the one working.

    python benchmarks/profile_gpu_decode.py      # ResNet-50 at 224, batch 128, 1,024 800x600 JPEGs, on CUDA (~1 min)
    python benchmarks/profile_gpu_decode.py --arch timm:test_resnet --res 32 --batch 8 --images 16 \
        --width 96 --height 72 --device cpu      # smoke run: the code path on the CPU
"""

from __future__ import annotations

import argparse
import itertools
import pickle
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from profile_stage2 import alternating_rounds, sync  # noqa: E402
from throughput import write_photos  # noqa: E402

from fgvc.config import RuntimeConfig  # noqa: E402
from fgvc.data import PREFETCH_FACTOR, OnDeviceNormalize, close_loader, seed_worker  # noqa: E402
from fgvc.engine.loop import EpochStats, train_one_epoch  # noqa: E402
from fgvc.engine.runtime import Runtime, setup_runtime  # noqa: E402
from fgvc.gpu_decode import EncodedBatch, EncodedImageDataset, GpuBatchPreparer, collate_encoded, decode_on_device  # noqa: E402
from fgvc.models import create_model, get_meta, set_train_mode  # noqa: E402
from fgvc.prefetch import Prefetcher, wait_prepared  # noqa: E402

Batch = tuple[EncodedBatch, torch.Tensor, torch.Tensor]


def encoded_batches(dataset: EncodedImageDataset, batch: int) -> list[Batch]:
    """The files as the loader workers would hand them over with ``decode: gpu``: bytes, draws, labels, rows."""
    samples = [dataset[(row, 1000 + row)] for row in range(len(dataset))]
    return [collate_encoded(samples[start : start + batch]) for start in range(0, len(samples) - batch + 1, batch)]


def flat_payloads(batch: Batch) -> Batch:
    """The batch after a trip through pickle: its payloads become views of one flat tensor, as from a loader worker."""
    encoded, labels, rows = batch
    return pickle.loads(pickle.dumps(encoded)), labels, rows


class CyclingBatches:
    """Batches of ``batch`` row numbers, cycling over ``rows`` without end: one loader iterator serves every round."""

    def __init__(self, rows: int, batch: int) -> None:
        self.rows, self.batch = rows, batch

    def __iter__(self) -> Iterator[list[int]]:
        cycle = itertools.cycle(range(self.rows))
        while True:
            yield list(itertools.islice(cycle, self.batch))


class Rounds:
    """``per_round`` batches at a time from one running iterator, as a sized iterable for ``train_one_epoch``: the
    loader's workers keep reading between rounds, so no round pays the start of an epoch."""

    def __init__(self, source: Iterator[Any], per_round: int) -> None:
        self.source, self.per_round = source, per_round

    def __len__(self) -> int:
        return self.per_round

    def __iter__(self) -> Iterator[Any]:
        return itertools.islice(self.source, self.per_round)


def worker_loader(dataset: EncodedImageDataset, batch: int, workers: int, pinned: bool) -> DataLoader:
    """fgvc's training loader for ``decode: gpu`` (:func:`fgvc.data.build_loader`), with or without pinning."""
    return DataLoader(
        dataset, batch_sampler=CyclingBatches(len(dataset), batch), num_workers=workers, collate_fn=collate_encoded,
        pin_memory=pinned, worker_init_fn=seed_worker if workers > 0 else None, persistent_workers=workers > 0,
        prefetch_factor=PREFETCH_FACTOR if workers > 0 else None,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--res", type=int, default=224)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--images", type=int, default=1024, help="distinct JPEGs, reused across the timed batches")
    parser.add_argument("--width", type=int, default=800)
    parser.add_argument("--height", type=int, default=600)
    parser.add_argument("--loop-batches", type=int, default=24, help="batches per timed round")
    parser.add_argument("--device", default=None)
    parser.add_argument("--rows", type=int, default=12, help="kernels listed for the augmentation's profile")
    parser.add_argument("--workers", type=int, default=8, help="loader workers of runs 7 and 8 (fgvc's default)")
    args = parser.parse_args(argv)
    if args.images < args.batch:
        raise SystemExit(f"--images ({args.images}) must be at least --batch ({args.batch})")

    rt = setup_runtime(RuntimeConfig(device=args.device))
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="fgvc-profile-decode-") as tmp:  # runs 7 and 8 read the files
        classes = 50
        paths, kib = write_photos(Path(tmp), args.images, args.width, args.height, classes)
        frame = pd.DataFrame({"path": paths, "label": [i % classes for i in range(len(paths))]})
        dataset = EncodedImageDataset(frame)
        distinct = encoded_batches(dataset, args.batch)
        print(
            f"{args.arch} @ {args.res}, batch {args.batch}, on {rt.device} ({rt.describe()}); {len(distinct)} "
            f"distinct batches of {args.width}x{args.height} JPEGs, {kib:.0f} KiB on average; {args.loop_batches} "
            f"per round; runs 7 and 8: {args.workers} loader workers"
        )
        profile_parts(args, rt, dataset, distinct, classes)
    return 0


def profile_parts(
    args: argparse.Namespace, rt: Runtime, dataset: EncodedImageDataset, distinct: list[Batch], classes: int
) -> None:
    batches = [distinct[i % len(distinct)] for i in range(args.loop_batches)]
    flat = [flat_payloads(batch) for batch in batches]
    model = create_model(args.arch, classes, None).to(rt.device, memory_format=rt.memory_format)
    meta = get_meta(model)
    preparer = GpuBatchPreparer("train", args.res, meta.mean, meta.std, rt.device, channels_last=rt.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    criterion = nn.CrossEntropyLoss()
    on_device = [(torch.randint(0, 256, (args.batch, 3, args.res, args.res), dtype=torch.uint8, device=rt.device),
                  labels.to(rt.device), rows) for _enc, labels, rows in distinct]  # fmt: skip
    plain = OnDeviceNormalize(meta.mean, meta.std, rt.device, rt.channels_last)
    last_stats: dict[str, EpochStats] = {}

    def decode() -> None:
        for encoded, _labels, _rows in batches:
            decode_on_device(encoded, rt.device)

    def augment() -> None:
        for encoded, _labels, _rows in batches:
            preparer(encoded)

    def train(source: Any, prepare: Callable[[Any], torch.Tensor], name: str = "") -> None:
        set_train_mode(model, "all")
        stats = train_one_epoch(model, source, optimizer, None, None, rt, prepare, criterion, progress=False)
        last_stats[name] = stats

    def decode_and_resize(encoded: EncodedBatch) -> torch.Tensor:
        # the decode without fgvc's augmentation: one resize of the whole batch (the generated JPEGs share one size)
        images = torch.stack([image for image in decode_on_device(encoded, rt.device) if image is not None])
        resized = F.interpolate(images.float(), size=(args.res, args.res), mode="bilinear", align_corners=False)
        return plain(resized.round_().clamp_(0, 255).to(torch.uint8))

    loaders = {pinned: worker_loader(dataset, args.batch, args.workers, pinned) for pinned in (True, False)}
    streams = {pinned: iter(Prefetcher(loader, preparer, rt.device)) for pinned, loader in loaders.items()}
    pinned_run = "train_one_epoch, Prefetcher(DataLoader, pinned)"
    unpinned_run = "train_one_epoch, Prefetcher(DataLoader, not pinned)"
    runs = {
        "decode alone": decode,
        "decode + augment alone": augment,
        "train_one_epoch, uint8 batches on the device": lambda: train(
            [on_device[i % len(on_device)] for i in range(args.loop_batches)], plain),
        "train_one_epoch, Prefetcher(GpuBatchPreparer)": lambda: train(
            Prefetcher(batches, preparer, rt.device), wait_prepared),  # type: ignore[arg-type]
        "train_one_epoch, Prefetcher(decode + one batch resize)": lambda: train(
            Prefetcher(batches, decode_and_resize, rt.device), wait_prepared),  # type: ignore[arg-type]
        "train_one_epoch, Prefetcher(GpuBatchPreparer), flat payloads": lambda: train(
            Prefetcher(flat, preparer, rt.device), wait_prepared),  # type: ignore[arg-type]
        pinned_run: lambda: train(Rounds(streams[True], args.loop_batches), wait_prepared, pinned_run),
        unpinned_run: lambda: train(Rounds(streams[False], args.loop_batches), wait_prepared, unpinned_run),
    }  # fmt: skip
    try:
        engines = engine_utilisation(rt, decode)
        title = f"\n== ms per batch of {args.batch}, 3 alternating rounds (a warm-up of each first):"
        median = alternating_rounds(runs, rt.device, args.loop_batches, title)
    finally:
        for stream in streams.values():
            stream.close()  # type: ignore[attr-defined]  # a generator: ends the prefetching thread
        for loader in loaders.values():
            close_loader(loader)
    print("   img/s (median):")
    for name, ms in median.items():
        print(f"   {name}: {args.batch / ms * 1e3:.0f}")
    ceiling = median["train_one_epoch, uint8 batches on the device"]
    fed = median["train_one_epoch, Prefetcher(GpuBatchPreparer)"]
    print(f"   decoding on the device / ceiling: {ceiling / fed:.3f}")
    for name in (pinned_run, unpinned_run):
        stats = last_stats[name]
        print(f"   {name} / ceiling: {ceiling / median[name]:.3f}; its last round waited for data "
              f"{stats.data_wait_s / max(stats.seconds, 1e-9):.0%} of the round")  # fmt: skip
    if engines is not None:
        print("\n== nvidia-smi dmon -s u while 'decode alone' repeats (jpg: the hardware JPEG engines):")
        print(engines)
    augmentation_profile(augment, rt, args)


def engine_utilisation(rt: Runtime, work: Callable[[], None], samples: int = 3) -> str | None:
    """``nvidia-smi dmon -s u`` (one sample a second) while ``work`` runs again and again; None off CUDA or without
    the tool. ``work`` repeats until the samples are taken, since one pass can be shorter than a sample."""
    tool = shutil.which("nvidia-smi")
    if rt.device.type != "cuda" or tool is None:
        return None
    index = rt.device.index if rt.device.index is not None else torch.cuda.current_device()
    uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)  # torch's index is not nvidia-smi's under
    gpu = f"GPU-{uuid}" if uuid is not None else str(index)  # CUDA_VISIBLE_DEVICES; the UUID names the same GPU
    command = [tool, "dmon", "-s", "u", "-d", "1", "-c", str(samples), "-i", gpu]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + samples + 15
    while process.poll() is None and time.monotonic() < deadline:
        work()
        sync(rt.device)
    if process.poll() is None:
        process.kill()
    out, _ = process.communicate()
    return out.strip()


def augmentation_profile(augment: Callable[[], None], rt: Runtime, args: argparse.Namespace) -> None:
    """The preparer's device kernels (decode, crop-resize, jitter, normalise) by device time, over one round."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if rt.device.type == "cuda" else [])
    sort = "self_cuda_time_total" if rt.device.type == "cuda" else "self_cpu_time_total"
    with profile(activities=activities) as prof:
        augment()
        sync(rt.device)
    averages = prof.key_averages()
    if rt.device.type == "cuda":
        # kernels and copies only, as the table's own total: an operator's row repeats its kernels' time
        device_us = sum(event.self_device_time_total for event in averages
                        if event.device_type == DeviceType.CUDA and not event.is_user_annotation)  # fmt: skip
        print(
            f"\n== decode + augment under the profiler: {device_us / 1e3 / args.loop_batches:.2f} ms of device "
            "kernels per batch (the hardware JPEG engine's work is not a kernel and is not counted)"
        )
    calls, decoder_calls = preparing_thread_calls(prof)
    print(
        f"\n== host: {calls / args.loop_batches:.0f} torch calls per batch on the preparing thread, "
        f"{decoder_calls / args.loop_batches:.0f} of them the decoder's (each call competes with the training "
        "step's launches for Python's GIL)"
    )
    print(averages.table(sort_by=sort, row_limit=args.rows, max_name_column_width=70))


def preparing_thread_calls(prof: profile) -> tuple[int, int]:
    """Top-level operator calls (not nested in another) on the thread that ran the preparer, and how many of them
    are JPEG decoder calls: one per batch on CUDA, one per image on the CPU."""
    events = [event for event in prof.events() if event.device_type == DeviceType.CPU]
    if not events:
        return 0, 0
    thread = max({event.thread for event in events}, key=lambda t: sum(event.thread == t for event in events))
    calls = decoder = 0
    end = -1.0
    for event in sorted((e for e in events if e.thread == thread), key=lambda e: e.time_range.start):
        if event.time_range.start >= end:
            calls += 1
            decoder += "decode_jpeg" in event.name
            end = event.time_range.end
    return calls, decoder


if __name__ == "__main__":
    sys.exit(main())
