"""`detector replay`: score a CSV, Parquet or JSON lines file with a model, offline."""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

from detector.commands.options import add_format_argument, add_threads_argument

if TYPE_CHECKING:
    from collections.abc import Sequence

    from rich.console import Console
    from rich.table import Table

    from detector.engine.core import EngineOptions
    from detector.engine.scorer import Scorer
    from detector.files.replay import ReplayResult

#: Warn when more than this share of the events are dead letters.
DEAD_LETTER_WARNING = 0.10
#: Exit status for a refused model or input, and for an input of which nothing was scored.
REFUSED = 2


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "replay",
        help="score a file of events with a model, as the daemon would",
        description=(
            "Replay a file of events through the streaming engine in event-time order. Warns "
            f"on stderr when more than {DEAD_LETTER_WARNING:.0%} of the events are dead letters. "
            f"Exits {REFUSED} when the model or the input is refused, and when not one event "
            "was scored (every record a dead letter, or no key with enough history), with the "
            "reason."
        ),
    )
    parser.add_argument("--model", required=True, type=Path, help="model file (.onnx)")
    parser.add_argument("--input", required=True, type=Path, help="CSV, Parquet or JSON lines")
    add_format_argument(parser, "input format")
    parser.add_argument("--scores", type=Path, help="write one CSV row per input event here")
    parser.add_argument("--alerts", type=Path, help="write alerts as JSON lines here")
    parser.add_argument("--dead-letters", type=Path, help="write refused records here")
    parser.add_argument("--batch", type=int, default=4096, help="records per batch")
    parser.add_argument("--threshold", type=float, help="override the model's alert threshold")
    parser.add_argument("--stride", type=int, default=1, help="score every n-th event per key")
    add_threads_argument(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    # Imported when the command runs, not when it is registered: see detector/commands/options.py.
    import pyarrow as pa
    from rich.console import Console

    from detector.commands.output import stdout_console
    from detector.contract.model_file import ModelContractError
    from detector.engine.core import EngineOptions
    from detector.engine.scorer import Scorer
    from detector.files.readers import read_records
    from detector.ops import heap
    from detector.ops.logs import configure_logging

    configure_logging()  # log lines to stderr: stdout holds the summary
    console = Console(stderr=True)
    try:
        scorer = Scorer.load(args.model, intra_op_threads=args.threads)
    except ModelContractError as error:
        console.print(f"[red]refused model:[/red] {error}")
        return REFUSED
    try:
        manifest = scorer.manifest
        records = read_records(
            args.input, args.format, manifest.numeric_columns, manifest.columns.required
        )
        options = EngineOptions(max_batch=args.batch, stride=args.stride, threshold=args.threshold)
    except (OSError, ValueError, pa.ArrowException) as error:
        console.print(f"[red]cannot replay:[/red] {error}")
        return REFUSED
    heap.settle()  # the records and the model stay to the end: no collection walks them
    result = replay_with_progress(records, scorer, options, args.input.name, console)
    write_outputs(args, result)
    stdout_console().print(summary_table(result, scorer))
    return verdict(result, scorer, console)


def replay_with_progress(
    records: Sequence[dict[str, Any] | bytes],
    scorer: Scorer,
    options: EngineOptions,
    source_name: str,
    console: Console,
) -> ReplayResult:
    """`replay_records` under a progress bar on the console (stderr)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    from detector.files.replay import replay_records

    columns = (BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task("replay", total=len(records))
        return replay_records(
            records,
            scorer,
            options,
            progress=lambda done, _: bar.update(task, completed=done),
            source_name=source_name,
        )


def write_outputs(args: argparse.Namespace, result: ReplayResult) -> None:
    """The files asked for with --scores, --alerts and --dead-letters."""
    from detector.files.writers import write_json_lines

    if args.scores:
        write_scores(args.scores, result)
    if args.alerts:
        write_json_lines(args.alerts, [alert.to_dict() for alert in result.alerts])
    if args.dead_letters:
        write_json_lines(args.dead_letters, [letter.to_dict() for letter in result.dead_letters])


def verdict(result: ReplayResult, scorer: Scorer, console: Console) -> int:
    """The exit status; says on the console why nothing was scored, or warns of dead letters."""
    summary = result.summary
    if not summary.scored:
        console.print(f"[red]nothing was scored:[/red] {unscored_reason(result, scorer)}")
        return REFUSED
    if summary.dead_letters > DEAD_LETTER_WARNING * summary.events:
        console.print(
            f"[yellow]warning:[/yellow] {summary.dead_letters:,} of {summary.events:,} records "
            f"({summary.dead_letters / summary.events:.0%}) are dead letters: "
            f"{dead_letter_reasons(result)}"
        )
    return 0


def unscored_reason(result: ReplayResult, scorer: Scorer) -> str:
    summary = result.summary
    if not summary.events:
        return "the input holds no events"
    parts = []
    if summary.dead_letters:
        parts.append(
            f"{summary.dead_letters:,} of {summary.events:,} records are dead letters "
            f"({dead_letter_reasons(result)})"
        )
    if summary.warming_up:
        parts.append(
            f"{summary.warming_up:,} events were their key's warm-up (a key is scored once "
            f"it has {scorer.manifest.min_history} events)"
        )
    return "; ".join(parts)


def dead_letter_reasons(result: ReplayResult) -> str:
    """`missing_feature 20, bad_timestamp 3`: the reasons, most frequent first."""
    counts = Counter(letter.reason for letter in result.dead_letters)
    return ", ".join(f"{reason} {count:,}" for reason, count in counts.most_common())


def write_scores(path: Path, result: ReplayResult) -> None:
    """row, key, time, score, threshold, status: one row per input event, in input order."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.csv

    from detector.engine.core import Status

    status_names = np.array([status.name.lower() for status in Status], object)
    table = pa.table(
        {
            "row": result.rows,
            "key": pa.array(result.keys, pa.string()),
            "time": pa.array(result.times, from_pandas=True),
            "score": pa.array(result.scores, from_pandas=True),
            "threshold": pa.array(result.thresholds, from_pandas=True),
            "status": pa.array(status_names[result.statuses], pa.string()),
        }
    )
    pyarrow.csv.write_csv(table, path)


def summary_table(result: ReplayResult, scorer: Scorer) -> Table:
    from rich.table import Table

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
