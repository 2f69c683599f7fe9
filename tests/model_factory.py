"""Small real models for the engine tests: seeded `SequenceNet`s exported by `trainer.export`.

The networks are random-initialised, not trained: the engine tests check that the engine
feeds a real graph exactly as the contract says, which needs real, deterministic networks
run through onnxruntime, not good ones.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from detector.contract.manifest import (
    CategoricalFeature,
    Columns,
    ExportMode,
    Manifest,
    Network,
    NumericFeature,
    Scoring,
    Task,
    TimeDeltaFeature,
    TrainingSummary,
)
from detector.engine.scorer import Scorer
from trainer.export import export_model
from trainer.network import SequenceNet

KEY, TIME = "account", "ts"
MERCHANTS = ["grocer", "fuel", "casino"]


def make_manifest(
    task: Task = "classify",
    export_mode: ExportMode = "window",
    *,
    window: int = 6,
    min_history: int | None = None,
    hidden: int = 8,
    layers: int = 1,
    bidirectional: bool = False,
    threshold: float = 0.5,
    smoothing: float = 1.0,
    **changes: Any,
) -> Manifest:
    """A manifest over amount (numeric), items (numeric), merchant (categorical), time delta."""
    features = [
        NumericFeature(name="amount", mean=50.0, std=20.0),
        NumericFeature(name="items", mean=2.0, std=1.5, missing="mean"),
        CategoricalFeature(name="merchant", vocabulary=MERCHANTS, embedding_dim=3),
        TimeDeltaFeature(mean=1.0, std=0.5),
    ]
    fields: dict[str, Any] = {
        "task": task,
        "export_mode": export_mode,
        "columns": Columns(key=KEY, time=TIME),
        "features": features,
        "window": window,
        "min_history": min_history or (2 if task == "forecast" else 1),
        "network": Network(hidden=hidden, layers=layers, bidirectional=bidirectional),
        "scoring": Scoring(
            semantics="probability" if task == "classify" else "forecast_error",
            threshold=threshold,
            calibration="fixed",
            smoothing=smoothing,
        ),
        "training": TrainingSummary(rows=0, keys=0),
        "trainer_version": "test",
    }
    return Manifest(**(fields | changes))


def export_random(path: Path, manifest: Manifest, seed: int = 0) -> Path:
    """Export a seeded random network for `manifest` to `path`; returns the path."""
    torch.manual_seed(seed)
    net = SequenceNet.from_manifest(manifest)
    if manifest.task == "forecast":
        net.set_residual_variance(torch.rand(len(manifest.forecast_features)) + 0.5)
    export_model(net, manifest, path)
    return path


def load_random(path: Path, manifest: Manifest, seed: int = 0) -> Scorer:
    """A `Scorer` for a seeded random network (exported to `path`)."""
    return Scorer.load(export_random(path, manifest, seed), providers=["CPUExecutionProvider"])


def event(key: str, time: float, amount: float, items: int | None = 1, merchant: str = "fuel"):
    """One record as the engine receives it from JSON."""
    record: dict[str, Any] = {KEY: key, TIME: time, "amount": amount, "merchant": merchant}
    if items is not None:
        record["items"] = items
    return record
