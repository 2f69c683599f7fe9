"""How a raw record becomes numbers: the one definition shared by the trainer and the detector.

Two steps, split so that the per-record part stays as small as possible:

1. `FeatureCodec.decode` (per record): validate a JSON object and pull out its key, its event
   time and one raw value per feature (numbers as floats, categories as vocabulary codes).
   Anything wrong raises `RecordError` with a machine-readable reason.
2. `FeatureCodec.encode` (per batch, vectorised): centre and scale the numeric values
   (globally or with the key's own statistics: mean and std, or median and IQR / 1.349),
   derive the time since the key's previous event, and return the float32 matrix the graph
   takes. Values are never clipped: a fault is an extreme value.

`fit_statistics` computes the statistics `encode` uses; it lives here so that a
transformation and the fitting of its parameters can never drift apart.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np
import orjson

from detector.contract.manifest import (
    CategoricalFeature,
    Feature,
    KeyStatistics,
    Manifest,
    NumericFeature,
    TimeDeltaFeature,
)

#: Larger magnitudes are not finite in the float32 the graph computes in.
FLOAT32_MAX = float(np.finfo(np.float32).max)

#: Event times outside [epoch, 2100-01-01) are refused as malformed.
MAX_EVENT_TIME = 4_102_444_800.0
PADDING_CODE = 0
UNKNOWN_CODE = 1
#: A std below this is treated as 1 so a constant feature does not explode.
MIN_STD = 1e-6
#: A Gaussian's IQR is 1.349 σ: robust scaling divides by IQR / 1.349, so that on clean
#: Gaussian data it scales as the standard one does.
IQR_TO_SIGMA = 1.349


class RecordError(ValueError):
    """A record that cannot be scored: `reason` is machine-readable, `detail` is for people."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def parse_json_record(payload: bytes | str, max_bytes: int) -> dict:
    """Decode one JSON object from the wire, refusing oversized, malformed or non-object input."""
    if len(payload) > max_bytes:
        raise RecordError("too_large", f"{len(payload)} bytes exceeds the {max_bytes}-byte limit")
    try:
        record = orjson.loads(payload)
    except orjson.JSONDecodeError as error:
        raise RecordError("not_json", str(error)) from None
    if not isinstance(record, dict):
        raise RecordError("not_object", f"expected a JSON object, got {type(record).__name__}")
    return record


def parse_event_time(value: object, unit: str, column: str) -> float:
    """Seconds since the epoch from a number (in `unit`), an ISO 8601 string or a datetime
    object (records a program builds); a time without a zone is UTC."""
    if value is None:
        raise RecordError("bad_timestamp", f"{column!r} is missing")
    if isinstance(value, bool):
        raise RecordError("bad_timestamp", f"{column!r} must be a number or ISO 8601 string")
    if isinstance(value, int | float):
        try:
            seconds = float(value) / 1000.0 if unit == "ms" else float(value)
        except OverflowError:  # an int beyond the range of floats: refused just below
            seconds = math.inf
    elif isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            raise RecordError(
                "bad_timestamp", f"{column!r} is not ISO 8601: {value[:40]!r}"
            ) from None
        seconds = _utc_seconds(parsed)
    elif isinstance(value, datetime):
        seconds = _utc_seconds(value)
    else:
        raise RecordError("bad_timestamp", f"{column!r} has type {type(value).__name__}")
    if not 0.0 <= seconds < MAX_EVENT_TIME:  # also false for NaN
        raise RecordError("bad_timestamp", f"{column!r} is out of range: {value!r}")
    return seconds


def _utc_seconds(moment: datetime) -> float:
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()


@dataclass(frozen=True, slots=True)
class DecodedRecord:
    key: str
    time: float
    values: list[float]


