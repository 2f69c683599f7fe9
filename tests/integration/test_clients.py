"""The daemon's Kafka edge with each client library (`kafka.client`), against the real broker:
what `connect` opens sends, polls, pauses, seeks, commits and measures lag alike, so the
daemon's loop, the same for both, sees the same stream."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
from kafka import TopicPartition

from detector.config import Settings, load_settings
from detector.engine.records import PolledRecord
from detector.ops.http import Health
from detector.ops.metrics import Metrics
from detector.ops.supervisor import Supervisor
from detector.ops.systemd import SystemdNotifier
from detector.stream.connection import connect
from detector.stream.delivery import Offsets, Outputs
from detector.stream.messages import Outgoing
from detector.stream.source import GroupConsumer

pytestmark = pytest.mark.kafka

MESSAGES = 20
COMMITTED = 7


class Listener:
    """Records what the consumer reports of the group."""

    def __init__(self) -> None:
        self.assignment: set[TopicPartition] = set()

    def revoked(self, partitions: set[TopicPartition]) -> Offsets:
        return {}

    def revocation_committed(self, partitions: set[TopicPartition], error: object) -> None:
        self.assignment -= partitions

    def assigned(self, assignment: set[TopicPartition]) -> None:
        self.assignment = assignment

    def lost(self, partitions: set[TopicPartition]) -> None:
        self.assignment -= partitions


def settings_for(bootstrap: str, topic: str, client: str) -> Settings:
    return load_settings(
        kafka={"bootstrap_servers": bootstrap, "client": client, "group_id": f"group-{topic}"},
        topics={"input": topic, "alerts": f"{topic}-alerts", "dead_letters": f"{topic}-dead"},
    )


@pytest.fixture
def clients(kafka_bootstrap, kafka_topic_factory, kafka_client) -> Iterator[tuple]:
    """Connects, like the daemon, to a fresh one-partition input topic; closes what it opened."""
    settings = settings_for(kafka_bootstrap, kafka_topic_factory(partitions=1), kafka_client)
    opened: list[tuple[Outputs, GroupConsumer]] = []

    def open_clients() -> tuple[Outputs, GroupConsumer]:
        supervisor = Supervisor(Health(), SystemdNotifier(None), Metrics())
        connected = connect(settings, threading.Event(), supervisor)
        assert connected is not None
        opened.append(connected)
        return connected

    yield settings, open_clients
    for outputs, consumer in opened:
        consumer.close(5_000)
        outputs.close(5)


def poll_until(consumer: GroupConsumer, count: int, timeout: float = 30.0) -> list[PolledRecord]:
    records: list[PolledRecord] = []
    deadline = time.monotonic() + timeout
    while len(records) < count and time.monotonic() < deadline:
        records += [r for _, run in consumer.poll(200, 1_000) for r in run]
    return records


def test_sends_are_acknowledged_and_polled_back_keyed_in_order(clients):
    settings, open_clients = clients
    outputs, consumer = open_clients()
    topic = settings.topics.input
    sent = [(f"key-{i % 3}".encode(), f'{{"n": {i}}}'.encode()) for i in range(MESSAGES)]
    futures = [outputs.send(Outgoing(topic, key, value, [("h", b"v")])) for key, value in sent]
    outputs.flush(10)
    assert all(future.is_done and future.succeeded() for future in futures)
    assert outputs.partition_count(topic) == 1

    listener = Listener()
    consumer.subscribe(topic, listener)
    records = poll_until(consumer, MESSAGES)
    assert [(r.offset, r.key, r.payload) for r in records] == [
        (offset, key.decode(), value) for offset, (key, value) in enumerate(sent)
    ]
    partition = TopicPartition(topic, 0)
    assert {(r.topic, r.partition) for r in records} == {(topic, 0)}
    assert listener.assignment == consumer.assignment() == {partition}
    assert (consumer.beginning(partition), consumer.end(partition)) == (0, MESSAGES)
    assert consumer.lag({partition}, 5_000) == {partition: 0}


def test_a_paused_partition_resumes_from_the_offset_given(clients):
    settings, open_clients = clients
    outputs, consumer = open_clients()
    topic = settings.topics.input
    for i in range(MESSAGES):
        outputs.send(Outgoing(topic, b"k", str(i).encode(), []))
    outputs.flush(10)
    consumer.subscribe(topic, Listener())
    one = [r for _, run in consumer.poll(10_000, 1) for r in run]  # a poll takes at most that
    assert [r.offset for r in one] == [0]
    assert len(poll_until(consumer, MESSAGES - 1)) == MESSAGES - 1
    partition = TopicPartition(topic, 0)
    consumer.pause({partition})
    outputs.send(Outgoing(topic, b"k", b"later", []))
    outputs.flush(10)
    assert poll_until(consumer, 1, timeout=2.0) == []
    consumer.resume(partition, 3)
    records = poll_until(consumer, MESSAGES - 3 + 1)
    assert [r.offset for r in records] == list(range(3, MESSAGES + 1))
    assert records[-1].payload == b"later"


def test_a_new_member_resumes_at_the_committed_offset(clients):
    settings, open_clients = clients
    outputs, consumer = open_clients()
    topic = settings.topics.input
    for i in range(MESSAGES):
        outputs.send(Outgoing(topic, None, str(i).encode(), []))
    outputs.flush(10)
    consumer.subscribe(topic, Listener())
    records = poll_until(consumer, MESSAGES)
    assert [r.key for r in records] == [None] * MESSAGES
    partition = TopicPartition(topic, 0)
    outcome: list[object] = []
    consumer.commit_async({partition: 4}, lambda offsets, error: outcome.append(error))
    while not outcome:
        consumer.poll(100, 1)  # the outcome comes back inside a later poll
    assert outcome == [None]
    consumer.commit({partition: COMMITTED}, 5_000)
    assert consumer.committed(partition) == COMMITTED
    consumer.close(5_000)

    _, successor = open_clients()
    successor.subscribe(topic, Listener())
    resumed = poll_until(successor, MESSAGES - COMMITTED)
    assert [r.payload for r in resumed] == [str(i).encode() for i in range(COMMITTED, MESSAGES)]
