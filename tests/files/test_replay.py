"""File replay: event-time order, input-order results, and the two commands end to end."""

from __future__ import annotations

import csv
import json
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.parquet
import pytest
from cli_support import intra_op_threads, spy_on_scorer_loads
from model_factory import KEY, TIME, event, export_random, make_manifest

from detector.cli import main
from detector.commands.manifest_tables import describe
from detector.contract.manifest import NumericFeature
from detector.engine.core import Engine, EngineOptions, Status
from detector.engine.records import InputRecord
from detector.engine.scorer import Scorer
from detector.files.readers import read_records
from detector.files.replay import replay_records

T0 = 1_700_000_000


@pytest.fixture(autouse=True)
def keep_logging(monkeypatch: pytest.MonkeyPatch) -> None:
    """`detector replay` configures process-wide logging; the other tests need theirs."""
    monkeypatch.setattr("detector.ops.logs.configure_logging", lambda: None)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("replay") / "model.onnx"
    return export_random(path, make_manifest(min_history=2, threshold=0.45), seed=2)


def shuffled_events(count: int = 60) -> list[dict]:
    """Events of 4 keys whose file order is not their time order."""
    rng = np.random.default_rng(7)
    times = T0 + rng.permutation(count) * 5
    return [
        event(f"k{i % 4}", int(t), float(rng.normal(50, 30)), int(rng.integers(0, 4)))
        for i, t in enumerate(times)
    ]


BAD_ROWS = [
    {KEY: "k1", TIME: "not a time", "amount": 1.0, "items": 1, "merchant": "fuel"},
    {KEY: "k2", TIME: T0 + 3, "amount": None, "items": 1, "merchant": "fuel"},
]


def test_replay_scores_in_time_order_and_reports_in_input_order(model: Path) -> None:
    scorer = Scorer.load(model)
    records = shuffled_events() + BAD_ROWS
    progress: list[tuple[int, int]] = []
    result = replay_records(
        records, scorer, EngineOptions(max_batch=16), progress=lambda *p: progress.append(p)
    )
    order = sorted(range(60), key=lambda i: records[i][TIME])
    direct = Engine(scorer).process([InputRecord(records[i]) for i in order])
    np.testing.assert_allclose(result.scores[order], direct.scores, rtol=1e-6)
    np.testing.assert_array_equal(result.rows, np.arange(62))
    assert list(result.keys[:60]) == [r[KEY] for r in records[:60]]
    np.testing.assert_array_equal(result.times[:60], [r[TIME] for r in records[:60]])
    assert [letter.reason for letter in result.dead_letters] == ["missing_feature", "bad_timestamp"]
    assert [letter.source.row for letter in result.dead_letters] == [61, 60]
    assert (result.statuses[60:] == Status.DEAD_LETTER).all()
    summary = result.summary
    assert (summary.events, summary.keys, summary.dead_letters) == (62, 4, 2)
    assert summary.scored + summary.warming_up == 60 and summary.warming_up == 4
    assert progress[-1] == (62, 62) and len(progress) == 4
    assert summary.alerts == len(result.alerts) > 0


def write_csv(path: Path, events: list[dict]) -> Path:
    with path.open("w", newline="") as out:
        writer = csv.DictWriter(out, fieldnames=list(events[0]))
        writer.writeheader()
        writer.writerows(events)
    return path


def write_inputs(folder: Path) -> tuple[Path, Path]:
    events = shuffled_events() + BAD_ROWS
    csv_path = write_csv(folder / "events.csv", events)
    jsonl_path = folder / "events.jsonl"
    lines = [orjson.dumps(e) for e in events[:-1]] + [b"{broken", orjson.dumps(events[-1])]
    jsonl_path.write_bytes(b"\n".join(lines) + b"\n")
    return csv_path, jsonl_path


def replay(model: Path, source: Path, folder: Path, *extra: str) -> dict:
    outputs = {name: folder / f"{source.stem}.{name}" for name in ("scores", "alerts", "dead")}
    status = main(
        [
            "replay",
            "--model",
            str(model),
            "--input",
            str(source),
            "--scores",
            str(outputs["scores"]),
            "--alerts",
            str(outputs["alerts"]),
            "--dead-letters",
            str(outputs["dead"]),
            "--batch",
            "8",
            *extra,
        ]
    )
    assert status == 0
    with outputs["scores"].open() as scores:
        rows = list(csv.DictReader(scores))
    lines = {name: outputs[name].read_text().splitlines() for name in ("alerts", "dead")}
    return {
        "scores": rows,
        "alerts": [json.loads(line) for line in lines["alerts"]],
        "dead": [json.loads(line) for line in lines["dead"]],
    }


