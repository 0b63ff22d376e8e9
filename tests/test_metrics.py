"""Metrics against hand-computed values; the ranking helper against a full stable sort."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

from fgvc.metrics import log_loss, macro_f1, mean_per_class_accuracy, summarize, topk_accuracy, topk_indices

# rows: pred (top-1, lower index on ties) = 1, 0, 2, 0; second-best = 2, 2, 0, 1
SCORES = np.array(
    [
        [0.1, 0.6, 0.3],
        [0.5, 0.2, 0.3],
        [0.2, 0.2, 0.6],
        [0.4, 0.4, 0.2],
    ]
)
LABELS = np.array([1, 1, 2, 1])


def test_topk_accuracy_by_hand() -> None:
    assert topk_accuracy(SCORES, LABELS, 1) == pytest.approx(2 / 4)  # rows 0 and 2
    assert topk_accuracy(SCORES, LABELS, 2) == pytest.approx(3 / 4)  # row 1's label has the lowest score
    assert topk_accuracy(SCORES, LABELS, 3) == pytest.approx(1.0)


def test_topk_accuracy_clips_k_to_the_number_of_classes() -> None:
    assert topk_accuracy(SCORES, LABELS, 10) == pytest.approx(1.0)


def test_topk_accuracy_accepts_logits() -> None:
    logits = np.array([[2.0, -1.0, 0.5], [-3.0, -0.5, -2.0]])
    assert topk_accuracy(logits, np.array([0, 2]), 1) == pytest.approx(0.5)
    assert topk_accuracy(logits, np.array([0, 2]), 2) == pytest.approx(1.0)


def test_ties_go_to_the_lower_index() -> None:
    tied = np.array([[0.4, 0.4, 0.2]])
    assert topk_accuracy(tied, np.array([0]), 1) == 1.0
    assert topk_accuracy(tied, np.array([1]), 1) == 0.0
    assert topk_indices(np.array([[0.0, 0.25, 0.5, 0.25]]), 2).tolist() == [[2, 1]]
    assert topk_indices(np.array([[0.1, 0.1, 0.1, 0.1]]), 3).tolist() == [[0, 1, 2]]


def test_topk_indices_equals_a_full_stable_sort_with_many_ties() -> None:
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 4, size=(2500, 40)).astype(np.float32)  # 4 distinct values in 40 columns: ties galore
    for k in (1, 2, 5, 17, 40):
        expected = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        np.testing.assert_array_equal(topk_indices(scores, k), expected)


def test_topk_indices_ranks_nan_scores_last_for_every_k() -> None:
    """k=1 took argmax, which picks a NaN first, while k>1 ranked NaNs last: the two disagreed on a row's best class."""
    rng = np.random.default_rng(2)
    scores = rng.random((300, 12)).astype(np.float32)
    scores[rng.random(scores.shape) < 0.2] = np.nan
    scores[7] = np.nan  # a row of NaNs only
    for k in (1, 2, 12):
        expected = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        np.testing.assert_array_equal(topk_indices(scores, k), expected)


def test_topk_indices_on_float16_probabilities() -> None:
    rng = np.random.default_rng(1)
    probs = rng.dirichlet(np.ones(30), size=200).astype(np.float16)
    expected = np.argsort(-probs.astype(np.float64), axis=1, kind="stable")[:, :5]
    np.testing.assert_array_equal(topk_indices(probs, 5), expected)


def test_mean_per_class_accuracy_by_hand() -> None:
    pred = np.array([0, 0, 1, 1, 1, 2])
    labels = np.array([0, 0, 0, 1, 1, 2])
    # recalls: class 0 2/3, class 1 2/2, class 2 1/1
    assert mean_per_class_accuracy(pred, labels) == pytest.approx((2 / 3 + 1 + 1) / 3)


def test_mean_per_class_accuracy_ignores_classes_only_predicted() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert mean_per_class_accuracy(np.array([3, 0]), np.array([0, 0])) == pytest.approx(0.5)
        # a hold-out of one class, all predicted right (a small val split): sklearn warns about the confusion matrix
        assert mean_per_class_accuracy(np.array([2, 2]), np.array([2, 2])) == pytest.approx(1.0)


