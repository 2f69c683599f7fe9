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
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from kafka import TopicPartition

from detector.engine.core import Engine
from detector.engine.records import PolledRecord
from detector.state.snapshots import KeyHistory, Snapshot, fingerprint

__all__ = ["RestoreError", "RestoreSource", "Restored", "restore_partition"]


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


class RestoreSource(Protocol):
    """What a restore reads: a partition's latest snapshot and a range of its input records;
    `RestoreError` when either cannot be read to the end."""

    def snapshot(self, partition: TopicPartition, model: str) -> tuple[Snapshot | None, str]:
        """As `latest_snapshot` says, for fingerprint `model`."""
        ...

    def records(
        self, partition: TopicPartition, start: int, end: int
    ) -> Iterable[list[PolledRecord]]:
        """The records from offset `start` up to, not including, `end`, poll by poll."""
        ...


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
