"""End to end: data files and a configuration in, one verified model file and its metrics out."""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
import torch

from detector import __version__
from detector.contract.manifest import KeyStatistics, Manifest, Scoring, TrainingSummary
from detector.contract.model_file import write_model
from trainer.calibrate import calibrate, calibrate_per_key, min_error_score, smooth_per_key
from trainer.config import TrainConfig
from trainer.data import SPLIT_NAMES, TEST, TRAIN, VALIDATION, Events, Windows, load_events
from trainer.export import build_onnx, check_parity, onnx_scores, quantize_checked
from trainer.fit import (
    History,
    distributed_context,
    fit,
    fit_residual_variance,
    make_loss,
    predict,
    resolve_device,
    seed_everything,
)
from trainer.key_health import KeyHealth, key_health
from trainer.metrics import at_threshold, average_precision, roc_auc
from trainer.network import NetOutput, SequenceNet

#: Validation windows the exported graph is checked against torch on.
PARITY_WINDOWS = 512


@dataclass(frozen=True)
class SplitScores:
    """Scores of one split's windows, as the detector would alert on them (smoothed)."""

    scores: np.ndarray
    labels: np.ndarray | None
    keys: np.ndarray
    times: np.ndarray
    #: forecast only: squared scaled error per forecast feature [n, n_forecast].
    contrib: np.ndarray | None = None


@dataclass(frozen=True)
class TrainResult:
    """What `train` produced: enough for `trainer.report` to plot and describe the model."""

    manifest: Manifest
    model_path: Path
    metrics_path: Path
    history: History
    validation: SplitScores
    test: SplitScores
    metrics: dict
    keys: KeyHealth


def train(
    config: TrainConfig,
    data_paths: list[Path],
    out: Path,
    *,
    epochs: int | None = None,
    int8: bool = False,
    progress: bool = True,
) -> TrainResult | None:
    """Load, split, fit statistics, train, calibrate, export with a parity check, write metrics.

    Under torchrun every rank trains its shard; only rank 0 calibrates and writes, and the
    other ranks return None.
    """
    out = Path(out)
    if epochs is not None:
        config = config.model_copy(
            update={"training": config.training.model_copy(update={"epochs": epochs})}
        )
    timings: dict[str, float] = {}
    clock = time.perf_counter()
    events = load_events(config, data_paths)
    timings["load_seconds"] = time.perf_counter() - clock

    device = resolve_device(config.training.device)
    seed_everything(config.training.seed)
    net = SequenceNet.from_manifest(events.manifest)
    train_windows = events.windows(TRAIN).sample(config.training.max_windows, config.training.seed)
    validation_windows = events.windows(VALIDATION)
    clock = time.perf_counter()
    with distributed_context(device) as distributed:
        history = fit(
            net,
            train_windows,
            validation_windows,
            config.training,
            device=device,
            distributed=distributed,
            progress=progress,
        )
    timings["train_seconds"] = time.perf_counter() - clock
    if not distributed.is_main:
        return None
    if net.task == "forecast":
        fit_residual_variance(net, train_windows, device)

    clock = time.perf_counter()
    validation_output = predict(net, validation_windows, device)
    validation = _output_scores(validation_windows, validation_output, config)
    test_windows = events.windows(TEST)
    test = _output_scores(test_windows, predict(net, test_windows, device), config)
    keys = _key_health(events, net, config, train_windows, validation_windows, validation_output)
    threshold, description = calibrate(
        validation.scores,
        validation.labels,
        config.threshold.method,
        config.threshold.resolved_target,
        validation.keys,
    )
    timings["calibrate_seconds"] = time.perf_counter() - clock

    clock = time.perf_counter()
    manifest = events.manifest
    model = build_onnx(net, manifest)
    parity_set = validation_windows if len(validation_windows) else train_windows
    parity_arrays = parity_set.sample(PARITY_WINDOWS, config.training.seed).arrays()
    parity = check_parity(model, net, manifest, *parity_arrays, path=out)
    quantisation = None
    if int8:
        quantized, manifest, int8_parity = quantize_checked(
            model, net, manifest, *parity_arrays, path=out
        )
        validation, test, threshold, description, quantisation = _rescore(
            model,
            quantized,
            manifest,
            config,
            (validation_windows, test_windows),
            validation,
            threshold,
        )
        quantisation["parity_max_difference"] = int8_parity
        model = quantized
    key_thresholds = (
        calibrate_per_key(
            validation.scores,
            validation.labels,
            config.threshold.method,
            config.threshold.resolved_target,
            validation.keys,
        )
        if config.threshold.per_key
        else {}
    )
    min_score = _min_score(manifest, net, config)
    alerting = max(threshold, min_score)
    metrics = {
        "validation": _split_metrics(validation, alerting, history.best_validation_loss),
        "test": _split_metrics(test, alerting, None),
    }
    manifest = manifest.model_copy(
        update={
            "scoring": Scoring(
                semantics=manifest.scoring.semantics,
                threshold=threshold,
                calibration=description,
                smoothing=config.threshold.advanced.smoothing,
                adaptive=config.threshold.advanced.adaptive,
                confirm=config.threshold.advanced.confirm,
                min_score=min_score,
            ),
            "per_key_statistics": _with_thresholds(manifest.per_key_statistics, key_thresholds),
            "training": _summary(events, metrics),
            "trainer_version": __version__,
        }
    )
    manifest = write_model(model, manifest, out)
    timings["export_seconds"] = time.perf_counter() - clock

    report = {
        "model": out.name,
        "model_version": manifest.model_version,
        "task": manifest.task,
        "export_mode": manifest.export_mode,
        "threshold": threshold,
        "calibration": description,
        "min_score": min_score,
        "per_key_thresholds": len(key_thresholds),
        "parity_max_difference": parity,
        "int8": quantisation,
        "windows": {
            name: len(events.windows(split))
            for name, split in zip(SPLIT_NAMES, (TRAIN, VALIDATION, TEST), strict=True)
        },
        "trained_windows": len(train_windows),
        "processes": distributed.world_size,
        "metrics": metrics,
        "keys": keys.to_dict(),
        "history": [asdict(record) for record in history.epochs],
        "best_epoch": history.best_epoch,
        "stopped_early": history.stopped_early,
        "timings": timings,
    }
    metrics_path = out.with_name("metrics.json")
    metrics_path.write_text(
        json.dumps(report, indent=2, allow_nan=False, default=_json_default) + "\n"
    )
    return TrainResult(manifest, out, metrics_path, history, validation, test, report, keys)


