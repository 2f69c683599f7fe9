"""Plots and a model card for people deciding whether to deploy a model.

Figures are drawn on `matplotlib.figure.Figure` objects, which render with the Agg canvas
without touching pyplot's global state, so reports can be written from any thread or
process and never need a display.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from matplotlib.figure import Figure

from detector.contract.manifest import CategoricalFeature, Manifest, NumericFeature
from trainer.key_health import (
    CARD_KEYS,
    DOMINANT_LOSS_SHARE,
    DOMINANT_RATIO,
    ROBUST_Z_LIMIT,
    KeyHealth,
)
from trainer.metrics import (
    at_threshold,
    average_precision,
    key_time_order,
    precision_recall_curve,
    roc_auc,
    roc_curve,
    runs,
)

if TYPE_CHECKING:
    from trainer.evaluate import Evaluation
    from trainer.pipeline import TrainResult

#: Keys drawn in the evaluation timeline: those with the most labeled events.
TIMELINE_KEYS = 3


def write_training_report(result: TrainResult, folder: Path) -> list[Path]:
    """Loss curves, validation plots and MODEL_CARD.md in `folder`; returns what was written."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    manifest = result.manifest
    threshold = manifest.scoring.threshold
    figures = {"loss.png": loss_figure(result)}
    validation = result.validation
    labels = None if validation.labels is None else np.asarray(validation.labels) > 0
    figures |= _score_figures(validation.scores, labels, threshold, manifest)
    paths = _save(figures, folder)
    card = folder / "MODEL_CARD.md"
    card.write_text(model_card(result))
    return [*paths, card]


def write_evaluation_report(evaluation: Evaluation, folder: Path) -> list[Path]:
    """Score plots of an evaluation, and a timeline of the keys with the most labeled events."""
    scored = evaluation.scored
    figures = _score_figures(
        evaluation.replay.scores[scored],
        evaluation.labels[scored] > 0,
        evaluation.threshold,
        evaluation.manifest,
    )
    figures["timeline.png"] = timeline_figure(evaluation)
    return _save(figures, Path(folder))


def _score_figures(
    scores: np.ndarray, labels: np.ndarray | None, threshold: float, manifest: Manifest
) -> dict[str, Figure]:
    """The score histogram, and precision-recall and ROC curves when both classes occur."""
    figures = {"scores.png": score_histogram(scores, labels, threshold, manifest)}
    if labels is not None and 0 < labels.sum() < labels.size:
        figures["precision_recall.png"] = precision_recall_figure(labels, scores, threshold)
        figures["roc.png"] = roc_figure(labels, scores, threshold)
    return figures


