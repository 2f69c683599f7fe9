"""From scores to alerts: per-key smoothing, anomalous episodes, and why a score was high.

An alert is raised once per episode, not once per event: an episode of a key opens when its
(smoothed) score reaches the threshold (for `confirm` consecutive scored events, if the model
asks for it), stays open while scores stay there, and closes after `cooldown` consecutive
scored events below it. The update is vectorised over the keys of one round of a batch (each
key at most once), so a key's events are still applied in order.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from detector.contract.features import UNKNOWN_CODE
from detector.contract.manifest import CategoricalFeature, Manifest
from detector.engine.arena import KeyArena
from detector.engine.records import Source

ExplanationKind = Literal["forecast_error_share", "occlusion"]


@dataclass(frozen=True, slots=True)
class Attribution:
    """One feature's part in an alert.

    forecast_error_share: the feature's share of the forecast error (shares sum to 1).
    occlusion: the raw score minus the score with the feature of the last event set to its
    training mean (unknown for a categorical); positive values pushed the score up.
    """

    feature: str
    value: float


@dataclass(frozen=True, slots=True)
class Alert:
    """The opening of an anomalous episode of one key.

    `score` is the (smoothed) score of the event that opened the episode. `onset_time` is the
    event time of the first of the `confirm` consecutive scores at or above the threshold that
    opened it, when the anomaly began as far as the detector can tell (the alert's own
    `event_time` without confirmation). `peak_score` is the
    highest score of the episode among the events of the batch in which it opened (from the
    opening event until it closed or the batch ended); later events of the same episode raise
    no new alert and do not change it. `sequence` numbers the event among its key's events
    since the key's state began (it starts again after the key is evicted or expires); with
    the model version, the key and the event time it makes `alert_id`, so replaying the same
    events gives the same ids.
    """

    alert_id: str
    key: str
    event_time: float
    onset_time: float
    sequence: int
    score: float
    peak_score: float
    threshold: float
    model_version: str
    task: str
    source: Source | None
    explanation_kind: ExplanationKind
    explanation: tuple[Attribution, ...]

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form, as published and written by `detector replay --alerts`."""
        return {
            "alert_id": self.alert_id,
            "key": self.key,
            "event_time": self.event_time,
            "onset_time": self.onset_time,
            "sequence": self.sequence,
            "score": self.score,
            "peak_score": self.peak_score,
            "threshold": self.threshold,
            "model_version": self.model_version,
            "task": self.task,
            "source": None if self.source is None else self.source.to_dict(),
            "explanation_kind": self.explanation_kind,
            "explanation": [{"feature": a.feature, "value": a.value} for a in self.explanation],
        }


def alert_id(model_version: str, key: str, event_time: float, sequence: int) -> str:
    """Deterministic id: the same events and model give the same ids from a file or Kafka."""
    text = f"{model_version}\x1f{key}\x1f{event_time!r}\x1f{sequence}"
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def smooth(arena: KeyArena, slots: np.ndarray, scores: np.ndarray, alpha: float) -> np.ndarray:
    """EWMA of each key's scores, started from zero (no error); stores and returns the new
    values.

    A new key's first score weighs `alpha` like any other: the large errors of its first
    events, while its model's window still fills, cannot hold the smoothed score up for the
    next 1 / alpha events, whereas an error that lasts reaches its level within a few of them.
    With alpha 1 (no smoothing) the scores are stored as they are, so an infinite score
    never meets a zero weight (inf * 0 is NaN).
    """
    if alpha == 1.0:
        smoothed = np.asarray(scores, dtype=arena.smoothed.dtype)
    else:
        previous = arena.smoothed[slots]
        previous = np.where(np.isnan(previous), 0.0, previous)
        smoothed = alpha * scores + (1.0 - alpha) * previous
    arena.smoothed[slots] = smoothed
    return smoothed


def advance_episodes(
    arena: KeyArena,
    slots: np.ndarray,
    scores: np.ndarray,
    times: np.ndarray,
    threshold: np.ndarray,
    cooldown: int,
    confirm: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """Apply one scored event (at `times`) per slot to the episode state: True where an
    episode opened, and the onset of each slot's current run of scores above the threshold.

    A score counts as above once it is the `confirm`-th consecutive one at or above the
    threshold; the run's onset is the time of the first of them (the event's own time
    without confirmation). An episode opens at such a score and closes at the `cooldown`-th
    consecutive score not above (at the first one when `cooldown` is 0 or 1); the peak is
    the highest score while open.
    """
    above = scores >= threshold
    onset = times
    if confirm > 1:
        run = np.where(above, arena.above[slots] + 1, 0)
        arena.above[slots] = run
        arena.onset[slots] = onset = np.where(run == 1, times, arena.onset[slots])
        above = run >= confirm
    was_open = arena.in_episode[slots]
    opened = above & ~was_open
    below = np.where(above, 0, arena.below[slots] + was_open)
    arena.below[slots] = below
    arena.in_episode[slots] = above | (was_open & (below < max(cooldown, 1)))
    arena.peak[slots] = np.where(
        opened, scores, np.where(above, np.fmax(arena.peak[slots], scores), arena.peak[slots])
    )
    return opened, onset


def forecast_shares(contrib: np.ndarray, names: list[str]) -> list[tuple[Attribution, ...]]:
    """Each forecast feature's share of the error, largest first, for rows of `contrib`."""
    totals = contrib.sum(axis=1, keepdims=True)
    shares = np.divide(contrib, totals, out=np.zeros_like(contrib), where=totals > 0)
    return _ranked(shares, names)


def occlusion_values(manifest: Manifest) -> np.ndarray:
    """What a feature is set to when occluded: encoded 0 (the mean) or the unknown code."""
    return np.array(
        [UNKNOWN_CODE if isinstance(f, CategoricalFeature) else 0.0 for f in manifest.features],
        np.float32,
    )


def occlusion_effects(
    base: np.ndarray, occluded: np.ndarray, names: list[str]
) -> list[tuple[Attribution, ...]]:
    """Score minus occluded score [n, features], ranked by size for each of n alerts."""
    return _ranked(base[:, None] - occluded, names)


def _ranked(values: np.ndarray, names: list[str]) -> list[tuple[Attribution, ...]]:
    order = np.argsort(-np.abs(values), axis=1, kind="stable")
    return [
        tuple(Attribution(names[i], float(row[i])) for i in ranking)
        for row, ranking in zip(values.tolist(), order.tolist(), strict=True)
    ]
