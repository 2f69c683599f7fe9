"""`detector produce`: send a CSV, Parquet or JSON lines file to a Kafka topic, as JSON records.

For demos, load tests and backfills. Each record goes out as one JSON object keyed by its
entity key, in file order or sorted by a time column; JSON lines are sent byte for byte (a
malformed line too, which is how dead letters are tested). The producer batches and
compresses; nothing waits for a single record, only the final flush for all of them.

Keyed and in time order is the default that keeps the detector right: with `--model` the key
and time columns are the model's. Unkeyed records spread one key's events over a topic's
partitions, so that they reach the detector out of order (late events), hence an unkeyed send
to a topic of several partitions is refused unless `--no-key` asks for it.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from detector.commands.options import add_format_argument
from detector.config import add_config_argument

if TYPE_CHECKING:
    from kafka import KafkaProducer
    from rich.console import Console

#: Most records between two progress updates.
CHUNK = 1000
#: Exit status for what cannot be sent as asked: unreadable input, a refused model, unkeyed
#: records for a topic of several partitions.
REFUSED = 2


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "produce",
        help="send a CSV, Parquet or JSON lines file to a Kafka topic as JSON records",
        description=(
            "Send every record of a file to a topic as a JSON object, keyed by --key-column, in "
            "file order or sorted by --time-column (both the --model's by default); JSON lines "
            "are sent unchanged. Unkeyed records for a topic of several partitions are refused "
            f"(exit {REFUSED}) unless --no-key is given: one key's events would reach the "
            "detector out of order. Security settings come from --config and SEQSENTINEL_KAFKA__* "
            "like the daemon's."
        ),
    )
    parser.add_argument("--input", required=True, type=Path, help="CSV, Parquet or JSON lines")
    parser.add_argument("--topic", required=True, help="topic to send to")
    parser.add_argument(
        "--bootstrap-servers", help="host:port[,host:port] (default: kafka.bootstrap_servers)"
    )
    add_format_argument(parser, "input format")
    parser.add_argument(
        "--model", type=Path, help="model file (.onnx) whose key and time columns to use"
    )
    keys = parser.add_mutually_exclusive_group()
    keys.add_argument(
        "--key-column", help="column whose value is the message key (default: the --model's)"
    )
    keys.add_argument(
        "--no-key",
        action="store_true",
        help="send unkeyed records, even to a topic of several partitions, where one key's "
        "events may then arrive out of order",
    )
    parser.add_argument(
        "--time-column", help="send in the order of this column (stable; default: the --model's)"
    )
    parser.add_argument(
        "--rate",
        type=float,
        help="at most this many records per second (default: as fast as possible)",
    )
    add_config_argument(parser)
    parser.set_defaults(handler=produce)


def produce(args: argparse.Namespace) -> int:
    # Imported here: every `detector` call registers this command (detector/commands/options.py).
    import pyarrow as pa
    from kafka import KafkaProducer
    from kafka.errors import KafkaError
    from rich.console import Console

    from detector.config import load_settings_or_exit
    from detector.files.readers import read_records

    console = Console(stderr=True)
    if args.rate is not None and not args.rate > 0:
        console.print("[red]--rate must be positive[/red]")
        return REFUSED
    servers = {"bootstrap_servers": args.bootstrap_servers} if args.bootstrap_servers else {}
    settings = load_settings_or_exit(args.config, kafka=servers)
    if args.model is not None and (refusal := _model_columns(args)) is not None:
        console.print(f"[red]refused model:[/red] {refusal}")
        return REFUSED
    try:
        required = [column for column in (args.key_column, args.time_column) if column]
        records = read_records(args.input, args.format, required=required)
    except (OSError, ValueError, pa.ArrowException) as error:
        console.print(f"[red]cannot read {args.input}:[/red] {error}")
        return REFUSED
    documents = [_document(record) for record in records]
    if args.time_column:
        order = _time_order(documents, args.time_column)
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
        refusal = _unkeyed_refusal(producer, args)
        failures = 0 if refusal else _send_all(producer, args, records, documents, console)
    except KafkaError as error:  # e.g. no such topic, and the broker creates none
        console.print(f"[red]cannot send to {args.topic}:[/red] {error}")
        return 1
    finally:
        producer.close()
    if refusal is not None:
        console.print(f"[red]{refusal}[/red]")
        return REFUSED
    if failures:
        console.print(f"[red]{failures} of {len(records)} records were not acknowledged[/red]")
        return 1
    return 0


def _model_columns(args: argparse.Namespace) -> str | None:
    """Take the key and time columns from the `--model`'s manifest where the options leave
    them open; why the model is refused, if it is."""
    from detector.contract.model_file import ModelContractError, load_model_file

    try:
        columns = load_model_file(args.model)[0].columns
    except ModelContractError as error:
        return str(error)
    if not args.no_key:
        args.key_column = args.key_column or columns.key
    args.time_column = args.time_column or columns.time
    return None


def _unkeyed_refusal(producer: KafkaProducer, args: argparse.Namespace) -> str | None:
    """Why the records may not go out unkeyed, or None: a topic of one partition keeps them in
    order, and `--no-key` means it."""
    if args.key_column or args.no_key:
        return None
    partitions = len(producer.partitions_for(args.topic))
    if partitions < 2:
        return None
    return (
        f"refusing to send unkeyed records to {args.topic}: its {partitions} partitions would "
        "spread one key's events over them, and the detector would get them out of order "
        "(late events, dead letters by default). Pass --key-column COLUMN or --model FILE (its "
        "key column), or --no-key to send them unkeyed all the same."
    )


def _send_all(
    producer: KafkaProducer,
    args: argparse.Namespace,
    records: Sequence[dict[str, Any] | bytes],
    documents: Sequence[dict[str, Any] | None],
    console: Console,
) -> int:
    """Send everything, flush once at the end; the number of records that failed."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

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


def _time_order(documents: Sequence[dict[str, Any] | None], column: str) -> list[int]:
    """Positions of `documents` in the order of their `column`, stable: seconds (or the number
    as it is); unreadable times go last."""
    from detector.contract.features import RecordError, parse_event_time

    def seconds(document: dict[str, Any] | None) -> float:
        value = None if document is None else document.get(column)
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
        try:
            return parse_event_time(value, "s", column)
        except RecordError:
            return math.inf

    return sorted(range(len(documents)), key=lambda i: seconds(documents[i]))
