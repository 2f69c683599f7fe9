"""An offset is committed only once everything caused by the records before it is
acknowledged, checked against a broker: an alerts topic that refuses every alert, and a long
commit interval (the ordering rules alone: tests/stream/test_daemon_pipeline.py)."""

from __future__ import annotations

import pytest
from daemon_support import (
    DaemonProcess,
    encoded,
    fully_committed,
    group_offsets,
    read_topic,
    replay_alert_ids,
    running,
    send_events,
    sensor_events,
    wait_for,
)
from kafka import KafkaAdminClient
from kafka.admin import NewTopic
from kafka_support import client_config

from detector.engine.core import EngineOptions
from detector.engine.scorer import Scorer
from detector.files.replay import replay_records


@pytest.mark.kafka
def test_an_alert_the_broker_refuses_is_never_committed_past(
    kafka_bootstrap, kafka_topic_factory, sensor_model, tmp_path
):
    """The first daemon's alerts topic refuses every alert (its messages are too large), so
    the round holding the first alert is never acknowledged: the daemon polls and scores
    later rounds, but the commit stays before that alert, also through the shutdown. The
    next daemon, with a working alerts topic, raises every alert an uninterrupted run does."""
    topic = kafka_topic_factory(partitions=1, prefix="refused")
    refusing = f"{topic}-refusing-alerts"
    admin = KafkaAdminClient(**client_config(kafka_bootstrap))
    try:
        tiny = {"max.message.bytes": "64"}
        admin.create_topics([NewTopic(refusing, 1, 1, topic_configs=tiny)], timeout_ms=30_000)
    finally:
        admin.close()
    events = encoded(sensor_events(6, 60, seed=7, faults=3))
    first_alert = first_alert_offset(sensor_model, events)
    settings = {
        "TOPICS__ALERTS": refusing,
        "BATCHING__MAX_BATCH": "16",  # many rounds: some in flight behind the refused one
        "PROCESSING__SHUTDOWN_TIMEOUT_S": "3",
    }
    first = DaemonProcess(kafka_bootstrap, topic, sensor_model, tmp_path, settings)
    with running(first):
        first.wait_ready()
        send_events(kafka_bootstrap, topic, events)
        wait_for(lambda: retried(first) and first.records() > first_alert + 16, 60, "retries")
        assert 0 < committed(kafka_bootstrap, first.group, topic) <= first_alert
        assert first.stop() == 1, first.tail()  # the shutdown could not settle the alert
    assert 0 < committed(kafka_bootstrap, first.group, topic) <= first_alert

    second = DaemonProcess(kafka_bootstrap, topic, sensor_model, tmp_path)
    with running(second):
        second.wait_ready()
        wait_for(lambda: fully_committed(kafka_bootstrap, second.group, topic), 60, "commit")
        assert second.stop() == 0, second.tail()
    alerts = read_topic(kafka_bootstrap, second.alerts_topic)
    assert {m.json()["alert_id"] for m in alerts} == replay_alert_ids(sensor_model, events)


@pytest.mark.kafka
def test_offsets_are_committed_at_most_once_per_interval_and_all_at_shutdown(
    kafka_bootstrap, kafka_topic_factory, sensor_model, tmp_path
):
    """With a commit interval of a minute, the first acknowledged round is committed at once
    and no later one until the shutdown, which commits everything (the interval itself:
    tests/stream/test_delivery.py)."""
    topic = kafka_topic_factory(partitions=1, prefix="interval")
    events = encoded(sensor_events(4, 30, seed=3))
    settings = {"KAFKA__COMMIT_INTERVAL_MS": "60000", "BATCHING__MAX_BATCH": "16"}
    daemon = DaemonProcess(kafka_bootstrap, topic, sensor_model, tmp_path, settings)
    with running(daemon):
        daemon.wait_ready()
        send_events(kafka_bootstrap, topic, events)
        wait_for(lambda: daemon.records() == len(events), 60, "every record processed")
        first = wait_for(lambda: committed(kafka_bootstrap, daemon.group, topic), 30, "a commit")
        assert first < len(events)  # every record processed, the later rounds not committed
        assert daemon.stop() == 0, daemon.tail()
    assert committed(kafka_bootstrap, daemon.group, topic) == len(events)


def first_alert_offset(model, events: list[bytes]) -> int:
    """The offset, in a fresh one-partition topic, of the first event that raises an alert."""
    scorer = Scorer.load(model, providers=["CPUExecutionProvider"])
    alerts = replay_records(events, scorer, EngineOptions()).alerts
    assert alerts, "the faulty devices must raise alerts for this test to mean much"
    return min(alert.source.row for alert in alerts)


def committed(bootstrap: str, group: str, topic: str) -> int:
    return group_offsets(bootstrap, group, topic)[0][0] or 0


def retried(daemon: DaemonProcess) -> bool:
    return daemon.metrics().get(("seqsentinel_publish_retries_total", ()), 0) > 0
