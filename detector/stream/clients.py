"""kafka-python clients built from `Settings`, and the topics the daemon checks and creates at
start (with kafka-python's admin client, whichever client the daemon consumes with).

Every client gets `KafkaSettings.client_options()`, so security settings reach all of them.
`api_version` is left to kafka-python's probe unless configured: kafka-python 3 detects Kafka
4.x brokers correctly and then speaks only request versions they serve.
"""

from __future__ import annotations

import contextlib
import socket
from typing import Any

import structlog
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import NewTopic
from kafka.errors import TopicAlreadyExistsError
from kafka.structs import OffsetAndMetadata

from detector.config import Settings

__all__ = [
    "TopicError",
    "ensure_topics",
    "exactly_once",
    "make_admin",
    "make_consumer",
    "make_producer",
    "make_reader",
    "offset_metadata",
    "output_topics",
    "state_topic",
    "transactional_id",
]

log = structlog.get_logger(__name__)

#: How long a client waits for the broker while it is created; the daemon retries after that,
#: so that it stays responsive to signals while the broker is down.
BOOTSTRAP_TIMEOUT_MS = 5_000
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
        session_timeout_ms=kafka.session_timeout_ms,
        # Under exactly_once, an upstream transactional producer's aborted records are skipped.
        isolation_level=_isolation(settings),
        **_options(settings),
    )


def make_reader(settings: Settings) -> KafkaConsumer:
    """A consumer outside the group, for reading a partition from an offset (state restore)."""
    return KafkaConsumer(
        enable_auto_commit=False,
        isolation_level="read_committed",
        max_poll_records=settings.kafka.max_poll_records,
        fetch_max_bytes=settings.kafka.fetch_max_bytes,
        max_partition_fetch_bytes=max(settings.kafka.max_partition_fetch_bytes, 2 << 20),
        **_options(settings),
    )


def exactly_once(settings: Settings) -> bool:
    """Whether outputs, offsets and snapshots go in transactions; asked here and only here."""
    return settings.processing.guarantee == "exactly_once"


def _isolation(settings: Settings) -> str:
    return "read_committed" if exactly_once(settings) else "read_uncommitted"


def state_topic(settings: Settings) -> str:
    """The compacted topic of key-state snapshots: `topics.state`, or `<group id>-state`."""
    return settings.topics.state or f"{settings.kafka.group_id}-state"


def output_topics(settings: Settings) -> tuple[str, str, str]:
    """The topics the daemon writes: alerts, dead letters and key state."""
    return settings.topics.alerts, settings.topics.dead_letters, state_topic(settings)


def transactional_id(settings: Settings) -> str:
    """Stable per instance: a restarted instance fences the transactions its predecessor left."""
    configured = settings.processing.transactional_id
    return configured or f"{settings.kafka.group_id}-{socket.gethostname()}"


def make_producer(settings: Settings) -> KafkaProducer:
    """An idempotent producer acknowledged by all in-sync replicas, batching what it sends;
    transactional under exactly_once."""
    transactional = exactly_once(settings)
    return KafkaProducer(
        acks="all",
        enable_idempotence=True,
        transactional_id=transactional_id(settings) if transactional else None,
        compression_type=settings.kafka.compression_type,
        linger_ms=settings.kafka.linger_ms,
        batch_size=256 * 1024,
        max_block_ms=MAX_BLOCK_MS,
        **_options(settings),
    )


def make_admin(settings: Settings) -> KafkaAdminClient:
    return KafkaAdminClient(**_options(settings))


def ensure_topics(admin: KafkaAdminClient, settings: Settings) -> list[str]:
    """Check that the input topic exists; create the output and state topics if allowed and
    missing (the state topic compacted, with as many partitions as the input).

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
    state = state_topic(settings)
    missing = [name for name in output_topics(settings) if name not in existing]
    if not missing:
        return []
    if not settings.kafka.create_topics:
        raise TopicError(
            f"the output topic(s) {', '.join(map(repr, missing))} do not exist and "
            "kafka.create_topics is off: create them, or allow the detector to"
        )
    partitions = len(admin.describe_topics([topics.input])[0]["partitions"])
    compacted = {"cleanup.policy": "compact"}
    new_topics = [
        NewTopic(
            name,
            num_partitions=partitions,
            replication_factor=-1,
            topic_configs=compacted if name == state else {},
        )
        for name in missing
    ]
    with contextlib.suppress(TopicAlreadyExistsError):  # another detector was quicker
        admin.create_topics(new_topics, timeout_ms=30_000, wait_for_metadata=True)
    return missing


def offset_metadata(offsets: dict[TopicPartition, int]) -> dict[TopicPartition, OffsetAndMetadata]:
    """Next offsets as kafka-python commits them."""
    return {tp: OffsetAndMetadata(offset, "", -1) for tp, offset in offsets.items()}
