"""The `detector run` daemon: poll a micro-batch, score it, publish, and only then commit.

One thread runs the loop. Each round it takes a new model if the watcher has one ready
(`detector.ops.model_watch`), restores the key state of newly assigned partitions
(`detector.state.manager`), collects records until `batching.max_batch` or
`batching.max_latency_ms` (`detector.stream.source`), hands their raw bytes to the engine,
and publishes the alerts and dead letters. What publishing means, and when the offsets are
committed, is the delivery's (`detector.stream.delivery`): under `at_least_once` the round
stays in flight while the next rounds go on, under `exactly_once` it is one transaction;
either way nothing is committed before its outputs are acknowledged. Every
`processing.snapshot_interval_s`, at revocation and at shutdown, each partition's key state
goes to the compacted state topic (`detector.state.snapshots`), in line behind the outputs
of the records before it.
"""

from __future__ import annotations

import threading
import time

import structlog
from kafka import TopicPartition

from detector.config import Settings
from detector.contract.model_file import ModelContractError
from detector.engine.core import Engine, EngineOptions
from detector.engine.scorer import Scorer
from detector.ops import heap
from detector.ops.http import Health, OpsServer
from detector.ops.metrics import Metrics
from detector.ops.model_watch import ModelWatcher, load_scorer
from detector.ops.supervisor import Supervisor
from detector.ops.systemd import SystemdNotifier
from detector.state.manager import StateManager, names
from detector.stream.clients import TopicError, state_topic
from detector.stream.connection import connect
from detector.stream.delivery import Delivery, Offsets, Outputs, make_delivery
from detector.stream.messages import alert_message, dead_letter_message, state_messages
from detector.stream.reader import KafkaRestoreSource
from detector.stream.source import GroupConsumer, InputSource

__all__ = ["Daemon", "engine_options"]

log = structlog.get_logger(__name__)

EXIT_OK, EXIT_FAILURE = 0, 1


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


