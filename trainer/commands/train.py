"""`trainer train`: learn a model from historical events and export one ONNX file."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train on historical events and export a self-describing ONNX model",
        description=(
            "Read the events, split each key's history in time order, fit the feature "
            "statistics on the training part, train the LSTM, calibrate the alert threshold on "
            "the validation part and write the model (with its manifest) and metrics.json "
            "beside it. The model is written only if onnxruntime scores it like torch does. "
            "Under torchrun, every process trains on its shard and rank 0 writes."
        ),
    )
    parser.add_argument("--config", type=Path, required=True, help="training TOML file")
    parser.add_argument(
        "--data",
        type=Path,
        action="append",
        required=True,
        help="CSV, Parquet or JSON-lines file of events (repeat for several)",
    )
    parser.add_argument("--out", type=Path, required=True, help="model file to write (.onnx)")
    parser.add_argument("--epochs", type=int, help="override training.epochs")
    parser.add_argument(
        "--int8",
        action="store_true",
        help="quantise the weights to int8 (smaller, faster; accuracy change in metrics.json)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    # Imported when the command runs, not when it is registered: see detector/commands/options.py.
    from trainer.calibrate import CalibrationError
    from trainer.config import ConfigError, load_train_config
    from trainer.data import DataError
    from trainer.export import ExportError
    from trainer.pipeline import train
    from trainer.report import write_training_report

    try:
        config = load_train_config(args.config)
        result = train(
            config,
            args.data,
            args.out,
            epochs=args.epochs,
            int8=args.int8,
            progress=not args.no_progress,
        )
    except (ConfigError, DataError, CalibrationError, ExportError) as error:
        print(f"trainer train: {error}", file=sys.stderr)
        return 2
    if result is None:  # a torchrun worker other than rank 0
        return 0
    manifest = result.manifest
    print(f"wrote {result.model_path} (model {manifest.model_version})")
    print(f"wrote {result.metrics_path}")
    for path in write_training_report(result, result.model_path.parent):
        print(f"wrote {path}")
    print(f"threshold {manifest.scoring.threshold:.6g}: {manifest.scoring.calibration}")
    if config.model.task == "forecast":
        print(
            "alerting: the forecast recipe's (trainer/recipe.py)"
            if config.alerts_as_the_recipe
            else "alerting: the configuration's [threshold.advanced], not the forecast recipe's"
        )
    if manifest.scoring.min_score:
        print(f"no threshold below {manifest.scoring.min_score:.6g} (min_error)")
    for name, value in sorted(manifest.training.metrics.items()):
        print(f"  {name} = {value:.4g}")
    if warning := result.keys.warning():
        print(f"trainer train: warning: {warning}", file=sys.stderr)
    return 0