def test_macro_f1_by_hand() -> None:
    pred = np.array([0, 0, 1, 1, 1, 2])
    labels = np.array([0, 0, 0, 1, 1, 2])
    # class 0: P 2/2, R 2/3 -> 0.8; class 1: P 2/3, R 2/2 -> 0.8; class 2: 1.0
    assert macro_f1(pred, labels) == pytest.approx((0.8 + 0.8 + 1.0) / 3)


def test_log_loss_by_hand() -> None:
    probs = np.array([[0.5, 0.5], [0.25, 0.75]])
    assert log_loss(probs, np.array([0, 1])) == pytest.approx(-(math.log(0.5) + math.log(0.75)) / 2)
    assert log_loss(np.array([[0.0, 1.0]]), np.array([0])) == pytest.approx(-math.log(1e-7))


def test_summarize_in_percent_ignoring_unknown_labels() -> None:
    scores = np.vstack([SCORES, [[0.9, 0.05, 0.05], [0.0, 0.0, 1.0]]])
    labels = np.concatenate([LABELS, [-1, -1]])
    summary = summarize(scores, labels)
    # preds 1, 0, 2, 0 vs labels 1, 1, 2, 1
    assert summary["top1"] == pytest.approx(50.0)
    assert summary["top5"] == pytest.approx(100.0)  # k = 5 clipped to the 3 classes
    assert summary["mean_per_class"] == pytest.approx(100 * (1 / 3 + 1) / 2)  # class 1: 1 of 3, class 2: 1 of 1
    # class 0: 0 (two false positives); class 1: P 1, R 1/3 -> 0.5; class 2: 1
    assert summary["macro_f1"] == pytest.approx(100 * (0 + 0.5 + 1) / 3)


def test_summarize_reports_top3_for_inat2018s_leaderboard() -> None:
    scores = np.array([[0.5, 0.2, 0.15, 0.1, 0.05], [0.5, 0.2, 0.15, 0.1, 0.05]])
    summary = summarize(scores, np.array([2, 3]))  # ranked 3rd and 4th
    assert (summary["top1"], summary["top3"], summary["top5"]) == pytest.approx((0.0, 50.0, 100.0))
    assert all(type(value) is float for value in summary.values())  # numpy scalars would not load from a checkpoint


def test_summarize_needs_labelled_rows() -> None:
    with pytest.raises(ValueError, match="no labelled rows"):
        summarize(SCORES, np.full(4, -1))


@pytest.mark.parametrize("bad_labels", [np.array([0, 1, 2, 3]), np.array([0, 1, 2]), np.array([0.0, 1.0, 2.0, 1.0])])
def test_bad_labels_are_rejected(bad_labels: np.ndarray) -> None:
    with pytest.raises(ValueError):
        topk_accuracy(SCORES, bad_labels, 1)


@pytest.mark.parametrize("n_classes", [2, 7, 300])
def test_mean_per_class_accuracy_is_sklearns_balanced_accuracy(n_classes: int) -> None:
    """Counted per class (no C x C matrix, which would not fit at Herbarium 2021's 64,500 classes), same value."""
    from sklearn.metrics import balanced_accuracy_score

    rng = np.random.default_rng(n_classes)
    labels = rng.integers(0, n_classes, 4000)
    pred = np.where(rng.random(4000) < 0.5, labels, rng.integers(0, n_classes + 3, 4000))  # some never labelled
    with pytest.warns(UserWarning, match="y_pred contains classes not in y_true"):
        expected = balanced_accuracy_score(labels, pred)
    assert mean_per_class_accuracy(pred, labels) == pytest.approx(expected)


def test_top1_ranking_is_the_first_of_equal_scores_like_the_full_ranking() -> None:
    scores = np.array([[0.2, 0.4, 0.4], [0.5, 0.5, 0.0], [0.1, 0.1, 0.1]], dtype=np.float32)
    np.testing.assert_array_equal(topk_indices(scores, 1)[:, 0], [1, 0, 0])
    np.testing.assert_array_equal(topk_indices(scores, 1), topk_indices(scores, 2)[:, :1])
