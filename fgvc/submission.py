"""Kaggle submission CSVs: one spec per competition, a writer, and a validator that reports every problem by line.

The formats come from the competitions' own pages (see ``shared/notes/datasets.md`` section 9): the header is
case-sensitive (``id,predicted`` for iNat 2017-2019, ``Id,Predicted`` for iNat 2021 and Herbarium 2020-22,
``Id,Category`` for Herbarium 2019), predictions are the dataset's ORIGINAL category ids (never our 0..C-1 label
indices) sorted by decreasing confidence and separated by spaces, and there is exactly one row per test image.

Validation design: :func:`collect_problems` returns every problem as a one-line string starting with the 1-based
file line (the header is line 1), for a command that lists them all; :func:`validate_submission` raises a
:class:`SubmissionError` carrying the first problem and how many more there are. The writer runs the same checks on
its own output before anything touches the disk, so it never writes a file the validator rejects.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd

from fgvc.errors import ConfigError, DataError
from fgvc.fileio import atomic_write_text
from fgvc.metrics import topk_indices
from fgvc.probs import Probabilities

if TYPE_CHECKING:
    from fgvc.datasets.base import DatasetIndex

_SHOWN_IDS = 5  # how many missing ids a message quotes
_INTEGER = re.compile(r"\d+")


class SubmissionError(DataError):
    """A submission CSV that Kaggle would reject or misread."""


@dataclass(frozen=True)
class CompetitionSpec:
    """What one competition's CSV must look like.

    Attributes:
        columns: the header, exactly (case matters).
        write_k: predictions per row that :func:`write_submission` writes by default.
        min_k: fewest predictions a row may have.
        max_k: most predictions a row may have (None: no limit).
        id_type: ``int`` image ids, or ``str`` (written as given).
        id_pattern: regex a ``str`` id must match in full (None: any non-empty text).
        predictions: ``category_id`` (original integer ids, space-separated) or ``name`` (one class name).
        metric: the leaderboard's metric: ``top1``, ``top3``, ``top5`` or ``macro_f1``.
    """

    name: str
    columns: tuple[str, str]
    write_k: int
    min_k: int
    max_k: int | None
    id_type: Literal["int", "str"]
    predictions: Literal["category_id", "name"]
    id_pattern: str | None = None
    id_example: str = "12345"
    metric: str = "top1"  # what the leaderboard scores (fgvc.ensemble.SEARCH_METRICS): ensemble weights aim at it

    def count_rule(self) -> str:
        if self.max_k == self.min_k:
            return f"exactly {self.min_k}"
        if self.max_k is None:
            return f"at least {self.min_k}"
        return f"{self.min_k} to {self.max_k}"


COMPETITIONS: dict[str, CompetitionSpec] = {
    spec.name: spec
    for spec in (
        # top-5 error; "5 category ids, separated by spaces"
        CompetitionSpec("inat2017", ("id", "predicted"), 5, 5, 5, "int", "category_id", metric="top5"),
        # top-3 error; "3 category ids ... sort your predictions from most confident to least"
        CompetitionSpec("inat2018", ("id", "predicted"), 3, 3, 3, "int", "category_id", metric="top3"),
        # top-1 error on the first id; "we encourage you to predict more categories labels (sorted by confidence)"
        CompetitionSpec("inat2019", ("id", "predicted"), 5, 1, None, "int", "category_id"),
        # "must have 5 category predictions per image or the Kaggle evaluation will fail"
        CompetitionSpec("inat2021", ("Id", "Predicted"), 5, 5, 5, "int", "category_id"),
        # "predicted categories sorted by decreasing confidence ... the first category will be used"; Id = file name
        CompetitionSpec(
            "herbarium2019",
            ("Id", "Category"),
            5,
            1,
            None,
            "str",
            "category_id",
            id_pattern=r"[^/\\\s]+\.[A-Za-z]+",
            id_example="00123.jpg",
        ),
        # macro F1 on one category id per image
        CompetitionSpec("herbarium2020", ("Id", "Predicted"), 1, 1, 1, "int", "category_id", metric="macro_f1"),
        CompetitionSpec("herbarium2021", ("Id", "Predicted"), 1, 1, 1, "int", "category_id", metric="macro_f1"),
        CompetitionSpec("herbarium2022", ("Id", "Predicted"), 1, 1, 1, "int", "category_id", metric="macro_f1"),
        # not a competition: a readable top-1 file for any dataset, with class names
        CompetitionSpec("generic", ("id", "label"), 1, 1, 1, "str", "name", id_example="image_0001"),
    )
}


def leaderboard_metric(dataset: str) -> str:
    """What the dataset's leaderboard ranks (top-3 for iNat 2018, macro F1 for Herbarium 2020-22), ``top1`` for a
    dataset without a competition: the metric best.pt, the resolution sweep and ensemble weights are chosen on."""
    return COMPETITIONS[dataset].metric if dataset in COMPETITIONS else "top1"


def competition_spec(competition: str) -> CompetitionSpec:
    try:
        return COMPETITIONS[competition]
    except KeyError:
        raise ConfigError(f"unknown competition {competition!r}; choose one of {', '.join(COMPETITIONS)}") from None


# --------------------------------------------------------------------------------------------------- writing
def predictions_to_frame(probs: Probabilities, competition: str, k: int | None = None) -> pd.DataFrame:
    """The submission table: one row per image, the top-k ORIGINAL category ids (or the class name) by confidence.

    ``k`` defaults to the competition's ``write_k`` and must fit its rule; for competitions that only need a
    minimum it is clipped to the number of classes. Ties go to the lower label index, as in
    :func:`fgvc.metrics.topk_indices`.
    """
    spec = competition_spec(competition)
    k = _rows_k(spec, k, n_classes=probs.probs.shape[1])
    ids = _submission_ids(probs, spec)
    top = topk_indices(probs.probs, k)
    if spec.predictions == "name":
        predicted = np.asarray(probs.class_names).astype(str)[top[:, 0]]
    else:
        category_tokens = _category_tokens(probs)[top]
        predicted = [" ".join(row) for row in category_tokens]
    id_column, prediction_column = spec.columns
    return pd.DataFrame({id_column: ids, prediction_column: predicted})


def write_submission(
    probs: Probabilities,
    competition: str,
    path: str | Path,
    k: int | None = None,
    header: tuple[str, ...] | None = None,
) -> Path:
    """Write the Kaggle CSV atomically (header, ``\\n`` line ends, no index column) after validating it in memory.

    ``header``: the sample submission's, when it has two columns: it wins over the built-in one, as in validation.
    """
    spec = competition_spec(competition)
    table = predictions_to_frame(probs, competition, k)
    if header is not None and len(header) == 2:
        table.columns = list(header)
    text = table.to_csv(index=False, lineterminator="\n")
    categories = probs.class_names if spec.predictions == "name" else probs.category_ids
    problems = _collect(
        io.StringIO(text, newline=""),
        spec,
        header=tuple(table.columns),
        reference_ids=_normalised_ids(probs.image_ids, spec),
        reference_kind="test set",
        valid_categories=_normalised_categories(categories, spec),
    )
    path = Path(path)
    if problems:
        raise SubmissionError(f"{path}: not written, the predictions make an invalid file: {problems[0]}")
    atomic_write_text(path, text)
    return path


def check_top_k(spec: CompetitionSpec, k: int | None) -> int:
    """Predictions per row: ``k`` (None: the competition's ``write_k``) if the competition's rule allows it."""
    k = spec.write_k if k is None else k
    if k < spec.min_k or (spec.max_k is not None and k > spec.max_k):
        raise ConfigError(f"{spec.name} needs {spec.count_rule()} predictions per row, not {k}")
    return k


def _rows_k(spec: CompetitionSpec, k: int | None, n_classes: int) -> int:
    k = check_top_k(spec, k)
    if k > n_classes:
        if spec.min_k > n_classes:
            raise DataError(
                f"{spec.name} needs {spec.min_k} predictions per row but the model has only {n_classes} classes"
            )
        k = n_classes
    return k


def _submission_ids(probs: Probabilities, spec: CompetitionSpec) -> np.ndarray:
    ids = np.asarray(probs.image_ids)
    if pd.Index(ids).has_duplicates:
        raise DataError(f"{spec.name}: the probabilities repeat image ids; Kaggle needs one row per test image")
    if spec.id_type == "int":
        as_int = _as_int_array(ids)
        if as_int is None:
            raise DataError(f"{spec.name} needs integer image ids like {spec.id_example}, got e.g. {ids[:1].tolist()}")
        return as_int
    return ids.astype(str)


def _category_tokens(probs: Probabilities) -> np.ndarray:
    """Original category ids as the text written to the file; integer ids must be integers."""
    as_int = _as_int_array(np.asarray(probs.category_ids))
    if as_int is None:
        raise DataError(
            f"category ids {np.asarray(probs.category_ids)[:3].tolist()}... are not integers; "
            "this competition needs the dataset's integer category ids in the probability file"
        )
    return as_int.astype(str)


def _as_int_array(values: np.ndarray) -> np.ndarray | None:
    """int64 copy when every value is a non-negative integer (or its exact decimal text), else None."""
    if values.dtype.kind in "iu":
        return values.astype(np.int64) if (values >= 0).all() else None
    text = values.astype(str)
    if not all(_INTEGER.fullmatch(value) for value in text):
        return None
    return text.astype(np.int64)


# --------------------------------------------------------------------------------------------------- validation
def validate_submission(
    path: str | Path,
    competition: str,
    test_ids: Iterable[object] | None = None,
    valid_categories: Iterable[object] | None = None,
    sample: str | Path | None = None,
) -> None:
    """Raise :class:`SubmissionError` naming the first problem (and how many follow) unless the file is valid."""
    problems = collect_problems(path, competition, test_ids, valid_categories, sample)
    if problems:
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        raise SubmissionError(f"{path}: {problems[0]}{more}")


def check_submission(
    path: str | Path, competition: str, test: DatasetIndex | None = None, sample: str | Path | None = None
) -> list[str]:
    """Every problem of the CSV at ``path`` against the dataset's ``test`` split (its image ids, and its categories as
    this competition names them: class names for a generic CSV, the dataset's category ids otherwise) and/or Kaggle's
    ``sample`` (header and ids). Without ``test`` the categories are not checked."""
    test_ids = categories = None
    if test is not None:
        test_ids = test.frame["image_id"].tolist()
        categories = test.class_names if competition_spec(competition).predictions == "name" else test.category_ids
    return collect_problems(path, competition, test_ids, categories, sample)


def validate_submission_file(
    path: str | Path,
    competition: str,
    sample: str | Path | None = None,
    dataset: str | None = None,
    data_root: str | Path | None = None,
) -> list[str]:
    """`fgvc validate-submission`: the problems of ``path`` against ``dataset``'s test split and/or ``sample``; a
    missing file or no reference at all is a one-line :class:`DataError`."""
    from fgvc.datasets import load_index

    path, sample = Path(path), Path(sample) if sample is not None else None
    data_root = Path(data_root) if data_root is not None else None
    if not path.is_file():
        raise DataError(f"{path}: no such file" + ("; it is a folder, name the CSV in it" if path.is_dir() else ""))
    if not dataset and not sample:
        raise DataError(
            f"{path}: nothing to check the ids and categories against; pass --dataset NAME (its test split) or "
            "--sample sample_submission.csv"
        )
    test = load_index(dataset, "test", root=data_root) if dataset else None
    return check_submission(path, competition, test, sample)


def collect_problems(
    path: str | Path,
    competition: str,
    test_ids: Iterable[object] | None = None,
    valid_categories: Iterable[object] | None = None,
    sample: str | Path | None = None,
) -> list[str]:
    """Every problem in a submission CSV, each one line starting with ``line N:`` where it has a line.

    The header must equal the sample's when ``sample`` is given, else the competition's. Ids are checked against
    the sample's ids when ``sample`` is given, else against ``test_ids`` (when given): missing, unknown and
    duplicate ids. Predictions are checked for count, integer-ness and membership in ``valid_categories``.
    """
    spec = competition_spec(competition)
    header: tuple[str, ...] = spec.columns
    reference_ids, reference_kind = None, "test set"
    setup: list[str] = []
    if sample is not None:
        header, reference_ids, setup = read_checked_sample(Path(sample), spec, test_ids)
        reference_kind = "sample submission"
    elif test_ids is not None:
        reference_ids = _normalised_ids(test_ids, spec)
    categories = _normalised_categories(valid_categories, spec) if valid_categories is not None else None
    path = Path(path)
    try:
        with open(path, encoding="utf-8", newline="") as fh:
            return setup + _collect(fh, spec, header, reference_ids, reference_kind, categories)
    except FileNotFoundError:
        raise SubmissionError(f"{path}: submission file not found") from None
    except UnicodeDecodeError as err:
        raise SubmissionError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start}); save it as UTF-8") from None


def read_sample(sample: Path) -> tuple[tuple[str, ...], list[str]]:
    """The header and the ids (first column) of a Kaggle sample submission."""
    try:
        with open(sample, encoding="utf-8-sig", newline="") as fh:
            rows = list(csv.reader(fh))
    except FileNotFoundError:
        raise SubmissionError(f"{sample}: sample submission not found; download it from the competition") from None
    if not rows:
        raise SubmissionError(f"{sample}: the sample submission is empty; download it again")
    return tuple(rows[0]), [row[0] for row in rows[1:] if row]


def read_checked_sample(
    sample: Path, spec: CompetitionSpec, test_ids: Iterable[object] | None = None
) -> tuple[tuple[str, ...], dict[str, None], list[str]]:
    """A Kaggle sample submission's header and ids (as the CSV holds them), and why it cannot be the sample of this
    competition's ``test_ids``: another competition's header, or other ids (another year's, another copy's)."""
    header, sample_ids = read_sample(sample)
    ids = _normalised_ids(sample_ids, spec)
    problems = [foreign] if (foreign := foreign_header(sample, header, spec)) else []
    if test_ids is not None and set(ids) != set(_normalised_ids(test_ids, spec)):
        problems.append(f"{sample}: its {len(ids)} ids are not the test split's: is it another competition's (or "
                        "year's) sample, or another copy of the dataset?")  # fmt: skip
    return header, ids, problems


def foreign_header(sample: Path, header: tuple[str, ...], spec: CompetitionSpec) -> str | None:
    """Why ``sample`` cannot be this competition's sample submission, judged by its header; None when it can. Kaggle's
    own file wins over the built-in header where the two differ only in letter case; ``generic`` takes any header."""
    if spec.name == "generic" or [c.lower() for c in header] == [c.lower() for c in spec.columns]:
        return None
    return (f"{sample}: its header {','.join(header)} is not a {spec.name} submission's ({','.join(spec.columns)}): "
            f"is it another competition's sample? Use the {spec.name} sample_submission.csv")  # fmt: skip


def _normalised_ids(ids: Iterable[object], spec: CompetitionSpec) -> dict[str, None]:
    """Ids as the text the file holds (ints without leading zeros), in order, as an ordered set."""
    return dict.fromkeys(_id_key(value, spec) for value in ids)


def _normalised_categories(categories: Iterable[object], spec: CompetitionSpec) -> set[str]:
    if spec.predictions == "name":
        return {str(value) for value in categories}
    return {_id_key(value, spec, force_int=True) for value in categories}


def _id_key(value: object, spec: CompetitionSpec, force_int: bool = False) -> str:
    text = str(value).strip()
    if (force_int or spec.id_type == "int") and _INTEGER.fullmatch(text):
        return str(int(text))
    return text


def _collect(
    lines: Iterable[str],
    spec: CompetitionSpec,
    header: tuple[str, ...],
    reference_ids: dict[str, None] | None,
    reference_kind: str,
    valid_categories: set[str] | None,
) -> list[str]:
    records = _numbered_records(lines)
    first = next(records, None)
    if first is None:
        return [f"line 1: the file is empty; it needs the header {','.join(header)} and one row per test image"]
    problems = _header_problems(first[1], header)
    first_line_of: dict[str, int] = {}
    rows = 0
    for line, row in records:
        rows += 1
        row_problems, key = _row_problems(line, row, spec, len(header), valid_categories)
        problems += row_problems
        if key is None:
            continue
        if key in first_line_of:
            problems.append(f"line {line}: duplicate id {key} (first on line {first_line_of[key]})")
            continue
        first_line_of[key] = line
        if reference_ids is not None and key not in reference_ids:
            problems.append(f"line {line}: id {key} is not in the {reference_kind}")
    if rows == 0:
        problems.append("line 2: no prediction rows after the header; Kaggle needs one row per test image")
    if reference_ids is not None:
        missing = [key for key in reference_ids if key not in first_line_of]
        if missing:
            problems.append(
                f"missing rows: {len(missing)} of {len(reference_ids)} {reference_kind} ids have no row "
                f"(e.g. {', '.join(missing[:_SHOWN_IDS])}); Kaggle needs exactly one row per test image"
            )
    return problems


def _numbered_records(lines: Iterable[str]) -> Iterator[tuple[int, list[str]]]:
    """CSV records with the 1-based file line each one starts on."""
    reader = csv.reader(lines)
    start = 1
    for row in reader:
        yield start, row
        start = reader.line_num + 1


def _header_problems(found: list[str], expected: tuple[str, ...]) -> list[str]:
    if tuple(found) == expected:
        return []
    shown, wanted = ",".join(found), ",".join(expected)
    if found and found[0].startswith("\ufeff"):
        return [f"line 1: the header starts with a byte-order mark; save the file as UTF-8 without BOM ({wanted})"]
    if [name.lower() for name in found] == [name.lower() for name in expected]:
        return [f"line 1: header {shown!r} differs from {wanted!r} in letter case; Kaggle matches it exactly"]
    return [f"line 1: header {shown!r} should be {wanted!r}"]


def _row_problems(
    line: int, row: list[str], spec: CompetitionSpec, n_columns: int, valid_categories: set[str] | None
) -> tuple[list[str], str | None]:
    """Problems of one data row, and its normalised id (None when the id itself is unusable)."""
    if not row or row == [""]:
        return [f"line {line}: empty line; remove it"], None
    if len(row) != n_columns:
        problems = [f"line {line}: {len(row)} columns, expected {n_columns} (a comma inside a value must be quoted)"]
    else:
        problems = _prediction_problems(line, row[-1], spec, valid_categories)
    raw_id = row[0]
    id_problem = _id_problem(line, raw_id, spec)
    if id_problem:
        return [id_problem, *problems], None
    return problems, _id_key(raw_id, spec)


def _id_problem(line: int, raw_id: str, spec: CompetitionSpec) -> str | None:
    if not raw_id:
        return f"line {line}: empty id"
    if spec.id_type == "int" and not _INTEGER.fullmatch(raw_id):
        return f"line {line}: id {raw_id!r} is not an integer image id like {spec.id_example}"
    if spec.id_pattern is not None and not re.fullmatch(spec.id_pattern, raw_id):
        return f"line {line}: id {raw_id!r} is not a bare file name like {spec.id_example}"
    return None


def _prediction_problems(
    line: int, predicted: str, spec: CompetitionSpec, valid_categories: set[str] | None
) -> list[str]:
    tokens = _prediction_tokens(predicted, spec)
    if len(tokens) < spec.min_k:
        return [f"line {line}: {len(tokens)} predictions, too few ({spec.name} needs {spec.count_rule()})"]
    if spec.max_k is not None and len(tokens) > spec.max_k:
        return [f"line {line}: {len(tokens)} predictions, too many ({spec.name} needs {spec.count_rule()})"]
    problems = []
    repeated = sorted({t for t in tokens if tokens.count(t) > 1})
    if repeated:  # top-k metrics count distinct guesses: a repeat silently wastes one
        problems.append(f"line {line}: category {repeated[0]} predicted more than once in the row")
    for token in tokens:
        if spec.predictions == "category_id" and not _INTEGER.fullmatch(token):
            problems.append(f"line {line}: prediction {token!r} is not an integer category id")
        elif valid_categories is not None and _category_key(token, spec) not in valid_categories:
            problems.append(f"line {line}: {token!r} is not a valid category")
    return problems


def _prediction_tokens(predicted: str, spec: CompetitionSpec) -> list[str]:
    """Category ids are space-separated; a class name is one prediction even when it contains spaces."""
    if spec.predictions == "name":
        return [predicted] if predicted else []
    return predicted.split()


def _category_key(token: str, spec: CompetitionSpec) -> str:
    return str(int(token)) if spec.predictions == "category_id" else token
