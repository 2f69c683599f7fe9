"""The input consumer and the outputs on confluent-kafka, librdkafka's Python binding
(`kafka.client = "confluent"`).

librdkafka fetches, produces and keeps the group on threads of its own, in C; Python sees it
only in the calls made into it. Its callbacks run inside those calls, on the caller's
thread: the consumer's (rebalances, commit outcomes) inside `consume()` and `poll()` on the
loop's thread, the producer's delivery reports inside `poll()` and `flush()`, which a thread
of `ConfluentOutputs` calls meanwhile, as kafka-python's I/O thread resolves its futures.

The group uses the cooperative-sticky assignor: a rebalance revokes only the partitions that
move, and the others are consumed on meanwhile. Every member of a group must then use it, so
a group moves from one client library to the other by stopping all its members first.

What the rest of the daemon sees is what kafka-python gives: `TopicPartition`s, `Future`s of
sends, and `KafkaError`s (`CommitFailedError` for a commit the group refused,
`ProducerFencedError` for a producer that cannot go on).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from itertools import pairwise
from typing import Any

import confluent_kafka
import numpy as np
import orjson
import structlog
from confluent_kafka import Consumer, Message, Producer
from kafka import TopicPartition
from kafka.errors import CommitFailedError, KafkaError, ProducerFencedError
from kafka.future import Future

from detector.config import Settings
from detector.stream.clients import (
    BOOTSTRAP_TIMEOUT_MS,
    exactly_once,
    output_topics,
    transactional_id,
)
from detector.stream.delivery import CommitCallback, Offsets
from detector.stream.messages import Outgoing
from detector.stream.reader import polled_records
from detector.stream.source import Polled, RebalanceListener

__all__ = [
    "ConfluentConsumer",
    "ConfluentOutputs",
    "consumer_config",
    "open_clients",
    "producer_config",
    "translated",
]

log = structlog.get_logger(__name__)

_Error = confluent_kafka.KafkaError
#: Errors after which a transactional producer cannot go on: another instance took over.
_FENCED = frozenset({_Error._FENCED, _Error.PRODUCER_FENCED, _Error.INVALID_PRODUCER_EPOCH})
#: A commit refused because the group moved on: the partitions belong to another member.
_REBALANCED = frozenset(
    {_Error.REBALANCE_IN_PROGRESS, _Error.ILLEGAL_GENERATION, _Error.UNKNOWN_MEMBER_ID}
)
#: A message's fields, read through the methods of the class itself: mapped over a poll, they
#: cost less than half of `operator.methodcaller`, which looks the method up on every message.
_VALUE, _KEY, _OFFSET = Message.value, Message.key, Message.offset
_PARTITION, _ERROR = Message.partition, Message.error
#: librdkafka's own log lines, through the daemon's logging (warnings and above by default).
LIBRDKAFKA_LOG = logging.getLogger("librdkafka")
#: How often librdkafka reports its statistics, of which the broker connections' states are
#: read: the daemon's probe of the broker, as `InputSource` probes every `PROBE_INTERVAL_S`.
STATISTICS_MS = 2_000
#: `fetch.wait.max.ms`: how long the broker holds a fetch that finds no record.
FETCH_WAIT_MS = 100
#: The most records confluent-kafka's `consume()` returns at once.
MOST_CONSUMED = 1_000_000
#: How long the delivery reports' thread waits in one `poll()`; bounds how late it stops.
SERVE_INTERVAL_S = 0.1


def translated(error: confluent_kafka.KafkaError) -> KafkaError:
    """librdkafka's error as the `KafkaError` the delivery and the source handle."""
    code = error.code()
    if code in _FENCED or error.fatal():
        return ProducerFencedError(str(error))
    if code in _REBALANCED:
        return CommitFailedError(str(error))
    return KafkaError(str(error))


@contextlib.contextmanager
def _translating() -> Iterator[None]:
    try:
        yield
    except (confluent_kafka.KafkaException, SystemError) as exception:
        raise translated(_raised(exception)) from None


def _raised(exception: Exception) -> confluent_kafka.KafkaError:
    """The librdkafka error behind `exception`. confluent-kafka raises a fatal error by
    setting it pending, and a delivery report served in the same call then fails with a
    `SystemError` caused by it."""
    if isinstance(exception, SystemError):
        if not isinstance(exception.__cause__, confluent_kafka.KafkaException):
            raise exception
        exception = exception.__cause__
    return exception.args[0]


def _ours(partition: TopicPartition, offset: int = confluent_kafka.OFFSET_INVALID) -> Any:
    return confluent_kafka.TopicPartition(partition.topic, partition.partition, offset)


