"""Kaggle writers parse back to the given predictions; the validator names each problem and its line."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fgvc.errors import ConfigError, DataError
from fgvc.probs import Probabilities
from fgvc.submission import (
    COMPETITIONS,
    SubmissionError,
    collect_problems,
    predictions_to_frame,
    validate_submission,
    validate_submission_file,
    write_submission,
)

# non-contiguous original category ids, as in NABirds or Herbarium 2022
CATEGORY_IDS = np.array([3, 17, 42, 100, 256, 999])
CLASS_NAMES = np.array(["Barn Owl", "Hummer, SUV 2000", "c42", "c100", "c256", "c999"])
PROBS = np.array(
    [
        [0.05, 0.30, 0.10, 0.25, 0.20, 0.10],  # label order 1 3 4 2 5 0 (2 before 5 on the 0.10 tie)
        [0.50, 0.00, 0.00, 0.00, 0.00, 0.50],  # 0 5 1 2 3 4 (ties keep the lower index first)
        [0.00, 0.00, 0.00, 0.00, 0.00, 1.00],  # 5 0 1 2 3 4
    ]
)
# the same orders written as original category ids, by hand
EXPECTED_TOP = [
    ["17", "100", "256", "42", "999", "3"],
    ["3", "999", "17", "42", "100", "256"],
    ["999", "3", "17", "42", "100", "256"],
]
INT_IDS = np.array([268243, 268244, 268245])
FILE_IDS = np.array(["00000.jpg", "00001.jpg", "00123.jpg"])


def make_probs(image_ids: np.ndarray = INT_IDS, probs: np.ndarray = PROBS, **kwargs) -> Probabilities:
    return Probabilities(
        probs=probs.astype(np.float32),
        image_ids=image_ids,
        labels=np.full(len(image_ids), -1),
        category_ids=kwargs.get("category_ids", CATEGORY_IDS),
        class_names=kwargs.get("class_names", CLASS_NAMES),
    )


def read_back(path: Path) -> list[list[str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.reader(fh))


# --------------------------------------------------------------------------------------------------- writers
@pytest.mark.parametrize(
    ("competition", "header", "n_predictions"),
    [
        ("inat2017", ["id", "predicted"], 5),
        ("inat2018", ["id", "predicted"], 3),
        ("inat2019", ["id", "predicted"], 5),
        ("inat2021", ["Id", "Predicted"], 5),
        ("herbarium2020", ["Id", "Predicted"], 1),
        ("herbarium2021", ["Id", "Predicted"], 1),
        ("herbarium2022", ["Id", "Predicted"], 1),
    ],
)
def test_integer_id_writers_parse_back(tmp_path: Path, competition: str, header: list[str], n_predictions: int) -> None:
    path = write_submission(make_probs(), competition, tmp_path / "sub.csv")
    rows = read_back(path)
    assert rows[0] == header
    assert [row[0] for row in rows[1:]] == ["268243", "268244", "268245"]
    assert [row[1].split(" ") for row in rows[1:]] == [top[:n_predictions] for top in EXPECTED_TOP]
    frame = pd.read_csv(path)  # what Kaggle-style tooling sees: two columns, integer ids, no index column
    assert list(frame.columns) == header and frame[header[0]].dtype.kind == "i"
    validate_submission(path, competition, test_ids=INT_IDS, valid_categories=CATEGORY_IDS)


def test_file_bytes_are_exactly_kaggle_csv(tmp_path: Path) -> None:
    path = write_submission(make_probs(), "inat2021", tmp_path / "sub.csv")
    assert path.read_bytes() == (
        b"Id,Predicted\n268243,17 100 256 42 999\n268244,3 999 17 42 100\n268245,999 3 17 42 100\n"
    )
    assert [p.name for p in tmp_path.iterdir()] == ["sub.csv"]  # no temp file left behind


def test_herbarium2019_writes_file_name_ids(tmp_path: Path) -> None:
    path = write_submission(make_probs(FILE_IDS), "herbarium2019", tmp_path / "sub.csv")
    rows = read_back(path)
    assert rows[0] == ["Id", "Category"]
    assert [row[0] for row in rows[1:]] == ["00000.jpg", "00001.jpg", "00123.jpg"]
    assert [row[1].split(" ") for row in rows[1:]] == [top[:5] for top in EXPECTED_TOP]
    assert pd.read_csv(path, dtype=str)["Id"].tolist() == FILE_IDS.tolist()


def test_herbarium2019_top_k_is_configurable(tmp_path: Path) -> None:
    path = write_submission(make_probs(FILE_IDS), "herbarium2019", tmp_path / "sub.csv", k=1)
    assert [row[1] for row in read_back(path)[1:]] == ["17", "3", "999"]


def test_generic_writes_top1_class_names(tmp_path: Path) -> None:
    path = write_submission(make_probs(np.array(["a", "b", "c"])), "generic", tmp_path / "sub.csv")
    rows = read_back(path)
    assert rows == [["id", "label"], ["a", "Hummer, SUV 2000"], ["b", "Barn Owl"], ["c", "c999"]]
    validate_submission(path, "generic", test_ids=["a", "b", "c"], valid_categories=CLASS_NAMES)


def test_string_category_ids_that_are_integers_are_written_as_integers() -> None:
    probs = make_probs(category_ids=np.array(["3", "17", "42", "100", "256", "999"]))
    frame = predictions_to_frame(probs, "herbarium2020")
    assert frame["Predicted"].tolist() == ["17", "3", "999"]


def test_predictions_to_frame_columns_and_types() -> None:
    frame = predictions_to_frame(make_probs(), "inat2018")
    assert list(frame.columns) == ["id", "predicted"]
    assert frame["id"].tolist() == INT_IDS.tolist()
    assert frame["predicted"].tolist() == [" ".join(top[:3]) for top in EXPECTED_TOP]


def test_k_outside_the_competition_rule_is_rejected() -> None:
    with pytest.raises(ConfigError, match="exactly 5"):
        predictions_to_frame(make_probs(), "inat2021", k=3)


def test_too_few_classes_for_an_exact_count() -> None:
    three_classes = np.array([[0.2, 0.5, 0.3], [0.6, 0.2, 0.2], [0.1, 0.1, 0.8]])
    probs = make_probs(probs=three_classes, category_ids=CATEGORY_IDS[:3], class_names=CLASS_NAMES[:3])
    with pytest.raises(DataError, match="only 3 classes"):
        predictions_to_frame(probs, "inat2021")
    assert predictions_to_frame(probs, "inat2019")["predicted"].tolist() == ["17 42 3", "3 17 42", "42 3 17"]


def test_non_integer_image_ids_are_rejected_for_integer_competitions() -> None:
    with pytest.raises(DataError, match="integer image ids"):
        predictions_to_frame(make_probs(FILE_IDS), "inat2019")


def test_the_leaderboard_metric_is_the_competitions_and_top1_elsewhere() -> None:
    from fgvc.submission import leaderboard_metric

    assert [leaderboard_metric(d) for d in ("inat2017", "inat2018", "inat2021", "herbarium2022", "cub", "demo")] == [
        "top5", "top3", "top1", "macro_f1", "top1", "top1"]  # fmt: skip


def test_unknown_competition_names_the_choices() -> None:
    with pytest.raises(ConfigError, match="inat2019"):
        predictions_to_frame(make_probs(), "inat2020")


def test_every_competition_has_a_consistent_spec() -> None:
    for name, spec in COMPETITIONS.items():
        assert spec.name == name
        assert spec.min_k <= spec.write_k and (spec.max_k is None or spec.write_k <= spec.max_k)


# --------------------------------------------------------------------------------------------------- validator
VALID_INAT2021 = "Id,Predicted\n1,9279 608 1220 6626 8696\n2,1 2 3 4 5\n3,5 4 3 2 1\n"
TEST_IDS = [1, 2, 3]
CATEGORIES = range(10000)


def write_text(tmp_path: Path, text: str, name: str = "sub.csv") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def the_problem(path: Path, competition: str = "inat2021", **kwargs) -> str:
    kwargs.setdefault("test_ids", TEST_IDS)
    kwargs.setdefault("valid_categories", CATEGORIES)
    problems = collect_problems(path, competition, **kwargs)
    assert len(problems) == 1, problems
    with pytest.raises(SubmissionError) as caught:
        validate_submission(path, competition, **kwargs)
    message = str(caught.value)
    assert "\n" not in message and str(path) in message and problems[0] in message
    return problems[0]


def test_valid_file_passes(tmp_path: Path) -> None:
    path = write_text(tmp_path, VALID_INAT2021)
    assert collect_problems(path, "inat2021", TEST_IDS, CATEGORIES) == []
    validate_submission(path, "inat2021", TEST_IDS, CATEGORIES)
    validate_submission(path, "inat2021")  # without a reference only the format is checked


def test_crlf_line_ends_are_accepted(tmp_path: Path) -> None:
    path = tmp_path / "sub.csv"
    path.write_bytes(VALID_INAT2021.replace("\n", "\r\n").encode())
    assert collect_problems(path, "inat2021", TEST_IDS, CATEGORIES) == []


def test_missing_row(tmp_path: Path) -> None:
    path = write_text(tmp_path, "Id,Predicted\n1,9279 608 1220 6626 8696\n3,5 4 3 2 1\n")
    problem = the_problem(path)
    assert "missing rows" in problem and "1 of 3" in problem and "e.g. 2" in problem


def test_duplicate_id(tmp_path: Path) -> None:
    path = write_text(tmp_path, VALID_INAT2021 + "2,1 2 3 4 5\n")
    assert the_problem(path) == "line 5: duplicate id 2 (first on line 3)"


def test_wrong_header_case(tmp_path: Path) -> None:
    path = write_text(tmp_path, VALID_INAT2021.replace("Id,Predicted", "id,predicted"))
    problem = the_problem(path)
    assert problem.startswith("line 1:") and "letter case" in problem and "Id,Predicted" in problem


def test_wrong_header(tmp_path: Path) -> None:
    path = write_text(tmp_path, VALID_INAT2021.replace("Id,Predicted", "image,label"))
    assert the_problem(path) == "line 1: header 'image,label' should be 'Id,Predicted'"


def test_too_few_predictions(tmp_path: Path) -> None:
    path = write_text(tmp_path, VALID_INAT2021.replace("2,1 2 3 4 5", "2,1 2 3 4"))
    problem = the_problem(path)
    assert problem.startswith("line 3:") and "too few" in problem and "exactly 5" in problem


def test_too_many_predictions(tmp_path: Path) -> None:
    path = write_text(tmp_path, "id,predicted\n1,1 2 3 4\n2,1 2 3\n3,1 2 3\n")
    problem = the_problem(path, "inat2018")
    assert problem.startswith("line 2:") and "too many" in problem


def test_no_prediction_at_all(tmp_path: Path) -> None:
    path = write_text(tmp_path, "id,predicted\n1,\n2,4\n3,5 6\n")
    problem = the_problem(path, "inat2019")
    assert problem.startswith("line 2:") and "too few" in problem and "at least 1" in problem


def test_unknown_id(tmp_path: Path) -> None:
    path = write_text(tmp_path, VALID_INAT2021 + "4,1 2 3 4 5\n")
    assert the_problem(path) == "line 5: id 4 is not in the test set"


def test_unknown_category(tmp_path: Path) -> None:
    path = write_text(tmp_path, VALID_INAT2021.replace("9279 608", "9279 10000"))
    assert the_problem(path) == "line 2: '10000' is not a valid category"


def test_non_integer_prediction(tmp_path: Path) -> None:
    path = write_text(tmp_path, VALID_INAT2021.replace("1 2 3 4 5", "1 2 3.0 4 5"))
    problem = the_problem(path)
    assert problem.startswith("line 3:") and "'3.0' is not an integer category id" in problem


def test_non_integer_id(tmp_path: Path) -> None:
    path = write_text(tmp_path, VALID_INAT2021.replace("\n3,", "\nthree,"))
    problems = collect_problems(path, "inat2021", TEST_IDS, CATEGORIES)
    assert problems[0].startswith("line 4:") and "'three' is not an integer image id" in problems[0]
    assert "missing rows" in problems[1]  # id 3 then has no usable row
    assert len(problems) == 2


def test_wrong_number_of_columns(tmp_path: Path) -> None:
    path = write_text(tmp_path, VALID_INAT2021.replace("2,1 2 3 4 5", "2,1 2 3 4 5,extra"))
    problem = the_problem(path)
    assert problem.startswith("line 3:") and "3 columns, expected 2" in problem


def test_empty_line(tmp_path: Path) -> None:
    path = write_text(tmp_path, VALID_INAT2021.replace("\n2,", "\n\n2,"))
    assert the_problem(path) == "line 3: empty line; remove it"


def test_empty_file(tmp_path: Path) -> None:
    assert "empty" in the_problem(write_text(tmp_path, ""))


def test_herbarium2019_ids_must_be_bare_file_names(tmp_path: Path) -> None:
    path = write_text(tmp_path, "Id,Category\n00000.jpg,1 2\ntest/00001.jpg,3\n")
    problem = the_problem(path, "herbarium2019", test_ids=None, valid_categories=None)
    assert problem.startswith("line 3:") and "bare file name like 00123.jpg" in problem


def test_herbarium2019_ids_keep_leading_zeros(tmp_path: Path) -> None:
    path = write_text(tmp_path, "Id,Category\n00000.jpg,1 2\n0.jpg,3\n")
    problem = the_problem(path, "herbarium2019", test_ids=["00000.jpg"], valid_categories=None)
    assert problem == "line 3: id 0.jpg is not in the test set"


def test_all_problems_are_collected_and_counted(tmp_path: Path) -> None:
    path = write_text(tmp_path, "id,predicted\n1,1 2 3 4\n1,1 2 3 4 5\n7,x 2 3 4 5\n")
    problems = collect_problems(path, "inat2021", TEST_IDS, CATEGORIES)
    assert [problem.split(":")[0] for problem in problems] == [
        "line 1",  # header case
        "line 2",  # too few
        "line 3",  # duplicate id 1
        "line 4",  # 'x'
        "line 4",  # unknown id 7
        "missing rows",  # 2 and 3
    ]
    with pytest.raises(SubmissionError, match=r"line 1: .*\(and 5 more problems\)$"):
        validate_submission(path, "inat2021", TEST_IDS, CATEGORIES)


def test_sample_header_and_ids_are_the_reference(tmp_path: Path) -> None:
    sample = write_text(tmp_path, "Id,Predicted\n10,0\n11,0\n", name="sample_submission.csv")
    good = write_text(tmp_path, "Id,Predicted\n11,5\n10,7\n", name="good.csv")
    validate_submission(good, "herbarium2022", sample=sample)
    wrong_case = write_text(tmp_path, "Id,predicted\n10,5\n11,7\n", name="case.csv")
    problem = the_problem(wrong_case, "herbarium2022", test_ids=None, valid_categories=None, sample=sample)
    assert problem.startswith("line 1:") and "letter case" in problem
    unknown = write_text(tmp_path, "Id,Predicted\n10,5\n11,7\n12,7\n", name="unknown.csv")
    problem = the_problem(unknown, "herbarium2022", test_ids=None, valid_categories=None, sample=sample)
    assert problem == "line 4: id 12 is not in the sample submission"


def test_a_sample_header_overrides_the_competition_default(tmp_path: Path) -> None:
    # the NAFlora-1M README shows `Id,predicted`; a sample file with that header is what Kaggle would check against
    sample = write_text(tmp_path, "Id,predicted\n10,0\n", name="sample_submission.csv")
    path = write_text(tmp_path, "Id,predicted\n10,3\n")
    validate_submission(path, "herbarium2022", sample=sample)


def test_a_sample_of_another_competition_is_refused(tmp_path: Path) -> None:
    """Herbarium 2019's sample (Id,Category) for an iNat 2021 file: its header won, and the file passed."""
    sample = write_text(tmp_path, "Id,Category\n10,0\n", name="sample_submission.csv")
    path = write_text(tmp_path, "Id,Category\n10,3 4 5 6 7\n")
    problem = the_problem(path, "inat2021", test_ids=None, valid_categories=None, sample=sample)
    assert problem == (f"{sample}: its header Id,Category is not a inat2021 submission's (Id,Predicted): is it another "
                       "competition's sample? Use the inat2021 sample_submission.csv")
    assert collect_problems(path, "generic", sample=sample) == []  # any header for a generic file


