"""Real tiny models trained in seconds: they learn, they are reproducible, early stopping keeps
the best epoch, and the threshold maths is right."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pyarrow as pa
import pyarrow.csv
import pytest
import torch

from detector.contract.manifest import AdaptiveThreshold
from detector.contract.model_file import load_model_file
from detector.engine.core import Status
from trainer.calibrate import (
    MIN_KEY_SCORES,
    CalibrationError,
    calibrate,
    calibrate_per_key,
    fpr_threshold,
    max_f1_threshold,
    precision_threshold,
    quantile_threshold,
    smooth_per_key,
)
from trainer.cli import main as trainer_main
from trainer.config import AlertingConfig, ConfigError, TrainConfig, load_train_config
from trainer.data import TRAIN, VALIDATION, Windows, load_events
from trainer.evaluate import evaluate
from trainer.fit import History, evaluate_loss, fit, make_loss, predict, seed_everything
from trainer.metrics import average_precision, roc_auc
from trainer.network import SequenceNet
from trainer.pipeline import train
from trainer.recipe import FORECAST_RECIPE
from trainer.report import write_training_report

START = 1_700_000_000

CLASSIFY = """
[data]
key = "card"
time = "ts"
label = "fraud"
features = [
  { name = "amount", kind = "numeric" },
  { name = "merchant", kind = "categorical" },
]

[model]
task = "classify"
window = 8
min_history = 2
hidden = 16

[training]
epochs = 5
batch_size = 128
learning_rate = 0.01
patience = 3
"""

FORECAST = """
[data]
key = "sensor"
time = "ts"
label = "fault"
features = [{ name = "temperature", kind = "numeric" }]

[model]
task = "forecast"
export_mode = "stateful"
window = 16
min_history = 13
hidden = 16

[training]
epochs = 10
batch_size = 128
learning_rate = 0.01
patience = 4
forecast_targets = "last"

[threshold]
method = "quantile"
target = 0.99

[threshold.advanced]
"""
LAST_TARGETS = 'forecast_targets = "last"\n'
#: The same, scaled by the statistics of all keys at once instead of each key's own.
POOLED_FORECAST = FORECAST.replace("hidden = 16\n", "hidden = 16\nper_key_normalisation = false\n")


def write(folder: Path, config: str, rows: list[dict]) -> tuple[TrainConfig, Path]:
    (folder / "train.toml").write_text(config)
    data = folder / "events.csv"
    pyarrow.csv.write_csv(pa.Table.from_pylist(rows), data)
    return load_train_config(folder / "train.toml"), data


def card_rows(seed: int = 0, cards: int = 16, per_card: int = 100) -> list[dict]:
    """Fraud is a burst of large payments at one risky merchant, far above the card's habit."""
    rng = np.random.default_rng(seed)
    rows = []
    for card in range(cards):
        habit = rng.uniform(20, 60)
        fraud = rng.random(per_card) < 0.06
        for i in range(per_card):
            rows.append(
                {
                    "card": f"c{card}",
                    "ts": START + 600 * i + int(rng.integers(0, 300)),
                    "amount": round(habit * (8 if fraud[i] else rng.uniform(0.7, 1.3)), 2),
                    "merchant": "risky" if fraud[i] else str(rng.choice(["food", "fuel", "rail"])),
                    "fraud": int(fraud[i]),
                }
            )
    return rows


def sensor_rows(
    seed: int = 0, sensors: int = 12, per_sensor: int = 240, units: tuple[float, ...] = (1.0,)
) -> list[dict]:
    """A daily cycle of 12 readings with small noise; spikes in the last fifth are faults.
    Sensor i reports in `units[i % len(units)]` per degree."""
    rng = np.random.default_rng(seed)
    rows = []
    for sensor in range(sensors):
        phase = rng.uniform(0, 2 * np.pi)
        unit = units[sensor % len(units)]
        for i in range(per_sensor):
            spike = i > 0.8 * per_sensor and rng.random() < 0.05
            value = 20 + 5 * np.sin(2 * np.pi * i / 12 + phase) + rng.normal(0, 0.2)
            rows.append(
                {
                    "sensor": f"s{sensor}",
                    "ts": START + 3600 * i,
                    "temperature": round(float(unit * (value + (6 if spike else 0))), 3),
                    "fault": int(spike),
                }
            )
    return rows


