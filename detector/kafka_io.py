"""Kafka clients built from `Settings`, and the topic checks the daemon makes at start.

Every client gets `KafkaSettings.client_options()`, so security settings reach all of them.
`api_version` is left to kafka-python's probe unless configured: kafka-python 3 detects Kafka
4.x brokers correctly and then speaks only request versions they serve.
"""

from __future__ import annotations

import contextlib
from typing import Any

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.admin import NewTopic
from kafka.errors import TopicAlreadyExistsError

from detector.config import Settings

__all__ = [
    "TopicError",
    "ensure_topics",
    "make_admin",
    "make_consumer",
    "make_producer",
]

#: How long a client waits for the broker while it is created; the daemon retries after that,
#: so that it stays responsive to signals while the broker is down.
BOOTSTRAP_TIMEOUT_MS = 5_000
#: A crashed detector's partitions move to the others after this long without a heartbeat
#: (Kafka's default before 3.0; the 45 s default since then is slow for a stream of alerts).
SESSION_TIMEOUT_MS = 10_000
#: Bounds `send()` when the producer's buffer is full or metadata is missing (broker down).
MAX_BLOCK_MS = 10_000


class TopicError(RuntimeError):
    """A topic the daemon needs is missing and may not be created; the message says which."""


def _options(settings: Settings) -> dict[str, Any]:
    return {**settings.kafka.client_options(), "bootstrap_timeout_ms": BOOTSTRAP_TIMEOUT_MS}


def make_consumer(settings: Settings) -> KafkaConsumer:
    """A group member that commits only when told to (after the outputs are acknowledged)."""
    kafka = settings.kafka
    return KafkaConsumer(
        group_id=kafka.group_id,
        enable_auto_commit=False,
        auto_offset_reset=kafka.auto_offset_reset,
        max_poll_records=kafka.max_poll_records,
        fetch_max_bytes=kafka.fetch_max_bytes,
        max_partition_fetch_bytes=kafka.max_partition_fetch_bytes,
        session_timeout_ms=SESSION_TIMEOUT_MS,
        **_options(settings),
    )


def make_producer(settings: Settings) -> KafkaProducer:
    """An idempotent producer acknowledged by all in-sync replicas, batching what it sends."""
    return KafkaProducer(
        acks="all",
        enable_idempotence=True,
        compression_type=settings.kafka.compression_type,
        linger_ms=5,
        batch_size=256 * 1024,
        max_block_ms=MAX_BLOCK_MS,
        **_options(settings),
    )


def make_admin(settings: Settings) -> KafkaAdminClient:
    return KafkaAdminClient(**_options(settings))


def ensure_topics(admin: KafkaAdminClient, settings: Settings) -> list[str]:
    """Check that the input topic exists; create the output topics if allowed and missing.

    Returns the topics created. Raises `TopicError` when the input topic is missing, or an
    output topic is missing and `kafka.create_topics` is off.
    """
    topics = settings.topics
    existing = set(admin.list_topics())
    if topics.input not in existing:
        raise TopicError(
            f"the input topic {topics.input!r} does not exist on {settings.kafka.bootstrap_servers}"
            " (create it, or set topics.input to the topic the events are written to)"
        )
    missing = [name for name in (topics.alerts, topics.dead_letters) if name not in existing]
    if not missing:
        return []
    if not settings.kafka.create_topics:
        raise TopicError(
            f"the output topic(s) {', '.join(map(repr, missing))} do not exist and "
            "kafka.create_topics is off: create them, or allow the detector to"
        )
    partitions = len(admin.describe_topics([topics.input])[0]["partitions"])
    with contextlib.suppress(TopicAlreadyExistsError):  # another detector was quicker
        admin.create_topics(
            [NewTopic(name, num_partitions=partitions, replication_factor=-1) for name in missing],
            timeout_ms=30_000,
            wait_for_metadata=True,
        )
    return missing
