"""The training configuration: one TOML file, validated before any data is read.

Every section maps onto the model contract (`detector.contract.manifest`), so a mistake is reported
against the field that holds it rather than surfacing as a broken model later.
"""

from __future__ import annotations

import tomllib
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from detector import __version__
from detector.contract.manifest import (
    AdaptiveThreshold,
    CategoricalFeature,
    Columns,
    Feature,
    Manifest,
    Network,
    NumericFeature,
    Scoring,
    TimeDeltaFeature,
    TrainingSummary,
)
from trainer.recipe import FORECAST_RECIPE, with_forecast_recipe

#: Default target of each threshold method, when `[threshold] target` is not given.
DEFAULT_TARGETS = {
    "max_f1": None,
    "precision": 0.9,
    "fpr": 0.01,
    "quantile": 0.995,
    "dynamic": 0.13,
}
#: Threshold methods that need no labels: they look at the scores of normal events only.
UNSUPERVISED_METHODS = ("quantile", "dynamic")


class ConfigError(ValueError):
    """A configuration file that cannot be used; the message names the file and the fields."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NumericFeatureConfig(_Section):
    name: str = Field(min_length=1)
    kind: Literal["numeric"] = "numeric"
    #: reject: a record without the value is an error; mean: use the training mean.
    missing: Literal["reject", "mean"] = "reject"
    #: Forecast models predict this feature of the next event.
    forecast: bool = True
    #: standard: z-scored with training statistics; robust: centred on the training median
    #: and divided by IQR / 1.349, which spikes in the training data cannot inflate (missing
    #: values, with `missing = "mean"`, then get the median); none: used as it is (one-hot
    #: flags, values already scaled to about [-1, 1]).
    scale: Literal["standard", "robust", "none"] = "standard"


class CategoricalFeatureConfig(_Section):
    name: str = Field(min_length=1)
    kind: Literal["categorical"]
    #: reject: a record without the value is an error; unknown: treat it as an unseen value.
    missing: Literal["reject", "unknown"] = "reject"
    embedding_dim: int = Field(default=4, ge=1, le=512)
    #: The most frequent training values kept; rarer ones share the "unknown" code.
    max_vocabulary: int = Field(default=1000, ge=1, le=1_000_000)


FeatureConfig = Annotated[
    NumericFeatureConfig | CategoricalFeatureConfig, Field(discriminator="kind")
]


class DataConfig(_Section):
    key: str = Field(min_length=1)
    time: str = Field(min_length=1)
    time_unit: Literal["s", "ms"] = "s"
    label: str | None = None
    #: auto: from each file's suffix (.csv, .parquet, .jsonl, ...).
    format: Literal["auto", "csv", "parquet", "jsonl"] = "auto"
    features: list[FeatureConfig] = Field(min_length=1)
    #: Add the derived log time since the key's previous event as an input.
    time_delta: bool = True

    @model_validator(mode="after")
    def _distinct_names(self) -> DataConfig:
        names = [feature.name for feature in self.features]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"feature names must be unique, repeated: {duplicates}")
        reserved = {self.key, self.time, self.label} & set(names)
        if reserved:
            raise ValueError(f"{sorted(reserved)} is the key, time or label column, not a feature")
        if self.time_delta and "time_delta" in names:
            raise ValueError("'time_delta' is the derived feature's name; rename the column")
        return self


class SplitConfig(_Section):
    """Per key, in time order: fractions of each key's events, or global cut-off times."""

    train: float = Field(default=0.7, gt=0, le=1)
    validation: float = Field(default=0.15, ge=0, lt=1)
    test: float = Field(default=0.15, ge=0, lt=1)
    #: Events at or after this time (ISO 8601 or epoch seconds) are validation...
    validation_from: datetime | float | None = None
    #: ...and at or after this one, test.
    test_from: datetime | float | None = None

    @model_validator(mode="after")
    def _coherent(self) -> SplitConfig:
        if (self.validation_from is None) != (self.test_from is None):
            raise ValueError("give both validation_from and test_from, or neither")
        if (
            self.validation_from is None
            and abs(self.train + self.validation + self.test - 1) > 1e-9
        ):
            raise ValueError("train + validation + test must equal 1")
        if self.validation_from is not None and self.cutoffs[0] > self.cutoffs[1]:
            raise ValueError("validation_from must not be after test_from")
        return self

    @property
    def cutoffs(self) -> tuple[float, float] | None:
        """(validation_from, test_from) in epoch seconds, when the split is by time."""
        if self.validation_from is None or self.test_from is None:
            return None
        return _epoch(self.validation_from), _epoch(self.test_from)


