"""The one recipe for forecast models: every setting a forecast configuration leaves out.

A configuration of a forecast model (sensor faults) should say what its data looks like and
nothing more; the recipe supplies the rest, the same for every fleet. Its thresholding
settings were chosen by cross-validation across data sets, never on the labels they are
reported on (`bench/select_recipe.py`, `docs/quality.md`), and so was how long a model
trains and how wide its network is. The network is smaller than telemanom's (Hundman et al.,
2018): one layer, not two, so that a key's model trains in seconds on a CPU, with robust
inputs and loss.
Classification models (fraud) keep the plain defaults of each section.
"""

from __future__ import annotations

from typing import Any

#: Settings of each section of a forecast configuration, where it does not set them.
FORECAST_RECIPE: dict[str, dict[str, Any]] = {
    "model": {
        "window": 64,
        "min_history": 16,
        # Cross-validated against 32 units: 64 detect more on held-out channels and series
        # (docs/quality.md).
        "hidden": 64,
        "dropout": 0.1,
        # Each key in its own units: one model for a fleet of unlike keys judges each on its
        # own scale (pooled statistics squash a small key's readings to a constant).
        "per_key_normalisation": True,
    },
    "training": {
        # Cross-validated against 4 and telemanom's 35 with the same early stopping, and
        # against 12 with 64 units: all detect less (docs/quality.md).
        "epochs": 8,
        "batch_size": 128,
        "learning_rate": 0.003,
        "patience": 3,
        # Each window's last event is the target: cross-validated against every event of
        # the window (docs/quality.md).
        "forecast_targets": "last",
        # Spikes in training data pull the weights linearly, not quadratically.
        "forecast_loss": "huber",
    },
    "threshold": {
        "method": "dynamic",
        "advanced": {
            # EWMA of errors over about 10 events.
            "smoothing": 0.1,
            "confirm": 5,
            "min_scaled_error": 0.2,
            "adaptive": {
                # telemanom's window of errors and re-choice schedule.
                "history": 2100,
                "refresh": 70,
                "prune": 0.13,
                # A key's own history decides from its 700th score on; before that, it alerts
                # above three times what training calibrated for it.
                "warm_up": 700,
                "warm_up_floor": 3.0,
                "floor": "none",
            },
        },
    },
}
#: Tables taken whole where a configuration has them (even empty), by dotted path: the
#: alerting settings were chosen together and work together.
WHOLE_TABLES = ("threshold.advanced",)
#: How a forecast configuration's numeric features are scaled unless they say: by median and
#: IQR, which the spikes and faults of training data cannot inflate.
FORECAST_SCALE = "robust"


def with_forecast_recipe(document: dict[str, Any]) -> dict[str, Any]:
    """`document` (a training configuration as a mapping) with the recipe beneath it, when
    it describes a forecast model; unchanged otherwise. Its own settings always win, setting
    by setting, except in `WHOLE_TABLES`: a `[threshold.advanced]` table it has replaces the
    recipe's alerting."""
    if _section(document, "model").get("task") != "forecast":
        return document
    completed = dict(document)
    for name, defaults in FORECAST_RECIPE.items():
        completed[name] = _beneath(_section(document, name), defaults, name)
    data = _section(document, "data")
    if "features" in data:
        features = [
            _beneath(_plain(feature), {"scale": FORECAST_SCALE}, "data.features")
            if _plain(feature).get("kind", "numeric") == "numeric"
            else feature
            for feature in data["features"]
        ]
        completed["data"] = {**data, "features": features}
    return completed


def _section(document: dict[str, Any], name: str) -> dict[str, Any]:
    return _plain(document.get(name, {}))


def _plain(value: Any) -> Any:
    """A section given as a model instance, as the mapping of the fields it was given."""
    if hasattr(value, "model_dump"):
        return value.model_dump(exclude_unset=True)
    return value


def _beneath(given: dict[str, Any], defaults: dict[str, Any], path: str) -> dict[str, Any]:
    merged = dict(given)
    for name, value in defaults.items():
        inner = f"{path}.{name}"
        if name not in merged:
            merged[name] = value
        elif (
            inner not in WHOLE_TABLES
            and isinstance(value, dict)
            and isinstance(_plain(merged[name]), dict)
        ):
            merged[name] = _beneath(_plain(merged[name]), value, inner)
    return merged
