"""The `detector run` daemon: poll a micro-batch, score it, publish, and only then commit.

One thread does the Kafka work. Each round it takes a new model if the watcher has one ready,
restores the key state of newly assigned partitions (`detector.state.restore`), collects
records until `batching.max_batch` or `batching.max_latency_ms`, hands their raw bytes to the
engine, and publishes the alerts and dead letters. Under `at_least_once` the round does not
wait for their acknowledgement: it stays in flight (`detector.stream.inflight`) while the next
rounds poll and score, and the offsets it covers are committed (asynchronously) once the broker
acknowledged every output of it and of the rounds before it. Nothing is committed that is not
acknowledged, so a crash or an outage at any point repeats work (alerts with the same
`alert_id`) but loses none; a revocation and the shutdown wait for everything in flight, and
the shutdown commits synchronously; a periodic snapshot waits in line behind the rounds before
it, and is sent once they are acknowledged. Under `exactly_once` the outputs, the offsets and
any state snapshot of a batch are one Kafka transaction, committed before the next round (a
transaction must end before the next begins): a crash aborts the batch, the restarted instance
restores the state the transaction left, and read_committed consumers see each alert once.
Every `processing.snapshot_interval_s`, at revocation and at shutdown, each partition's key
state goes to the compacted state topic (`detector.state.snapshots`).

kafka-python 3 runs the consumer's network I/O, and the rebalance listener, on its own
thread, and only while this thread waits in `poll()` or `close()`; the listener may therefore
finish and commit the batch in hand without locks, but must not call the consumer's
blocking methods (it awaits `commit_async` instead).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import orjson
import structlog
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.consumer.subscription_state import AsyncConsumerRebalanceListener
from kafka.errors import CommitFailedError, KafkaError, ProducerFencedError
from kafka.future import Future
from kafka.structs import OffsetAndMetadata

from detector.alerts import Alert
from detector.config import Settings
from detector.engine import Counters, Engine, EngineOptions
from detector.manifest import ModelContractError
from detector.ops.http import Health, OpsServer
from detector.ops.logs import bind_model_version
from detector.ops.metrics import Metrics
from detector.ops.model_watch import ModelWatcher, load_scorer
from detector.ops.systemd import SystemdNotifier
from detector.records import DeadLetter, PolledRecord, Source
from detector.scorer import Scorer
from detector.state.restore import (
    KafkaRestoreSource,
    RestoreError,
    input_records,
    restore_partition,
)
from detector.state.snapshots import KeyHistory, StateCopy, fingerprint, snapshot_records
from detector.stream.clients import (
    TopicError,
    ensure_topics,
    make_admin,
    make_consumer,
    make_producer,
    state_topic,
)
from detector.stream.inflight import InFlight, Outgoing

__all__ = ["Daemon", "InHand", "engine_options"]

log = structlog.get_logger(__name__)

#: How long an idle poll waits; bounds how late a stop request or a new model is noticed.
IDLE_POLL_MS = 200
#: One wait for acknowledgements; the wait is repeated until they come (or shutdown ends).
FLUSH_STEP_S = 1.0
#: Input records, in batches of `batching.max_batch`, whose rounds may wait for
#: acknowledgement while the next rounds are polled and scored; beyond it the loop waits.
#: Bounds how far the commit lags, e.g. in an outage. Counted in records, not rounds: when
#: the stream is caught up, rounds are small and many are in flight at once.
BATCHES_IN_FLIGHT = 4
COMMIT_TIMEOUT_MS = 5_000
PROBE_INTERVAL_S = 2.0
PROBE_TIMEOUT_MS = 2_000
STATUS_INTERVAL_S = 10.0
EXIT_OK, EXIT_FAILURE = 0, 1
#: Dead letters are cut to this: an input record near the broker's 1 MB limit, plus headers,
#: would exceed the producer's request size and be retried forever.
MAX_DEAD_LETTER_BYTES = 900 * 1024


def engine_options(settings: Settings) -> EngineOptions:
    return EngineOptions(
        max_batch=settings.batching.max_batch,
        max_keys=settings.state.max_keys,
        key_ttl_s=settings.state.key_ttl_s,
        stride=settings.scoring.stride,
        threshold=settings.scoring.threshold,
        cooldown_events=settings.scoring.cooldown_events,
        max_record_bytes=settings.scoring.max_record_bytes,
        late_events=settings.scoring.late_events,
        late_grace_s=settings.scoring.late_grace_s,
    )


def alert_message(topic: str, alert: Alert) -> Outgoing:
    return Outgoing(topic, alert.key.encode(), orjson.dumps(alert.to_dict()), [], alert)


def dead_letter_message(topic: str, letter: DeadLetter) -> Outgoing:
    """The original bytes, untouched, with why and where from in the headers; only a payload
    too large to publish is cut, with its size in a `truncated_from` header."""
    source = letter.source or Source()
    headers = [("reason", letter.reason.encode()), ("detail", letter.detail.encode())]
    payload = letter.payload
    if len(payload) > MAX_DEAD_LETTER_BYTES:
        headers.append(("truncated_from", str(len(payload)).encode()))
        payload = payload[:MAX_DEAD_LETTER_BYTES]
    headers += [
        (f"source_{name}", str(value).encode())
        for name, value in (
            ("topic", source.topic),
            ("partition", source.partition),
            ("offset", source.offset),
        )
        if value is not None
    ]
    return Outgoing(topic, None, payload, headers)


@dataclass
class InHand:
    """Records polled but not processed, and offsets processed and acknowledged but not
    committed: together, what a revocation or a shutdown must settle."""

    records: list[PolledRecord] = field(default_factory=list)
    polled: dict[TopicPartition, int] = field(default_factory=dict)  # next offset
    acked: dict[TopicPartition, int] = field(default_factory=dict)
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

    def take(self) -> tuple[list[PolledRecord], np.ndarray, dict[TopicPartition, int]]:
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
        for offsets in (self.polled, self.acked):
            for partition in lost:
                offsets.pop(partition, None)
        self.runs = [(record.partition, 1) for record in self.records]


class Backoff:
    """Exponential delays between retries, reset after a success."""

    def __init__(self, first: float = 0.2, most: float = 5.0) -> None:
        self.first, self.most = first, most
        self.delay = first

    def next(self) -> float:
        delay, self.delay = self.delay, min(self.delay * 2, self.most)
        return delay

    def reset(self) -> None:
        self.delay = self.first


class Daemon:
    """Consumes `topics.input`, publishes to `topics.alerts` and `topics.dead_letters`."""

    def __init__(self, settings: Settings, notifier: SystemdNotifier | None = None) -> None:
        self.settings = settings
        self.notifier = notifier or SystemdNotifier.from_environment()
        self.metrics = Metrics()
        self.health = Health()
        self.ops = OpsServer(settings.http.host, settings.http.port, self.health, self.metrics)
        self.engine: Engine | None = None
        self.watcher: ModelWatcher | None = None
        self.consumer: KafkaConsumer | None = None
        self.producer: KafkaProducer | None = None
        self.in_hand = InHand()
        self.in_flight = InFlight(self._send)
        #: Makes the records of periodic snapshots off the loop (zlib releases the GIL).
        self._encoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="snapshot")
        self.totals = Counters()
        self._stop = threading.Event()
        self._stop_by: float | None = None
        self._keyed = settings.kafka.key_field is None
        self._exactly_once = settings.processing.guarantee == "exactly_once"
        self._state_topic = state_topic(settings)
        #: Assigned partitions whose key state is not restored yet (paused meanwhile).
        self._restoring: set[TopicPartition] = set()
        #: Per partition: the next offset whose record is not in the key state yet.
        self._applied: dict[TopicPartition, int] = {}
        self._generation: dict[TopicPartition, int] = {}
        #: Per partition: its keys as the last snapshot (or the restore) left them.
        self._histories: dict[TopicPartition, KeyHistory] = {}
        self._next_snapshot = time.monotonic() + settings.processing.snapshot_interval_s
        self._fenced = False
        #: Since when a rebalance is under way (a revocation, no assignment yet); no restore
        #: runs meanwhile, since the consumer's blocking calls it makes can stall the join.
        self._rebalance_since: float | None = None
        self._rejoin_after_s = 2 * settings.kafka.session_timeout_ms / 1000
        self._commit_backoff = Backoff()
        self._poll_backoff = Backoff()
        self._resend_backoff = Backoff()
        self._next_resend = 0.0
        self._next_commit = 0.0
        #: The offsets of the asynchronous commit under way, if any.
        self._committing: dict[TopicPartition, int] | None = None
        self._next_probe = 0.0
        self._next_status = 0.0
        self._next_watchdog = 0.0
        self._watchdog_interval = self.notifier.watchdog_interval()
        self._announced_ready = False

    # -- control, from signal handlers ---------------------------------------------------------

    def request_stop(self) -> None:
        """Finish the batch in hand, commit and leave; `processing.shutdown_timeout_s` from now."""
        if not self._stop.is_set():
            self._stop_by = time.monotonic() + self.settings.processing.shutdown_timeout_s
            self._stop.set()

    def request_reload(self) -> None:
        if self.watcher is not None:
            self.watcher.request()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def _out_of_time(self) -> bool:
        return self._stop_by is not None and time.monotonic() >= self._stop_by

    # -- life cycle --------------------------------------------------------------------------

    def run(self) -> int:
        """Serve until asked to stop; the exit status (0: everything processed was committed)."""
        log.info("starting", settings=self.settings.masked())
        self.health.beat()  # alive from the start; ready only later
        self.ops.start()
        log.info("ops endpoints listening", host=self.settings.http.host, port=self.ops.port)
        try:
            failure = self._start()
            if failure is not None:
                return failure
            while not self._stop.is_set():
                self._round()
            return self._shutdown()
        finally:
            self._encoder.shutdown(cancel_futures=True)
            if self.watcher is not None:
                self.watcher.stop()
            self.ops.stop()
            self.notifier.close()

    def _start(self) -> int | None:
        """Load the model, then connect; an exit status when the daemon cannot serve."""
        try:
            scorer = load_scorer(self.settings.model)
            self.engine = Engine(scorer, engine_options(self.settings))
        except (ModelContractError, ValueError) as error:
            log.error("cannot serve the model", error=str(error))
            return EXIT_FAILURE
        self._serving(scorer)
        self.watcher = ModelWatcher(
            self.settings.model, scorer.manifest.model_version, self._model_refused
        )
        self.watcher.start()
        try:
            self._connect()
        except TopicError as error:
            log.error("cannot start", error=str(error))
            return EXIT_FAILURE
        return None

    def _serving(self, scorer: Scorer) -> None:
        manifest = scorer.manifest
        key_field = self.settings.kafka.key_field
        if key_field is not None and key_field != manifest.columns.key:
            log.warning(
                "kafka.key_field differs from the model's key column, which is what is read",
                key_field=key_field,
                model_key_column=manifest.columns.key,
            )
        bind_model_version(manifest.model_version)
        self.metrics.set_model(manifest, scorer.source)
        self.health.model_version = manifest.model_version
        self.health.model_loaded = True

    def _model_refused(self, error: str) -> None:
        self.metrics.model_reloads.labels("refused").inc()

    def _connect(self) -> None:
        """Check the topics and create the clients, retrying while the broker is unreachable."""
        settings = self.settings
        backoff = Backoff(0.5, 10.0)
        while not self._stop.is_set():
            self.health.beat()
            producer = consumer = None
            try:
                admin = make_admin(settings)
                try:
                    created = ensure_topics(admin, settings)
                finally:
                    admin.close()
                if created:
                    log.info("created topics", topics=created)
                producer = make_producer(settings)
                topics = (settings.topics.alerts, settings.topics.dead_letters, self._state_topic)
                for topic in topics:
                    producer.partitions_for(topic)  # metadata now: send() never waits for it
                if self._exactly_once:  # fences a predecessor with the same id, aborting its batch
                    producer.init_transactions()
                consumer = make_consumer(settings)
                # Metadata first: a group leader without it assigns nothing, and may not
                # notice the topic's partitions for a long while.
                consumer.partitions_for_topic(settings.topics.input)
                consumer.subscribe([settings.topics.input], listener=_Rebalance(self))
            except KafkaError as error:
                for client in (producer, consumer):
                    if client is not None:
                        client.close()
                delay = backoff.next()
                self.health.broker_reachable = False
                log.warning("Kafka is not reachable; retrying", error=str(error), retry_in_s=delay)
                self._stop.wait(delay)
                continue
            self.producer, self.consumer = producer, consumer
            self.health.broker_reachable = True
            log.info(
                "connected",
                input=settings.topics.input,
                group_id=settings.kafka.group_id,
                alerts=settings.topics.alerts,
                dead_letters=settings.topics.dead_letters,
                state=self._state_topic,
                guarantee=settings.processing.guarantee,
            )
            return

    def _shutdown(self) -> int:
        """Settle what is in hand within the shutdown budget, commit, leave the group."""
        self.notifier.stopping()
        log.info("stopping: finishing the batch in hand")
        clean = True
        if self.consumer is not None:
            if self.in_hand.records:
                clean = self._settle_records()
            clean = self._drain() and clean
            clean = self._commit_until_done() and clean
            if clean and not self._fenced:
                clean = self._save_state(set(self._applied) - self._restoring)
            remaining_ms = int(max(1.0, (self._stop_by or 0) - time.monotonic()) * 1000)
            self.consumer.close(autocommit=False, timeout_ms=remaining_ms)
        if self.producer is not None:
            self.producer.close(timeout=max(1.0, (self._stop_by or 0) - time.monotonic()))
        if clean and not self._fenced:
            log.info("stopped; every processed record is committed", **self._summary())
            return EXIT_OK
        log.error(
            "stopped before everything was acknowledged and committed; "
            "the uncommitted records will be processed again at the next start",
            **self._summary(),
        )
        return EXIT_FAILURE

    # -- one round -------------------------------------------------------------------------

    def _round(self) -> None:
        self._tick()
        assert self.watcher is not None and self.engine is not None
        if (scorer := self.watcher.take()) is not None:
            if not self.engine.swap_model(scorer):
                self._histories.clear()  # every key starts again, as it should
            self._serving(scorer)
            self.metrics.model_reloads.labels("loaded").inc()
        self._check_join()
        if self._restoring and self._rebalance_since is None:
            self._restore_pending()
        try:
            self._collect()
        except KafkaError as error:
            delay = self._poll_backoff.next()
            log.warning("poll failed; retrying", error=str(error), retry_in_s=delay)
            time.sleep(delay)
        else:
            self._poll_backoff.reset()
        if self.in_hand.records and not self._stop.is_set():
            self._settle_records()
        if not self._exactly_once:
            self._settle_in_flight()
            if self._snapshot_due():
                self._hold_snapshot()
        self._probe()

    def _collect(self) -> None:
        """Poll until a batch is full, `max_latency_ms` passed since its first record, the
        stream is idle, or a stop is requested; with `max_latency_ms` 0 (the default), what
        one poll returns: every record the consumer holds, up to `max_batch`."""
        assert self.consumer is not None
        batching = self.settings.batching
        hand = self.in_hand
        first_at: float | None = None
        while len(hand.records) < batching.max_batch and not self._stop.is_set():
            if first_at is None:
                timeout_ms = IDLE_POLL_MS
            else:
                timeout_ms = batching.max_latency_ms - (time.monotonic() - first_at) * 1000
                if timeout_ms <= 0:
                    return
            polled = self.consumer.poll(
                timeout_ms=int(timeout_ms), max_records=batching.max_batch - len(hand.records)
            )
            self.health.beat()
            if polled:
                hand.add(polled, self._keyed)
                first_at = first_at or time.monotonic()
            elif first_at is None:
                return

    def _settle_records(self) -> bool:
        """Score the records in hand and publish the results; their offsets become committable
        once every alert and dead letter is acknowledged (at_least_once: later, the round is
        in flight meanwhile). False if the exactly_once transaction failed."""
        assert self.engine is not None
        records, partitions, polled = self.in_hand.take()
        started = time.perf_counter()
        result = self.engine.process(records, partitions=partitions)
        seconds = time.perf_counter() - started
        self._applied.update(polled)
        self.totals.add(result.counters)
        self.metrics.observe_batch(result.counters, len(records), seconds, self.engine.keys)
        topics = self.settings.topics
        outgoing = [alert_message(topics.alerts, alert) for alert in result.alerts]
        outgoing += [dead_letter_message(topics.dead_letters, d) for d in result.dead_letters]
        if self._exactly_once:
            if self._snapshot_due():
                outgoing += self._snapshot(set(self._applied) - self._restoring)
            return self._transact(outgoing, polled)
        self.in_flight.add(outgoing, polled, len(records))
        return True

    # -- key state ---------------------------------------------------------------------------

    def _snapshot_due(self) -> bool:
        return time.monotonic() >= self._next_snapshot

    def _snapshot(self, partitions: Iterable[TopicPartition]) -> list[Outgoing]:
        """Snapshot records of the key state of `partitions`, valid at their applied offsets."""
        return self._copy_state(partitions)()

    def _copy_state(self, partitions: Iterable[TopicPartition]) -> Callable[[], list[Outgoing]]:
        """Copy the key state of `partitions` as it is now, valid at their applied offsets; the
        function returned makes the snapshot records of the copies. Making them (compression:
        0.3 s per 10,000 stateful keys) needs nothing of the daemon's, so it can run on
        another thread while the loop goes on."""
        assert self.engine is not None
        self._next_snapshot = time.monotonic() + self.settings.processing.snapshot_interval_s
        arena = self.engine.arena
        copies = []
        for tp in sorted(partitions):
            generation = self._generation.get(tp, 0)
            self._generation[tp] = generation + 1
            fields = arena.export(arena.slots_of([tp.partition]))
            self._continues(tp, KeyHistory.of(fields, arena.evicted), "snapshot")
            where = (self._state_topic, self._state_partition(tp))
            copies.append(StateCopy(tp, self._applied[tp], generation, fields, *where))
            self.metrics.snapshots.inc()
        return partial(snapshot_records, copies, fingerprint(self.engine.manifest))

    def _state_partition(self, tp: TopicPartition) -> int:
        assert self.producer is not None
        return tp.partition % len(self.producer.partitions_for(self._state_topic))

    def _save_state(self, partitions: set[TopicPartition]) -> bool:
        """Write the snapshots of `partitions` now (in a transaction of their own under
        exactly_once); False if that did not happen."""
        if not partitions:
            return True
        if self._exactly_once:
            saved = self._transact(self._snapshot(partitions), {})
        else:
            # A snapshot valid at offset S may be written only once every output of the
            # records before S is acknowledged: a restore resumes at S when S is ahead of
            # the commit.
            saved = self._drain() and self._publish(self._snapshot(partitions))
        if saved:
            log.info("key state saved", partitions=_names(partitions))
        return saved

    def _hold_snapshot(self) -> None:
        """The periodic snapshot under at_least_once: the key state now, sent once every output
        before it is acknowledged while the next rounds go on (waiting for that and for the
        snapshot's own acknowledgement stopped the loop for about 0.4 s at 10,000 keys). The
        records are made on the encoder thread meanwhile."""
        partitions = set(self._applied) - self._restoring
        if partitions:
            self.in_flight.hold(self._encoder.submit(self._copy_state(partitions)).result)
            log.info("key state snapshot queued", partitions=_names(partitions))

    def _restore_pending(self) -> None:
        """Restore the key state of the partitions assigned since the last round."""
        assert self.consumer is not None and self.engine is not None
        for tp in sorted(self._restoring):
            try:
                committed = self.consumer.committed(tp)
                beginning = self.consumer.beginning_offsets([tp])[tp]
                if committed is None:
                    fresh = self.settings.kafka.auto_offset_reset == "earliest"
                    committed = beginning if fresh else self.consumer.end_offsets([tp])[tp]
                restored = restore_partition(
                    KafkaRestoreSource(self.settings),
                    self.engine,
                    tp,
                    committed,
                    beginning,
                    self.metrics.restore_replayed.inc,
                )
            except (KafkaError, RestoreError) as error:
                delay = self._poll_backoff.next()
                log.warning("restoring key state failed; retrying", error=str(error))
                time.sleep(delay)
                return
            self.consumer.seek(tp, restored.resume_at)
            self.consumer.resume(tp)
            self._restoring.discard(tp)
            self._applied[tp] = restored.resume_at
            self._generation[tp] = restored.generation
            if restored.recorded is not None:
                self._histories[tp] = restored.recorded
            self._continues(tp, restored.history, "restore")
            self._restoring_changed()
            self.metrics.restore_seconds.labels(restored.snapshot).observe(restored.seconds)
            self.metrics.active_keys.set(self.engine.keys)
            log.info(
                "key state restored",
                partition=_names([tp])[0],
                snapshot=restored.snapshot,
                replayed=restored.replayed,
                resume_at=restored.resume_at,
                seconds=round(restored.seconds, 3),
            )

    def _continues(self, tp: TopicPartition, history: KeyHistory, at: str) -> None:
        """Check that the keys of `tp` continue what was last recorded of them, and record
        `history` in its place: a key whose state went missing (a bug: its next events start
        a new history, and alerts differ from an uninterrupted run's) is counted and logged."""
        recorded, self._histories[tp] = self._histories.get(tp), history
        lost = [] if recorded is None else recorded.lost(history, self.settings.state.key_ttl_s)
        if lost:
            self.metrics.lost_keys.labels(at).inc(len(lost))
            log.error(
                "key state lost",
                partition=_names([tp])[0],
                at=at,
                keys=len(lost),
                examples=[{"key": k, "recorded": n, "found": m} for k, n, m in lost[:5]],
            )

    def _forget(self, partitions: Iterable[TopicPartition]) -> None:
        """Drop the key state of partitions that are no longer ours."""
        gone = set(partitions)
        if self.engine is not None and gone:
            arena = self.engine.arena
            arena.release(arena.slots_of([tp.partition for tp in gone]))
            self.metrics.active_keys.set(self.engine.keys)
        for tp in gone:
            self._applied.pop(tp, None)
            self._generation.pop(tp, None)
            self._histories.pop(tp, None)
        self._restoring -= gone
        self._restoring_changed()

    def _restoring_changed(self) -> None:
        self.health.restoring = len(self._restoring)
        self.metrics.restoring_partitions.set(len(self._restoring))

    # -- exactly once ----------------------------------------------------------------------

    def _transact(self, outgoing: list[Outgoing], offsets: dict[TopicPartition, int]) -> bool:
        """Publish `outgoing` and commit `offsets` in one transaction. On failure the
        transaction is aborted and every assigned partition's state is restored again (the
        engine moved past what the broker now holds); False then."""
        assert self.producer is not None and self.consumer is not None
        producer = self.producer
        try:
            producer.begin_transaction()
            futures = [self._send(message) for message in outgoing]
            producer.flush()
            if failed := next((f for f in futures if f.failed()), None):
                raise failed.exception
            if offsets:
                committing = {tp: OffsetAndMetadata(n, "", -1) for tp, n in offsets.items()}
                producer.send_offsets_to_transaction(committing, self.consumer.group_metadata())
            producer.commit_transaction()
        except ProducerFencedError as error:
            self._fenced = True
            log.error(
                "another instance took over this transactional id; stopping", error=str(error)
            )
            self.request_stop()
            return False
        except KafkaError as error:
            self.health.broker_reachable = False
            log.warning("transaction failed; aborting and restoring state", error=str(error))
            self._abort()
            return False
        now = time.time()
        self.metrics.observe_alerts(now - m.alert.event_time for m in outgoing if m.alert)
        self.health.broker_reachable = True
        return True

    def _abort(self) -> None:
        assert self.producer is not None and self.consumer is not None
        try:
            self.producer.abort_transaction()
        except KafkaError as error:
            self._fenced = True
            log.error("cannot abort the transaction; stopping", error=str(error))
            self.request_stop()
        assigned = self.consumer.assignment()
        self.in_hand.drop(assigned)
        self._forget(assigned)
        self._restore(assigned)

    def _restore(self, partitions: set[TopicPartition]) -> None:
        """Pause `partitions` until their key state is restored between two rounds."""
        assert self.consumer is not None
        if partitions:
            self.consumer.pause(*partitions)
        self._restoring |= partitions
        self._restoring_changed()

    def _publish(self, outgoing: list[Outgoing]) -> bool:
        """Send and wait for every acknowledgement (and those of the rounds in flight),
        sending again what failed; False only when the shutdown budget ran out first."""
        self.in_flight.add(outgoing, {})
        return self._drain()

    def _settle_in_flight(self) -> None:
        """Between rounds: take what is acknowledged, wait only when the rounds in flight read
        too many records, and commit what became committable (asynchronously)."""
        self._release()
        most = BATCHES_IN_FLIGHT * self.settings.batching.max_batch
        if self.in_flight.records > most:
            self._drain(most)
        self._try_commit()

    def _drain(self, most_records: int = -1) -> bool:
        """Wait until nothing is in flight, or with `most_records` until the rounds in flight
        read at most that many records, sending again what failed; False only when the
        shutdown budget ran out first."""
        assert self.producer is not None
        while self._release() and self.in_flight.records > most_records:
            if self._out_of_time():
                return False
            self._tick()
            if self.in_flight.pending():
                try:
                    self.producer.flush(timeout=FLUSH_STEP_S)
                except KafkaError:
                    self.health.broker_reachable = False
            else:  # every send answered, some failed: wait for the next attempt
                time.sleep(min(FLUSH_STEP_S, max(0.0, self._next_resend - time.monotonic())))
        return True

    def _release(self) -> int:
        """Make the offsets of acknowledged rounds committable and send failures again when
        their back-off is over; the rounds still in flight."""
        offsets, acknowledged = self.in_flight.release()
        if offsets or acknowledged:
            self.in_hand.acked.update(offsets)
            now = time.time()
            self.metrics.observe_alerts(now - m.alert.event_time for m in acknowledged if m.alert)
        if (errors := self.in_flight.failures()) and time.monotonic() >= self._next_resend:
            count = self.in_flight.resend()
            log.warning(
                "publishing failed; sending again",
                count=count,
                errors=sorted({str(error) for error in errors}),
            )
            self.metrics.publish_retries.inc(count)
            self.health.broker_reachable = False
            self._next_resend = time.monotonic() + self._resend_backoff.next()
        elif not errors:
            self._resend_backoff.reset()
        return len(self.in_flight)

    def _send(self, message: Outgoing) -> Future:
        assert self.producer is not None
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

    # -- commits ---------------------------------------------------------------------------

    def _try_commit(self) -> None:
        """Commit the acknowledged offsets asynchronously: the request goes out while the next
        round polls, and its outcome comes back through `_committed` in a later poll. One
        commit at a time, at most one per `kafka.commit_interval_ms`, none while a failed one
        backs off."""
        acked = self.in_hand.acked
        if not acked or self._committing is not None or time.monotonic() < self._next_commit:
            return
        assert self.consumer is not None
        self._committing = dict(acked)
        self._next_commit = time.monotonic() + self.settings.kafka.commit_interval_ms / 1000
        try:
            self.consumer.commit_async(self._offsets(), callback=self._committed)
        except KafkaError as error:
            self._committed({}, error)

    def _committed(self, offsets: object, outcome: Exception | None) -> None:
        """The outcome of an asynchronous commit: forget what it committed (unless acknowledged
        further meanwhile), or back off and commit again later."""
        committing, self._committing = self._committing or {}, None
        if isinstance(outcome, Exception):
            self.metrics.commit_failures.inc()
            if not isinstance(outcome, CommitFailedError):  # that one: a rebalance
                self.health.broker_reachable = False
            delay = self._commit_backoff.next()
            self._next_commit = time.monotonic() + delay
            log.warning("commit failed; retrying", error=str(outcome), retry_in_s=delay)
            return
        acked = self.in_hand.acked
        for tp, offset in committing.items():
            if acked.get(tp) == offset:
                del acked[tp]
        self._commit_backoff.reset()
        self.health.broker_reachable = True

    def _commit_until_done(self) -> bool:
        """At shutdown: retry the commit until it succeeds or the budget is spent."""
        while self.in_hand.acked:
            committed = self._commit_once()
            if committed is not None:
                return committed
            if self._out_of_time():
                return False
            time.sleep(max(0.0, self._next_commit - time.monotonic()))
        return True

    def _commit_once(self) -> bool | None:
        """True: committed; None: failed, retry later; False: the group moved on without us."""
        assert self.consumer is not None
        offsets = self._offsets()
        try:
            self.consumer.commit(offsets, timeout_ms=COMMIT_TIMEOUT_MS)
        except CommitFailedError as error:
            self.metrics.commit_failures.inc()
            log.warning(
                "commit refused after a rebalance; the new owner processes these records again",
                error=str(error),
            )
            self.in_hand.acked.clear()
            return False
        except KafkaError as error:
            self.metrics.commit_failures.inc()
            self.health.broker_reachable = False
            delay = self._commit_backoff.next()
            self._next_commit = time.monotonic() + delay
            log.warning("commit failed; retrying", error=str(error), retry_in_s=delay)
            return None
        self.in_hand.acked.clear()
        self._commit_backoff.reset()
        self.health.broker_reachable = True
        return True

    def _offsets(self) -> dict[TopicPartition, OffsetAndMetadata]:
        return {tp: OffsetAndMetadata(n, "", -1) for tp, n in self.in_hand.acked.items()}

    # -- health, lag, systemd --------------------------------------------------------------

    def _tick(self) -> None:
        """The loop is alive: feed the liveness probe and systemd's watchdog, update STATUS."""
        self.health.beat()
        now = time.monotonic()
        if self._watchdog_interval and now >= self._next_watchdog:
            self.notifier.watchdog()
            self._next_watchdog = now + self._watchdog_interval
        if now >= self._next_status:
            self._next_status = now + STATUS_INTERVAL_S
            summary = self._summary()
            self.notifier.status(
                f"model {summary['model_version']}: {summary['partitions']} partitions, "
                f"{summary['records']} records, {summary['alerts']} alerts, "
                f"{summary['dead_letters']} dead letters"
            )
        if not self._announced_ready and self.health.not_ready_reason() is None:
            self._announced_ready = True
            self.notifier.ready()
            log.info("ready", partitions=self.health.partitions)

    def _probe(self) -> None:
        """Every few seconds: ask the broker for the end offsets (reachability and lag)."""
        assert self.consumer is not None
        now = time.monotonic()
        if now < self._next_probe:
            return
        self._next_probe = now + PROBE_INTERVAL_S
        assigned = self.consumer.assignment()
        if self._rebalance_since is not None or not assigned:
            return
        self.health.partitions = len(assigned)
        try:
            ends = self.consumer.end_offsets(list(assigned), timeout_ms=PROBE_TIMEOUT_MS)
            positions = {
                tp: self.consumer.position(tp, timeout_ms=PROBE_TIMEOUT_MS) for tp in assigned
            }
        except KafkaError as error:
            if self.health.broker_reachable:
                log.warning("the Kafka broker stopped answering", error=str(error))
            self.health.broker_reachable = False
            return
        if not self.health.broker_reachable:
            log.info("the Kafka broker answers again")
        self.health.broker_reachable = True
        self.metrics.set_lag({tp: max(0, ends[tp] - positions[tp]) for tp in assigned})

    def _summary(self) -> dict[str, Any]:
        totals = self.totals
        return {
            "model_version": self.health.model_version,
            "partitions": self.health.partitions,
            "records": totals.records,
            "alerts": totals.alerts,
            "dead_letters": totals.dead_letters,
        }

    # -- rebalances, called on the consumer's network thread -------------------------------

    def partitions_revoked(
        self, revoked: set[TopicPartition]
    ) -> dict[TopicPartition, OffsetAndMetadata]:
        """Settle what is in hand and in flight, and save the revoked partitions' key state;
        the offsets to commit before the partitions go."""
        records = len(self.in_hand.records)
        settled = self._settle_records() if records else True
        if not self._exactly_once:
            settled = self._drain() and settled
        if records and settled:
            log.info("settled the records in hand before a revocation", records=records)
        if not self._fenced:
            self._save_state(revoked & set(self._applied) - self._restoring)
        self._forget(revoked)
        offsets = self._offsets()
        self.in_hand.acked.clear()
        return offsets

    def partitions_assigned(self, partitions: set[TopicPartition]) -> None:
        """Restore every assigned partition whose key state is neither here nor coming: the
        new ones, and those revoked and given back (still paused from before, kafka-python
        keeps their state)."""
        assert self.consumer is not None
        assigned = self.consumer.assignment()
        self.health.partitions = len(assigned)
        self._next_probe = 0.0
        self._rebalance_since = None
        self._restore(assigned - set(self._applied) - self._restoring)
        if partitions:
            log.info("partitions assigned", partitions=_names(partitions))

    def rebalance_started(self) -> None:
        """Not ready until the assignment: every partition is revoked meanwhile (eager)."""
        self._rebalance_since = self._rebalance_since or time.monotonic()
        self.health.partitions = 0

    def _check_join(self) -> None:
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
        assert self.consumer is not None
        log.warning(
            "the group's rebalance did not end; joining again",
            waited_s=round(time.monotonic() - since, 1),
        )
        self.consumer.unsubscribe()
        self.consumer.subscribe([self.settings.topics.input], listener=_Rebalance(self))
        self._rebalance_since = time.monotonic()

    def partitions_lost(self, partitions: set[TopicPartition]) -> None:
        self.rebalance_started()
        self.in_hand.drop(partitions)
        self.in_flight.drop(partitions)
        self._forget(partitions)
        self.metrics.forget_partitions(partitions)
        assert self.consumer is not None
        self.health.partitions = len(self.consumer.assignment())
        log.warning("partitions lost", partitions=_names(partitions))


def _names(partitions: Iterable[TopicPartition]) -> list[str]:
    return sorted(f"{tp.topic}[{tp.partition}]" for tp in partitions)


class _Rebalance(AsyncConsumerRebalanceListener):
    """Commits what is in hand before partitions are revoked; async, so that the awaited
    commit runs on the network thread the listener itself is called on."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        daemon = self.daemon
        daemon.rebalance_started()
        if not revoked:
            return
        if daemon.stopping:  # closing: the shutdown has committed, or could not
            daemon.metrics.forget_partitions(revoked)
            return
        offsets = daemon.partitions_revoked(revoked)
        if offsets and daemon.consumer is not None:
            try:
                await daemon.consumer.commit_async(offsets)
            except KafkaError as error:
                daemon.metrics.commit_failures.inc()
                log.warning("commit before revocation failed", error=str(error))
        daemon.metrics.forget_partitions(revoked)
        log.info("partitions revoked", partitions=_names(revoked))

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self.daemon.partitions_assigned(assigned)

    async def on_partitions_lost(self, lost: set[TopicPartition]) -> None:
        self.daemon.partitions_lost(lost)
