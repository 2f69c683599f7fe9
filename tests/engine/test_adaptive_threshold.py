"""Adaptive per-key thresholds: the dynamic threshold re-chosen from each key's live scores."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import orjson
import pytest
from model_factory import event, load_random, make_manifest
from pydantic import ValidationError
from structlog.testing import capture_logs

from detector.contract.manifest import AdaptiveThreshold, KeyStatistics, Manifest, Scoring
from detector.engine.arena import ArenaShape, KeyArena
from detector.engine.core import Engine, EngineOptions, Status
from detector.engine.records import InputRecord
from detector.engine.scorer import Scorer
from detector.engine.thresholds import CANDIDATE_Z, choose_levels
from detector.state.snapshots import decode_fields, encode_fields, fingerprint
from trainer.calibrate import dynamic_threshold

T0 = 1_700_000_000.0
HISTORY, REFRESH, WARM_UP = 12, 4, 6


def adaptive_manifest(
    history: int = HISTORY,
    refresh: int = REFRESH,
    floor: str = "calibrated",
    warm_up_floor: float | None = None,
    buffer: int = 0,
    **changes,
) -> Manifest:
    manifest = make_manifest("forecast", "stateful", window=4, **changes)
    adaptive = AdaptiveThreshold(
        history=history,
        refresh=refresh,
        prune=0.1,
        buffer=buffer,
        warm_up=WARM_UP,
        warm_up_floor=warm_up_floor,
        floor=floor,
    )
    scoring = manifest.scoring.model_copy(update={"adaptive": adaptive})
    return manifest.model_copy(update={"scoring": scoring})


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="module")
def adaptive(folder: Path) -> Scorer:
    return load_random(folder / "adaptive.onnx", adaptive_manifest(threshold=0.05), seed=3)


@pytest.fixture(scope="module")
def fixed(folder: Path) -> Scorer:
    """The same network without adaptive thresholds: its scores are the reference's input."""
    return load_random(folder / "fixed.onnx", make_manifest("forecast", "stateful", window=4), 3)


def noisy_stream(keys: int = 3, per_key: int = 45, seed: int = 0) -> list[InputRecord]:
    """Interleaved keys whose amounts wander at different scales, with rare jumps."""
    rng = np.random.default_rng(seed)
    records = []
    for i in range(per_key):
        for key in range(keys):
            scale = 5.0 * (key + 1)
            jump = 150.0 if rng.random() < 0.05 else 0.0
            amount = 50.0 + scale * rng.normal() + jump
            records.append(event(f"k{key}", T0 + 60 * i + key, float(amount), items=key))
    return [InputRecord(orjson.dumps(record)) for record in records]


def run(scorer: Scorer, records: list[InputRecord], size: int) -> tuple[np.ndarray, ...]:
    """Keys, scores, thresholds and statuses of `records` fed in batches of `size`."""
    engine = Engine(scorer, EngineOptions(max_batch=64, max_keys=64))
    parts = [engine.process(records[i : i + size]) for i in range(0, len(records), size)]
    return tuple(np.concatenate([getattr(p, name) for p in parts]) for name in FIELDS)


FIELDS = ("keys", "scores", "thresholds", "statuses")


def expected_thresholds(
    keys: np.ndarray,
    scores: np.ndarray,
    statuses: np.ndarray,
    static: float,
    floor: bool = True,
    warm_up_floor: float | None = None,
    buffer: int = 0,
    history: int = HISTORY,
) -> np.ndarray:
    """Per key: every REFRESH-th scored event, the dynamic threshold of its last `history`
    scores (as float32, as the arena keeps them) becomes the key's, floored by `static` if
    `floor` (`static` before the first one); before the key's WARM_UP-th event at least
    `warm_up_floor` × `static`, or infinite."""
    thresholds = np.full(scores.size, np.nan)
    for key in np.unique(keys.astype(str)):
        events = np.flatnonzero((keys == key) & (statuses == Status.SCORED))
        level = np.nan
        for n, event_index in enumerate(events.tolist(), start=1):
            if n % REFRESH == 0:
                recent = scores[events[max(0, n - history) : n]].astype(np.float32)[None]
                every = np.ones(recent.shape, bool)
                level = choose_levels(recent, every, prune=0.1, buffer=buffer)[0][0]
            chosen = static if np.isnan(level) else max(level, static) if floor else level
            if n >= WARM_UP:
                thresholds[event_index] = chosen
            elif warm_up_floor is None:
                thresholds[event_index] = np.inf
            else:
                thresholds[event_index] = max(chosen, warm_up_floor * static)
    return thresholds


