"""File replay on fixture models: event-time order, input-order results, `detector replay`."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import orjson
from onnx_fixtures import KEY, TIME

from detector.engine.core import Engine, Status
from detector.engine.records import InputRecord
from detector.files.replay import replay_records

T0 = 1_700_000_000


def readings(count: int) -> list[dict]:
    """Two devices; d1's temperature jumps at its 30th reading."""
    rng = np.random.default_rng(7)
    return [
        {
            KEY: f"d{i % 2}",
            TIME: T0 + i,
            "temperature": 20.0 + rng.normal() + (400.0 if i == 61 else 0.0),
            "pressure": 1.0 + 0.1 * rng.normal(),
        }
        for i in range(count)
    ]


def test_replay_scores_in_event_time_order_and_answers_in_input_order(load) -> None:
    scorer = load("forecast", "stateful")
    ordered = readings(80)
    shuffled = [ordered[i] for i in np.random.default_rng(0).permutation(len(ordered))]

    result = replay_records(shuffled, scorer)
    engine = Engine(scorer).process([InputRecord(orjson.dumps(r)) for r in ordered])

    position = {record[TIME]: row for row, record in enumerate(ordered)}
    back = np.array([position[record[TIME]] for record in shuffled])
    np.testing.assert_array_equal(result.scores, engine.scores[back])
    np.testing.assert_array_equal(result.statuses, engine.statuses[back])
    assert [a.alert_id for a in result.alerts] == [a.alert_id for a in engine.alerts]
    assert result.summary.events == 80 and result.summary.keys == 2


def test_detector_replay_writes_the_scores_and_alerts_of_a_csv_file(
    fixture_models: dict, tmp_path: Path
) -> None:
    """In a process of its own, as users run it (it configures process-wide logging)."""
    rows = readings(80)
    data = tmp_path / "readings.csv"
    with data.open("w", newline="") as out:
        writer = csv.DictWriter(out, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    model = fixture_models["forecast", "window"]
    scores, alerts = tmp_path / "scores.csv", tmp_path / "alerts.jsonl"

    inputs = ["--model", str(model), "--input", str(data), "--batch", "16"]
    outputs = ["--scores", str(scores), "--alerts", str(alerts)]
    run = subprocess.run(
        [sys.executable, "-m", "detector", "replay", *inputs, *outputs],
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert run.returncode == 0, run.stderr
    with scores.open() as file:
        written = list(csv.DictReader(file))
    assert [int(row["row"]) for row in written] == list(range(80))
    assert {row["status"] for row in written} == {"scored", "warming_up"}
    assert sum(row["status"] == Status.SCORED.name.lower() for row in written) == 78
    [alert] = [json.loads(line) for line in alerts.read_text().splitlines()]
    assert alert["key"] == "d1" and alert["event_time"] == T0 + 61
    assert alert["source"] == {"file": "readings.csv", "row": 61}
    assert "replay with model" in run.stdout