def test_classifier_learns_a_clear_pattern(tmp_path) -> None:
    config, data = write(tmp_path, CLASSIFY, card_rows())
    result = train(config, [data], tmp_path / "model" / "fraud.onnx", progress=False)

    assert result.metrics["metrics"]["test"]["auprc"] > 0.9
    assert result.metrics["metrics"]["validation"]["f1"] > 0.8
    manifest, _ = load_model_file(result.model_path)
    assert manifest == result.manifest
    assert manifest.scoring.semantics == "probability"
    assert manifest.scoring.calibration.startswith("max_f1")
    assert 0.0 < manifest.scoring.threshold < 1.0
    assert manifest.training.rows == 16 * 70  # 70 % of each card's 100 events
    assert manifest.training.metrics["test_auprc"] > 0.9
    written = json.loads((tmp_path / "model" / "metrics.json").read_text())
    assert written["model_version"] == manifest.model_version
    assert written["parity_max_difference"] < 1e-4
    assert len(written["history"]) == len(result.history.epochs) >= 1
    assert len(result.validation.scores) == len(result.validation.labels)


def test_forecaster_scores_injected_spikes_far_above_normal_points(tmp_path) -> None:
    config, data = write(tmp_path, FORECAST, sensor_rows())
    result = train(config, [data], tmp_path / "sensors.onnx", progress=False)

    test = result.test
    spikes = test.scores[test.labels == 1]
    normal = test.scores[test.labels == 0]
    assert spikes.size >= 5
    assert np.median(spikes) > 20 * np.median(normal)
    assert roc_auc(test.labels, test.scores) > 0.97
    # Residual variances make a normal point's scaled squared error about 1.
    assert 0.3 < np.mean(result.validation.scores[result.validation.labels == 0]) < 3
    manifest, _ = load_model_file(result.model_path)
    assert manifest.export_mode == "stateful"
    assert manifest.scoring.calibration == "quantile=0.99"
    assert manifest.scoring.threshold == pytest.approx(
        np.quantile(result.validation.scores[result.validation.labels == 0], 0.99)
    )


def test_an_adaptive_threshold_goes_from_the_config_through_the_manifest_to_the_engine(
    tmp_path, capsys
) -> None:
    adaptive = "\n[threshold.advanced.adaptive]\nhistory = 40\nrefresh = 8\nwarm_up = 20\n"
    config, data = write(tmp_path, FORECAST + adaptive, sensor_rows())
    result = train(config, [data], tmp_path / "sensors.onnx", epochs=2, progress=False)

    manifest, _ = load_model_file(result.model_path)
    assert manifest.scoring.adaptive == AdaptiveThreshold(history=40, refresh=8, warm_up=20)
    capsys.readouterr()
    assert trainer_main(["inspect", str(result.model_path)]) == 0
    shown = " ".join(capsys.readouterr().out.replace("│", " ").split())  # cells wrap
    assert (
        "every 8 events from the last 40 (prune 0.13, buffer 0, floor calibrated, warm-up 20"
        in shown
    )
    write_training_report(result, tmp_path / "report")
    card = (tmp_path / "report" / "MODEL_CARD.md").read_text()
    assert "pruning margin 0.13, error buffer 0), never below the calibrated one" in card
    assert "a key may alert once 20 of its events are scored" in card
    evaluation = evaluate(result.model_path, data)
    replay, static = evaluation.replay, manifest.scoring.threshold
    scored = replay.statuses == Status.SCORED
    finite = scored & np.isfinite(replay.thresholds)
    assert (replay.thresholds[scored] >= static).all()
    assert (replay.thresholds[finite] > static).any()
    assert finite.sum() == scored.sum() - 12 * 19  # 12 sensors warm up for 19 scored events
    flagged = replay.scores[scored] >= replay.thresholds[scored]
    assert flagged.any()
    point = evaluation.metrics["point"]
    assert point["true_positives"] + point["false_positives"] == int(
        flagged[~np.isnan(evaluation.labels[scored])].sum()
    )


