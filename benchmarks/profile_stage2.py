"""Where a stage-2 step spends its device time, next to an inference step and a cached-tail step of the same batch.

Why: on an H200 a SENet-154 stage-2 epoch at 672 px (``bn+fc``, uncached, frozen trunk under no_grad) took 1.19 x an
inference pass over the same images, while the tail alone (the feature cache's epochs 2+) costs 2% of it. This prints
the kernels that make the difference, so that the next fix is aimed, not guessed.

    python benchmarks/profile_stage2.py                       # SENet-154 at 672, batch 32, on CUDA
    python benchmarks/profile_stage2.py --arch timm:test_resnet --res 64 --batch 4 --device cpu   # smoke run

It uses fgvc's own pieces: the model, the FixRes policy, the split and FrozenTrunkModel, bf16 autocast and
channels_last as ``setup_runtime`` chooses them. Random weights and inputs: only the time matters.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from fgvc.config import RuntimeConfig
from fgvc.engine.feature_cache import FrozenTrunkModel, split_model
from fgvc.engine.runtime import setup_runtime
from fgvc.models import create_model, set_train_mode, set_trainable


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="senet154")
    parser.add_argument("--res", type=int, default=672)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--tune", default="bn+fc")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--device", default=None)
    parser.add_argument("--rows", type=int, default=15, help="kernels listed per variant")
    args = parser.parse_args(argv)

    rt = setup_runtime(RuntimeConfig(device=args.device))
    torch.manual_seed(0)
    model = create_model(args.arch, 50, None).to(rt.device, memory_format=rt.memory_format)
    params = set_trainable(model, args.tune)
    x = torch.randn(args.batch, 3, args.res, args.res, device=rt.device).contiguous(memory_format=rt.memory_format)
    y = torch.randint(0, 50, (args.batch,), device=rt.device)
    split = split_model(model, args.tune, x[:2])
    if split is None:
        raise SystemExit(f"{args.arch} cannot be split for {args.tune}")
    net = FrozenTrunkModel(split)
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
        "stage 2 uncached (FrozenTrunkModel)": lambda: train_step(lambda: net(x)),
        "stage 2 whole model (autograd through the trunk)": lambda: train_step(lambda: model(x)),
        "tail only, channels_last features": lambda: train_step(lambda: split.tail(features)),
        "tail only, contiguous features (as cached)": lambda: train_step(lambda: split.tail(contiguous_features)),
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
    return 0


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


if __name__ == "__main__":
    sys.exit(main())
