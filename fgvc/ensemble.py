"""Combine probability files of several models: alignment, weighted arithmetic / geometric means, weight search.

Pure numpy on :class:`~fgvc.probs.Probabilities`; the recipe-driven ``fgvc ensemble`` command loads the files and
calls these functions. Weight search is Caruana et al. (2004) ensemble selection: greedy forward selection with
replacement on a labelled split, so weights are multiples of 1/(number of picks) and a model can be picked again.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from typing import Literal

import numpy as np
import pandas as pd

from fgvc.errors import ConfigError, DataError
from fgvc.metrics import LOG_EPS, UNKNOWN_LABEL, log_loss, macro_f1, topk_accuracy, topk_indices
from fgvc.probs import Probabilities, row_blocks

Method = Literal["mean", "geometric"]
WeightMode = Literal["equal", "given", "search"]
Weights = Sequence[float] | np.ndarray  # one per member, normalised by the combination
METHODS: tuple[str, ...] = ("mean", "geometric")
WEIGHT_MODES: tuple[str, ...] = ("equal", "given", "search")
SEARCH_METRICS: tuple[str, ...] = ("top1", "top3", "top5", "macro_f1")  # what a leaderboard scores
DEFAULT_SEARCH_STEPS = 50  # Caruana et al. plateau within a few dozen picks for a handful of members
_SHOWN_IDS = 5  # how many offending ids an error message quotes


# --------------------------------------------------------------------------------------------------- alignment
def align(members: list[Probabilities]) -> list[Probabilities]:
    """Reorder every member's rows to the first member's image-id order (see :func:`align_to`)."""
    if not members:
        raise ValueError("align needs at least one member")
    reference = align_to(None, members[0], 0)
    return [reference, *(align_to(reference, member, position) for position, member in enumerate(members[1:], 1))]


def align_to(reference: Probabilities | None, member: Probabilities, position: int) -> Probabilities:
    """``member`` with its rows in ``reference``'s image-id order (``reference`` None: ``member`` is the reference).

    Only the reference's ids, labels and classes are read, so a reference without its matrix (:func:`without_matrix`)
    will do. Raises DataError when a member has duplicate ids, a different id set, different ``category_ids`` or
    labels that disagree with the reference: each means the files were predicted on different splits or datasets.
    """
    if reference is not None:
        _check_same_classes(reference, member, position)
    _check_unique_ids(member, position)
    if reference is None:
        return member
    rows = _rows_in_reference_order(reference, member, position)
    if not np.array_equal(rows, np.arange(len(rows))):  # already in order (the usual case): no copy of the matrix
        member = replace(
            member,
            probs=np.asarray(member.probs)[rows],
            image_ids=np.asarray(member.image_ids)[rows],
            labels=np.asarray(member.labels)[rows],
            meta=_reordered_meta(member.meta, rows),
        )
    _check_same_labels(reference, member, position)
    return member


def _reordered_meta(meta: dict, rows: np.ndarray) -> dict:
    """``meta`` of a matrix whose rows were reordered by ``rows``: its ``unreadable`` row numbers follow them."""
    if not meta.get("unreadable"):
        return dict(meta)
    return meta | {"unreadable": np.flatnonzero(np.isin(rows, meta["unreadable"])).tolist()}


def without_matrix(member: Probabilities) -> Probabilities:
    """``member``'s ids, labels and classes with a zero-stride stand-in for its (N, C) matrix: a reference for
    :func:`align_to` that does not keep the matrix alive."""
    return replace(member, probs=np.broadcast_to(np.float32(0), np.shape(member.probs)))


def _describe(member: Probabilities, position: int) -> str:
    """'member 2 (runs/a/probs.npz)': the member's position plus its file, or its provenance when no file is known."""
    meta = member.meta
    source = meta.get("path") or meta.get("source")
    if not source:
        source = ", ".join(f"{key}={meta[key]}" for key in ("run", "stage", "split", "res", "tta") if key in meta)
    return f"member {position} ({source})" if source else f"member {position}"


def _sample(values: np.ndarray) -> str:
    return ", ".join(str(value) for value in values[:_SHOWN_IDS])


