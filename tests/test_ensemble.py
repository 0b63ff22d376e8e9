"""Ensemble math: hand-computed combinations, alignment by image id, weight search never worse than equal weights."""

from __future__ import annotations

import math
import os
import weakref
from pathlib import Path

import numpy as np
import pytest

from fgvc.ensemble import align, combine, combine_members, equal_weights, hill_climb, resolve_weights
from fgvc.errors import ConfigError, DataError
from fgvc.probs import Probabilities


def make_member(ids: list, probs: list, labels: list | None = None, categories=(3, 17, 42), **meta) -> Probabilities:
    probs_array = np.asarray(probs, dtype=np.float32)
    return Probabilities(
        probs=probs_array,
        image_ids=np.asarray(ids),
        labels=np.asarray(labels if labels is not None else [-1] * len(ids), dtype=np.int64),
        category_ids=np.asarray(categories),
        class_names=np.asarray([f"class {c}" for c in categories]),
        meta=dict(meta),
    )


# --------------------------------------------------------------------------------------------------- combine
def test_mean_by_hand() -> None:
    first = np.array([[0.6, 0.4], [0.1, 0.9]])
    second = np.array([[0.2, 0.8], [0.3, 0.7]])
    np.testing.assert_allclose(combine([first, second]), [[0.4, 0.6], [0.2, 0.8]], rtol=1e-6)
    np.testing.assert_allclose(combine([first, second], [3, 1]), [[0.5, 0.5], [0.15, 0.85]], rtol=1e-6)


def test_ensemble_labels_by_hand() -> None:
    members = [
        np.array([[0.5, 0.3, 0.2], [0.1, 0.2, 0.7], [0.4, 0.4, 0.2]]),
        np.array([[0.1, 0.6, 0.3], [0.3, 0.3, 0.4], [0.1, 0.8, 0.1]]),
        np.array([[0.1, 0.5, 0.4], [0.6, 0.2, 0.2], [0.7, 0.1, 0.2]]),
    ]
    # sums per class: row 0 (0.7, 1.4, 0.9) -> 1; row 1 (1.0, 0.7, 1.3) -> 2; row 2 (1.2, 1.3, 0.5) -> 1
    assert combine(members).argmax(axis=1).tolist() == [1, 2, 1]
    # weights (1, 0, 0) keep the first member alone: row 2 ties 0.4/0.4 and goes to the lower index
    assert combine(members, [1, 0, 0]).argmax(axis=1).tolist() == [0, 2, 0]
    # weights (0, 1, 3): row 0 (0.4, 2.1, 1.5) -> 1; row 1 (2.1, 0.9, 1.0) -> 0; row 2 (2.2, 1.1, 0.7) -> 0
    assert combine(members, [0, 1, 3]).argmax(axis=1).tolist() == [1, 0, 0]


def test_geometric_and_arithmetic_mean_disagree_where_one_member_vetoes() -> None:
    confident = np.array([[0.799, 0.2, 0.001]])
    vetoing = np.array([[0.001, 0.5, 0.499]])
    arithmetic = combine([confident, vetoing], method="mean")
    geometric = combine([confident, vetoing], method="geometric")
    np.testing.assert_allclose(arithmetic, [[0.4, 0.35, 0.25]], rtol=1e-6)
    unnormalised = np.sqrt([0.799 * 0.001, 0.2 * 0.5, 0.001 * 0.499])
    np.testing.assert_allclose(geometric, [unnormalised / unnormalised.sum()], rtol=1e-3)
    assert arithmetic.argmax() == 0 and geometric.argmax() == 1


def test_weighted_geometric_mean_by_hand() -> None:
    first = np.array([[0.2, 0.8]])
    second = np.array([[0.6, 0.4]])
    weighted = combine([first, second], [1, 3], method="geometric")
    unnormalised = np.array([0.2**0.25 * 0.6**0.75, 0.8**0.25 * 0.4**0.75])
    np.testing.assert_allclose(weighted, [unnormalised / unnormalised.sum()], rtol=1e-4)
    assert weighted.sum() == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("weights", [[1.0], [1.0, -1.0], [0.0, 0.0], [1.0, float("nan")]])
def test_bad_weights_are_a_config_error(weights: list[float]) -> None:
    with pytest.raises(ConfigError):
        combine([np.eye(2), np.eye(2)], weights)


