"""The streaming engine: warm-up, stride, eviction, expiry, episodes, alerts, dead letters."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import orjson
import pytest
from model_factory import KEY, TIME, event, load_random, make_manifest
from structlog.testing import capture_logs

from detector.contract.features import UNKNOWN_CODE
from detector.contract.manifest import KeyStatistics
from detector.engine.alerts import alert_id
from detector.engine.core import BatchResult, Engine, EngineOptions, Status
from detector.engine.records import InputRecord, Source
from detector.engine.scorer import Scorer

S, W, K, D = Status.SCORED, Status.WARMING_UP, Status.SKIPPED_BY_STRIDE, Status.DEAD_LETTER
T0 = 1_700_000_000.0


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="module")
def classify(folder: Path) -> Scorer:
    return load_random(folder / "classify.onnx", make_manifest(min_history=2), seed=1)


@pytest.fixture(scope="module")
def classify_stateful(folder: Path) -> Scorer:
    manifest = make_manifest(export_mode="stateful", min_history=2)
    return load_random(folder / "classify-stateful.onnx", manifest, seed=1)


def records(*events: dict) -> list[InputRecord]:
    return [InputRecord(orjson.dumps(e)) for e in events]


def stream(keys: str, start: float = T0, step: float = 7.0) -> list[InputRecord]:
    """One event per character of `keys` (the key), `step` seconds apart, varied amounts."""
    return records(
        *(
            event(key, start + i * step, amount=10.0 + 37.0 * (i % 5), merchant="casino")
            for i, key in enumerate(keys)
        )
    )


def statuses(engine: Engine, batches: list[list[InputRecord]], now: float | None = None) -> str:
    """Status letters of the events of `batches` fed in turn: S W K D."""
    letters = {S: "S", W: "W", K: "K", D: "D"}
    return "".join(
        letters[Status(code)] for batch in batches for code in engine.process(batch, now).statuses
    )


def test_warm_up_then_every_stride_th_event_is_scored(classify: Scorer) -> None:
    engine = Engine(classify, EngineOptions(stride=3))
    result = engine.process(stream("aaaaaaaab"))
    assert "".join("SWKD"[code] for code in result.statuses) == "WSKKSKKSW"
    assert np.isnan(result.scores[result.statuses != S]).all()
    assert not np.isnan(result.scores[result.statuses == S]).any()
    counters = result.counters
    assert (counters.scored, counters.warming_up, counters.skipped_by_stride) == (3, 2, 4)
    assert counters.records == 9 == counters.scored + counters.warming_up + 4


def test_least_recently_seen_keys_are_evicted_when_full(classify: Scorer) -> None:
    engine = Engine(classify, EngineOptions(max_batch=2, max_keys=3))
    assert statuses(engine, [stream("ab"), stream("c"), stream("a")]) == "WWWS"
    result = engine.process(stream("d"))  # full: b is the least recently seen
    assert result.counters.evicted_lru == 1
    assert engine.keys == 3
    assert statuses(engine, [stream("a"), stream("c")]) == "SS"
    assert statuses(engine, [stream("b")]) == "W"  # forgotten: warming up again


def test_a_batch_with_more_new_keys_than_free_slots_evicts_them_all_at_once(
    classify: Scorer,
) -> None:
    engine = Engine(classify, EngineOptions(max_batch=4, max_keys=4))
    engine.process(stream("abcd"))
    result = engine.process(stream("efgh"))
    assert result.counters.evicted_lru == 4
    assert sorted(engine.arena.lookup(list("efgh"))) == [0, 1, 2, 3]


def test_keys_idle_past_the_ttl_restart_by_event_time(classify: Scorer) -> None:
    options = EngineOptions(key_ttl_s=100.0)
    events = records(event("a", T0, 10.0), event("a", T0 + 50, 20.0), event("a", T0 + 500, 30.0))
    one_batch = Engine(classify, options).process(events)
    assert "".join("SWKD"[c] for c in one_batch.statuses) == "WSW"
    assert one_batch.counters.expired_ttl == 1
    assert statuses(Engine(classify, options), [[e] for e in events]) == "WSW"


def test_idle_keys_are_swept_by_the_newest_event_time_or_by_now(classify: Scorer) -> None:
    by_event_time = Engine(classify, EngineOptions(key_ttl_s=100.0))
    by_event_time.process(records(event("a", T0, 1.0), event("b", T0 + 60, 1.0)))
    swept = by_event_time.process(records(event("c", T0 + 150, 1.0)))
    assert swept.counters.expired_ttl == 1  # a (idle 150 s); b (90 s) stays
    assert by_event_time.keys == 2

    by_now = Engine(classify, EngineOptions(key_ttl_s=100.0))
    assert statuses(by_now, [stream("a")], now=1000.0) == "W"
    assert statuses(by_now, [stream("b")], now=1050.0) == "W"
    result = by_now.process(stream("ba"), now=1120.0)  # a idle 120 s by the clock, b 70 s
    assert "".join("SWKD"[c] for c in result.statuses) == "SW"
    assert result.counters.expired_ttl == 1


def test_same_key_events_in_one_batch_are_applied_in_order(classify: Scorer) -> None:
    events = stream("abaabba")
    whole = Engine(classify).process(events)
    engine = Engine(classify)
    one_by_one = np.concatenate([engine.process([e]).scores for e in events])
    np.testing.assert_allclose(whole.scores, one_by_one, rtol=1e-6)
    assert list(whole.keys) == list("abaabba")
    np.testing.assert_array_equal(whole.times, T0 + 7.0 * np.arange(7))


def test_bad_records_become_dead_letters_and_the_rest_is_scored(classify: Scorer) -> None:
    good = [event("a", T0 + i, 10.0 * i) for i in range(4)]
    bad: list[tuple[bytes | dict, str]] = [
        (b'{"account": "a",', "not_json"),
        (b"[1, 2]", "not_object"),
        (orjson.dumps(event("a", T0, 1.0) | {"pad": "x" * 300}), "too_large"),
        (orjson.dumps({TIME: T0, "amount": 1.0, "merchant": "fuel"}), "missing_key"),
        (orjson.dumps({KEY: "a", TIME: T0, "merchant": "fuel"}), "missing_feature"),
        (orjson.dumps(event("a", T0, 1.0) | {"amount": "12"}), "wrong_type"),
        (event("a", T0, float("nan")), "not_finite"),
        (event("a", T0, 10**400), "not_finite"),
        (orjson.dumps(event("a", -5.0, 1.0)), "bad_timestamp"),
        (orjson.dumps(event("a", 10**400, 1.0) | {TIME: "yesterday"}), "bad_timestamp"),
        (event("a", 10**400, 1.0), "bad_timestamp"),
    ]
    batch = [InputRecord(orjson.dumps(good[0]))]
    for row, (payload, _) in enumerate(bad):
        batch.append(InputRecord(payload, source=Source(file="f.jsonl", row=row)))
        if row % 4 == 0:
            batch.append(InputRecord(orjson.dumps(good[row // 4 + 1])))
    clean = [record for record in batch if record.source is None]
    options = EngineOptions(max_record_bytes=200)
    result = Engine(classify, options).process(batch)
    expected = Engine(classify, options).process(clean)

    assert [letter.reason for letter in result.dead_letters] == [reason for _, reason in bad]
    assert [letter.source.row for letter in result.dead_letters] == list(range(len(bad)))
    assert result.dead_letters[0].payload == bad[0][0]
    assert orjson.loads(result.dead_letters[6].payload)["amount"] is None  # NaN re-serialised
    dead = np.array([record.source is not None for record in batch])
    assert (result.statuses[dead] == D).all()
    assert all(key is None for key in result.keys[dead])
    np.testing.assert_array_equal(result.scores[~dead], expected.scores)
    counters = result.counters
    assert counters.dead_letters == len(bad)
    assert counters.records == len(batch) == counters.dead_letters + counters.scored + 1


def test_stateful_scores_equal_window_scores_while_history_fits(
    classify: Scorer, classify_stateful: Scorer, folder: Path
) -> None:
    events = stream("abcabbcaabbaccb" + "aa")  # a: 7 events at the end, beyond window 6
    window = Engine(classify).process(events)
    stateful = Engine(classify_stateful).process(events)
    fits = np.ones(len(events), bool)
    fits[-1] = False
    np.testing.assert_array_equal(window.statuses, stateful.statuses)
    np.testing.assert_allclose(window.scores[fits], stateful.scores[fits], rtol=1e-5, atol=1e-6)
    assert abs(window.scores[-1] - stateful.scores[-1]) > 1e-6  # the window forgot event 1

    forecast = make_manifest("forecast", window=6)
    window = Engine(load_random(folder / "fw.onnx", forecast, seed=3)).process(events)
    stateful_manifest = forecast.model_copy(update={"export_mode": "stateful"})
    stateful = Engine(load_random(folder / "fs.onnx", stateful_manifest, seed=3)).process(events)
    np.testing.assert_array_equal(window.statuses, stateful.statuses)
    np.testing.assert_allclose(window.scores[fits], stateful.scores[fits], rtol=1e-5, atol=1e-6)


def scored_threshold(scorer: Scorer, events: list[InputRecord]) -> tuple[np.ndarray, float]:
    """The scores of `events` and a threshold that some of them cross, some not."""
    scores = Engine(scorer, EngineOptions(threshold=np.inf)).process(events).scores
    return scores, float(np.nanquantile(scores, 0.6))


def reference_episodes(
    keys: np.ndarray, scores: np.ndarray, threshold: float, cooldown: int, confirm: int = 1
) -> list[tuple[int, int, float]]:
    """(opening event, onset event, peak score) of each episode, by a plain per-key state
    machine; the onset is the first event of the run of scores above that opened it."""
    episodes: list[tuple[int, int, float]] = []
    open_episode: dict[str, int] = {}  # key -> index into episodes
    below: dict[str, int] = {}
    streak: dict[str, int] = {}
    run_start: dict[str, int] = {}
    for i, (key, score) in enumerate(zip(keys, scores, strict=True)):
        if np.isnan(score):
            continue
        streak[key] = streak.get(key, 0) + 1 if score >= threshold else 0
        if streak[key] == 1:
            run_start[key] = i
        if streak[key] >= confirm:
            below[key] = 0
            if key not in open_episode:
                open_episode[key] = len(episodes)
                episodes.append((i, run_start[key], score))
            opened, onset, peak = episodes[open_episode[key]]
            episodes[open_episode[key]] = (opened, onset, max(peak, score))
        elif key in open_episode:
            below[key] += 1
            if below[key] >= cooldown:
                del open_episode[key]
    return episodes


def test_one_alert_per_episode_closed_by_cooldown(classify: Scorer) -> None:
    events = stream("ab" * 40, step=3.0)
    scores, threshold = scored_threshold(classify, events)
    options = EngineOptions(threshold=threshold, cooldown_events=2)
    result = Engine(classify, options).process(events)
    np.testing.assert_array_equal(result.scores, scores)
    expected = reference_episodes(result.keys, scores, threshold, cooldown=2)
    assert len(expected) >= 3
    alerts = result.alerts
    assert [(a.key, a.event_time) for a in alerts] == [
        (result.keys[i], T0 + 3.0 * i) for i, _, _ in expected
    ]
    assert all(a.onset_time == a.event_time for a in alerts)
    assert [a.score for a in alerts] == [scores[i] for i, _, _ in expected]
    assert [a.peak_score for a in alerts] == [peak for *_, peak in expected]
    assert all(a.threshold == threshold for a in alerts)
    assert result.counters.alerts == len(alerts)
    longer = Engine(classify, EngineOptions(threshold=threshold, cooldown_events=6))
    assert len(longer.process(events).alerts) < len(alerts)


def test_an_episode_opens_only_after_confirm_scores_above(classify: Scorer, folder: Path) -> None:
    manifest = make_manifest(min_history=2)
    manifest = manifest.model_copy(
        update={"scoring": manifest.scoring.model_copy(update={"confirm": 3})}
    )
    confirming = load_random(folder / "confirm.onnx", manifest, seed=1)
    events = stream("ab" * 40, step=3.0)
    scores, _ = scored_threshold(classify, events)
    threshold = float(np.nanquantile(scores, 0.3))
    options = EngineOptions(threshold=threshold, cooldown_events=2)
    keys = np.array(list("ab" * 40))
    expected = reference_episodes(keys, scores, threshold, 2, confirm=3)
    assert len(expected) >= 3 and expected != reference_episodes(keys, scores, threshold, 2)
    for size in (len(events), 5, 1):  # however the stream is cut, and from snapshots
        engine = Engine(confirming, options)
        alerts = [
            a
            for i in range(0, len(events), size)
            for a in engine.process(events[i : i + size]).alerts
        ]
        # Each alert says when its run of scores above began: two events of its key earlier.
        assert [(a.onset_time, a.event_time) for a in alerts] == [
            (T0 + 3.0 * onset, T0 + 3.0 * i) for i, onset, _ in expected
        ]
        if size == len(events):  # an alert's peak is its episode's within the batch
            assert [a.peak_score for a in alerts] == [peak for *_, peak in expected]
    engine = Engine(confirming, options)
    engine.process(events[:41])
    moved = Engine(confirming, options)
    moved.arena.restore(
        engine.arena.export(np.flatnonzero(engine.arena.used)), confirming.codec.statistics_rows
    )
    assert [(a.alert_id, a.onset_time) for a in moved.process(events[41:]).alerts] == [
        (a.alert_id, a.onset_time) for a in engine.process(events[41:]).alerts
    ]
    assert {"above", "onset"} <= set(engine.arena.export(np.flatnonzero(engine.arena.used)))
    assert not hasattr(Engine(classify).arena, "above")


def test_smoothing_is_an_ewma_of_each_keys_raw_scores_from_zero(folder: Path) -> None:
    events = stream("aabab")
    raw = Engine(load_random(folder / "raw.onnx", make_manifest(), seed=4)).process(events)
    smooth_manifest = make_manifest(smoothing=0.25)
    smoothed = Engine(load_random(folder / "ewma.onnx", smooth_manifest, seed=4)).process(events)
    a0, a1, b0, a2, b1 = raw.scores
    a = [0.25 * a0]
    a += [0.25 * a1 + 0.75 * a[0], 0.25 * a2 + 0.75 * (0.25 * a1 + 0.75 * a[0])]
    want = [a[0], a[1], 0.25 * b0, a[2], 0.25 * b1 + 0.75 * 0.25 * b0]
    np.testing.assert_allclose(smoothed.scores, want, rtol=1e-6)


def test_alert_ids_are_deterministic_and_content_derived(classify: Scorer, folder: Path) -> None:
    events = stream("abc" * 10)
    _, threshold = scored_threshold(classify, events)
    options = EngineOptions(threshold=threshold)
    first = Engine(classify, options).process(events).alerts
    again = Engine(classify, options).process(events).alerts
    assert first and [a.alert_id for a in first] == [a.alert_id for a in again]
    alert = first[0]
    assert alert.alert_id == alert_id(
        alert.model_version, alert.key, alert.event_time, alert.sequence
    )
    assert len({a.alert_id for a in first}) == len(first)
    other = load_random(folder / "other.onnx", make_manifest(min_history=2), seed=9)
    assert other.manifest.model_version != alert.model_version
    assert alert.to_dict()["model_version"] == classify.manifest.model_version


def single_key_window(scorer: Scorer, events: list[InputRecord]) -> np.ndarray:
    """The window [1, window, width] ending at the last event of a one-key stream."""
    codec = scorer.codec
    decoded = [codec.decode(orjson.loads(record.payload)) for record in events]
    times = np.array([d.time for d in decoded])
    x = codec.encode(
        np.array([d.values for d in decoded]),
        codec.statistics_rows([d.key for d in decoded]),
        np.diff(times, prepend=times[0]),
    )
    window = np.zeros((1, scorer.manifest.window, codec.width), np.float32)
    window[0, : len(x)] = x
    return window


def test_classify_alerts_are_explained_by_occluding_the_last_event(
    classify: Scorer, classify_stateful: Scorer
) -> None:
    events = stream("aaaa", step=900.0)
    engine = Engine(classify, EngineOptions(threshold=-1.0))
    alert = engine.process(events[:3]).alerts[0]
    assert (alert.sequence, alert.explanation_kind) == (2, "occlusion")
    window = single_key_window(classify, events[:2])
    base = classify.score_windows(window, np.array([2])).score[0]
    want = {}
    for index, feature in enumerate(classify.manifest.features):
        occluded = window.copy()
        occluded[0, 1, index] = UNKNOWN_CODE if feature.kind == "categorical" else 0.0
        want[feature.name] = base - classify.score_windows(occluded, np.array([2])).score[0]
    got = {a.feature: a.value for a in alert.explanation}
    assert got == pytest.approx(want, abs=1e-6)
    sizes = [abs(a.value) for a in alert.explanation]
    assert sizes == sorted(sizes, reverse=True)
    assert max(abs(v) for v in want.values()) > 1e-4

    stateful = Engine(classify_stateful, EngineOptions(threshold=-1.0)).process(events[:3])
    same = {a.feature: a.value for a in stateful.alerts[0].explanation}
    assert same == pytest.approx(got, abs=1e-5)


def test_forecast_alerts_are_explained_by_shares_of_the_error(folder: Path) -> None:
    scorer = load_random(folder / "forecast.onnx", make_manifest("forecast"), seed=5)
    events = stream("aaa")
    alerts = Engine(scorer, EngineOptions(threshold=-1.0)).process(events).alerts
    assert len(alerts) == 1 and alerts[0].explanation_kind == "forecast_error_share"
    window = single_key_window(scorer, events[:2])
    contrib = scorer.score_windows(window, np.array([2])).contrib[0]
    shares = {a.feature: a.value for a in alerts[0].explanation}
    assert shares == pytest.approx(
        {"amount": contrib[0] / contrib.sum(), "items": contrib[1] / contrib.sum()}
    )
    assert sum(shares.values()) == pytest.approx(1.0)


def test_swap_keeps_state_for_a_compatible_model_and_resets_it_otherwise(
    classify: Scorer, folder: Path
) -> None:
    manifest = make_manifest(min_history=3)
    engine = Engine(load_random(folder / "v1.onnx", manifest, seed=1))
    assert statuses(engine, [stream("aa")]) == "WW"
    assert engine.swap_model(load_random(folder / "v2.onnx", manifest, seed=2)) is True
    assert statuses(engine, [stream("a", start=T0 + 14)]) == "S"
    wider = make_manifest(min_history=3, window=8)
    assert engine.swap_model(load_random(folder / "v3.onnx", wider, seed=2)) is False
    assert engine.keys == 0
    assert statuses(engine, [stream("a")]) == "W"


def test_batches_larger_than_max_batch_are_processed_in_slices(classify: Scorer) -> None:
    events = stream("abcabcabca")
    sliced = Engine(classify, EngineOptions(max_batch=3, max_keys=3)).process(events)
    whole = Engine(classify).process(events)
    np.testing.assert_array_equal(sliced.scores, whole.scores)
    assert sliced.counters.records == 10 and sliced.counters.scored == 7


def test_options_are_validated() -> None:
    with pytest.raises(ValueError, match="max_keys"):
        EngineOptions(max_batch=10, max_keys=5)
    with pytest.raises(ValueError, match="stride"):
        EngineOptions(stride=0)
    with pytest.raises(ValueError, match="late_events"):
        EngineOptions(late_events="drop")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="grace"):
        EngineOptions(late_grace_s=-1.0)


# a: T0, T0+14, T0+28, T0+42; b: T0+7, T0+21, T0+35, T0+49. Late: a 13 s behind a@14, then
# b 19 s behind b@21, alone in its batch.
ON_TIME = stream("abababab")
LATE = records(event("a", T0 + 1, 99.0), event("b", T0 + 2, 5.0))
BATCHES = [ON_TIME[:3], [ON_TIME[3], LATE[0], ON_TIME[4]], [LATE[1]], ON_TIME[5:]]
IS_LATE = np.array([record in LATE for batch in BATCHES for record in batch])


def feed(engine: Engine, batches: list[list[InputRecord]]) -> BatchResult:
    return BatchResult.concatenate([engine.process(batch) for batch in batches])


def key_state(engine: Engine) -> dict[str, np.ndarray]:
    arena = engine.arena
    return arena.export(arena.lookup(["a", "b"]))


@pytest.mark.parametrize("model", ["classify", "classify_stateful"])
def test_late_events_are_dead_letters_that_leave_their_key_as_it_was(
    model: str, request: pytest.FixtureRequest
) -> None:
    scorer = request.getfixturevalue(model)
    options = EngineOptions(threshold=0.0)  # every key alerts, with its sequence in the id
    engine, without_late = Engine(scorer, options), Engine(scorer, options)
    result = feed(engine, BATCHES)
    expected = feed(without_late, [[r for r in batch if r not in LATE] for batch in BATCHES])

    assert (result.statuses[IS_LATE] == D).all()
    assert all(key is None for key in result.keys[IS_LATE])
    np.testing.assert_array_equal(result.statuses[~IS_LATE], expected.statuses)
    np.testing.assert_allclose(result.scores[~IS_LATE], expected.scores, rtol=1e-6)
    assert [a.alert_id for a in result.alerts] == [a.alert_id for a in expected.alerts]
    assert len(result.alerts) == 2
    assert [(d.reason, d.payload) for d in result.dead_letters] == [
        ("late", record.payload) for record in LATE
    ]
    assert result.dead_letters[0].detail.startswith("13 s older than its key's latest event")
    state, want = key_state(engine), key_state(without_late)
    assert set(state) == set(want)
    np.testing.assert_array_equal(state.pop("keys"), want.pop("keys"))
    for name, values in want.items():
        np.testing.assert_allclose(state[name], values, rtol=1e-6, err_msg=name)
    counters = result.counters
    assert (counters.late, counters.dead_letters, counters.records) == (2, 2, 10)
    assert counters.scored + counters.warming_up == 8


def test_late_events_are_scored_as_they_come_when_so_configured(classify: Scorer) -> None:
    """Scored as if they came at their key's latest time: no time since the event before,
    and the key's latest time stays the latest."""
    result = feed(Engine(classify, EngineOptions(late_events="score")), BATCHES)
    at_latest = {LATE[0]: event("a", T0 + 14, 99.0), LATE[1]: event("b", T0 + 21, 5.0)}
    moved = [
        [InputRecord(orjson.dumps(at_latest[r])) if r in LATE else r for r in batch]
        for batch in BATCHES
    ]
    expected = feed(Engine(classify), moved)
    assert (result.statuses[IS_LATE] == S).all()
    np.testing.assert_array_equal(result.statuses, expected.statuses)
    np.testing.assert_allclose(result.scores, expected.scores, rtol=1e-6)
    assert (result.counters.late, result.counters.dead_letters) == (2, 0)
    assert result.dead_letters == expected.dead_letters == []