class FeatureCodec:
    """Turns records into model inputs exactly as the manifest describes."""

    def __init__(self, manifest: Manifest) -> None:
        self.manifest = manifest
        self.columns = manifest.columns
        self.features: list[Feature] = list(manifest.features)
        self.width = len(self.features)
        self._vocabularies = {
            f.name: {label: code + 2 for code, label in enumerate(f.vocabulary)}
            for f in self.features
            if isinstance(f, CategoricalFeature)
        }
        self.numeric_index = np.array(
            [i for i, f in enumerate(self.features) if isinstance(f, NumericFeature)], np.intp
        )
        self.delta_index = np.array(
            [i for i, f in enumerate(self.features) if isinstance(f, TimeDeltaFeature)], np.intp
        )
        self.forecast_index = np.array(
            [
                i
                for i, f in enumerate(self.features)
                if isinstance(f, NumericFeature) and f.forecast
            ],
            np.intp,
        )
        numeric = manifest.numeric_features
        delta = [f for f in self.features if isinstance(f, TimeDeltaFeature)]
        # Row 0 holds the global statistics; rows 1.. the per-key ones, if any.
        per_key = manifest.per_key_statistics or {}
        self._key_rows = {key: row + 1 for row, key in enumerate(per_key)}
        self._mean = np.array(
            [[f.mean for f in numeric]] + [stats.mean for stats in per_key.values()], np.float64
        ).reshape(1 + len(per_key), len(numeric))
        self._std = np.maximum(
            np.array(
                [[f.std for f in numeric]] + [stats.std for stats in per_key.values()], np.float64
            ).reshape(1 + len(per_key), len(numeric)),
            MIN_STD,
        )
        unscaled = [i for i, f in enumerate(numeric) if f.scale == "none"]
        self._mean[:, unscaled] = 0.0
        self._std[:, unscaled] = 1.0
        self._delta_mean = np.array([f.mean for f in delta], np.float64)
        self._delta_std = np.array([max(f.std, MIN_STD) for f in delta], np.float64)
        self._fallback = [
            f.mean
            if isinstance(f, NumericFeature) and f.missing == "mean"
            else UNKNOWN_CODE
            if isinstance(f, CategoricalFeature) and f.missing == "unknown"
            else None
            for f in self.features
        ]
        self._readers = [self._reader(f) for f in self.features]

    @property
    def forecast_units(self) -> np.ndarray:
        """Each forecast feature's own units per encoded unit, with the global statistics:
        its std, or 1 where it is not scaled."""
        numeric = [f.name for f in self.manifest.numeric_features]
        columns = [numeric.index(f.name) for f in self.manifest.forecast_features]
        return self._std[0, columns]

    def vocabulary(self, name: str) -> dict[str, int]:
        """Label -> code of the categorical feature `name`."""
        return self._vocabularies[name]

    def decode(self, record: Mapping, key: str | None = None) -> DecodedRecord:
        """Validate one record; `key` overrides the record's key column (e.g. a Kafka key)."""
        if key is None:
            key = self._key(record)
        time = parse_event_time(
            record.get(self.columns.time), self.columns.time_unit, self.columns.time
        )
        values = [read(record) for read in self._readers]
        return DecodedRecord(key, time, values)

    def _key(self, record: Mapping) -> str:
        value = record.get(self.columns.key)
        if value is None:
            raise RecordError("missing_key", f"{self.columns.key!r} is missing")
        if value == "" or isinstance(value, bool | float | dict | list):
            raise RecordError(
                "missing_key", f"{self.columns.key!r} must be a non-empty string or integer"
            )
        return str(value)

    def _reader(self, feature: Feature) -> Callable[[Mapping], float]:
        name = feature.name
        fallback = self._fallback[self.features.index(feature)]
        if isinstance(feature, TimeDeltaFeature):
            return lambda record: 0.0  # derived later, in encode, from the key's previous event
        if isinstance(feature, CategoricalFeature):
            vocabulary = self._vocabularies[name]

            def read_category(record: Mapping) -> float:
                value = record.get(name)
                if value is None:
                    if fallback is None:
                        raise RecordError("missing_feature", f"{name!r} is missing")
                    return float(fallback)
                if not isinstance(value, str | int) or isinstance(value, bool):
                    raise RecordError("wrong_type", f"{name!r} must be a string or integer")
                return float(vocabulary.get(str(value), UNKNOWN_CODE))

            return read_category

        def read_number(record: Mapping) -> float:
            value = record.get(name)
            if value is None:
                if fallback is None:
                    raise RecordError("missing_feature", f"{name!r} is missing")
                return float(fallback)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise RecordError(
                    "wrong_type", f"{name!r} must be a number, got {type(value).__name__}"
                )
            try:
                number = float(value)
            except OverflowError:  # an int beyond the range of floats
                number = math.inf
            if not abs(number) <= FLOAT32_MAX:  # the graph computes in float32: inf there
                raise RecordError("not_finite", f"{name!r} is {value!r}")
            return number

        return read_number

    def statistics_rows(self, keys: Iterable[str]) -> np.ndarray:
        """Row of each key in the statistics table (0: the global statistics)."""
        rows = self._key_rows
        return np.fromiter((rows.get(key, 0) for key in keys), np.intp)

    def encode(self, raw: np.ndarray, statistics_rows: np.ndarray, gaps: np.ndarray) -> np.ndarray:
        """Model inputs [n, width] from raw values [n, width], stats rows [n] and gaps [n] (s)."""
        encoded = np.array(raw, dtype=np.float64, copy=True)
        if self.numeric_index.size:
            numeric = encoded[:, self.numeric_index]
            encoded[:, self.numeric_index] = (numeric - self._mean[statistics_rows]) / self._std[
                statistics_rows
            ]
        if self.delta_index.size:
            log_gap = np.log1p(np.maximum(gaps, 0.0))[:, None]
            encoded[:, self.delta_index] = (log_gap - self._delta_mean) / self._delta_std
        # A huge value z-scored by a small std may pass float32's range: keep it finite.
        np.clip(encoded, -FLOAT32_MAX, FLOAT32_MAX, out=encoded)
        return encoded.astype(np.float32)


def key_gaps(keys: Sequence[str], times: np.ndarray) -> np.ndarray:
    """Seconds since each event's previous event of the same key (0 for a key's first).

    The events must be in the order they happen; used on whole files by the trainer. The
    streaming engine computes the same quantity from its per-key state.
    """
    gaps = np.zeros(len(keys), np.float64)
    last: dict[str, float] = {}
    for i, (key, time) in enumerate(zip(keys, times, strict=True)):
        previous = last.get(key)
        if previous is not None:
            gaps[i] = time - previous
        last[key] = time
    return gaps


