"""Event times as files carry them: ISO 8601 text and typed timestamp columns, and a key or
time column that is not there at all."""

from __future__ import annotations

import json
from datetime import UTC, date, datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv
import pyarrow.parquet
import pytest
from model_factory import KEY, TIME, event, load_random, make_manifest

from detector.contract.features import FeatureCodec, RecordError
from detector.engine.core import EngineOptions, Status
from detector.files.readers import read_records
from detector.files.replay import replay_records
from trainer.config import TrainConfig
from trainer.data import DataError, load_events

#: 2014-04-01T00:00:00Z, the evaluation's first event.
T0 = 1_396_310_400
#: Per event: the time as CSV text (without and with zones) and the seconds it stands for.
ISO_TIMES = [
    ("2014-04-01 00:00:00", T0),
    ("2014-04-01T00:05:00Z", T0 + 300),
    ("2014-04-01T02:10:00+02:00", T0 + 600),
    ("2014-04-01 00:15:00.250", T0 + 900.25),
]


def _csv(path: Path, times: list[str]) -> Path:
    lines = [f"{KEY},{TIME},amount"] + [f"a,{t},{10 + i}" for i, t in enumerate(times)]
    path.write_text("\n".join(lines) + "\n")
    return path


def _times(records: list) -> list[float]:
    codec = FeatureCodec(make_manifest(features=make_manifest().features[:1]))
    return [codec.decode(record).time for record in records]


def test_iso_text_of_a_csv_file_is_the_time_it_says(tmp_path: Path) -> None:
    for text, seconds in ISO_TIMES:  # each alone: pyarrow types such a column as timestamps
        (record,) = read_records(_csv(tmp_path / "one.csv", [text]), numeric_columns=[TIME])
        assert _times([record]) == [seconds], text
    mixed = read_records(_csv(tmp_path / "mixed.csv", [t for t, _ in ISO_TIMES]))
    assert _times(mixed) == [seconds for _, seconds in ISO_TIMES]
    (day,) = read_records(_csv(tmp_path / "day.csv", ["2014-04-02"]))
    assert _times([day]) == [T0 + 86_400]


@pytest.mark.parametrize(
    "arrow_type",
    [
        pa.timestamp("ms"),
        pa.timestamp("ns"),
        pa.timestamp("ms", "UTC"),
        pa.timestamp("us", "America/New_York"),
    ],
)
def test_timestamp_columns_of_parquet_files_are_utc_instants(
    tmp_path: Path, arrow_type: pa.DataType
) -> None:
    moments = [datetime(2014, 4, 1, tzinfo=UTC) + timedelta(seconds=s) for s in (0, 1.5, 3600)]
    naive = arrow_type.tz is None
    values = [m.replace(tzinfo=None) if naive else m for m in moments]
    column = pa.array(values, pa.timestamp("us", None if naive else "UTC")).cast(arrow_type)
    path = tmp_path / "events.parquet"
    pyarrow.parquet.write_table(pa.table({KEY: ["a"] * 3, TIME: column, "amount": [1.0] * 3}), path)
    assert _times(read_records(path)) == [T0, T0 + 1.5, T0 + 3600]


def test_a_date_column_is_midnight_utc(tmp_path: Path) -> None:
    path = tmp_path / "events.parquet"
    days = pa.array([date(2014, 4, 1), date(2014, 4, 3)], pa.date32())
    pyarrow.parquet.write_table(pa.table({KEY: ["a", "a"], TIME: days, "amount": [1, 2]}), path)
    assert _times(read_records(path)) == [T0, T0 + 2 * 86_400]


def test_datetime_objects_are_times_too() -> None:
    paris = timezone(timedelta(hours=2))
    records = [
        event("a", 0, 1.0) | {TIME: datetime(2014, 4, 1)},
        event("a", 0, 1.0) | {TIME: datetime(2014, 4, 1, 2, tzinfo=paris)},
    ]
    assert _times(records) == [T0, T0]
    with pytest.raises(RecordError, match="has type date"):
        _times([event("a", 0, 1.0) | {TIME: date(2014, 4, 1)}])


