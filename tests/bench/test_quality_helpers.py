"""The product logic the quality benchmarks motivated: the dynamic threshold and the episode
spans that turn replayed scores into predicted anomalous sequences; and the benchmarks'
shared judging of a replayed key (`bench/quality_report.py`), on replays made up here."""

from __future__ import annotations

import gzip
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from model_factory import event, load_random, make_manifest

from detector.engine.core import EngineOptions, Status
from detector.engine.thresholds import CANDIDATE_Z
from detector.files.replay import replay_records
from trainer.calibrate import CalibrationError, calibrate, dynamic_threshold
from trainer.config import TrainConfig
from trainer.metrics import Counts, RangeCounts, episode_flags, runs, summed

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import quality_report
import quality_smap
import quality_synthetic


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
    assert dynamic_threshold(flat, None)[0] == np.nextafter(np.float32(2.0), np.float32(np.inf))
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


def test_summed_pools_counts_and_draws_rates_anew() -> None:
    pooled = summed(RangeCounts, [RangeCounts(2, 1, 2, 1), RangeCounts(3, 3, 1, 1)])
    assert pooled == RangeCounts(labeled=5, detected=4, predicted=3, predicted_on_label=2)
    assert (pooled.precision, pooled.recall) == (pytest.approx(2 / 3), 0.8)
    assert summed(Counts, [Counts(1, 2, 3), Counts(4, 0, 1)]) == Counts(5, 2, 4)
    assert summed(Counts, []) == Counts(0, 0, 0)


#: Key "a" in time order: two events warming up, then scores crossing 1.0 at 4 and 8.
A_SCORES = [np.nan, np.nan, 0, 0, 2, 0, 0, 0, 2, 0, 0, 0]
A_LABELS = [0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 1, 1]


def _evaluation(confirm: int = 1) -> SimpleNamespace:
    """A replay of keys "a" (`A_SCORES`, times 100, 110, ...) and "b", in shuffled input
    order, with the engine's alerts of "a" at 140 and 180, as `trainer.evaluate` gives it."""
    a = len(A_SCORES)
    keys = np.array(["a"] * a + ["b"] * 3, object)
    times = np.r_[100.0 + 10 * np.arange(a), 105.0, 115.0, 125.0]
    scores = np.r_[A_SCORES, 5.0, 5.0, 5.0]
    statuses = np.where(np.isnan(scores), Status.WARMING_UP, Status.SCORED)
    labels = np.r_[A_LABELS, 1, 1, 1].astype(float)
    order = np.random.default_rng(0).permutation(keys.size)
    alerts = [SimpleNamespace(key=key, onset_time=t) for key, t in (("a", 140.0), ("b", 105.0))]
    replay = SimpleNamespace(
        keys=keys[order],
        times=times[order],
        scores=scores[order],
        thresholds=np.where(np.isnan(scores), np.nan, 1.0)[order],
        statuses=statuses[order],
        alerts=[*alerts, SimpleNamespace(key="a", onset_time=180.0)],
    )
    scoring = SimpleNamespace(confirm=confirm, smoothing=0.25, threshold=1.5, min_score=0.08)
    return SimpleNamespace(
        replay=replay, labels=labels[order], manifest=SimpleNamespace(scoring=scoring)
    )


def test_a_key_stream_is_its_events_in_time_order() -> None:
    stream = quality_report.key_stream(_evaluation(), "a")
    assert stream.times.tolist() == (100.0 + 10 * np.arange(len(A_SCORES))).tolist()
    assert np.array_equal(stream.scores, A_SCORES, equal_nan=True)
    assert stream.labels.tolist() == A_LABELS
    assert stream.scored.tolist() == [False, False] + [True] * 10
    assert np.flatnonzero(stream.above).tolist() == [4, 8]


def test_judge_counts_ranges_by_episode_and_points_by_scored_event(capsys) -> None:
    evaluation = _evaluation()
    stream = quality_report.key_stream(evaluation, "a")
    judged = quality_report.judge(evaluation, stream, stream.labels > 0, cooldown=2)
    # Episodes 4-5 (on the first label) and 8-9 (on none: a false positive); 10-11 missed.
    assert np.flatnonzero(judged.predicted).tolist() == [4, 5, 8, 9]
    assert judged.ranges == RangeCounts(labeled=2, detected=1, predicted=2, predicted_on_label=1)
    # Scored events 2..11: alerting 4 (labeled) and 8 (not); labeled 5, 10, 11 not alerting.
    assert judged.points == Counts(true_positives=1, false_positives=1, false_negatives=3)
    assert judged.alerts == 2
    assert judged.normal_in_episode == 2 / 8
    assert "differ" not in capsys.readouterr().out  # the episodes are the engine's alerts


def test_judge_says_when_the_episodes_are_not_the_engines_alerts(capsys) -> None:
    evaluation = _evaluation(confirm=2)  # no two consecutive scores above: no episode
    stream = quality_report.key_stream(evaluation, "a")
    judged = quality_report.judge(evaluation, stream, stream.labels > 0, cooldown=2)
    assert not judged.predicted.any()
    assert "a: 2 engine alerts, 0 episodes" in capsys.readouterr().out


