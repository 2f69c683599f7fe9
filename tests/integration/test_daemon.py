"""`detector run` against the real local broker: the data path, rebalances and outages
(crashes: test_exactly_once.py).

The daemon runs as a real subprocess with a small model trained for the session; what it
publishes is compared with what `detector replay` gives for the same events and model.
"""

from __future__ import annotations

import threading
import time

import orjson
import pytest
from daemon_support import (
    DaemonProcess,
    encoded,
    fully_committed,
    group_offsets,
    read_topic,
    replay_alert_ids,
    running,
    send,
    send_events,
    sensor_events,
    wait_for,
)
from kafka_support import LocalBroker, TopicFactory

from detector.contract.model_file import load_model_file

pytestmark = pytest.mark.kafka

#: How long the broker stays stopped in the outage test; its restart adds about 8 s more.
OUTAGE_S = 8.0

#: (Kafka key, value, the reason the engine gives it).
MALFORMED: list[tuple[bytes | None, bytes, str]] = [
    (b"dev-7-00", b"{not json", "not_json"),
    (b"dev-7-01", b"[1, 2, 3]", "not_object"),
    (
        b"dev-7-02",
        b'{"device": "dev-7-02", "ts": "yesterday", "temperature": 1, "vibration": 2}',
        "bad_timestamp",
    ),
    (
        b"dev-7-03",
        b'{"device": "dev-7-03", "ts": 1704067300, "temperature": "hot", "vibration": 2}',
        "wrong_type",
    ),
    (
        b"dev-7-04",
        b'{"device": "dev-7-04", "ts": 1704067300, "temperature": 20}',
        "missing_feature",
    ),
    (None, b'{"ts": 1704067300, "temperature": 20, "vibration": 2}', "missing_key"),
]


def faulty_events() -> list[bytes]:
    return encoded(sensor_events(6, 60, seed=7, faults=3))


@pytest.fixture(scope="module")
def served(
    kafka_bootstrap, kafka_topic_factory, sensor_model, tmp_path_factory, kafka_client
) -> dict:
    """One daemon run over good and malformed events on two partitions, stopped with SIGTERM."""
    topic = kafka_topic_factory(partitions=2, prefix="daemon")
    good = faulty_events()
    send_events(kafka_bootstrap, topic, good[:150])
    send(kafka_bootstrap, topic, [v for _, v, _ in MALFORMED], [k for k, _, _ in MALFORMED])
    send_events(kafka_bootstrap, topic, good[150:])
    daemon = DaemonProcess(
        kafka_bootstrap, topic, sensor_model, tmp_path_factory.mktemp("run"), client=kafka_client
    )
    expected = replay_alert_ids(sensor_model, good)
    with running(daemon):
        daemon.wait_ready()
        wait_for(lambda: fully_committed(kafka_bootstrap, daemon.group, topic), 60, "the commit")
        alerts = read_topic(kafka_bootstrap, daemon.alerts_topic, at_least=len(expected))
        dead = read_topic(kafka_bootstrap, daemon.dead_letters_topic, at_least=len(MALFORMED))
        wait_for(
            lambda: daemon.metrics().get(("seqsentinel_consumer_lag", _partition(topic, 1))) == 0,
            15,
            "the lag probe",
        )
        metrics = daemon.metrics()
        status = daemon.stop()
    return {
        "topic": topic,
        "good": good,
        "expected": expected,
        "alerts": alerts,
        "dead": dead,
        "metrics": metrics,
        "status": status,
        "daemon": daemon,
        "offsets": group_offsets(kafka_bootstrap, daemon.group, topic),
    }


def _partition(topic: str, number: int) -> tuple[tuple[str, str], ...]:
    return (("partition", str(number)), ("topic", topic))