def _with_thresholds(
    statistics: dict[str, KeyStatistics] | None, thresholds: dict[str, float]
) -> dict[str, KeyStatistics] | None:
    """The per-key statistics with each key's own calibrated threshold, where it has one."""
    if statistics is None or not thresholds:
        return statistics
    return {
        key: stats.model_copy(update={"threshold": thresholds.get(key)})
        for key, stats in statistics.items()
    }


def _key_health(
    events: Events,
    net: SequenceNet,
    config: TrainConfig,
    train_windows: Windows,
    validation_windows: Windows,
    output: NetOutput,
) -> KeyHealth:
    """The keys to look at, from the training loss of each validation window's `output`."""
    loss = make_loss(net.task, config.training, train_windows.labels)
    labels = validation_windows.labels
    target = None if labels is None else torch.from_numpy(labels)
    losses = loss.per_window(output, target).numpy() if len(validation_windows) else np.zeros(0)
    return key_health(events, validation_windows.keys, losses)


def _output_scores(windows: Windows, out: NetOutput, config: TrainConfig) -> SplitScores:
    contrib = None if out.contrib is None else out.contrib.numpy()
    return _scored(windows, out.score.numpy(), contrib, config)


def _scored(
    windows: Windows, scores: np.ndarray, contrib: np.ndarray | None, config: TrainConfig
) -> SplitScores:
    keys = windows.keys
    smoothed = smooth_per_key(scores, keys, config.threshold.advanced.smoothing)
    return SplitScores(smoothed, windows.labels, keys, windows.times, contrib)


def _rescore(
    model: onnx.ModelProto,
    quantized: onnx.ModelProto,
    manifest: Manifest,
    config: TrainConfig,
    splits: tuple[Windows, Windows],
    validation: SplitScores,
    threshold: float,
) -> tuple[SplitScores, SplitScores, float, str, dict]:
    """The int8 graph's validation and test scores, a threshold recalibrated on them, and
    what changed from the float `model`."""
    scored = [
        _scored(windows, *onnx_scores(quantized, manifest, *windows.arrays()), config)
        for windows in splits
    ]
    new_threshold, description = calibrate(
        scored[0].scores,
        scored[0].labels,
        config.threshold.method,
        config.threshold.resolved_target,
        scored[0].keys,
    )
    change = {
        "max_abs_validation_score_change": float(
            np.max(np.abs(scored[0].scores - validation.scores), initial=0.0)
        ),
        "float_threshold": threshold,
        "int8_threshold": new_threshold,
        "float_bytes": model.ByteSize(),
        "int8_bytes": quantized.ByteSize(),
    }
    if validation.labels is not None and validation.labels.any():
        change["float_validation_auprc"] = average_precision(validation.labels, validation.scores)
        change["int8_validation_auprc"] = average_precision(scored[0].labels, scored[0].scores)
    return scored[0], scored[1], new_threshold, description, change


def _min_score(manifest: Manifest, net: SequenceNet, config: TrainConfig) -> float:
    """The score below which nothing alerts (`Scoring.min_score`), from either bound."""
    variance = net.residual_variance.cpu().numpy()
    alerting = config.threshold.advanced
    if alerting.min_error:
        return min_error_score(manifest, variance, alerting.min_error)
    if alerting.min_scaled_error:
        return min_error_score(manifest, variance, alerting.min_scaled_error, scaled=True)
    return 0.0


def _split_metrics(split: SplitScores, threshold: float, loss: float | None) -> dict[str, float]:
    metrics: dict[str, float] = {"windows": float(len(split.scores))}
    if loss is not None:
        metrics["loss"] = loss
    if split.scores.size:
        metrics["alert_rate"] = float(np.mean(split.scores >= threshold))
    if split.labels is not None and split.scores.size:
        metrics["auprc"] = average_precision(split.labels, split.scores)
        metrics["auroc"] = roc_auc(split.labels, split.scores)
        metrics |= at_threshold(split.labels, split.scores, threshold).to_dict()
    return {name: float(value) for name, value in metrics.items() if math.isfinite(value)}


def _summary(events: Events, metrics: dict) -> TrainingSummary:
    training = events.split == TRAIN
    times = events.times[training]
    labels = events.labels
    return TrainingSummary(
        rows=int(training.sum()),
        keys=len(np.unique(events.keys[training])),
        positives=None if labels is None else int(labels[training].sum()),
        time_range=(float(times.min()), float(times.max())),
        metrics={
            f"{split}_{name}": value
            for split, values in metrics.items()
            for name, value in values.items()
        },
    )


def _json_default(value: object) -> object:
    """JSON fallback for numpy scalars."""
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")
