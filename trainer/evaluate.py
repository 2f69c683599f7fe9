"""Judge a model file on labeled data by scoring it the way the detector would.

The events go through `detector.files.replay.replay_records` — the detector's streaming engine,
its feature codec, warm-up, smoothing and onnxruntime session — so the numbers here are the
numbers a deployment would see, not those of the training code.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from detector.contract.manifest import Manifest
from detector.engine.core import EngineOptions, Status
from detector.engine.scorer import Scorer
from detector.files.readers import FileFormat, read_records
from detector.files.replay import Progress, ReplayResult, replay_records
from trainer.metrics import (
    average_precision,
    key_time_order,
    point_adjusted_counts,
    point_counts,
    range_counts,
    roc_auc,
)


@dataclass(frozen=True)
class Evaluation:
    """Per event in input order (labels NaN where unknown), and the metrics drawn from them."""

    manifest: Manifest
    threshold: float
    replay: ReplayResult
    labels: np.ndarray
    metrics: dict[str, Any]

    @property
    def scored(self) -> np.ndarray:
        """Events with both a score and a label: where point-wise metrics apply."""
        return (self.replay.statuses == Status.SCORED) & ~np.isnan(self.labels)


def evaluate(
    model_path: Path,
    data_path: Path,
    *,
    fmt: FileFormat | None = None,
    label: str | None = None,
    options: EngineOptions | None = None,
    progress: Progress | None = None,
    providers: Sequence[str] = ("auto",),
    intra_op_threads: int = 0,
) -> Evaluation:
    """Replay `data_path` through the engine with `model_path` and compare with its labels.

    `label` names the label column when it is not the manifest's; `options` are the
    engine's (its threshold, when set, overrides the calibrated one); `providers` are the
    onnxruntime execution providers, chosen as the daemon chooses them by default, and
    `intra_op_threads` its threads, as the daemon's `model.intra_op_threads` (0: its choice).
    """
    scorer = Scorer.load(model_path, providers, intra_op_threads)
    manifest = scorer.manifest
    column = label or manifest.columns.label
    if column is None:
        raise ValueError("the model names no label column; pass the data's label column")
    records = read_records(
        data_path, fmt, [*manifest.numeric_columns, column], manifest.columns.required
    )
    labels = read_labels(records, column)
    if np.isnan(labels).all():
        raise ValueError(f"{Path(data_path).name}: no record has a usable {column!r} label")
    options = options or EngineOptions()
    replay = replay_records(records, scorer, options, progress, source_name=Path(data_path).name)
    threshold = manifest.scoring.threshold if options.threshold is None else options.threshold
    metrics = {
        "model": {
            "file": Path(model_path).name,
            "model_version": manifest.model_version,
            "task": manifest.task,
            "export_mode": manifest.export_mode,
            "threshold": threshold,
            "calibration": manifest.scoring.calibration,
        },
        "data": {"file": Path(data_path).name, "label": column},
        **detection_metrics(replay, labels),
    }
    return Evaluation(manifest, threshold, replay, labels, metrics)


def read_labels(records: Sequence[Mapping[str, Any] | bytes], column: str) -> np.ndarray:
    """Each record's label as 0.0/1.0, NaN where it is missing or not a 0/1 value.

    Any positive number or true counts as 1 (e.g. a fault code); a JSON line that does not
    parse has no label (the engine makes it a dead letter anyway).
    """
    labels = np.full(len(records), np.nan)
    for row, record in enumerate(records):
        if not isinstance(record, Mapping):
            try:
                record = orjson.loads(record)
            except orjson.JSONDecodeError:
                continue
            if not isinstance(record, dict):
                continue
        value = record.get(column)
        if isinstance(value, bool | int | float) and math.isfinite(value):
            labels[row] = float(value > 0)
    return labels


def detection_metrics(replay: ReplayResult, labels: np.ndarray) -> dict[str, Any]:
    """Counts, point-wise, ranking, range-level and point-adjusted metrics of a replay.

    An event is predicted positive when its score reached the threshold the engine compared
    it with (the static one, or its key's adaptive one).
    Point-wise and ranking metrics use the scored events with a label. Range metrics use
    every labeled event the engine accepted, per key in time order; an event that was not
    scored (warming up, skipped) raised no alert, so it counts as predicted negative.
    """
    statuses, scores = replay.statuses, replay.scores
    summary = replay.summary
    known = ~np.isnan(labels)
    scored = (statuses == Status.SCORED) & known
    truth = labels[scored] > 0
    points = scores[scored]
    reached = scores >= replay.thresholds  # False where either is NaN
    counts = {
        "events": summary.events,
        "keys": summary.keys,
        "scored": summary.scored,
        "warming_up": summary.warming_up,
        "skipped_by_stride": summary.skipped_by_stride,
        "dead_letters": summary.dead_letters,
        "labeled": int(known.sum()),
        "positives": int((labels[known] > 0).sum()),
        "scored_positives": int(truth.sum()),
        "alerts": summary.alerts,
        "seconds": summary.seconds,
        "events_per_second": summary.events_per_s,
    }
    accepted = known & (statuses != Status.DEAD_LETTER)
    order, groups = key_time_order(replay.keys[accepted], replay.times[accepted])
    in_order = np.flatnonzero(accepted)[order]
    flagged = (statuses[in_order] == Status.SCORED) & reached[in_order]
    labeled = labels[in_order] > 0
    return {
        "counts": counts,
        "point": point_counts(truth, reached[scored]).to_dict(),
        "auprc": average_precision(truth, points),
        "auroc": roc_auc(truth, points),
        "ranges": range_counts(labeled, flagged, groups).to_dict(),
        "point_adjusted": point_adjusted_counts(labeled, flagged, groups).to_dict(),
    }
