"""The product logic the quality benchmarks motivated: the dynamic threshold and the episode
spans that turn replayed scores into predicted anomalous sequences."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from model_factory import event, load_random, make_manifest

from detector.engine import EngineOptions, Status
from detector.replay import replay_records
from detector.thresholds import CANDIDATE_Z
from trainer.calibrate import CalibrationError, calibrate, dynamic_threshold
from trainer.config import TrainConfig
from trainer.metrics import episode_flags, runs


def test_dynamic_threshold_separates_a_burst_from_noise() -> None:
    rng = np.random.default_rng(0)
    scores = np.abs(rng.normal(1.0, 0.1, 2000))
    scores[1000:1010] = 5.0  # one short burst of large errors
    threshold, description = dynamic_threshold(scores, None, prune=0.0)
    mean, std = scores.mean(), scores.std()
    # Above the noise, below the burst: the burst is the one sequence it flags.
    assert scores[:1000].max() < threshold <= 5.0
    z = (threshold - mean) / std
    assert np.isclose(CANDIDATE_Z, z).any()
    assert description == f"dynamic: max(mean+{z:g}std, (1+0)·max below) of validation scores"
    assert len(runs(scores >= threshold)) == 1


def test_dynamic_threshold_prunes_peaks_close_to_the_normal_ones() -> None:
    rng = np.random.default_rng(2)
    scores = np.abs(rng.normal(1.0, 0.1, 2000))
    scores[1000:1010] = 5.0
    epsilon = dynamic_threshold(scores, None, prune=0.0)[0]
    largest_normal = scores[scores < epsilon].max()
    # The floor: a live peak must beat the largest normal score below ε by the margin.
    assert dynamic_threshold(scores, None, prune=0.13)[0] == max(epsilon, 1.13 * largest_normal)
    assert dynamic_threshold(scores, None, prune=0.9)[0] == pytest.approx(1.9 * largest_normal)
    assert calibrate(scores, None, "dynamic", 0.9) == dynamic_threshold(scores, None, None, 0.9)


def test_dynamic_threshold_prefers_few_sequences_and_ignores_labeled_events() -> None:
    rng = np.random.default_rng(1)
    scores = np.abs(rng.normal(1.0, 0.1, 3000))
    scores[[500, 1500, 2500]] = 2.0  # three scattered moderate spikes
    scores[2000:2030] = 6.0  # one sustained anomaly, labeled
    labels = np.zeros(scores.size)
    labels[2000:2030] = 1
    threshold, _ = dynamic_threshold(scores, labels, prune=0.0)
    assert threshold == dynamic_threshold(scores[labels == 0], None, prune=0.0)[0]
    assert threshold < 2.0  # with the labeled burst gone, the spikes are what stands out


def test_dynamic_threshold_counts_sequences_per_key() -> None:
    scores = np.ones(40)
    scores[::2] = 1.2
    scores[19], scores[20] = 9.0, 9.0
    keys = np.repeat(["a", "b"], 20)
    one_key = dynamic_threshold(scores, None, prune=0.0)[0]
    two_keys = dynamic_threshold(scores, None, keys, prune=0.0)[0]
    assert one_key == pytest.approx(two_keys)  # same spikes either way...
    assert len(runs(scores >= one_key)) == 1
    assert len(runs(scores >= two_keys, keys)) == 2  # ...but split at the key boundary


def test_dynamic_threshold_of_constant_scores_alerts_only_above_them() -> None:
    flat = np.full(100, 2.0)
    assert dynamic_threshold(flat, None)[0] == np.nextafter(2.0, np.inf)
    # A channel predicted perfectly in validation must not alert on every error of zero.
    assert dynamic_threshold(np.zeros(50), None)[0] > 0.0
    with pytest.raises(CalibrationError, match="no normal events"):
        dynamic_threshold(flat, np.ones(100))


def test_dynamic_is_an_unsupervised_method_in_the_config() -> None:
    document = {
        "data": {"key": "k", "time": "t", "features": [{"name": "v", "kind": "numeric"}]},
        "model": {"task": "forecast", "min_history": 2},
        "threshold": {"method": "dynamic"},
    }
    assert TrainConfig.model_validate(document).threshold.resolved_target == 0.13
    document["threshold"] = {"method": "max_f1"}
    with pytest.raises(ValueError, match="'quantile' or 'dynamic'"):
        TrainConfig.model_validate(document)


def test_episode_flags_follow_the_cooldown_within_each_key() -> None:
    above = np.array([0, 1, 0, 0, 0, 1, 1, 0, 0, 0, 0, 1, 0], bool)
    assert episode_flags(above, None, 3).astype(int).tolist() == [
        0, 1, 1, 1, 0, 1, 1, 1, 1, 0, 0, 1, 1,
    ]  # fmt: skip
    groups = np.array([0] * 6 + [1] * 7)
    # A new key never inherits the previous key's open episode.
    assert episode_flags(above, groups, 3).astype(int).tolist() == [
        0, 1, 1, 1, 0, 1, 1, 1, 1, 0, 0, 1, 1,
    ]  # fmt: skip
    assert episode_flags(above, groups, 5)[6:].astype(int).tolist() == [1, 1, 1, 1, 1, 1, 1]
    assert episode_flags(above, groups, 0).tolist() == above.tolist()
    assert episode_flags(np.zeros(0, bool), None, 3).size == 0


@pytest.mark.parametrize("cooldown", [1, 3, 7])
def test_episodes_are_the_engines_alert_episodes(tmp_path: Path, cooldown: int) -> None:
    """Each run of `episode_flags` starts exactly where the engine raised an alert."""
    manifest = make_manifest(window=6, threshold=0.0)
    scorer = load_random(tmp_path / "model.onnx", manifest, seed=3)
    rng = np.random.default_rng(cooldown)
    keys = rng.choice(["a", "b", "c"], 600)
    amounts = rng.gamma(2.0, 30.0, 600)
    records = [
        event(str(key), 1000.0 + i, float(amount))
        for i, (key, amount) in enumerate(zip(keys, amounts, strict=True))
    ]
    free = replay_records(records, scorer, EngineOptions(max_batch=64))
    scored = free.statuses == Status.SCORED
    threshold = float(np.quantile(free.scores[scored], 0.8))
    options = EngineOptions(max_batch=64, threshold=threshold, cooldown_events=cooldown)
    replay = replay_records(records, scorer, options)
    for key in ("a", "b", "c"):
        rows = np.flatnonzero((replay.keys == key) & (replay.statuses == Status.SCORED))
        episodes = runs(episode_flags(replay.scores[rows] >= threshold, None, cooldown))
        starts = rows[episodes[:, 0]].tolist()
        alerted = sorted(alert.source.row for alert in replay.alerts if alert.key == key)
        assert starts == alerted
        assert len(starts) > 2
