"""Historical events -> encoded, split, windowed arrays, exactly as the detector will see them.

Every record goes through `FeatureCodec.decode`, the code the detector runs on each Kafka
message, and windows are cut the way the engine cuts them: for each event of a key that has
seen `min_history` events, its last min(n, window) events, oldest first, right-padded.
Vocabularies and statistics are fitted on the training split only.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from detector.contract.features import (
    FeatureCodec,
    RecordError,
    fit_statistics,
    key_gaps,
    parse_json_record,
)
from detector.contract.manifest import CategoricalFeature, Columns, Manifest, NumericFeature
from detector.files.readers import read_records
from trainer.config import CategoricalFeatureConfig, TrainConfig

TRAIN, VALIDATION, TEST = 0, 1, 2
SPLIT_NAMES = ("train", "validation", "test")
#: JSON lines are decoded with the detector's own parser; this only guards against nonsense.
_MAX_LINE_BYTES = 16 * 1024 * 1024


class DataError(ValueError):
    """Input data that cannot be trained on; the message names the file and the row."""


@dataclass(frozen=True)
class Events:
    """Every event of every file, sorted by (key, time), with the fitted manifest."""

    manifest: Manifest
    keys: np.ndarray  # str [n]
    times: np.ndarray  # float64 seconds [n]
    encoded: np.ndarray  # float32 [n, features], what the graph takes
    labels: np.ndarray | None  # float32 [n], 0/1
    split: np.ndarray  # int8 [n]: TRAIN, VALIDATION or TEST
    position: np.ndarray  # int64 [n]: index of the event within its key

    def windows(self, split: int) -> Windows:
        """One window per event of `split` whose key has seen at least `min_history` events.

        Earlier events of the key, whatever their split, serve as context: that is what the
        detector has seen when the event arrives.
        """
        ends = np.flatnonzero(
            (self.split == split) & (self.position + 1 >= self.manifest.min_history)
        )
        lengths = np.minimum(self.position[ends] + 1, self.manifest.window)
        return Windows(self, ends, lengths)


@dataclass(frozen=True)
class Windows:
    """Windows over `events`, stored as (last event, length) and materialised per batch."""

    events: Events
    ends: np.ndarray  # int64 [m]: index of each window's last event
    lengths: np.ndarray  # int64 [m]

    def __len__(self) -> int:
        return len(self.ends)

    @property
    def labels(self) -> np.ndarray | None:
        """Label of each window's last event (classify target)."""
        labels = self.events.labels
        return None if labels is None else labels[self.ends]

    @property
    def keys(self) -> np.ndarray:
        return self.events.keys[self.ends]

    @property
    def times(self) -> np.ndarray:
        return self.events.times[self.ends]

    def subset(self, index: np.ndarray) -> Windows:
        return Windows(self.events, self.ends[index], self.lengths[index])

    def sample(self, limit: int | None, seed: int) -> Windows:
        """At most `limit` windows, drawn without replacement, kept in event order.

        Uniform over windows, so each key keeps its share of them, the weight the validation
        loss and scoring give it too; a spiky key's pull is bounded by the Huber loss."""
        if limit is None or len(self) <= limit:
            return self
        chosen = np.random.default_rng(seed).choice(len(self), size=limit, replace=False)
        return self.subset(np.sort(chosen))

    def arrays(self, index: np.ndarray | slice = slice(None)) -> tuple[np.ndarray, np.ndarray]:
        """Right-padded windows [b, window, features] float32 and their lengths [b] int64."""
        ends, lengths = self.ends[index], self.lengths[index]
        steps = np.arange(self.events.manifest.window)
        real = steps[None, :] < lengths[:, None]
        rows = np.where(real, ends[:, None] - lengths[:, None] + 1 + steps[None, :], 0)
        windows = self.events.encoded[rows]
        windows[~real] = 0.0
        return windows, lengths.astype(np.int64)


@dataclass(frozen=True)
class _Decoded:
    keys: list[str]
    times: np.ndarray
    raw: np.ndarray
    labels: np.ndarray | None


