"""`trainer retrain --from-kafka`: the job reads a topic's time range and joins labels from
another topic by event id."""

from __future__ import annotations

import time

import orjson
import pytest
from daemon_support import send
from kafka import KafkaProducer
from kafka_support import client_config
from retrain_support import KEY, LABEL, lines, retrain, write_config


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