def test_levels_of_rows_are_those_of_each_row_alone_and_of_the_calibration() -> None:
    rng = np.random.default_rng(1)
    values = np.abs(rng.normal(1.0, 0.2, (70, 300)))
    values[:, 150:156] += rng.uniform(2, 9, (70, 1))  # one burst per row
    lengths = rng.integers(0, 301, 70)
    lengths[:3] = [0, 300, 1]
    valid = np.arange(300) < lengths[:, None]
    levels, z = choose_levels(values, valid)  # 70 rows: more than one chunk
    for row in range(70):
        alone = choose_levels(values[row, : lengths[row]][None], np.ones((1, lengths[row]), bool))
        np.testing.assert_allclose(levels[row], alone[0][0], rtol=1e-12)
        if lengths[row] > 1:
            assert levels[row] == pytest.approx(
                dynamic_threshold(values[row, : lengths[row]], None)[0]
            )
    assert np.isnan(levels[0])  # no scores
    # One score: just above it, at the ring's precision.
    assert levels[2] == np.nextafter(np.float32(values[2, 0]), np.float32(np.inf))
    full = values[1]
    assert full[:150].max() < levels[1] <= full[150:156].min()
    assert set(z.tolist()) <= set(CANDIDATE_Z.tolist())


def test_a_score_that_holds_still_stays_below_the_threshold_of_its_own_history() -> None:
    """An EWMA settled on a constant error (a SMAP channel stuck for hundreds of events): the
    ring keeps its scores as float32, the engine compares the float64 score, whose last bits
    must not open an alert."""
    score = 17573.267578125025  # float32 rounds it down
    ring = np.full((1, 50), np.float32(score))
    assert np.float64(ring[0, 0]) < score
    level = choose_levels(ring, np.ones(ring.shape, bool))[0][0]
    assert score < level == np.nextafter(np.float32(score), np.float32(np.inf))


def test_a_wider_pruning_margin_keeps_fewer_peaks() -> None:
    rng = np.random.default_rng(5)
    values = np.abs(rng.normal(1.0, 0.2, (100, 200)))
    values[:, 90:95] += rng.uniform(0.5, 3, (100, 1))  # bursts from barely to far above
    valid = np.ones(values.shape, bool)
    narrow = choose_levels(values, valid, prune=0.0)[0]
    wide = choose_levels(values, valid, prune=1.0)[0]
    assert (wide >= narrow).all() and (wide > narrow).sum() > 10


def fault_shape(height: float, length: int = 30, alpha: float = 0.1) -> np.ndarray:
    """A fault's smoothed scores above a quiet key's: an EWMA's rise and decay."""
    raw = np.zeros(length * 5)
    raw[:length] = height
    out, previous = np.empty_like(raw), 0.0
    for i, value in enumerate(raw):
        out[i] = previous = alpha * value + (1 - alpha) * previous
    return out


def test_with_an_error_buffer_a_past_faults_shoulders_do_not_hide_the_next_one() -> None:
    """A key's history holds one past fault (its smoothed scores rise and decay). Without the
    buffer, the choice flags only that fault's top and the pruning floor sits on its
    shoulders: a later fault of 60 % of its height stays below the threshold. With
    telemanom's error buffer, the shoulders count with the fault and the next one alerts."""
    rng = np.random.default_rng(4)
    history = np.abs(rng.normal(1.0, 0.15, 2100))
    history[500:650] += fault_shape(20.0)
    valid = np.ones((1, history.size), bool)
    plain = choose_levels(history[None], valid)[0][0]
    buffered = choose_levels(history[None], valid, buffer=100)[0][0]
    next_fault = 1.0 + fault_shape(0.6 * 20.0).max()
    assert plain > next_fault
    assert history[:500].max() < buffered < next_fault / 1.5


def test_an_error_buffer_stops_at_a_break() -> None:
    """Positions across a key boundary are another key's scores: the buffer stays on its side,
    so the other key's largest score still sets the pruning floor."""
    values = np.full(400, 1.0) + np.random.default_rng(3).normal(0, 0.02, 400)
    values[190:200] = 8.0
    values[205] = 3.0  # another key's largest score, within the buffer of the first's peak
    valid = np.ones((1, 400), bool)
    breaks = np.zeros(400, bool)
    breaks[201] = True
    joined = choose_levels(values[None], valid, None, 0.5, 50)[0][0]
    split = choose_levels(values[None], valid, breaks[None], 0.5, 50)[0][0]
    assert joined < 1.5 * 3.0 <= split