def test_unknown_method_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="geometric"):
        combine([np.eye(2)], method="median")  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------- align
def test_align_reorders_rows_by_image_id() -> None:
    first = make_member([10, 20, 30], [[1, 0, 0], [0, 1, 0], [0, 0, 1]], labels=[0, 1, 2])
    second = make_member([30, 10, 20], [[0.1, 0.1, 0.8], [0.7, 0.2, 0.1], [0.2, 0.6, 0.2]], labels=[2, 0, 1])
    aligned = align([first, second])
    assert aligned[1].image_ids.tolist() == [10, 20, 30]
    assert aligned[1].labels.tolist() == [0, 1, 2]
    np.testing.assert_allclose(aligned[1].probs, [[0.7, 0.2, 0.1], [0.2, 0.6, 0.2], [0.1, 0.1, 0.8]])
    assert second.image_ids.tolist() == [30, 10, 20]  # the input is left alone


def test_align_works_with_string_ids() -> None:
    first = make_member(["00002.jpg", "00001.jpg"], [[1, 0, 0], [0, 1, 0]])
    second = make_member(["00001.jpg", "00002.jpg"], [[0, 1, 0], [1, 0, 0]])
    np.testing.assert_array_equal(align([first, second])[1].probs, first.probs)


def test_align_rejects_different_id_sets_naming_the_file() -> None:
    first = make_member([10, 20, 30], np.eye(3), path="runs/a/test.npz")
    second = make_member([10, 20, 40], np.eye(3), path="runs/b/test.npz")
    with pytest.raises(DataError) as caught:
        align([first, second])
    message = str(caught.value)
    assert "runs/b/test.npz" in message and "1 missing" in message and "30" in message and "40" in message
    assert "\n" not in message


def test_align_rejects_a_subset_of_ids() -> None:
    first = make_member([10, 20, 30], np.eye(3))
    second = make_member([10, 20], np.eye(3)[:2], run="b", split="test")
    with pytest.raises(DataError, match="run=b"):
        align([first, second])


def test_align_rejects_different_category_ids() -> None:
    first = make_member([1, 2], np.eye(3)[:2])
    second = make_member([1, 2], np.eye(3)[:2], categories=(3, 17, 43), path="runs/c/test.npz")
    with pytest.raises(DataError, match=r"runs/c/test\.npz.*category ids"):
        align([first, second])


def test_align_takes_members_whose_classes_differ_only_in_name() -> None:
    """iNat 2018/2019's categories.json, added between two members' training, renames every class but keeps its id
    (a folder dataset's renamed class folder changes the id: the test above)."""
    first = make_member([1, 2], np.eye(3)[:2])
    second = make_member([1, 2], np.eye(3)[:2], path="runs/c/test.npz")
    second.class_names = np.asarray(["Turdus merula", "Parus major", "Pica pica"])
    combined = combine_members([first, second], equal_weights(2))
    assert list(combined.class_names) == list(first.class_names)
    np.testing.assert_allclose(combined.probs, np.eye(3)[:2])


def test_align_rejects_duplicate_ids() -> None:
    first = make_member([1, 2], np.eye(3)[:2])
    second = make_member([1, 1], np.eye(3)[:2])
    with pytest.raises(DataError, match="appear twice"):
        align([first, second])


def test_align_rejects_disagreeing_labels() -> None:
    first = make_member([1, 2], np.eye(3)[:2], labels=[0, 1])
    second = make_member([2, 1], np.eye(3)[:2], labels=[2, 0])
    with pytest.raises(DataError, match="labels of 1 images disagree"):
        align([first, second])


