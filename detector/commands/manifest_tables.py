"""The tables `inspect-model` prints: a model's manifest for a person to read."""

from __future__ import annotations

from rich.table import Table

from detector.contract.manifest import (
    AdaptiveThreshold,
    CategoricalFeature,
    Feature,
    Manifest,
    NumericFeature,
)


def overview(manifest: Manifest, providers: list[str]) -> Table:
    network, scoring, training = manifest.network, manifest.scoring, manifest.training
    table = Table(title=f"model {manifest.model_version}", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    rows = {
        "task": manifest.task,
        "export mode": manifest.export_mode,
        "key / time columns": f"{manifest.columns.key} / {manifest.columns.time} "
        f"({manifest.columns.time_unit})",
        "window / min history": f"{manifest.window} / {manifest.min_history}",
        "network": f"LSTM {network.layers}x{network.hidden}"
        + (" bidirectional" if network.bidirectional else "")
        + (" layer-norm" if network.layer_norm else ""),
        "score": scoring.semantics,
        "threshold": f"{scoring.threshold:.6g} ({scoring.calibration})",
        "minimum threshold": f"{scoring.min_score:.6g}" if scoring.min_score else "-",
        "smoothing": f"{scoring.smoothing:g}",
        "alerts after": "the first score at or above the threshold"
        if scoring.confirm == 1
        else f"{scoring.confirm} consecutive scores at or above the threshold",
        "adaptive threshold": "-"
        if scoring.adaptive is None
        else f"per key, every {scoring.adaptive.refresh} events from the last "
        f"{scoring.adaptive.history} (prune {scoring.adaptive.prune:g}, buffer "
        f"{scoring.adaptive.buffer}, floor "
        f"{scoring.adaptive.floor}, warm-up {scoring.adaptive.warm_up}"
        f"{_warm_up_floor(scoring.adaptive)})",
        "per-key statistics": f"{len(manifest.per_key_statistics or {})} keys",
        "per-key thresholds": _per_key_thresholds(manifest),
        "trained on": f"{training.rows:,} rows, {training.keys:,} keys",
        "metrics": ", ".join(f"{k}={v:.4g}" for k, v in training.metrics.items()) or "-",
        "created": f"{manifest.created_at:%Y-%m-%d %H:%M:%S %Z} by {manifest.trainer_version}",
        "int8 probes": "-"
        if manifest.probes is None
        else f"{len(manifest.probes.windows)} windows scored at load, tolerance "
        f"{manifest.probes.tolerance:.3g}",
        "graph sha256": manifest.graph_sha256,
        "providers": ", ".join(providers),
    }
    for name, value in rows.items():
        table.add_row(name, value)
    return table


def _warm_up_floor(adaptive: AdaptiveThreshold) -> str:
    if adaptive.warm_up_floor is None:
        return ", no alerts before"
    return f", {adaptive.warm_up_floor:g} x the threshold above before"


def _per_key_thresholds(manifest: Manifest) -> str:
    own = manifest.key_thresholds.values()
    if not own:
        return "-"
    return f"{len(own)} keys, {min(own):.6g} to {max(own):.6g}; other keys the threshold above"


def features(manifest: Manifest) -> Table:
    table = Table(title="features")
    for column in ("#", "name", "kind", "details"):
        table.add_column(column)
    for index, feature in enumerate(manifest.features):
        table.add_row(str(index), feature.name, feature.kind, describe(feature))
    return table


def describe(feature: Feature) -> str:
    if isinstance(feature, CategoricalFeature):
        return (
            f"{len(feature.vocabulary)} labels, embedding {feature.embedding_dim}, "
            f"missing: {feature.missing}"
        )
    text = f"mean {feature.mean:.4g}, std {feature.std:.4g}"
    if isinstance(feature, NumericFeature):
        text += f", missing: {feature.missing}" + (", forecast" if feature.forecast else "")
        text += ", not scaled" if feature.scale == "none" else ""
    return text