def load_events(config: TrainConfig, paths: Sequence[Path]) -> Events:
    """Read, validate, sort, split, fit and encode the events of `paths`."""
    if not paths:
        raise DataError("no data files given")
    records = [(Path(path), _read_records(Path(path), config)) for path in paths]
    draft = config.draft_manifest({})
    # First pass: keys, times and numbers; a missing value to be imputed comes back as NaN.
    first = _decode_all(_imputing_with_nan(draft), records, config.data.label)
    keys = np.array(first.keys, dtype=str)
    order = np.lexsort((first.times, keys))
    keys, times = keys[order], first.times[order]
    position = _positions(keys)
    split = _split(config, keys, times, position)
    train_rows = order[split == TRAIN]
    if not train_rows.size:
        raise DataError("the training split is empty; check [split]")

    manifest = _with_vocabularies(draft, config, records, train_rows)
    manifest = _with_fill_means(manifest, first.raw[train_rows])
    decoded = (
        _decode_all(manifest, records, config.data.label)
        if _needs_second_pass(manifest, first.raw)
        else first
    )
    raw = decoded.raw[order]
    gaps = key_gaps(keys, times)
    training = split == TRAIN
    manifest = fit_statistics(
        manifest,
        raw[training],
        keys[training].tolist(),
        gaps[training],
        per_key=config.model.per_key_normalisation,
    )
    codec = FeatureCodec(manifest)
    encoded = codec.encode(raw, codec.statistics_rows(keys.tolist()), gaps)
    labels = None if decoded.labels is None else decoded.labels[order]
    return Events(manifest, keys, times, encoded, labels, split.astype(np.int8), position)


def _read_records(path: Path, config: TrainConfig) -> list[dict]:
    """The file's records as `detector replay` reads them; JSON lines through the wire parser."""
    requested = None if config.data.format == "auto" else config.data.format
    manifest = config.draft_manifest({})
    try:
        records = read_records(path, requested, manifest.numeric_columns, manifest.columns.required)
    except (OSError, ValueError, pa.ArrowException) as error:
        raise DataError(f"{path}: cannot read: {error}") from None
    if records and isinstance(records[0], bytes):
        return [_parse_line(path, row, line) for row, line in enumerate(records, start=1)]
    return records


def _parse_line(path: Path, row: int, line: bytes) -> dict:
    try:
        return parse_json_record(line, _MAX_LINE_BYTES)
    except RecordError as error:
        raise DataError(f"{path}: row {row}: {error.reason}: {error.detail}") from None


def _decode_all(
    manifest: Manifest, files: list[tuple[Path, list[dict]]], label: str | None
) -> _Decoded:
    codec = FeatureCodec(manifest)
    keys: list[str] = []
    times: list[float] = []
    values: list[list[float]] = []
    labels: list[float] = []
    for path, records in files:
        for row, record in enumerate(records, start=1):
            try:
                decoded = codec.decode(record)
                if label is not None:
                    labels.append(_label(record.get(label), label))
            except RecordError as error:
                raise _row_error(path, row, record, error, codec.columns) from None
            keys.append(decoded.key)
            times.append(decoded.time)
            values.append(decoded.values)
    if not keys:
        raise DataError("the data files hold no records")
    return _Decoded(
        keys,
        np.array(times, np.float64),
        np.array(values, np.float64).reshape(len(keys), codec.width),
        np.array(labels, np.float32) if label is not None else None,
    )


def _row_error(
    path: Path, row: int, record: dict, error: RecordError, columns: Columns
) -> DataError:
    """The row's error; where its key or time field is absent, the fields it has."""
    message = f"{path}: row {row}: {error.reason}: {error.detail}"
    if columns.key not in record or columns.time not in record:
        message += f" (its fields: {', '.join(map(repr, record))})"
    return DataError(message)


