"""Choosing the alert threshold on the validation split, and the per-key smoothing it assumes.

An event alerts when its (smoothed) score is at or above the threshold, as in
`trainer.metrics`. Pure numpy.
"""

from __future__ import annotations

import numpy as np

from detector.contract.features import FeatureCodec
from detector.contract.manifest import Manifest
from detector.engine.thresholds import choose_levels
from trainer.metrics import precision_recall_curve, roc_curve


class CalibrationError(ValueError):
    """The validation split cannot support the configured threshold method."""


def calibrate(
    scores: np.ndarray,
    labels: np.ndarray | None,
    method: str,
    target: float | None,
    keys: np.ndarray | None = None,
) -> tuple[float, str]:
    """(threshold, description for `manifest.scoring.calibration`).

    `keys` (each score's key, scores in event order within a key) lets the dynamic method
    count anomalous sequences per key; without it the scores are one sequence.
    """
    scores = np.asarray(scores, np.float64)
    if not scores.size:
        raise CalibrationError("no validation windows to calibrate the threshold on")
    if method == "quantile":
        return quantile_threshold(scores, labels, _require(target, method))
    if method == "dynamic":
        return dynamic_threshold(scores, labels, keys, _require(target, method))
    if labels is None:
        raise CalibrationError(f"threshold method {method!r} needs labels")
    labels = np.asarray(labels, bool)
    if not labels.any():
        raise CalibrationError(
            f"the validation split has no positive events; {method!r} cannot be calibrated "
            "(use method 'quantile' or a larger validation split)"
        )
    if method == "max_f1":
        return max_f1_threshold(scores, labels)
    if method == "precision":
        return precision_threshold(scores, labels, _require(target, method))
    if method == "fpr":
        return fpr_threshold(scores, labels, _require(target, method))
    raise ValueError(f"unknown threshold method {method!r}")


#: Validation scores a key needs for a threshold of its own: fewer say little about its
#: normal level, and the key keeps the model's threshold.
MIN_KEY_SCORES = 20


def calibrate_per_key(
    scores: np.ndarray,
    labels: np.ndarray | None,
    method: str,
    target: float | None,
    keys: np.ndarray,
) -> dict[str, float]:
    """Each key's own threshold, calibrated by `calibrate` on that key's scores alone.

    Keys with fewer than `MIN_KEY_SCORES` scores, or whose scores cannot support the method
    (no normal ones), are left out: the detector gives them the model's threshold.
    """
    scores = np.asarray(scores, np.float64)
    keys = np.asarray(keys)
    order = np.argsort(keys, kind="stable")  # stable: each key's scores stay in event order
    distinct, starts, counts = np.unique(keys[order], return_index=True, return_counts=True)
    thresholds = {}
    for key, start, count in zip(distinct.tolist(), starts, counts, strict=True):
        if count < MIN_KEY_SCORES:
            continue
        index = order[start : start + count]
        try:
            thresholds[str(key)], _ = calibrate(
                scores[index], None if labels is None else labels[index], method, target
            )
        except CalibrationError:
            continue
    return thresholds


def max_f1_threshold(scores: np.ndarray, labels: np.ndarray) -> tuple[float, str]:
    precision, recall, thresholds = precision_recall_curve(labels, scores)
    f1 = np.divide(
        2 * precision * recall,
        precision + recall,
        out=np.zeros_like(precision),
        where=precision + recall > 0,
    )
    best = int(np.argmax(f1))
    return float(thresholds[best]), f"max_f1: validation F1={f1[best]:.3f}"


def precision_threshold(scores: np.ndarray, labels: np.ndarray, target: float) -> tuple[float, str]:
    """The lowest threshold (most recall) whose precision reaches `target`.

    When none does, the threshold of the best precision, and the description says so.
    """
    precision, recall, thresholds = precision_recall_curve(labels, scores)
    reached = np.flatnonzero(precision >= target)
    if reached.size:
        best = int(reached[-1])
        return float(thresholds[best]), (
            f"precision>={target:g}: validation recall={recall[best]:.3f}"
        )
    best = int(np.argmax(precision))
    return float(thresholds[best]), (
        f"precision>={target:g} unreachable; best validation precision={precision[best]:.3f}"
    )


