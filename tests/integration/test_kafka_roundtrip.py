"""Round trip through the real local broker with kafka-python: produce, consume in a group,
commit a prefix, and check that the group resumes exactly at the committed offset."""

from __future__ import annotations

import time

import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.structs import OffsetAndMetadata
from kafka_support import PINNED_API_VERSION, client_config

from detector.config import load_settings
from detector.stream.clients import make_producer

pytestmark = pytest.mark.kafka

MESSAGES = 20
COMMITTED = 7


def consume(consumer: KafkaConsumer, count: int, timeout: float = 20.0) -> list[tuple]:
    """(offset, key, value) of the next `count` records, failing after `timeout` seconds."""
    records: list[tuple] = []
    deadline = time.monotonic() + timeout
    while len(records) < count and time.monotonic() < deadline:
        for batch in consumer.poll(timeout_ms=200).values():
            records += [(record.offset, record.key, record.value) for record in batch]
    return records


@pytest.mark.parametrize(
    "api_version", [None, PINNED_API_VERSION], ids=["api_version-auto", "api_version-pinned"]
)
def test_group_resumes_at_committed_offset(kafka_bootstrap, kafka_topic_factory, api_version):
    topic = kafka_topic_factory(partitions=1, prefix="roundtrip")
    partition = TopicPartition(topic, 0)
    settings = client_config(kafka_bootstrap)
    if api_version is not None:
        settings["api_version"] = api_version
    sent = [(f"key-{i % 3}".encode(), f"value-{i}".encode()) for i in range(MESSAGES)]

    producer = KafkaProducer(acks="all", **settings)
    try:
        if api_version is None:  # auto-detection must find a 4.x broker, not an obsolete one
            assert producer.config["api_version"] >= (4, 0)
        offsets = [producer.send(topic, key=k, value=v).get(timeout=10).offset for k, v in sent]
    finally:
        producer.close()
    assert offsets == list(range(MESSAGES))
    expected = [(offset, key, value) for offset, (key, value) in enumerate(sent)]

    def group_consumer() -> KafkaConsumer:
        return KafkaConsumer(
            topic,
            group_id=f"group-{topic}",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            **settings,
        )

    first = group_consumer()
    try:
        assert consume(first, MESSAGES) == expected
        first.commit({partition: OffsetAndMetadata(COMMITTED, "", -1)})
        assert first.committed(partition) == COMMITTED
    finally:
        first.close()

    second = group_consumer()
    try:
        assert consume(second, MESSAGES - COMMITTED) == expected[COMMITTED:]
        assert second.position(partition) == MESSAGES
    finally:
        second.close()


def test_topic_factory_makes_unique_topics_with_partitions(kafka_bootstrap, kafka_topic_factory):
    first = kafka_topic_factory(partitions=3)
    second = kafka_topic_factory(partitions=3)
    assert first != second
    consumer = KafkaConsumer(**client_config(kafka_bootstrap))
    try:
        assert consumer.partitions_for_topic(first) == {0, 1, 2}
    finally:
        consumer.close()


def test_the_daemon_producer_takes_its_linger_from_the_settings(kafka_bootstrap):
    settings = load_settings(kafka={"bootstrap_servers": kafka_bootstrap, "linger_ms": 3})
    producer = make_producer(settings)
    try:
        assert producer.config["linger_ms"] == 3
    finally:
        producer.close()
