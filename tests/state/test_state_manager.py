"""The key-state manager on a real engine, with fakes of what it asks of Kafka: the consumer
it pauses and resumes (`Partitions`) and the topics a restore reads (`RestoreSource`)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import orjson
import pytest
from kafka import TopicPartition
from model_factory import event, load_random, make_manifest
from prometheus_client import REGISTRY
from structlog.testing import capture_logs

from detector.config import Settings
from detector.engine.core import Engine, EngineOptions
from detector.engine.records import PolledRecord
from detector.engine.scorer import Scorer
from detector.ops.http import Health
from detector.ops.metrics import Metrics
from detector.ops.supervisor import Supervisor
from detector.ops.systemd import SystemdNotifier
from detector.state.manager import StateManager
from detector.state.restore import RestoreError
from detector.state.snapshots import KeyHistory, Snapshot, fingerprint, latest_snapshot

T0 = 1_700_000_000.0
TOPIC = "events"
P0, P1 = TopicPartition(TOPIC, 0), TopicPartition(TOPIC, 1)


@pytest.fixture(scope="module")
def scorer(tmp_path_factory: pytest.TempPathFactory) -> Scorer:
    manifest = make_manifest("forecast", "window", window=5)
    return load_random(tmp_path_factory.mktemp("models") / "model.onnx", manifest)


def records(partition: int, start: int, end: int) -> list[PolledRecord]:
    """Events of three keys per partition, one per offset."""
    return [
        PolledRecord(
            orjson.dumps(event(f"p{partition}-k{i % 3}", T0 + i, 20.0 + i % 5)),
            None,
            TOPIC,
            partition,
            i,
        )
        for i in range(start, end)
    ]


def process(engine: Engine, batch: list[PolledRecord]) -> None:
    engine.process(batch, partitions=np.array([r.partition for r in batch], np.int32))


@dataclass
class FakePartitions:
    """The consumer: committed offsets, and what was paused and resumed where."""

    committed: dict[TopicPartition, int] = field(default_factory=dict)
    paused: set[TopicPartition] = field(default_factory=set)
    resumed: dict[TopicPartition, int] = field(default_factory=dict)

    def bounds(self, partition: TopicPartition) -> tuple[int, int]:
        return self.committed.get(partition, 0), 0

    def pause(self, partitions: set[TopicPartition]) -> None:
        self.paused |= partitions

    def resume(self, partition: TopicPartition, offset: int) -> None:
        self.paused.discard(partition)
        self.resumed[partition] = offset


@dataclass
class FakeTopics:
    """The state topic's records and the input, in memory; `failures` reads fail first."""

    state: list[tuple[bytes, bytes]] = field(default_factory=list)
    failures: int = 0

    def snapshot(self, partition: TopicPartition, model: str) -> tuple[Snapshot | None, str]:
        if self.failures:
            self.failures -= 1
            raise RestoreError("the state topic stalled")
        return latest_snapshot(self.state, TOPIC, partition.partition, model)

    def records(self, partition: TopicPartition, start: int, end: int) -> Iterator[list]:
        yield records(partition.partition, start, end)


def manager(
    scorer: Scorer, topics: FakeTopics, partitions: FakePartitions, **state
) -> StateManager:
    settings = Settings(state=state)
    engine = Engine(scorer, EngineOptions(max_batch=64, key_ttl_s=settings.state.key_ttl_s))
    supervisor = Supervisor(Health(), SystemdNotifier(None), Metrics())
    return StateManager(
        settings,
        engine,
        topics,
        partitions,
        supervisor,
        "events-state",
        lambda tp: tp.partition % 2,
    )


def by_key(state: StateManager, partition: int) -> dict[str, np.ndarray]:
    arena = state.engine.arena
    fields = arena.export(arena.slots_of([partition]))
    order = np.argsort(fields["keys"])
    return {n: a[:, order] if n in ("h", "c") else a[order] for n, a in fields.items()}


def saved(state: StateManager, partitions: set[TopicPartition]) -> list[tuple[bytes, bytes]]:
    return [(record.key, record.value) for record in state.copy(partitions)()]


