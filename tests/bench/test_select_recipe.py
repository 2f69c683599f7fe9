"""The recipe's selection replays alerting offline: its thresholds must be the engine's, to the
event, or the settings it chooses would be judged on something the product never does."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import orjson
import pytest
from model_factory import event, load_random, make_manifest

from detector.contract.manifest import AdaptiveThreshold
from detector.engine.core import Engine, EngineOptions, Status
from detector.engine.records import InputRecord
from trainer.calibrate import calibrate, smooth_per_key

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import select_recipe

HISTORY, REFRESH = 12, 4
T0 = 1_700_000_000.0


@pytest.mark.parametrize(
    ("warm_up", "warm_up_floor", "buffer", "adaptive"),
    [
        (0, None, 0, True),
        (6, None, 0, True),
        (10, None, 0, True),
        (10, 3.0, 0, True),
        (10, 3.0, 3, True),
        (0, None, 0, False),
    ],
)
def test_the_replayed_thresholds_are_the_engines(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    warm_up: int,
    warm_up_floor: float | None,
    buffer: int,
    adaptive: bool,
) -> None:
    alpha, prune, floor, static = 0.3, 0.1, 0.02, 0.05
    manifest = make_manifest("forecast", "stateful", window=4, threshold=static)
    scoring = manifest.scoring.model_copy(
        update={
            "smoothing": alpha,
            "min_score": floor,
            "adaptive": AdaptiveThreshold(
                history=HISTORY,
                refresh=REFRESH,
                prune=prune,
                buffer=buffer,
                warm_up=warm_up,
                warm_up_floor=warm_up_floor,
                floor="none",
            )
            if adaptive
            else None,
        }
    )
    scorer = load_random(tmp_path / "m.onnx", manifest.model_copy(update={"scoring": scoring}), 3)
    rng = np.random.default_rng(0)
    amounts = 50 + 5 * rng.normal(size=60) + 150 * (rng.random(60) < 0.05)
    records = [
        InputRecord(orjson.dumps(event("k", T0 + 60 * i, float(a), items=1)))
        for i, a in enumerate(amounts)
    ]
    result = Engine(scorer, EngineOptions(max_batch=16)).process(records)
    scored = result.statuses == Status.SCORED

    monkeypatch.setattr(select_recipe, "HISTORY", HISTORY)
    monkeypatch.setattr(select_recipe, "REFRESH", REFRESH)
    raw = select_recipe._unsmoothed(result.scores[scored], alpha)
    unlabeled = np.zeros(20, bool)
    stream = select_recipe.Stream(
        "SMAP", "k", "0", raw, np.zeros(raw.size, bool), static, floor / 0.1**2, raw[:20], unlabeled
    )
    setting = select_recipe.Setting(alpha, prune, buffer, warm_up, warm_up_floor, 1, 0.1, adaptive)
    select_recipe._prepare_levels([stream], [setting])
    stream.statics[alpha] = static  # the model's, not one calibrated on these scores

    np.testing.assert_allclose(stream.smoothed[alpha], result.scores[scored], rtol=1e-12)
    np.testing.assert_allclose(
        select_recipe._thresholds(stream, setting), result.thresholds[scored], rtol=1e-9
    )
    warming = result.thresholds[scored][: max(warm_up - 1, 0)]
    if warm_up_floor is None:
        assert np.isinf(warming).all()
    else:
        assert (warming >= warm_up_floor * static).all() and np.isfinite(warming).all()


def test_the_replay_calibrates_each_smoothing_as_the_trainer_does() -> None:
    """On the normal validation scores: the faults labeled in a training file (the synthetic
    series' first 30 %) are smoothed with the rest but not judged."""
    rng = np.random.default_rng(1)
    validation = np.abs(rng.normal(1.0, 0.3, 500)) + 4.0 * (rng.random(500) < 0.01)
    faulty = np.zeros(500, bool)
    faulty[200:230] = True
    validation[faulty] += 20.0
    stream = select_recipe.Stream(
        "SMAP", "k", "0", validation[:100], np.zeros(100, bool), 1.0, 1.0, validation, faulty
    )
    settings = [select_recipe.Setting(alpha, 0.13, 0, 0, None, 1, 0.1) for alpha in (1.0, 0.1)]
    select_recipe._prepare_levels([stream], settings)
    keys = np.zeros(validation.size, int)
    for alpha in (1.0, 0.1):
        trainer = calibrate(smooth_per_key(validation, keys, alpha), faulty, "dynamic", 0.13)[0]
        assert stream.statics[alpha] == pytest.approx(trainer, rel=1e-12)
    assert stream.statics[1.0] != pytest.approx(stream.statics[0.1])  # each α its own


def test_the_replay_calibrates_a_fleets_threshold_on_all_its_keys_at_once() -> None:
    """One model for a fleet has one static threshold, the trainer's of all its keys'
    validation scores; each seed's model its own. A key with a model of its own keeps its own."""
    rng = np.random.default_rng(2)
    validations = [np.abs(rng.normal(1.0, 0.2 * (key + 1), 300)) for key in range(3)]

    def stream(data_set: str, key: int, seed: str, scale: float = 1.0) -> select_recipe.Stream:
        validation = scale * validations[key]
        return select_recipe.Stream(
            data_set,
            f"k{key}",
            seed,
            validation[:50],
            np.zeros(50, bool),
            1.0,
            1.0,
            validation,
            np.zeros(validation.size, bool),
        )

    fleet = [stream(select_recipe.FLEET, key, "0") for key in range(3)]
    other_seed = [stream(select_recipe.FLEET, key, "1", scale=2.0) for key in range(3)]
    alone = stream("synthetic", 2, "0")
    streams = [*fleet, *other_seed, alone]
    select_recipe._prepare_levels(streams, [select_recipe.Setting(0.1, 0.13, 0, 0, None, 1, 0.1)])

    keys = np.repeat(np.arange(3), 300)
    pooled = smooth_per_key(np.concatenate(validations), keys, 0.1)
    trainer = calibrate(pooled, None, "dynamic", 0.13, keys)[0]
    assert [s.statics[0.1] for s in fleet] == pytest.approx([trainer] * 3, rel=1e-12)
    assert [s.statics[0.1] for s in other_seed] == pytest.approx([2 * trainer] * 3, rel=1e-9)
    own = calibrate(smooth_per_key(validations[2], keys[:300], 0.1), None, "dynamic", 0.13)[0]
    assert alone.statics[0.1] == pytest.approx(own, rel=1e-12) != pytest.approx(trainer)


def test_a_key_mostly_in_alert_detects_nothing() -> None:
    """One endless episode overlaps every label; it tells none of them apart."""
    labels = np.zeros(400, bool)
    labels[100:120] = labels[300:320] = True
    raw = np.full(400, 5.0)
    stream = select_recipe.Stream(
        "SMAP", "k", "0", raw, labels, 1.0, 1.0, np.ones(50), np.zeros(50, bool)
    )
    setting = select_recipe.Setting(1.0, 0.13, 0, 0, None, 1, 0.0, adaptive=False)
    select_recipe._prepare_levels([stream], [setting])
    np.testing.assert_array_equal(select_recipe._counts(stream, setting), [2, 0, 1, 0])
    stream.raw = np.where(labels, 5.0, 0.0)  # in alert on its labels only: both detected
    stream.smoothed = {}
    select_recipe._prepare_levels([stream], [setting])
    np.testing.assert_array_equal(select_recipe._counts(stream, setting), [2, 2, 2, 2])