def _theirs(partition: Any) -> TopicPartition:
    return TopicPartition(partition.topic, partition.partition)


def _offsets(offsets: Offsets) -> list[Any]:
    return [_ours(tp, offset) for tp, offset in offsets.items()]


class ConfluentConsumer:
    """`GroupConsumer` on a `confluent_kafka.Consumer`; `keyed`: the message key is the
    entity key."""

    def __init__(self, config: dict[str, Any], keyed: bool) -> None:
        callbacks = {"on_commit": self._commit_done, "stats_cb": self._statistics}
        self.consumer = Consumer(config | callbacks | {"statistics.interval.ms": STATISTICS_MS})
        self._keyed = keyed
        #: Whether librdkafka's latest statistics showed a broker connection up (None: none yet).
        self._broker_up: bool | None = None
        self._topic = ""
        self._listener: RebalanceListener | None = None
        #: The asynchronous commit awaiting its outcome: its offsets and its callback.
        self._committing: tuple[Offsets, CommitCallback] | None = None

    #: librdkafka's calls do not stall a join: restores may run during rebalances.
    rebalancing = False

    def subscribe(self, topic: str, listener: RebalanceListener) -> None:
        self._topic, self._listener = topic, listener
        with _translating():
            self.consumer.subscribe(
                [topic], on_assign=self._assign, on_revoke=self._revoke, on_lost=self._lose
            )

    def poll(self, timeout_ms: int, max_records: int) -> Polled:
        """What librdkafka holds, up to `max_records`; when nothing, waits up to `timeout_ms`
        for one record and takes what came with it. (`consume()` alone waits until it has
        all `max_records` or the timeout passed.)"""
        max_records = min(max_records, MOST_CONSUMED)
        with _translating():
            messages = self.consumer.consume(max_records, 0)
            if not messages:
                first = self.consumer.poll(timeout_ms / 1000)
                if first is None:
                    return []
                messages = [first]
                if max_records > 1:
                    messages += self.consumer.consume(max_records - 1, 0)
        return self._runs(messages)

    def _runs(self, messages: list[Message]) -> Polled:
        """The messages in runs of one partition, as engine records: column by column with
        C-level `map`s, one `np.diff` for where the partition changes."""
        if any(map(_ERROR, messages)):
            messages = self._without_errors(messages)
            if not messages:
                return []
        partitions = np.fromiter(map(_PARTITION, messages), np.int64, len(messages))
        starts = [0, *(np.flatnonzero(np.diff(partitions)) + 1).tolist(), len(messages)]
        values, offsets = list(map(_VALUE, messages)), list(map(_OFFSET, messages))
        keys = list(map(_KEY, messages)) if self._keyed else None
        runs: Polled = []
        for start, stop in pairwise(starts):
            tp = TopicPartition(self._topic, int(partitions[start]))
            run_keys = None if keys is None else keys[start:stop]
            runs.append((tp, polled_records(tp, values[start:stop], run_keys, offsets[start:stop])))
        return runs

    @staticmethod
    def _without_errors(messages: list[Message]) -> list[Message]:
        """Events that are not records (a broker gone, a topic deleted) are logged, unless
        fatal; the records among them are kept."""
        kept = []
        for message in messages:
            if (error := message.error()) is None:
                kept.append(message)
            elif error.fatal():
                raise translated(error)
            else:
                log.warning("the consumer reports an error", error=str(error))
        return kept

    def check_join(self) -> None:
        """librdkafka keeps its group membership itself."""

    def assignment(self) -> set[TopicPartition]:
        with _translating():
            return set(map(_theirs, self.consumer.assignment()))

    def lag(self, partitions: set[TopicPartition], timeout_ms: int) -> dict[TopicPartition, int]:
        """The high watermark minus the position, both as librdkafka holds them (the
        watermark of the latest fetch response): asking the broker would queue behind the
        consumer's long-polling fetch on the same connection, and stall the loop up to
        `fetch.wait.max.ms` per partition. A partition not fetched yet counts nothing.
        `KafkaError` when librdkafka's latest statistics show no broker connection up."""
        if self._broker_up is False:
            raise KafkaError("no connection to any broker is up")
        with _translating():
            positions = self.consumer.position([_ours(tp) for tp in partitions])
            lag = {}
            for position in positions:
                low, high = self.consumer.get_watermark_offsets(position, cached=True)
                lag[_theirs(position)] = max(0, high - max(low, position.offset))
        return lag

    def _statistics(self, statistics: str) -> None:
        """librdkafka's periodic statistics, inside a poll: which broker connections are up
        (bootstrap entries, node id -1, aside)."""
        brokers = orjson.loads(statistics)["brokers"].values()
        self._broker_up = any(b["state"] == "UP" for b in brokers if b["nodeid"] >= 0)

    def committed(self, partition: TopicPartition) -> int | None:
        with _translating():
            (committed,) = self.consumer.committed(
                [_ours(partition)], timeout=BOOTSTRAP_TIMEOUT_MS / 1000
            )
        return committed.offset if committed.offset >= 0 else None

    def _watermarks(self, partition: TopicPartition) -> tuple[int, int]:
        with _translating():
            return self.consumer.get_watermark_offsets(
                _ours(partition), timeout=BOOTSTRAP_TIMEOUT_MS / 1000
            )

    def beginning(self, partition: TopicPartition) -> int:
        return self._watermarks(partition)[0]

    def end(self, partition: TopicPartition) -> int:
        return self._watermarks(partition)[1]

    def pause(self, partitions: set[TopicPartition]) -> None:
        with _translating():
            self.consumer.pause([_ours(tp) for tp in partitions])

    def resume(self, partition: TopicPartition, offset: int) -> None:
        with _translating():
            self.consumer.seek(_ours(partition, offset))
            self.consumer.resume([_ours(partition)])

    def commit_async(self, offsets: Offsets, callback: CommitCallback) -> None:
        """The outcome comes to `callback` from a later `poll()`."""
        self._committing = (dict(offsets), callback)
        with _translating():
            self.consumer.commit(offsets=_offsets(offsets), asynchronous=True)

    def _commit_done(self, error: confluent_kafka.KafkaError | None, partitions: list) -> None:
        """librdkafka's report of a commit; only the asynchronous one is awaited."""
        offsets = {_theirs(p): p.offset for p in partitions}
        if self._committing is None or self._committing[0] != offsets:
            return
        callback, self._committing = self._committing[1], None
        failed = error or next((p.error for p in partitions if p.error), None)
        callback(offsets, None if failed is None else translated(failed))

    def commit(self, offsets: Offsets, timeout_ms: int) -> None:
        """Waits for the broker's answer (librdkafka's own timeouts bound it)."""
        with _translating():
            committed = self.consumer.commit(offsets=_offsets(offsets), asynchronous=False)
        if failed := next((p.error for p in committed or () if p.error), None):
            raise translated(failed)

    def group_metadata(self) -> object:
        return self.consumer.consumer_group_metadata()

    def close(self, timeout_ms: int) -> None:
        """Leaves the group (the revocation it causes finds the daemon stopping)."""
        with _translating():
            self.consumer.close()

    # -- rebalances, inside `consume()` and `poll()` ----------------------------------------

    def _revoke(self, consumer: Consumer, partitions: list) -> None:
        assert self._listener is not None
        revoked = set(map(_theirs, partitions))
        offsets = self._listener.revoked(revoked)
        error = None
        if offsets:
            try:
                self.commit(offsets, BOOTSTRAP_TIMEOUT_MS)
            except KafkaError as failure:
                error = failure
        consumer.incremental_unassign(partitions)
        self._listener.revocation_committed(revoked, error)

    def _assign(self, consumer: Consumer, partitions: list) -> None:
        assert self._listener is not None
        consumer.incremental_assign(partitions)
        self._listener.assigned(self.assignment())

    def _lose(self, consumer: Consumer, partitions: list) -> None:
        assert self._listener is not None
        self._listener.lost(set(map(_theirs, partitions)))
        consumer.incremental_unassign(partitions)


