"""Key state survives: snapshots round-trip exactly, and a restored engine (snapshot, then a
state-only replay) scores every later event exactly as an engine that never stopped.

The tests run real (random, seeded) networks through onnxruntime; the daemon's restarts
against a broker: tests/integration/test_state_recovery_on_kafka.py.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import orjson
import pytest
from model_factory import event, load_random, make_manifest

from detector.engine.core import Engine, EngineOptions
from detector.engine.records import InputRecord
from detector.engine.scorer import Scorer
from detector.ops.http import Health
from detector.state.snapshots import (
    CHUNK_BYTES,
    KeyHistory,
    decode_fields,
    encode_fields,
    fingerprint,
    latest_snapshot,
    snapshot_messages,
)

T0 = 1_700_000_000.0
PARTITIONS = 3
OPTIONS = EngineOptions(max_batch=64, cooldown_events=2, threshold=0.45)


@pytest.fixture(scope="module", params=["window-forecast", "stateful-classify", "window-bi"])
def scorer(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Scorer:
    mode, kind = request.param.split("-")
    manifest = {
        "forecast": make_manifest("forecast", "window", window=5, smoothing=0.5),
        "classify": make_manifest("classify", "stateful", min_history=2, smoothing=0.7),
        "bi": make_manifest("classify", "window", window=4, bidirectional=True, layers=2),
    }[kind]
    assert manifest.export_mode == mode
    return load_random(tmp_path_factory.mktemp("models") / f"{request.param}.onnx", manifest, 3)


def stream(keys: int, per_key: int, seed: int) -> tuple[list[InputRecord], np.ndarray]:
    """Interleaved events of `keys` accounts with bursts, and each event's partition."""
    rng = np.random.default_rng(seed)
    events, partitions = [], []
    for i in range(keys * per_key):
        k = int(rng.integers(keys))
        amount = float(rng.choice([20.0, 35.0, 400.0], p=[0.5, 0.4, 0.1]))
        merchant = str(rng.choice(["grocer", "fuel", "casino", "unseen"]))
        items = None if rng.random() < 0.1 else int(rng.integers(1, 5))
        events.append(event(f"acct-{k}", T0 + 11.0 * i, amount, items, merchant))
        partitions.append(k % PARTITIONS)
    return [InputRecord(orjson.dumps(e)) for e in events], np.array(partitions, np.int32)


def feed(
    engine: Engine, records: list[InputRecord], partitions: np.ndarray, batch: int
) -> tuple[np.ndarray, np.ndarray, list[tuple[str, float]]]:
    """Scores, statuses and (alert id, event time) of `records` fed in batches of `batch`."""
    results = [
        engine.process(records[i : i + batch], partitions=partitions[i : i + batch])
        for i in range(0, len(records), batch)
    ]
    return (
        np.concatenate([r.scores for r in results]),
        np.concatenate([r.statuses for r in results]),
        [(a.alert_id, a.event_time) for r in results for a in r.alerts],
    )


def snapshot_through_records(engine: Engine, partition: int, offset: int, generation: int = 0):
    """The partition's state as the state topic holds it, read back."""
    fields = engine.arena.export(engine.arena.slots_of([partition]))
    model = fingerprint(engine.manifest)
    messages = snapshot_messages("events", partition, offset, fields, model, generation)
    snapshot, why = latest_snapshot(messages, "events", partition, model)
    assert why == "ok"
    return snapshot


