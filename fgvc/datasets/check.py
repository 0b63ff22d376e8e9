"""``fgvc datasets check``: is a local copy of a dataset complete and readable?

The check reads the official splits (no hold-out), counts images and classes per split next to the official counts,
lists the files the metadata names but the disk lacks, and with ``decode`` decodes every image in parallel. Layout
problems are reported, not raised, so that the user sees the expected tree.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from fgvc.datasets import get_spec, resolve_root
from fgvc.errors import DataError, FgvcError, LayoutError
from fgvc.progress import progress_bar

SHOWN = 10  # how many missing / unreadable files the report lists before "... and N more"
DECODE_BATCH = 1024  # paths handed to the thread pool at a time, so millions of images do not mean millions of futures


@dataclass
class SplitCheck:
    """Counts for one official split."""

    split: str
    images: int
    classes: int  # classes with at least one image in this split
    labelled: int  # images with a known label (test splits often have none)
    official: int | None  # the benchmark's published image count
    missing: int
    unreadable: int | None  # None when images were not decoded


@dataclass
class CheckReport:
    """What ``check_dataset`` found; ``render()`` is the text the CLI prints, ``exit_code`` its status."""

    name: str
    title: str
    root: Path
    official_classes: int | None
    num_classes: int = 0
    splits: list[SplitCheck] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unreadable: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    duplicate_ids: list[str] = field(default_factory=list)  # "split: id" for ids listed more than once in a split
    notes: list[str] = field(default_factory=list)
    decoded: bool = False
    layout_error: str | None = None
    expected_layout: str | None = None

    @property
    def empty_splits(self) -> list[str]:
        """Train or val splits whose metadata lists no image (an empty or cut file); an absent test split is a note."""
        return [split.split for split in self.splits if split.images == 0 and split.split != "test"]

    @property
    def exit_code(self) -> int:
        """0 clean, 1 missing/unreadable files, duplicate ids or an empty split, 2 layout not recognised."""
        if self.layout_error is not None:
            return 2
        return 1 if self.missing or self.unreadable or self.duplicate_ids or self.empty_splits else 0

    def render(self) -> str:
        header = f"{self.title} ({self.name}) at {self.root}"
        if self.layout_error is not None:
            return "\n".join(
                [
                    header,
                    f"dataset not readable: {self.layout_error}",
                    *(["expected layout:"] if self.expected_layout else []),
                    *(f"  {line}" for line in (self.expected_layout or "").splitlines()),
                ]
            )
        official = f" (official {self.official_classes})" if self.official_classes else ""
        lines = [header, f"classes: {self.num_classes}{official}", "", self._table(), ""]
        lines += _listing("missing files", self.missing)
        unreadable = [reason if reason.startswith(path) else f"{path}: {reason}" for path, reason in self.unreadable]
        lines += _listing("unreadable images", unreadable)
        lines += _listing("image ids listed more than once", self.duplicate_ids)
        lines += _listing("splits without images (their metadata lists none: re-extract it)", self.empty_splits)
        if not self.decoded:
            lines.append("images were not decoded; add --decode to find unreadable files")
        lines += [f"note: {note}" for note in self.notes]
        lines.append("result: OK" if self.exit_code == 0 else "result: problems found")
        return "\n".join(lines)

    def _table(self) -> str:
        rows = [
            {
                "split": split.split,
                "images": split.images,
                "official": "-" if split.official is None else split.official,
                "classes": split.classes,
                "labelled": split.labelled,
                "missing": split.missing,
                "unreadable": "-" if split.unreadable is None else split.unreadable,
            }
            for split in self.splits
        ]
        return pd.DataFrame(rows).to_string(index=False)


def check_dataset(
    name: str, root: str | Path | None = None, decode: bool = False, workers: int = 2, progress: bool = True
) -> CheckReport:
    """Check the local copy of dataset ``name`` (root resolved as in ``load_index``).

    Args:
        decode: decode every present image with ``fgvc.io.decode_image`` (slow: reads every byte).
        workers: decoding threads (OpenCV releases the GIL while decoding).
        progress: show tqdm progress bars on stderr.
    """
    spec = get_spec(name)
    resolved = resolve_root(name, root)
    report = CheckReport(name=name, title=spec.title, root=resolved, official_classes=spec.classes)
    if not resolved.is_dir():
        report.layout_error = f"{resolved}: dataset root not found; put the {spec.title} files there or pass --root"
        report.expected_layout = spec.layout
        return report
    try:
        official = spec.reader(resolved)
    except DataError as exc:  # the tree only where files are not where expected, not for a malformed file
        report.layout_error = str(exc)
        report.expected_layout = spec.layout if isinstance(exc, LayoutError) else None
        return report

    frames = {"train": official.train, "val": official.val, "test": official.test}
    frames = {split: table for split, table in frames.items() if table is not None}
    report.num_classes = len(official.class_names)
    report.notes = list(official.notes)
    report.decoded = decode

    paths = list(dict.fromkeys(path for table in frames.values() for path in table["path"].to_numpy()))  # not per row
    listing = progress_bar(paths, desc="listing", enabled=progress, unit="file", leave=True)
    present = {path: os.path.isfile(path) for path in listing}
    report.missing = [path for path in paths if not present[path]]
    failures = _decode_all([path for path in paths if present[path]], workers, progress) if decode else {}
    report.unreadable = list(failures.items())

    for split, table in frames.items():
        report.splits.append(
            SplitCheck(
                split=split,
                images=len(table),
                classes=int(table.loc[table["label"] >= 0, "label"].nunique()),
                labelled=int((table["label"] >= 0).sum()),
                official=official.counts.get(split, spec.counts.get(split)),
                missing=int((~table["path"].map(present)).sum()),
                unreadable=int(table["path"].isin(failures).sum()) if decode else None,
            )
        )
        repeated = table["image_id"][table["image_id"].duplicated()].unique()
        report.duplicate_ids += [f"{split}: {image_id}" for image_id in repeated]
    for checked in report.splits:
        if checked.official and 0 < checked.images < checked.official:
            report.notes.append(f"the {checked.split} metadata lists {checked.images:,} images where the official "
                                f"release has {checked.official:,}: a subset, or a cut-short file?")  # fmt: skip
    return report


def _decode_all(paths: Sequence[str], workers: int, progress: bool) -> dict[str, str]:
    """Decode ``paths`` in a thread pool; return path -> reason for each one that fails."""
    from fgvc.io import decode_image  # the decoder pulls in OpenCV; only --decode needs it

    def reason(path: str) -> str | None:
        try:
            decode_image(path)
        except FgvcError as exc:
            return str(exc)
        except Exception as exc:  # a checker must report every unreadable file, whatever the decoder raised
            return f"{type(exc).__name__}: {exc}"
        return None

    failures: dict[str, str] = {}
    with (
        ThreadPoolExecutor(max_workers=max(1, workers)) as pool,
        progress_bar(total=len(paths), desc="decoding", enabled=progress, unit="img", leave=True) as bar,
    ):
        for batch in _batches(paths, DECODE_BATCH):
            for path, failure in zip(batch, pool.map(reason, batch), strict=True):
                if failure is not None:
                    failures[path] = failure
                bar.update()
    return failures


def _batches(items: Sequence[str], size: int) -> Iterator[Sequence[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _listing(title: str, entries: list[str]) -> list[str]:
    if not entries:
        return []
    shown = [f"  {entry}" for entry in entries[:SHOWN]]
    more = [f"  ... and {len(entries) - SHOWN} more"] if len(entries) > SHOWN else []
    return [f"{title}: {len(entries)}", *shown, *more, ""]
