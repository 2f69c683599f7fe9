"""Acceptance: trained on the synthetic data sets, models catch what was injected.

Each case generates a small data set with `trainer.synth`, trains with the config the
generator writes (fewer keys and days than the defaults, so it trains in seconds), and
judges the model with `trainer evaluate` — the detector's streaming engine replaying the
later, held-out test file, never torch.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from trainer.cli import main
from trainer.config import load_train_config
from trainer.pipeline import train
from trainer.synth import sensors, transactions


def _train_and_evaluate(folder: Path) -> dict:
    config = load_train_config(folder / "train.toml")
    result = train(config, [folder / "train.csv"], folder / "model.onnx", progress=False)
    assert result is not None
    argv = ["evaluate", "--model", str(result.model_path), "--data", str(folder / "test.csv")]
    assert main([*argv, "--out", str(folder / "eval"), "--no-progress"]) == 0
    return json.loads((folder / "eval" / "metrics.json").read_text())


def test_forecast_catches_injected_sensor_faults(tmp_path: Path) -> None:
    """Range-level F1 >= 0.8 on the faults of the test part.

    A fault (a spike, a drift, a stuck reading or a level shift) is one labeled range of a
    device's events; it counts as caught when at least one of its events scores at or above
    the calibrated threshold, and every run of alerting events that touches no fault is a
    false alarm. This is how an operator experiences the detector: an alert per incident.
    Point-wise F1 would mostly measure how much of a slow drift precedes the moment it
    becomes visible, which no detector can see.
    """
    sensors(keys=12, days=6, seed=1).write(tmp_path)
    metrics = _train_and_evaluate(tmp_path)
    ranges = metrics["ranges"]
    assert ranges["labeled"] >= 15
    assert ranges["f1"] >= 0.8, ranges


@pytest.mark.parametrize("seed", [1])
def test_classifier_ranks_fraud_above_honest_payments(tmp_path: Path, seed: int) -> None:
    """AUPRC >= 0.8 over every fraudulent payment of the test part, the first of each
    episode included (it has only its own amount and hour to give it away)."""
    transactions(keys=150, days=40, seed=seed).write(tmp_path)
    metrics = _train_and_evaluate(tmp_path)
    assert metrics["counts"]["scored_positives"] >= 100
    assert metrics["auprc"] >= 0.8, metrics["point"]
