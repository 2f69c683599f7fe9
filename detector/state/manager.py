"""The key state of the assigned partitions: restored when they are assigned, forgotten when
they go, copied for a snapshot every `processing.snapshot_interval_s`.

A newly assigned partition is paused until its state is restored (`detector.state.restore`)
between two rounds; the offset each partition's state is valid at (`applied`) moves with the
batches processed. Every copy and every restore is checked against what was last recorded
of the partition's keys (`KeyHistory`): a key whose state did not continue is a fault,
counted in `seqsentinel_key_state_lost_total` and logged.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from functools import partial
from typing import Protocol

import structlog
from kafka import TopicPartition
from kafka.errors import KafkaError

from detector.config import Settings
from detector.engine.core import Engine
from detector.ops.backoff import Backoff
from detector.ops.supervisor import Supervisor
from detector.state.restore import RestoreError, RestoreSource, restore_partition
from detector.state.snapshots import (
    KeyHistory,
    StateCopy,
    StateRecord,
    fingerprint,
    snapshot_records,
)

__all__ = ["Partitions", "StateManager", "names"]

log = structlog.get_logger(__name__)


class Partitions(Protocol):
    """The input consumer as the state manager pauses, positions and resumes it."""

    def bounds(self, partition: TopicPartition) -> tuple[int, int]:
        """Where consumption starts (the committed offset, or the reset policy's) and the
        beginning of the retained data."""
        ...

    def pause(self, partitions: set[TopicPartition]) -> None: ...

    def resume(self, partition: TopicPartition, offset: int) -> None:
        """Consume `partition` again, from `offset`."""
        ...


def names(partitions: Iterable[TopicPartition]) -> list[str]:
    return sorted(f"{tp.topic}[{tp.partition}]" for tp in partitions)


class StateManager:
    """Restores, forgets and copies the key state that `engine` holds per input partition;
    snapshots go to partition `state_partition(input partition)` of `state_topic`."""

    def __init__(
        self,
        settings: Settings,
        engine: Engine,
        source: RestoreSource,
        partitions: Partitions,
        supervisor: Supervisor,
        state_topic: str,
        state_partition: Callable[[TopicPartition], int],
    ) -> None:
        self.engine, self.source, self.partitions = engine, source, partitions
        self.supervisor, self.metrics = supervisor, supervisor.metrics
        self.state_topic, self._state_partition = state_topic, state_partition
        self._interval_s = settings.processing.snapshot_interval_s
        self._ttl_s = settings.state.key_ttl_s
        self._next_snapshot = time.monotonic() + self._interval_s
        self._backoff = Backoff()
        #: Assigned partitions whose key state is not restored yet (paused meanwhile).
        self.restoring: set[TopicPartition] = set()
        #: Per partition: the next offset whose record is not in the key state yet.
        self.applied: dict[TopicPartition, int] = {}
        self._generation: dict[TopicPartition, int] = {}
        #: Per partition: its keys as the last snapshot (or the restore) left them.
        self._histories: dict[TopicPartition, KeyHistory] = {}

    @property
    def held(self) -> set[TopicPartition]:
        """The partitions whose key state is here: restored and processed."""
        return set(self.applied) - self.restoring

    def advanced(self, offsets: dict[TopicPartition, int]) -> None:
        """A batch was processed up to the next `offsets`."""
        self.applied.update(offsets)

    def assigned(self, assignment: set[TopicPartition]) -> None:
        """Restore every assigned partition whose key state is neither here nor coming."""
        self.restore(assignment - set(self.applied) - self.restoring)

    def restore(self, partitions: set[TopicPartition]) -> None:
        """Pause `partitions` until their key state is restored between two rounds."""
        if partitions:
            self.partitions.pause(partitions)
        self.restoring |= partitions
        self.supervisor.restoring(len(self.restoring))

    def rewind(self, partitions: set[TopicPartition]) -> None:
        """Restore `partitions` again: the engine moved past what the broker holds."""
        self.forget(partitions)
        self.restore(partitions)

    def forget(self, partitions: Iterable[TopicPartition]) -> None:
        """Drop the key state of partitions that are no longer ours."""
        gone = set(partitions)
        if gone:
            arena = self.engine.arena
            arena.release(arena.slots_of([tp.partition for tp in gone]))
            self.metrics.active_keys.set(self.engine.keys)
        for tp in gone:
            self.applied.pop(tp, None)
            self._generation.pop(tp, None)
            self._histories.pop(tp, None)
        self.restoring -= gone
        self.supervisor.restoring(len(self.restoring))

    def model_swapped(self, kept: bool) -> None:
        """A new model serves; unless it kept the key state, every key starts again."""
        if not kept:
            self._histories.clear()

    def restore_pending(self) -> None:
        """Restore the key state of the partitions assigned since the last round; on a
        failure, back off and leave the rest to a later round."""
        for tp in sorted(self.restoring):
            try:
                committed, beginning = self.partitions.bounds(tp)
                restored = restore_partition(
                    self.source,
                    self.engine,
                    tp,
                    committed,
                    beginning,
                    self.metrics.restore_replayed.inc,
                )
            except (KafkaError, RestoreError) as error:
                log.warning("restoring key state failed; retrying", error=str(error))
                time.sleep(self._backoff.next())
                return
            self._backoff.reset()
            self.partitions.resume(tp, restored.resume_at)
            self.restoring.discard(tp)
            self.applied[tp] = restored.resume_at
            self._generation[tp] = restored.generation
            if restored.recorded is not None:
                self._histories[tp] = restored.recorded
            self._continues(tp, restored.history, "restore")
            self.supervisor.restoring(len(self.restoring))
            self.metrics.restore_seconds.labels(restored.snapshot).observe(restored.seconds)
            self.metrics.active_keys.set(self.engine.keys)
            log.info(
                "key state restored",
                partition=names([tp])[0],
                snapshot=restored.snapshot,
                replayed=restored.replayed,
                resume_at=restored.resume_at,
                seconds=round(restored.seconds, 3),
            )

    def snapshot_due(self) -> bool:
        return time.monotonic() >= self._next_snapshot

    def copy(self, partitions: Iterable[TopicPartition]) -> Callable[[], list[StateRecord]]:
        """Copy the key state of `partitions` as it is now, valid at their applied offsets; the
        function returned makes the snapshot records of the copies. Making them (compression:
        0.3 s per 10,000 stateful keys) needs nothing of the manager's, so it can run on
        another thread while the loop goes on."""
        self._next_snapshot = time.monotonic() + self._interval_s
        arena = self.engine.arena
        copies = []
        for tp in sorted(partitions):
            generation = self._generation.get(tp, 0)
            self._generation[tp] = generation + 1
            fields = arena.export(arena.slots_of([tp.partition]))
            self._continues(tp, KeyHistory.of(fields, arena.evicted), "snapshot")
            where = (self.state_topic, self._state_partition(tp))
            copies.append(StateCopy(tp, self.applied[tp], generation, fields, *where))
            self.metrics.snapshots.inc()
        return partial(snapshot_records, copies, fingerprint(self.engine.manifest))

    def _continues(self, tp: TopicPartition, history: KeyHistory, at: str) -> None:
        """Check that the keys of `tp` continue what was last recorded of them, and record
        `history` in its place: a key whose state went missing (a bug: its next events start
        a new history, and alerts differ from an uninterrupted run's) is counted and logged."""
        recorded, self._histories[tp] = self._histories.get(tp), history
        lost = [] if recorded is None else recorded.lost(history, self._ttl_s)
        if lost:
            self.metrics.lost_keys.labels(at).inc(len(lost))
            log.error(
                "key state lost",
                partition=names([tp])[0],
                at=at,
                keys=len(lost),
                examples=[{"key": k, "recorded": n, "found": m} for k, n, m in lost[:5]],
            )
