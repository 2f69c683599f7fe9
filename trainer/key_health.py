"""Which keys dominate the validation loss, and which look broken in the training data.

One model shared by many keys can be held back by a few of them: two series with spikes
1,292σ and 499σ above their training mean kept a 58-series model's validation loss flat while
its training loss fell, and nothing named them. This names such keys; it changes no training.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from detector.contract.features import IQR_TO_SIGMA, group_quartiles
from detector.contract.manifest import NumericFeature
from trainer.data import TRAIN, Events

#: A key dominates when it carries at least this share of the validation loss...
DOMINANT_LOSS_SHARE = 0.10
#: ...and at least this many times its share of the validation windows (its fair share), so
#: that of a few keys alike none is named for holding a large part of a small whole.
DOMINANT_RATIO = 3.0
#: Robust z beyond which a training value is no noise: a Gaussian's largest of a million draws
#: is about 5, and even heavy-tailed counts or latencies rarely reach 20.
ROBUST_Z_LIMIT = 50.0
#: Keys with fewer training rows are not judged: quartiles of a handful of values say little.
MIN_TRAINING_ROWS = 10
#: Where the IQR is 0 (most values equal), σ is 1.2533 x the mean absolute deviation from the
#: median instead, as in the modified z-score (Iglewicz and Hoaglin, 1993).
MEAN_DEVIATION_TO_SIGMA = 1.2533
#: Keys listed in full in the model card; the terminal warning names fewer.
CARD_KEYS = 10


@dataclass(frozen=True)
class DominantKey:
    key: str
    loss_share: float
    window_share: float

    @property
    def reason(self) -> str:
        return (
            f"{self.loss_share:.1%} of the validation loss from "
            f"{self.window_share:.1%} of its windows"
        )


@dataclass(frozen=True)
class SuspiciousKey:
    key: str
    #: numeric features that never change in the key's training rows
    constant: tuple[str, ...]
    #: the feature of the key's largest robust z, where that passes `ROBUST_Z_LIMIT`
    feature: str | None
    robust_z: float | None

    @property
    def reason(self) -> str:
        parts = []
        if self.feature is not None:
            parts.append(f"`{self.feature}` {self.robust_z:.4g} robust σ from its median")
        if self.constant:
            parts.append(f"{', '.join(f'`{name}`' for name in self.constant)} constant")
        return ", ".join(parts) + " in training"


@dataclass(frozen=True)
class KeyHealth:
    """The keys to look at before trusting the model, each with why."""

    dominant: tuple[DominantKey, ...] = ()
    suspicious: tuple[SuspiciousKey, ...] = ()

    def to_dict(self) -> dict:
        """The `keys` section of metrics.json."""
        return {
            "dominant": [asdict(key) | {"reason": key.reason} for key in self.dominant],
            "suspicious": [asdict(key) | {"reason": key.reason} for key in self.suspicious],
        }

    def reasons(self) -> dict[str, list[str]]:
        """Every named key's reasons, dominant keys first."""
        named: dict[str, list[str]] = {}
        for key in (*self.dominant, *self.suspicious):
            named.setdefault(key.key, []).append(key.reason)
        return named

    def warning(self, limit: int = 5) -> str | None:
        """One line naming at most `limit` keys and how many more there are; None if none."""
        names = list(self.reasons())
        if not names:
            return None
        more = f" and {len(names) - limit} more" if len(names) > limit else ""
        return (
            f"keys dominating the validation loss or looking broken ({len(names)}): "
            f"{', '.join(names[:limit])}{more} (see MODEL_CARD.md, metrics.json `keys`)"
        )


def key_health(events: Events, validation_keys: np.ndarray, losses: np.ndarray) -> KeyHealth:
    """Dominant keys from each validation window's loss; suspicious ones from training data."""
    return KeyHealth(dominant_keys(validation_keys, losses), suspicious_keys(events))