def by_key(fields: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Exported fields in key order (h and c have the slot axis second)."""
    order = np.argsort(fields["keys"])
    return {n: a[:, order] if n in ("h", "c") else a[order] for n, a in fields.items()}


def test_a_restored_engine_scores_exactly_like_one_that_never_stopped(scorer: Scorer) -> None:
    records, partitions = stream(keys=12, per_key=14, seed=5)
    reference = feed(Engine(scorer, OPTIONS), records, partitions, batch=37)
    assert np.isfinite(reference[0]).sum() > 100
    assert reference[2], "the stream must raise alerts for the ids to be compared"

    cut, replay_from = 90, 60  # snapshot at 60, processed up to 90, then the process died
    first = Engine(scorer, OPTIONS)
    feed(first, records[:replay_from], partitions[:replay_from], batch=17)
    snapshots = [snapshot_through_records(first, p, replay_from) for p in range(PARTITIONS)]
    feed(first, records[replay_from:cut], partitions[replay_from:cut], batch=17)

    second = Engine(scorer, OPTIONS)
    for snapshot in snapshots:
        second.arena.restore(snapshot.fields, scorer.codec.statistics_rows)
    feed(second, records[replay_from:cut], partitions[replay_from:cut], batch=5)  # replay
    after = feed(second, records[cut:], partitions[cut:], batch=23)

    np.testing.assert_array_equal(after[1], reference[1][cut:])
    np.testing.assert_array_equal(after[0], reference[0][cut:])  # exact; NaN where not scored
    assert after[2] == [(i, t) for i, t in reference[2] if t >= T0 + 11.0 * cut]


def test_partitions_snapshot_only_their_keys_and_restore_into_a_busy_engine(
    scorer: Scorer,
) -> None:
    records, partitions = stream(keys=9, per_key=8, seed=8)
    engine = Engine(scorer, OPTIONS)
    feed(engine, records, partitions, batch=64)
    keys = {p: set(engine.arena.export(engine.arena.slots_of([p]))["keys"]) for p in range(3)}
    assert keys == {p: {f"acct-{k}" for k in range(9) if k % 3 == p} for p in range(3)}

    other = Engine(scorer, OPTIONS)
    feed(other, records[:20], partitions[:20], batch=64)  # stale state of some of those keys
    other.arena.release(other.arena.slots_of([1]))
    snapshot = snapshot_through_records(engine, 1, len(records))
    other.arena.restore(snapshot.fields, scorer.codec.statistics_rows)
    mine, theirs = (by_key(e.arena.export(e.arena.slots_of([1]))) for e in (engine, other))
    assert set(mine) == set(theirs)
    for name, array in mine.items():
        np.testing.assert_array_equal(theirs[name], array)
    assert other.keys == 3 + len(other.arena.slots_of([0, 2]))


def test_snapshot_blobs_round_trip_every_field_and_refuse_garbage(scorer: Scorer) -> None:
    records, partitions = stream(keys=5, per_key=6, seed=1)
    engine = Engine(scorer, OPTIONS)
    feed(engine, records, partitions, batch=64)
    fields = engine.arena.export(engine.arena.slots_of([0, 1, 2]))
    fields["keys"][0] = "ключ \x00 🔑"  # any text, NUL and astral characters included
    back = decode_fields(encode_fields(fields))
    assert set(back) == set(fields)
    for name, array in fields.items():
        assert back[name].dtype == array.dtype
        np.testing.assert_array_equal(back[name], array)
    nothing = decode_fields(encode_fields(engine.arena.export(np.zeros(0, np.intp))))
    assert nothing["keys"].size == 0 and nothing["count"].shape == (0,)  # a partition of no key
    garbage_ipc = b"\xff\xff\xff\xff" + b"\x00" * 12
    for garbage in (b"", b"not zlib", zlib.compress(b"\x05\x00\x00\x00short"), garbage_ipc):
        with pytest.raises(ValueError, match="not a state snapshot"):
            decode_fields(garbage)


#: A blob of the zlib format snapshots had before Arrow IPC, as an earlier version wrote it.
ZLIB_BLOB = bytes.fromhex(
    "7801e36560608802e2e868a5e4fcd2bc12251d259b4c0b259d68a3d8589d68a592fcd2e48cd41490681a42"
    "b428332f1d2c640252a8630c569a9d5a199f939a975e92510c36042c171b1b9b925aa66b7861d785dd17fb2e"
    "b6b303ad020126080524151cfe84dc740432fca13490d9600f241c8008881b807881032b508003880100e42af4"
)


def test_a_snapshot_of_the_zlib_format_before_stays_readable() -> None:
    fields = decode_fields(ZLIB_BLOB)
    assert fields["keys"].tolist() == ["dev-1", "ключ"]
    np.testing.assert_array_equal(fields["count"], np.array([7, 2], np.int64))
    np.testing.assert_array_equal(fields["touched"], [1_700_000_000.5, 1_700_000_060.0])
    np.testing.assert_array_equal(fields["ring"], np.arange(6, dtype=np.float32).reshape(2, 3))
    assert encode_fields(fields).startswith(b"\xff\xff\xff\xff")  # written as Arrow IPC


def test_a_partition_ahead_in_event_time_does_not_expire_the_keys_of_another(
    scorer: Scorer,
) -> None:
    """After a restart one partition's backlog may be scored a TTL of event time ahead of
    another's (it was fetched first). The keys of the one behind must not expire by the
    other's clock: their next events are due within the TTL (issue 24). A single stream
    (no partitions, as a replay) still expires them by its one clock."""
    ttl = 600.0
    behind = [InputRecord(orjson.dumps(event("acct-1", T0 + 60.0 * i, 20.0))) for i in range(5)]
    ahead = [InputRecord(orjson.dumps(event("acct-0", T0 + 60.0 * i, 20.0))) for i in range(40)]
    options = EngineOptions(max_batch=64, key_ttl_s=ttl)
    engine, stream = Engine(scorer, options), Engine(scorer, options)
    engine.process(behind, partitions=np.ones(len(behind), np.int32))
    expired = engine.process(ahead, partitions=np.zeros(len(ahead), np.int32)).counters.expired_ttl
    assert expired == 0
    kept = engine.arena.export(engine.arena.slots_of([1]))
    assert kept["keys"].tolist() == ["acct-1"] and kept["count"].tolist() == [5]
    stream.process(behind)
    assert stream.process(ahead).counters.expired_ttl == 1
    assert stream.keys == 1


def history(keys: str, count: list[int], touched: list[float], evicted: int = 0) -> KeyHistory:
    counts, times = np.array(count, np.int64), np.array(touched, np.float64)
    return KeyHistory(np.array(list(keys), object), counts, times, evicted)


def test_a_key_history_tells_a_continued_history_from_a_lost_one() -> None:
    before = history("abcde", [5] * 5, [100.0] * 5)
    # a went on; b started again within the TTL; c is gone, idle past the TTL by the latest
    # clock (1000); d started again after a gap past the TTL; e is as it was. A longer TTL,
    # or none (0), excuses neither c nor d.
    after = history("abdez", [7, 2, 1, 5, 1], [160.0, 130.0, 900.0, 100.0, 1000.0])
    assert before.lost(after, ttl_s=600.0) == [("b", 5, 2)]
    for ttl in (950.0, 0.0):
        assert before.lost(after, ttl_s=ttl) == [("b", 5, 2), ("c", 5, 0), ("d", 5, 1)]
    evicted = history("abdez", [7, 2, 1, 5, 1], [160.0, 130.0, 900.0, 100.0, 1000.0], 1)
    assert before.lost(evicted, ttl_s=0.0) == []  # evictions lose state by design
    gone = [(key, 5, 0) for key in "abcde"]  # no clock went past their TTL
    assert before.lost(history("", [], []), ttl_s=600.0) == gone


def test_large_snapshots_are_chunked_and_a_half_written_one_never_hides_the_last(
    tmp_path: Path,
) -> None:
    manifest = make_manifest("classify", "window", window=64, hidden=4)
    scorer = load_random(tmp_path / "wide.onnx", manifest)
    engine = Engine(scorer, EngineOptions(max_batch=4096))
    rng = np.random.default_rng(0)
    records = [InputRecord(orjson.dumps(event(f"k{i}", T0 + i, 50.0))) for i in range(3000)]
    engine.process(records, partitions=np.zeros(len(records), np.int32))
    fields = engine.arena.export(engine.arena.slots_of([0]))
    fields["ring"] = rng.normal(size=fields["ring"].shape).astype(np.float32)  # incompressible
    model = fingerprint(manifest)
    old = snapshot_messages("events", 0, 30_000, fields, model, generation=6)
    assert len(old) > 3  # header + several chunks
    assert all(len(value) <= CHUNK_BYTES for _, value in old[:-1])
    assert old[-1][0] == b"events/0"

    newer = snapshot_messages("events", 0, 31_000, fields, model, generation=7)
    half_written = old + newer[: len(newer) // 2]  # died before the header
    snapshot, why = latest_snapshot(half_written, "events", 0, model)
    assert why == "ok" and snapshot.offset == 30_000 and snapshot.generation == 6
    np.testing.assert_array_equal(snapshot.fields["ring"], fields["ring"])

    snapshot, why = latest_snapshot(half_written + newer, "events", 0, model)
    assert (why, snapshot.offset) == ("ok", 31_000)
    others = [(b"events/1", b"{}"), (b"other/0", newer[-1][1])]
    assert latest_snapshot(others, "events", 0, model) == (None, "absent")
    assert latest_snapshot(old, "events", 0, "0" * 16) == (None, "incompatible model")
    corrupt = [*old[:1], (old[1][0], old[1][1][:-1] + b"?"), *old[2:]]
    assert latest_snapshot(corrupt, "events", 0, model) == (None, "incomplete")


def test_the_fingerprint_follows_the_state_layout_not_the_weights() -> None:
    base = make_manifest("forecast", "window", window=5)
    assert fingerprint(base) == fingerprint(base.model_copy(update={"graph_sha256": "ab" * 32}))
    unscaled = [base.features[0].model_copy(update={"scale": "none"}), *base.features[1:]]
    for changed in (
        make_manifest("forecast", "window", window=6),
        make_manifest("forecast", "window", window=5, hidden=9),
        make_manifest("forecast", "stateful", window=5),
        make_manifest("classify", "window", window=5),
        base.model_copy(update={"features": unscaled}),
    ):
        assert fingerprint(changed) != fingerprint(base)
    # The scale of a feature enters only when set: models from before it keep their snapshots.
    assert fingerprint(base) == "8183f0bbaffc07fa"


def test_readiness_waits_for_restoring_partitions() -> None:
    health = Health(model_loaded=True, broker_reachable=True, partitions=2, restoring=1)
    assert health.not_ready_reason() == "restoring the key state of 1 partition(s)"
    health.restoring = 0
    assert health.not_ready_reason() is None