def test_a_break_starts_a_new_sequence() -> None:
    """Two bursts that touch count as one sequence, or two across a key boundary: the
    sequence count in the denominator then prefers a higher threshold."""
    values = np.full(400, 1.0) + np.random.default_rng(2).normal(0, 0.05, 400)
    values[200:204] = 6.0
    values[204:208] = 4.0
    breaks = np.zeros(400, bool)
    one = choose_levels(values[None], np.ones((1, 400), bool))[1][0]
    breaks[204] = True
    two = choose_levels(values[None], np.ones((1, 400), bool), breaks[None])[1][0]
    assert one <= two


def test_engine_thresholds_equal_the_per_key_reference_however_batches_are_cut(
    adaptive: Scorer, fixed: Scorer
) -> None:
    records = noisy_stream()
    keys, scores, _, statuses = run(fixed, records, len(records))
    want = expected_thresholds(keys, scores, statuses, adaptive.manifest.scoring.threshold)
    finite = np.isfinite(want)
    assert (want[finite] > adaptive.manifest.scoring.threshold).sum() > 20  # levels matter
    assert (~finite & (statuses == Status.SCORED)).sum() == 3 * (WARM_UP - 1)
    for size in (len(records), 7, 1):
        _, got_scores, thresholds, got_statuses = run(adaptive, records, size)
        np.testing.assert_array_equal(got_statuses, statuses)
        np.testing.assert_allclose(got_scores, scores, rtol=1e-6)
        np.testing.assert_allclose(thresholds, want, rtol=1e-6)


def test_the_engine_applies_the_manifests_error_buffer(fixed: Scorer, folder: Path) -> None:
    records = noisy_stream(per_key=90)
    keys, scores, _, statuses = run(fixed, records, len(records))
    manifest = adaptive_manifest(history=40, buffer=3, threshold=0.05)
    buffered = load_random(folder / "buffered.onnx", manifest, seed=3)
    want = expected_thresholds(keys, scores, statuses, 0.05, buffer=3, history=40)
    plain = expected_thresholds(keys, scores, statuses, 0.05, history=40)
    assert (want != plain).sum() > 10  # the buffer matters on these scores
    np.testing.assert_allclose(run(buffered, records, 9)[2], want, rtol=1e-6)


def test_without_a_floor_a_keys_threshold_is_its_own_alone(fixed: Scorer, folder: Path) -> None:
    manifest = adaptive_manifest(floor="none", threshold=1e6)
    unfloored = load_random(folder / "unfloored.onnx", manifest, seed=3)
    records = noisy_stream()
    keys, scores, _, statuses = run(fixed, records, len(records))
    want = expected_thresholds(keys, scores, statuses, 1e6, floor=False)
    assert (want < 1e6).sum() > 20
    np.testing.assert_allclose(run(unfloored, records, 5)[2], want, rtol=1e-6)


def test_a_warming_key_alerts_above_a_multiple_of_its_static_threshold(
    fixed: Scorer, folder: Path
) -> None:
    """With `warm_up_floor`, a key's first WARM_UP - 1 scores meet a finite threshold: at
    least that multiple of the static one; from then on the usual one."""
    records = noisy_stream()
    keys, scores, _, statuses = run(fixed, records, len(records))
    static = float(np.median(scores[statuses == Status.SCORED]))
    manifest = adaptive_manifest(warm_up_floor=3.0, threshold=static)
    warming = load_random(folder / "warming.onnx", manifest, seed=3)
    want = expected_thresholds(keys, scores, statuses, static, warm_up_floor=3.0)
    usual = expected_thresholds(keys, scores, statuses, static)
    scored = statuses == Status.SCORED
    young = scored & np.isinf(usual)
    assert young.sum() == 3 * (WARM_UP - 1)
    assert (want[young] >= 3.0 * static).all() and np.isfinite(want[young]).all()
    np.testing.assert_array_equal(want[scored & ~young], usual[scored & ~young])
    np.testing.assert_allclose(run(warming, records, 5)[2], want, rtol=1e-6)
    engine = Engine(warming, EngineOptions())
    first = engine.process([InputRecord(orjson.dumps(event("new", T0, 1e5, items=0)))])
    second = engine.process([InputRecord(orjson.dumps(event("new", T0 + 60, 1e5, items=0)))])
    assert second.scores[0] >= second.thresholds[0] == pytest.approx(3.0 * static)
    assert [a.key for a in second.alerts] == ["new"] and not first.alerts