def test_an_assigned_partition_is_paused_until_its_snapshot_and_backlog_are_restored(scorer):
    first = manager(scorer, FakeTopics(), FakePartitions())
    process(first.engine, records(0, 0, 20))
    first.advanced({P0: 20})
    topics = FakeTopics(saved(first, {P0}))
    process(first.engine, records(0, 20, 30))

    partitions = FakePartitions(committed={P0: 30})
    second = manager(scorer, topics, partitions)
    second.assigned({P0})
    assert partitions.paused == {P0} and second.restoring == {P0}
    health = second.supervisor.health
    assert health.restoring == 1
    second.restore_pending()
    assert partitions.resumed == {P0: 30} and not partitions.paused
    assert second.held == {P0} and second.applied == {P0: 30} and health.restoring == 0
    restored = second.metrics.registry.get_sample_value
    assert restored("seqsentinel_restore_seconds_count", {"snapshot": "ok"}) == 1
    assert restored("seqsentinel_restore_replayed_records_total") == 10
    expected, got = by_key(first, 0), by_key(second, 0)
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)
    second.assigned({P0})  # given back while here: nothing to restore
    assert second.restoring == set()


def test_a_failed_restore_leaves_the_partition_paused_for_a_later_round(scorer):
    partitions = FakePartitions(committed={P0: 5})
    state = manager(scorer, FakeTopics(failures=1), partitions)
    state.assigned({P0, P1})
    state.restore_pending()
    assert state.restoring == {P0, P1} and partitions.paused == {P0, P1}
    state.restore_pending()
    assert state.restoring == set() and partitions.resumed == {P0: 5, P1: 0}


def test_a_forgotten_partition_leaves_nothing_behind(scorer):
    state = manager(scorer, FakeTopics(), FakePartitions())
    process(state.engine, records(0, 0, 10) + records(1, 0, 10))
    state.advanced({P0: 10, P1: 10})
    state.forget({P0})
    assert state.held == {P1} and state.engine.keys == 3
    assert state.engine.arena.slots_of([0]).size == 0


def test_a_copy_is_valid_at_the_applied_offset_and_goes_where_it_is_told(scorer):
    state = manager(scorer, FakeTopics(), FakePartitions(), key_ttl_s=0)
    process(state.engine, records(0, 0, 10) + records(1, 0, 4))
    state.advanced({P0: 10, P1: 4})
    assert not state.snapshot_due()
    copied = state.copy({P0, P1})()
    assert {(r.topic, r.partition) for r in copied} == {("events-state", 0), ("events-state", 1)}
    written = [(record.key, record.value) for record in copied]
    model = fingerprint(state.engine.manifest)
    assert latest_snapshot(written, TOPIC, 0, "0" * 16) == (None, "incompatible model")
    snapshot, why = latest_snapshot(written, TOPIC, 1, model)
    assert why == "ok" and snapshot.offset == 4 and snapshot.generation == 0
    assert sorted(snapshot.fields["keys"]) == ["p1-k0", "p1-k1", "p1-k2"]
    again = saved(state, {P1})
    assert latest_snapshot(written + again, TOPIC, 1, model)[0].generation == 1


def history(keys: str, count: list[int], touched: list[float], evicted: int = 0) -> KeyHistory:
    counts, times = np.array(count, np.int64), np.array(touched, np.float64)
    return KeyHistory(np.array(list(keys), object), counts, times, evicted)


def test_keys_whose_state_did_not_continue_are_counted_and_logged(scorer) -> None:
    state = manager(scorer, FakeTopics(), FakePartitions())
    tp = TopicPartition("events", 1)
    state._continues(tp, history("ab", [5, 5], [100.0, 100.0]), "restore")
    with capture_logs() as logs:
        state._continues(tp, history("ab", [6, 2], [160.0, 130.0]), "snapshot")
        state._continues(tp, history("ab", [7, 3], [220.0, 190.0]), "snapshot")
    assert logs == [
        {
            "event": "key state lost",
            "partition": "events[1]",
            "at": "snapshot",
            "keys": 1,
            "examples": [{"key": "b", "recorded": 5, "found": 2}],
            "log_level": "error",
        }
    ]
    lost = state.metrics.registry.get_sample_value
    assert lost("seqsentinel_key_state_lost_total", {"at": "snapshot"}) == 1
    assert lost("seqsentinel_key_state_lost_total", {"at": "restore"}) == 0
    assert REGISTRY.get_sample_value("seqsentinel_key_state_lost_total", {"at": "snapshot"}) is None


def test_a_model_swap_that_resets_the_keys_forgets_their_history(scorer) -> None:
    state = manager(scorer, FakeTopics(), FakePartitions())
    state._continues(P0, history("ab", [5, 5], [100.0, 100.0]), "restore")
    state.model_swapped(kept=False)
    with capture_logs() as logs:
        state._continues(P0, history("", [], []), "snapshot")
    assert logs == []
