"""Metrics against hand-computed values and against brute-force definitions."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trainer.metrics import (
    Counts,
    at_threshold,
    average_precision,
    episode_flags,
    key_time_order,
    point_adjusted_counts,
    point_counts,
    precision_recall_curve,
    range_counts,
    roc_auc,
    roc_curve,
    runs,
    separable_ranges,
)

LABELS = np.array([1, 0, 1, 1, 0], bool)
SCORES = np.array([0.9, 0.8, 0.7, 0.7, 0.1])

# Two keys; ranges must not run across the key change between positions 3 and 4.
KEYS = np.array([0, 0, 0, 0, 1, 1, 1])
RANGE_LABELS = np.array([0, 1, 1, 0, 1, 1, 0], bool)
RANGE_PREDICTED = np.array([0, 0, 1, 1, 0, 0, 1], bool)


def test_counts_at_a_threshold_by_hand() -> None:
    counts = at_threshold(LABELS, SCORES, 0.7)  # predicts the first four events
    assert (counts.true_positives, counts.false_positives, counts.false_negatives) == (3, 1, 0)
    assert counts.precision == 0.75
    assert counts.recall == 1.0
    assert counts.f1 == pytest.approx(2 * 0.75 / 1.75)


def test_counts_without_predictions_or_labels_are_zero_not_nan() -> None:
    assert Counts(0, 0, 0).to_dict() == {
        "true_positives": 0,
        "false_positives": 0,
        "false_negatives": 0,
        "precision": 0.0,
        "recall": 0.0,
        "f1": 0.0,
    }


def test_ranking_metrics_by_hand() -> None:
    # Thresholds 0.9, 0.8, 0.7, 0.1 give (P, R) = (1, 1/3), (1/2, 1/3), (3/4, 1), (3/5, 1).
    precision, recall, thresholds = precision_recall_curve(LABELS, SCORES)
    np.testing.assert_allclose(precision, [1.0, 0.5, 0.75, 0.6])
    np.testing.assert_allclose(recall, [1 / 3, 1 / 3, 1.0, 1.0])
    np.testing.assert_allclose(thresholds, [0.9, 0.8, 0.7, 0.1])
    assert average_precision(LABELS, SCORES) == pytest.approx(1 / 3 + 2 / 3 * 0.75)
    # Positive-negative pairs ordered right: 0.9 beats both, each 0.7 beats 0.1 only.
    assert roc_auc(LABELS, SCORES) == pytest.approx(4 / 6)
    fpr, tpr, roc_thresholds = roc_curve(LABELS, SCORES)
    np.testing.assert_allclose(fpr, [0, 0, 0.5, 0.5, 1])
    np.testing.assert_allclose(tpr, [0, 1 / 3, 1 / 3, 1, 1])
    assert roc_thresholds[0] == math.inf


def test_ties_are_not_broken_by_input_order() -> None:
    labels = np.array([1, 0, 0, 1], bool)
    scores = np.array([0.5, 0.5, 0.2, 0.2])
    assert roc_auc(labels, scores) == 0.5
    assert roc_auc(labels[::-1], scores[::-1]) == 0.5
    assert average_precision(labels, scores) == pytest.approx(0.5 * 0.5 + 0.5 * 0.5)
    assert average_precision(labels[::-1], scores[::-1]) == average_precision(labels, scores)


def test_undefined_ranking_metrics_are_nan() -> None:
    assert math.isnan(average_precision(np.zeros(3, bool), np.arange(3.0)))
    assert math.isnan(roc_auc(np.ones(3, bool), np.arange(3.0)))
    with pytest.raises(ValueError, match="NaN"):
        average_precision(np.ones(2, bool), np.array([0.1, np.nan]))


def test_runs_split_at_key_changes() -> None:
    np.testing.assert_array_equal(runs(RANGE_LABELS, KEYS), [[1, 3], [4, 6]])
    np.testing.assert_array_equal(runs(np.ones(4, bool), np.array([0, 0, 1, 1])), [[0, 2], [2, 4]])
    np.testing.assert_array_equal(runs(np.ones(4, bool)), [[0, 4]])
    assert runs(np.zeros(0, bool)).shape == (0, 2)


def test_range_point_adjusted_and_point_metrics_by_hand() -> None:
    ranges = range_counts(RANGE_LABELS, RANGE_PREDICTED, KEYS)
    # Key 0's range is caught by the alarm run [2, 4); the alarm at 6 touches no label.
    assert (ranges.labeled, ranges.detected, ranges.predicted, ranges.predicted_on_label) == (
        2,
        1,
        2,
        1,
    )
    assert (ranges.precision, ranges.recall, ranges.f1) == (0.5, 0.5, 0.5)
    adjusted = point_adjusted_counts(RANGE_LABELS, RANGE_PREDICTED, KEYS)
    assert (adjusted.true_positives, adjusted.false_positives, adjusted.false_negatives) == (
        2,
        2,
        2,
    )
    plain = point_counts(RANGE_LABELS, RANGE_PREDICTED)
    assert (plain.true_positives, plain.false_positives, plain.false_negatives) == (1, 2, 3)


def test_separable_ranges_compare_each_peak_with_the_scores_before_it() -> None:
    labels = np.array([0, 0, 0, 1, 1, 0, 0, 0, 1, 0, 0, 1], bool)
    scores = np.array([1.0, 5.0, 2.0, 3.0, 4.0, 1.0, 1.0, 1.0, 0.5, 6.0, 1.0, np.nan])
    # [3, 5) peaks at 4 below the 5 two events earlier; within one event before, it stands
    # out. [8, 9) peaks at 0.5, or at 6 when the event after it counts. [11, 12) has no score.
    np.testing.assert_array_equal(separable_ranges(labels, scores, before=3), [False, False, False])
    np.testing.assert_array_equal(separable_ranges(labels, scores, before=1), [True, False, False])
    np.testing.assert_array_equal(
        separable_ranges(labels, scores, before=3, after=1), [False, True, False]
    )
    # Nothing scored before the first range: nothing says it is unusual.
    assert not separable_ranges(np.array([1, 0], bool), np.array([9.0, 1.0]), before=5).any()
    assert separable_ranges(np.zeros(3, bool), np.ones(3), before=2).shape == (0,)


def test_confirmed_episodes_open_at_the_confirm_th_event_above_in_a_row() -> None:
    above = np.array([1, 1, 0, 1, 1, 1, 0, 0, 0, 1, 1, 1], bool)
    keys = np.array([0] * 9 + [1] * 3)
    np.testing.assert_array_equal(
        episode_flags(above, keys, cooldown=2, confirm=3).astype(int),
        [0, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 1],
    )
    # The stretch [9, 12) is key 1's alone: key 0's last events do not count for it.
    split = np.array([0] * 10 + [1] * 2)
    assert not episode_flags(above, split, cooldown=2, confirm=3)[9:].any()
    np.testing.assert_array_equal(
        episode_flags(above, keys, cooldown=2, confirm=1), episode_flags(above, keys, cooldown=2)
    )


def test_episodes_from_onset_cover_the_scores_that_confirmed_them() -> None:
    above = np.array([1, 1, 0, 1, 1, 1, 0, 0, 0, 1, 1, 1], bool)
    keys = np.array([0] * 9 + [1] * 3)
    np.testing.assert_array_equal(
        episode_flags(above, keys, cooldown=2, confirm=3, from_onset=True).astype(int),
        [0, 0, 0, 1, 1, 1, 1, 0, 0, 1, 1, 1],
    )
    # The second run begins at the event that closes the first episode (not yet confirmed, it
    # counts as below) and is confirmed after it: from their onsets, the two are one sequence.
    above = np.array([0, 1, 1, 0, 0, 1, 1, 1, 0], bool)
    alone = episode_flags(above, None, cooldown=3, confirm=2)
    np.testing.assert_array_equal(alone.astype(int), [0, 0, 1, 1, 1, 0, 1, 1, 1])
    joined = episode_flags(above, None, cooldown=3, confirm=2, from_onset=True)
    np.testing.assert_array_equal(joined.astype(int), [0, 1, 1, 1, 1, 1, 1, 1, 1])


def test_key_time_order_groups_keys_and_sorts_time() -> None:
    keys = np.array(["b", "a", "b", "a"], dtype=object)
    times = np.array([2.0, 5.0, 1.0, 3.0])
    order, codes = key_time_order(keys, times)
    np.testing.assert_array_equal(order, [3, 1, 2, 0])
    np.testing.assert_array_equal(codes, [0, 0, 1, 1])


# ---- brute-force definitions ------------------------------------------------------------

scored = st.lists(
    st.tuples(st.booleans(), st.integers(0, 6).map(lambda v: v / 2)), min_size=1, max_size=40
)
flagged = st.lists(st.tuples(st.integers(0, 2), st.booleans(), st.booleans()), max_size=40)


def _split(pairs: list[tuple]) -> list[np.ndarray]:
    return [np.array(column) for column in zip(*pairs, strict=True)]


@settings(max_examples=200, deadline=None)
@given(scored)
def test_ranking_metrics_match_brute_force(pairs: list[tuple[bool, float]]) -> None:
    labels, scores = _split(pairs)
    labels = labels.astype(bool)
    positives = [s for lab, s in pairs if lab]
    negatives = [s for lab, s in pairs if not lab]
    if positives and negatives:
        wins = sum((p > n) + 0.5 * (p == n) for p in positives for n in negatives)
        assert roc_auc(labels, scores) == pytest.approx(wins / (len(positives) * len(negatives)))
        fpr, tpr, _ = roc_curve(labels, scores)
        assert np.trapezoid(tpr, fpr) == pytest.approx(roc_auc(labels, scores))
    if positives:
        # Average precision = mean over positives of the precision at that positive's score.
        precisions = [labels[scores >= s].mean() for s in positives]
        assert average_precision(labels, scores) == pytest.approx(np.mean(precisions))
        best = max(at_threshold(labels, scores, s).f1 for s in scores)
        precision, recall, _ = precision_recall_curve(labels, scores)
        f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-300)
        assert f1.max() == pytest.approx(best)


def _brute_ranges(flags: list[bool], groups: list[int]) -> list[set[int]]:
    ranges: list[set[int]] = []
    for i, flag in enumerate(flags):
        if not flag:
            continue
        if i and flags[i - 1] and groups[i - 1] == groups[i]:
            ranges[-1].add(i)
        else:
            ranges.append({i})
    return ranges


@settings(max_examples=200, deadline=None)
@given(flagged)
def test_range_metrics_match_brute_force(rows: list[tuple[int, bool, bool]]) -> None:
    rows = sorted(rows, key=lambda row: row[0])  # contiguous groups, as the contract requires
    groups = [g for g, _, _ in rows]
    labels = [lab for _, lab, _ in rows]
    predicted = [p for _, _, p in rows]
    labeled = _brute_ranges(labels, groups)
    alarms = _brute_ranges(predicted, groups)
    counts = range_counts(np.array(labels, bool), np.array(predicted, bool), np.array(groups))
    assert counts.labeled == len(labeled)
    assert counts.predicted == len(alarms)
    assert counts.detected == sum(any(r & a for a in alarms) for r in labeled)
    assert counts.predicted_on_label == sum(any(a & r for r in labeled) for a in alarms)
    adjusted = set().union(*(r for r in labeled if any(r & a for a in alarms)))
    adjusted |= {i for i, p in enumerate(predicted) if p}
    expected = point_counts(
        np.array(labels, bool), np.array([i in adjusted for i in range(len(rows))], bool)
    )
    point_adjusted = point_adjusted_counts(
        np.array(labels, bool), np.array(predicted, bool), np.array(groups)
    )
    assert point_adjusted == expected
