"""The manifest: everything the detector needs beside the graph, versioned.

A model file carries it in its ONNX metadata (`detector.contract.model_file`), so that a
model file is deployable on its own: the features and their statistics, the window, the
network's shape, the scoring and its thresholds.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

SCHEMA_VERSION = 1

Task = Literal["classify", "forecast"]
ExportMode = Literal["window", "stateful"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NumericFeature(_Strict):
    """A number, z-scored with statistics fitted on the training split only (unless `scale`
    says it is used as it is)."""

    kind: Literal["numeric"] = "numeric"
    name: str = Field(min_length=1)
    #: The centre subtracted: the training mean, or the median with `scale = "robust"`.
    mean: float = 0.0
    #: The spread divided by: the training std, or with `scale = "robust"` IQR / 1.349
    #: (the std where the IQR is 0).
    std: float = Field(default=1.0, gt=0)
    #: standard: z-scored with `mean` and `std` (or the key's own, with per-key statistics);
    #: robust: the same arithmetic with median and IQR / 1.349 in `mean` and `std`, which
    #: the spikes and faults in training data cannot move much (equal to the std on Gaussian
    #: data); none: used as it is, for values already on a small scale such as one-hot flags,
    #: which z-scores would blow up to large inputs whenever a rare flag is set.
    scale: Literal["standard", "robust", "none"] = "standard"
    #: What to do when the value is absent or null: refuse the record, or use `mean` (the
    #: training mean, or median with `scale = "robust"`).
    missing: Literal["reject", "mean"] = "reject"
    #: Forecast models predict this feature of the next event (ignored by classify models).
    forecast: bool = True


class CategoricalFeature(_Strict):
    """A label from a fixed vocabulary: code 0 is padding, 1 is unknown, 2.. the vocabulary."""

    kind: Literal["categorical"] = "categorical"
    name: str = Field(min_length=1)
    vocabulary: list[str] = Field(max_length=1_000_000)
    embedding_dim: int = Field(default=4, ge=1, le=512)
    missing: Literal["reject", "unknown"] = "reject"


class TimeDeltaFeature(_Strict):
    """Derived: log1p of the seconds since the key's previous event (0 for its first), z-scored."""

    kind: Literal["time_delta"] = "time_delta"
    name: str = "time_delta"
    mean: float = 0.0
    std: float = Field(default=1.0, gt=0)


Feature = Annotated[
    NumericFeature | CategoricalFeature | TimeDeltaFeature, Field(discriminator="kind")
]


class Columns(_Strict):
    """Where the key, the event time and the label are found in a record."""

    key: str = Field(min_length=1)
    time: str = Field(min_length=1)
    #: Numbers are seconds (or milliseconds) since the epoch; strings are ISO 8601.
    time_unit: Literal["s", "ms"] = "s"
    label: str | None = None

    @property
    def required(self) -> tuple[str, str]:
        """The columns every record of a file must have: a file without one is refused once,
        not dead-lettered row by row."""
        return (self.key, self.time)


class KeyStatistics(_Strict):
    """Per-key mean and std of the numeric features, in feature order, and optionally the
    key's own calibrated threshold."""

    mean: list[float]
    std: list[float]
    #: Calibrated on this key's validation scores alone (trainer `[threshold] per_key`): the
    #: key's static threshold in place of `Scoring.threshold`, so that one model shared by
    #: unlike keys holds each to its own normal error level. None: `Scoring.threshold`.
    threshold: float | None = Field(default=None, ge=0, allow_inf_nan=False)


class Network(_Strict):
    """Shape facts the detector needs (state arenas) and people want to see."""

    hidden: int = Field(ge=1, le=4096)
    layers: int = Field(ge=1, le=3)
    bidirectional: bool = False
    layer_norm: bool = False
    dropout: float = Field(default=0.0, ge=0, lt=1)


