"""Detection metrics in plain numpy: point-wise, ranking and range-level.

Scores are "higher is more anomalous" and an event is predicted positive when its score is
at or above the threshold (`score >= threshold`), the rule the detector alerts by.

Range-level metrics judge a detector the way an operator does: a fault that lasts an hour
is one incident, caught if any of its events raised an alert; every run of alerts that
touches no fault is one false alarm.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields
from typing import TypeVar

import numpy as np


class _Rates:
    """F1 and a JSON-able summary for anything with a precision and a recall."""

    __slots__ = ()
    precision: float
    recall: float

    @property
    def f1(self) -> float:
        precision, recall = self.precision, self.recall
        return _ratio(2 * precision * recall, precision + recall)

    def to_dict(self) -> dict[str, float]:
        return {
            **asdict(self),
            "precision": self.precision,
            "recall": self.recall,
            "f1": self.f1,
        }


@dataclass(frozen=True, slots=True)
class Counts(_Rates):
    """Precision, recall and F1 with the counts they come from."""

    true_positives: int
    false_positives: int
    false_negatives: int

    @property
    def precision(self) -> float:
        return _ratio(self.true_positives, self.true_positives + self.false_positives)

    @property
    def recall(self) -> float:
        return _ratio(self.true_positives, self.true_positives + self.false_negatives)


@dataclass(frozen=True, slots=True)
class RangeCounts(_Rates):
    """Range-level outcome: labeled ranges caught, and predicted ranges that touch a label.

    Precision is the share of predicted ranges overlapping some labeled range; recall the
    share of labeled ranges overlapped by some predicted range.
    """

    labeled: int
    detected: int
    predicted: int
    predicted_on_label: int

    @property
    def precision(self) -> float:
        return _ratio(self.predicted_on_label, self.predicted)

    @property
    def recall(self) -> float:
        return _ratio(self.detected, self.labeled)


_Pooled = TypeVar("_Pooled", Counts, RangeCounts)


def _ratio(numerator: float, denominator: float) -> float:
    """numerator / denominator, 0 when there is nothing to divide (no predictions, no labels)."""
    return float(numerator) / denominator if denominator else 0.0


def point_counts(labels: np.ndarray, predicted: np.ndarray) -> Counts:
    """Event-by-event counts of boolean predictions against boolean labels."""
    labels = np.asarray(labels, bool)
    predicted = np.asarray(predicted, bool)
    return Counts(
        true_positives=int(np.count_nonzero(labels & predicted)),
        false_positives=int(np.count_nonzero(~labels & predicted)),
        false_negatives=int(np.count_nonzero(labels & ~predicted)),
    )


def at_threshold(labels: np.ndarray, scores: np.ndarray, threshold: float) -> Counts:
    """Point-wise counts when events scoring at or above `threshold` are predicted positive."""
    return point_counts(labels, np.asarray(scores) >= threshold)


def _ranked(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cumulative true and false positives at each distinct score, highest score first.

    Events with equal scores enter together: a tie cannot be ordered by the detector, so
    no metric may depend on how it is broken.
    """
    labels = np.asarray(labels, bool)
    scores = np.asarray(scores, np.float64)
    if labels.shape != scores.shape or labels.ndim != 1:
        raise ValueError("labels and scores must be 1-d arrays of the same length")
    if np.isnan(scores).any():
        raise ValueError("scores must not contain NaN (keep only the scored events)")
    order = np.argsort(-scores, kind="stable")
    sorted_scores = scores[order]
    sorted_labels = labels[order]
    # The last position of each run of equal scores.
    last = np.flatnonzero(np.r_[sorted_scores[1:] != sorted_scores[:-1], True])
    true_positives = np.cumsum(sorted_labels)[last]
    false_positives = (last + 1) - true_positives
    return true_positives, false_positives, sorted_scores[last]


