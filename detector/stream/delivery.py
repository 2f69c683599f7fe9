"""Publishing a round's outputs and committing the input offsets behind them, under either
guarantee, behind one interface: the daemon's loop never asks which one it runs.

`AtLeastOnce` does not wait for a round's acknowledgements: the round stays in flight
(`detector.stream.inflight`) while the next rounds poll and score, and the offsets it covers
are committed asynchronously once the broker acknowledged every output of it and of the
rounds before it. Nothing is committed that is not acknowledged, so a crash or an outage at
any point repeats work (alerts with the same `alert_id`) but loses none. A held snapshot
waits in line behind the rounds before it and is encoded on a thread of its own meanwhile.

`ExactlyOnce` gathers a round's outputs, its offsets and any snapshot, and `settle()` makes
them one Kafka transaction, committed before the next round (a transaction must end before
the next begins): a crash aborts the round, and read_committed consumers see each alert once.
A failed transaction is aborted and `on_aborted` rewinds the key state to what the broker
holds; a fenced producer (another instance took over its transactional id) stops the daemon.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

import structlog
from kafka import TopicPartition
from kafka.errors import CommitFailedError, KafkaError, ProducerFencedError
from kafka.future import Future

from detector.config import Settings
from detector.ops.backoff import Backoff
from detector.ops.metrics import Metrics
from detector.ops.supervisor import Supervisor
from detector.stream.clients import exactly_once
from detector.stream.inflight import InFlight
from detector.stream.messages import Outgoing

__all__ = [
    "AtLeastOnce",
    "Committer",
    "Control",
    "Delivery",
    "ExactlyOnce",
    "Outputs",
    "make_delivery",
]

log = structlog.get_logger(__name__)

#: One wait for acknowledgements; the wait is repeated until they come (or shutdown ends).
FLUSH_STEP_S = 1.0
#: Input records, in batches of `batching.max_batch`, whose rounds may wait for
#: acknowledgement while the next rounds are polled and scored; beyond it the loop waits.
#: Bounds how far the commit lags, e.g. in an outage. Counted in records, not rounds: when
#: the stream is caught up, rounds are small and many are in flight at once.
BATCHES_IN_FLIGHT = 4

Offsets = dict[TopicPartition, int]
CommitCallback = Callable[[object, Exception | None], None]


class Outputs(Protocol):
    """The producer as a delivery drives it: one implementation per client library
    (`detector.stream.kafka_python`, `detector.stream.confluent`), each translating its
    library's errors into `KafkaError`s and its acknowledgements into `Future`s."""

    def send(self, message: Outgoing) -> Future: ...
    def flush(self, timeout: float | None = None) -> None: ...
    def begin_transaction(self) -> None: ...
    def commit_transaction(self, offsets: Offsets, group: object) -> None: ...
    def abort_transaction(self) -> None: ...
    def partition_count(self, topic: str) -> int: ...
    def close(self, timeout: float) -> None: ...


class Committer(Protocol):
    """The input consumer as a delivery commits through it (`InputSource` is the real one)."""

    def commit_async(self, offsets: Offsets, callback: CommitCallback) -> None: ...
    def commit(self, offsets: Offsets) -> None: ...
    def group_metadata(self) -> object: ...


class Delivery(Protocol):
    """Where a round's outputs and offsets go; the loop calls only these."""

    #: Another instance took over: nothing more may be written, not even state.
    fenced: bool

    def publish(self, messages: list[Outgoing], offsets: Offsets, records: int) -> None:
        """The outputs of a round that read `records` records up to the next `offsets`."""
        ...

    def hold(self, make: Callable[[], list[Outgoing]]) -> None:
        """Publish what `make` returns (a snapshot) only after all published before it."""
        ...

    def settle(self) -> bool:
        """Between rounds: make progress without waiting longer than needed; False when the
        outputs published since the last settle were lost (an aborted transaction)."""
        ...

    def drain(self) -> bool:
        """Wait until everything published is acknowledged; False when the shutdown budget
        ran out first or it was lost."""
        ...

    def commit(self) -> bool:
        """At shutdown: commit every acknowledged offset, retrying within the budget."""
        ...

    def take_committable(self) -> Offsets:
        """The acknowledged offsets not committed yet, now the caller's to commit."""
        ...

    def drop(self, partitions: Iterable[TopicPartition]) -> None:
        """Lost partitions: their offsets are no longer ours to commit."""
        ...

    def close(self, timeout: float) -> None: ...


def observe_acknowledged(metrics: Metrics, messages: Iterable[Outgoing]) -> None:
    now = time.time()
    metrics.observe_alerts(now - m.alert.event_time for m in messages if m.alert)


