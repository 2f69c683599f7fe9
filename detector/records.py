"""Records going into the engine, where they came from, and the ones it could not score.

Files are read here too, for `detector replay` and `detector produce`: CSV and Parquet
through pyarrow, one record (a dict) per row in file order; JSON lines as the raw bytes of
each line, so that a malformed line reaches the engine exactly as it would from Kafka and
becomes a dead letter with the same reason.
"""

from __future__ import annotations

import base64
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

import orjson
import pyarrow as pa
import pyarrow.csv
import pyarrow.parquet

FileFormat = Literal["csv", "parquet", "jsonl"]
SUFFIXES: dict[str, FileFormat] = {
    ".csv": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
}


@dataclass(frozen=True, slots=True)
class Source:
    """Where a record came from: a Kafka topic, partition and offset, or a file and row."""

    topic: str | None = None
    partition: int | None = None
    offset: int | None = None
    file: str | None = None
    row: int | None = None

    def to_dict(self) -> dict[str, str | int]:
        return {
            name: value
            for name in ("topic", "partition", "offset", "file", "row")
            if (value := getattr(self, name)) is not None
        }


@dataclass(frozen=True, slots=True)
class InputRecord:
    """One record for the engine: JSON bytes (as read from Kafka) or an already parsed mapping.

    `key` overrides the record's key column, e.g. with the Kafka message key.
    """

    payload: bytes | str | Mapping[str, Any]
    key: str | None = None
    source: Source | None = None


class PolledRecord(NamedTuple):
    """A Kafka message as the engine reads it: what an `InputRecord` offers (payload, key,
    source), as a tuple that `detector.restore.input_records` makes for a whole poll without
    a Python call per record. The `Source` is made only when asked for: by an alert or a
    dead letter, a few records of a batch."""

    payload: bytes
    key: str | None
    topic: str
    partition: int
    offset: int

    @property
    def source(self) -> Source:
        return Source(self.topic, self.partition, self.offset)


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A record that could not be scored: its original bytes and a machine-readable reason."""

    payload: bytes
    reason: str
    detail: str
    source: Source | None = None

    @classmethod
    def of(cls, record: InputRecord | PolledRecord, reason: str, detail: str) -> DeadLetter:
        return cls(payload_bytes(record.payload), reason, detail, record.source)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form: the payload as text when it is UTF-8, else as base64."""
        document: dict[str, Any] = {"reason": self.reason, "detail": self.detail}
        try:
            document["payload"] = self.payload.decode()
        except UnicodeDecodeError:
            document["payload_base64"] = base64.b64encode(self.payload).decode()
        if self.source is not None:
            document["source"] = self.source.to_dict()
        return document


def payload_bytes(payload: bytes | str | Mapping[str, Any]) -> bytes:
    """The payload as bytes; a mapping is serialised as JSON (anything odd as its str)."""
    if isinstance(payload, bytes):
        return payload
    if isinstance(payload, str):
        return payload.encode()
    try:
        return orjson.dumps(payload, default=str, option=orjson.OPT_NON_STR_KEYS)
    except TypeError:
        return repr(payload).encode()


def file_format(path: Path | str, requested: FileFormat | None = None) -> FileFormat:
    """`requested`, or the format the file's suffix names."""
    if requested is not None:
        return requested
    suffix = Path(path).suffix.lower()
    if suffix not in SUFFIXES:
        raise ValueError(
            f"cannot tell the format of {Path(path).name!r} from its suffix; "
            f"pass one of {sorted(set(SUFFIXES.values()))}"
        )
    return SUFFIXES[suffix]


def read_records(
    path: Path | str,
    fmt: FileFormat | None = None,
    numeric_columns: Collection[str] = (),
    required: Collection[str] = (),
) -> list[dict[str, Any]] | list[bytes]:
    """The records of a file in file order: dicts for CSV and Parquet, raw lines for JSON lines.

    Blank lines of a JSON lines file are skipped. Timestamp and date columns of CSV and Parquet
    files (pyarrow types ISO 8601 cells of a CSV file as timestamps whatever it is told) become
    ISO 8601 text in UTC, a column at a time, which the codec parses like any other; naive ones
    are UTC. CSV cells have no type: pyarrow types a column by all its cells, so one malformed
    cell turns a column of numbers into text; the cells of `numeric_columns` that read as
    numbers are numbers again, so that only the malformed record is refused. A CSV or Parquet
    file without one of the `required` columns (the key and the time) is refused at once,
    rather than each of its records.
    """
    path = Path(path)
    match file_format(path, fmt):
        case "jsonl":
            with path.open("rb") as lines:
                return [line.rstrip(b"\r\n") for line in lines if line.strip()]
        case "csv":
            options = pyarrow.csv.ConvertOptions(strings_can_be_null=True)
            table = _with_columns(pyarrow.csv.read_csv(path, convert_options=options), required)
            texts = [
                name
                for name in numeric_columns
                if name in table.column_names and pa.types.is_string(table.schema.field(name).type)
            ]
            return _numbers_from_text(_timestamps_as_text(table).to_pylist(), texts)
        case "parquet":
            table = _with_columns(pyarrow.parquet.read_table(path), required)
            return _timestamps_as_text(table).to_pylist()


def _with_columns(table: pa.Table, required: Collection[str]) -> pa.Table:
    """`table`, if it has every `required` column: one error then, not one per record."""
    missing = [name for name in required if name not in table.column_names]
    if missing:
        raise ValueError(
            f"no column {', '.join(map(repr, missing))} in the file; "
            f"its columns: {', '.join(map(repr, table.column_names))}"
        )
    return table


def _numbers_from_text(rows: list[dict[str, Any]], columns: list[str]) -> list[dict[str, Any]]:
    for row in rows if columns else ():
        for column in columns:
            text = row[column]
            if text is not None:
                try:
                    row[column] = float(text)
                except ValueError:
                    continue
    return rows


def _timestamps_as_text(table: pa.Table) -> pa.Table:
    """Timestamp and date columns as ISO 8601 text in UTC (microseconds, "Z")."""
    for index, field in enumerate(table.schema):
        if pa.types.is_timestamp(field.type) or pa.types.is_date(field.type):
            utc = table.column(index).cast(pa.timestamp("us", "UTC"), safe=False)
            table = table.set_column(index, field.name, utc.cast(pa.string()))
    return table
