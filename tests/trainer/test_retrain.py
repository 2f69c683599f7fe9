"""`trainer retrain` end to end: tiny classifiers trained for real on synthetic card payments,
judged through the detector's engine, promoted or kept, from files and from a real topic."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.csv as pa_csv
import pytest
from daemon_support import send
from kafka import KafkaProducer
from kafka_support import client_config

from trainer.cli import main
from trainer.synth import transactions

KEY, LABEL = "customer_id", "is_fraud"
#: Small enough to train in a few seconds on two cores, good enough to beat a network that
#: barely moved from its random start.
TINY = {
    "hidden = 32": "hidden = 8",
    "epochs = 20": "epochs = 4",
    "max_windows = 60000": 'device = "cpu"',
    "learning_rate = 0.005": "learning_rate = 0.02",
}
HOPELESS = {"learning_rate = 0.005": "learning_rate = 0.000001"}


@pytest.fixture(scope="module")
def payments(tmp_path_factory: pytest.TempPathFactory) -> tuple[pa.Table, str]:
    dataset = transactions(keys=40, days=20, seed=0)
    return pa.concat_tables([dataset.train, dataset.test]), dataset.config


def write_config(folder: Path, text: str, changes: dict[str, str], name: str) -> Path:
    for old, new in (TINY | changes).items():
        assert old in text
        text = text.replace(old, new)
    path = folder / name
    path.write_text(text)
    return path


def retrain(config: Path, champion: Path, report: Path, *source: str) -> tuple[int, dict]:
    argv = ["retrain", "--config", str(config), *source, "--champion", str(champion)]
    argv += ["--promote-to", str(champion), "--report", str(report), "--no-progress"]
    status = main(argv)
    path = report / "report.json"
    return status, json.loads(path.read_text()) if path.exists() else {}


def lines(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


def test_first_run_promotes_then_a_worse_challenger_is_kept(payments, tmp_path):
    table, text = payments
    data = tmp_path / "events.csv"
    pa_csv.write_csv(table, data)
    served = tmp_path / "models" / "model.onnx"
    first, second = tmp_path / "run-1", tmp_path / "run-2"

    status, report = retrain(
        write_config(tmp_path, text, {}, "good.toml"), served, first, "--data", str(data)
    )

    assert status == 0
    assert (report["decision"], report["champion"]) == ("promoted", None)
    assert served.read_bytes() == (first / "challenger.onnx").read_bytes()
    parts = report["data"]
    train, holdout = parts["train_part"], parts["holdout_part"]
    assert train["events"] + holdout["events"] == parts["records"] == table.num_rows
    assert holdout["events"] == pytest.approx(0.2 * table.num_rows, abs=2)
    assert train["to"] < parts["cutoff"] <= holdout["from"]
    held = lines(first / "holdout.jsonl")
    assert len(lines(first / "train.jsonl")) == train["events"]
    assert len(held) == parts["context_events"] + holdout["events"]
    assert all(LABEL not in record for record in held[: parts["context_events"]])
    assert sum(record[LABEL] for record in held[parts["context_events"] :]) == holdout["positives"]
    assert (first / "report.md").read_text().startswith("# Retraining: promoted")

    hopeless = write_config(tmp_path, text, HOPELESS, "hopeless.toml")
    status, report = retrain(hopeless, served, second, "--data", str(data), "--epochs", "1")

    assert status == 3
    assert report["decision"] == "kept"
    champion, challenger = report["champion"], report["challenger"]
    assert champion["model_version"] == report_version(first)
    assert challenger["value"] < champion["value"] - 0.1
    assert report["data"]["cutoff"] == parts["cutoff"]  # both judged on the same slice
    assert served.read_bytes() == (first / "challenger.onnx").read_bytes()
    assert not served.with_name("model.onnx.previous").exists()


def report_version(folder: Path) -> str:
    return json.loads((folder / "report.json").read_text())["challenger"]["model_version"]


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--holdout", "1000d"], "leaves nothing to train on"),
        (["--holdout", "0.001"], "need positive and negative labels"),
        (["--labels", "labels.csv"], "--labels needs --label-id-column"),
        (["--champion", "corrupt.onnx"], "the champion is refused"),
    ],
)
def test_bad_input_exits_2_before_training(payments, tmp_path, capsys, arguments, message):
    table, text = payments
    data = tmp_path / "events.csv"
    pa_csv.write_csv(table, data)
    (tmp_path / "corrupt.onnx").write_bytes(b"not a model")
    config = write_config(tmp_path, text, {}, "retrain.toml")
    argv = ["retrain", "--config", str(config), "--data", str(data)]
    argv += ["--champion", str(tmp_path / "none.onnx"), "--promote-to", str(tmp_path / "m.onnx")]
    argv += [str(tmp_path / a) if a.endswith((".onnx", ".csv")) else a for a in arguments]

    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.kafka
def test_retrain_from_a_topic_reads_its_time_range_and_joins_labels_by_event_id(
    payments, kafka_bootstrap, kafka_topic_factory, tmp_path
):
    table, text = payments
    # Kept for good: the broker's 7-day retention would drop backdated segments at its next
    # check (every 5 minutes), and with them the start of the range.
    events = kafka_topic_factory(partitions=2, configs={"retention.ms": "-1"})
    labels = kafka_topic_factory(prefix="labels")
    rows = table.to_pylist()
    # The events end an hour ago; what came 40 days ago is outside --since and never read.
    shift = time.time() - 3600 - max(row["ts"] for row in rows)
    producer = KafkaProducer(acks="all", **client_config(kafka_bootstrap))
    old_ms = int((time.time() - 40 * 86_400) * 1000)
    for partition in (0, 1):
        producer.send(events, value=b"old, unreadable", partition=partition, timestamp_ms=old_ms)
    for number, row in enumerate(rows):
        # The label travels separately; the key only as the message key.
        value = {k: v for k, v in row.items() if k not in (KEY, LABEL)}
        value |= {"ts": row["ts"] + shift, "event_id": f"e{number}"}
        key = str(row[KEY]).encode()
        producer.send(
            events, value=orjson.dumps(value), key=key, timestamp_ms=int(value["ts"] * 1e3)
        )
    producer.flush(timeout=30)
    producer.close()
    fraud = [{"event_id": f"e{n}", LABEL: 1} for n, row in enumerate(rows) if row[LABEL]]
    send(kafka_bootstrap, labels, [orjson.dumps(label) for label in fraud], [None] * len(fraud))
    config = write_config(tmp_path, text, {}, "retrain.toml")
    served = tmp_path / "models" / "model.onnx"
    source = ["--from-kafka", events, "--bootstrap-servers", kafka_bootstrap, "--since", "30d"]
    source += ["--labels", f"topic:{labels}", "--label-id-column", "event_id"]

    status, report = retrain(config, served, tmp_path / "report", *source)

    assert status == 0
    data = report["data"]
    read = data["source"]["kafka"]["partitions"]
    assert {p: span["start"] for p, span in read.items()} == {"0": 1, "1": 1}
    assert sum(span["end"] - span["start"] for span in read.values()) == len(rows)
    assert (data["records"], data["rejected"]) == (len(rows), {})
    parts = data["train_part"], data["holdout_part"]
    assert sum(part["positives"] for part in parts) == len(fraud)
    assert sum(part["keys"] for part in parts) >= len({row[KEY] for row in rows})
    trained = lines(tmp_path / "report" / "train.jsonl")
    assert {record[KEY] for record in trained} <= {str(row[KEY]) for row in rows}
    assert served.exists()
