"""`detector replay`: score a CSV, Parquet or JSON lines file with a model, offline."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.csv
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn
from rich.table import Table

from detector.engine import EngineOptions, Status
from detector.logs import configure_logging
from detector.manifest import ModelContractError
from detector.records import SUFFIXES, read_records
from detector.replay import ReplayResult, replay_records
from detector.scorer import Scorer

STATUS_NAMES = np.array([status.name.lower() for status in Status], object)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "replay",
        help="score a file of events with a model, as the daemon would",
        description="Replay a file of events through the streaming engine in event-time order.",
    )
    parser.add_argument("--model", required=True, type=Path, help="model file (.onnx)")
    parser.add_argument("--input", required=True, type=Path, help="CSV, Parquet or JSON lines")
    parser.add_argument("--format", choices=sorted(set(SUFFIXES.values())), help="input format")
    parser.add_argument("--scores", type=Path, help="write one CSV row per input event here")
    parser.add_argument("--alerts", type=Path, help="write alerts as JSON lines here")
    parser.add_argument("--dead-letters", type=Path, help="write refused records here")
    parser.add_argument("--batch", type=int, default=4096, help="records per batch")
    parser.add_argument("--threshold", type=float, help="override the model's alert threshold")
    parser.add_argument("--stride", type=int, default=1, help="score every n-th event per key")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    configure_logging()  # log lines to stderr: stdout holds the summary
    console = Console(stderr=True)
    try:
        scorer = Scorer.load(args.model)
    except ModelContractError as error:
        console.print(f"[red]refused model:[/red] {error}")
        return 2
    try:
        records = read_records(args.input, args.format, scorer.manifest.numeric_columns)
        options = EngineOptions(
            max_batch=args.batch,
            stride=args.stride,
            threshold=args.threshold,
        )
    except (OSError, ValueError, pa.ArrowException) as error:
        console.print(f"[red]cannot replay:[/red] {error}")
        return 2
    columns = (BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task("replay", total=len(records))
        result = replay_records(
            records,
            scorer,
            options,
            progress=lambda done, _: bar.update(task, completed=done),
            source_name=args.input.name,
        )
    if args.scores:
        write_scores(args.scores, result)
    if args.alerts:
        write_json_lines(args.alerts, [alert.to_dict() for alert in result.alerts])
    if args.dead_letters:
        write_json_lines(args.dead_letters, [letter.to_dict() for letter in result.dead_letters])
    Console().print(summary_table(result, scorer))
    return 0


def write_scores(path: Path, result: ReplayResult) -> None:
    """row, key, time, score, threshold, status: one row per input event, in input order."""
    table = pa.table(
        {
            "row": result.rows,
            "key": pa.array(result.keys, pa.string()),
            "time": pa.array(result.times, from_pandas=True),
            "score": pa.array(result.scores, from_pandas=True),
            "threshold": pa.array(result.thresholds, from_pandas=True),
            "status": pa.array(STATUS_NAMES[result.statuses], pa.string()),
        }
    )
    pyarrow.csv.write_csv(table, path)


def write_json_lines(path: Path, documents: list[dict[str, Any]]) -> None:
    with path.open("wb") as out:
        for document in documents:
            out.write(orjson.dumps(document) + b"\n")


def summary_table(result: ReplayResult, scorer: Scorer) -> Table:
    summary = result.summary
    table = Table(title=f"replay with model {scorer.manifest.model_version}", show_header=False)
    table.add_column(style="bold")
    table.add_column(justify="right")
    rows = {
        "events": summary.events,
        "keys": summary.keys,
        "scored": summary.scored,
        "warming up": summary.warming_up,
        "skipped by stride": summary.skipped_by_stride,
        "dead letters": summary.dead_letters,
        "alerts": summary.alerts,
        "evicted (LRU)": summary.evicted_lru,
        "expired (TTL)": summary.expired_ttl,
    }
    for name, value in rows.items():
        table.add_row(name, f"{value:,}")
    table.add_row("seconds", f"{summary.seconds:.2f}")
    table.add_row("events/s", f"{summary.events_per_s:,.0f}")
    return table
