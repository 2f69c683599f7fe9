"""What makes bench/throughput.py's figures fair: a slow daemon is waited for while it still
commits, thresholds come from keys with full windows, each ratio compares like with like,
and the daemons run the checkout being measured. Pure functions only: no broker, no timing."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

import kafka_rig  # noqa: E402
import throughput  # noqa: E402
from kafka_rig import Daemon, Progress, metric_value  # noqa: E402


def _progress(*samples: tuple[float, int]) -> Progress:
    return Progress([(at, committed, 0.0) for at, committed in samples])


def test_a_slow_daemon_whose_commits_advance_is_never_given_up_on() -> None:
    # 10 events/s for an hour: far beyond any rate-based allowance, but always advancing.
    slow = _progress(*((float(t), 10 * t) for t in range(0, 3600, 30)))
    assert slow.stuck(start_timeout=120, stall_timeout=60) is None


def test_a_daemon_whose_commits_stop_is_given_up_on_after_the_stall_timeout() -> None:
    stalled = _progress((0, 0), (5, 100), (10, 500), (40, 500), (70, 500))
    assert stalled.stuck(start_timeout=120, stall_timeout=60) is None  # 60 s at 500: not yet
    stalled.samples.append((70.5, 500, 0.0))
    assert stalled.stuck(start_timeout=120, stall_timeout=60) == (
        "committed offsets stayed at 500 for 60 s"
    )


def test_a_daemon_that_never_commits_is_given_up_on_after_the_start_timeout() -> None:
    assert _progress((0, 0), (100, 0)).stuck(start_timeout=120, stall_timeout=60) is None
    assert _progress((0, 0), (121, 0)).stuck(start_timeout=120, stall_timeout=60) == (
        "committed nothing in 121 s"
    )
    assert Progress().stuck(start_timeout=0, stall_timeout=0) is None


def test_key_ordinals_count_each_keys_events() -> None:
    keys = [b"a", b"b", b"a", b"c", b"a", b"b"]
    assert throughput.key_ordinals(keys).tolist() == [0, 0, 1, 0, 2, 1]


def test_only_scores_of_full_windows_count_and_nan_is_left_out() -> None:
    scores = np.array([0.1, 0.2, 0.3, np.nan, 0.5, 0.6])
    ordinals = np.array([0, 1, 2, 3, 3, 1])
    assert throughput.full_window_scores(scores, ordinals, window=3).tolist() == [0.3, 0.5]


def test_the_threshold_is_reached_by_the_share_asked_for() -> None:
    scores = np.random.default_rng(0).standard_normal(100_000)
    threshold = throughput.fit_threshold(scores, 0.001)
    assert int((scores >= threshold).sum()) == 100
    with pytest.raises(ValueError, match="too few"):
        throughput.fit_threshold(scores[:999], 0.001)


def test_young_keys_do_not_set_the_threshold() -> None:
    """Scores that grow with a key's history, as the bench model's do: a threshold fitted on
    all events of young keys lets far more than its share through once the keys are old."""
    rng = np.random.default_rng(1)
    keys = [b"k%d" % k for k in rng.integers(0, 100, 20_000)]
    ordinals = throughput.key_ordinals(keys)
    scores = rng.standard_normal(len(keys)) + np.minimum(ordinals, 32) / 8
    fitted = throughput.fit_threshold(throughput.full_window_scores(scores, ordinals, 32), 0.01)
    old = throughput.full_window_scores(scores, ordinals, 32)
    young = throughput.fit_threshold(scores[ordinals < 5], 0.01)
    assert (old >= fitted).mean() == pytest.approx(0.01, abs=0.002)
    assert (old >= young).mean() > 0.3


def test_each_ratio_compares_like_with_like() -> None:
    pairs = throughput.ratio_pairs(["kafka-python", "confluent"])
    assert pairs["stateful_vs_naive"] == ("stateful", "naive_stateful")
    assert pairs["window_vs_naive"] == ("window", "naive_window")
    assert pairs["confluent_stateful_vs_ceiling"] == ("confluent_stateful", "confluent_raw_consume")
    assert pairs["confluent_exactly_once_vs_stateful"] == (
        "confluent_exactly_once",
        "confluent_stateful",
    )
    assert pairs["confluent_vs_kafka_python_stateful"] == ("confluent_stateful", "stateful")
    assert "confluent_vs_kafka_python_stateful" not in throughput.ratio_pairs(["confluent"])
    assert "stateful_vs_naive" not in throughput.ratio_pairs(["confluent"])


def test_ratios_by_wall_time_and_by_cpu_time() -> None:
    results = {"stateful_eps": 50_000.0, "naive_stateful_eps": 25_000.0, "window_eps": None}
    got = throughput.ratios(results, ["kafka-python"])
    assert got["stateful_vs_naive"] == 2.0
    assert got["window_vs_naive"] is None
    assert got["stateful_vs_ceiling"] is None  # raw_consume not measured
    cpu = {"stateful": 15.0, "naive_stateful": 45.0, "confluent_stateful": 5.0}
    by_cpu = throughput.cpu_ratios(cpu, ["kafka-python", "confluent"])
    assert by_cpu["stateful_vs_naive"] == 3.0
    assert by_cpu["confluent_vs_kafka_python_stateful"] == 3.0


def test_goal_rows_show_the_goals_of_what_was_measured() -> None:
    results = {
        "stateful_vs_ceiling": 0.7,
        "exactly_once_vs_stateful": 0.75,
        "cpu_ratios": {"stateful_vs_ceiling": 0.65, "exactly_once_vs_stateful": 0.9},
    }
    rows = throughput.goal_rows(results)
    assert rows == [
        ("stateful_vs_ceiling", "0.70", "0.65", ">= 0.6", "yes"),
        ("exactly_once_vs_stateful", "0.75", "0.90", ">= 0.8", "NO"),
    ]


def test_clients_are_parsed_in_order_and_checked() -> None:
    assert throughput.client_list("confluent, kafka-python,confluent") == (
        "confluent",
        "kafka-python",
    )
    with pytest.raises(argparse.ArgumentTypeError):
        throughput.client_list("kafka-python,librdkafka")
    assert throughput.prefix("kafka-python") == ""
    assert throughput.prefix("confluent") == "confluent_"


def test_the_model_cache_is_outside_the_checkout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert throughput.default_cache() == tmp_path / "cache" / "seqsentinel-bench"
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "file"))  # cannot hold a folder
    fallback = throughput.default_cache()
    assert fallback.parent == Path(throughput.tempfile.gettempdir())
    assert not fallback.is_relative_to(kafka_rig.ROOT)


def test_daemons_run_the_checkout_the_bench_belongs_to(tmp_path: Path) -> None:
    cluster = argparse.Namespace(bootstrap="127.0.0.1:9")
    daemon = Daemon(cluster, "in", tmp_path / "m.onnx", tmp_path)  # type: ignore[arg-type]
    environment = daemon.environment()
    assert environment["PYTHONPATH"].split(os.pathsep)[0] == str(kafka_rig.ROOT)
    assert str(kafka_rig.ROOT) in sys.path  # and so does the bench's own import:
    assert throughput.checkout()["detector_from_checkout"]


def test_a_metric_is_summed_over_its_labels_and_only_its_own() -> None:
    exposition = "\n".join(
        [
            "# TYPE seqsentinel_alerts counter",
            "seqsentinel_alerts_total 17.0",
            "seqsentinel_alerts_created 1.7e9",
            'seqsentinel_records_total{outcome="scored"} 90.0',
            'seqsentinel_records_total{outcome="dead_letter"} 10.0',
        ]
    )
    assert metric_value(exposition, "seqsentinel_alerts_total") == 17.0
    assert metric_value(exposition, "seqsentinel_records_total") == 100.0
    assert metric_value(exposition, "seqsentinel_alerts") == 0.0
