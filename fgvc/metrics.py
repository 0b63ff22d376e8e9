"""Classification metrics on arrays: top-k, mean per-class accuracy, macro F1, log-loss. No I/O.

Ranking ties are broken towards the lower label index everywhere (the same rule as ``np.argmax``), and
:func:`topk_indices` is the single ranking used by the metrics and by the Kaggle writers, so the accuracy we report
is the accuracy of the file we submit.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import f1_score

UNKNOWN_LABEL = -1
LOG_EPS = 1e-7  # floor of log-loss and geometric means: one member's near-zero probability does not veto a class
_ROWS_PER_CHUNK = 1024  # bounds the temporary (rows, C) arrays (~80 MB at C = 10,000) when ranking large test sets


def topk_indices(scores: np.ndarray, k: int) -> np.ndarray:
    """(N, min(k, C)) label indices by decreasing score; equal scores keep the lower index first.

    ``np.argpartition`` finds the candidates in O(C) per row; only rows where a tie straddles the k-th place are
    re-ranked with a full stable sort, so the result equals ``np.argsort(-scores, kind="stable")[:, :k]``.
    """
    scores = _as_score_matrix(scores)
    n_rows, n_classes = scores.shape
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    k = min(k, n_classes)
    chunks = [
        _topk_rows(scores[start : start + _ROWS_PER_CHUNK], k) for start in range(0, n_rows, _ROWS_PER_CHUNK)
    ]
    return np.concatenate(chunks) if chunks else np.empty((0, k), dtype=np.int64)


def _topk_rows(scores: np.ndarray, k: int) -> np.ndarray:
    if k == 1:  # argmax keeps the first of equal scores too, ~15x faster than the partition at 10,000 classes
        best = np.argmax(scores, axis=1)
        if scores.dtype.kind == "f":  # argmax picks a NaN first, the stable sort ranks NaNs last
            nan_rows = np.isnan(scores[np.arange(len(best)), best])
            if nan_rows.any():
                best[nan_rows] = np.argsort(-scores[nan_rows], axis=1, kind="stable")[:, 0]
        return best[:, None].astype(np.int64)
    negated = -scores.astype(np.int64) if scores.dtype.kind in "ub" else -scores  # unsigned negation would wrap
    if k == scores.shape[1]:
        return np.argsort(negated, axis=1, kind="stable")
    candidates = np.argpartition(negated, k - 1, axis=1)[:, :k]
    candidate_scores = np.take_along_axis(negated, candidates, axis=1)
    order = np.lexsort((candidates, candidate_scores), axis=1)  # by score, then by index
    top = np.take_along_axis(candidates, order, axis=1)
    kth_score = candidate_scores.max(axis=1, keepdims=True)
    straddling = (negated <= kth_score).sum(axis=1) > k  # more classes tie for the last place than fit
    if negated.dtype.kind == "f":  # a NaN among the candidates: the stable sort places it (last)
        straddling |= np.isnan(kth_score[:, 0])
    if straddling.any():
        top[straddling] = np.argsort(negated[straddling], axis=1, kind="stable")[:, :k]
    return top.astype(np.int64, copy=False)


def topk_accuracy(scores: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Fraction (0-1) of rows whose label is among the k best scores; k is clipped to the number of classes.

    Not ``sklearn.metrics.top_k_accuracy_score``: it breaks ties towards the *higher* index (so its top-1 disagrees
    with ``argmax``) and treats two-column scores as a binary problem.
    """
    scores = _as_score_matrix(scores)
    labels = _as_labels(labels, scores.shape)
    if not len(labels):
        raise ValueError("no rows to score")
    hits = (topk_indices(scores, k) == labels[:, None]).any(axis=1)
    return float(hits.mean())


