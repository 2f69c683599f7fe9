"""`detector produce` and `detector tail-alerts`, run as commands against the real broker."""

from __future__ import annotations

import random
import re
import subprocess
import sys
from pathlib import Path

import orjson
import pyarrow as pa
import pyarrow.parquet
import pytest
from daemon_support import group_offsets, read_topic, send, write_csv
from model_factory import KEY, TIME, export_random, make_manifest

from detector.commands.tail_alerts import describe

pytestmark = pytest.mark.kafka


def detector(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "detector", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def produce(
    path: Path, topic: str, bootstrap: str, *options: str
) -> subprocess.CompletedProcess[str]:
    return detector(
        "produce",
        f"--input={path}",
        f"--topic={topic}",
        f"--bootstrap-servers={bootstrap}",
        *options,
    )


def rows(count: int) -> list[dict]:
    return [
        {"device": f"dev-{i % 3}", "ts": 1_704_067_200 + 60 * i, "temperature": 20.5 + i}
        for i in range(count)
    ]


def test_csv_goes_out_in_time_order_keyed_by_the_key_column(
    kafka_bootstrap, kafka_topic_factory, tmp_path
):
    topic = kafka_topic_factory(partitions=1, prefix="produce-csv")
    expected = rows(50)
    shuffled = random.Random(3).sample(expected, len(expected))
    path = write_csv(tmp_path / "events.csv", shuffled)
    result = produce(path, topic, kafka_bootstrap, "--key-column=device", "--time-column=ts")
    assert result.returncode == 0, result.stderr
    assert f"sent 50 records to {topic}" in result.stderr
    messages = read_topic(kafka_bootstrap, topic, at_least=50)
    assert [message.json() for message in messages] == expected
    assert [message.key for message in messages] == [row["device"].encode() for row in expected]


def test_json_lines_go_out_byte_for_byte_in_file_order(
    kafka_bootstrap, kafka_topic_factory, tmp_path
):
    topic = kafka_topic_factory(partitions=1, prefix="produce-jsonl")
    lines = [orjson.dumps(row) for row in rows(5)]
    lines.insert(2, b'{"device": "dev-9", broken')
    path = tmp_path / "events.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    result = produce(path, topic, kafka_bootstrap, "--key-column=device")
    assert result.returncode == 0, result.stderr
    messages = read_topic(kafka_bootstrap, topic, at_least=len(lines))
    assert [message.value for message in messages] == lines
    assert [message.key for message in messages] == [
        b"dev-0",
        b"dev-1",
        None,  # no key can be read from a malformed line
        b"dev-2",
        b"dev-0",
        b"dev-1",
    ]


def test_rate_limits_parquet_input(kafka_bootstrap, kafka_topic_factory, tmp_path):
    topic = kafka_topic_factory(partitions=1, prefix="produce-rate")
    expected = rows(40)
    path = tmp_path / "events.parquet"
    pyarrow.parquet.write_table(pa.Table.from_pylist(expected), path)
    result = produce(path, topic, kafka_bootstrap, "--rate=50")
    assert result.returncode == 0, result.stderr
    seconds = float(re.search(r"in ([\d.]+) s", result.stderr).group(1))
    assert seconds >= 0.75  # 40 records at 50 per second
    messages = read_topic(kafka_bootstrap, topic, at_least=40)
    assert [message.json() for message in messages] == expected
    assert {message.key for message in messages} == {None}


def test_unkeyed_records_for_several_partitions_are_refused_unless_asked_for(
    kafka_bootstrap, kafka_topic_factory, tmp_path
):
    topic = kafka_topic_factory(partitions=2, prefix="produce-unkeyed")
    path = write_csv(tmp_path / "events.csv", rows(10))
    refused = produce(path, topic, kafka_bootstrap, "--time-column=ts")
    assert refused.returncode == 2
    message = " ".join(refused.stderr.split())
    assert f"refusing to send unkeyed records to {topic}: its 2 partitions" in message
    assert "out of order" in message and "--no-key" in message
    assert group_offsets(kafka_bootstrap, "produce-check", topic)[1] == {0: 0, 1: 0}

    sent = produce(path, topic, kafka_bootstrap, "--time-column=ts", "--no-key")
    assert sent.returncode == 0, sent.stderr
    messages = read_topic(kafka_bootstrap, topic, at_least=10)
    assert len(messages) == 10 and {message.key for message in messages} == {None}


def test_the_model_names_the_key_and_time_columns(kafka_bootstrap, kafka_topic_factory, tmp_path):
    """With --model, records go out keyed by the model's key column in the order of its time
    column: each key's events in one partition, in time order."""
    model = export_random(tmp_path / "model.onnx", make_manifest())
    topic = kafka_topic_factory(partitions=2, prefix="produce-model")
    expected = [
        {KEY: f"acct-{i % 5}", TIME: 1_704_067_200 + 60 * i, "amount": 10.0 + i} for i in range(40)
    ]
    path = write_csv(tmp_path / "events.csv", random.Random(5).sample(expected, len(expected)))
    result = produce(path, topic, kafka_bootstrap, f"--model={model}")
    assert result.returncode == 0, result.stderr
    messages = read_topic(kafka_bootstrap, topic, at_least=40)
    assert [message.key for message in messages] == [
        message.json()[KEY].encode() for message in messages
    ]
    for partition in (0, 1):
        sent = [m.json() for m in messages if m.partition == partition]
        assert sent == sorted(sent, key=lambda document: document[TIME])
    assert sorted((m.json() for m in messages), key=lambda d: d[TIME]) == expected
    assert len({m.partition for m in messages}) == 2  # the check above spans both partitions


def test_produce_refuses_a_model_it_cannot_load(kafka_bootstrap, tmp_path):
    path = write_csv(tmp_path / "events.csv", rows(3))
    (tmp_path / "model.onnx").write_bytes(b"not a model")
    result = produce(path, "nowhere", kafka_bootstrap, f"--model={tmp_path / 'model.onnx'}")
    assert result.returncode == 2
    assert "refused model" in result.stderr


def test_produce_refuses_a_file_it_cannot_read(kafka_bootstrap, tmp_path):
    result = produce(tmp_path / "absent.csv", "nowhere", kafka_bootstrap)
    assert result.returncode == 2
    assert "cannot read" in result.stderr


def test_tail_alerts_prints_one_line_per_alert(kafka_bootstrap, kafka_topic_factory):
    topic = kafka_topic_factory(partitions=1, prefix="tail")
    alerts = [
        {
            "alert_id": f"id-{i}",
            "key": f"dev-{i}",
            "event_time": 1_704_067_200.0 + i,
            "score": 12.5 + i,
            "threshold": 4.0,
            "model_version": "abcdef012345",
            "explanation_kind": "forecast_error_share",
            "explanation": [
                {"feature": "temperature", "value": 0.9},
                {"feature": "vibration", "value": 0.1},
            ],
        }
        for i in range(2)
    ]
    alerts[1]["onset_time"] = alerts[1]["event_time"] - 90  # confirmed 90 s after it began
    send(kafka_bootstrap, topic, [orjson.dumps(a) for a in alerts], [b"dev-0", b"dev-1"])
    result = detector(
        "tail-alerts",
        f"--topic={topic}",
        f"--bootstrap-servers={kafka_bootstrap}",
        "--from-beginning",
        "--max=2",
        "--idle-timeout=20",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [describe(alert) for alert in alerts]
    assert describe(alerts[1]) == (
        "2024-01-01T00:00:01Z  dev-1  since 2023-12-31T23:58:31Z  score 13.5 >= 4  "
        "model abcdef012345  forecast_error_share: temperature 0.90, vibration 0.10"
    )
    assert describe(alerts[0]).startswith("2024-01-01T00:00:00Z  dev-0  score 12.5 >= 4  ")


def test_daemon_commands_are_registered():
    """The commands the demo script runs are listed by `detector --help`."""
    result = detector("--help")
    for command in ("run", "produce", "tail-alerts"):
        assert re.search(rf"^\s+{command}\s", result.stdout, re.MULTILINE), result.stdout