# --------------------------------------------------------------------------------------------------- weight search
def split_score(probs: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """(top-1 accuracy, minus log-loss), computed here independently of fgvc.metrics."""
    top1 = float((probs.argmax(axis=1) == labels).mean())
    nll = float(-np.log(np.maximum(probs[np.arange(len(labels)), labels], 1e-7)).mean())
    return top1, -nll


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def members_with_noise(seed: int) -> tuple[list[np.ndarray], np.ndarray]:
    """A good member, a mediocre one and pure noise, on 300 images of 10 classes."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, size=300)
    onehot = np.eye(10)[labels]
    good = softmax(3.0 * onehot + rng.normal(size=(300, 10)))
    mediocre = softmax(1.0 * onehot + rng.normal(size=(300, 10)))
    noise = rng.dirichlet(np.ones(10), size=300)
    return [good, mediocre, noise], labels


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
@pytest.mark.parametrize("method", ["mean", "geometric"])
def test_hill_climb_is_never_worse_than_equal_weights(seed: int, method: str) -> None:
    members, labels = members_with_noise(seed)
    weights = hill_climb(members, labels, steps=20, method=method)
    assert weights.shape == (3,) and (weights >= 0).all() and weights.sum() == pytest.approx(1.0)
    searched = split_score(combine(members, weights, method), labels)
    equal = split_score(combine(members, None, method), labels)
    assert searched >= equal
    assert weights[0] > weights[2]  # the good member outweighs pure noise


def test_hill_climb_is_deterministic() -> None:
    members, labels = members_with_noise(7)
    np.testing.assert_array_equal(hill_climb(members, labels, steps=15), hill_climb(members, labels, steps=15))


def test_hill_climb_picks_the_right_member_by_hand() -> None:
    right = np.array([[0.9, 0.1], [0.1, 0.9]])
    wrong = np.array([[0.1, 0.9], [0.9, 0.1]])
    labels = np.array([0, 1])
    # equal weights tie every row at 0.5 (50 % top-1); each pick of `right` then lowers the log-loss at 100 % top-1,
    # while a pick of `wrong` would raise it, so 50 steps add `right` 50 times to the starting (1, 1)
    np.testing.assert_allclose(hill_climb([right, wrong], labels, steps=50), [51 / 52, 1 / 52])


def test_hill_climb_aims_at_the_competition_metric() -> None:
    """iNat 2017 scores top-5, 2018 top-3, Herbarium 2020-22 macro F1: weights tuned for top-1 can lose there. A is
    right on two images and ranks the label last on the others; B never ranks it first but always in its top 3."""
    labels = np.array([0, 1, 2, 3])
    a = np.array([[0.7, 0.1, 0.1, 0.1], [0.1, 0.7, 0.1, 0.1], [0.4, 0.3, 0.01, 0.29], [0.4, 0.3, 0.29, 0.01]])
    b = np.array([[0.3, 0.4, 0.2, 0.1], [0.4, 0.3, 0.2, 0.1], [0.4, 0.3, 0.2, 0.1], [0.4, 0.3, 0.1, 0.2]])

    def hits(probs: np.ndarray, k: int) -> float:
        return float((np.argsort(-probs, axis=1)[:, :k] == labels[:, None]).any(axis=1).mean())

    for_top3 = combine([a, b], hill_climb([a, b], labels, steps=10, metric="top3"))
    for_top1 = combine([a, b], hill_climb([a, b], labels, steps=10, metric="top1"))
    equal = combine([a, b], None)
    assert hits(equal, 3) == 0.5 and hits(equal, 1) == 0.5
    assert hits(for_top3, 3) == 1.0  # weighted towards B, which costs top-1 ...
    assert hits(for_top3, 1) == 0.25
    assert hits(for_top1, 1) == 0.5  # ... so a top-1 search does not go as far
    assert hill_climb([a, b], labels, steps=3, metric="macro_f1").sum() == pytest.approx(1.0)
    with pytest.raises(ConfigError, match="top1, top3, top5, macro_f1"):
        hill_climb([a, b], labels, metric="top2")


def test_hill_climb_ignores_unlabelled_rows() -> None:
    members, labels = members_with_noise(5)
    with_unknown = [np.vstack([member, np.full((4, 10), 0.1)]) for member in members]
    unknown_labels = np.concatenate([labels, [-1, -1, -1, -1]])
    np.testing.assert_array_equal(
        hill_climb(with_unknown, unknown_labels, steps=10), hill_climb(members, labels, steps=10)
    )


def test_hill_climb_needs_labels() -> None:
    with pytest.raises(DataError, match="labelled"):
        hill_climb([np.eye(2)], np.array([-1, -1]))


# --------------------------------------------------------------------------------------------------- resolve_weights
def test_resolve_equal_and_given_weights() -> None:
    np.testing.assert_allclose(resolve_weights("equal", n_members=4), [0.25] * 4)
    np.testing.assert_allclose(resolve_weights("given", [2, 1, 1]), [0.5, 0.25, 0.25])
    with pytest.raises(ConfigError, match="2 given for 3 members"):
        resolve_weights("given", [1, 1], n_members=3)
    with pytest.raises(ConfigError):
        resolve_weights("given", None, n_members=3)


def test_resolve_search_weights() -> None:
    members, labels = members_with_noise(3)
    searched = resolve_weights("search", None, members, labels, method="mean", steps=10)
    np.testing.assert_array_equal(searched, hill_climb(members, labels, steps=10, method="mean"))
    with pytest.raises(ConfigError, match="labelled validation"):
        resolve_weights("search", None, members, None)


def test_resolve_unknown_mode() -> None:
    with pytest.raises(ConfigError, match="equal, given, search"):
        resolve_weights("best", n_members=2)  # type: ignore[arg-type]


def test_single_member_gets_all_the_weight() -> None:
    assert math.isclose(float(resolve_weights("equal", n_members=1)[0]), 1.0)


# --------------------------------------------------------------------------------------------- one member at a time
def _softmax_rows(rng: np.random.Generator, n: int, c: int) -> np.ndarray:
    logits = rng.normal(0, 3, (n, c))
    probs = np.exp(logits - logits.max(1, keepdims=True))
    return (probs / probs.sum(1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("method", ["mean", "geometric"])
def test_combining_in_blocks_of_rows_matches_the_formula(method: str) -> None:
    """10,000 rows: the sum runs in blocks of 4,096, and every block must equal the textbook formula."""
    rng = np.random.default_rng(0)
    members = [_softmax_rows(rng, 10_000, 7) for _ in range(3)]
    weights = np.array([0.5, 0.3, 0.2])
    if method == "mean":
        expected = sum(w * p.astype(np.float64) for w, p in zip(weights, members, strict=True))
    else:
        logs = sum(w * np.log(p.astype(np.float64) + 1e-7) for w, p in zip(weights, members, strict=True))
        expected = np.exp(logs) / np.exp(logs).sum(1, keepdims=True)
    np.testing.assert_allclose(combine(members, [5, 3, 2], method), expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("method", ["mean", "geometric"])
def test_members_combined_one_at_a_time_equal_the_whole_ensemble(method: str) -> None:
    rng = np.random.default_rng(1)
    n, c = 50, 5
    ids = np.arange(100, 100 + n)
    labels = rng.integers(0, c, n)
    members = []
    for seed in range(3):
        order = np.random.default_rng(seed).permutation(n)  # each file lists the images in its own order
        members.append(make_member(ids[order].tolist(), _softmax_rows(rng, n, c), labels[order].tolist(),
                                   categories=range(c), path=f"m{seed}.npz"))  # fmt: skip
    weights = [2.0, 1.0, 1.0]
    seen: list[tuple[int, list]] = []
    streamed = combine_members(iter(members), weights, method, lambda i, m: seen.append((i, m.image_ids.tolist())))
    aligned = align(members)
    np.testing.assert_allclose(streamed.probs, combine([m.probs for m in aligned], weights, method), rtol=1e-6)
    assert streamed.image_ids.tolist() == members[0].image_ids.tolist()
    assert streamed.labels.tolist() == members[0].labels.tolist()
    assert seen == [(i, members[0].image_ids.tolist()) for i in range(3)]  # the visitor sees aligned members
    with pytest.raises(DataError, match="member 1"):  # the checks of align() hold
        short = make_member(ids[:-1].tolist(), np.full((n - 1, c), 1 / c), categories=range(c))
        combine_members(iter([members[0], short]), [1, 1])
    with pytest.raises(ValueError, match="3 weights but 2 members"):
        combine_members(iter(members[:2]), weights)


def test_a_member_is_dropped_before_the_next_one_loads() -> None:
    """Files loaded by a generator: when member k is asked for, member k-1's matrix must already be freed, so an
    ensemble of any size holds one member's matrix next to the running sum."""
    rng = np.random.default_rng(2)
    n, c = 20, 4
    alive: list[weakref.ref] = []

    def load_members():
        for seed in range(4):
            assert all(ref() is None for ref in alive), f"a previous member is still in memory when member {seed} loads"
            probs = _softmax_rows(rng, n, c)
            alive.append(weakref.ref(probs))
            order = np.random.default_rng(seed).permutation(n)
            yield make_member(np.arange(n)[order].tolist(), probs, categories=range(c))
            del probs

    result = combine_members(load_members(), [1, 1, 1, 1])
    assert len(alive) == 4 and all(ref() is None for ref in alive)
    assert result.probs.shape == (n, c)


def test_ensemble_under_torchrun_is_refused_with_the_way_to_use_several_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only rank 0 holds a DDP prediction's matrix: the ensemble would crash on the other ranks."""
    from fgvc.pipeline import ensemble_recipe

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match=r"not under torchrun.*fgvc predict --run RUN .*--gpus N"):
        ensemble_recipe(Path("recipes/cub.yaml"))