def test_sequence_rates_and_their_means() -> None:
    rates = quality_report.sequence_rates(RangeCounts(4, 3, 5, 4), Counts(6, 2, 6))
    assert rates == {
        "precision": 0.8,
        "recall": 0.75,
        "f1": pytest.approx(2 * 0.8 * 0.75 / 1.55),
        "pointwise_precision": 0.75,
        "pointwise_recall": 0.5,
        "pointwise_f1": pytest.approx(0.6),
        "labeled_sequences": 4,
        "detected_sequences": 3,
        "predicted_sequences": 5,
        "false_positive_sequences": 1,
    }
    other = {**rates, "precision": 0.4, "detected_sequences": 4, "false_positive_sequences": 0}
    means = quality_report.field_means([rates, other])
    assert set(means) == set(quality_report.MEAN_FIELDS)
    assert means["precision"] == pytest.approx(0.6)
    assert (means["detected_sequences"], means["false_positive_sequences"]) == (3.5, 0.5)


def test_score_dump_holds_each_parts_scored_events_and_the_trainers_split() -> None:
    evaluation = _evaluation()
    config = TrainConfig.model_validate(
        {
            "data": {"key": "k", "time": "t", "features": [{"name": "v", "kind": "numeric"}]},
            "split": {"train": 0.5, "validation": 0.25, "test": 0.25},
            "model": {"task": "forecast", "min_history": 2},
            "threshold": {"method": "dynamic", "advanced": {"min_scaled_error": 0.2}},
        }
    )
    arrays = quality_report.score_dump(3, ["a"], evaluation, evaluation, config)
    parts = [
        f"{part}_{what}"
        for part in ("test", "train")
        for what in ("scores", "thresholds", "labels")
    ]
    scalars = ["train_split", "smoothing", "static_threshold", "unit_score"]
    assert sorted(arrays) == sorted(f"3/a/{name}" for name in [*parts, *scalars])
    assert arrays["3/a/test_scores"].tolist() == [0, 0, 2, 0, 0, 0, 2, 0, 0, 0]
    assert arrays["3/a/train_thresholds"].tolist() == [1.0] * 10
    assert arrays["3/a/test_labels"].dtype == np.int8
    assert arrays["3/a/train_labels"].tolist() == A_LABELS[2:]
    # 12 training events: 0-5 train, 6-8 validation, 9-11 test; the first two not scored.
    assert arrays["3/a/train_split"].tolist() == [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert arrays["3/a/smoothing"] == 0.25
    assert arrays["3/a/static_threshold"] == 1.5
    assert arrays["3/a/unit_score"] == pytest.approx(0.08 / 0.2**2)  # min_score of error 0.2


def test_smap_early_streams_start_before_each_channels_first_label() -> None:
    label = quality_smap.Label
    labels = [
        label("P-2", "P-2", [(5000, 5100)]),
        label("P-2#2", "P-2", [(2500, 2600), (7000, 7010)]),
        label("A-1", "A-1", [(300, 330)]),
    ]
    assert quality_smap._early(labels, 1000) == [
        label("P-2", "P-2", [(3500, 3600)], 1500),
        label("P-2#2", "P-2", [(1000, 1100), (5500, 5510)], 1500),
        label("A-1", "A-1", [(300, 330)], 0),  # first label before 1000: the whole part
    ]


def test_smap_early_event_files_start_at_the_stream_and_carry_shifted_labels(
    tmp_path: Path,
) -> None:
    (tmp_path / "test").mkdir()
    values = np.zeros((50, 3))
    values[:, 0] = np.arange(50)
    np.save(tmp_path / "test" / "C-1.npy", values)
    (label,) = quality_smap._early([quality_smap.Label("C-1", "C-1", [(30, 34)])], 10)
    table = quality_smap._event_table(tmp_path, "test", ["C-1"], [label])
    assert table.column("value").to_pylist() == list(range(20, 50))
    assert np.flatnonzero(table.column("anomaly").to_numpy()).tolist() == [10, 11, 12, 13, 14]


def test_synthetic_series_learn_on_their_first_part_and_name_their_kind(tmp_path: Path) -> None:
    path = tmp_path / "upward_downward_spike_anomaly.csv.gz"
    with gzip.open(path, "wt") as out:
        out.write("timestamp,upward_downward,anomaly\n")
        out.writelines(f"{300 * i},{i / 10},{float(i == 7)}\n" for i in range(10))
    series = quality_synthetic.Series(path)
    assert (series.name, series.shape, series.kind) == (
        "upward_downward_spike",
        "upward_downward",
        "spike",
    )
    parts = quality_synthetic._parts(quality_synthetic._event_table(series))
    assert parts["train"].column("value").to_pylist() == [0.0, 0.1, 0.2]
    assert parts["test"].column("timestamp").to_pylist()[0] == 900.0
    assert parts["test"].column("anomaly").to_pylist() == [0, 0, 0, 0, 1, 0, 0]
    assert set(parts["test"].column("series").to_pylist()) == {"upward_downward_spike"}