def _save(figures: dict[str, Figure], folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, figure in figures.items():
        path = folder / name
        figure.savefig(path, dpi=110)
        paths.append(path)
    return paths


def _axes(title: str, xlabel: str, ylabel: str) -> tuple[Figure, object]:
    figure = Figure(figsize=(6.4, 4.2), layout="constrained")
    axes = figure.add_subplot()
    axes.set(title=title, xlabel=xlabel, ylabel=ylabel)
    axes.grid(alpha=0.3)
    return figure, axes


def loss_figure(result: TrainResult) -> Figure:
    epochs = result.history.epochs
    figure, axes = _axes("Loss per epoch", "epoch", "loss")
    numbers = [record.epoch for record in epochs]
    axes.plot(numbers, [record.train_loss for record in epochs], marker="o", label="train")
    axes.plot(
        numbers, [record.validation_loss for record in epochs], marker="o", label="validation"
    )
    if result.history.best_epoch:
        axes.axvline(result.history.best_epoch, color="grey", linestyle=":", label="kept")
    axes.legend()
    return figure


def precision_recall_figure(labels: np.ndarray, scores: np.ndarray, threshold: float) -> Figure:
    precision, recall, _ = precision_recall_curve(labels, scores)
    at = at_threshold(labels, scores, threshold)
    title = f"Precision-recall (AUPRC {average_precision(labels, scores):.3f})"
    figure, axes = _axes(title, "recall", "precision")
    axes.step(np.r_[0.0, recall], np.r_[1.0, precision], where="pre")
    axes.plot(at.recall, at.precision, "o", color="red", label=f"threshold {threshold:.4g}")
    axes.set(xlim=(0, 1.02), ylim=(0, 1.02))
    axes.legend(loc="lower left")
    return figure


def roc_figure(labels: np.ndarray, scores: np.ndarray, threshold: float) -> Figure:
    fpr, tpr, _ = roc_curve(labels, scores)
    figure, axes = _axes(
        f"ROC (AUROC {roc_auc(labels, scores):.3f})", "false positive rate", "true positive rate"
    )
    axes.plot(fpr, tpr)
    axes.plot([0, 1], [0, 1], color="grey", linestyle=":")
    predicted = scores >= threshold
    point = (predicted[~labels].mean(), predicted[labels].mean())
    axes.plot(*point, "o", color="red", label=f"threshold {threshold:.4g}")
    axes.legend(loc="lower right")
    return figure


def score_histogram(
    scores: np.ndarray, labels: np.ndarray | None, threshold: float, manifest: Manifest
) -> Figure:
    """Scores by class; forecast errors on a log axis, where their long tail is readable."""
    forecast = manifest.scoring.semantics == "forecast_error"
    figure, axes = _axes("Scores", "score", "events")
    if not scores.size:
        return figure
    if forecast:
        low = max(float(scores[scores > 0].min(initial=1.0)), 1e-4)
        bins = np.geomspace(low, max(float(scores.max()), threshold, low * 10), 60)
        axes.set_xscale("log")
    else:
        bins = np.linspace(0, 1, 51)
    groups = (
        [("events", scores)]
        if labels is None
        else [
            ("normal", scores[~labels]),
            ("labeled", scores[labels]),
        ]
    )
    for name, values in groups:
        if values.size:
            axes.hist(values, bins=bins, alpha=0.6, label=name, density=labels is not None)
    axes.axvline(threshold, color="red", linestyle="--", label=f"threshold {threshold:.4g}")
    axes.set_yscale("log")
    axes.legend()
    return figure


def timeline_figure(evaluation: Evaluation) -> Figure:
    """Scores over time of the keys with the most labeled events, labeled ranges shaded."""
    replay = evaluation.replay
    labeled = evaluation.labels > 0
    keys = replay.keys
    names, counts = np.unique(keys[labeled].astype(str), return_counts=True)
    chosen = names[np.argsort(-counts, kind="stable")[:TIMELINE_KEYS]]
    figure = Figure(figsize=(8, 2.4 * max(len(chosen), 1)), layout="constrained")
    for row, key in enumerate(chosen):
        axes = figure.add_subplot(len(chosen), 1, row + 1)
        mine = np.flatnonzero(keys == key)
        order, _ = key_time_order(keys[mine], replay.times[mine])
        events = mine[order]
        times = [datetime.fromtimestamp(t, UTC) for t in replay.times[events]]
        axes.plot(times, replay.scores[events], linewidth=0.8)
        for start, stop in runs(labeled[events]):
            axes.axvspan(times[start], times[stop - 1], color="orange", alpha=0.3, linewidth=0)
        axes.plot(times, replay.thresholds[events], color="red", linestyle="--", linewidth=0.8)
        if evaluation.manifest.scoring.semantics == "forecast_error":
            axes.set_yscale("log")
        axes.set_title(f"{key}: score (line), labeled (shaded), threshold (dashed)", fontsize=9)
    return figure


def _adaptive_lines(manifest: Manifest) -> list[str]:
    adaptive = manifest.scoring.adaptive
    if adaptive is None:
        return []
    floor = (
        "never below the calibrated one" if adaptive.floor == "calibrated" else "without a floor"
    )
    warming = (
        f"a key may alert once {adaptive.warm_up} of its events are scored"
        if adaptive.warm_up_floor is None
        else f"until {adaptive.warm_up} of a key's events are scored, its threshold is at "
        f"least {adaptive.warm_up_floor:g} times the calibrated one"
    )
    return [
        f"Each key's threshold is re-chosen every {adaptive.refresh} scored events from its "
        f"last {adaptive.history} smoothed scores (dynamic threshold, pruning margin "
        f"{adaptive.prune:g}, error buffer {adaptive.buffer}), {floor}; {warming}.",
    ]


def _min_score_lines(manifest: Manifest) -> list[str]:
    if not manifest.scoring.min_score:
        return []
    return [
        f"No threshold is below {manifest.scoring.min_score:.6g}: smaller errors never alert "
        "(`[threshold.advanced] min_error` or `min_scaled_error`)."
    ]


def _per_key_threshold_lines(manifest: Manifest) -> list[str]:
    own = manifest.key_thresholds.values()
    if not own:
        return []
    return [
        f"{len(own)} keys have a threshold of their own instead, calibrated the same way on "
        f"their own validation scores ({min(own):.6g} to {max(own):.6g}); keys seen later "
        "use the one above.",
    ]


def model_card(result: TrainResult) -> str:
    """A short Markdown description of what the model does, how it was made and its limits."""
    manifest = result.manifest
    network = manifest.network
    summary = manifest.training
    validation = result.metrics.get("metrics", {}).get("validation", {})
    span = (
        " to ".join(datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d") for t in summary.time_range)
        if summary.time_range
        else "unknown"
    )
    purpose = (
        "the probability that an event is positive (e.g. fraud), from its key's recent events"
        if manifest.task == "classify"
        else "how unexpected an event's values are, as the mean squared error of a forecast "
        "made from its key's previous events, scaled by the training residual variance"
    )
    lines = [
        f"# Model card: {manifest.task} model {manifest.model_version}",
        "",
        f"Scores {purpose}. Alerts start at a score of **{manifest.scoring.threshold:.6g}** "
        f"(calibrated on the validation split: {manifest.scoring.calibration})"
        + (
            f", held for {manifest.scoring.confirm} consecutive scored events."
            if manifest.scoring.confirm > 1
            else "."
        ),
        *_per_key_threshold_lines(manifest),
        *_adaptive_lines(manifest),
        *_min_score_lines(manifest),
        "",
        "## Data",
        f"- Training rows: {summary.rows}, keys: {summary.keys}, "
        f"positives: {'unlabeled' if summary.positives is None else summary.positives}",
        f"- Time span: {span}",
        f"- Key column `{manifest.columns.key}`, time column `{manifest.columns.time}`, "
        f"label column `{manifest.columns.label or 'none'}`",
        f"- Normalisation: {'per key' if manifest.per_key_statistics else 'global'} "
        "z-scores fitted on the training split only",
        "",
        "## Features",
        *(_feature_line(feature) for feature in manifest.features),
        "",
        "## Network",
        f"- {network.layers}-layer {'bidirectional ' if network.bidirectional else ''}LSTM, "
        f"hidden size {network.hidden}, dropout {network.dropout}, "
        f"layer norm {'on' if network.layer_norm else 'off'}",
        f"- Window of {manifest.window} events; a key's first {manifest.min_history - 1} "
        f"events are not scored (warming up); exported as `{manifest.export_mode}`",
        f"- Best epoch {result.history.best_epoch} of {len(result.history.epochs)}"
        f"{' (stopped early)' if result.history.stopped_early else ''}",
        "",
        "## Validation metrics",
        *_metric_lines(validation),
        "",
        "## Keys to look at",
        *_key_lines(result.keys),
        "",
        "## Intended use and limits",
        "- Flags events of the kinds the training data showed; new kinds of behaviour may "
        "score low. Re-evaluate with `trainer evaluate` on recent labeled data before and "
        "after deploying.",
        "- Scores assume the event stream looks like the training data: the same columns, "
        "units and cadence. Keys unseen in training use the global statistics.",
        "- A key's early events have little context and score less reliably.",
        "- The threshold trades missed events against false alarms on the validation split; "
        "move it with the detector's threshold setting rather than retraining.",
        "",
    ]
    return "\n".join(lines)


def _feature_line(feature: object) -> str:
    if isinstance(feature, CategoricalFeature):
        return (
            f"- `{feature.name}`: categorical, {len(feature.vocabulary)} values, "
            f"embedding {feature.embedding_dim}"
        )
    if isinstance(feature, NumericFeature):
        role = ", forecast" if feature.forecast else ""
        return f"- `{feature.name}`: numeric{role}, missing values: {feature.missing}"
    return "- `time_delta`: log seconds since the key's previous event (derived)"


def _metric_lines(metrics: dict[str, float]) -> Sequence[str]:
    if not metrics:
        return ["- none recorded"]
    return [f"- {name}: {value:.4g}" for name, value in sorted(metrics.items())]


def _key_lines(health: KeyHealth) -> list[str]:
    """At most `CARD_KEYS` keys that dominate the validation loss or look broken, with why."""
    named = list(health.reasons().items())
    if not named:
        return ["- none"]
    lines = [
        f"Keys with at least {DOMINANT_LOSS_SHARE:.0%} of the validation loss and "
        f"{DOMINANT_RATIO:g}x their share of its windows, or whose training values of a "
        f"numeric feature are constant or beyond {ROBUST_Z_LIMIT:g} robust σ (IQR / 1.349) "
        "from the key's median:",
        "",
        *(f"- `{key}`: {'; '.join(reasons)}" for key, reasons in named[:CARD_KEYS]),
    ]
    if len(named) > CARD_KEYS:
        lines.append(f"- and {len(named) - CARD_KEYS} more in metrics.json `keys`")
    return lines