@pytest.mark.parametrize("hard_links", [True, False])
def test_an_ensemble_never_replaces_a_submission_another_one_wrote_in_the_same_second(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hard_links: bool
) -> None:
    """Two ensembles finishing in the same second: the name the other process took after any check is not reused,
    also on a file system without hard links (where the fallback checked the name, then replaced onto it)."""
    import datetime as dt
    import errno

    from fgvc import pipeline

    if not hard_links:
        def no_link(*args: object) -> None:
            raise OSError(errno.EPERM, "Operation not permitted")

        monkeypatch.setattr(pipeline.os, "link", no_link)

    class Clock(dt.datetime):
        @classmethod
        def now(cls, tz: dt.tzinfo | None = None) -> Clock:
            return cls(2026, 11, 27, 8, 0, 0)

    monkeypatch.setattr(pipeline.dt, "datetime", Clock)
    theirs = tmp_path / "cub-20261127-080000.csv"
    theirs.write_text("the other process's submission")
    monkeypatch.setattr(Path, "exists", lambda self: False)  # it appeared after any check of the name
    draft = tmp_path / ".draft"
    draft.write_text("this submission")
    path = pipeline._publish(draft, make_member([1, 2], np.full((2, 3), 1 / 3)), tmp_path, "cub")
    assert path.name == "cub-20261127-080000-2.csv" and path.read_text() == "this submission"
    assert theirs.read_text() == "the other process's submission"
    assert Probabilities.load(path.with_suffix(".npz")).probs.shape == (2, 3)


