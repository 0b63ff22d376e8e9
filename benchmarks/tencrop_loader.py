"""The host's share of 10-crop prediction: what the loader workers and the main process do per image, two ways.

Why: on an H200, InceptionResNet-V2's 10-crop row reached 0.84 of (inference ceiling / 10) while its loop without a
loader reached 0.96, and fewer loader workers did better (one confounded sample): the host, not the device, loses the
time. Until 2026-11-27 every image crossed the host as its five crops (a 681 px ten-crop: 7.0 MB from an 800x600
photo, 2.9 x the pixels of the resized image they are cut from); now it crosses once, as its test resize, and the
views are cut on the device. This measures, on the CPU alone, for both ways:

* ``worker ms / image``: decode + transform + the image's share of collating a batch, one thread, median per batch;
* ``MB / image``: what a batch holds per image, i.e. what is collated into shared memory, pinned and copied to the
  device per image;
* ``loader img/s``, ``main ms / batch``: an epoch through a DataLoader with persistent workers (the second epoch), and
  the main thread's CPU time per batch spent receiving it (``time.thread_time``; on CUDA the pin thread adds the
  pinning copy, proportional to MB / image).

The device side (the views cut by one gather, normalised) is not timed here: ``throughput.py`` times it end to end.

```
python benchmarks/tencrop_loader.py             # 681 px, 3 images per batch, 240 800x600 JPEGs, 2 workers, 3 rounds
python benchmarks/tencrop_loader.py --quick     # 48 px from 96x72 JPEGs: the code path, in seconds
```
Writes ``<out>/cpu-tencrop-loader-<date>.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import albumentations as A
import numpy as np
import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from ensemble_memory import cpu_name, write_results  # noqa: E402
from throughput import write_photos  # noqa: E402

from fgvc.data import ImageDataset, build_loader, close_loader, collate_skip_none, collate_tencrop  # noqa: E402
from fgvc.io import decode_image, disable_opencv_threads  # noqa: E402
from fgvc.transforms import build_transform, tencrop_images_per_batch  # noqa: E402

PHOTOS = ("4:3 landscape", "4:3 landscape and portrait, alternating")


class FiveCrops:
    """fgvc's ``tencrop`` transform up to 2026-11-27 (copied): the test resize, then the four corners and the centre
    stacked as ``(5, res, res, 3)``; the loader's default collate stacks those."""

    def __init__(self, res: int, resize: A.Compose):
        self.res, self.resize = res, resize

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        resized = self.resize(image=image)["image"]
        height, width = resized.shape[:2]
        r = self.res
        top, left = (height - r) // 2, (width - r) // 2
        corners = [(0, 0), (0, width - r), (height - r, 0), (height - r, width - r), (top, left)]
        return torch.from_numpy(np.stack([resized[y : y + r, x : x + r] for y, x in corners]))


@dataclass(frozen=True)
class Way:
    name: str
    transform: Callable[[np.ndarray], torch.Tensor]
    collate: Callable[[Sequence[Any]], Any]


def ways(res: int) -> list[Way]:
    """The two ways of shipping a ten-crop batch: fgvc's transform (resize only) and the old five crops."""
    now = build_transform("tencrop", res)
    before = FiveCrops(res, now.resize)  # type: ignore[attr-defined]  # the same resize, so only the shipping differs
    return [Way("five crops per image (until 2026-11-27)", before, collate_skip_none),
            Way("image once, views cut on the device (now)", now, partial(collate_tencrop, res=res))]  # fmt: skip


def batch_images(batch: Any) -> torch.Tensor:
    """The pixels of a collated batch, either way."""
    return batch if isinstance(batch, torch.Tensor) else batch.images


def in_process(way: Way, paths: list[str], per_batch: int) -> tuple[float, float]:
    """Median worker milliseconds per image (decode + transform + collate share) and MB per image, one thread."""
    per_image_ms, mb = [], []
    for start in range(0, len(paths) - per_batch + 1, per_batch):
        began = time.perf_counter()
        chunk = paths[start : start + per_batch]
        samples = [(way.transform(decode_image(path)), 0, row) for row, path in enumerate(chunk)]
        images, _labels, _rows = way.collate(samples)
        per_image_ms.append((time.perf_counter() - began) * 1e3 / per_batch)
        mb.append(batch_images(images).nbytes / per_batch / 1e6)
    return statistics.median(per_image_ms), statistics.median(mb)


