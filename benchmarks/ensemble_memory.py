"""Peak memory of ensembling M probability files: all members loaded at once versus one member at a time.

At iNat 2021 scale one member's test matrix is 500,000 x 10,000 float32 = 20 GB, so holding every member is what
decides whether ``fgvc ensemble`` fits a machine. This script writes M synthetic probability files (fgvc's own
format, every member listing the images in the same order, as ``fgvc predict`` writes them), then combines them in a
process per (way, M) and records the peak memory the combination allocated:

* ``all at once``: ``combine(align([Probabilities.load(f) for f in files]))``, the way fgvc ensembled until 2026-11-26;
* ``one at a time``: ``combine_members(Probabilities.load(f) for f in files)``, what ``fgvc ensemble`` does now for
  fixed weights (weight search needs every member's validation matrix at once and keeps it).

Memory is ``tracemalloc``'s peak: every allocation of Python and numpy (which reports its buffers to it) made while
combining, including zlib's while the files are read, and nothing from before.

```
python benchmarks/ensemble_memory.py                 # 20,000 x 5,000 (381 MiB per float32 matrix), 1-5 members
python benchmarks/ensemble_memory.py --quick         # 2,000 x 500, 1-3 members: the code path, in seconds
```
Writes ``<out>/cpu-ensemble-memory-<date>.md`` and ``.json``. Numbers are in units of one member's float32 matrix.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fgvc.ensemble import align, combine, combine_members, equal_weights  # noqa: E402
from fgvc.fileio import atomic_write_text  # noqa: E402
from fgvc.probs import Probabilities  # noqa: E402

WAYS = ("all at once", "one at a time")


def cpu_name() -> str:
    """The processor's model name and the CPUs this process may use (the figures are per machine)."""
    name = platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    return f"{name}, {len(os.sched_getaffinity(0))} CPUs"


def write_members(folder: Path, rows: int, classes: int, count: int) -> list[Path]:
    """``count`` files of softmax rows over ``classes``, in fgvc's probability format."""
    rng = np.random.default_rng(0)
    paths = []
    for member in range(count):
        probs = np.empty((rows, classes), dtype=np.float32)
        for start in range(0, rows, 4096):
            logits = rng.normal(0, 3, (min(4096, rows - start), classes)).astype(np.float32)
            block = np.exp(logits - logits.max(1, keepdims=True))
            probs[start : start + len(block)] = block / block.sum(1, keepdims=True)
        path = folder / f"member{member}.npz"
        ids = np.arange(rows)
        Probabilities(probs, ids, np.full(rows, -1), np.arange(classes), np.arange(classes).astype(str)).save(path)
        paths.append(path)
    return paths


def combine_files(way: str, files: list[Path]) -> dict[str, float]:
    """The peak memory this way of ensembling allocates, and its time."""
    tracemalloc.start()
    started = time.perf_counter()
    weights = equal_weights(len(files))
    if way == "all at once":
        members = align([Probabilities.load(f) for f in files])
        result = combine([m.probs for m in members], weights)
    else:
        result = combine_members((Probabilities.load(f) for f in files), weights).probs
    seconds = time.perf_counter() - started
    checksum = float(result[:, 0].sum())
    del result, weights
    peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    return {"peak_mib": peak, "seconds": seconds, "checksum": checksum}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--classes", type=int, default=5_000)
    parser.add_argument("--members", type=int, default=5, help="measure 1..N members")
    parser.add_argument("--quick", action="store_true", help="2,000 x 500, 1-3 members")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    if args.quick:
        args.rows, args.classes, args.members = 2_000, 500, 3
    matrix_mib = args.rows * args.classes * 4 / 2**20
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        files = write_members(Path(tmp), args.rows, args.classes, args.members)
        for count in range(1, args.members + 1):
            row = {"members": count}
            for way in WAYS:
                measured = combine_files(way, files[:count])
                row[way] = measured
            if abs(row[WAYS[0]]["checksum"] - row[WAYS[1]]["checksum"]) > 1e-3 * args.rows:
                raise SystemExit(f"the two ways disagree at {count} members: {row}")
            results.append(row)
            print(f"{count} members: " + ", ".join(f"{w} {row[w]['peak_mib']:.0f} MiB" for w in WAYS), flush=True)

    stamp = dt.datetime.now()
    lines = [
        f"# fgvc ensemble peak memory: {cpu_name()}",
        "",
        f"{stamp:%Y-%m-%dT%H:%M:%S}; {args.rows:,} images x {args.classes:,} classes, one float32 matrix = "
        f"{matrix_mib:.0f} MiB; peak memory allocated while combining (tracemalloc); command: "
        f"`python benchmarks/ensemble_memory.py{' --quick' if args.quick else ''}`",
        "",
        "| members | all at once: MiB | matrices | s | one at a time: MiB | matrices | s |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in results:
        cells = [str(row["members"])]
        for way in WAYS:
            peak = row[way]["peak_mib"]
            cells += [f"{peak:.0f}", f"{peak / matrix_mib:.2f}", f"{row[way]['seconds']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines) + "\n"
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"cpu-ensemble-memory-{stamp:%Y-%m-%d-%H%M%S}"
    raw = {"machine": cpu_name(), "rows": args.rows, "classes": args.classes, "matrix_mib": matrix_mib,
           "quick": args.quick, "python": platform.python_version(), "numpy": np.__version__,
           "results": results}  # fmt: skip
    write_results(stem, table, raw)
    return 0


def write_results(stem: Path, table: str, raw: dict) -> None:
    """``stem``.md (the table the README quotes) and ``stem``.json (the raw numbers), each written atomically."""
    atomic_write_text(stem.with_suffix(".md"), table)
    atomic_write_text(stem.with_suffix(".json"), json.dumps(raw, indent=2) + "\n")
    print(f"wrote {stem}.md and {stem}.json")


if __name__ == "__main__":
    raise SystemExit(main())