def test_replay_scores_iso_times_as_the_numbers_they_stand_for(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    rows = [
        event(key, T0 + 60 * i + k, float(rng.gamma(2, 20)))
        for i in range(30)
        for k, key in enumerate("ab")
    ]
    numbers, iso = tmp_path / "numbers.csv", tmp_path / "iso.csv"
    pyarrow.csv.write_csv(pa.Table.from_pylist(rows), numbers)
    text = [
        row | {TIME: f"{datetime.fromtimestamp(row[TIME], UTC):%Y-%m-%d %H:%M:%S}"} for row in rows
    ]
    pyarrow.csv.write_csv(pa.Table.from_pylist(text), iso)
    scorer = load_random(tmp_path / "model.onnx", make_manifest(window=4), seed=1)
    from_numbers, from_iso = (
        replay_records(
            read_records(path, numeric_columns=scorer.manifest.numeric_columns),
            scorer,
            EngineOptions(max_batch=16),
        )
        for path in (numbers, iso)
    )
    assert (from_iso.statuses == Status.SCORED).sum() == 60
    np.testing.assert_array_equal(from_iso.times, from_numbers.times)
    np.testing.assert_array_equal(from_iso.scores, from_numbers.scores)


CONFIG = {
    "data": {
        "key": KEY,
        "time": TIME,
        "features": [{"name": "amount", "kind": "numeric"}],
    },
    "split": {"train": 0.5, "validation": 0.5, "test": 0.0},
    "model": {"window": 3, "min_history": 2, "task": "forecast"},
    "threshold": {"method": "quantile", "advanced": {}},
}


def _training_rows() -> list[dict]:
    return [
        {KEY: key, TIME: T0 + 300 * i + 7 * k, "amount": float(i * (k + 1))}
        for i in range(6)
        for k, key in enumerate(("a", "b"))
    ]


def test_training_reads_iso_times_in_every_format(tmp_path: Path) -> None:
    config = TrainConfig.model_validate(CONFIG)
    rows = _training_rows()
    numbers = tmp_path / "numbers.csv"
    pyarrow.csv.write_csv(pa.Table.from_pylist(rows), numbers)
    text = [row | {TIME: datetime.fromtimestamp(row[TIME], UTC).isoformat()} for row in rows]
    pyarrow.csv.write_csv(pa.Table.from_pylist(text), tmp_path / "iso.csv")
    typed = [row | {TIME: datetime.fromtimestamp(row[TIME], UTC)} for row in rows]
    pyarrow.parquet.write_table(pa.Table.from_pylist(typed), tmp_path / "typed.parquet")
    (tmp_path / "iso.jsonl").write_text("".join(json.dumps(row) + "\n" for row in text))
    expected = load_events(config, [numbers])
    for name in ("iso.csv", "typed.parquet", "iso.jsonl"):
        events = load_events(config, [tmp_path / name])
        np.testing.assert_array_equal(events.times, expected.times)
        np.testing.assert_array_equal(events.encoded, expected.encoded)


@pytest.mark.parametrize("absent", [TIME, KEY])
def test_a_missing_column_is_named_once_with_the_columns_there(tmp_path: Path, absent: str) -> None:
    rows = [{k: v for k, v in row.items() if k != absent} for row in _training_rows()]
    config = TrainConfig.model_validate(CONFIG)
    path = tmp_path / "events.csv"
    pyarrow.csv.write_csv(pa.Table.from_pylist(rows), path)
    present = ", ".join(repr(c) for c in rows[0])
    message = f"no column {absent!r} in the file; its columns: {present}"
    with pytest.raises(ValueError, match=message):
        read_records(path, required=(KEY, TIME))
    with pytest.raises(DataError, match=f"cannot read: {message}$"):
        load_events(config, [path])
    pyarrow.parquet.write_table(pa.Table.from_pylist(rows), tmp_path / "events.parquet")
    with pytest.raises(DataError, match=message):
        load_events(config, [tmp_path / "events.parquet"])
    # JSON lines may differ line by line: the first record without it is the error.
    (tmp_path / "events.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    reason = "bad_timestamp" if absent == TIME else "missing_key"
    with pytest.raises(
        DataError, match=f"row 1: {reason}: {absent!r} is missing \\(its fields: {present}\\)$"
    ):
        load_events(config, [tmp_path / "events.jsonl"])


def test_a_record_without_its_time_or_key_says_so() -> None:
    codec = FeatureCodec(make_manifest())
    record = event("a", T0, 1.0)
    with pytest.raises(RecordError, match=f"^bad_timestamp: {TIME!r} is missing$"):
        codec.decode({k: v for k, v in record.items() if k != TIME})
    with pytest.raises(RecordError, match=f"^missing_key: {KEY!r} is missing$"):
        codec.decode({k: v for k, v in record.items() if k != KEY})
    with pytest.raises(RecordError, match="must be a number or ISO 8601 string"):
        codec.decode(record | {TIME: True})
