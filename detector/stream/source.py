"""The input: the group consumer of `topics.input`, the records polled and not yet processed,
and what happens when partitions come and go.

`InputSource` holds the logic; a `GroupConsumer` holds one client library's calls
(`detector.stream.kafka_python`, `detector.stream.confluent`). The consumer calls the source
back (`RebalanceListener`) on the loop's behalf when partitions are revoked, assigned or
lost, and commits what the revocation settled before the partitions go.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import structlog
from kafka import TopicPartition
from kafka.errors import KafkaError

from detector.config import Settings
from detector.engine.records import PolledRecord
from detector.ops.backoff import Backoff
from detector.ops.supervisor import Supervisor
from detector.state.manager import names
from detector.stream.delivery import CommitCallback, Offsets

__all__ = ["GroupConsumer", "InHand", "InputSource", "Polled", "RebalanceListener", "Rebalances"]

log = structlog.get_logger(__name__)

#: How long an idle poll waits; bounds how late a stop request or a new model is noticed.
IDLE_POLL_MS = 200
COMMIT_TIMEOUT_MS = 5_000
PROBE_INTERVAL_S = 2.0
PROBE_TIMEOUT_MS = 2_000

#: What one poll returns: runs of consecutive records of one partition, in the order polled.
Polled = list[tuple[TopicPartition, list[PolledRecord]]]


@dataclass
class InHand:
    """Records polled but not processed: what a revocation or a shutdown must process first."""

    records: list[PolledRecord] = field(default_factory=list)
    polled: Offsets = field(default_factory=dict)  # next offset
    runs: list[tuple[int, int]] = field(default_factory=list)  # (partition, records) in order

    def add(self, polled: Polled) -> None:
        for partition, records in polled:
            self.records += records
            self.runs.append((partition.partition, len(records)))
            self.polled[partition] = records[-1].offset + 1

    def partitions(self) -> np.ndarray:
        """The input partition of each record in hand."""
        numbers, sizes = zip(*self.runs, strict=True) if self.runs else ((), ())
        return np.repeat(np.array(numbers, np.int32), np.array(sizes, np.intp))

    def take(self) -> tuple[list[PolledRecord], np.ndarray, Offsets]:
        """The records in hand with their partitions and next offsets; the hand is emptied."""
        taken = self.records, self.partitions(), self.polled
        self.records, self.runs, self.polled = [], [], {}
        return taken

    def drop(self, partitions: Iterable[TopicPartition]) -> None:
        """Forget lost partitions: their new owner processes them from the committed offset."""
        lost = set(partitions)
        self.records = [
            record
            for record in self.records
            if TopicPartition(record.topic, record.partition) not in lost
        ]
        for partition in lost:
            self.polled.pop(partition, None)
        self.runs = [(record.partition, 1) for record in self.records]


class RebalanceListener(Protocol):
    """What a `GroupConsumer` tells the source of a rebalance, on the thread its library calls
    back on; `InputSource` is the one listener."""

    def revoked(self, partitions: set[TopicPartition]) -> Offsets:
        """`partitions` are about to go: the offsets to commit before they do."""
        ...

    def revocation_committed(
        self, partitions: set[TopicPartition], error: Exception | None
    ) -> None: ...

    def assigned(self, assignment: set[TopicPartition]) -> None:
        """The rebalance ended: `assignment` is every partition now assigned."""
        ...

    def lost(self, partitions: set[TopicPartition]) -> None: ...


class GroupConsumer(Protocol):
    """The group consumer of one topic as `InputSource` uses it: one implementation per
    client library, each translating its library's types and errors (`KafkaError`)."""

    @property
    def rebalancing(self) -> bool:
        """Whether a rebalance is under way during which restores must wait."""
        ...

    def subscribe(self, topic: str, listener: RebalanceListener) -> None: ...

    def poll(self, timeout_ms: int, max_records: int) -> Polled:
        """What is waiting, up to `max_records`, without waiting for more than the first."""
        ...

    def check_join(self) -> None:
        """Repair a group membership its library left stuck, if it can."""
        ...

    def assignment(self) -> set[TopicPartition]: ...

    def lag(self, partitions: set[TopicPartition], timeout_ms: int) -> dict[TopicPartition, int]:
        """Records behind the end of each partition."""
        ...

    def committed(self, partition: TopicPartition) -> int | None: ...
    def beginning(self, partition: TopicPartition) -> int: ...
    def end(self, partition: TopicPartition) -> int: ...
    def pause(self, partitions: set[TopicPartition]) -> None: ...

    def resume(self, partition: TopicPartition, offset: int) -> None:
        """Consume `partition` again, from `offset`."""
        ...

    def commit_async(self, offsets: Offsets, callback: CommitCallback) -> None: ...
    def commit(self, offsets: Offsets, timeout_ms: int) -> None: ...
    def group_metadata(self) -> object: ...
    def close(self, timeout_ms: int) -> None: ...


class Rebalances(Protocol):
    """What the daemon does when partitions come and go (on the consumer's network thread)."""

    @property
    def stopping(self) -> bool: ...

    def revoked(self, partitions: set[TopicPartition]) -> Offsets:
        """Settle and save what concerns `partitions`; the offsets to commit before they go."""
        ...

    def assigned(self, assignment: set[TopicPartition]) -> None: ...

    def lost(self, partitions: set[TopicPartition]) -> None: ...