class AdaptiveThreshold(_Strict):
    """Re-choose each key's threshold from its own recent smoothed scores.

    Every `refresh` scored events of a key, the dynamic threshold (`detector.engine.thresholds`)
    of its last `history` smoothed scores becomes its threshold, by default never below the
    static one (the key's calibrated threshold, or `Scoring.threshold`: the floor that keeps
    quiet keys from alerting on tiny errors); while a key has fewer than `warm_up` scored
    events, its threshold is also at least `warm_up_floor` times the static one (or it does
    not alert at all).
    It follows keys whose live errors differ from the training data's (new operating modes,
    level shifts), as the rolling windows of telemanom do. Costs `history` × 4 bytes per key.
    """

    #: Smoothed scores remembered per key (telemanom: 30 windows of 70 errors).
    history: int = Field(default=2100, ge=10, le=100_000)
    #: Scored events of a key between two re-choices.
    refresh: int = Field(default=70, ge=1, le=100_000)
    #: Pruning margin: a peak must exceed the largest normal score by this share.
    prune: float = Field(default=0.13, ge=0, lt=10)
    #: telemanom's error buffer: the scores within this many positions of one above the
    #: threshold count with it, in the choice and not as normal scores. 0: only those above.
    buffer: int = Field(default=0, ge=0, le=100_000)
    #: calibrated: the static threshold (the key's own calibrated one where the manifest has
    #: it, else `Scoring.threshold`) bounds every key's threshold from below; none: a key's
    #: threshold is its own alone once chosen (a model shared by unlike keys whose pooled
    #: calibration suits none of them, and which has no per-key thresholds).
    floor: Literal["calibrated", "none"] = "calibrated"
    #: Scored events of a key before its own history alone sets its threshold: a handful of
    #: its own scores cannot say what is unusual for it (telemanom judges its first window
    #: with all of it in hand; a stream cannot look ahead).
    warm_up: int = Field(default=2100, ge=0, le=1_000_000)
    #: A warming key's threshold is at least this multiple of its static threshold (what
    #: training learned of the key, or of the fleet for a key it never saw), so a new key
    #: alerts from its first events on errors far beyond what training saw; None: a warming
    #: key never alerts.
    warm_up_floor: float | None = Field(default=None, ge=1, lt=1000)

    @model_validator(mode="after")
    def _refresh_within_history(self) -> AdaptiveThreshold:
        if self.refresh > self.history:
            raise ValueError("refresh must not exceed history (scores between re-choices)")
        return self


class Scoring(_Strict):
    """What a score means and where alerts start."""

    #: probability: sigmoid of the classifier; forecast_error: mean squared scaled error.
    semantics: Literal["probability", "forecast_error"]
    threshold: float
    #: How the threshold was chosen, e.g. "max_f1", "precision>=0.9", "quantile=0.995".
    calibration: str
    #: Exponential smoothing of successive scores per key (1.0: no smoothing).
    smoothing: float = Field(default=1.0, gt=0, le=1)
    #: Per-key thresholds that follow each key's live scores; None: `threshold` for all keys.
    adaptive: AdaptiveThreshold | None = None
    #: Consecutive scored events at or above the threshold before a key's alert episode opens
    #: (1: at once). A smoothed score that only touches the threshold is more often noise than
    #: a fault; a real one stays there. Costs 12 bytes per key when above 1 (the run's length
    #: and its onset).
    confirm: int = Field(default=1, ge=1, le=100_000)
    #: No threshold of any key is below this score, however the threshold was chosen: a
    #: forecast model's errors that are tiny in the feature's own units never alert, even
    #: where they are unusual for a quiet key (the trainer's `[threshold] min_error`, as the
    #: score of an error of that size in every forecast feature). 0: no such bound.
    min_score: float = Field(default=0.0, ge=0, allow_inf_nan=False)


class Probes(_Strict):
    """A few encoded windows and the float graph's scores of them, stored with an int8 model.

    int8 kernels differ between CPUs (onnxruntime's U8S8 kernels saturate on x86 without
    VNNI), so the detector scores these windows at load on the CPU it runs on and refuses
    the model when they stray from the float scores by more than `tolerance`.
    """

    #: Each probe's real events, oldest first, as the graph takes them (padding implied).
    windows: list[list[list[float]]] = Field(min_length=1, max_length=64)
    #: The float graph's score of each window.
    scores: list[float]
    #: Largest accepted difference from `scores`, relative above magnitude 1.
    tolerance: float = Field(gt=0, allow_inf_nan=False)

    def arrays(self, window: int) -> tuple[np.ndarray, np.ndarray]:
        """The windows right-padded to `window` steps [n, window, width] and their lengths."""
        lengths = np.array([len(events) for events in self.windows], np.int64)
        width = len(self.windows[0][0])
        padded = np.zeros((len(self.windows), window, width), np.float32)
        for row, events in enumerate(self.windows):
            padded[row, : len(events)] = events
        return padded, lengths


class TrainingSummary(_Strict):
    rows: int = Field(ge=0)
    keys: int = Field(ge=0)
    positives: int | None = None
    time_range: tuple[float, float] | None = None
    metrics: dict[str, float] = Field(default_factory=dict)


