"""Memory and time of collecting a DDP prediction's probability rows: every rank gets all of them, or rank 0 alone.

Under ``--gpus N`` each rank scores 1/N of the images; the (images x classes) matrix is then assembled for the file.
At iNat 2021 scale that matrix is 500,000 x 10,000 float32 = 20 GB, so the way it is assembled decides whether a
multi-GPU ``fgvc predict`` fits the machine. This script starts N gloo processes per way, gives each rank its share of
random rows (rank r holds images r, r + N, ..., as fgvc's evaluation sampler deals them), and records per rank the
growth of its peak resident memory while the rows are collected, and the time:

* ``all ranks``: ``all_gather_object`` of every share to every rank, concatenation, then a sort into image order:
  ``predict_probs`` up to commit be50f67 (copied here);
* ``rank 0``: ``fgvc.engine.runtime.gather_rows_on_main``, what ``predict_probs`` does now.

```
python benchmarks/gather_memory.py            # 100,000 x 2,000 (763 MiB per float32 matrix), 2 ranks
python benchmarks/gather_memory.py --quick    # 2,000 x 500: the code path, in seconds
```
Writes ``<out>/cpu-gather-memory-<date>.md`` and ``.json``. Memory is in units of the whole float32 matrix.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from ensemble_memory import cpu_name, write_results  # noqa: E402

from fgvc.engine.runtime import Runtime, gather_objects, gather_rows_on_main  # noqa: E402

WAYS = ("all ranks", "rank 0")


def _resident_mib() -> float:
    """This process's resident memory now (``ru_maxrss`` only gives the peak)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * resource.getpagesize() / 2**20


def _every_rank_gets_all(rt: Runtime, rows: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """fgvc's gather up to commit be50f67."""
    parts = gather_objects(rt, (rows, idx))
    probs_all = np.concatenate([p for p, _ in parts])
    idx_all = np.concatenate([i for _, i in parts])
    order = np.argsort(idx_all, kind="stable")
    return probs_all[order], idx_all[order]


def _rank(rank: int, world: int, way: str, rows: int, classes: int, init: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    rt = Runtime(device=torch.device("cpu"), amp_dtype=None, channels_last=False, rank=rank, world_size=world)
    idx = np.arange(rank, rows, world)
    share = np.random.default_rng(rank).random((len(idx), classes), dtype=np.float32)
    share[:, 0] = idx  # so that the result's order can be checked
    dist.barrier()
    before = _resident_mib()
    started = time.perf_counter()
    probs, got = (_every_rank_gets_all if way == WAYS[0] else gather_rows_on_main)(rt, share, idx)
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    ordered = bool((got == np.arange(rows)).all() and (probs[:, 0] == got).all()) if len(got) else None
    record = {"rank": rank, "growth_mib": max(0.0, peak - before), "seconds": seconds, "rows_held": len(got),
              "in_order": ordered}  # fmt: skip
    Path(out, f"{rank}.json").write_text(json.dumps(record))
    dist.destroy_process_group()


def measure(way: str, world: int, rows: int, classes: int) -> list[dict]:
    """One record per rank for this way of collecting the rows."""
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_rank, args=(world, way, rows, classes, f"{tmp}/init", tmp), nprocs=world)
        return [json.loads(Path(tmp, f"{rank}.json").read_text()) for rank in range(world)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--classes", type=int, default=2_000)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="2,000 x 500")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    if args.quick:
        args.rows, args.classes = 2_000, 500
    matrix_mib = args.rows * args.classes * 4 / 2**20
    results = {way: measure(way, args.ranks, args.rows, args.classes) for way in WAYS}
    for way, records in results.items():
        main_rank = records[0]
        if main_rank["rows_held"] != args.rows or not main_rank["in_order"]:
            raise SystemExit(f"{way}: rank 0 did not get every row in image order: {main_rank}")

    stamp = dt.datetime.now()
    command = f"python benchmarks/gather_memory.py{' --quick' if args.quick else ''}"
    lines = [
        f"# fgvc DDP prediction gather: {cpu_name()}",
        "",
        f"{stamp:%Y-%m-%dT%H:%M:%S}; {args.rows:,} images x {args.classes:,} classes over {args.ranks} gloo "
        f"processes, the whole float32 matrix = {matrix_mib:.0f} MiB; growth of each rank's peak resident memory while "
        f"the rows are collected; command: `{command}`",
        "",
        "| way | rank | rows held after | peak growth: MiB | matrices | s |",
        "|---|---|---|---|---|---|",
    ]
    for way, records in results.items():
        for rec in records:
            lines.append(f"| {way} | {rec['rank']} | {rec['rows_held']:,} | {rec['growth_mib']:.0f} | "
                         f"{rec['growth_mib'] / matrix_mib:.2f} | {rec['seconds']:.1f} |")  # fmt: skip
    table = "\n".join(lines) + "\n"
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"cpu-gather-memory-{stamp:%Y-%m-%d-%H%M%S}"
    raw = {"machine": cpu_name(), "rows": args.rows, "classes": args.classes, "ranks": args.ranks,
           "matrix_mib": matrix_mib, "quick": args.quick, "python": platform.python_version(),
           "torch": torch.__version__, "results": results}  # fmt: skip
    write_results(stem, table, raw)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