def fit_statistics(
    manifest: Manifest,
    raw: np.ndarray,
    keys: Sequence[str],
    gaps: np.ndarray,
    per_key: bool,
) -> Manifest:
    """The manifest with scaling statistics fitted on `raw` (the training split only): mean and
    std, or median and robust σ for features with `scale = "robust"`."""
    features: list[Feature] = []
    for index, feature in enumerate(manifest.features):
        if isinstance(feature, NumericFeature):
            centre, spread = _column_statistics(raw[:, index], feature.scale == "robust")
            feature = feature.model_copy(update={"mean": centre, "std": spread})
        elif isinstance(feature, TimeDeltaFeature):
            log_gap = np.log1p(np.maximum(gaps, 0.0))
            centre, spread = _column_statistics(log_gap, robust=False)
            feature = feature.model_copy(update={"mean": centre, "std": spread})
        features.append(feature)
    per_key_statistics = None
    if per_key:
        numeric = [(i, f) for i, f in enumerate(features) if isinstance(f, NumericFeature)]
        names, group = np.unique(np.asarray(keys, dtype=object), return_inverse=True)
        robust = np.array([f.scale == "robust" for _, f in numeric], bool)
        means, stds = _key_statistics(raw[:, [i for i, _ in numeric]], group, len(names), robust)
        per_key_statistics = {
            str(name): KeyStatistics(mean=means[row].tolist(), std=stds[row].tolist())
            for row, name in enumerate(names)
        }
    return manifest.model_copy(
        update={"features": features, "per_key_statistics": per_key_statistics}
    )


def _column_statistics(column: np.ndarray, robust: bool) -> tuple[float, float]:
    """A column's centre and floored spread: mean and std, or median and robust σ."""
    if robust:
        median, sigma = robust_statistics(column[:, None], np.zeros(len(column), np.intp), 1)
        return float(median[0, 0]), float(_floored(sigma)[0, 0])
    return float(column.mean()), float(_floored(np.asarray(column.std())))


def _key_statistics(
    numeric: np.ndarray, group: np.ndarray, groups: int, robust: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Per key: each numeric column's mean and floored std, or median and robust σ where
    `robust` says so."""
    counts = np.bincount(group, minlength=groups)[:, None]
    sums = np.zeros((groups, numeric.shape[1]))
    squares = np.zeros_like(sums)
    np.add.at(sums, group, numeric)
    np.add.at(squares, group, numeric * numeric)
    means = sums / counts
    stds = np.sqrt(np.maximum(squares / counts - means * means, 0.0))
    if robust.any():
        means[:, robust], stds[:, robust] = robust_statistics(numeric[:, robust], group, groups)
    return means, _floored(stds)


def group_quartiles(
    values: np.ndarray, group: np.ndarray, groups: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per group and column of `values` [n, c] (`group` [n] in 0..groups-1, none empty): the
    first quartile, the median and the third quartile [groups, c], as `np.quantile` has them.

    Vectorised for a million keys: each column is sorted once by (group, value), and every
    group's quantiles are read at their positions in it.
    """
    counts = np.bincount(group, minlength=groups)
    starts = np.cumsum(counts) - counts
    ordered = np.column_stack([column[np.lexsort((column, group))] for column in values.T])
    q1, median, q3 = (_group_quantile(ordered, starts, counts, q) for q in (0.25, 0.5, 0.75))
    return q1, median, q3


def robust_statistics(
    values: np.ndarray, group: np.ndarray, groups: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per group and column of `values` [n, c]: the median and σ from the IQR, which spikes
    cannot inflate as they do the std. Where the IQR is 0 (most values equal: flags, counts
    that are mostly 0) σ is the std instead: any narrower spread would blow a rare flag up to
    a huge input.
    """
    q1, median, q3 = group_quartiles(values, group, groups)
    counts = np.bincount(group, minlength=groups)[:, None]
    sums, squares = np.zeros_like(median), np.zeros_like(median)
    np.add.at(sums, group, values)
    np.add.at(squares, group, values * values)
    mean = sums / counts
    std = np.sqrt(np.maximum(squares / counts - mean * mean, 0.0))
    return median, np.where(q3 > q1, (q3 - q1) / IQR_TO_SIGMA, std)


def _group_quantile(
    ordered: np.ndarray, starts: np.ndarray, counts: np.ndarray, q: float
) -> np.ndarray:
    """[groups, c]: each group's `q` quantile of columns sorted within groups."""
    position = starts + q * (counts - 1)
    below = np.floor(position).astype(np.int64)
    above = np.minimum(below + 1, starts + counts - 1)
    fraction = (position - below)[:, None]
    return ordered[below] + (ordered[above] - ordered[below]) * fraction


def _floored(spread: np.ndarray) -> np.ndarray:
    """The spread, or 1 where it is below `MIN_STD`: a constant feature must not explode."""
    return np.where(spread > MIN_STD, spread, 1.0)
