"""`trainer inspect`: show what a model file promises, after verifying it like the detector."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from detector.manifest import (
    CategoricalFeature,
    Feature,
    Manifest,
    ModelContractError,
    NumericFeature,
    load_model_file,
)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "inspect",
        help="verify a model file and print its manifest",
        description=(
            "Load the model file as the detector does (manifest, schema version, graph hash, "
            "inputs and outputs) and print the manifest. Exits 2 if the file would be refused."
        ),
    )
    parser.add_argument("model", type=Path, help="model file (.onnx)")
    parser.add_argument("--json", action="store_true", help="print the manifest as JSON")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    try:
        manifest, data = load_model_file(args.model)
    except ModelContractError as error:
        print(f"trainer inspect: refused: {error}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(json.loads(manifest.to_json()), indent=2))
    else:
        print(describe(manifest, len(data)))
    return 0


def describe(manifest: Manifest, size: int) -> str:
    """The manifest as aligned text, most important facts first."""
    network = manifest.network
    scoring = manifest.scoring
    training = manifest.training
    direction = "bidirectional" if network.bidirectional else "unidirectional"
    lines = [
        ("model version", manifest.model_version),
        ("task", f"{manifest.task} ({scoring.semantics}), {manifest.export_mode} export"),
        ("window", f"{manifest.window} events, scored from event {manifest.min_history}"),
        (
            "network",
            f"{network.layers} x LSTM({network.hidden}) {direction}, "
            f"layer_norm={network.layer_norm}, dropout={network.dropout:g}",
        ),
        ("threshold", f"{scoring.threshold:.6g} ({scoring.calibration})"),
        ("smoothing", f"EWMA alpha {scoring.smoothing:g}"),
        ("columns", _columns(manifest)),
        ("per-key statistics", f"{len(manifest.per_key_statistics or {})} keys"),
        ("training", f"{training.rows} rows, {training.keys} keys, {training.positives} positives"),
        ("trainer", f"{manifest.trainer_version}, created {manifest.created_at:%Y-%m-%d %H:%M}Z"),
        ("file", f"{size:,} bytes, graph sha256 {manifest.graph_sha256}"),
    ]
    text = [f"{name:>20}  {value}" for name, value in lines]
    text.append(f"{'features':>20}")
    text += [f"{'':>20}  {_feature(feature)}" for feature in manifest.features]
    if training.metrics:
        text.append(f"{'metrics':>20}")
        text += [
            f"{'':>20}  {name} = {value:.4g}" for name, value in sorted(training.metrics.items())
        ]
    return "\n".join(text)


def _columns(manifest: Manifest) -> str:
    columns = manifest.columns
    label = f", label {columns.label!r}" if columns.label else ""
    return f"key {columns.key!r}, time {columns.time!r} ({columns.time_unit}){label}"


def _feature(feature: Feature) -> str:
    if isinstance(feature, CategoricalFeature):
        size = len(feature.vocabulary)
        return f"{feature.name}: categorical, {size} values, dim {feature.embedding_dim}"
    if isinstance(feature, NumericFeature):
        forecast = ", forecast" if feature.forecast else ""
        return f"{feature.name}: numeric, mean {feature.mean:.4g}, std {feature.std:.4g}{forecast}"
    return (
        f"{feature.name}: log time since previous event, "
        f"mean {feature.mean:.4g}, std {feature.std:.4g}"
    )