class AtLeastOnce:
    """Rounds in flight, released oldest first, their offsets committed asynchronously."""

    fenced = False

    def __init__(
        self,
        settings: Settings,
        outputs: Outputs,
        committer: Committer,
        supervisor: Supervisor,
        out_of_time: Callable[[], bool],
    ) -> None:
        self.outputs, self.committer, self.supervisor = outputs, committer, supervisor
        self.metrics = supervisor.metrics
        self._out_of_time = out_of_time
        self._most_records = BATCHES_IN_FLIGHT * settings.batching.max_batch
        self._commit_interval_s = settings.kafka.commit_interval_ms / 1000
        self.in_flight = InFlight(outputs.send)
        #: Offsets acknowledged, not committed yet.
        self.acked: Offsets = {}
        #: Makes the records of held snapshots off the loop (zlib releases the GIL).
        self._encoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="snapshot")
        self._commit_backoff = Backoff()
        self._resend_backoff = Backoff()
        self._next_resend = 0.0
        self._next_commit = 0.0
        #: The offsets of the asynchronous commit under way, if any.
        self._committing: Offsets | None = None

    def publish(self, messages: list[Outgoing], offsets: Offsets, records: int) -> None:
        self.in_flight.add(messages, offsets, records)

    def hold(self, make: Callable[[], list[Outgoing]]) -> None:
        """Encoding on the encoder thread meanwhile: waiting for the rounds before it and for
        the snapshot's own acknowledgement stopped the loop for 0.4 s at 10,000 keys."""
        self.in_flight.hold(self._encoder.submit(make).result)

    def settle(self) -> bool:
        """Take what is acknowledged, wait only when the rounds in flight read too many
        records, and commit what became committable (asynchronously)."""
        self._release()
        if self.in_flight.records > self._most_records:
            self._drain(self._most_records)
        self._try_commit()
        return True

    def drain(self) -> bool:
        return self._drain()

    def take_committable(self) -> Offsets:
        offsets, self.acked = self.acked, {}
        return offsets

    def drop(self, partitions: Iterable[TopicPartition]) -> None:
        lost = set(partitions)
        self.in_flight.drop(lost)
        for partition in lost:
            self.acked.pop(partition, None)

    def close(self, timeout: float) -> None:
        self._encoder.shutdown(cancel_futures=True)
        self.outputs.close(timeout)

    def _drain(self, most_records: int = -1) -> bool:
        """Wait until nothing is in flight, or with `most_records` until the rounds in flight
        read at most that many records, sending again what failed; False only when the
        shutdown budget ran out first."""
        while self._release() and self.in_flight.records > most_records:
            if self._out_of_time():
                return False
            self.supervisor.tick()
            if self.in_flight.pending():
                try:
                    self.outputs.flush(timeout=FLUSH_STEP_S)
                except KafkaError:
                    self.supervisor.broker(reachable=False)
            else:  # every send answered, some failed: wait for the next attempt
                time.sleep(min(FLUSH_STEP_S, max(0.0, self._next_resend - time.monotonic())))
        return True

    def _release(self) -> int:
        """Make the offsets of acknowledged rounds committable and send failures again when
        their back-off is over; the rounds still in flight."""
        offsets, acknowledged = self.in_flight.release()
        self.acked.update(offsets)
        observe_acknowledged(self.metrics, acknowledged)
        if (errors := self.in_flight.failures()) and time.monotonic() >= self._next_resend:
            count = self.in_flight.resend()
            log.warning(
                "publishing failed; sending again",
                count=count,
                errors=sorted({str(error) for error in errors}),
            )
            self.metrics.publish_retries.inc(count)
            self.supervisor.broker(reachable=False)
            self._next_resend = time.monotonic() + self._resend_backoff.next()
        elif not errors:
            self._resend_backoff.reset()
        return len(self.in_flight)

    def _try_commit(self) -> None:
        """Commit the acknowledged offsets asynchronously: the request goes out while the next
        round polls, and its outcome comes back through `_committed` in a later poll. One
        commit at a time, at most one per `kafka.commit_interval_ms`, none while a failed one
        backs off."""
        if not self.acked or self._committing is not None or time.monotonic() < self._next_commit:
            return
        self._committing = dict(self.acked)
        self._next_commit = time.monotonic() + self._commit_interval_s
        try:
            self.committer.commit_async(self._committing, self._committed)
        except KafkaError as error:
            self._committed({}, error)

    def _committed(self, offsets: object, outcome: Exception | None) -> None:
        """The outcome of an asynchronous commit: forget what it committed (unless acknowledged
        further meanwhile), or back off and commit again later."""
        committing, self._committing = self._committing or {}, None
        if isinstance(outcome, Exception):
            self._commit_failed(outcome, rebalanced=isinstance(outcome, CommitFailedError))
            return
        for tp, offset in committing.items():
            if self.acked.get(tp) == offset:
                del self.acked[tp]
        self._commit_succeeded()

    def commit(self) -> bool:
        """Retry the commit synchronously until it succeeds or the budget is spent."""
        while self.acked:
            committed = self._commit_once()
            if committed is not None:
                return committed
            if self._out_of_time():
                return False
            time.sleep(max(0.0, self._next_commit - time.monotonic()))
        return True

    def _commit_once(self) -> bool | None:
        """True: committed; None: failed, retry later; False: the group moved on without us."""
        try:
            self.committer.commit(self.acked)
        except CommitFailedError as error:
            self.metrics.commit_failures.inc()
            log.warning(
                "commit refused after a rebalance; the new owner processes these records again",
                error=str(error),
            )
            self.acked.clear()
            return False
        except KafkaError as error:
            self._commit_failed(error, rebalanced=False)
            return None
        self.acked.clear()
        self._commit_succeeded()
        return True

    def _commit_failed(self, error: Exception, rebalanced: bool) -> None:
        self.metrics.commit_failures.inc()
        if not rebalanced:  # a rebalance says nothing about the broker
            self.supervisor.broker(reachable=False)
        delay = self._commit_backoff.next()
        self._next_commit = time.monotonic() + delay
        log.warning("commit failed; retrying", error=str(error), retry_in_s=delay)

    def _commit_succeeded(self) -> None:
        self._commit_backoff.reset()
        self.supervisor.broker(reachable=True)