class ConfluentOutputs:
    """`Outputs` on a `confluent_kafka.Producer`, its delivery reports served by a thread."""

    def __init__(self, producer: Producer) -> None:
        self.producer = producer
        #: The error that ended the producer (it was fenced), raised by the next flush.
        self._fatal: confluent_kafka.KafkaError | None = None
        self._closing = threading.Event()
        self._server = threading.Thread(target=self._serve, name="deliveries", daemon=True)
        self._server.start()

    def _serve(self) -> None:
        while not self._closing.is_set():
            try:
                self.producer.poll(SERVE_INTERVAL_S)
            except (confluent_kafka.KafkaException, SystemError) as exception:
                error = _raised(exception)
                if error.fatal():  # every send fails from now on; the loop hears it at flush
                    self._fatal = error
                    return
                log.warning("the producer reports an error", error=str(error))

    def send(self, message: Outgoing) -> Future:
        future = Future()

        def report(error: confluent_kafka.KafkaError | None, _: Message) -> None:
            if error is None:
                future.success(None)
            else:
                future.failure(translated(error))

        placed = {} if message.partition is None else {"partition": message.partition}
        try:
            self.producer.produce(
                message.topic,
                message.value,
                message.key,
                on_delivery=report,
                headers=message.headers or None,
                **placed,
            )
        except BufferError:  # the queue is full: the delivery sends it again later
            return future.failure(KafkaError("the producer's queue is full"))
        except confluent_kafka.KafkaException as exception:
            return future.failure(translated(exception.args[0]))
        return future

    def flush(self, timeout: float | None = None) -> None:
        """Wait for the delivery reports; `ProducerFencedError` once the producer has ended
        (its sends then fail as purged, which says less)."""
        with _translating():
            self.producer.flush() if timeout is None else self.producer.flush(timeout)
        if self._fatal is not None:
            raise translated(self._fatal)

    def begin_transaction(self) -> None:
        with _translating():
            self.producer.begin_transaction()

    def commit_transaction(self, offsets: Offsets, group: object) -> None:
        with _translating():
            if offsets:
                self.producer.send_offsets_to_transaction(_offsets(offsets), group)
            self.producer.commit_transaction()

    def abort_transaction(self) -> None:
        with _translating():
            self.producer.abort_transaction()

    def partition_count(self, topic: str) -> int:
        with _translating():
            metadata = self.producer.list_topics(topic, timeout=BOOTSTRAP_TIMEOUT_MS / 1000)
        return len(metadata.topics[topic].partitions)

    def close(self, timeout: float) -> None:
        self._closing.set()
        self._server.join()
        with contextlib.suppress(KafkaError):  # ended: nothing to wait for
            self.flush(timeout)


