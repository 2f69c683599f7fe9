"""`local-kafka java` and the latency benchmark's Java load generator, against the real broker:
every event arrives once, keyed and partitioned as kafka-python would, with its send time."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import orjson
from daemon_support import read_topic
from kafka.partitioner.default import murmur2
from kafka_support import TopicFactory

ROOT = Path(__file__).resolve().parents[2]
LOCAL_KAFKA = ROOT / "deploy" / "kafka" / "local-kafka"
GENERATOR = ROOT / "bench" / "LoadGenerator.java"


def test_events_arrive_once_keyed_and_timed_at_their_send(
    kafka_bootstrap: str, kafka_topic_factory: TopicFactory, tmp_path: Path
) -> None:
    topic = kafka_topic_factory(partitions=4)
    events = [(f"dev-{i % 7}", i) for i in range(200)]
    lines = tmp_path / "events"
    lines.write_text("".join(f'{key}\t,"n":{n}}}\n' for key, n in events))
    command = [sys.executable, str(LOCAL_KAFKA), "java", "--", "-XX:+UseSerialGC", str(GENERATOR)]
    started = time.time()
    done = subprocess.run(
        [*command, kafka_bootstrap, topic, str(lines), "1000", "device", "ts"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    finished = time.time()
    report = orjson.loads(done.stdout.splitlines()[-1])
    assert report["sent"] == 200
    assert report["seconds"] >= 0.19  # 200 events at 1,000 per second, the first at once

    messages = read_topic(kafka_bootstrap, topic, at_least=200)
    assert len(messages) == 200
    values = [m.json() for m in messages]
    assert sorted(v["n"] for v in values) == list(range(200))
    for message, value in zip(messages, values, strict=True):
        assert message.key.decode() == value["device"] == events[value["n"]][0]
        assert message.partition == (murmur2(message.key) & 0x7FFFFFFF) % 4
        assert started <= value["ts"] <= finished
    by_number = sorted(values, key=lambda v: v["n"])
    sent_at = [v["ts"] for v in by_number]
    assert sent_at == sorted(sent_at)  # sent in file order, each stamped at its send
    assert sent_at[-1] - sent_at[0] >= 0.19 - 0.001  # paced, not sent all at once


def test_java_without_a_program_is_refused() -> None:
    done = subprocess.run(
        [sys.executable, str(LOCAL_KAFKA), "java"], capture_output=True, text=True, check=False
    )
    assert done.returncode == 2
    assert "name a class or a .java source file" in done.stderr