class ModelConfig(_Section):
    task: Literal["classify", "forecast"] = "classify"
    export_mode: Literal["window", "stateful"] = "window"
    window: int = Field(default=32, ge=1, le=4096)
    min_history: int = Field(default=4, ge=1, le=4096)
    hidden: int = Field(default=64, ge=1, le=4096)
    layers: int = Field(default=1, ge=1, le=3)
    bidirectional: bool = False
    dropout: float = Field(default=0.1, ge=0, lt=1)
    layer_norm: bool = False
    #: z-score numbers with each key's own statistics (keys unseen in training use global ones).
    per_key_normalisation: bool = False

    @model_validator(mode="after")
    def _coherent(self) -> ModelConfig:
        if self.min_history > self.window:
            raise ValueError("min_history must not exceed window")
        if self.task == "forecast" and self.min_history < 2:
            raise ValueError("forecast models need min_history >= 2")
        if self.export_mode == "stateful" and self.bidirectional:
            raise ValueError("a bidirectional network cannot be exported in stateful mode")
        return self


class TrainingConfig(_Section):
    epochs: int = Field(default=20, ge=1, le=10_000)
    batch_size: int = Field(default=256, ge=1, le=1_000_000)
    learning_rate: float = Field(default=1e-3, gt=0, le=1)
    weight_decay: float = Field(default=1e-4, ge=0)
    #: Epochs without a better validation loss before training stops.
    patience: int = Field(default=4, ge=1)
    grad_clip: float = Field(default=1.0, gt=0)
    seed: int = 0
    loss: Literal["bce", "focal"] = "bce"
    focal_gamma: float = Field(default=2.0, ge=0)
    #: Forecast models' loss, in training and in the validation loss that early stopping
    #: watches: mse, or huber, equal to the MSE for errors within `huber_delta` (in scaled
    #: units) and linear beyond, so that a spike's pull on the weights is bounded.
    forecast_loss: Literal["mse", "huber"] = "mse"
    huber_delta: float = Field(default=1.0, gt=0)
    #: Weight of positive windows in the loss; "auto" = negatives / positives.
    pos_weight: Literal["auto"] | float = "auto"
    #: At most this many training windows (a seeded sample), to bound epoch time.
    max_windows: int | None = Field(default=None, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    #: Mixed precision; used only on CUDA.
    amp: bool = True
    #: Forecast models: learn from the last event of each window only, the one that is
    #: scored ("last"), or from every event of it, each forecast from the events before it
    #: ("every": as many targets as the window has events; unidirectional models only).
    #: Validation and early stopping judge the last event either way.
    forecast_targets: Literal["last", "every"] = "last"


class AlertingConfig(_Section):
    """Advanced: how scores become alerts beyond the calibrated threshold. A forecast model
    takes these from the recipe (`trainer/recipe.py`), chosen by cross-validation across data
    sets; a `[threshold.advanced]` table, even an empty one, replaces them all, and the
    benchmarks' figures (docs/quality.md) no longer describe the model."""

    #: EWMA alpha the detector applies to successive scores of a key (1.0: none).
    smoothing: float = Field(default=1.0, gt=0, le=1)
    #: Per-key thresholds the detector re-chooses from each key's live scores
    #: (`[threshold.advanced.adaptive]`; absent: one fixed threshold).
    adaptive: AdaptiveThreshold | None = None
    #: Consecutive scored events at or above the threshold before an alert episode opens
    #: (`Scoring.confirm`; 1: at once).
    confirm: int = Field(default=1, ge=1, le=100_000)
    #: Forecast models: an error smaller than this in every forecast feature, in the
    #: features' own units, never alerts however unusual it is for its key (telemanom's 0.05
    #: on values scaled to [-1, 1]); stored as the score of such an error
    #: (`Scoring.min_score`). 0: no such bound. It holds only where every key's units are
    #: alike; `min_scaled_error` is the scale-free form.
    min_error: float = Field(default=0.0, ge=0, allow_inf_nan=False)
    #: Forecast models: an error smaller than this share of the feature's training spread
    #: (its std, or IQR / 1.349 with robust scaling; per key with per-key normalisation) in
    #: every forecast feature never alerts: whatever its key's recent errors, a deviation that
    #: small is not a fault. 0: no such bound.
    min_scaled_error: float = Field(default=0.0, ge=0, allow_inf_nan=False)

    @model_validator(mode="after")
    def _one_bound(self) -> AlertingConfig:
        if self.min_error and self.min_scaled_error:
            raise ValueError("set min_error or min_scaled_error, not both")
        return self


class ThresholdConfig(_Section):
    """How the threshold is calibrated on the validation split; `advanced` holds the rest of
    the alerting."""

    #: dynamic: the nonparametric threshold of Hundman et al. (2018) on normal scores.
    method: Literal["max_f1", "precision", "fpr", "quantile", "dynamic"] = "max_f1"
    #: precision: minimum precision; fpr: maximum false-positive rate; quantile: of normal scores;
    #: dynamic: the pruning margin over the largest normal score below the chosen threshold.
    target: float | None = Field(default=None, gt=0, lt=1)
    #: Also calibrate each key's own threshold on its validation scores alone (the model's
    #: stays for keys seen later): one model shared by unlike keys then holds each to its own
    #: normal error level. Needs `model.per_key_normalisation` and an unsupervised method.
    per_key: bool = False
    #: `[threshold.advanced]`: the forecast recipe's alerting unless the configuration has it.
    advanced: AlertingConfig = AlertingConfig()

    @model_validator(mode="before")
    @classmethod
    def _advanced_settings_in_their_table(cls, document: Any) -> Any:
        if isinstance(document, dict):
            misplaced = [name for name in AlertingConfig.model_fields if name in document]
            if misplaced:
                raise ValueError(
                    f"{', '.join(misplaced)} belong in [threshold.advanced], which replaces the "
                    "forecast recipe's alerting as a whole"
                )
        return document

    @property
    def resolved_target(self) -> float | None:
        return self.target if self.target is not None else DEFAULT_TARGETS[self.method]


class TrainConfig(_Section):
    data: DataConfig
    split: SplitConfig = SplitConfig()
    model: ModelConfig = ModelConfig()
    training: TrainingConfig = TrainingConfig()
    threshold: ThresholdConfig = ThresholdConfig()

    @model_validator(mode="before")
    @classmethod
    def _recipe(cls, document: Any) -> Any:
        return with_forecast_recipe(document) if isinstance(document, dict) else document

    @model_validator(mode="after")
    def _coherent(self) -> TrainConfig:
        labelled = self.data.label is not None
        if self.model.task == "classify" and not labelled:
            raise ValueError("a classify model needs data.label")
        if self.model.task == "forecast" and not any(
            isinstance(f, NumericFeatureConfig) and f.forecast for f in self.data.features
        ):
            raise ValueError("a forecast model needs at least one numeric feature with forecast")
        if not labelled and self.threshold.method not in UNSUPERVISED_METHODS:
            raise ValueError(
                f"threshold.method {self.threshold.method!r} needs labels; "
                "use 'quantile' or 'dynamic'"
            )
        if self.training.forecast_targets == "every" and (
            self.model.task != "forecast" or self.model.bidirectional
        ):
            raise ValueError(
                'training.forecast_targets = "every" needs a unidirectional forecast model'
            )
        alerting = self.threshold.advanced
        if alerting.min_error:
            self._check_min_error()
        if alerting.min_scaled_error and self.model.task != "forecast":
            raise ValueError("threshold.advanced.min_scaled_error needs a forecast model")
        if self.threshold.per_key:
            if not self.model.per_key_normalisation:
                raise ValueError("threshold.per_key needs model.per_key_normalisation = true")
            if self.threshold.method not in UNSUPERVISED_METHODS:
                raise ValueError(
                    "threshold.per_key needs method 'quantile' or 'dynamic' "
                    "(most keys have too few anomalies to calibrate on labels)"
                )
        return self

    @property
    def alerts_as_the_recipe(self) -> bool:
        """Whether a forecast model's alerting is the recipe's, which docs/quality.md measures."""
        recipe = AlertingConfig.model_validate(FORECAST_RECIPE["threshold"]["advanced"])
        return self.model.task == "forecast" and self.threshold.advanced == recipe

    def _check_min_error(self) -> None:
        if self.model.task != "forecast":
            raise ValueError(
                "threshold.advanced.min_error needs a forecast model (errors in feature units)"
            )
        if self.model.per_key_normalisation and any(
            isinstance(f, NumericFeatureConfig) and f.forecast and f.scale != "none"
            for f in self.data.features
        ):
            raise ValueError(
                "threshold.advanced.min_error needs forecast features scaled alike for every key: "
                'scale = "none" or model.per_key_normalisation = false'
            )

    def draft_manifest(self, vocabularies: dict[str, list[str]]) -> Manifest:
        """The manifest before fitting: statistics at identity, threshold not yet calibrated."""
        features: list[Feature] = []
        for spec in self.data.features:
            if isinstance(spec, NumericFeatureConfig):
                features.append(
                    NumericFeature(
                        name=spec.name,
                        missing=spec.missing,
                        forecast=spec.forecast,
                        scale=spec.scale,
                    )
                )
            else:
                features.append(
                    CategoricalFeature(
                        name=spec.name,
                        vocabulary=vocabularies.get(spec.name, []),
                        embedding_dim=spec.embedding_dim,
                        missing=spec.missing,
                    )
                )
        if self.data.time_delta:
            features.append(TimeDeltaFeature())
        model = self.model
        return Manifest(
            task=model.task,
            export_mode=model.export_mode,
            columns=Columns(
                key=self.data.key,
                time=self.data.time,
                time_unit=self.data.time_unit,
                label=self.data.label,
            ),
            features=features,
            window=model.window,
            min_history=model.min_history,
            network=Network(
                hidden=model.hidden,
                layers=model.layers,
                bidirectional=model.bidirectional,
                layer_norm=model.layer_norm,
                dropout=model.dropout,
            ),
            scoring=Scoring(
                semantics="probability" if model.task == "classify" else "forecast_error",
                threshold=0.5 if model.task == "classify" else 1.0,
                calibration="uncalibrated",
                smoothing=self.threshold.advanced.smoothing,
                adaptive=self.threshold.advanced.adaptive,
            ),
            training=TrainingSummary(rows=0, keys=0),
            trainer_version=__version__,
        )


def load_train_config(path: Path | str) -> TrainConfig:
    """Read and validate a TOML training configuration, or raise `ConfigError`."""
    path = Path(path)
    try:
        with path.open("rb") as handle:
            document = tomllib.load(handle)
    except OSError as error:
        raise ConfigError(f"{path}: cannot read ({error.strerror})") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path}: not valid TOML ({error})") from None
    try:
        return TrainConfig.model_validate(document)
    except ValidationError as error:
        problems = "\n".join(
            f"  {'.'.join(str(part) for part in item['loc']) or '(top level)'}: {item['msg']}"
            for item in error.errors()
        )
        raise ConfigError(f"{path}: invalid training configuration\n{problems}") from None


def _epoch(value: datetime | float) -> float:
    if isinstance(value, datetime):
        # A cut-off without a zone is UTC, as event times without one are
        # (detector.contract.features).
        return (value if value.tzinfo else value.replace(tzinfo=UTC)).timestamp()
    return float(value)
