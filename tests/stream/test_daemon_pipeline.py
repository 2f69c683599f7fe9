"""The pipelined round: outputs stay in flight while the next rounds are polled and scored,
and an offset is committed only once everything caused by the records before it is
acknowledged.

The ordering rules are checked on `InFlight` alone, with futures settled by hand; the
promise itself against the real broker, with an alerts topic that refuses every alert.
"""

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
from kafka import KafkaAdminClient, TopicPartition
from kafka.admin import NewTopic
from kafka.errors import KafkaTimeoutError
from kafka.future import Future
from kafka_support import client_config

from detector.engine.core import EngineOptions
from detector.engine.scorer import Scorer
from detector.files.replay import replay_records
from detector.stream.inflight import InFlight
from detector.stream.messages import Outgoing

P0, P1 = TopicPartition("events", 0), TopicPartition("events", 1)


def message(value: bytes) -> Outgoing:
    return Outgoing("alerts", None, value, [])


class Sends:
    """Records what `InFlight` sends; each send's future is settled by the test."""

    def __init__(self) -> None:
        self.futures: list[Future] = []

    def __call__(self, outgoing: Outgoing) -> Future:
        self.futures.append(Future())
        return self.futures[-1]


def test_rounds_are_released_in_order_and_a_failure_holds_back_every_later_round():
    sends = Sends()
    in_flight = InFlight(sends)
    in_flight.add([message(b"a")], {P0: 10})
    in_flight.add([message(b"b")], {P0: 20})
    in_flight.add([], {P1: 5})  # no output: committable as soon as the rounds before it
    sends.futures[1].success(None)
    assert in_flight.release() == ({}, [])  # the first round is not acknowledged yet
    sends.futures[0].failure(KafkaTimeoutError("no answer"))
    assert in_flight.release() == ({}, [])
    assert [type(error) for error in in_flight.failures()] == [KafkaTimeoutError]
    assert in_flight.resend() == 1 and not in_flight.failures() and in_flight.pending()
    assert len(sends.futures) == 3  # only the failed message went again
    sends.futures[2].success(None)
    offsets, acknowledged = in_flight.release()
    assert offsets == {P0: 20, P1: 5}
    assert [m.value for m in acknowledged] == [b"a", b"b"]
    assert len(in_flight) == 0


def test_the_records_of_the_rounds_in_flight_are_counted_until_they_are_released():
    sends = Sends()
    in_flight = InFlight(sends)
    in_flight.add([message(b"a")], {P0: 10}, records=10)
    in_flight.add([], {P0: 15}, records=5)
    assert in_flight.records == 15
    assert in_flight.release() == ({}, [])
    sends.futures[0].success(None)
    assert in_flight.release() == ({P0: 15}, [message(b"a")])
    assert in_flight.records == 0


def test_a_held_snapshot_is_made_and_sent_only_once_the_rounds_before_it_are_acknowledged():
    sends = Sends()
    in_flight = InFlight(sends)
    made: list[int] = []

    def snapshot() -> list[Outgoing]:
        made.append(len(sends.futures))
        return [message(b"snapshot")]

    in_flight.add([message(b"a")], {P0: 10}, records=10)
    in_flight.hold(snapshot)
    in_flight.add([], {P0: 20}, records=10)
    assert in_flight.release() == ({}, [])
    assert len(sends.futures) == 1 and made == []  # the snapshot waits for the round before it
    sends.futures[0].success(None)
    assert in_flight.release() == ({P0: 10}, [message(b"a")])
    assert len(sends.futures) == 2  # sent, and the round after it waits in turn
    assert made == [1]  # made once, when it reached the front
    sends.futures[1].success(None)
    assert in_flight.release() == ({P0: 20}, [message(b"snapshot")])
    assert len(in_flight) == 0 and made == [1]


def test_lost_partitions_leave_the_rounds_in_flight_without_their_offsets():
    sends = Sends()
    in_flight = InFlight(sends)
    in_flight.add([message(b"a")], {P0: 10, P1: 3})
    in_flight.drop([P0])
    sends.futures[0].success(None)
    assert in_flight.release() == ({P1: 3}, [message(b"a")])


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
        wait_for(lambda: retried(first) and records(first) > first_alert + 16, 60, "retries")
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
        wait_for(lambda: records(daemon) == len(events), 60, "every record processed")
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


def records(daemon: DaemonProcess) -> float:
    return sum(
        v for (name, _), v in daemon.metrics().items() if name == "seqsentinel_records_total"
    )


def retried(daemon: DaemonProcess) -> bool:
    return daemon.metrics().get(("seqsentinel_publish_retries_total", ()), 0) > 0
