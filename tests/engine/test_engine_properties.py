"""Property tests: the engine equals a plain per-key reference, however the stream is cut.

The reference keeps each key's encoded events in a Python list (or its LSTM state) and
makes one onnxruntime call per event: obviously right, hopelessly slow. The engine must give
the same statuses exactly and the same scores to 1e-5 for any interleaving of keys and any
batch boundaries, with windows that roll over and several events per key per batch.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from model_factory import MERCHANTS, event, load_random, make_manifest

from detector.engine.core import Engine, EngineOptions, LatePolicy, Status
from detector.engine.records import InputRecord
from detector.engine.scorer import Scorer

WINDOW = 4

events_strategy = st.lists(
    st.tuples(
        st.integers(0, 4),  # key
        st.floats(0.0, 300.0),  # seconds since the previous event of the stream
        st.floats(-50.0, 200.0),  # amount
        st.sampled_from([*MERCHANTS, "unseen"]),
    ),
    min_size=1,
    max_size=40,
)
#: Streams whose time may go back, so that some events come after later ones of their key.
late_events_strategy = st.lists(
    st.tuples(
        st.integers(0, 3),
        st.floats(-120.0, 300.0),
        st.floats(-50.0, 200.0),
        st.sampled_from(MERCHANTS),
    ),
    min_size=1,
    max_size=40,
)
cuts_strategy = st.lists(st.integers(1, 12), min_size=1, max_size=8)
property_settings = settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Scorer]:
    folder = tmp_path_factory.mktemp("models")
    specs = {
        "classify-window": make_manifest("classify", "window", window=WINDOW, min_history=2),
        "forecast-window": make_manifest("forecast", "window", window=WINDOW, layers=2),
        "classify-stateful": make_manifest("classify", "stateful", window=WINDOW, min_history=2),
        "forecast-stateful": make_manifest("forecast", "stateful", window=WINDOW),
        "classify-bidirectional": make_manifest(
            "classify", "window", window=WINDOW, bidirectional=True
        ),
    }
    return {
        name: load_random(folder / f"{name}.onnx", manifest, seed=index)
        for index, (name, manifest) in enumerate(specs.items())
    }


def stream(draws: list[tuple[int, float, float, str]]) -> list[dict]:
    time = 1_700_000_000.0
    records = []
    for key, step, amount, merchant in draws:
        time += step
        records.append(event(f"key-{key}", time, amount, items=key % 3, merchant=merchant))
    return records


def run_engine(
    scorer: Scorer,
    records: list[dict],
    cuts: list[int],
    stride: int = 1,
    threshold: float | None = None,
    ttl: float = 0.0,
    late_events: LatePolicy = "dead_letter",
    grace: float = 0.0,
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Statuses, scores and alert ids of the engine fed `records` in batches of `cuts` sizes."""
    options = EngineOptions(
        max_batch=64,
        max_keys=64,
        stride=stride,
        threshold=threshold,
        key_ttl_s=ttl,
        late_events=late_events,
        late_grace_s=grace,
    )
    engine = Engine(scorer, options)
    batches, start, turn = [], 0, 0
    while start < len(records):
        size = cuts[turn % len(cuts)]
        batches.append(engine.process([InputRecord(r) for r in records[start : start + size]]))
        start, turn = start + size, turn + 1
    statuses = np.concatenate([b.statuses for b in batches])
    scores = np.concatenate([b.scores for b in batches])
    return statuses, scores, [a.alert_id for b in batches for a in b.alerts]


def reference(
    scorer: Scorer,
    records: list[dict],
    stride: int = 1,
    ttl: float = 0.0,
    late_events: LatePolicy = "dead_letter",
    grace: float = 0.0,
) -> tuple[np.ndarray, ...]:
    """Statuses and scores from per-key lists and one onnxruntime call per event; a key idle
    for more than `ttl` seconds (if not 0) starts afresh. An event more than `grace` seconds
    older than its key's latest is a dead letter, or with `late_events="score"` scored as if
    no time had passed since that latest one."""
    manifest, codec = scorer.manifest, scorer.codec
    history: dict[str, list[np.ndarray]] = defaultdict(list)
    latest: dict[str, float] = {}
    state: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    statuses, scores = [], []
    for record in records:
        decoded = codec.decode(record)
        key = decoded.key
        late = key in latest and decoded.time < latest[key] - grace
        if late and late_events == "dead_letter":
            statuses.append(Status.DEAD_LETTER)
            scores.append(np.nan)
            continue
        gap = max(decoded.time - latest[key], 0.0) if key in latest else 0.0
        if ttl and gap > ttl:
            history.pop(key)
            state.pop(key, None)
            gap = 0.0
        latest[key] = max(decoded.time, latest.get(key, decoded.time))
        x = codec.encode(np.array([decoded.values]), codec.statistics_rows([key]), np.array([gap]))[
            0
        ]
        events = history[key]
        events.append(x)
        if manifest.export_mode == "window":
            length = min(len(events), manifest.window)
            window = np.zeros((1, manifest.window, x.size), np.float32)
            window[0, :length] = events[-length:]
            score = scorer.score_windows(window, np.array([length])).score[0]
        else:
            h, c = state.get(key) or scorer.zero_state(1)
            out = scorer.step(x[None], h, c)
            state[key] = (out.h, out.c)
            score = out.score[0]
        seen = len(events) - manifest.min_history
        if seen < 0:
            statuses.append(Status.WARMING_UP)
            scores.append(np.nan)
        elif seen % stride:
            statuses.append(Status.SKIPPED_BY_STRIDE)
            scores.append(np.nan)
        else:
            statuses.append(Status.SCORED)
            scores.append(score)
    return np.array(statuses), np.array(scores)


