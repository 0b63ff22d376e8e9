"""What the start of each epoch costs a training loop: one loader iterator per epoch, or one for every epoch.

Why: a DataLoader's persistent workers begin an epoch only when the loop asks for its iterator, so the epoch's first
batch costs one worker a whole batch of decoding and augmenting while the device waits (0.30 s of a 6.8 s
InceptionResNet-V2 stage-1 window on an H200). Since 2026-11-27 ``train_stage`` reads all its epochs from one iterator
(:class:`fgvc.engine.epochs.EpochStream`), and the workers load the next epoch while this one ends. This measures both
ways on the CPU alone, through fgvc's own dataset, ``train`` augmentation and loader, on generated 800x600 JPEGs, with
the device's training step stood in for by a sleep of ``--step-ms`` per batch (the host is free meanwhile, as it
mostly is while a GPU computes): per epoch after the first, the wait for its first batch and its wall time.

```
python benchmarks/epoch_start.py            # 224 px, batches of 32, 10 batches an epoch, 2 workers, 100 ms steps
python benchmarks/epoch_start.py --quick    # 32 px from 96x72 JPEGs: the code path, in seconds
```
Writes ``<out>/cpu-epoch-start-<date>.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from ensemble_memory import cpu_name, write_results  # noqa: E402
from throughput import write_photos  # noqa: E402

from fgvc.data import ImageDataset, build_loader, close_loader  # noqa: E402
from fgvc.engine.epochs import EpochStream  # noqa: E402
from fgvc.engine.loop import BatchWaits  # noqa: E402
from fgvc.engine.sampling import EpochBatches, EpochSampler  # noqa: E402
from fgvc.transforms import build_transform  # noqa: E402

WAYS = ("one iterator per epoch (until 2026-11-27)", "one iterator for every epoch (EpochStream, now)")


def run(way: str, frame: pd.DataFrame, res: int, batch: int, workers: int, epochs: int, step_s: float) -> list[dict]:
    """Per epoch: seconds waited for the first batch, seconds waited in all, wall seconds."""
    sampler = EpochSampler(len(frame), shuffle=True, seed=0)
    batches = EpochBatches(sampler, batch, drop_last=True)
    dataset = ImageDataset(frame, build_transform("train", res, seed=0))
    loader = build_loader(dataset, batch, workers=workers, batch_sampler=batches)
    stream = EpochStream(loader, 0, epochs) if way == WAYS[1] else None
    records = []
    try:
        for epoch in range(epochs):
            sampler.set_epoch(epoch)
            waits = BatchWaits()
            began = time.perf_counter()
            for _batch in waits(stream.epoch(epoch) if stream is not None else loader):
                time.sleep(step_s)  # the device's step; the loop asks for the next batch once it is queued
            records.append({"epoch": epoch, "first_batch_s": waits.first, "waited_s": waits.seconds,
                            "seconds": time.perf_counter() - began})  # fmt: skip
    finally:
        if stream is not None:
            stream.close()
        close_loader(loader)
    return records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--res", type=int, default=224)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--batches", type=int, default=10, help="per epoch")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--step-ms", type=float, default=100.0, help="the device's step, stood in for by a sleep")
    parser.add_argument("--quick", action="store_true", help="32 px from 96x72 JPEGs, 3 epochs of 4 batches of 4")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    width, height = (96, 72) if args.quick else (800, 600)
    if args.quick:
        args.res, args.batch, args.batches, args.epochs, args.step_ms = 32, 4, 4, 3, 5.0
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        images = args.batch * args.batches
        frame = pd.DataFrame({"path": write_photos(Path(tmp), images, width, height)[0], "label": 0})
        for way in WAYS:
            results[way] = run(way, frame, args.res, args.batch, args.workers, args.epochs, args.step_ms / 1e3)

    stamp = dt.datetime.now()
    command = "python benchmarks/epoch_start.py" + (" --quick" if args.quick else "")
    ideal = args.batches * args.step_ms / 1e3
    lines = [
        f"# fgvc epoch start, host side: {cpu_name()}",
        "",
        f"{stamp:%Y-%m-%dT%H:%M:%S}; {args.batches} batches of {args.batch} generated {width}x{height} JPEGs an "
        f"epoch through fgvc's `train` augmentation at {args.res} px, {args.workers} loader workers; the device's "
        f"step stood in for by a {args.step_ms:.0f} ms sleep per batch ({ideal:.2f} s an epoch if no batch were ever "
        f"waited for); medians over epochs 2-{args.epochs} (epoch 1 starts the workers either way); CPU only, no "
        f"device; command: `{command}`",
        "",
        "| way | first batch: s waited | epoch: s waited | epoch: s | epoch s / steps alone |",
        "|---|---|---|---|---|",
    ]
    for way, records in results.items():
        later = records[1:]
        first = statistics.median(r["first_batch_s"] for r in later)
        waited = statistics.median(r["waited_s"] for r in later)
        seconds = statistics.median(r["seconds"] for r in later)
        lines.append(f"| {way} | {first:.3f} | {waited:.3f} | {seconds:.2f} | {seconds / ideal:.2f} |")
    table = "\n".join(lines) + "\n"
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    raw = {"machine": cpu_name(), "res": args.res, "batch": args.batch, "batches": args.batches, "epochs": args.epochs,
           "workers": args.workers, "step_ms": args.step_ms, "quick": args.quick, "python": platform.python_version(),
           "torch": torch.__version__, "results": results}  # fmt: skip
    write_results(args.out / f"cpu-epoch-start-{stamp:%Y-%m-%d-%H%M%S}", table, raw)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