def test_events_within_the_grace_are_scored_and_equal_times_are_never_late(
    classify: Scorer,
) -> None:
    engine = Engine(classify, EngineOptions(late_grace_s=15.0))
    result = feed(engine, BATCHES)  # a is 13 s behind: within; b 19 s: beyond
    np.testing.assert_array_equal(result.statuses[IS_LATE], [S, D])
    assert (result.counters.late, result.counters.dead_letters) == (1, 1)
    again = engine.process(records(event("a", T0 + 42, 1.0), event("b", T0 + 49, 1.0)))
    assert again.counters.late == 0 and (again.statuses == S).all()
    assert Engine(classify).process(stream("aaa", step=0.0)).counters.late == 0


def test_late_events_are_logged_at_most_once_a_minute(classify: Scorer) -> None:
    engine = Engine(classify)
    engine.late_warning.clock = iter([1000.0, 1030.0, 1061.0]).__next__
    engine.process(stream("aa", start=T0 + 100))
    with capture_logs() as logs:
        for start in (T0, T0 + 1, T0 + 2):
            engine.process(stream("a", start=start))
    warnings = [entry for entry in logs if entry["log_level"] == "warning"]
    assert [(w["count"], w["key"], w["seconds_behind"]) for w in warnings] == [
        (1, "a", 107.0),
        (2, "a", 105.0),
    ]
    assert warnings[0]["policy"] == "dead_letter"


def test_keys_with_their_own_statistics_are_normalised_with_them(folder: Path) -> None:
    statistics = {"a": KeyStatistics(mean=[200.0, 0.0], std=[5.0, 1.0])}
    manifest = make_manifest(min_history=2, per_key_statistics=statistics)
    scorer = load_random(folder / "per-key.onnx", manifest, seed=6)
    events = stream("abab")
    result = Engine(scorer).process(events)
    for key, rows in (("a", [0, 2]), ("b", [1, 3])):
        window = single_key_window(scorer, [events[i] for i in rows])
        want = scorer.score_windows(window, np.array([2])).score[0]
        assert result.scores[rows[1]] == pytest.approx(want, abs=1e-6), key
    np.testing.assert_array_equal(scorer.codec.statistics_rows(["a", "b"]), [1, 0])