def _check_unique_ids(member: Probabilities, position: int) -> None:
    ids = pd.Index(member.image_ids)
    if ids.has_duplicates:
        duplicated = ids[ids.duplicated()].unique().to_numpy()
        raise DataError(
            f"ensemble {_describe(member, position)}: {len(duplicated)} image ids appear twice "
            f"(e.g. {_sample(duplicated)}); regenerate the file with `fgvc predict`"
        )


def _check_same_classes(reference: Probabilities, member: Probabilities, position: int) -> None:
    """A class is its category id, as for a checkpoint (``check_classes``): names alone may differ (iNat 2018/2019's
    real names from categories.json replace the training JSON's codes), and the ensemble keeps the first member's.
    The generic datasets, whose CSV writes names, name each class by its id."""
    if not np.array_equal(np.asarray(reference.category_ids), np.asarray(member.category_ids)):
        raise DataError(
            f"ensemble {_describe(member, position)}: its {len(member.category_ids)} classes (category ids) differ "
            f"from {_describe(reference, 0)}'s {len(reference.category_ids)}; ensemble only models trained on the "
            "same dataset and class list"
        )


def _rows_in_reference_order(reference: Probabilities, member: Probabilities, position: int) -> np.ndarray:
    member_ids = pd.Index(member.image_ids)
    rows = member_ids.get_indexer(pd.Index(reference.image_ids))
    missing = np.asarray(reference.image_ids)[rows < 0]
    extra = member_ids.difference(pd.Index(reference.image_ids)).to_numpy()
    if len(missing) or len(extra):
        raise DataError(
            f"ensemble {_describe(member, position)}: image ids differ from {_describe(reference, 0)} "
            f"({len(missing)} missing, e.g. [{_sample(missing)}]; {len(extra)} extra, e.g. [{_sample(extra)}]); "
            "predict every member on the same split"
        )
    return rows


def _check_same_labels(reference: Probabilities, member: Probabilities, position: int) -> None:
    reference_labels, member_labels = np.asarray(reference.labels), np.asarray(member.labels)
    both_known = (reference_labels != UNKNOWN_LABEL) & (member_labels != UNKNOWN_LABEL)
    disagree = both_known & (reference_labels != member_labels)
    if disagree.any():
        raise DataError(
            f"ensemble {_describe(member, position)}: labels of {int(disagree.sum())} images disagree with "
            f"{_describe(reference, 0)} (e.g. ids [{_sample(np.asarray(member.image_ids)[disagree])}]); "
            "the files come from different dataset versions, predict them again"
        )


# --------------------------------------------------------------------------------------------------- combination
def combine(
    probs_list: Sequence[np.ndarray], weights: Weights | None = None, method: Method = "mean"
) -> np.ndarray:
    """Weighted combination of aligned (N, C) probability arrays; weights are normalised to sum to 1.

    ``mean`` is the weighted arithmetic mean (FixRes averages softmaxes). ``geometric`` is
    ``exp(sum_i w_i log(p_i + eps))`` renormalised per row: a model that rules a class out vetoes it.
    """
    arrays = _as_stack(probs_list)
    normalised = normalise_weights(weights, len(arrays)) if weights is not None else equal_weights(len(arrays))
    total = WeightedSum(method)
    for array, weight in zip(arrays, normalised, strict=True):
        total.add(array, weight)
    return total.result()


class WeightedSum:
    """:func:`combine` one member at a time, so that members can be loaded, added and dropped in turn.

    The running sum is the only (N, C) array it keeps and the work runs in blocks of rows, so combining any number of
    members needs the memory of about two: the sum and the member being added (at iNat 2021's 500,000 x 10,000 test
    matrix, 20 GB each). The weights are used as given: pass normalised ones.
    """

    def __init__(self, method: Method = "mean") -> None:
        _check_method(method)
        self.method = method
        self.total: np.ndarray | None = None

    def add(self, probs: np.ndarray, weight: float) -> None:
        probs = np.asarray(probs)
        if self.total is None:
            if probs.ndim != 2:
                raise ValueError(f"members must be (N, C) arrays, got shape {probs.shape}")
            self.total = np.zeros(probs.shape, dtype=np.float32)
        elif probs.shape != self.total.shape:
            raise ValueError(f"members must be (N, C) arrays of one shape, got {probs.shape} after {self.total.shape}")
        if not weight:
            return
        for rows in row_blocks(len(probs)):
            self.total[rows] += np.float32(weight) * _to_method_space(probs[rows], self.method)

    def result(self) -> np.ndarray:
        """The combined probabilities (the sum is turned into them in place: call once)."""
        if self.total is None:
            raise ValueError("an ensemble needs at least one member")
        for rows in row_blocks(len(self.total)):
            self.total[rows] = _from_method_space(self.total[rows], self.method)
        return self.total