class InputSource:
    """The input: polls batches into `hand`, probes the lag, follows rebalances (its
    consumer's `RebalanceListener`), and is what the state manager pauses and resumes and the
    delivery commits through."""

    def __init__(self, settings: Settings, consumer: GroupConsumer, supervisor: Supervisor) -> None:
        self.consumer, self.supervisor, self.metrics = consumer, supervisor, supervisor.metrics
        self.topic = settings.topics.input
        self.hand = InHand()
        self._batching = settings.batching
        self._reset_to_earliest = settings.kafka.auto_offset_reset == "earliest"
        self._handler: Rebalances | None = None
        self._next_probe = 0.0
        self._poll_backoff = Backoff()

    def subscribe(self, handler: Rebalances) -> None:
        self._handler = handler
        self.consumer.subscribe(self.topic, self)

    @property
    def rebalancing(self) -> bool:
        return self.consumer.rebalancing

    def collect(self, stopping: threading.Event) -> None:
        """Poll until a batch is full, `max_latency_ms` passed since its first record, the
        stream is idle, or a stop is requested; with `max_latency_ms` 0 (the default), what
        one poll returns: every record waiting, up to `max_batch`. A failed poll backs off."""
        try:
            self._collect(stopping)
        except KafkaError as error:
            delay = self._poll_backoff.next()
            log.warning("poll failed; retrying", error=str(error), retry_in_s=delay)
            time.sleep(delay)
        else:
            self._poll_backoff.reset()

    def _collect(self, stopping: threading.Event) -> None:
        batching, hand = self._batching, self.hand
        first_at: float | None = None
        while len(hand.records) < batching.max_batch and not stopping.is_set():
            if first_at is None:
                timeout_ms = IDLE_POLL_MS
            else:
                timeout_ms = batching.max_latency_ms - (time.monotonic() - first_at) * 1000
                if timeout_ms <= 0:
                    return
            polled = self.consumer.poll(int(timeout_ms), batching.max_batch - len(hand.records))
            self.supervisor.beat()
            if polled:
                hand.add(polled)
                first_at = first_at or time.monotonic()
            elif first_at is None:
                return

    def probe(self) -> None:
        """Every few seconds: ask the broker for the end offsets (reachability and lag)."""
        now = time.monotonic()
        if now < self._next_probe:
            return
        self._next_probe = now + PROBE_INTERVAL_S
        assigned = self.consumer.assignment()
        if self.rebalancing or not assigned:
            return
        self.supervisor.partitions(len(assigned))
        try:
            lag = self.consumer.lag(assigned, PROBE_TIMEOUT_MS)
        except KafkaError as error:
            if self.supervisor.health.broker_reachable:
                log.warning("the Kafka broker stopped answering", error=str(error))
            self.supervisor.broker(reachable=False)
            return
        if not self.supervisor.health.broker_reachable:
            log.info("the Kafka broker answers again")
        self.supervisor.broker(reachable=True)
        self.metrics.set_lag(lag)

    def check_join(self) -> None:
        self.consumer.check_join()

    def assignment(self) -> set[TopicPartition]:
        return self.consumer.assignment()

    def close(self, timeout_ms: int) -> None:
        self.consumer.close(timeout_ms)

    # -- what the state manager asks (`Partitions`) -----------------------------------------

    def bounds(self, partition: TopicPartition) -> tuple[int, int]:
        committed = self.consumer.committed(partition)
        beginning = self.consumer.beginning(partition)
        if committed is None:
            fresh = self._reset_to_earliest
            committed = beginning if fresh else self.consumer.end(partition)
        return committed, beginning

    def pause(self, partitions: set[TopicPartition]) -> None:
        self.consumer.pause(partitions)

    def resume(self, partition: TopicPartition, offset: int) -> None:
        self.consumer.resume(partition, offset)

    # -- what the delivery asks (`Committer`) ----------------------------------------------

    def commit_async(self, offsets: Offsets, callback: CommitCallback) -> None:
        self.consumer.commit_async(offsets, callback)

    def commit(self, offsets: Offsets) -> None:
        self.consumer.commit(offsets, COMMIT_TIMEOUT_MS)

    def group_metadata(self) -> object:
        return self.consumer.group_metadata()

    # -- rebalances (`RebalanceListener`), called back by the consumer ---------------------

    def revoked(self, partitions: set[TopicPartition]) -> Offsets:
        """Not ready until the assignment; the records in hand, the rounds in flight and the
        key state of `partitions` settled (unless stopping: the shutdown has done that)."""
        assert self._handler is not None
        self.supervisor.partitions(len(self.consumer.assignment() - partitions))
        if not partitions or self._handler.stopping:
            return {}
        return self._handler.revoked(partitions)

    def revocation_committed(
        self, partitions: set[TopicPartition], error: Exception | None
    ) -> None:
        if error is not None:
            self.metrics.commit_failures.inc()
            log.warning("commit before revocation failed", error=str(error))
        self.metrics.forget_partitions(partitions)
        if partitions:
            log.info("partitions revoked", partitions=names(partitions))

    def assigned(self, assignment: set[TopicPartition]) -> None:
        assert self._handler is not None
        self.supervisor.partitions(len(assignment))
        self._next_probe = 0.0
        self._handler.assigned(assignment)
        log.info("partitions assigned", partitions=names(assignment))

    def lost(self, partitions: set[TopicPartition]) -> None:
        """Partitions taken away without a revocation: their records in hand are not ours."""
        assert self._handler is not None
        self.hand.drop(partitions)
        self._handler.lost(partitions)
        self.metrics.forget_partitions(partitions)
        self.supervisor.partitions(len(self.consumer.assignment() - partitions))
        log.warning("partitions lost", partitions=names(partitions))