class Manifest(_Strict):
    """Everything the detector needs beside the graph itself."""

    schema_version: int = SCHEMA_VERSION
    task: Task
    export_mode: ExportMode
    columns: Columns
    features: list[Feature] = Field(min_length=1, max_length=4096)
    window: int = Field(ge=1, le=4096)
    #: Events a key must have seen before its events are scored (earlier ones are warming up).
    min_history: int = Field(ge=1, le=4096)
    per_key_statistics: dict[str, KeyStatistics] | None = None
    network: Network
    scoring: Scoring
    training: TrainingSummary
    created_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    trainer_version: str
    #: int8 models only: windows to check the graph's scores on at load.
    probes: Probes | None = None
    graph_sha256: str = ""

    @model_validator(mode="after")
    def _consistent(self) -> Manifest:
        names = [feature.name for feature in self.features]
        if len(set(names)) != len(names):
            raise ValueError("feature names must be unique")
        if self.min_history > self.window:
            raise ValueError("min_history must not exceed window")
        if self.task == "forecast":
            if self.min_history < 2:
                raise ValueError(
                    "forecast models need min_history >= 2 (one event to predict from)"
                )
            if not self.forecast_features:
                raise ValueError("a forecast model needs at least one numeric forecast feature")
        if self.export_mode == "stateful" and self.network.bidirectional:
            raise ValueError("a bidirectional network cannot be exported in stateful mode")
        numeric = len(self.numeric_features)
        for key, stats in (self.per_key_statistics or {}).items():
            if len(stats.mean) != numeric or len(stats.std) != numeric:
                raise ValueError(f"per_key_statistics[{key!r}] must have {numeric} means and stds")
        if self.probes is not None:
            self._check_probes(self.probes)
        return self

    def _check_probes(self, probes: Probes) -> None:
        if len(probes.scores) != len(probes.windows):
            raise ValueError("probes need one score per window")
        width = input_width(self)
        for events in probes.windows:
            if not 1 <= len(events) <= self.window:
                raise ValueError(f"each probe window needs 1 to {self.window} events")
            if any(len(values) != width for values in events):
                raise ValueError(f"each probe event needs {width} values, one per feature")

    @property
    def key_thresholds(self) -> dict[str, float]:
        """The keys that have a calibrated threshold of their own, with it."""
        return {
            key: stats.threshold
            for key, stats in (self.per_key_statistics or {}).items()
            if stats.threshold is not None
        }

    @property
    def per_key_normalisation(self) -> dict[str, dict[str, list[float]]] | None:
        """The per-key means and stds, which shape how a key's state was encoded (the per-key
        thresholds do not: a model that only changes them can keep the keys' state)."""
        if self.per_key_statistics is None:
            return None
        return {
            key: stats.model_dump(include={"mean", "std"})
            for key, stats in self.per_key_statistics.items()
        }

    @property
    def numeric_features(self) -> list[NumericFeature]:
        return [f for f in self.features if isinstance(f, NumericFeature)]

    @property
    def forecast_features(self) -> list[NumericFeature]:
        return [f for f in self.numeric_features if f.forecast]

    @property
    def numeric_columns(self) -> list[str]:
        """Record fields that hold numbers: the time, the label and the numeric features.

        Readers of untyped files (CSV) use it to type a column cell by cell, so that one
        malformed cell costs one record rather than the whole column.
        """
        label = [self.columns.label] if self.columns.label else []
        return [self.columns.time, *label, *(f.name for f in self.numeric_features)]

    @functools.cached_property
    def model_version(self) -> str:
        """Short, content-derived identity of the whole model, carried on every alert.

        The graph (through its hash) and all the manifest says of it, so that models that
        differ only in threshold or scoring never share alert ids; not `created_at`, so that
        writing the same model again keeps its version. Cached: read for every alert.
        """
        content = self.model_dump(mode="json", exclude={"created_at"})
        text = json.dumps(content, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def model_copy(
        self, *, update: Mapping[str, Any] | None = None, deep: bool = False
    ) -> Manifest:
        """A copy without the cached version, which `update` may change."""
        copied = super().model_copy(update=update, deep=deep)
        copied.__dict__.pop("model_version", None)
        return copied

    def to_json(self) -> str:
        return self.model_dump_json()


def input_width(manifest: Manifest) -> int:
    """Values per event in the graph's input: one per feature (categoricals as codes)."""
    return len(manifest.features)