def test_per_key_thresholds_go_from_the_config_through_the_manifest_to_the_engine(
    tmp_path, capsys
) -> None:
    rows = sensor_rows()
    noise = np.random.default_rng(7)
    for row in rows:  # every other sensor is noisier: its own errors run higher
        if int(row["sensor"][1:]) % 2:
            row["temperature"] = round(row["temperature"] + float(noise.normal(0, 1.5)), 3)
    config_text = FORECAST.replace(
        "hidden = 16\n", "hidden = 16\nper_key_normalisation = true\n"
    ).replace("target = 0.99\n", "target = 0.99\nper_key = true\n")
    config_text = config_text.replace(
        "[threshold.advanced]\n", "[threshold.advanced]\nconfirm = 3\n"
    )
    config, data = write(tmp_path, config_text, rows)
    result = train(config, [data], tmp_path / "sensors.onnx", epochs=2, progress=False)

    manifest, _ = load_model_file(result.model_path)
    validation = result.validation
    want = calibrate_per_key(
        validation.scores, validation.labels, "quantile", 0.99, validation.keys
    )
    got = {key: stats.threshold for key, stats in manifest.per_key_statistics.items()}
    assert got == want and len(got) == 12 and result.metrics["per_key_thresholds"] == 12
    assert len(set(got.values())) == 12 and manifest.scoring.threshold not in got.values()
    replay = evaluate(result.model_path, data).replay
    scored = replay.statuses == Status.SCORED
    np.testing.assert_array_equal(
        replay.thresholds[scored], [got[key] for key in replay.keys[scored]]
    )
    capsys.readouterr()
    assert trainer_main(["inspect", str(result.model_path)]) == 0
    shown = " ".join(capsys.readouterr().out.replace("│", " ").split())
    assert "per-key thresholds 12 keys" in shown
    assert manifest.scoring.confirm == 3 and "alerts after 3 consecutive scores" in shown


def test_min_error_bounds_every_threshold_by_the_score_of_that_error(tmp_path, capsys) -> None:
    config, data = write(tmp_path, POOLED_FORECAST + "min_error = 2.0\n", sensor_rows())
    result = train(config, [data], tmp_path / "sensors.onnx", epochs=2, progress=False)

    manifest, _ = load_model_file(result.model_path)
    graph = onnx.load(result.model_path).graph
    variance = next(
        onnx.numpy_helper.to_array(t) for t in graph.initializer if "residual_variance" in t.name
    )
    (temperature,) = manifest.forecast_features
    # An error of 2 degrees, in z units, over the residual variance: the score it gets.
    assert manifest.scoring.min_score == pytest.approx((2.0 / temperature.std) ** 2 / variance[0])
    assert result.metrics["min_score"] == manifest.scoring.min_score > manifest.scoring.threshold
    evaluation = evaluate(result.model_path, data)
    replay = evaluation.replay
    scored = replay.statuses == Status.SCORED
    assert set(replay.thresholds[scored].tolist()) == {manifest.scoring.min_score}
    faults = scored & (evaluation.labels == 1)
    assert (replay.scores[faults] >= manifest.scoring.min_score).mean() > 0.8  # 6-degree spikes
    capsys.readouterr()
    assert trainer_main(["inspect", str(result.model_path)]) == 0
    assert f"minimum threshold {manifest.scoring.min_score:.6g}" in " ".join(
        capsys.readouterr().out.replace("│", " ").split()
    )