def test_no_threshold_is_below_the_models_min_score(fixed: Scorer, folder: Path) -> None:
    records = noisy_stream()
    keys, scores, _, statuses = run(fixed, records, len(records))
    unbounded = expected_thresholds(keys, scores, statuses, 1e6, floor=False)
    chosen = unbounded[np.isfinite(unbounded) & (unbounded < 1e6)]
    min_score = float(np.median(chosen))
    assert chosen.min() < min_score < chosen.max()
    manifest = adaptive_manifest(floor="none", threshold=1e6)
    bounded = manifest.model_copy(
        update={"scoring": manifest.scoring.model_copy(update={"min_score": min_score})}
    )
    scorer = load_random(folder / "bounded.onnx", bounded, seed=3)
    np.testing.assert_allclose(
        run(scorer, records, 5)[2], np.maximum(unbounded, min_score), rtol=1e-6
    )

    plain = make_manifest("forecast", "stateful", window=4, threshold=0.05)
    static = plain.model_copy(
        update={"scoring": plain.scoring.model_copy(update={"min_score": 0.3})}
    )
    static_scorer = load_random(folder / "bounded-static.onnx", static, seed=3)
    scored = statuses == Status.SCORED
    assert set(Engine(static_scorer).process(records).thresholds[scored].tolist()) == {0.3}
    overridden = Engine(static_scorer, EngineOptions(threshold=0.1)).process(records)
    assert set(overridden.thresholds[scored].tolist()) == {0.1}  # an explicit one holds as is


def own_thresholds(**thresholds: float | None) -> dict[str, KeyStatistics]:
    """Per-key statistics equal to the global ones (scores stay those of `fixed`), each key
    with the given threshold of its own."""
    return {
        key: KeyStatistics(mean=[50.0, 2.0], std=[20.0, 1.5], threshold=threshold)
        for key, threshold in thresholds.items()
    }


def test_a_keys_own_calibrated_threshold_replaces_the_models(fixed: Scorer, folder: Path) -> None:
    statistics = own_thresholds(k1=1e6, k2=None)
    manifest = adaptive_manifest(threshold=0.05, per_key_statistics=statistics)
    scorer = load_random(folder / "own.onnx", manifest, seed=3)
    records = noisy_stream()
    keys, scores, _, statuses = run(fixed, records, len(records))
    want = expected_thresholds(keys, scores, statuses, 0.05)
    k1 = keys == "k1"
    want[k1] = expected_thresholds(keys, scores, statuses, 1e6)[k1]
    assert (want[k1 & (statuses == Status.SCORED)] >= 1e6).all()
    np.testing.assert_allclose(run(scorer, records, 5)[2], want, rtol=1e-6)

    plain = make_manifest("forecast", "stateful", window=4, threshold=0.05)
    fixed_own = load_random(
        folder / "fixed-own.onnx", plain.model_copy(update={"per_key_statistics": statistics}), 3
    )
    result = Engine(fixed_own).process(records)
    scored = result.statuses == Status.SCORED
    expected = np.where(result.keys == "k1", 1e6, 0.05)
    np.testing.assert_array_equal(result.thresholds[scored], expected[scored])
    overridden = Engine(fixed_own, EngineOptions(threshold=0.3)).process(records)
    assert set(overridden.thresholds[scored].tolist()) == {0.3}  # an explicit one holds for all


def test_per_key_thresholds_do_not_change_how_state_is_kept(folder: Path) -> None:
    without = adaptive_manifest(per_key_statistics=own_thresholds(k1=None))
    with_own = adaptive_manifest(per_key_statistics=own_thresholds(k1=2.0))
    assert fingerprint(with_own) == fingerprint(without)
    engine = Engine(load_random(folder / "without.onnx", without, seed=4))
    engine.process(noisy_stream(per_key=10))
    assert engine.swap_model(load_random(folder / "with-own.onnx", with_own, seed=4)) is True
    assert engine.keys == 3 and engine.static_thresholds.tolist() == [0.5, 2.0]
    with pytest.raises(ValidationError, match="threshold"):
        KeyStatistics(mean=[0.0], std=[1.0], threshold=float("nan"))


