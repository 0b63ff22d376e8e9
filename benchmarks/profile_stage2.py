"""Where a stage-2 step spends its time, next to an inference step and a tail-only step of the same batch.

Why: on an H200 a SENet-154 stage-2 epoch at 672 px (``bn+fc``, uncached) took 1.19 x an inference pass over the same
images, while the tail alone (the feature cache's epochs 2+) costs 2% of it. This prints, per step, the device's top
kernels for each variant, then times fgvc's own loops (``train_one_epoch`` against ``predict_probs``) over batches
already in pinned memory: no DataLoader, so their ratio is the loops' and the model's, free of the loader's effects.

    python benchmarks/profile_stage2.py                       # SENet-154 at 672, batch 32, on CUDA
    python benchmarks/profile_stage2.py --arch timm:test_resnet --res 64 --batch 4 --device cpu   # smoke run
    python benchmarks/profile_stage2.py --arch inceptionresnetv2 --res 681 --tencrop   # the 10-crop loop instead

``--tencrop`` times ``predict_probs(tta="tencrop")`` over pinned ten-crop batches (test-resized 4:3 images, the views
cut on the device) against the model alone on the same number of views: the 10-crop loop's own cost, without its
loader.

It uses fgvc's own pieces: the model, the FixRes policy, the split, the loops, bf16 autocast and channels_last as
``setup_runtime`` chooses them. Random weights and inputs: only the time matters.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

import numpy as np
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from fgvc.config import RuntimeConfig
from fgvc.data import OnDeviceNormalize, TenCropBatch, TenCropNormalize
from fgvc.engine.feature_cache import split_model
from fgvc.engine.loop import predict_probs, train_one_epoch
from fgvc.engine.runtime import Runtime, setup_runtime
from fgvc.models import create_model, get_meta, set_train_mode, set_trainable
from fgvc.transforms import tencrop_images_per_batch, tencrop_offsets, test_resize_size


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="senet154")
    parser.add_argument("--res", type=int, default=672)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--tune", default="bn+fc")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--device", default=None)
    parser.add_argument("--rows", type=int, default=15, help="kernels listed per variant")
    parser.add_argument("--loop-batches", type=int, default=20, help="batches per timed loop epoch")
    parser.add_argument("--tencrop", action="store_true", help="only: 10-crop predict_probs against the model alone")
    args = parser.parse_args(argv)

    rt = setup_runtime(RuntimeConfig(device=args.device))
    torch.manual_seed(0)
    model = create_model(args.arch, 50, None).to(rt.device, memory_format=rt.memory_format)
    if args.tencrop:
        tencrop_loop(model, rt, args)
        return 0
    params = set_trainable(model, args.tune)
    x = torch.randn(args.batch, 3, args.res, args.res, device=rt.device).contiguous(memory_format=rt.memory_format)
    y = torch.randint(0, 50, (args.batch,), device=rt.device)
    split = split_model(model, args.tune, x[:2])
    if split is None:
        raise SystemExit(f"{args.arch} cannot be split for {args.tune}")
    optimizer = torch.optim.SGD(params, lr=0.01, momentum=0.9)
    criterion = nn.CrossEntropyLoss()
    with torch.no_grad(), rt.autocast():
        features = split.trunk(x)
    print(f"{args.arch} @ {args.res}, batch {args.batch}, tune {args.tune}, cut at {split.cut}, "
          f"features {tuple(features.shape)} {features.dtype}, channels_last input "
          f"{features.is_contiguous(memory_format=torch.channels_last) if features.dim() == 4 else 'n/a'}")

    def train_step(forward: Callable[[], torch.Tensor]) -> None:
        set_train_mode(model, args.tune)
        with rt.autocast():
            loss = criterion(forward(), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def infer_step() -> None:
        model.eval()
        with torch.no_grad(), rt.autocast():
            model(x)

    contiguous_features = features.contiguous()
    variants: dict[str, Callable[[], None]] = {
        "inference": infer_step,
        "stage 2 uncached (the model, as train_stage runs it)": lambda: train_step(lambda: model(x)),
        "tail only, channels_last features (as the cache hands them)": lambda: train_step(lambda: split.tail(features)),
        "tail only, contiguous features": lambda: train_step(lambda: split.tail(contiguous_features)),
    }
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if rt.device.type == "cuda" else [])
    sort = "self_cuda_time_total" if rt.device.type == "cuda" else "self_cpu_time_total"
    for name, step in variants.items():
        for _ in range(3):
            step()
        sync(rt.device)
        started = time.perf_counter()
        for _ in range(args.steps):
            step()
        sync(rt.device)
        ms = (time.perf_counter() - started) / args.steps * 1e3
        with profile(activities=activities) as prof:
            for _ in range(3):
                step()
            sync(rt.device)
        print(f"\n== {name}: {ms:.1f} ms per step ({args.batch / ms * 1e3:.0f} img/s)")
        print(prof.key_averages().table(sort_by=sort, row_limit=args.rows, max_name_column_width=70))
    loops(model, optimizer, criterion, rt, args)
    return 0


def loops(model: nn.Module, optimizer: torch.optim.Optimizer, criterion: nn.Module, rt: Runtime,
          args: argparse.Namespace) -> None:  # fmt: skip
    """fgvc's training and inference loops over the same pinned uint8 batches, alternating, three rounds each."""
    meta = get_meta(model)
    prepare = OnDeviceNormalize(meta.mean, meta.std, rt.device, rt.channels_last)
    pin = rt.device.type == "cuda"
    images = torch.randint(0, 256, (args.batch, 3, args.res, args.res), dtype=torch.uint8)
    batch = (images.pin_memory() if pin else images, torch.randint(0, 50, (args.batch,)), torch.arange(args.batch))
    batches = [batch] * args.loop_batches

    def train_epoch() -> None:
        set_train_mode(model, args.tune)
        train_one_epoch(model, batches, optimizer, None, None, rt, prepare, criterion, progress=False)

    def infer_epoch() -> None:
        predict_probs(model, batches, rt, prepare, progress=False)

    epochs = {"train_one_epoch": train_epoch, "predict_probs": infer_epoch}
    title = f"\n== fgvc's loops over {args.loop_batches} pinned batches (no DataLoader), ms per batch, 3 rounds:"
    median = alternating_rounds(epochs, rt.device, args.loop_batches, title)
    print(f"   train_one_epoch / predict_probs: {median['train_one_epoch'] / median['predict_probs']:.3f}")


