"""Reading records from files, for `detector replay`, `detector produce` and the trainer.

CSV and Parquet through pyarrow, one record (a dict) per row in file order; JSON lines as the
raw bytes of each line, so that a malformed line reaches the engine exactly as it would from
Kafka and becomes a dead letter with the same reason.
"""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path
from typing import Any, Literal

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