def test_replay_command_writes_scores_alerts_and_dead_letters(
    model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    csv_path, jsonl_path = write_inputs(tmp_path)
    from_csv = replay(model, csv_path, tmp_path)
    assert "dead letters" in capsys.readouterr().out
    from_jsonl = replay(model, jsonl_path, tmp_path)

    rows = from_csv["scores"]
    assert [int(row["row"]) for row in rows] == list(range(62))
    assert [row["key"] for row in rows[:60]] == [e[KEY] for e in shuffled_events()]
    assert {row["status"] for row in rows[:60]} == {"scored", "warming_up"}
    assert [row["status"] for row in rows[60:]] == ["dead_letter"] * 2
    assert all(row["score"] == "" for row in rows if row["status"] != "scored")
    scored = [float(row["score"]) for row in rows if row["status"] == "scored"]
    assert len(scored) == 56 and all(0.0 < s < 1.0 for s in scored)
    # The same events give the same scores and the same alert ids from either format.
    assert [row["score"] for row in from_jsonl["scores"][:60]] == [
        row["score"] for row in rows[:60]
    ]
    assert [a["alert_id"] for a in from_jsonl["alerts"]] == [
        a["alert_id"] for a in from_csv["alerts"]
    ]
    alert = from_csv["alerts"][0]
    assert alert["score"] >= alert["threshold"] == 0.45
    assert alert["source"]["file"] == "events.csv"
    assert alert["explanation_kind"] == "occlusion" and len(alert["explanation"]) == 4

    # Processing order: the missing amount at T0 + 3 first, unreadable times at the end.
    assert [(d["reason"], d["source"]["row"]) for d in from_csv["dead"]] == [
        ("missing_feature", 61),
        ("bad_timestamp", 60),
    ]
    assert [(d["reason"], d["source"]["row"]) for d in from_jsonl["dead"]] == [
        ("missing_feature", 62),
        ("bad_timestamp", 60),
        ("not_json", 61),
    ]
    assert from_jsonl["dead"][2]["payload"] == "{broken"


def test_replay_options_threshold_and_stride(model: Path, tmp_path: Path) -> None:
    csv_path, _ = write_inputs(tmp_path)
    outputs = replay(model, csv_path, tmp_path, "--threshold", "2", "--stride", "2")
    statuses = [row["status"] for row in outputs["scores"]]
    assert statuses.count("skipped_by_stride") == 28 and statuses.count("scored") == 28
    assert outputs["alerts"] == []


def test_refused_models_exit_2_with_a_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"nonsense")
    csv_path, _ = write_inputs(tmp_path)
    assert main(["replay", "--model", str(bad), "--input", str(csv_path)]) == 2
    assert "refused model" in capsys.readouterr().err
    assert main(["inspect-model", str(bad)]) == 2


