"""A bounded read of a topic: every message from a point in time up to the end seen at the start.

Retraining reads the detector's input topic with `assign()`, outside any consumer group: it
never joins the detector's group (no rebalance of the running detectors) and commits nothing.
The end offsets are captured before reading, so a busy topic cannot keep the read going, and
the range read is reported so that a run can be told apart from the next.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kafka import KafkaConsumer, TopicPartition

from detector.config import KafkaSettings
from detector.stream.reader import IDLE_TIMEOUT_S, ReadError, read_partitions

__all__ = ["SourceError", "TopicMessage", "TopicRange", "read_range"]


class SourceError(RuntimeError):
    """The topic cannot be read as asked; the message says why."""


@dataclass(frozen=True, slots=True)
class TopicMessage:
    partition: int
    offset: int
    timestamp_ms: int
    key: bytes | None
    value: bytes | None


@dataclass(frozen=True)
class TopicRange:
    """What was read: per partition, the first offset and the end offset (exclusive)."""

    topic: str
    since: float | None
    start: dict[int, int]
    end: dict[int, int]

    def to_dict(self) -> dict[str, Any]:
        return {
            "topic": self.topic,
            "since": self.since,
            "partitions": {
                str(p): {"start": self.start[p], "end": self.end[p]} for p in sorted(self.end)
            },
        }


def read_range(
    settings: KafkaSettings,
    topic: str,
    since: float | None,
    idle_timeout_s: float = IDLE_TIMEOUT_S,
) -> tuple[TopicRange, list[TopicMessage]]:
    """Every message of `topic` with a timestamp at or after `since` (epoch seconds; None: all
    retained), up to the end offsets of the moment the read starts, partition by partition."""
    consumer = KafkaConsumer(
        **settings.client_options(),
        group_id=None,
        enable_auto_commit=False,
        allow_auto_create_topics=False,
        fetch_max_bytes=settings.fetch_max_bytes,
        max_partition_fetch_bytes=settings.max_partition_fetch_bytes,
    )
    try:
        partitions = [
            TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())
        ]
        if not partitions:
            raise SourceError(f"topic {topic!r} does not exist on {settings.bootstrap_servers}")
        end = consumer.end_offsets(partitions)
        start = _start_offsets(consumer, partitions, since, end)
        span = TopicRange(
            topic,
            since,
            {tp.partition: start[tp] for tp in partitions},
            {tp.partition: end[tp] for tp in partitions},
        )
        return span, _read(consumer, start, end, idle_timeout_s)
    finally:
        consumer.close()


def _start_offsets(
    consumer: KafkaConsumer,
    partitions: list[TopicPartition],
    since: float | None,
    end: dict[TopicPartition, int],
) -> dict[TopicPartition, int]:
    if since is None:
        return consumer.beginning_offsets(partitions)
    found = consumer.offsets_for_times({tp: int(since * 1000) for tp in partitions})
    # None: no message at or after `since` in that partition, so nothing to read there.
    return {tp: end[tp] if found[tp] is None else found[tp].offset for tp in partitions}


def _read(
    consumer: KafkaConsumer,
    start: dict[TopicPartition, int],
    end: dict[TopicPartition, int],
    idle_timeout_s: float,
) -> list[TopicMessage]:
    try:
        return [
            TopicMessage(m.partition, m.offset, m.timestamp, m.key, m.value)
            for _, batch in read_partitions(consumer, start, end, idle_timeout_s)
            for m in batch
        ]
    except ReadError as error:
        raise SourceError(str(error)) from None