def _label(value: object, column: str) -> float:
    """0 or 1 from a boolean, a 0/1 number or a "true"/"false"/"0"/"1" string."""
    if isinstance(value, str):
        value = {"true": 1, "false": 0, "1": 1, "0": 0}.get(value.strip().lower(), value)
    if isinstance(value, bool | int | float) and value in (0, 1):
        return float(value)
    raise RecordError("bad_label", f"{column!r} must be 0/1 or true/false, got {value!r}")


def _positions(keys: np.ndarray) -> np.ndarray:
    """Index of each event within its key, for events sorted by key."""
    starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
    counts = np.diff(np.r_[starts, len(keys)])
    return np.arange(len(keys)) - np.repeat(starts, counts)


def _split(
    config: TrainConfig, keys: np.ndarray, times: np.ndarray, position: np.ndarray
) -> np.ndarray:
    """TRAIN, VALIDATION or TEST per event, in time order within each key (no look-ahead)."""
    cutoffs = config.split.cutoffs
    if cutoffs is not None:
        return (times >= cutoffs[0]).astype(np.int8) + (times >= cutoffs[1]).astype(np.int8)
    starts = np.flatnonzero(position == 0)
    sizes = np.diff(np.r_[starts, len(keys)])
    fraction = position / np.repeat(sizes, sizes)
    train_end = config.split.train
    validation_end = train_end + config.split.validation
    return np.where(
        fraction < train_end, TRAIN, np.where(fraction < validation_end, VALIDATION, TEST)
    )


def _imputing_with_nan(manifest: Manifest) -> Manifest:
    """The manifest with NaN as the fill of "mean" features, so the first pass marks them."""
    features = [
        f.model_copy(update={"mean": float("nan")})
        if isinstance(f, NumericFeature) and f.missing == "mean"
        else f
        for f in manifest.features
    ]
    return manifest.model_copy(update={"features": features})


def _with_fill_means(manifest: Manifest, train_raw: np.ndarray) -> Manifest:
    """Fill values for "mean" features: the centre of the training values that are present,
    their mean or, with robust scale, their median. Filling leaves that centre as it was, so
    training fills with the value `fit_statistics` then stores and the detector fills with."""
    features = []
    for index, feature in enumerate(manifest.features):
        if isinstance(feature, NumericFeature) and feature.missing == "mean":
            present = train_raw[:, index][~np.isnan(train_raw[:, index])]
            centre = np.median if feature.scale == "robust" else np.mean
            feature = feature.model_copy(
                update={"mean": float(centre(present)) if present.size else 0.0}
            )
        features.append(feature)
    return manifest.model_copy(update={"features": features})


def _with_vocabularies(
    manifest: Manifest,
    config: TrainConfig,
    files: list[tuple[Path, list[dict]]],
    train_rows: np.ndarray,
) -> Manifest:
    """Vocabularies of the categorical features: their most frequent training values."""
    categorical = [f for f in manifest.features if isinstance(f, CategoricalFeature)]
    if not categorical:
        return manifest
    records = [record for _, file_records in files for record in file_records]
    training = [records[row] for row in train_rows]
    limits = {
        f.name: f.max_vocabulary
        for f in config.data.features
        if isinstance(f, CategoricalFeatureConfig)
    }
    vocabularies = {}
    for feature in categorical:
        counts = Counter(
            str(value) for record in training if (value := record.get(feature.name)) is not None
        )
        # Most frequent first; ties by value, so the vocabulary does not depend on file order.
        ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
        vocabularies[feature.name] = [value for value, _ in ranked[: limits[feature.name]]]
    features = [
        f.model_copy(update={"vocabulary": vocabularies[f.name]})
        if isinstance(f, CategoricalFeature)
        else f
        for f in manifest.features
    ]
    return manifest.model_copy(update={"features": features})


def _needs_second_pass(manifest: Manifest, raw: np.ndarray) -> bool:
    """Categorical codes need the vocabulary; imputed values need the training mean."""
    return any(isinstance(f, CategoricalFeature) for f in manifest.features) or bool(
        np.isnan(raw).any()
    )