def test_the_writer_takes_the_sample_header_and_both_id_lists_are_checked(tmp_path: Path) -> None:
    """`fgvc ensemble --sample` wrote the built-in header and then refused its own file when the sample's differs."""
    probs = Probabilities(probs=np.array([[0.9, 0.1], [0.2, 0.8]], dtype=np.float32), image_ids=np.array([10, 11]),
                          labels=np.array([-1, -1]), class_names=["a", "b"], category_ids=[5, 7])  # fmt: skip
    sample = write_text(tmp_path, "Id,predicted\n10,0\n11,0\n", name="sample_submission.csv")
    out = write_submission(probs, "herbarium2022", tmp_path / "sub.csv", header=("Id", "predicted"))
    assert out.read_text() == "Id,predicted\n10,5\n11,7\n"
    validate_submission(out, "herbarium2022", sample=sample)
    problems = collect_problems(out, "herbarium2022", test_ids=[10, 12], sample=sample)
    assert len(problems) == 1 and f"{sample}: its 2 ids are not the test split's" in problems[0]


def test_missing_files_are_submission_errors(tmp_path: Path) -> None:
    with pytest.raises(SubmissionError, match="not found"):
        validate_submission(tmp_path / "nope.csv", "inat2019")
    path = write_text(tmp_path, VALID_INAT2021)
    with pytest.raises(SubmissionError, match="sample submission not found"):
        validate_submission(path, "inat2021", sample=tmp_path / "nope.csv")
    assert issubclass(SubmissionError, DataError)


def test_a_repeated_category_in_a_row_and_an_empty_file_are_rejected(tmp_path) -> None:
    from fgvc.submission import collect_problems

    path = tmp_path / "sub.csv"
    path.write_text("id,predicted\n1,5 5 5 5 5\n")
    assert any("line 2" in p and "more than once" in p for p in collect_problems(path, "inat2017"))
    path.write_text("id,predicted\n")
    assert any("no prediction rows" in p for p in collect_problems(path, "inat2019"))


def test_the_library_validation_takes_paths_as_strings(tmp_path: Path) -> None:
    """Every public function takes str or Path; this one raised AttributeError ('str' has no is_file) on a str."""
    with pytest.raises(DataError, match=r"missing.csv: no such file"):
        validate_submission_file(str(tmp_path / "missing.csv"), "generic", sample=str(tmp_path / "sample.csv"))
    written = tmp_path / "sub.csv"
    written.write_text("id,predicted\n1,3\n")
    sample = tmp_path / "sample.csv"
    sample.write_text("id,predicted\n1,0\n")
    assert validate_submission_file(str(written), "generic", sample=str(sample)) == []