def test_one_forecast_model_judges_each_key_in_its_own_units(tmp_path) -> None:
    """A fleet whose sensors differ only in their units (1, 100 and 10,000 per degree): the
    recipe scales each key by its own statistics, so the small-unit sensors' spikes stand out
    as the others' do. Pooled statistics squash their readings to a near constant, and their
    spikes vanish into the large-unit sensors' errors."""
    rows = sensor_rows(units=(1.0, 100.0, 10_000.0))
    config, data = write(tmp_path, FORECAST, rows)
    assert config.model.per_key_normalisation  # the recipe's, not the configuration's
    result = train(config, [data], tmp_path / "fleet.onnx", progress=False)

    test = result.test
    small = np.isin(test.keys, [f"s{i}" for i in range(0, 12, 3)])
    assert test.labels[small].sum() >= 3
    assert roc_auc(test.labels[small], test.scores[small]) > 0.97
    assert roc_auc(test.labels, test.scores) > 0.97  # one threshold serves every unit


def test_every_event_targets_train_another_forecaster_that_catches_the_spikes(tmp_path) -> None:
    every = FORECAST.replace('"last"', '"every"')
    config, data = write(tmp_path, every, sensor_rows())
    result = train(config, [data], tmp_path / "sensors.onnx", progress=False)

    spikes = result.test.scores[result.test.labels == 1]
    assert np.median(spikes) > 20 * np.median(result.test.scores[result.test.labels == 0])
    assert roc_auc(result.test.labels, result.test.scores) > 0.97
    # The same seed, data and epochs with the last events alone learn other weights.
    last, _, _, _ = _fit_once(load_train_config(write_config(tmp_path, FORECAST)), data, 2)
    other, _, _, _ = _fit_once(config, data, 2)
    assert not torch.equal(last.head.weight, other.head.weight)


def test_every_event_targets_need_a_unidirectional_forecast_model(tmp_path) -> None:
    every = '[training]\nforecast_targets = "every"\n'
    with pytest.raises(ValueError, match="needs a unidirectional forecast model"):
        load_train_config(write_config(tmp_path, CLASSIFY.replace("[training]\n", every)))
    both_ways = FORECAST.replace('export_mode = "stateful"', "bidirectional = true")
    with pytest.raises(ValueError, match="needs a unidirectional forecast model"):
        load_train_config(write_config(tmp_path, both_ways.replace('"last"', '"every"')))
    # The recipe's targets suit a bidirectional network too.
    recipe = load_train_config(write_config(tmp_path, both_ways.replace(LAST_TARGETS, "")))
    assert recipe.training.forecast_targets == "last"


def test_the_benchmark_configurations_are_valid_and_say_what_each_model_learns_from() -> None:
    folder = Path(__file__).resolve().parents[2] / "bench" / "configs"
    configs = {path.stem: load_train_config(path) for path in sorted(folder.glob("*.toml"))}
    assert sorted(configs) == ["fraud", "smap", "synthetic"]
    forecast = [name for name, config in configs.items() if config.model.task == "forecast"]
    assert forecast == ["smap", "synthetic"]
    # One recipe: the forecast configurations differ in their data's shape only.
    for name in forecast:
        config = configs[name]
        assert config.training == configs["smap"].training
        assert config.threshold == configs["smap"].threshold
        assert config.model == configs["smap"].model
    assert configs["smap"].threshold.advanced.adaptive is not None
    assert configs["smap"].model.per_key_normalisation