def test_a_submission_stopped_while_its_probabilities_are_written_leaves_no_csv(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CSV was published first and the .npz written after it (minutes at iNat's size): a kill between them left a
    submission without the probabilities it came from."""
    from fgvc import pipeline
    from fgvc.fileio import _OWNED

    def stopped(self: Probabilities, path: Path) -> None:
        assert _OWNED.search(Path(path).name)  # a SIGKILL here leaves it: the next write there removes it, once old
        Path(path).write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(Probabilities, "save", stopped)
    draft = tmp_path / ".cub.host-1.draft"
    draft.write_text("this submission")
    with pytest.raises(KeyboardInterrupt):
        pipeline._publish(draft, make_member([1, 2], np.full((2, 3), 1 / 3)), tmp_path, "cub")
    assert sorted(p.name for p in tmp_path.iterdir()) == [draft.name]  # the caller removes its draft


def test_without_hard_links_a_failed_fill_leaves_no_empty_csv(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    from fgvc import pipeline

    def refuse(*args: object) -> None:
        raise OSError(errno.EPERM, "Operation not permitted")

    replace = os.replace
    draft = tmp_path / ".cub.host-1.draft"

    def fail(source: object, target: object) -> None:  # filling the claimed name fails; other renames work
        if Path(str(source)) == draft:
            raise OSError(errno.EIO, "Input/output error")
        replace(source, target)  # type: ignore[arg-type]

    monkeypatch.setattr(pipeline.os, "link", refuse)
    monkeypatch.setattr(pipeline.os, "replace", fail)
    draft.write_text("this submission")
    with pytest.raises(OSError, match="Input/output error"):
        pipeline._publish(draft, make_member([1, 2], np.full((2, 3), 1 / 3)), tmp_path, "cub")
    assert sorted(p.name for p in tmp_path.iterdir()) == [draft.name]


def test_hill_climb_gives_an_exact_tie_to_the_lower_index() -> None:
    """Two identical good members and a poor one: every pick of a twin is a tie between them, which the documented
    rule gives to the first, so the result does not depend on anything else."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 40)
    good = np.full((40, 4), 0.1, np.float32)
    good[np.arange(40), labels] = 0.7
    poor = rng.dirichlet(np.ones(4), size=40).astype(np.float32)
    weights = hill_climb([good, good.copy(), poor], labels, steps=6)
    assert weights[0] > weights[1] > 0 and weights[2] > 0  # the twins' extra picks all went to the first