def combine_members(
    members: Iterable[Probabilities],
    weights: Weights,
    method: Method = "mean",
    visit: Callable[[int, Probabilities], None] | None = None,
) -> Probabilities:
    """:func:`align` and :func:`combine` for members that arrive one at a time (a generator that loads each file).

    Only the running sum and the member being added are in memory at once, whatever the number of members.
    ``visit(position, member)`` sees each aligned member before it is dropped (the report's per-member scores). The
    result has the first member's ids, labels, classes and meta.
    """
    if not len(weights):
        raise ValueError("an ensemble needs at least one member")
    normalised = normalise_weights(weights, len(weights))
    total = WeightedSum(method)
    reference: Probabilities | None = None
    source = iter(members)  # not zip/enumerate: their reused result tuple keeps the last member until the next loads
    for position, weight in enumerate(normalised):
        member = next(source, None)
        if member is None:
            raise ValueError(f"{len(normalised)} weights but {position} members")
        aligned = align_to(reference, member, position)
        if visit is not None:
            visit(position, aligned)
        total.add(aligned.probs, weight)
        if reference is None:
            reference = without_matrix(aligned)
        del member, aligned  # before the next one loads: two members' matrices are never alive together
    assert reference is not None  # at least one weight, so one member
    if next(source, None) is not None:
        raise ValueError(f"more members than the {len(normalised)} weights")
    return replace(reference, probs=total.result())


def equal_weights(n_members: int) -> np.ndarray:
    if n_members < 1:
        raise ValueError("an ensemble needs at least one member")
    return np.full(n_members, 1.0 / n_members)


def normalise_weights(weights: Weights, n_members: int) -> np.ndarray:
    """Weights as a float array summing to 1; ConfigError (a recipe mistake) when they cannot be."""
    values = np.asarray(list(weights), dtype=np.float64)
    if values.shape != (n_members,):
        raise ConfigError(f"ensemble weights: {values.size} given for {n_members} members; give one per member")
    if not np.isfinite(values).all() or (values < 0).any() or values.sum() <= 0:
        raise ConfigError(
            f"ensemble weights {values.tolist()}: weights must be finite, >= 0 and not all zero; fix the recipe"
        )
    return values / values.sum()


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ConfigError(f"ensemble method {method!r} is not one of {', '.join(METHODS)}")


def _as_stack(probs_list: Sequence[np.ndarray]) -> list[np.ndarray]:
    arrays = [np.asarray(array) for array in probs_list]
    if not arrays:
        raise ValueError("an ensemble needs at least one member")
    shapes = {array.shape for array in arrays}
    if len(shapes) != 1 or arrays[0].ndim != 2:
        raise ValueError(f"members must be (N, C) arrays of one shape, got {sorted(shapes)}; align() them first")
    return arrays


def _to_method_space(probs: np.ndarray, method: str) -> np.ndarray:
    """The space in which the method averages: probabilities for ``mean``, log-probabilities for ``geometric``."""
    probs = probs.astype(np.float32, copy=False)
    return np.log(probs + np.float32(LOG_EPS)) if method == "geometric" else probs


def _from_method_space(averaged: np.ndarray, method: str) -> np.ndarray:
    if method == "mean":
        return averaged
    shifted = np.exp(averaged - averaged.max(axis=1, keepdims=True))  # shift so the exp cannot underflow to 0/0
    return shifted / shifted.sum(axis=1, keepdims=True)