def alternating_rounds(
    runs: dict[str, Callable[[], None]], device: torch.device, batches: int, title: str
) -> dict[str, float]:
    """One warm-up of each run, then three rounds (in order, reversed, in order), printed in ms per batch under
    ``title``; returns each run's median."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for run in runs.values():
        run()
    for round_ in range(3):
        for name in list(runs) if round_ % 2 == 0 else list(runs)[::-1]:
            sync(device)
            started = time.perf_counter()
            runs[name]()
            sync(device)
            times[name].append((time.perf_counter() - started) / batches * 1e3)
    median = {name: sorted(values)[1] for name, values in times.items()}
    print(title)
    for name, values in times.items():
        print(f"   {name}: {' / '.join(f'{v:.1f}' for v in values)} (median {median[name]:.1f})")
    return median


def tencrop_loop(model: nn.Module, rt: Runtime, args: argparse.Namespace) -> None:
    """``predict_probs(tta="tencrop")`` over pinned ten-crop batches (no DataLoader) against the model alone.

    Why: on one H200 InceptionResNet-V2's 10-crop row reached 0.84 of its ceiling with almost no wait for data (0.97
    on another machine). Without the loader, the ratio here is the loop's own cost (views made on the device, softmax,
    the read-back one batch late); the gap between it and the end-to-end row is the loader's share.
    """
    meta = get_meta(model)
    per_batch = tencrop_images_per_batch(args.batch)
    views = per_batch * 10
    prepare = TenCropNormalize(meta.mean, meta.std, rt.device, rt.channels_last)
    plain = OnDeviceNormalize(meta.mean, meta.std, rt.device, rt.channels_last)
    short = test_resize_size(args.res, 0.875)  # an 800x600 photo's test resize, as the loader ships it
    shape = (short, round(short * 4 / 3))
    images = torch.randint(0, 256, (per_batch, *shape, 3), dtype=torch.uint8)
    corners = tencrop_offsets(np.full(per_batch, shape[0]), np.full(per_batch, shape[1]), args.res)
    crops = TenCropBatch(images, torch.from_numpy(corners), args.res)
    crops = crops.pin_memory() if rt.device.type == "cuda" else crops
    batches = [(crops, torch.zeros(per_batch, dtype=torch.int64), torch.arange(per_batch))] * args.loop_batches
    on_device = torch.randint(0, 256, (views, 3, args.res, args.res), dtype=torch.uint8, device=rt.device)
    model.eval()

    def ceiling() -> None:
        with torch.no_grad(), rt.autocast():
            for _ in range(args.loop_batches):
                model(plain(on_device))

    def loop() -> None:
        predict_probs(model, batches, rt, prepare, tta="tencrop", progress=False)

    runs = {"model alone, views on the device": ceiling, "predict_probs tencrop, pinned batches": loop}
    title = (f"== {args.arch} @ {args.res}: {per_batch} images x 10 views per forward, {args.loop_batches} batches, "
             "ms per batch, 3 alternating rounds:")  # fmt: skip
    median = alternating_rounds(runs, rt.device, args.loop_batches, title)
    ratio = median["model alone, views on the device"] / median["predict_probs tencrop, pinned batches"]
    print(f"   predict_probs speed / model alone: {ratio:.3f}")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


if __name__ == "__main__":
    sys.exit(main())