def mean_per_class_accuracy(pred: np.ndarray, labels: np.ndarray) -> float:
    """Mean over the classes present in ``labels`` of each class's recall (0-1), i.e. balanced accuracy.

    Counted per class, not with ``sklearn.metrics.balanced_accuracy_score``, whose dense C x C confusion matrix needs
    1.7 GB at iNat 2021's 10,000 classes and ~33 GB at Herbarium 2021's 64,500.
    """
    labels, pred = np.asarray(labels), np.asarray(pred)
    if labels.shape != pred.shape or not len(labels):
        raise ValueError(f"{len(pred)} predictions for {len(labels)} labels: need one per labelled row")
    _, per_class = np.unique(labels, return_inverse=True)
    recall = np.bincount(per_class, weights=pred == labels) / np.bincount(per_class)
    return float(recall.mean())


def macro_f1(pred: np.ndarray, labels: np.ndarray) -> float:
    """Unweighted mean F1 over every class that is labelled or predicted (0-1): the Herbarium 2020-22 metric."""
    return float(f1_score(np.asarray(labels), np.asarray(pred), average="macro", zero_division=0))


def log_loss(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean negative log-probability of the true label, with probabilities floored at ``LOG_EPS``.

    Hand-written because it only needs the N true-label entries; ``sklearn.metrics.log_loss`` one-hot encodes the
    labels into another (N, C) array and rejects rows that are a little off summing to one.
    """
    probs = _as_score_matrix(probs)
    labels = _as_labels(labels, probs.shape)
    if not len(labels):
        raise ValueError("no rows to score")
    true_probs = probs[np.arange(len(labels)), labels].astype(np.float64)
    return float(-np.log(np.maximum(true_probs, LOG_EPS)).mean())


METRIC_LABELS = {"top1": "top-1", "top3": "top-3", "top5": "top-5", "mean_per_class": "mean/class",
                 "macro_f1": "macro F1"}  # fmt: skip


def summarize(scores: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """``top1``, ``top3``, ``top5``, ``mean_per_class`` and ``macro_f1`` in percent over the labelled rows (label
    != -1): every leaderboard metric of :data:`fgvc.submission.COMPETITIONS`, so training keeps the model the
    leaderboard would rank highest."""
    scores = _as_score_matrix(scores)
    labels = np.asarray(labels)
    if labels.shape != (scores.shape[0],):
        raise ValueError(f"{scores.shape[0]} score rows but labels of shape {labels.shape}")
    known = labels != UNKNOWN_LABEL
    if not known.any():
        raise ValueError("no labelled rows: metrics need a split with known labels (not a test split)")
    scores, labels = scores[known], labels[known]
    ranked = topk_indices(scores, 5)  # one ranking for every k (ranks are nested) and the prediction
    hits, pred = ranked == labels[:, None], ranked[:, 0]
    return {
        "top1": 100.0 * float(hits[:, :1].any(axis=1).mean()),  # plain floats: checkpoints load with weights_only
        "top3": 100.0 * float(hits[:, :3].any(axis=1).mean()),
        "top5": 100.0 * float(hits.any(axis=1).mean()),
        "mean_per_class": 100.0 * mean_per_class_accuracy(pred, labels),
        "macro_f1": 100.0 * macro_f1(pred, labels),
    }


def _as_score_matrix(scores: np.ndarray) -> np.ndarray:
    scores = np.asarray(scores)
    if scores.ndim != 2 or scores.shape[1] == 0:
        raise ValueError(f"scores must be an (N, C) array with C >= 1, got shape {scores.shape}")
    return scores


def _as_labels(labels: np.ndarray, score_shape: tuple[int, ...]) -> np.ndarray:
    labels = np.asarray(labels)
    n_rows, n_classes = score_shape
    if labels.shape != (n_rows,):
        raise ValueError(f"{n_rows} score rows but labels of shape {labels.shape}")
    if labels.dtype.kind not in "iu":
        raise ValueError(f"labels must be integer label indices, got dtype {labels.dtype}")
    if len(labels) and (labels.min() < 0 or labels.max() >= n_classes):
        raise ValueError(f"labels must lie in [0, {n_classes}); drop unknown (-1) rows first")
    return labels.astype(np.int64, copy=False)
