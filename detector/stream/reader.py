"""Reading the input outside the consumer group: polled messages as engine records, bounded
reads of partitions, and the restore's view of the state and input topics.

A bounded read takes every message of some partitions from a start offset up to an end
offset fixed before it begins, so a busy topic cannot keep it going; it reads with
`assign()`, never joins a group and commits nothing. The daemon's restore reads one
partition's snapshot and backlog with it, the trainer a whole topic for retraining.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import repeat
from operator import attrgetter
from typing import Any

from kafka import KafkaConsumer, TopicPartition

from detector.config import Settings
from detector.engine.records import PolledRecord
from detector.state.restore import RestoreError
from detector.state.snapshots import Snapshot, latest_snapshot
from detector.stream.clients import make_reader, state_topic

__all__ = [
    "KafkaRestoreSource",
    "ReadError",
    "input_records",
    "polled_records",
    "read_partitions",
]

#: A read that makes no progress for this long is given up (the broker went away).
IDLE_TIMEOUT_S = 30.0
POLL_MS = 500
_VALUE, _KEY, _OFFSET = attrgetter("value"), attrgetter("key"), attrgetter("offset")


class ReadError(RuntimeError):
    """A bounded read stalled before its end offsets; the message says where."""


def read_partitions(
    consumer: KafkaConsumer,
    start: dict[TopicPartition, int],
    end: dict[TopicPartition, int],
    idle_timeout_s: float = IDLE_TIMEOUT_S,
) -> Iterator[tuple[TopicPartition, list[Any]]]:
    """The messages of each partition of `start` from its start offset up to, not including,
    its `end` offset, poll by poll; `ReadError` when none comes for `idle_timeout_s`."""
    remaining = {tp for tp in start if start[tp] < end[tp]}
    if not remaining:
        return
    consumer.assign(sorted(remaining))
    for tp in remaining:
        consumer.seek(tp, start[tp])
    last_progress = time.monotonic()
    while remaining:
        polled = consumer.poll(timeout_ms=POLL_MS)
        for tp, messages in polled.items():
            if inside := [message for message in messages if message.offset < end[tp]]:
                yield tp, inside
        done = {tp for tp in remaining if consumer.position(tp) >= end[tp]}
        if done:
            consumer.pause(*done)
            remaining -= done
        if polled or done:
            last_progress = time.monotonic()
        elif time.monotonic() - last_progress > idle_timeout_s:
            behind = ", ".join(f"{tp.topic}[{tp.partition}]" for tp in sorted(remaining))
            raise ReadError(f"no message for {idle_timeout_s:.0f} s before the end of {behind}")


def input_records(
    partition: TopicPartition, messages: Sequence[Any], keyed: bool
) -> list[PolledRecord]:
    """kafka-python's polled messages as engine records; `keyed`: the message key is the
    entity key."""
    keys = map(_KEY, messages) if keyed else None
    return polled_records(partition, list(map(_VALUE, messages)), keys, map(_OFFSET, messages))


def polled_records(
    partition: TopicPartition,
    values: list[bytes | None],
    keys: Iterable[bytes | None] | None,
    offsets: Iterable[int],
) -> list[PolledRecord]:
    """One partition's messages, given as columns, as engine records; `keys` None: the entity
    key is a field of the record. A tombstone (no value) is an empty payload: a dead letter,
    like any record not JSON.

    Built column by column with C-level `map`s, and each row made by `tuple.__new__` (what
    `PolledRecord._make` does, less its length check): this runs for every record polled,
    and a Python call per record here cost as much as a third of the engine's work.
    """
    if None in values:
        values = [b"" if value is None else value for value in values]
    texts = repeat(None) if keys is None else _texts(list(keys))
    rows = zip(values, texts, repeat(partition.topic), repeat(partition.partition), offsets)
    return list(map(tuple.__new__, repeat(PolledRecord), rows))


def _texts(keys: list[bytes | None]) -> list[str | None]:
    """The message keys as text; a missing or empty key is None (the record's field is read)."""
    if None not in keys and b"" not in keys:
        with contextlib.suppress(UnicodeDecodeError):  # else record by record, replacing
            return list(map(bytes.decode, keys))
    return [key.decode(errors="replace") if key else None for key in keys]


@dataclass(frozen=True, slots=True)
class KafkaRestoreSource:
    """The daemon's `RestoreSource`: the state topic and the input topic of `settings`; a
    stalled read is a `RestoreError`."""

    settings: Settings

    def snapshot(self, partition: TopicPartition, model: str) -> tuple[Snapshot | None, str]:
        """The input partition's latest snapshot compatible with fingerprint `model`."""
        topic = state_topic(self.settings)
        reader = make_reader(self.settings)
        try:
            numbers = reader.partitions_for_topic(topic)
            if not numbers:
                return None, "absent"
            tp = TopicPartition(topic, partition.partition % len(numbers))
            start, end = reader.beginning_offsets([tp]), reader.end_offsets([tp])
            records = (
                (message.key, message.value)
                for _, messages in read_partitions(reader, start, end)
                for message in messages
            )
            return latest_snapshot(records, partition.topic, partition.partition, model)
        except ReadError as error:
            raise RestoreError(str(error)) from None
        finally:
            reader.close()

    def records(
        self, partition: TopicPartition, start: int, end: int
    ) -> Iterator[list[PolledRecord]]:
        """The input records of `partition` from `start` up to, not including, `end`."""
        keyed = self.settings.kafka.key_field is None
        reader = make_reader(self.settings)
        try:
            for _, messages in read_partitions(reader, {partition: start}, {partition: end}):
                yield input_records(partition, messages, keyed)
        except ReadError as error:
            raise RestoreError(str(error)) from None
        finally:
            reader.close()
