"""`detector produce`: send a CSV, Parquet or JSON lines file to a Kafka topic, as JSON records.

For demos, load tests and backfills. Each record goes out as one JSON object keyed by its
entity key, in file order or sorted by a time column; JSON lines are sent byte for byte (a
malformed line too, which is how dead letters are tested). The producer batches and
compresses; nothing waits for a single record, only the final flush for all of them.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
from kafka import KafkaProducer
from kafka.errors import KafkaError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

from detector.config import add_config_argument, load_settings_or_exit
from detector.features import RecordError, parse_event_time
from detector.records import SUFFIXES, read_records

#: Most records between two progress updates.
CHUNK = 1000


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "produce",
        help="send a CSV, Parquet or JSON lines file to a Kafka topic as JSON records",
        description=(
            "Send every record of a file to a topic as a JSON object, keyed by --key-column, in "
            "file order or sorted by --time-column; JSON lines are sent unchanged. Security "
            "settings come from --config and SEQSENTINEL_KAFKA__* like the daemon's."
        ),
    )
    parser.add_argument("--input", required=True, type=Path, help="CSV, Parquet or JSON lines")
    parser.add_argument("--topic", required=True, help="topic to send to")
    parser.add_argument(
        "--bootstrap-servers", help="host:port[,host:port] (default: kafka.bootstrap_servers)"
    )
    parser.add_argument("--format", choices=sorted(set(SUFFIXES.values())), help="input format")
    parser.add_argument("--key-column", help="column whose value is the message key")
    parser.add_argument("--time-column", help="send in the order of this column (stable)")
    parser.add_argument(
        "--rate",
        type=float,
        help="at most this many records per second (default: as fast as possible)",
    )
    add_config_argument(parser)
    parser.set_defaults(handler=produce)


def produce(args: argparse.Namespace) -> int:
    console = Console(stderr=True)
    if args.rate is not None and not args.rate > 0:
        console.print("[red]--rate must be positive[/red]")
        return 2
    servers = {"bootstrap_servers": args.bootstrap_servers} if args.bootstrap_servers else {}
    settings = load_settings_or_exit(args.config, kafka=servers)
    try:
        records = read_records(args.input, args.format)
    except (OSError, ValueError, pa.ArrowException) as error:
        console.print(f"[red]cannot read {args.input}:[/red] {error}")
        return 2
    documents = [_document(record) for record in records]
    if args.time_column:
        order = sorted(range(len(documents)), key=lambda i: _time(documents[i], args.time_column))
        records = [records[i] for i in order]
        documents = [documents[i] for i in order]
    try:
        producer = KafkaProducer(
            acks="all",
            linger_ms=20,
            batch_size=512 * 1024,
            compression_type=settings.kafka.compression_type,
            **settings.kafka.client_options(),
        )
    except KafkaError as error:
        console.print(f"[red]cannot connect to {settings.kafka.bootstrap_servers}:[/red] {error}")
        return 1
    try:
        failures = _send_all(producer, args, records, documents, console)
    finally:
        producer.close()
    if failures:
        console.print(f"[red]{failures} of {len(records)} records were not acknowledged[/red]")
        return 1
    return 0


def _send_all(
    producer: KafkaProducer,
    args: argparse.Namespace,
    records: Sequence[dict[str, Any] | bytes],
    documents: Sequence[dict[str, Any] | None],
    console: Console,
) -> int:
    """Send everything, flush once at the end; the number of records that failed."""
    failed: list[Exception] = []
    started = time.monotonic()
    columns = (BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    # With a rate, send about 50 ms worth at a time and wait for the schedule to catch up.
    step = max(1, min(CHUNK, int(args.rate / 20))) if args.rate else CHUNK
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task("produce", total=len(records))
        for start in range(0, len(records), step):
            done = min(start + step, len(records))
            for record, document in zip(records[start:done], documents[start:done], strict=True):
                value = record if isinstance(record, bytes) else orjson.dumps(record)
                future = producer.send(args.topic, value=value, key=_key(document, args))
                future.add_errback(failed.append)
            bar.update(task, completed=done)
            if args.rate:
                time.sleep(max(0.0, started + done / args.rate - time.monotonic()))
        producer.flush()
    seconds = time.monotonic() - started
    rate = len(records) / seconds if seconds > 0 else math.inf
    console.print(
        f"sent {len(records) - len(failed)} records to {args.topic} "
        f"in {seconds:.1f} s ({rate:,.0f}/s)"
    )
    return len(failed)


def _document(record: dict[str, Any] | bytes) -> dict[str, Any] | None:
    """The record as a mapping (a JSON line parsed), or None for a line that is no object."""
    if isinstance(record, dict):
        return record
    try:
        document = orjson.loads(record)
    except orjson.JSONDecodeError:
        return None
    return document if isinstance(document, dict) else None


def _key(document: dict[str, Any] | None, args: argparse.Namespace) -> bytes | None:
    if not args.key_column or document is None:
        return None
    value = document.get(args.key_column)
    return None if value is None else str(value).encode()


def _time(document: dict[str, Any] | None, column: str) -> float:
    """Sort key: seconds (or the number as it is); unreadable times go last."""
    value = None if document is None else document.get(column)
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    try:
        return parse_event_time(value, "s", column)
    except RecordError:
        return math.inf
