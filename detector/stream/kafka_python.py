"""The input consumer and the outputs on kafka-python (`kafka.client = "kafka-python"`).

kafka-python 3 runs the consumer's network I/O, and the rebalance listener, on its own
thread, and only while the loop's thread waits in `poll()` or `close()`; the listener may
therefore settle the records in hand without locks, but must not call the consumer's blocking
methods (it awaits `commit_async` instead).
"""

from __future__ import annotations

import time

import structlog
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.consumer.subscription_state import AsyncConsumerRebalanceListener
from kafka.errors import KafkaError
from kafka.future import Future

from detector.config import Settings
from detector.stream.clients import (
    make_consumer,
    make_producer,
    offset_metadata,
    output_topics,
)
from detector.stream.delivery import CommitCallback, Offsets
from detector.stream.messages import Outgoing
from detector.stream.reader import input_records
from detector.stream.source import Polled, RebalanceListener

__all__ = ["KafkaPythonConsumer", "KafkaPythonOutputs", "open_clients"]

log = structlog.get_logger(__name__)


class KafkaPythonConsumer:
    """`GroupConsumer` on a `KafkaConsumer`; `keyed`: the message key is the entity key."""

    def __init__(self, consumer: KafkaConsumer, keyed: bool, session_timeout_ms: int) -> None:
        self.consumer, self._keyed = consumer, keyed
        self._rejoin_after_s = 2 * session_timeout_ms / 1000
        self._topic = ""
        self._listener: _Listener | None = None
        #: Since when a rebalance is under way (a revocation, no assignment yet); no restore
        #: runs meanwhile, since the consumer's blocking calls it makes can stall the join.
        self._rebalance_since: float | None = None

    @property
    def rebalancing(self) -> bool:
        return self._rebalance_since is not None

    def subscribe(self, topic: str, listener: RebalanceListener) -> None:
        self._topic, self._listener = topic, _Listener(self, listener)
        self.consumer.subscribe([topic], listener=self._listener)

    def poll(self, timeout_ms: int, max_records: int) -> Polled:
        polled = self.consumer.poll(timeout_ms=timeout_ms, max_records=max_records)
        return [(tp, input_records(tp, messages, self._keyed)) for tp, messages in polled.items()]

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
        self.consumer.subscribe([self._topic], listener=self._listener)
        self._rebalance_since = time.monotonic()

    def assignment(self) -> set[TopicPartition]:
        return self.consumer.assignment()

    def lag(self, partitions: set[TopicPartition], timeout_ms: int) -> dict[TopicPartition, int]:
        ends = self.consumer.end_offsets(list(partitions), timeout_ms=timeout_ms)
        return {
            tp: max(0, ends[tp] - self.consumer.position(tp, timeout_ms=timeout_ms))
            for tp in partitions
        }

    def committed(self, partition: TopicPartition) -> int | None:
        return self.consumer.committed(partition)

    def beginning(self, partition: TopicPartition) -> int:
        return self.consumer.beginning_offsets([partition])[partition]

    def end(self, partition: TopicPartition) -> int:
        return self.consumer.end_offsets([partition])[partition]

    def pause(self, partitions: set[TopicPartition]) -> None:
        self.consumer.pause(*partitions)

    def resume(self, partition: TopicPartition, offset: int) -> None:
        self.consumer.seek(partition, offset)
        self.consumer.resume(partition)

    def commit_async(self, offsets: Offsets, callback: CommitCallback) -> None:
        self.consumer.commit_async(offset_metadata(offsets), callback=callback)

    def commit(self, offsets: Offsets, timeout_ms: int) -> None:
        self.consumer.commit(offset_metadata(offsets), timeout_ms=timeout_ms)

    def group_metadata(self) -> object:
        return self.consumer.group_metadata()

    def close(self, timeout_ms: int) -> None:
        self.consumer.close(autocommit=False, timeout_ms=timeout_ms)


class _Listener(AsyncConsumerRebalanceListener):
    """Commits what is settled before partitions are revoked; async, so that the awaited
    commit runs on the network thread the listener itself is called on. Every rebalance
    revokes every partition (kafka-python's assignors are eager)."""

    def __init__(self, consumer: KafkaPythonConsumer, listener: RebalanceListener) -> None:
        self.consumer, self.listener = consumer, listener

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        consumer = self.consumer
        consumer._rebalance_since = consumer._rebalance_since or time.monotonic()
        offsets = self.listener.revoked(revoked)
        error = None
        if offsets:
            try:
                await consumer.consumer.commit_async(offset_metadata(offsets))
            except KafkaError as failure:
                error = failure
        self.listener.revocation_committed(revoked, error)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self.consumer._rebalance_since = None
        self.listener.assigned(self.consumer.assignment())

    async def on_partitions_lost(self, lost: set[TopicPartition]) -> None:
        self.consumer._rebalance_since = self.consumer._rebalance_since or time.monotonic()
        self.listener.lost(lost)


class KafkaPythonOutputs:
    """`Outputs` on a `KafkaProducer`."""

    def __init__(self, producer: KafkaProducer) -> None:
        self.producer = producer

    def send(self, message: Outgoing) -> Future:
        try:
            return self.producer.send(
                message.topic,
                value=message.value,
                key=message.key,
                headers=message.headers,
                partition=message.partition,
            )
        except KafkaError as error:  # buffer full or no metadata for max_block_ms
            return Future().failure(error)

    def flush(self, timeout: float | None = None) -> None:
        self.producer.flush(timeout=timeout)

    def begin_transaction(self) -> None:
        self.producer.begin_transaction()

    def commit_transaction(self, offsets: Offsets, group: object) -> None:
        if offsets:
            self.producer.send_offsets_to_transaction(offset_metadata(offsets), group)
        self.producer.commit_transaction()

    def abort_transaction(self) -> None:
        self.producer.abort_transaction()

    def partition_count(self, topic: str) -> int:
        return len(self.producer.partitions_for(topic))

    def close(self, timeout: float) -> None:
        self.producer.close(timeout=timeout)


def open_clients(settings: Settings) -> tuple[KafkaPythonOutputs, KafkaPythonConsumer]:
    """The producer, with the metadata of every output topic (so that `send()` never waits
    for it) and its transactions initialised under exactly_once (fencing a predecessor), and
    the consumer, with the input's metadata; `KafkaError` while the broker cannot be reached."""
    producer = consumer = None
    try:
        producer = make_producer(settings)
        for topic in output_topics(settings):
            producer.partitions_for(topic)
        if producer.config["transactional_id"]:
            producer.init_transactions()
        consumer = make_consumer(settings)
        # Metadata first: a group leader without it assigns nothing, and may not notice the
        # topic's partitions for a long while.
        consumer.partitions_for_topic(settings.topics.input)
    except KafkaError:
        for client in (producer, consumer):
            if client is not None:
                client.close()
        raise
    kafka = settings.kafka
    return KafkaPythonOutputs(producer), KafkaPythonConsumer(
        consumer, kafka.key_field is None, kafka.session_timeout_ms
    )