class Daemon:
    """Consumes `topics.input`, publishes to `topics.alerts` and `topics.dead_letters`."""

    engine: Engine
    source: InputSource
    delivery: Delivery
    state: StateManager

    def __init__(self, settings: Settings, notifier: SystemdNotifier | None = None) -> None:
        self.settings = settings
        self.metrics = Metrics()
        health = Health()
        notifier = notifier or SystemdNotifier.from_environment()
        self.supervisor = Supervisor(health, notifier, self.metrics)
        self.ops = OpsServer(settings.http.host, settings.http.port, health, self.metrics)
        self.watcher: ModelWatcher | None = None
        self.connected = False
        self._stop = threading.Event()
        self._stop_by: float | None = None

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

    def out_of_time(self) -> bool:
        """Whether the shutdown budget is spent."""
        return self._stop_by is not None and time.monotonic() >= self._stop_by

    def _time_left(self) -> float:
        """Seconds of the shutdown budget left, at least one."""
        return max(1.0, (self._stop_by or 0) - time.monotonic())

    # -- life cycle --------------------------------------------------------------------------

    def run(self) -> int:
        """Serve until asked to stop; the exit status (0: everything processed was committed)."""
        log.info("starting", settings=self.settings.masked())
        self.supervisor.beat()  # alive from the start; ready only later
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
            if self.watcher is not None:
                self.watcher.stop()
            self.ops.stop()
            self.supervisor.notifier.close()

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
            clients = connect(self.settings, self._stop, self.supervisor)
        except TopicError as error:
            log.error("cannot start", error=str(error))
            return EXIT_FAILURE
        if clients is not None:
            self._wire(*clients)
        return None

    def _wire(self, outputs: Outputs, consumer: GroupConsumer) -> None:
        """The loop's parts around the connected clients; then join the group."""
        settings, supervisor = self.settings, self.supervisor
        topic = state_topic(settings)
        self.source = source = InputSource(settings, consumer, supervisor)
        self.delivery = make_delivery(settings, outputs, source, supervisor, self)
        self.state = StateManager(
            settings,
            self.engine,
            KafkaRestoreSource(settings),
            source,
            supervisor,
            topic,
            lambda tp: tp.partition % outputs.partition_count(topic),
        )
        source.subscribe(self)
        self.connected = True
        heap.settle()  # the model, the clients and the modules are loaded: the heap to keep
        log.info(
            "connected",
            input=settings.topics.input,
            group_id=settings.kafka.group_id,
            alerts=settings.topics.alerts,
            dead_letters=settings.topics.dead_letters,
            state=topic,
            guarantee=settings.processing.guarantee,
            client=settings.kafka.client,
        )

    def _serving(self, scorer: Scorer) -> None:
        key_field = self.settings.kafka.key_field
        if key_field is not None and key_field != scorer.manifest.columns.key:
            log.warning(
                "kafka.key_field differs from the model's key column, which is what is read",
                key_field=key_field,
                model_key_column=scorer.manifest.columns.key,
            )
        self.supervisor.serving(scorer)

    def _model_refused(self, error: str) -> None:
        self.metrics.model_reloads.labels("refused").inc()

    def _shutdown(self) -> int:
        """Settle what is in hand within the shutdown budget, commit, leave the group."""
        self.supervisor.notifier.stopping()
        log.info("stopping: finishing the batch in hand")
        clean = True
        if self.connected:
            if self.source.hand.records:
                self._process()
            clean = self.delivery.drain()
            clean = self.delivery.commit() and clean
            if clean and not self.delivery.fenced:
                clean = self._save_state(self.state.held)
            self.source.close(timeout_ms=int(self._time_left() * 1000))
            self.delivery.close(timeout=self._time_left())
            clean = clean and not self.delivery.fenced
        summary = self.supervisor.summary()
        if clean:
            log.info("stopped; every processed record is committed", **summary)
            return EXIT_OK
        log.error(
            "stopped before everything was acknowledged and committed; "
            "the uncommitted records will be processed again at the next start",
            **summary,
        )
        return EXIT_FAILURE

    # -- one round -------------------------------------------------------------------------

    def _round(self) -> None:
        self.supervisor.tick()
        assert self.watcher is not None
        if (scorer := self.watcher.take()) is not None:
            self.state.model_swapped(kept=self.engine.swap_model(scorer))
            self._serving(scorer)
            self.metrics.model_reloads.labels("loaded").inc()
        self.source.check_join()
        if not self.source.rebalancing:
            self.state.restore_pending()
        self.source.collect(self._stop)
        if self.source.hand.records and not self._stop.is_set():
            self._process()
        if self.state.snapshot_due():
            self._hold_snapshot()
        self.delivery.settle()
        self.source.probe()

    def _process(self) -> None:
        """Score the records in hand and publish the results; their offsets become committable
        once every alert and dead letter is acknowledged."""
        records, partitions, polled = self.source.hand.take()
        started = time.perf_counter()
        result = self.engine.process(records, partitions=partitions)
        seconds = time.perf_counter() - started
        self.state.advanced(polled)
        self.supervisor.totals.add(result.counters)
        self.metrics.observe_batch(result.counters, len(records), seconds, self.engine.keys)
        topics = self.settings.topics
        outgoing = [alert_message(topics.alerts, alert) for alert in result.alerts]
        outgoing += [dead_letter_message(topics.dead_letters, d) for d in result.dead_letters]
        self.delivery.publish(outgoing, polled, len(records))

    def _hold_snapshot(self) -> None:
        """The periodic snapshot: the key state now, published after every output before it
        while the next rounds go on."""
        partitions = self.state.held
        if partitions:
            encode = self.state.copy(partitions)
            self.delivery.hold(lambda: state_messages(encode()))
            log.info("key state snapshot queued", partitions=names(partitions))

    def _save_state(self, partitions: set[TopicPartition]) -> bool:
        """Write the snapshots of `partitions` now; False if that did not happen. A snapshot
        valid at offset S may be written only once every output of the records before S is
        acknowledged: a restore resumes at S when S is ahead of the commit."""
        if not partitions:
            return True
        saved = self.delivery.drain()
        if saved:
            self.delivery.publish(state_messages(self.state.copy(partitions)()), {}, 0)
            saved = self.delivery.drain()
        if saved:
            log.info("key state saved", partitions=names(partitions))
        return saved

    def rewind(self) -> None:
        """An aborted transaction: what the engine applied is not what the broker holds, so
        every assigned partition is restored again and polled from its committed offset."""
        assigned = self.source.assignment()
        self.source.hand.drop(assigned)
        self.state.rewind(assigned)

    # -- rebalances (`Rebalances`), called on the consumer's network thread ----------------

    def revoked(self, partitions: set[TopicPartition]) -> Offsets:
        """Settle what is in hand and in flight, and save the revoked partitions' key state;
        the offsets to commit before the partitions go."""
        records = len(self.source.hand.records)
        if records:
            self._process()
        settled = self.delivery.drain()
        if records and settled:
            log.info("settled the records in hand before a revocation", records=records)
        if not self.delivery.fenced:
            self._save_state(partitions & self.state.held)
        self.state.forget(partitions)
        return self.delivery.take_committable()

    def assigned(self, assignment: set[TopicPartition]) -> None:
        """Restore every assigned partition whose key state is neither here nor coming: the
        new ones, and those revoked and given back (still paused from before, kafka-python
        keeps their state)."""
        self.state.assigned(assignment)

    def lost(self, partitions: set[TopicPartition]) -> None:
        self.delivery.drop(partitions)
        self.state.forget(partitions)
