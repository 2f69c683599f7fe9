"""Property test of the restore path: after a crash at any moment, the key state a restarted
instance restores (a snapshot and the input after it, or the input alone) is the state of
an uninterrupted run at the same offsets, key by key, and stays so as the stream goes on.

It drives the daemon's own restore (`restore_partition`) and the snapshot records as the
state topic holds them, on records in memory: a daemon's life is played batch by batch as
its loop plays it. Polls mix the partitions at their own pace; exactly_once commits every
batch with its snapshot, at_least_once commits some batches late, so that a snapshot can be
ahead of the commit. The stream has keys idle past the TTL and partitions that drift far
apart in event time: where a key's state could depend on more than its own events.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kafka import TopicPartition
from model_factory import MERCHANTS, event, load_random, make_manifest

from detector.contract.manifest import AdaptiveThreshold
from detector.engine.alerts import Alert
from detector.engine.core import BatchResult, Engine, EngineOptions
from detector.engine.records import PolledRecord
from detector.engine.scorer import Scorer
from detector.state.restore import restore_partition
from detector.state.snapshots import Snapshot, fingerprint, latest_snapshot, snapshot_messages

TOPIC = "events"
T0 = 1_700_000_000.0
STEP_S = 60.0
TTL_S = 10 * STEP_S
KEYS, EVENTS = 12, 30
OPTIONS = EngineOptions(max_batch=32, max_keys=64, key_ttl_s=TTL_S, cooldown_events=2)

#: A batch: what one poll returns, runs of (partition, records), and whether a snapshot of
#: every partition follows it.
batches_strategy = st.lists(
    st.tuples(
        st.lists(st.tuples(st.integers(0, 3), st.integers(1, 40)), min_size=1, max_size=3),
        st.booleans(),
    ),
    min_size=1,
    max_size=14,
)
property_settings = settings(
    max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


@pytest.fixture(scope="module", params=["forecast-window", "classify-stateful"])
def scorer(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Scorer:
    """A model with every kind of key state: the model's memory, an adaptive threshold's
    ring of scores, alert confirmation and episodes."""
    task, mode = request.param.split("-")
    manifest = make_manifest(task, mode, window=4, min_history=2, threshold=0.3)
    adaptive = AdaptiveThreshold(history=12, refresh=3, prune=0.1, warm_up=4)
    scoring = manifest.scoring.model_copy(update={"adaptive": adaptive, "confirm": 2})
    manifest = manifest.model_copy(update={"scoring": scoring})
    path = tmp_path_factory.mktemp("models") / f"{request.param}.onnx"
    return load_random(path, manifest, seed=4)


def streams(partitions: int) -> list[list[PolledRecord]]:
    """Each partition's records in offset order: key k on partition k % `partitions`, one
    event per STEP_S in time order; every third key falls silent for twice the TTL midway."""
    rng = np.random.default_rng(partitions)
    events = []
    for k in range(KEYS):
        steps = np.arange(EVENTS) + np.where(np.arange(EVENTS) >= EVENTS // 2, 20 * (k % 3 == 0), 0)
        amounts = rng.choice([20.0, 35.0, 60.0, 400.0], EVENTS, p=[0.4, 0.3, 0.25, 0.05])
        for step, amount in zip(steps.tolist(), amounts.tolist(), strict=True):
            merchant = MERCHANTS[(k + step) % len(MERCHANTS)]
            events.append((T0 + step * STEP_S + k, k, event(f"acct-{k}", 0, amount, 1, merchant)))
    events.sort(key=lambda item: item[0])
    records: list[list[PolledRecord]] = [[] for _ in range(partitions)]
    for time, k, document in events:
        p = k % partitions
        payload = orjson.dumps(document | {"ts": time})
        records[p].append(PolledRecord(payload, None, TOPIC, p, len(records[p])))
    return records


@dataclass
class StateTopic:
    """The snapshot records of each input partition, in the order they were written."""

    records: dict[int, list[tuple[bytes, bytes]]] = field(default_factory=dict)
    generations: dict[int, int] = field(default_factory=dict)

    def write(self, engine: Engine, partition: int, offset: int) -> None:
        """A snapshot of `partition`'s keys, valid at `offset`, as the daemon writes it."""
        arena = engine.arena
        fields = arena.export(arena.slots_of([partition]))
        generation = self.generations.get(partition, 0)
        self.generations[partition] = generation + 1
        model = fingerprint(engine.manifest)
        written = snapshot_messages(TOPIC, partition, offset, fields, model, generation)
        self.records.setdefault(partition, []).extend(written)


@dataclass
class MemorySource:
    """A `RestoreSource` on records in memory, read in polls of `poll` records."""

    streams: list[list[PolledRecord]]
    state: StateTopic
    poll: int = 7

    def snapshot(self, partition: TopicPartition, model: str) -> tuple[Snapshot | None, str]:
        written = self.state.records.get(partition.partition, [])
        return latest_snapshot(written, TOPIC, partition.partition, model)

    def records(self, partition: TopicPartition, start: int, end: int) -> Iterator[list]:
        stream = self.streams[partition.partition][start:end]
        for begin in range(0, len(stream), self.poll):
            yield stream[begin : begin + self.poll]


