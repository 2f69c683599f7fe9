"""The engine on fixture models: per-key windows, alerts, dead letters and key state."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import orjson
import pytest
from onnx_fixtures import KEY, TIME, reference_scores

from detector.contract.bulk_decode import BulkDecoder
from detector.contract.features import FeatureCodec
from detector.engine.core import BatchResult, Engine, EngineOptions, Status
from detector.engine.records import InputRecord
from detector.engine.scorer import Scorer

T0 = 1_700_000_000.0


def reading(key: str, time: float, temperature: float, pressure: float | None = 1.0) -> dict:
    record = {KEY: key, TIME: time, "temperature": temperature}
    if pressure is not None:
        record["pressure"] = pressure
    return record


def stream(events: int, keys: int = 4, seed: int = 0) -> list[dict]:
    """Readings of `keys` devices interleaved at random, in time order."""
    rng = np.random.default_rng(seed)
    times = T0 + np.cumsum(rng.exponential(1.0, events))
    return [
        reading(f"d{rng.integers(keys)}", float(t), float(rng.normal(20, 5)), float(rng.normal()))
        for t in times
    ]


def as_records(documents: list[dict]) -> list[InputRecord]:
    return [InputRecord(orjson.dumps(document)) for document in documents]


def process_in_cuts(engine: Engine, records: list[InputRecord], cuts: list[int]) -> BatchResult:
    parts, start = [], 0
    for size in cuts:
        parts.append(engine.process(records[start : start + size]))
        start += size
    parts.append(engine.process(records[start:]))
    return BatchResult.concatenate(parts)


def per_key_reference(scorer: Scorer, documents: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """Statuses and scores by a plain per-key loop: each key's encoded events in a list, the
    window the contract describes (the key's last `window` events, or all of them for a
    stateful graph) scored alone."""
    manifest, codec = scorer.manifest, FeatureCodec(scorer.manifest)
    history: dict[str, list[np.ndarray]] = defaultdict(list)
    last_time: dict[str, float] = {}
    statuses, scores = [], []
    for document in documents:
        decoded = codec.decode(document)
        gap = decoded.time - last_time.get(decoded.key, decoded.time)
        last_time[decoded.key] = decoded.time
        raw = np.array([decoded.values])
        events = history[decoded.key]
        events.append(codec.encode(raw, np.zeros(1, np.intp), np.array([gap]))[0])
        if len(events) < manifest.min_history:
            statuses.append(Status.WARMING_UP)
            scores.append(np.nan)
            continue
        kept = events[-manifest.window :] if manifest.export_mode == "window" else events
        score, _ = reference_scores(manifest, np.array([kept]), np.array([len(kept)]))
        statuses.append(Status.SCORED)
        scores.append(score[0])
    return np.array(statuses), np.array(scores)


@pytest.mark.parametrize("task", ["forecast", "classify"])
@pytest.mark.parametrize("mode", ["window", "stateful"])
@pytest.mark.parametrize("cuts", [[200], [1, 2, 3, 50], [7] * 20])
def test_the_engine_scores_as_a_per_key_reference_however_the_stream_is_cut(
    load, task, mode, cuts: list[int]
) -> None:
    scorer = load(task, mode)
    documents = stream(200)
    want_statuses, want_scores = per_key_reference(scorer, documents)

    result = process_in_cuts(Engine(scorer), as_records(documents), cuts)

    np.testing.assert_array_equal(result.statuses, want_statuses)
    np.testing.assert_allclose(result.scores, want_scores, rtol=1e-4, atol=1e-5)
    assert result.counters.scored == (want_statuses == Status.SCORED).sum()


def test_a_spike_opens_one_alert_explained_by_its_feature(load) -> None:
    scorer = load("forecast", "window")
    documents = [reading("d0", T0 + i, 20.0 + 0.1 * i) for i in range(12)]
    documents[8]["temperature"] = 500.0

    result = Engine(scorer, EngineOptions(cooldown_events=10)).process(as_records(documents))
    again = Engine(scorer).process(as_records(documents))

    [alert] = result.alerts
    assert alert.event_time == T0 + 8 and alert.key == "d0" and alert.score > alert.threshold
    assert alert.explanation_kind == "forecast_error_share"
    shares = {part.feature: part.value for part in alert.explanation}
    assert max(shares, key=shares.__getitem__) == "temperature"
    assert sum(shares.values()) == pytest.approx(1.0)
    assert [a.alert_id for a in again.alerts] == [alert.alert_id]


def test_a_classifier_alert_is_explained_by_occlusion(load) -> None:
    scorer = load("classify", "stateful")
    documents = stream(60, keys=2)
    scores = Engine(scorer).process(as_records(documents)).scores

    options = EngineOptions(threshold=float(np.nanmedian(scores)), cooldown_events=0)
    result = Engine(scorer, options).process(as_records(documents))

    assert result.alerts
    alert = result.alerts[0]
    assert alert.explanation_kind == "occlusion"
    assert {part.feature for part in alert.explanation} <= {"temperature", "pressure", "time_delta"}


def test_bad_records_are_dead_letters_and_the_rest_is_scored(load) -> None:
    scorer = load("forecast", "stateful")
    good = stream(30, keys=2)
    bad = [
        (b'{"device": "d0",', "not_json"),
        (orjson.dumps({TIME: T0, "temperature": 1.0}), "missing_key"),
        (orjson.dumps({KEY: "d0", TIME: T0}), "missing_feature"),
        (orjson.dumps(reading("d0", T0, 1.0) | {"temperature": "hot"}), "wrong_type"),
        (orjson.dumps(reading("d0", -1.0, 1.0)), "bad_timestamp"),
    ]
    batch = as_records(good[:10]) + [InputRecord(payload) for payload, _ in bad]
    batch += as_records(good[10:])

    result = Engine(scorer).process(batch)
    clean = Engine(scorer).process(as_records(good))

    assert [letter.reason for letter in result.dead_letters] == [reason for _, reason in bad]
    dead = result.statuses == Status.DEAD_LETTER
    assert dead.sum() == len(bad)
    np.testing.assert_array_equal(result.scores[~dead], clean.scores)
    counters = result.counters
    assert counters.records == counters.dead_letters + counters.scored + counters.warming_up


def test_a_missing_value_takes_the_training_mean(load) -> None:
    scorer = load("forecast", "window")
    with_mean = [reading("d0", T0 + i, 20.0 + i, pressure=1.0) for i in range(4)]
    without = [reading("d0", T0 + i, 20.0 + i, pressure=None) for i in range(4)]

    a = Engine(scorer).process(as_records(with_mean))
    b = Engine(scorer).process(as_records(without))

    assert not b.dead_letters
    np.testing.assert_allclose(a.scores, b.scores)


def test_the_least_recently_seen_keys_are_evicted_at_max_keys(load) -> None:
    engine = Engine(load("forecast", "stateful"), EngineOptions(max_batch=2, max_keys=2))
    for i, key in enumerate(["a", "b", "a", "c"]):
        engine.process(as_records([reading(key, T0 + i, 20.0)]))

    assert engine.keys == 2 and engine.arena.lookup(["b"])[0] == -1
    result = engine.process(as_records([reading("b", T0 + 9, 20.0)]))
    assert result.counters.evicted_lru == 1
    assert result.statuses.tolist() == [Status.WARMING_UP]  # b starts over


def test_keys_idle_past_the_ttl_start_over(load) -> None:
    engine = Engine(load("forecast", "window"), EngineOptions(key_ttl_s=60))
    engine.process(as_records([reading("a", T0, 20.0), reading("a", T0 + 1, 21.0)]))

    result = engine.process(as_records([reading("b", T0 + 120, 20.0), reading("a", T0 + 121, 5)]))

    assert result.counters.expired_ttl == 1
    assert result.statuses.tolist() == [Status.WARMING_UP, Status.WARMING_UP]


def test_a_plain_batch_decoded_in_bulk_scores_as_record_by_record(
    load, monkeypatch: pytest.MonkeyPatch
) -> None:
    scorer = load("forecast", "window")
    records = as_records(stream(120))
    bulk = Engine(scorer).process(records)
    assert BulkDecoder(scorer.codec).decode(records, 65536) is not None

    monkeypatch.setattr(BulkDecoder, "decode", lambda *args: None)
    one_by_one = Engine(scorer).process(records)

    np.testing.assert_array_equal(bulk.statuses, one_by_one.statuses)
    np.testing.assert_array_equal(bulk.scores, one_by_one.scores)
    np.testing.assert_array_equal(bulk.keys, one_by_one.keys)