def test_only_an_advanced_table_replaces_the_recipes_alerting(tmp_path) -> None:
    plain = FORECAST.replace("\n[threshold.advanced]\n", "")
    recipe = load_train_config(write_config(tmp_path, plain))
    assert (recipe.threshold.method, recipe.threshold.target) == ("quantile", 0.99)
    assert recipe.threshold.advanced == AlertingConfig.model_validate(
        FORECAST_RECIPE["threshold"]["advanced"]
    )
    own = load_train_config(write_config(tmp_path, FORECAST + "confirm = 3\n"))
    assert own.threshold.advanced == AlertingConfig(confirm=3)  # none of the recipe's
    assert recipe.alerts_as_the_recipe and not own.alerts_as_the_recipe
    with pytest.raises(ConfigError, match=r"confirm belong in \[threshold.advanced\]"):
        load_train_config(write_config(tmp_path, plain + "confirm = 3\n"))
    retired = FORECAST + "[threshold.advanced.adaptive]\nyoung_prune = 1.0\n"
    with pytest.raises(ConfigError, match="young_prune"):
        load_train_config(write_config(tmp_path, retired))


def test_min_error_needs_a_forecast_in_units_alike_for_every_key(tmp_path) -> None:
    with pytest.raises(ValueError, match="needs a forecast model"):
        load_train_config(
            write_config(tmp_path, CLASSIFY + "[threshold.advanced]\nmin_error = 0.1\n")
        )
    # The recipe scales each key by its own statistics: errors in units alike need unscaled
    # features, or pooled statistics.
    with pytest.raises(ValueError, match="scaled alike for every key"):
        load_train_config(write_config(tmp_path, FORECAST + "min_error = 0.1\n"))
    unscaled = FORECAST.replace('kind = "numeric" }', 'kind = "numeric", scale = "none" }')
    assert load_train_config(write_config(tmp_path, unscaled + "min_error = 0.1\n"))
    assert load_train_config(write_config(tmp_path, POOLED_FORECAST + "min_error = 0.1\n"))


def test_per_key_thresholds_are_each_keys_own_calibration() -> None:
    rng = np.random.default_rng(3)
    keys = rng.permutation(["quiet"] * 60 + ["loud"] * 60 + ["rare"] * (MIN_KEY_SCORES - 1))
    scale = {"quiet": 1.0, "loud": 10.0, "rare": 5.0}
    scores = np.array([scale[key] for key in keys]) * rng.gamma(2.0, size=keys.size)
    thresholds = calibrate_per_key(scores, None, "quantile", 0.9, keys)
    assert set(thresholds) == {"quiet", "loud"}  # "rare" has MIN_KEY_SCORES - 1 scores
    for key in ("quiet", "loud"):
        assert thresholds[key] == calibrate(scores[keys == key], None, "quantile", 0.9)[0]
    assert thresholds["loud"] > 3 * thresholds["quiet"]
    labels = (np.arange(keys.size) % 7 == 0).astype(float)
    labels[keys == "loud"] = 1.0  # no normal score left: the key keeps the model's threshold
    assert set(calibrate_per_key(scores, labels, "quantile", 0.9, keys)) == {"quiet"}


def test_per_key_thresholds_need_per_key_normalisation_and_no_labels(tmp_path) -> None:
    per_key_model = FORECAST.replace("target = 0.99\n", "target = 0.99\nper_key = true\n")
    pooled = POOLED_FORECAST.replace("target = 0.99\n", "target = 0.99\nper_key = true\n")
    with pytest.raises(ValueError, match="per_key_normalisation"):
        load_train_config(write_config(tmp_path, pooled))
    with pytest.raises(ValueError, match="'quantile' or 'dynamic'"):
        load_train_config(
            write_config(
                tmp_path, per_key_model.replace('method = "quantile"', 'method = "max_f1"')
            )
        )
    assert load_train_config(write_config(tmp_path, per_key_model))


def write_config(folder: Path, text: str) -> Path:
    path = folder / "config.toml"
    path.write_text(text)
    return path