# --------------------------------------------------------------------------------------------------- weight search
def hill_climb(
    val_probs: Sequence[np.ndarray],
    labels: np.ndarray,
    steps: int = DEFAULT_SEARCH_STEPS,
    method: Method = "mean",
    metric: str = "top1",
) -> np.ndarray:
    """Ensemble-selection weights (sum 1) that maximise ``metric`` on a labelled split, log-loss breaking ties: the
    competition's own (top-5 for iNat 2017, top-3 for 2018, macro F1 for Herbarium 2020-22), not always top-1.

    Starts from one pick of every member (equal weights), then ``steps`` times adds one more pick of whichever member
    helps most (lowest index on exact ties), and returns the best ensemble seen: never worse than equal weights on
    this split, and no member below 1 / (steps + members). Rows labelled -1 are ignored.
    """
    arrays = _as_stack(val_probs)
    _check_method(method)
    if metric not in SEARCH_METRICS:
        raise ConfigError(f"ensemble search metric {metric!r} is not one of {', '.join(SEARCH_METRICS)}")
    arrays, labels = _labelled_rows(arrays, labels)
    in_method_space = [_to_method_space(array, method) for array in arrays]

    def score_of(summed: np.ndarray, n_picks: int) -> tuple[float, float]:
        return _score(_from_method_space(summed / np.float32(n_picks), method), labels, metric)

    picks = np.ones(len(arrays), dtype=np.int64)
    summed = np.zeros(arrays[0].shape, dtype=np.float32)
    for member in in_method_space:
        summed += member
    best_picks, best_score = picks.copy(), score_of(summed, int(picks.sum()))
    for _ in range(steps):
        trial_scores = [score_of(summed + member, int(picks.sum()) + 1) for member in in_method_space]
        chosen = max(range(len(trial_scores)), key=lambda index: (trial_scores[index], -index))
        picks[chosen] += 1
        summed = summed + in_method_space[chosen]
        if trial_scores[chosen] > best_score:
            best_picks, best_score = picks.copy(), trial_scores[chosen]
    return best_picks / best_picks.sum()


def _labelled_rows(arrays: list[np.ndarray], labels: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
    labels = np.asarray(labels)
    if labels.shape != (arrays[0].shape[0],):
        raise ValueError(f"{arrays[0].shape[0]} rows of probabilities but labels of shape {labels.shape}")
    known = labels != UNKNOWN_LABEL
    if not known.any():
        raise DataError("ensemble weight search needs labelled validation probabilities; predict the val split")
    if known.all():
        return arrays, labels
    return [array[known] for array in arrays], labels[known]


def _score(combined: np.ndarray, labels: np.ndarray, metric: str = "top1") -> tuple[float, float]:
    """Higher is better: (the metric, minus log-loss), compared lexicographically."""
    if metric == "macro_f1":
        primary = macro_f1(topk_indices(combined, 1)[:, 0], labels)
    else:
        primary = topk_accuracy(combined, labels, int(metric[3:]))
    return primary, -log_loss(combined, labels)


def resolve_weights(
    mode: WeightMode,
    given: Sequence[float] | None = None,
    val_probs: Sequence[np.ndarray] | None = None,
    labels: np.ndarray | None = None,
    method: Method = "mean",
    n_members: int | None = None,
    steps: int = DEFAULT_SEARCH_STEPS,
    metric: str = "top1",
) -> np.ndarray:
    """Member weights (sum 1) for a recipe's weight mode.

    ``equal`` needs the member count (``n_members`` or ``len(val_probs)``), ``given`` the recipe's weights and
    ``search`` the members' aligned validation probabilities with their labels (see :func:`hill_climb`).
    """
    if mode == "equal":
        count = n_members if n_members is not None else len(val_probs) if val_probs is not None else None
        if count is None:
            raise ValueError("equal weights need n_members or val_probs")
        return equal_weights(count)
    if mode == "given":
        if given is None:
            raise ConfigError("ensemble weights mode 'given' needs a list of weights in the recipe")
        count = n_members if n_members is not None else len(val_probs) if val_probs is not None else len(given)
        return normalise_weights(given, count)
    if mode == "search":
        if val_probs is None or labels is None:
            raise ConfigError("ensemble weights mode 'search' needs labelled validation probabilities of every member")
        return hill_climb(val_probs, labels, steps=steps, method=method, metric=metric)
    raise ConfigError(f"ensemble weights mode {mode!r} is not one of {', '.join(WEIGHT_MODES)}")
