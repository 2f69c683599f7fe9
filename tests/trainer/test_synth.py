"""The synthetic data sets: deterministic, split by time, and labeled where the faults are."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pytest

from trainer.cli import main
from trainer.config import load_train_config
from trainer.recipe import FORECAST_RECIPE
from trainer.synth import FAULT_KINDS, FRAUD_SCENARIOS, Dataset, sensors, transactions


@pytest.fixture(scope="module")
def devices() -> Dataset:
    return sensors(keys=12, days=6, seed=3)


@pytest.fixture(scope="module")
def payments() -> Dataset:
    return transactions(keys=300, days=40, seed=3)


def _column(table: pa.Table, name: str) -> np.ndarray:
    return table[name].to_numpy(zero_copy_only=False)


def test_same_seed_same_data_other_seed_other_data() -> None:
    first, again, other = (sensors(keys=3, days=2, seed=s) for s in (1, 1, 2))
    assert first.train.equals(again.train) and first.test.equals(again.test)
    assert not first.train.equals(other.train)
    assert transactions(keys=20, days=5, seed=1).test.equals(
        transactions(keys=20, days=5, seed=1).test
    )


@pytest.mark.parametrize("name", ["devices", "payments"])
def test_test_part_is_later_and_each_part_in_time_order(
    name: str, request: pytest.FixtureRequest
) -> None:
    dataset: Dataset = request.getfixturevalue(name)
    train, test = _column(dataset.train, "ts"), _column(dataset.test, "ts")
    assert train.max() < test.min()
    assert np.all(np.diff(train) >= 0) and np.all(np.diff(test) >= 0)
    assert 0.2 < test.size / (train.size + test.size) < 0.4


def test_sensor_columns_devices_and_cadence(devices: Dataset) -> None:
    assert devices.train.column_names == [
        "device_id",
        "ts",
        "temperature",
        "vibration",
        "pressure",
        "label",
        "fault",
    ]
    table = devices.train
    ids = _column(table, "device_id")
    assert np.unique(ids).size == 12
    one = ids == "dev-000"
    gaps = np.diff(_column(table, "ts")[one])
    assert 280 <= np.median(gaps) <= 320  # five minutes with jitter
    # Devices run at their own operating points: per-key normalisation is needed.
    means = [_column(table, "temperature")[ids == key].mean() for key in np.unique(ids)]
    spread = _column(table, "temperature")[one].std()
    assert np.ptp(means) > 3 * spread


def test_faults_are_labeled_mostly_in_the_test_part(devices: Dataset) -> None:
    train_rate = _column(devices.train, "label").mean()
    test_labels = _column(devices.test, "label")
    assert train_rate < 0.03 < test_labels.mean() < 0.3
    for table in (devices.train, devices.test):
        labels, faults = _column(table, "label"), _column(table, "fault")
        np.testing.assert_array_equal(labels == 1, faults != "none")
    assert set(_column(devices.test, "fault")) == {"none", *FAULT_KINDS}


def test_injected_faults_change_the_readings(devices: Dataset) -> None:
    table = devices.test
    ids, faults = _column(table, "device_id"), _column(table, "fault")
    readings = np.column_stack(
        [_column(table, name) for name in ("temperature", "vibration", "pressure")]
    )
    # Per device in time order: a stable sort by device keeps each device's time order.
    order = np.argsort(ids, kind="stable")
    ids, faults, readings = ids[order], faults[order], readings[order]
    same_device = ids[1:] == ids[:-1]
    step = np.abs(np.diff(readings, axis=0)) / readings.std(axis=0)
    normal = same_device & (faults[1:] == "none") & (faults[:-1] == "none")
    into_spike = same_device & (faults[1:] == "spike") & (faults[:-1] == "none")
    assert np.median(step[into_spike].max(axis=1)) > 5 * np.quantile(step[normal].max(axis=1), 0.5)
    within_stuck = same_device & (faults[1:] == "stuck") & (faults[:-1] == "stuck")
    assert np.all((step[within_stuck] == 0).any(axis=1))  # one reading frozen


def test_the_sensor_example_trains_on_a_small_budget(devices: Dataset, tmp_path: Path) -> None:
    """Seconds on two cores, not minutes: 60,000 training windows in all (6 epochs of 10,000;
    10 epochs of 40,000 took over 10 minutes on a loaded 2-core machine) of the forecast
    recipe's network, and early stopping after 2 epochs without progress. That the model
    trained with it still catches the injected faults is `test_quality`'s acceptance test."""
    (tmp_path / "train.toml").write_text(devices.config)
    config = load_train_config(tmp_path / "train.toml")
    training = config.training
    assert training.epochs * training.max_windows == 60_000
    assert training.patience == 2
    recipe = FORECAST_RECIPE["model"]
    assert (config.model.hidden, config.model.window) == (recipe["hidden"], recipe["window"])


