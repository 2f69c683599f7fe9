"""Key state on partition assignment: the latest snapshot, then a state-only replay.

When a partition is assigned, the daemon pauses it and, between batches, brings its keys to
the state an uninterrupted run would have at the group's committed offset: it loads the
partition's latest snapshot from the state topic (valid at input offset S), then replays the
input from S up to the committed offset C through the engine with every output discarded.
When the snapshot is ahead of the commit (S > C: at_least_once wrote it, then died before
the commit), the records between were already published, so consumption resumes at S.

Without a usable snapshot (none yet, an incompatible model, or an incomplete one) the replay
starts at the beginning of the partition's retained data: state is exact when retention
still holds each key's history, and at worst starts cold for what retention dropped.

Keys age out of the TTL by their own partition's event time only (the engine is told each
record's partition), so restoring partitions one after another, and then catching up with
one partition's backlog before another's, leaves every key as an uninterrupted run would.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from itertools import repeat
from operator import attrgetter
from typing import Any, Protocol

import numpy as np
from kafka import KafkaConsumer, TopicPartition

from detector.config import Settings
from detector.engine import Engine
from detector.records import PolledRecord
from detector.state.snapshots import KeyHistory, Snapshot, fingerprint, latest_snapshot
from detector.stream.clients import make_reader, state_topic

__all__ = [
    "KafkaRestoreSource",
    "RestoreError",
    "RestoreSource",
    "Restored",
    "input_records",
    "restore_partition",
]

#: A read that makes no progress for this long is given up (the broker went away).
STALL_S = 30.0
POLL_MS = 500
_VALUE, _KEY, _OFFSET = attrgetter("value"), attrgetter("key"), attrgetter("offset")
_DECODE = partial(bytes.decode, errors="replace")


class RestoreError(RuntimeError):
    """The state topic or the input could not be read to the end; the restore is retried."""


@dataclass(frozen=True, slots=True)
class Restored:
    """How a partition's state was restored and where its consumption resumes."""

    resume_at: int
    snapshot: str  # "ok", or why there was none: "absent", "incompatible model", "incomplete"
    generation: int  # of the next snapshot to write
    replayed: int
    seconds: float
    recorded: KeyHistory | None  # the keys as the snapshot recorded them
    history: KeyHistory  # the keys as restored


def input_records(
    partition: TopicPartition, messages: Sequence[Any], keyed: bool
) -> list[PolledRecord]:
    """Polled messages as engine records; `keyed`: the message key is the entity key. A
    tombstone (no value) is an empty payload: a dead letter, like any record not JSON.

    Built column by column with C-level `map`s, and each row made by `tuple.__new__` (what
    `PolledRecord._make` does, less its length check): this runs for every record polled,
    and a Python call per record here cost as much as a third of the engine's work.
    """
    values = list(map(_VALUE, messages))
    if None in values:
        values = [b"" if value is None else value for value in values]
    keys = _keys(messages) if keyed else repeat(None)
    rows = zip(
        values, keys, repeat(partition.topic), repeat(partition.partition), map(_OFFSET, messages)
    )
    return list(map(tuple.__new__, repeat(PolledRecord), rows))


def _keys(messages: Sequence[Any]) -> list[str | None]:
    """The message keys as text; a missing or empty key is None (the record's field is read)."""
    keys = list(map(_KEY, messages))
    if None in keys or b"" in keys:
        return [key.decode(errors="replace") if key else None for key in keys]
    return list(map(_DECODE, keys))


class RestoreSource(Protocol):
    """What a restore reads: a partition's latest snapshot and a range of its input records."""

    def snapshot(self, partition: TopicPartition, model: str) -> tuple[Snapshot | None, str]:
        """As `latest_snapshot` says, for fingerprint `model`."""
        ...

    def records(
        self, partition: TopicPartition, start: int, end: int
    ) -> Iterable[list[PolledRecord]]:
        """The records from offset `start` up to, not including, `end`, poll by poll."""
        ...


@dataclass(frozen=True, slots=True)
class KafkaRestoreSource:
    """The daemon's: the state topic and the input topic of `settings`."""

    settings: Settings

    def snapshot(self, partition: TopicPartition, model: str) -> tuple[Snapshot | None, str]:
        return read_snapshot(self.settings, partition.partition, model)

    def records(
        self, partition: TopicPartition, start: int, end: int
    ) -> Iterator[list[PolledRecord]]:
        keyed = self.settings.kafka.key_field is None
        for messages in read_range(self.settings, partition, start, end):
            yield input_records(partition, messages, keyed)


def restore_partition(
    source: RestoreSource,
    engine: Engine,
    partition: TopicPartition,
    committed: int,
    beginning: int,
    on_replayed: Callable[[int], None] = lambda records: None,
) -> Restored:
    """Restore `partition`'s keys into `engine` up to the `committed` offset (see the module)
    from what `source` holds; `on_replayed` hears of each poll's records as they are
    replayed (restore progress)."""
    started = time.monotonic()
    arena = engine.arena
    arena.release(arena.slots_of([partition.partition]))  # stale, if any
    snapshot, why = source.snapshot(partition, fingerprint(engine.manifest))
    start, generation, recorded = beginning, 0, None
    if snapshot is not None:
        recorded = KeyHistory.of(snapshot.fields, arena.evicted)  # before any eviction
        arena.restore(snapshot.fields, engine.model.codec.statistics_rows)
        start, generation = max(snapshot.offset, beginning), snapshot.generation + 1
    replayed = 0
    if start < committed:
        for records in source.records(partition, start, committed):
            engine.process(records, partitions=np.full(len(records), partition.partition, np.int32))
            replayed += len(records)
            on_replayed(len(records))
    history = KeyHistory.of_partition(arena, partition.partition)
    seconds = time.monotonic() - started
    return Restored(max(start, committed), why, generation, replayed, seconds, recorded, history)


def read_snapshot(settings: Settings, partition: int, model: str) -> tuple[Snapshot | None, str]:
    """The input partition's latest snapshot compatible with fingerprint `model`."""
    topic = state_topic(settings)
    reader = make_reader(settings)
    try:
        numbers = reader.partitions_for_topic(topic)
        if not numbers:
            return None, "absent"
        tp = TopicPartition(topic, partition % len(numbers))
        end = _bounds(reader, tp)
        records = (
            (message.key, message.value)
            for messages in _read(reader, tp, end)
            for message in messages
        )
        return latest_snapshot(records, settings.topics.input, partition, model)
    finally:
        reader.close()


def read_range(
    settings: Settings, partition: TopicPartition, start: int, end: int
) -> Iterator[list[Any]]:
    """The messages of `partition` from `start` up to, not including, `end`, in polls."""
    reader = make_reader(settings)
    try:
        reader.assign([partition])
        reader.seek(partition, start)
        yield from _read(reader, partition, end)
    finally:
        reader.close()


def _bounds(reader: KafkaConsumer, tp: TopicPartition) -> int:
    reader.assign([tp])
    reader.seek_to_beginning(tp)
    return reader.end_offsets([tp])[tp]


def _read(reader: KafkaConsumer, tp: TopicPartition, end: int) -> Iterator[list[Any]]:
    last_progress = time.monotonic()
    while reader.position(tp) < end:
        messages = reader.poll(timeout_ms=POLL_MS).get(tp, [])
        if messages:
            last_progress = time.monotonic()
            yield [message for message in messages if message.offset < end]
        elif time.monotonic() - last_progress > STALL_S:
            raise RestoreError(f"reading {tp.topic}[{tp.partition}] stalled before offset {end}")
