"""`trainer evaluate`: score labeled data through the detector's engine and report metrics."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

from detector.commands.options import add_format_argument, add_threads_argument

if TYPE_CHECKING:
    from rich.table import Table

    from detector.contract.manifest import Manifest
    from trainer.evaluate import Evaluation


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="score labeled data through the detector's engine; write metrics and plots",
        description=(
            "Replay a labeled file through the detector's streaming engine (the code "
            "`detector replay` runs) and compare the scores with the labels: writes "
            "metrics.json and plots into --out."
        ),
    )
    parser.add_argument("--model", type=Path, required=True, help="the model file (.onnx)")
    parser.add_argument("--data", type=Path, required=True, help="labeled events to score")
    parser.add_argument("--out", type=Path, required=True, help="folder for metrics and plots")
    add_format_argument(parser, "data format (default: by suffix)")
    parser.add_argument("--label", help="label column (default: the model's)")
    parser.add_argument("--threshold", type=float, help="alert threshold (default: the model's)")
    parser.add_argument("--batch", type=int, default=4096, help="events per engine batch")
    add_threads_argument(parser)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    # Imported when the command runs, not when it is registered: see detector/commands/options.py.
    from rich.console import Console
    from rich.progress import Progress

    from detector.commands.output import stdout_console
    from detector.contract.model_file import ModelContractError
    from detector.engine.core import EngineOptions
    from trainer.evaluate import evaluate
    from trainer.report import write_evaluation_report

    console = Console(stderr=True)
    options = EngineOptions(max_batch=args.batch, threshold=args.threshold)
    try:
        with Progress(console=console, disable=args.no_progress, transient=True) as bar:
            task = bar.add_task("scoring", total=None)
            evaluation = evaluate(
                args.model,
                args.data,
                fmt=args.format,
                label=args.label,
                options=options,
                intra_op_threads=args.threads,
                progress=lambda done, total: bar.update(task, completed=done, total=total),
            )
    except ModelContractError as error:
        console.print(f"trainer evaluate: refused model: {error}")
        return 2
    except (OSError, ValueError) as error:
        console.print(f"trainer evaluate: {error}")
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    metrics_path = args.out / "metrics.json"
    metrics_path.write_text(json.dumps(json_safe(evaluation.metrics), indent=2) + "\n")
    plots = write_evaluation_report(evaluation, args.out)
    stdout_console().print(summary_table(evaluation))
    for path in (metrics_path, *plots):
        print(path)
    return 0


def json_safe(value: object) -> object:
    """`value` with NaN and infinities as null, which JSON can carry."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(item) for item in value]
    return value


def summary_table(evaluation: Evaluation) -> Table:
    from rich.table import Table

    metrics = evaluation.metrics
    table = Table(title=f"{metrics['model']['file']} on {metrics['data']['file']}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    counts = metrics["counts"]
    rows = [
        ("events", f"{counts['events']}"),
        (
            "scored / warming up / dead letters",
            f"{counts['scored']} / {counts['warming_up']} / {counts['dead_letters']}",
        ),
        ("labeled positives (scored)", f"{counts['positives']} ({counts['scored_positives']})"),
        ("threshold", f"{evaluation.threshold:.6g}{_threshold_role(evaluation.manifest)}"),
        ("precision / recall / F1", _triple(metrics["point"])),
        ("AUPRC / AUROC", f"{metrics['auprc']:.3f} / {metrics['auroc']:.3f}"),
        ("range precision / recall / F1", _triple(metrics["ranges"])),
        ("point-adjusted precision / recall / F1", _triple(metrics["point_adjusted"])),
        ("alerts", f"{counts['alerts']}"),
        ("events/s", f"{counts['events_per_second']:.0f}"),
    ]
    for name, value in rows:
        table.add_row(name, value)
    return table


def _triple(counts: dict[str, float]) -> str:
    return f"{counts['precision']:.3f} / {counts['recall']:.3f} / {counts['f1']:.3f}"


def _threshold_role(manifest: Manifest) -> str:
    """How the calibrated threshold enters the thresholds the engine applied."""
    adaptive = manifest.scoring.adaptive
    if adaptive is None:
        return ""
    if adaptive.floor == "calibrated":
        return " (floor of per-key adaptive ones)"
    return " (until per-key adaptive ones are chosen)"