def test_transaction_columns_and_fraud_scenarios(payments: Dataset) -> None:
    assert payments.test.column_names == [
        "customer_id",
        "ts",
        "amount",
        "log_amount",
        "terminal_id",
        "hour",
        "is_fraud",
        "scenario",
    ]
    for table in (payments.train, payments.test):
        fraud, scenario = _column(table, "is_fraud"), _column(table, "scenario")
        np.testing.assert_array_equal(fraud == 1, scenario != "none")
        assert 0.01 < fraud.mean() < 0.1
        assert set(scenario) == {"none", *FRAUD_SCENARIOS}
        hour = _column(table, "hour")
        assert hour.min() >= 0 and hour.max() <= 23
        np.testing.assert_array_equal(hour, (_column(table, "ts") % 86_400) // 3600)


def test_fraud_is_visible_in_the_sequence(payments: Dataset) -> None:
    table = pa.concat_tables([payments.train, payments.test])
    customers, scenario = _column(table, "customer_id"), _column(table, "scenario")
    order = np.argsort(customers, kind="stable")
    customers, scenario = customers[order], scenario[order]
    times, amount = _column(table, "ts")[order], _column(table, "amount")[order]
    same = customers[1:] == customers[:-1]
    gap = np.diff(times)
    testing = same & (scenario[1:] == "card_testing") & (scenario[:-1] == "card_testing")
    honest = same & (scenario[1:] == "none") & (scenario[:-1] == "none")
    assert np.median(gap[testing]) < 120 < 3600 < np.median(gap[honest])
    # Some honest customers pay twice within minutes, so a short gap alone is not fraud.
    assert np.count_nonzero(gap[honest] < 300) > np.count_nonzero(testing)
    spikes = scenario == "amount_spike"
    usual = {
        c: np.median(amount[(customers == c) & (scenario == "none")])
        for c in set(customers[spikes])
    }
    ratio = amount[spikes] / np.array([usual[c] for c in customers[spikes]])
    assert np.median(ratio) > 5


def test_command_writes_csvs_and_a_toml_the_trainer_reads(tmp_path: Path) -> None:
    for kind, key in (("sensors", "device_id"), ("transactions", "customer_id")):
        out = tmp_path / kind
        argv = ["synth", kind, "--out", str(out), "--keys", "4", "--days", "3", "--seed", "5"]
        assert main(argv) == 0
        train = pa_csv.read_csv(out / "train.csv")
        test = pa_csv.read_csv(out / "test.csv")
        assert train.num_rows > 0 and test.num_rows > 0
        assert _distinct(train, key) <= 4
        config = load_train_config(out / "train.toml")
        assert config.data.key == key
        assert config.model.task == ("forecast" if kind == "sensors" else "classify")
        assert {feature.name for feature in config.data.features} <= set(train.column_names)
        assert config.data.label in train.column_names


def _distinct(table: pa.Table, column: str) -> int:
    return len(set(table[column].to_pylist()))


def test_command_refuses_a_too_short_span(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["synth", "sensors", "--out", str(tmp_path), "--days", "1"]) == 2
    assert "too short" in capsys.readouterr().err