def test_alerts_carry_their_keys_threshold_and_noisier_keys_get_higher_ones(
    adaptive: Scorer,
) -> None:
    records = noisy_stream(per_key=60)
    engine = Engine(adaptive, EngineOptions(max_batch=64, max_keys=64, cooldown_events=0))
    result = engine.process(records)
    scored = result.statuses == Status.SCORED
    assert (result.thresholds[scored] >= adaptive.manifest.scoring.threshold).all()
    assert all(
        alert.sequence - adaptive.manifest.min_history + 1 >= WARM_UP for alert in result.alerts
    )
    assert np.isnan(result.thresholds[~scored]).all()
    last = {key: result.thresholds[scored & (result.keys == key)][-1] for key in ("k0", "k2")}
    assert last["k2"] > last["k0"]
    assert result.alerts
    for alert in result.alerts:
        index = np.flatnonzero((result.keys == alert.key) & (result.times == alert.event_time))[0]
        assert alert.threshold == result.thresholds[index] <= alert.score


def test_adaptive_state_is_exported_and_restored_exactly(adaptive: Scorer) -> None:
    records = noisy_stream(per_key=50)
    half = len(records) // 2
    whole = Engine(adaptive, EngineOptions(max_batch=64, max_keys=64))
    whole.process(records[:half])
    moved = Engine(adaptive, EngineOptions(max_batch=64, max_keys=64))
    arena = whole.arena
    fields = arena.export(np.flatnonzero(arena.used))
    assert {"recent", "scored", "level"} <= set(fields)
    moved.arena.restore(decode_fields(encode_fields(fields)), adaptive.codec.statistics_rows)
    expected, got = whole.process(records[half:]), moved.process(records[half:])
    np.testing.assert_array_equal(got.thresholds, expected.thresholds)
    assert [a.alert_id for a in got.alerts] == [a.alert_id for a in expected.alerts]


def test_the_history_costs_four_bytes_a_score_and_only_when_adaptive() -> None:
    plain = make_manifest("forecast", "stateful", window=4)
    with_history = adaptive_manifest(history=500)
    bytes_plain = KeyArena(ArenaShape.for_manifest(plain), 8).nbytes_per_slot()
    bytes_adaptive = KeyArena(ArenaShape.for_manifest(with_history), 8).nbytes_per_slot()
    assert bytes_adaptive - bytes_plain == 500 * 4 + 8 + 8  # the ring, `scored` and `level`
    assert not hasattr(KeyArena(ArenaShape.for_manifest(plain), 8), "recent")


def test_snapshots_are_exchanged_only_between_models_of_the_same_history() -> None:
    plain = make_manifest("forecast", "stateful", window=4)
    assert fingerprint(adaptive_manifest()) != fingerprint(plain)
    assert fingerprint(adaptive_manifest(history=24)) != fingerprint(adaptive_manifest())
    assert fingerprint(adaptive_manifest(refresh=6)) == fingerprint(adaptive_manifest())


def test_a_swap_keeps_state_only_for_the_same_history(adaptive: Scorer, folder: Path) -> None:
    engine = Engine(adaptive, EngineOptions(max_batch=64, max_keys=64))
    engine.process(noisy_stream(per_key=10))
    same = load_random(folder / "same.onnx", adaptive_manifest(threshold=0.5), seed=4)
    assert engine.swap_model(same) is True
    longer = load_random(folder / "longer.onnx", adaptive_manifest(history=24), seed=4)
    assert engine.swap_model(longer) is False
    assert engine.keys == 0 and engine.arena.recent.shape[1] == 24


def test_the_manifest_refuses_a_refresh_longer_than_the_history() -> None:
    with pytest.raises(ValidationError, match="refresh must not exceed history"):
        AdaptiveThreshold(history=20, refresh=21)
    document = orjson.loads(adaptive_manifest().to_json())
    document["scoring"]["adaptive"]["history"] = 5
    with pytest.raises(ValidationError, match=r"scoring\.adaptive\.history"):
        Manifest.model_validate(document)
    assert Scoring.model_fields["adaptive"].default is None
    document = orjson.loads(adaptive_manifest().to_json())
    document["scoring"]["confirm"] = 0
    with pytest.raises(ValidationError, match=r"scoring\.confirm"):
        Manifest.model_validate(document)


def test_a_ring_that_could_fill_memory_at_max_keys_is_announced(adaptive: Scorer) -> None:
    with capture_logs() as logs:
        Engine(adaptive, EngineOptions(max_batch=64, max_keys=64))
    assert not logs
    with capture_logs() as logs:
        Engine(adaptive, EngineOptions(max_keys=30_000_000))  # 12 scores x 4 bytes each: 1.3 GiB
    assert [(log["log_level"], log["gib_at_max_keys"]) for log in logs] == [("warning", 1.3)]