def test_inspect_model_shows_the_manifest(model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect-model", str(model), "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["providers"][-1] == "CPUExecutionProvider"
    assert document["manifest"]["task"] == "classify"
    assert document["model_version"] == Scorer.load(model).manifest.model_version
    assert main(["inspect-model", str(model)]) == 0
    text = capsys.readouterr().out
    assert document["model_version"] in text and "merchant" in text


def test_inspect_model_names_the_features_used_as_they_are() -> None:
    assert describe(NumericFeature(name="flag", forecast=False, scale="none")) == (
        "mean 0, std 1, missing: reject, not scaled"
    )
    assert "scaled" not in describe(NumericFeature(name="amount"))


def test_parquet_timestamps_and_bad_csv_cells_are_read_as_the_codec_expects(
    tmp_path: Path,
) -> None:
    parquet_path = tmp_path / "events.parquet"
    moment = datetime(2024, 5, 1, 12, 30, tzinfo=UTC)
    table = pa.table({KEY: ["a"], TIME: pa.array([moment], pa.timestamp("ms", "UTC"))})
    pyarrow.parquet.write_table(table, parquet_path)
    (record,) = read_records(parquet_path)
    assert datetime.fromisoformat(record[TIME]) == moment

    csv_path = tmp_path / "events.csv"
    csv_path.write_text(f"{KEY},{TIME},amount\na,{T0},1.5\nb,{T0 + 1},oops\n")
    rows = read_records(csv_path, numeric_columns=[TIME, "amount"])
    assert rows == [
        {KEY: "a", TIME: T0, "amount": 1.5},
        {KEY: "b", TIME: float(T0 + 1), "amount": "oops"},
    ]


def test_one_malformed_csv_cell_costs_one_record(model: Path, tmp_path: Path) -> None:
    """CSV cells are untyped: a word among numbers must not turn the column into text."""
    events = shuffled_events(20)
    events[5] = {**events[5], "amount": "twelve"}
    outputs = replay(model, write_csv(tmp_path / "events.csv", events), tmp_path)
    assert [(d["reason"], d["source"]["row"]) for d in outputs["dead"]] == [("wrong_type", 5)]
    statuses = [row["status"] for row in outputs["scores"]]
    assert statuses.count("dead_letter") == 1
    assert statuses.count("scored") + statuses.count("warming_up") == 19


def stderr_text(capsys: pytest.CaptureFixture[str]) -> str:
    """stderr with rich's line breaks undone."""
    return " ".join(capsys.readouterr().err.split())


def test_nothing_scored_because_every_record_is_a_dead_letter_exits_2(
    model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = write_csv(tmp_path / "bad.csv", BAD_ROWS * 3)
    dead = tmp_path / "dead.jsonl"

    status = main(
        ["replay", "--model", str(model), "--input", str(source), "--dead-letters", str(dead)]
    )

    assert status == 2
    assert (
        "nothing was scored: 6 of 6 records are dead letters (missing_feature 3, bad_timestamp 3)"
        in stderr_text(capsys)
    )
    assert len(dead.read_text().splitlines()) == 6  # written all the same, to see why


def test_nothing_scored_because_every_key_is_warming_up_exits_2(
    model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = write_csv(tmp_path / "short.csv", shuffled_events(4))  # one event for each key

    assert main(["replay", "--model", str(model), "--input", str(source)]) == 2
    assert (
        "4 events were their key's warm-up (a key is scored once it has 2 events)"
        in stderr_text(capsys)
    )


def test_a_high_share_of_dead_letters_warns(
    model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    many = replay(
        model, write_csv(tmp_path / "many.csv", shuffled_events() + BAD_ROWS * 5), tmp_path
    )
    warned = stderr_text(capsys)
    replay(model, write_csv(tmp_path / "few.csv", shuffled_events() + BAD_ROWS), tmp_path)

    assert len(many["dead"]) == 10
    assert (
        "warning: 10 of 70 records (14%) are dead letters: missing_feature 5, bad_timestamp 5"
        in warned
    )
    assert "warning" not in stderr_text(capsys)  # 2 of 62: 3 %


@pytest.mark.parametrize(("option", "threads"), [([], 0), (["--threads", "1"], 1)])
def test_threads_option_sets_onnxruntime_intra_op_threads(
    model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, option: list[str], threads: int
) -> None:
    loaded = spy_on_scorer_loads(monkeypatch)
    csv_path, _ = write_inputs(tmp_path)
    replay(model, csv_path, tmp_path, *option)

    assert [intra_op_threads(scorer) for scorer in loaded] == [threads]


def test_threads_option_refuses_negative_counts(
    model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["replay", "--model", str(model), "--input", "x.csv", "--threads", "-1"])

    assert exit_info.value.code == 2
    assert "--threads: must be at least 0" in capsys.readouterr().err


@pytest.mark.parametrize("absent", [KEY, TIME])
def test_a_file_without_the_models_key_or_time_column_is_refused_naming_it(
    model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], absent: str
) -> None:
    rows = [
        {name: value for name, value in row.items() if name != absent} for row in shuffled_events()
    ]
    source = write_csv(tmp_path / "columns.csv", rows)

    assert main(["replay", "--model", str(model), "--input", str(source)]) == 2
    message = " ".join(stderr_text(capsys).split())
    assert f"cannot replay: no column {absent!r} in the file; its columns:" in message