def precision_recall_curve(
    labels: np.ndarray, scores: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision, recall and the threshold giving them, per distinct score (descending)."""
    true_positives, false_positives, thresholds = _ranked(labels, scores)
    positives = true_positives[-1] if true_positives.size else 0
    precision = true_positives / (true_positives + false_positives)
    recall = true_positives / positives if positives else np.zeros_like(precision)
    return precision, recall, thresholds


def roc_curve(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """False and true positive rates from (0, 0), one point per distinct score (descending)."""
    true_positives, false_positives, thresholds = _ranked(labels, scores)
    positives = true_positives[-1] if true_positives.size else 0
    negatives = false_positives[-1] if false_positives.size else 0
    tpr = np.r_[0.0, true_positives / positives] if positives else np.zeros(thresholds.size + 1)
    fpr = np.r_[0.0, false_positives / negatives] if negatives else np.zeros(thresholds.size + 1)
    return fpr, tpr, np.r_[np.inf, thresholds]


def average_precision(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the precision-recall curve as a step sum: Σ (R_k - R_{k-1}) · P_k.

    NaN when there are no positives (the curve does not exist).
    """
    precision, recall, _ = precision_recall_curve(labels, scores)
    if not recall.size or recall[-1] == 0:
        return float("nan")
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Probability that a random positive outscores a random negative, ties counting half.

    Computed exactly from mid-ranks (the Mann-Whitney U statistic); NaN with only one class.
    """
    labels = np.asarray(labels, bool)
    scores = np.asarray(scores, np.float64)
    positives = int(labels.sum())
    negatives = labels.size - positives
    if not positives or not negatives:
        return float("nan")
    order = np.argsort(scores, kind="stable")
    sorted_scores = scores[order]
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    ends = np.r_[starts[1:], scores.size]
    mid_ranks = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    ranks = np.empty(scores.size)
    ranks[order] = mid_ranks
    u = ranks[labels].sum() - positives * (positives + 1) / 2.0
    return float(u / (positives * negatives))


def runs(flags: np.ndarray, groups: np.ndarray | None = None) -> np.ndarray:
    """Maximal runs of True as [n, 2] (start, stop) positions, stop exclusive.

    `groups` (e.g. key codes) splits runs where it changes: the positions must be ordered so
    that each key's events are contiguous and in time order.
    """
    flags = np.asarray(flags, bool)
    boundary = np.zeros(flags.size, bool)
    if groups is not None and flags.size:
        groups = np.asarray(groups)
        boundary[1:] = groups[1:] != groups[:-1]
    previous = np.r_[False, flags[:-1]] & ~boundary
    following = np.r_[flags[1:] & ~boundary[1:], False]
    starts = np.flatnonzero(flags & ~previous)
    stops = np.flatnonzero(flags & ~following) + 1
    return np.column_stack([starts, stops])


def range_counts(
    labels: np.ndarray, predicted: np.ndarray, groups: np.ndarray | None = None
) -> RangeCounts:
    """Range-level counts; ranges overlap exactly when they share an event position."""
    labels = np.asarray(labels, bool)
    predicted = np.asarray(predicted, bool)
    labeled = runs(labels, groups)
    alarms = runs(predicted, groups)
    label_sums = np.r_[0, np.cumsum(labels)]
    predicted_sums = np.r_[0, np.cumsum(predicted)]
    detected = predicted_sums[labeled[:, 1]] > predicted_sums[labeled[:, 0]]
    on_label = label_sums[alarms[:, 1]] > label_sums[alarms[:, 0]]
    return RangeCounts(
        labeled=len(labeled),
        detected=int(detected.sum()),
        predicted=len(alarms),
        predicted_on_label=int(on_label.sum()),
    )


def separable_ranges(
    labels: np.ndarray, scores: np.ndarray, before: int, after: int = 0
) -> np.ndarray:
    """Per labeled range, whether its peak score exceeds every score of the `before` events
    preceding it (other labeled events among them count too).

    One key's events in time order, NaN where not scored. A range that is not separable
    cannot be caught by a threshold that stays put across those events without an alert
    before it, so the share of separable ranges bounds what thresholding alone can reach
    with these scores. `after` extends each range's peak over the events just after it
    (an alert episode that opens there still overlaps the range in time for the engine's
    cooldown). A range with no score inside, or none before it, is not separable.
    """
    labels = np.asarray(labels, bool)
    scores = np.where(np.isnan(scores), -np.inf, np.asarray(scores, np.float64))
    result = []
    for start, stop in runs(labels):
        peak = scores[start : min(stop + after, scores.size)].max(initial=-np.inf)
        prior = scores[max(0, start - before) : start].max(initial=-np.inf)
        result.append(np.isfinite(peak) and np.isfinite(prior) and peak > prior)
    return np.array(result, bool)


def point_adjusted_counts(
    labels: np.ndarray, predicted: np.ndarray, groups: np.ndarray | None = None
) -> Counts:
    """Point-wise counts after marking every event of a caught labeled range as predicted."""
    labels = np.asarray(labels, bool)
    adjusted = np.array(predicted, bool, copy=True)
    labeled = runs(labels, groups)
    predicted_sums = np.r_[0, np.cumsum(adjusted)]
    caught = labeled[predicted_sums[labeled[:, 1]] > predicted_sums[labeled[:, 0]]]
    if caught.size:
        lengths = caught[:, 1] - caught[:, 0]
        offsets = _offsets_within(lengths)
        adjusted[np.repeat(caught[:, 0], lengths) + offsets] = True
    return point_counts(labels, adjusted)


def _offsets_within(lengths: np.ndarray) -> np.ndarray:
    """Each position's offset from the start of its run, for runs of `lengths` laid end to end."""
    return np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)