def fpr_threshold(scores: np.ndarray, labels: np.ndarray, target: float) -> tuple[float, str]:
    """The lowest threshold whose false-positive rate stays at or below `target`."""
    fpr, tpr, thresholds = roc_curve(labels, scores)
    best = int(np.flatnonzero(fpr <= target)[-1])  # fpr[0] == 0, so there is one
    threshold = float(thresholds[best])
    if not np.isfinite(threshold):  # only "alert on nothing" qualifies: just above the top
        threshold = float(np.nextafter(scores.max(), np.inf))
    return threshold, f"fpr<={target:g}: validation recall={tpr[best]:.3f}"


def quantile_threshold(
    scores: np.ndarray, labels: np.ndarray | None, quantile: float
) -> tuple[float, str]:
    """The `quantile` of the scores of normal events (label 0, or all without labels)."""
    normal = scores if labels is None else scores[~np.asarray(labels, bool)]
    if not normal.size:
        raise CalibrationError("the validation split has no normal events")
    return float(np.quantile(normal, quantile)), f"quantile={quantile:g}"


def dynamic_threshold(
    scores: np.ndarray,
    labels: np.ndarray | None,
    keys: np.ndarray | None = None,
    prune: float = 0.13,
) -> tuple[float, str]:
    """Nonparametric threshold of Hundman et al. (2018) on the (smoothed) normal scores.

    `detector.engine.thresholds.choose_levels` over all normal validation scores at once, each key's
    scores one run of sequences. Fitted once, it is the model's static threshold; with
    `Scoring.adaptive` the engine also re-chooses it per key from live scores, never below it.
    """
    normal = np.ones(scores.size, bool) if labels is None else ~np.asarray(labels, bool)
    if not normal.any():
        raise CalibrationError("the validation split has no normal events")
    values = scores[normal]
    breaks = np.zeros(values.size, bool)
    if keys is not None:
        groups = np.asarray(keys)[normal]
        breaks[1:] = groups[1:] != groups[:-1]
    levels, z = choose_levels(values[None], np.ones((1, values.size), bool), breaks[None], prune)
    return float(levels[0]), (
        f"dynamic: max(mean+{z[0]:g}std, (1+{prune:g})·max below) of validation scores"
    )


def smooth_per_key(scores: np.ndarray, keys: np.ndarray, alpha: float) -> np.ndarray:
    """EWMA of successive scores within each key, as the detector smooths them.

    `scores` must be in event order within each key; each key starts from zero
    (`detector.engine.alerts.smooth`).
    """
    scores = np.asarray(scores, np.float64)
    if alpha >= 1.0 or not scores.size:
        return scores
    smoothed = np.empty_like(scores)
    # The recurrence is sequential by nature; one pass over the validation scores is cheap.
    starts = np.r_[True, keys[1:] != keys[:-1]]
    previous = 0.0
    for i, (score, first) in enumerate(zip(scores.tolist(), starts.tolist(), strict=True)):
        previous = alpha * score + (1 - alpha) * (0.0 if first else previous)
        smoothed[i] = previous
    return smoothed


def _require(target: float | None, method: str) -> float:
    if target is None:
        raise CalibrationError(f"threshold method {method!r} needs a target")
    return target


def min_error_score(
    manifest: Manifest, residual_variance: np.ndarray, min_error: float, scaled: bool = False
) -> float:
    """The forecast score of an error of `min_error` in every forecast feature: in their own
    units, or with `scaled` in their scaled units (a share of their training spread): each
    squared error in encoded units over its residual variance, averaged."""
    encoded = min_error if scaled else min_error / FeatureCodec(manifest).forecast_units
    return float(np.mean(np.square(encoded) / np.asarray(residual_variance, np.float64)))