def through_loader(way: Way, frame: Any, per_batch: int, workers: int) -> tuple[float, float]:
    """Images/s of the second epoch through a DataLoader (persistent workers), and the main thread's CPU ms per batch
    spent receiving batches."""
    loader = build_loader(ImageDataset(frame, way.transform), per_batch, workers=workers, collate_fn=way.collate)
    try:
        for _ in loader:  # the first epoch starts the workers
            pass
        images, cpu = 0, 0.0
        began = time.perf_counter()
        iterator = iter(loader)
        while True:
            cpu_before = time.thread_time()
            try:
                batch, _labels, _rows = next(iterator)
            except StopIteration:
                break
            cpu += time.thread_time() - cpu_before
            images += len(batch)
        seconds = time.perf_counter() - began
    finally:
        close_loader(loader)
    return images / seconds, cpu * 1e3 / max(1, images // per_batch)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--res", type=int, default=681, help="ten-crop side (InceptionResNet-V2's test resolution)")
    parser.add_argument("--images", type=int, default=240)
    parser.add_argument("--batch", type=int, default=32, help="views per forward, as predict.batch_size")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; the table shows each median")
    parser.add_argument("--quick", action="store_true", help="48 px from 24 96x72 JPEGs")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    width, height = (96, 72) if args.quick else (800, 600)
    if args.quick:
        args.res, args.images = 48, 24
    per_batch = tencrop_images_per_batch(args.batch)
    disable_opencv_threads()  # as in a loader worker
    torch.set_num_threads(1)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        half = args.images // 2
        landscape, _ = write_photos(Path(tmp, "landscape"), args.images, width, height)
        portrait, _ = write_photos(Path(tmp, "portrait"), half, height, width)
        # Batches of one orientation ship the resize as it is; a batch of both is padded to the tallest and widest.
        alternating = [path for pair in zip(landscape, portrait, strict=False) for path in pair]
        photo_sets = {PHOTOS[0]: landscape, PHOTOS[1]: alternating}
        rounds: dict[tuple[str, str], list[dict[str, float]]] = {}
        for round_ in range(args.rounds):  # alternating order: a machine that slows down mid-run favours neither
            for photos, paths in photo_sets.items():
                frame = pd.DataFrame({"path": paths, "label": 0})
                for way in ways(args.res)[:: 1 if round_ % 2 == 0 else -1]:
                    worker_ms, mb = in_process(way, paths, per_batch)
                    rate, main_ms = through_loader(way, frame, per_batch, args.workers)
                    rounds.setdefault((way.name, photos), []).append({
                        "worker_ms_per_image": worker_ms, "mb_per_image": mb, "loader_img_per_s": rate,
                        "main_ms_per_batch": main_ms})  # fmt: skip
        for (name, photos), measured in sorted(rounds.items(), key=lambda item: (PHOTOS.index(item[0][1]),)):
            median = {key: statistics.median(m[key] for m in measured) for key in measured[0]}
            spread = {key: [min(m[key] for m in measured), max(m[key] for m in measured)] for key in measured[0]}
            results.append({"way": name, "photos": photos, **median, "range": spread, "rounds": measured})

    stamp = dt.datetime.now()
    command = "python benchmarks/tencrop_loader.py" + (" --quick" if args.quick else "")
    lines = [
        f"# fgvc 10-crop loader, host side: {cpu_name()}",
        "",
        f"{stamp:%Y-%m-%dT%H:%M:%S}; {args.images} generated {width}x{height} JPEGs (and {args.images // 2} "
        f"{height}x{width} for the mixed rows), {args.res} px ten-crop, "
        f"{per_batch} images per batch, {args.workers} loader workers; CPU only, no device; median of {args.rounds} "
        f"alternating rounds (range in brackets); command: `{command}`",
        "",
        "| photos | way | worker ms / image | MB / image | loader img/s | main ms / batch |",
        "|---|---|---|---|---|---|",
    ]
    for rec in results:
        low, high = rec["range"]["worker_ms_per_image"], rec["range"]["loader_img_per_s"]
        main_low, main_high = rec["range"]["main_ms_per_batch"]
        lines.append(f"| {rec['photos']} | {rec['way']} | "
                     f"{rec['worker_ms_per_image']:.2f} ({low[0]:.2f}-{low[1]:.2f}) | "
                     f"{rec['mb_per_image']:.2f} | {rec['loader_img_per_s']:.0f} ({high[0]:.0f}-{high[1]:.0f}) | "
                     f"{rec['main_ms_per_batch']:.2f} ({main_low:.2f}-{main_high:.2f}) |")  # fmt: skip
    table = "\n".join(lines) + "\n"
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    raw = {"machine": cpu_name(), "res": args.res, "images": args.images, "per_batch": per_batch,
           "workers": args.workers, "quick": args.quick, "python": platform.python_version(),
           "torch": torch.__version__, "results": results}  # fmt: skip
    write_results(args.out / f"cpu-tencrop-loader-{stamp:%Y-%m-%d-%H%M%S}", table, raw)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