def key_time_order(keys: np.ndarray, times: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A permutation putting events in (key, time) order, stable, and the key code of each."""
    _, codes = np.unique(np.asarray(keys, dtype=object), return_inverse=True)
    order = np.lexsort((np.arange(len(codes)), np.asarray(times, np.float64), codes))
    return order, codes[order]


def episode_flags(
    above: np.ndarray,
    groups: np.ndarray | None,
    cooldown: int,
    confirm: int = 1,
    from_onset: bool = False,
) -> np.ndarray:
    """Whether each scored event is inside an alert episode, as the detector's engine tracks it.

    An event counts as above once it is the `confirm`-th consecutive one at or above the
    threshold; an episode opens at such an event and closes at the `cooldown`-th consecutive
    event not above (`detector.engine.alerts.advance_episodes`), so an event is inside one when an
    event at most `cooldown - 1` scored events before it, of its key, was above.
    Positions as in `runs`: each key's scored events contiguous and in time order. The runs
    of the result are the episodes, one alert each. `from_onset` makes each episode start at
    its alert's onset instead, the first of the scores that confirmed it: the anomalous
    sequence the alert reports (an onset inside the key's previous episode joins the two).
    """
    above = np.asarray(above, bool)
    if confirm > 1:
        stretches = runs(above, groups)
        lengths = stretches[:, 1] - stretches[:, 0]
        confirmed = np.zeros_like(above)
        confirmed[np.flatnonzero(above)[_offsets_within(lengths) + 1 >= confirm]] = True
        above = confirmed
    positions = np.arange(above.size)
    last_above = np.maximum.accumulate(np.where(above, positions, -1))
    if groups is not None and above.size:
        groups = np.asarray(groups)
        starts = np.flatnonzero(np.r_[True, groups[1:] != groups[:-1]])
        key_start = np.repeat(starts, np.diff(np.r_[starts, above.size]))
        last_above = np.where(last_above >= key_start, last_above, -1)
    inside = (last_above >= 0) & (positions - last_above < max(cooldown, 1))
    if from_onset and confirm > 1:
        # A confirming run lies within one key, so its onset never reaches into another key.
        openings = runs(inside, groups)[:, 0]
        reach = np.zeros(above.size + 1, np.int64)
        np.add.at(reach, openings - (confirm - 1), 1)
        np.add.at(reach, openings, -1)
        inside |= np.cumsum(reach)[:-1] > 0
    return inside


def summed(kind: type[_Pooled], parts: Iterable[_Pooled]) -> _Pooled:
    """Counts of several keys (or data sets) pooled: each count summed, rates drawn anew.

    Pooling, not averaging rates, is how a detector's precision over a fleet is read: a key
    with one false alarm weighs as much as any other false alarm.
    """
    parts = list(parts)
    return kind(*(sum(getattr(part, field.name) for part in parts) for field in fields(kind)))