def _fit_once(
    config: TrainConfig, data: Path, epochs: int
) -> tuple[SequenceNet, History, Windows, Windows]:
    config = config.model_copy(
        update={"training": config.training.model_copy(update={"epochs": epochs})}
    )
    events = load_events(config, [data])
    seed_everything(config.training.seed)
    net = SequenceNet.from_manifest(events.manifest)
    train_windows, validation = events.windows(TRAIN), events.windows(VALIDATION)
    history = fit(
        net, train_windows, validation, config.training, device=torch.device("cpu"), progress=False
    )
    return net, history, train_windows, validation


def test_two_cpu_runs_with_the_same_seed_are_identical(tmp_path) -> None:
    config, data = write(tmp_path, CLASSIFY, card_rows(cards=8, per_card=60))
    first, first_history, _, validation = _fit_once(config, data, epochs=2)
    second, second_history, _, _ = _fit_once(config, data, epochs=2)
    for (name, a), (_, b) in zip(
        first.state_dict().items(), second.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    assert first_history.epochs[-1].train_loss == second_history.epochs[-1].train_loss
    np.testing.assert_array_equal(
        predict(first, validation, torch.device("cpu")).score.numpy(),
        predict(second, validation, torch.device("cpu")).score.numpy(),
    )


def test_early_stopping_restores_the_best_epoch(tmp_path) -> None:
    rows = card_rows(cards=8, per_card=60)
    # Validation labels contradict training: the better the model fits, the worse it validates.
    for row in rows:
        if row["ts"] >= START + 600 * 42:
            row["fraud"] = 1 - row["fraud"]
    config, data = write(tmp_path, CLASSIFY.replace("patience = 3", "patience = 2"), rows)
    net, history, train_windows, validation = _fit_once(config, data, epochs=10)

    losses = [record.validation_loss for record in history.epochs]
    assert history.stopped_early
    assert len(losses) == history.best_epoch + 2
    assert losses[history.best_epoch - 1] == min(losses)
    # The restored weights are exactly those a run stopped at the best epoch ends with.
    best, _, _, _ = _fit_once(config, data, epochs=history.best_epoch)
    for (name, a), (_, b) in zip(net.state_dict().items(), best.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    loss_fn = make_loss("classify", config.training, train_windows.labels)
    restored = evaluate_loss(net, validation, loss_fn, torch.device("cpu"))
    assert restored == pytest.approx(min(losses), rel=1e-6)


def test_int8_export_reports_the_accuracy_change(tmp_path) -> None:
    config, data = write(tmp_path, CLASSIFY, card_rows(cards=12, per_card=80))
    result = train(config, [data], tmp_path / "int8.onnx", epochs=3, int8=True, progress=False)
    change = result.metrics["int8"]
    assert change["int8_bytes"] < change["float_bytes"]
    assert 0 <= change["max_abs_validation_score_change"] < 0.1
    assert abs(change["int8_validation_auprc"] - change["float_validation_auprc"]) < 0.05
    assert result.manifest.scoring.threshold == change["int8_threshold"]
    _, model_bytes = load_model_file(result.model_path)
    ops = {node.op_type for node in onnx.load_from_string(model_bytes).graph.node}
    assert "DynamicQuantizeLSTM" in ops


def test_inspect_prints_a_model_and_refuses_a_tampered_one(tmp_path, capsys) -> None:
    config, data = write(tmp_path, CLASSIFY, card_rows(cards=6, per_card=40))
    result = train(config, [data], tmp_path / "m.onnx", epochs=1, progress=False)
    capsys.readouterr()
    assert trainer_main(["inspect", str(result.model_path)]) == 0
    text = capsys.readouterr().out
    assert result.manifest.model_version in text
    assert "merchant" in text and "categorical" in text
    assert trainer_main(["inspect", "--json", str(result.model_path)]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["manifest"]["graph_sha256"] == result.manifest.graph_sha256

    model = onnx.load(result.model_path)
    model.graph.initializer[0].raw_data = bytes(len(model.graph.initializer[0].raw_data))
    onnx.save(model, tmp_path / "tampered.onnx")
    assert trainer_main(["inspect", str(tmp_path / "tampered.onnx")]) == 2
    assert "refused" in capsys.readouterr().err


# -- calibration maths -------------------------------------------------------------------

SCORES = np.array([0.1, 0.4, 0.35, 0.8])
LABELS = np.array([0, 0, 1, 1])


def test_max_f1_picks_the_threshold_of_the_best_f1() -> None:
    # Thresholds 0.8: F1 2/3; 0.4: 1/2; 0.35: P 2/3, R 1 -> F1 0.8; 0.1: 2/3.
    threshold, description = max_f1_threshold(SCORES, LABELS)
    assert threshold == 0.35
    assert description == "max_f1: validation F1=0.800"


def test_precision_target_takes_the_lowest_threshold_reaching_it() -> None:
    assert precision_threshold(SCORES, LABELS, 0.9)[0] == 0.8
    assert precision_threshold(SCORES, LABELS, 0.6)[0] == 0.35
    threshold, description = precision_threshold(np.array([0.9, 0.5]), np.array([0, 1]), 0.9)
    assert threshold == 0.5
    assert "unreachable" in description and "0.500" in description


def test_fpr_target_bounds_false_alarms() -> None:
    negatives = np.linspace(0.1, 1.0, 10)
    scores = np.r_[negatives, 0.95, 0.55]
    labels = np.r_[np.zeros(10), 1, 1]
    threshold, description = fpr_threshold(scores, labels, 0.1)
    assert threshold == 0.95
    assert np.mean(scores[labels == 0] >= threshold) <= 0.1
    assert description == "fpr<=0.1: validation recall=0.500"
    # When only "alert on nothing" keeps the rate, the threshold sits just above the top score.
    threshold, _ = fpr_threshold(scores, labels, 0.05)
    assert threshold > 1.0 and threshold == np.nextafter(1.0, 2.0)


def test_quantile_uses_the_scores_of_normal_events() -> None:
    scores = np.r_[np.arange(101, dtype=float), 1000.0]
    labels = np.r_[np.zeros(101), 1]
    assert quantile_threshold(scores, labels, 0.9) == (90.0, "quantile=0.9")
    assert quantile_threshold(scores[:101], None, 0.5)[0] == 50.0


def test_calibrate_dispatches_and_refuses_what_it_cannot_do() -> None:
    assert calibrate(SCORES, LABELS, "max_f1", None)[0] == 0.35
    assert calibrate(SCORES, LABELS, "precision", 0.9)[0] == 0.8
    with pytest.raises(CalibrationError, match="no positive events"):
        calibrate(SCORES, np.zeros(4), "max_f1", None)
    with pytest.raises(CalibrationError, match="needs labels"):
        calibrate(SCORES, None, "fpr", 0.01)
    with pytest.raises(CalibrationError, match="no validation windows"):
        calibrate(np.zeros(0), np.zeros(0), "quantile", 0.99)


def test_smoothing_is_an_ewma_restarted_from_zero_per_key() -> None:
    smoothed = smooth_per_key(
        np.array([1.0, 0.0, 0.0, 4.0, 2.0]), np.array(["a", "a", "a", "b", "b"]), 0.5
    )
    np.testing.assert_allclose(smoothed, [0.5, 0.25, 0.125, 2.0, 2.0])
    raw = np.array([0.3, 0.9])
    np.testing.assert_array_equal(smooth_per_key(raw, np.array(["a", "a"]), 1.0), raw)


def test_average_precision_of_the_calibration_fixture() -> None:
    # Guards the fixture the threshold tests reason about: ranks 0.8(+), 0.4(-), 0.35(+), 0.1(-).
    assert average_precision(LABELS, SCORES) == pytest.approx(0.5 * 1.0 + 0.5 * 2 / 3)
