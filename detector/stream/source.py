"""The input: the group consumer of `topics.input`, the records polled and not yet processed,
and the rebalance listener.

kafka-python 3 runs the consumer's network I/O, and the rebalance listener, on its own
thread, and only while the loop's thread waits in `poll()` or `close()`; the listener may
therefore settle the records in hand without locks, but must not call the consumer's blocking
methods (it awaits `commit_async` instead).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import structlog
from kafka import KafkaConsumer, TopicPartition
from kafka.consumer.subscription_state import AsyncConsumerRebalanceListener
from kafka.errors import KafkaError

from detector.config import Settings
from detector.engine.records import PolledRecord
from detector.ops.backoff import Backoff
from detector.ops.supervisor import Supervisor
from detector.state.manager import names
from detector.stream.clients import offset_metadata
from detector.stream.delivery import CommitCallback, Offsets
from detector.stream.reader import input_records

__all__ = ["InHand", "InputSource", "Rebalances"]

log = structlog.get_logger(__name__)

#: How long an idle poll waits; bounds how late a stop request or a new model is noticed.
IDLE_POLL_MS = 200
COMMIT_TIMEOUT_MS = 5_000
PROBE_INTERVAL_S = 2.0
PROBE_TIMEOUT_MS = 2_000


@dataclass
class InHand:
    """Records polled but not processed: what a revocation or a shutdown must process first."""

    records: list[PolledRecord] = field(default_factory=list)
    polled: Offsets = field(default_factory=dict)  # next offset
    runs: list[tuple[int, int]] = field(default_factory=list)  # (partition, records) in order

    def add(self, polled: dict[TopicPartition, list[Any]], keyed: bool) -> None:
        """Polled messages as engine records; `keyed`: the message key is the entity key."""
        for partition, messages in polled.items():
            self.records += input_records(partition, messages, keyed)
            self.runs.append((partition.partition, len(messages)))
            self.polled[partition] = messages[-1].offset + 1

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
    """The group consumer: polls batches into `hand`, probes the lag, follows rebalances, and
    is what the state manager pauses and resumes and the delivery commits through."""

    def __init__(self, settings: Settings, consumer: KafkaConsumer, supervisor: Supervisor) -> None:
        self.consumer, self.supervisor, self.metrics = consumer, supervisor, supervisor.metrics
        self.topic = settings.topics.input
        self.hand = InHand()
        self._batching = settings.batching
        self._keyed = settings.kafka.key_field is None
        self._reset_to_earliest = settings.kafka.auto_offset_reset == "earliest"
        self._rejoin_after_s = 2 * settings.kafka.session_timeout_ms / 1000
        self._listener: _Rebalance | None = None
        #: Since when a rebalance is under way (a revocation, no assignment yet); no restore
        #: runs meanwhile, since the consumer's blocking calls it makes can stall the join.
        self._rebalance_since: float | None = None
        self._next_probe = 0.0
        self._poll_backoff = Backoff()

    def subscribe(self, handler: Rebalances) -> None:
        self._listener = _Rebalance(self, handler)
        self.consumer.subscribe([self.topic], listener=self._listener)

    @property
    def rebalancing(self) -> bool:
        return self._rebalance_since is not None

    def collect(self, stopping: threading.Event) -> None:
        """Poll until a batch is full, `max_latency_ms` passed since its first record, the
        stream is idle, or a stop is requested; with `max_latency_ms` 0 (the default), what
        one poll returns: every record the consumer holds, up to `max_batch`. A failed poll
        backs off."""
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
            polled = self.consumer.poll(
                timeout_ms=int(timeout_ms), max_records=batching.max_batch - len(hand.records)
            )
            self.supervisor.beat()
            if polled:
                hand.add(polled, self._keyed)
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
            ends = self.consumer.end_offsets(list(assigned), timeout_ms=PROBE_TIMEOUT_MS)
            positions = {
                tp: self.consumer.position(tp, timeout_ms=PROBE_TIMEOUT_MS) for tp in assigned
            }
        except KafkaError as error:
            if self.supervisor.health.broker_reachable:
                log.warning("the Kafka broker stopped answering", error=str(error))
            self.supervisor.broker(reachable=False)
            return
        if not self.supervisor.health.broker_reachable:
            log.info("the Kafka broker answers again")
        self.supervisor.broker(reachable=True)
        self.metrics.set_lag({tp: max(0, ends[tp] - positions[tp]) for tp in assigned})

    def check_join(self) -> None:
        """Join the group again when a rebalance has not ended after twice the session timeout.

        Works around kafka-python 3.0.12: when the poll that began a join returns at its
        timeout before the join completes, the assignment that follows is never applied
        (the broker shows the member assigned; the client keeps its revoked partitions,
        unfetchable, and never calls back). Leaving and joining again is safe: the
        revocation already settled and saved everything.
        """
        since = self._rebalance_since
        if since is None or time.monotonic() - since < self._rejoin_after_s:
            return
        log.warning(
            "the group's rebalance did not end; joining again",
            waited_s=round(time.monotonic() - since, 1),
        )
        self.consumer.unsubscribe()
        self.consumer.subscribe([self.topic], listener=self._listener)
        self._rebalance_since = time.monotonic()

    def assignment(self) -> set[TopicPartition]:
        return self.consumer.assignment()

    def close(self, timeout_ms: int) -> None:
        self.consumer.close(autocommit=False, timeout_ms=timeout_ms)

    # -- what the state manager asks (`Partitions`) -----------------------------------------

    def bounds(self, partition: TopicPartition) -> tuple[int, int]:
        committed = self.consumer.committed(partition)
        beginning = self.consumer.beginning_offsets([partition])[partition]
        if committed is None:
            fresh = self._reset_to_earliest
            committed = beginning if fresh else self.consumer.end_offsets([partition])[partition]
        return committed, beginning

    def pause(self, partitions: set[TopicPartition]) -> None:
        self.consumer.pause(*partitions)

    def resume(self, partition: TopicPartition, offset: int) -> None:
        self.consumer.seek(partition, offset)
        self.consumer.resume(partition)

    # -- what the delivery asks (`Committer`) ----------------------------------------------

    def commit_async(self, offsets: Offsets, callback: CommitCallback) -> None:
        self.consumer.commit_async(offset_metadata(offsets), callback=callback)

    def commit(self, offsets: Offsets) -> None:
        self.consumer.commit(offset_metadata(offsets), timeout_ms=COMMIT_TIMEOUT_MS)

    def group_metadata(self) -> object:
        return self.consumer.group_metadata()

    # -- rebalances, on the consumer's network thread --------------------------------------

    def rebalance_started(self) -> None:
        """Not ready until the assignment: every partition is revoked meanwhile (eager)."""
        self._rebalance_since = self._rebalance_since or time.monotonic()
        self.supervisor.partitions(0)

    def assignment_taken(self) -> set[TopicPartition]:
        """The rebalance ended: the assignment now in effect."""
        assignment = self.consumer.assignment()
        self.supervisor.partitions(len(assignment))
        self._next_probe = 0.0
        self._rebalance_since = None
        return assignment

    def lost(self, partitions: set[TopicPartition]) -> None:
        """Partitions taken away without a revocation: their records in hand are not ours."""
        self.rebalance_started()
        self.hand.drop(partitions)


class _Rebalance(AsyncConsumerRebalanceListener):
    """Commits what is settled before partitions are revoked; async, so that the awaited
    commit runs on the network thread the listener itself is called on."""

    def __init__(self, source: InputSource, handler: Rebalances) -> None:
        self.source, self.handler = source, handler

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        source = self.source
        source.rebalance_started()
        if not revoked:
            return
        if self.handler.stopping:  # closing: the shutdown has committed, or could not
            source.metrics.forget_partitions(revoked)
            return
        offsets = self.handler.revoked(revoked)
        if offsets:
            try:
                await source.consumer.commit_async(offset_metadata(offsets))
            except KafkaError as error:
                source.metrics.commit_failures.inc()
                log.warning("commit before revocation failed", error=str(error))
        source.metrics.forget_partitions(revoked)
        log.info("partitions revoked", partitions=names(revoked))

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self.handler.assigned(self.source.assignment_taken())
        if assigned:
            log.info("partitions assigned", partitions=names(assigned))

    async def on_partitions_lost(self, lost: set[TopicPartition]) -> None:
        source = self.source
        source.lost(lost)
        self.handler.lost(lost)
        source.metrics.forget_partitions(lost)
        source.supervisor.partitions(len(source.consumer.assignment()))
        log.warning("partitions lost", partitions=names(lost))