def producer_config(settings: Settings) -> dict[str, Any]:
    """The daemon's producer: idempotent, acknowledged by all in-sync replicas, transactional
    under exactly_once. Secrets are unwrapped here: never log the result."""
    kafka = settings.kafka
    config = _common(settings) | {
        "acks": "all",
        "enable.idempotence": True,
        "linger.ms": kafka.linger_ms,
        "compression.type": kafka.compression_type or "none",
    }
    if exactly_once(settings):
        config["transactional.id"] = transactional_id(settings)
    return config


def consumer_config(settings: Settings) -> dict[str, Any]:
    """The daemon's group consumer: commits only when told to (after the outputs are
    acknowledged). Secrets are unwrapped here: never log the result."""
    kafka = settings.kafka
    return _common(settings) | {
        "group.id": kafka.group_id,
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "auto.offset.reset": kafka.auto_offset_reset,
        "session.timeout.ms": kafka.session_timeout_ms,
        # Under exactly_once, an upstream transactional producer's aborted records are skipped.
        "isolation.level": "read_committed" if exactly_once(settings) else "read_uncommitted",
        "partition.assignment.strategy": "cooperative-sticky",
        "fetch.max.bytes": kafka.fetch_max_bytes,
        "max.partition.fetch.bytes": kafka.max_partition_fetch_bytes,
        # Records are returned as soon as there is one; the wait bounds how long an idle
        # fetch holds the connection, and a request queued behind it (500 ms by default).
        "fetch.min.bytes": 1,
        "fetch.wait.max.ms": FETCH_WAIT_MS,
    }


def _common(settings: Settings) -> dict[str, Any]:
    return settings.kafka.librdkafka_options() | {"error_cb": _report, "logger": LIBRDKAFKA_LOG}


def open_clients(settings: Settings) -> tuple[ConfluentOutputs, ConfluentConsumer]:
    """The producer, with the metadata of every output topic and its transactions initialised
    under exactly_once (fencing a predecessor), and the consumer, with the input's metadata;
    `KafkaError` while the broker cannot be reached."""
    timeout_s = BOOTSTRAP_TIMEOUT_MS / 1000
    with _translating():
        producer = Producer(producer_config(settings))
        outputs = ConfluentOutputs(producer)
        try:
            for topic in output_topics(settings):
                producer.list_topics(topic, timeout=timeout_s)
            if exactly_once(settings):
                producer.init_transactions(timeout_s)
            keyed = settings.kafka.key_field is None
            consumer = ConfluentConsumer(consumer_config(settings), keyed)
            consumer.consumer.list_topics(settings.topics.input, timeout=timeout_s)
        except confluent_kafka.KafkaException:
            outputs.close(0)
            raise
    return outputs, consumer


def _report(error: confluent_kafka.KafkaError) -> None:
    """librdkafka's errors outside any call (a broker down, reconnecting): it retries them
    itself, so they are logged, and a fatal one stops at the next call that meets it."""
    log.warning("librdkafka reports an error", error=str(error), fatal=error.fatal())