def loss_shares(keys: np.ndarray, losses: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per key (sorted): its share of the summed loss and its share of the windows."""
    names, group = np.unique(keys, return_inverse=True)
    loss = np.bincount(group, weights=losses, minlength=len(names))
    windows = np.bincount(group, minlength=len(names))
    total = loss.sum()
    share = loss / total if total > 0 else np.zeros_like(loss)
    return names, share, windows / max(len(keys), 1)


def dominant_keys(keys: np.ndarray, losses: np.ndarray) -> tuple[DominantKey, ...]:
    """Keys with at least `DOMINANT_LOSS_SHARE` of the loss and `DOMINANT_RATIO` x their
    share of windows, largest share first."""
    names, share, windows = loss_shares(keys, losses)
    chosen = np.flatnonzero((share >= DOMINANT_LOSS_SHARE) & (share >= DOMINANT_RATIO * windows))
    chosen = chosen[np.argsort(-share[chosen], kind="stable")]
    return tuple(DominantKey(str(names[i]), float(share[i]), float(windows[i])) for i in chosen)


def robust_z_extremes(
    values: np.ndarray, group: np.ndarray, groups: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per group (each non-empty): the largest |x - median| / σ of its values, σ from the IQR,
    and its range (max - min). A constant group has z 0 and range 0."""
    q1, median, q3 = (part[:, 0] for part in group_quartiles(values[:, None], group, groups))
    counts = np.bincount(group, minlength=groups)
    low, high = np.full(groups, np.inf), np.full(groups, -np.inf)
    np.minimum.at(low, group, values)
    np.maximum.at(high, group, values)
    mean_deviation = (
        np.bincount(group, weights=np.abs(values - median[group]), minlength=groups) / counts
    )
    sigma = np.where(q3 > q1, (q3 - q1) / IQR_TO_SIGMA, mean_deviation * MEAN_DEVIATION_TO_SIGMA)
    deviation = np.maximum(high - median, median - low)
    z = np.divide(deviation, sigma, out=np.zeros_like(deviation), where=sigma > 0)
    return z, high - low


def suspicious_keys(events: Events) -> tuple[SuspiciousKey, ...]:
    """Keys with a constant numeric feature or one beyond `ROBUST_Z_LIMIT` in training.

    The encoded values are used: each key's are an increasing affine map of its raw values,
    which leaves robust z and constancy as they were.
    """
    features = [
        (index, feature.name)
        for index, feature in enumerate(events.manifest.features)
        if isinstance(feature, NumericFeature)
    ]
    training = events.split == TRAIN
    names, group = np.unique(events.keys[training], return_inverse=True)
    if not features or not names.size:
        return ()
    encoded = events.encoded[training].astype(np.float64)
    z, spread = (
        np.column_stack(parts)
        for parts in zip(
            *(robust_z_extremes(encoded[:, index], group, len(names)) for index, _ in features),
            strict=True,
        )
    )
    judged = (np.bincount(group, minlength=len(names)) >= MIN_TRAINING_ROWS)[:, None]
    constant, outlier = (spread == 0) & judged, (z > ROBUST_Z_LIMIT) & judged
    flagged = np.flatnonzero(constant.any(axis=1) | outlier.any(axis=1))
    flagged = flagged[np.argsort(-z[flagged].max(axis=1), kind="stable")]
    return tuple(
        _suspicious(str(names[row]), constant[row], outlier[row], z[row], features)
        for row in flagged
    )


def _suspicious(
    key: str,
    constant: np.ndarray,
    outlier: np.ndarray,
    z: np.ndarray,
    features: list[tuple[int, str]],
) -> SuspiciousKey:
    worst = int(np.argmax(z))
    return SuspiciousKey(
        key,
        tuple(name for (_, name), flat in zip(features, constant, strict=True) if flat),
        features[worst][1] if outlier[worst] else None,
        float(z[worst]) if outlier[worst] else None,
    )