@dataclass
class Life:
    """One daemon's run: its engine, each partition's applied and committed offsets, and
    the alerts it raised."""

    engine: Engine
    applied: list[int]
    committed: list[int]
    alerts: list[Alert] = field(default_factory=list)
    #: Applied offsets after each batch, for commits that come some batches late.
    past: list[list[int]] = field(default_factory=list)

    def play(
        self,
        streams: list[list[PolledRecord]],
        batches: list[tuple[list[tuple[int, int]], bool]],
        state: StateTopic,
        commit_lag: int,
    ) -> None:
        """Process `batches` (partitions beyond the stream's wrap around), committing each
        batch `commit_lag` batches late and writing the snapshots they ask for."""
        for runs, snapshot in batches:
            records: list[PolledRecord] = []
            for p, count in runs:
                p %= len(streams)
                taken = streams[p][self.applied[p] : self.applied[p] + count]
                records += taken
                self.applied[p] += len(taken)
            self.process(records)
            self.past.append(list(self.applied))
            self.committed = self.past[max(0, len(self.past) - 1 - commit_lag)]
            if snapshot:
                for p, offset in enumerate(self.applied):
                    state.write(self.engine, p, offset)

    def finish(self, streams: list[list[PolledRecord]]) -> None:
        """The rest of each partition, one partition's backlog after the other: the most
        uneven pace (a restarted instance catching up)."""
        for p, stream in enumerate(streams):
            self.process(stream[self.applied[p] :])
            self.applied[p] = len(stream)

    def process(self, records: list[PolledRecord]) -> BatchResult:
        partitions = np.array([record.partition for record in records], np.int32)
        result = self.engine.process(records, partitions=partitions)
        self.alerts += result.alerts
        return result


def uninterrupted(
    scorer: Scorer, streams: list[list[PolledRecord]], ends: list[int]
) -> tuple[Engine, list[Alert]]:
    """An engine fed every partition up to `ends` in event-time order, in full batches
    (as a replay of the merged stream is), and its alerts."""
    records = sorted(
        (r for p, stream in enumerate(streams) for r in stream[: ends[p]]),
        key=lambda record: orjson.loads(record.payload)["ts"],
    )
    life = Life(Engine(scorer, OPTIONS), [0] * len(streams), [])
    life.process(records)
    return life.engine, life.alerts


def key_state(engine: Engine) -> dict[str, dict[str, np.ndarray]]:
    """Every field of every key's state, by key (h and c have the slot axis second)."""
    arena = engine.arena
    fields = arena.export(np.flatnonzero(arena.used))
    keys = fields.pop("keys").tolist()
    slot_axis = {name: 1 if name in ("h", "c") else 0 for name in fields}
    return {
        key: {name: array.take(i, slot_axis[name]) for name, array in fields.items()}
        for i, key in enumerate(keys)
    }


def assert_same_state(engine: Engine, reference: Engine, clocks: list[float]) -> None:
    """The same state for every key in both; a key in one only must be idle past the TTL by
    its partition's clock (`clocks`: the latest event time of each): the other dropped it
    already, and its next event starts it afresh in both."""
    mine, theirs = key_state(engine), key_state(reference)
    for key in mine.keys() ^ theirs.keys():
        state = mine.get(key) or theirs[key]
        assert state["touched"] < clocks[state["partition"]] - TTL_S, (key, state)
    for key in mine.keys() & theirs.keys():
        for name, value in theirs[key].items():
            np.testing.assert_array_equal(mine[key][name], value, err_msg=f"{key}: {name}")


def clocks(streams: list[list[PolledRecord]], ends: list[int]) -> list[float]:
    return [
        orjson.loads(stream[end - 1].payload)["ts"] if end else -np.inf
        for stream, end in zip(streams, ends, strict=True)
    ]


@pytest.mark.parametrize("guarantee", ["exactly_once", "at_least_once"])
@property_settings
@given(
    partitions=st.integers(1, 4),
    batches=batches_strategy,
    kill=st.integers(0, 14),
    commit_lag=st.integers(0, 3),
    lost=st.sets(st.integers(0, 3)),
    order=st.permutations(range(4)),
)
def test_restored_key_state_equals_an_uninterrupted_run_at_the_same_offsets(
    scorer: Scorer,
    guarantee: str,
    partitions: int,
    batches: list[tuple[list[tuple[int, int]], bool]],
    kill: int,
    commit_lag: int,
    lost: set[int],
    order: list[int],
) -> None:
    """Killed after `kill` batches; the state topic of the partitions in `lost` is gone (a
    restore from the input alone); the restarted instance restores the partitions in
    `order`, goes on with the batches left, then catches up one partition after another."""
    data = streams(partitions)
    state = StateTopic()
    first = Life(Engine(scorer, OPTIONS), [0] * partitions, [0] * partitions)
    first.play(data, batches[:kill], state, commit_lag if guarantee == "at_least_once" else 0)
    for p in lost:
        state.records.pop(p, None)

    second = Life(Engine(scorer, OPTIONS), [0] * partitions, [])
    source = MemorySource(data, state)
    for p in (p for p in order if p < partitions):
        tp = TopicPartition(TOPIC, p)
        restored = restore_partition(source, second.engine, tp, first.committed[p], 0)
        assert restored.snapshot == ("ok" if p in state.records else "absent")
        assert restored.resume_at >= first.committed[p]
        if restored.recorded is not None:
            assert restored.recorded.lost(restored.history, TTL_S) == []
        second.applied[p] = restored.resume_at
    resumed = list(second.applied)
    reference, _ = uninterrupted(scorer, data, resumed)
    assert_same_state(second.engine, reference, clocks(data, resumed))

    second.play(data, batches[kill:], StateTopic(), 0)
    second.finish(data)
    ends = [len(stream) for stream in data]
    reference, alerts = uninterrupted(scorer, data, ends)
    assert_same_state(second.engine, reference, clocks(data, ends))
    expected = [a.alert_id for a in alerts if a.source.offset >= resumed[a.source.partition]]
    assert sorted(a.alert_id for a in second.alerts) == sorted(expected)