def _outcome(name: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    return ("seqsentinel_records_total", (("outcome", name),))


def test_alerts_are_the_ones_replay_gives(served, sensor_model):
    alerts = [message.json() for message in served["alerts"]]
    version = load_model_file(sensor_model)[0].model_version
    assert served["expected"], "the faulty devices must raise alerts for this test to mean much"
    assert {alert["alert_id"] for alert in alerts} == served["expected"]
    assert len(alerts) == len(served["expected"])  # no duplicates without a crash
    for message, alert in zip(served["alerts"], alerts, strict=True):
        assert message.key == alert["key"].encode()
        assert alert["model_version"] == version
        assert alert["source"]["topic"] == served["topic"]
    # Faults were injected into the first three devices: each of them is caught.
    assert {f"dev-7-{k:02d}" for k in range(3)} <= {alert["key"] for alert in alerts}


def test_every_malformed_record_is_a_dead_letter_with_its_reason(served):
    dead = served["dead"]
    assert len(dead) == len(MALFORMED)
    by_value = {message.value: message for message in dead}
    for _, value, reason in MALFORMED:
        message = by_value[value]  # the original bytes, untouched
        assert message.headers["reason"].decode() == reason
        assert message.headers["detail"]
        assert message.headers["source_topic"].decode() == served["topic"]
        assert int(message.headers["source_partition"]) in (0, 1)
        assert int(message.headers["source_offset"]) >= 0


def test_metrics_count_what_was_sent(served):
    metrics, good = served["metrics"], served["good"]
    scored = metrics[_outcome("scored")]
    warming_up = metrics[_outcome("warming_up")]
    assert scored + warming_up == len(good)
    assert warming_up == 6 * 3  # six devices, min_history 4: three events each before scoring
    assert metrics[_outcome("dead_letter")] == len(MALFORMED)
    assert metrics[_outcome("skipped")] == 0
    assert metrics[("seqsentinel_alerts_total", ())] == len(served["expected"])
    assert metrics[("seqsentinel_alert_latency_seconds_count", ())] == len(served["expected"])
    assert metrics[("seqsentinel_active_keys", ())] == 6
    assert metrics[("seqsentinel_batch_records_sum", ())] == len(good) + len(MALFORMED)
    for partition in (0, 1):
        assert metrics[("seqsentinel_consumer_lag", _partition(served["topic"], partition))] == 0


def test_sigterm_exits_zero_after_committing_everything(served):
    assert served["status"] == 0, served["daemon"].tail()
    committed, ends = served["offsets"]
    assert committed == ends
    assert sum(ends.values()) == len(served["good"]) + len(MALFORMED)
    events = [event["event"] for event in served["daemon"].log_events()]
    assert "stopped; every processed record is committed" in events


def test_a_revocation_commits_the_records_in_hand_so_none_is_scored_twice(
    kafka_bootstrap, kafka_topic_factory, sensor_model, tmp_path, kafka_client
):
    topic = kafka_topic_factory(partitions=4, prefix="rebalance")
    events = encoded(sensor_events(8, 60, seed=11))
    # The first member collects for seconds, so it has records in hand when the second joins.
    first = DaemonProcess(
        kafka_bootstrap,
        topic,
        sensor_model,
        tmp_path,
        settings={"BATCHING__MAX_LATENCY_MS": "4000"},
        client=kafka_client,
    )
    second = DaemonProcess(kafka_bootstrap, topic, sensor_model, tmp_path, client=kafka_client)
    chunks = [events[i : i + 40] for i in range(0, len(events), 40)]

    def send_slowly() -> None:  # over several seconds, while the second member joins
        for chunk in chunks:
            send_events(kafka_bootstrap, topic, chunk)
            time.sleep(0.5)

    sender = threading.Thread(target=send_slowly)
    with running(first):
        first.wait_ready()
        sender.start()
        with running(second):
            second.wait_ready()
            sender.join()
            wait_for(lambda: fully_committed(kafka_bootstrap, first.group, topic), 60, "commit")
            counts = [daemon.records() for daemon in (first, second)]
            assert second.stop() == 0
        assert first.stop() == 0
    assert sum(counts) == len(events)  # every record scored exactly once between the two
    assert all(counts), counts  # and both had partitions
    logged = [line["event"] for line in first.log_events()]
    assert "settled the records in hand before a revocation" in logged
    assert "commit before revocation failed" not in logged


@pytest.mark.slow
def test_broker_outage_mid_stream_loses_no_alert(sensor_model, tmp_path_factory, kafka_client):
    broker = LocalBroker(tmp_path_factory.mktemp("outage-broker"))
    broker.start()
    topics = TopicFactory(broker.bootstrap)
    try:
        topic = topics(partitions=1, prefix="outage")
        good = faulty_events()
        thirds = [good[:120], good[120:240], good[240:]]
        daemon = DaemonProcess(
            broker.bootstrap, topic, sensor_model, tmp_path_factory.mktemp("o"), client=kafka_client
        )
        with running(daemon):
            daemon.wait_ready()
            send_events(broker.bootstrap, topic, thirds[0])
            wait_for(lambda: fully_committed(broker.bootstrap, daemon.group, topic), 60, "commit")
            # The second third arrives just before the broker goes: the daemon is scoring,
            # publishing or committing it while the broker stops.
            send_events(broker.bootstrap, topic, thirds[1])
            broker.stop()
            down_since = time.monotonic()
            status, body = wait_for(lambda: _not_ready(daemon), 90, "/readyz to report it")
            assert status == 503 and "broker" in orjson.loads(body)["reason"]
            time.sleep(max(0.0, OUTAGE_S - (time.monotonic() - down_since)))
            assert daemon.get("/healthz")[0] == 200  # alive: waiting is not being stuck
            assert _not_ready(daemon)
            broker.start()
            daemon.wait_ready(90)
            send_events(broker.bootstrap, topic, thirds[2])
            wait_for(lambda: fully_committed(broker.bootstrap, daemon.group, topic), 90, "commit")
            assert daemon.stop() == 0, daemon.tail()
        alerts = read_topic(broker.bootstrap, daemon.alerts_topic)
        received = {message.json()["alert_id"] for message in alerts}
        assert replay_alert_ids(sensor_model, good) == received  # none lost, keys continued
    finally:
        topics.close()
        broker.stop()


def _not_ready(daemon: DaemonProcess) -> tuple[int, bytes] | None:
    status, body = daemon.get("/readyz")
    return (status, body) if status == 503 else None