class ExactlyOnce:
    """Each round's outputs, offsets and snapshot in one transaction, committed by `settle`."""

    def __init__(
        self,
        outputs: Outputs,
        committer: Committer,
        supervisor: Supervisor,
        on_fenced: Callable[[], None],
        on_aborted: Callable[[], None],
    ) -> None:
        self.outputs, self.committer, self.supervisor = outputs, committer, supervisor
        self.metrics = supervisor.metrics
        self._on_fenced, self._on_aborted = on_fenced, on_aborted
        self.fenced = False
        self._messages: list[Outgoing] = []
        self._offsets: Offsets = {}

    def publish(self, messages: list[Outgoing], offsets: Offsets, records: int) -> None:
        self._messages += messages
        self._offsets.update(offsets)

    def hold(self, make: Callable[[], list[Outgoing]]) -> None:
        """In the same transaction, which commits all of it or nothing."""
        self._messages += make()

    def settle(self) -> bool:
        if not self._messages and not self._offsets:
            return True
        messages, offsets = self._messages, self._offsets
        self._messages, self._offsets = [], {}
        return self._transact(messages, offsets)

    def drain(self) -> bool:
        return self.settle()

    def commit(self) -> bool:
        """Every offset went with its transaction."""
        return True

    def take_committable(self) -> Offsets:
        return {}

    def drop(self, partitions: Iterable[TopicPartition]) -> None:
        for partition in partitions:
            self._offsets.pop(partition, None)

    def close(self, timeout: float) -> None:
        self.outputs.close(timeout)

    def _transact(self, messages: list[Outgoing], offsets: Offsets) -> bool:
        """Publish `messages` and commit `offsets` in one transaction. On failure the
        transaction is aborted and `on_aborted` rewinds (the engine moved past what the broker
        now holds); False then."""
        outputs = self.outputs
        try:
            outputs.begin_transaction()
            futures = [outputs.send(message) for message in messages]
            outputs.flush()
            if failed := next((f for f in futures if f.failed()), None):
                raise failed.exception
            outputs.commit_transaction(offsets, self.committer.group_metadata())
        except ProducerFencedError as error:
            log.error(
                "another instance took over this transactional id; stopping", error=str(error)
            )
            self._fence()
            return False
        except KafkaError as error:
            self.supervisor.broker(reachable=False)
            log.warning("transaction failed; aborting and restoring state", error=str(error))
            self._abort()
            return False
        observe_acknowledged(self.metrics, messages)
        self.supervisor.broker(reachable=True)
        return True

    def _abort(self) -> None:
        try:
            self.outputs.abort_transaction()
        except KafkaError as error:
            log.error("cannot abort the transaction; stopping", error=str(error))
            self._fence()
        self._on_aborted()

    def _fence(self) -> None:
        self.fenced = True
        self._on_fenced()


class Control(Protocol):
    """What a delivery asks of the daemon that runs it."""

    def out_of_time(self) -> bool:
        """Whether the shutdown budget is spent."""
        ...

    def request_stop(self) -> None: ...

    def rewind(self) -> None:
        """Restore the key state again: what was processed is not what the broker holds."""
        ...


def make_delivery(
    settings: Settings,
    outputs: Outputs,
    committer: Committer,
    supervisor: Supervisor,
    control: Control,
) -> Delivery:
    """The delivery of `processing.guarantee`."""
    if exactly_once(settings):
        return ExactlyOnce(outputs, committer, supervisor, control.request_stop, control.rewind)
    return AtLeastOnce(settings, outputs, committer, supervisor, control.out_of_time)