@pytest.mark.parametrize(
    "name",
    [
        "classify-window",
        "forecast-window",
        "classify-stateful",
        "forecast-stateful",
        "classify-bidirectional",
    ],
)
@property_settings
@given(
    draws=events_strategy,
    cuts=cuts_strategy,
    stride=st.integers(1, 3),
    ttl=st.sampled_from([0.0, 250.0, 600.0]),
)
def test_engine_equals_per_key_reference(
    models: dict[str, Scorer], name: str, draws: list, cuts: list[int], stride: int, ttl: float
) -> None:
    records = stream(draws)
    statuses, scores, _ = run_engine(models[name], records, cuts, stride, ttl=ttl)
    want_statuses, want_scores = reference(models[name], records, stride, ttl)
    np.testing.assert_array_equal(statuses, want_statuses)
    np.testing.assert_allclose(scores, want_scores, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["classify-window", "forecast-stateful"])
@property_settings
@given(
    draws=late_events_strategy,
    cuts=cuts_strategy,
    late_events=st.sampled_from(["dead_letter", "score"]),
    grace=st.sampled_from([0.0, 90.0]),
)
def test_late_events_follow_the_policy_however_the_stream_is_cut(
    models: dict[str, Scorer],
    name: str,
    draws: list,
    cuts: list[int],
    late_events: LatePolicy,
    grace: float,
) -> None:
    records = stream(draws)
    options = {"late_events": late_events, "grace": grace}
    statuses, scores, _ = run_engine(models[name], records, cuts, **options)
    want_statuses, want_scores = reference(models[name], records, **options)
    np.testing.assert_array_equal(statuses, want_statuses)
    np.testing.assert_allclose(scores, want_scores, rtol=1e-5, atol=1e-5)


def test_the_late_events_strategy_makes_late_events(models: dict[str, Scorer]) -> None:
    """Guard against a vacuous property: a stream going back has late events, in one batch
    and across batches."""
    records = stream([(0, 10.0, 1.0, "fuel"), (0, 10.0, 2.0, "fuel"), (0, -15.0, 3.0, "fuel")])
    for cuts in ([3], [1]):
        statuses, _, _ = run_engine(models["classify-window"], records, cuts)
        assert statuses.tolist() == [Status.WARMING_UP, Status.SCORED, Status.DEAD_LETTER]


def middle(scores: np.ndarray) -> float | None:
    """A threshold that about half of the scores cross, halfway between two of them (so that
    last-bit differences between batchings cannot move a score across it); None if none."""
    values = np.unique(scores[~np.isnan(scores)])
    if values.size < 2:
        return None if values.size == 0 else float(values[0]) - 0.01
    return float(values[values.size // 2 - 1] + values[values.size // 2]) / 2


@pytest.mark.parametrize("name", ["forecast-window", "classify-stateful"])
@property_settings
@given(draws=events_strategy, cuts=cuts_strategy)
def test_results_do_not_depend_on_batch_boundaries(
    models: dict[str, Scorer], name: str, draws: list, cuts: list[int]
) -> None:
    records = stream(draws)
    threshold = middle(run_engine(models[name], records, [len(records)], threshold=np.inf)[1])
    whole = run_engine(models[name], records, [len(records)], threshold=threshold)
    cut = run_engine(models[name], records, cuts, threshold=threshold)
    np.testing.assert_array_equal(cut[0], whole[0])
    np.testing.assert_allclose(cut[1], whole[1], rtol=1e-5, atol=1e-5)
    assert cut[2] == whole[2]
    assert bool(whole[2]) == (threshold is not None)


def test_reference_covers_rolling_windows(models: dict[str, Scorer], tmp_path: Path) -> None:
    """Guard against a vacuous property: the strategy does produce keys past the window."""
    records = stream([(0, 1.0, float(i), "fuel") for i in range(3 * WINDOW)])
    statuses, scores, _ = run_engine(models["classify-window"], records, [5])
    _, want = reference(models["classify-window"], records)
    assert (statuses == Status.SCORED).sum() == 3 * WINDOW - 1
    np.testing.assert_allclose(scores, want, rtol=1e-5, atol=1e-5)
    assert len(set(np.round(scores[WINDOW:], 6))) > 1
