"""Where stage 1 with GPU decoding loses its time: the JPEG decoder, the augmentation, or sharing the device.

Why: on an H200 ResNet-50's stage 1 at 224 with ``decode: gpu`` ran at 0.73 of its train-step ceiling (3,128 against
4,301 img/s) while its loop waited for batches 1% of the epoch, and ``torch.compile`` did not move it (3,114): neither
the loader nor the host's launches set its pace. Three suspects remain, and this separates them in one process,
without loader workers, over the same in-memory JPEG bytes:

1. ``decode alone``: :func:`fgvc.gpu_decode.decode_on_device`, i.e. one batched nvJPEG call per batch (the hardware
   JPEG engine on GPUs that have one; torchvision picks it). If this alone is near 3,100 img/s the decoder is the cap.
2. ``decode + augment alone``: :class:`fgvc.gpu_decode.GpuBatchPreparer` (decode, crop-resize, flip, jitter,
   normalise). The gap to 1 is the augmentation; its kernels' device time is printed from torch.profiler.
3. ``train_one_epoch, uint8 batches on the device``: fgvc's loop without any decoding (the ceiling).
4. ``train_one_epoch, Prefetcher(GpuBatchPreparer)``: fgvc's loop fed as ``decode: gpu`` feeds it, minus the loader
   processes. Against 3 it is the whole cost of decoding on the device; against 1 and 2, how much of it overlaps.
5. ``train_one_epoch, Prefetcher(decode + one batch resize)``: the same without fgvc's augmentation (one resize of
   the stacked batch): whether the decoder or the augmentation's share costs the speed.

While 1 runs, ``nvidia-smi dmon -s u`` samples the engines once a second: its ``jpg`` column says whether the hardware
decoder is the one working.

    python benchmarks/profile_gpu_decode.py      # ResNet-50 at 224, batch 128, 1,024 800x600 JPEGs, on CUDA (~1 min)
    python benchmarks/profile_gpu_decode.py --arch timm:test_resnet --res 32 --batch 8 --images 16 \
        --width 96 --height 72 --device cpu      # smoke run: the code path on the CPU
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from profile_stage2 import alternating_rounds, sync  # noqa: E402
from throughput import write_photos  # noqa: E402

from fgvc.config import RuntimeConfig  # noqa: E402
from fgvc.data import OnDeviceNormalize  # noqa: E402
from fgvc.engine.loop import train_one_epoch  # noqa: E402
from fgvc.engine.runtime import Runtime, setup_runtime  # noqa: E402
from fgvc.gpu_decode import EncodedBatch, EncodedImageDataset, GpuBatchPreparer, collate_encoded, decode_on_device  # noqa: E402
from fgvc.models import create_model, get_meta, set_train_mode  # noqa: E402
from fgvc.prefetch import Prefetcher, wait_prepared  # noqa: E402

Batch = tuple[EncodedBatch, torch.Tensor, torch.Tensor]


def encoded_batches(paths: list[str], batch: int, classes: int) -> list[Batch]:
    """The files as the loader workers would hand them over with ``decode: gpu``: bytes, draws, labels, rows."""
    frame = pd.DataFrame({"path": paths, "label": [i % classes for i in range(len(paths))]})
    dataset = EncodedImageDataset(frame)
    samples = [dataset[(row, 1000 + row)] for row in range(len(frame))]
    return [collate_encoded(samples[start : start + batch]) for start in range(0, len(samples) - batch + 1, batch)]


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
    args = parser.parse_args(argv)
    if args.images < args.batch:
        raise SystemExit(f"--images ({args.images}) must be at least --batch ({args.batch})")

    rt = setup_runtime(RuntimeConfig(device=args.device))
    torch.manual_seed(0)
    classes = 50
    with tempfile.TemporaryDirectory(prefix="fgvc-profile-decode-") as tmp:
        paths, kib = write_photos(Path(tmp), args.images, args.width, args.height, classes)
        distinct = encoded_batches(paths, args.batch, classes)
    batches = [distinct[i % len(distinct)] for i in range(args.loop_batches)]
    print(
        f"{args.arch} @ {args.res}, batch {args.batch}, on {rt.device} ({rt.describe()}); {len(distinct)} distinct "
        f"batches of {args.width}x{args.height} JPEGs, {kib:.0f} KiB on average; {args.loop_batches} per round"
    )

    model = create_model(args.arch, classes, None).to(rt.device, memory_format=rt.memory_format)
    meta = get_meta(model)
    preparer = GpuBatchPreparer("train", args.res, meta.mean, meta.std, rt.device, channels_last=rt.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    criterion = nn.CrossEntropyLoss()
    on_device = [(torch.randint(0, 256, (args.batch, 3, args.res, args.res), dtype=torch.uint8, device=rt.device),
                  labels.to(rt.device), rows) for _enc, labels, rows in distinct]  # fmt: skip
    plain = OnDeviceNormalize(meta.mean, meta.std, rt.device, rt.channels_last)

    def decode() -> None:
        for encoded, _labels, _rows in batches:
            decode_on_device(encoded, rt.device)

    def augment() -> None:
        for encoded, _labels, _rows in batches:
            preparer(encoded)

    def train(source: Any, prepare: Callable[[Any], torch.Tensor]) -> None:
        set_train_mode(model, "all")
        train_one_epoch(model, source, optimizer, None, None, rt, prepare, criterion, progress=False)

    def decode_and_resize(encoded: EncodedBatch) -> torch.Tensor:
        # the decode without fgvc's augmentation: one resize of the whole batch (the generated JPEGs share one size)
        images = torch.stack([image for image in decode_on_device(encoded, rt.device) if image is not None])
        resized = F.interpolate(images.float(), size=(args.res, args.res), mode="bilinear", align_corners=False)
        return plain(resized.round_().clamp_(0, 255).to(torch.uint8))

    runs = {
        "decode alone": decode,
        "decode + augment alone": augment,
        "train_one_epoch, uint8 batches on the device": lambda: train(
            [on_device[i % len(on_device)] for i in range(args.loop_batches)], plain),
        "train_one_epoch, Prefetcher(GpuBatchPreparer)": lambda: train(
            Prefetcher(batches, preparer, rt.device), wait_prepared),  # type: ignore[arg-type]
        "train_one_epoch, Prefetcher(decode + one batch resize)": lambda: train(
            Prefetcher(batches, decode_and_resize, rt.device), wait_prepared),  # type: ignore[arg-type]
    }  # fmt: skip
    engines = engine_utilisation(rt, decode)
    title = f"\n== ms per batch of {args.batch}, 3 alternating rounds (a warm-up of each first):"
    median = alternating_rounds(runs, rt.device, args.loop_batches, title)
    print("   img/s (median):")
    for name, ms in median.items():
        print(f"   {name}: {args.batch / ms * 1e3:.0f}")
    ceiling = median["train_one_epoch, uint8 batches on the device"]
    fed = median["train_one_epoch, Prefetcher(GpuBatchPreparer)"]
    print(f"   decoding on the device / ceiling: {ceiling / fed:.3f}")
    if engines is not None:
        print("\n== nvidia-smi dmon -s u while 'decode alone' repeats (jpg: the hardware JPEG engines):")
        print(engines)
    augmentation_profile(augment, rt, args)
    return 0


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
        device_us = sum(getattr(event, "self_device_time_total", 0.0) for event in averages)
        print(
            f"\n== decode + augment under the profiler: {device_us / 1e3 / args.loop_batches:.2f} ms of device "
            "kernels per batch (the hardware JPEG engine's work is not a kernel and is not counted)"
        )
    print(averages.table(sort_by=sort, row_limit=args.rows, max_name_column_width=70))


if __name__ == "__main__":
    sys.exit(main())
