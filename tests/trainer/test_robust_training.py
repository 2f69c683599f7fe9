"""Robust scaling and a Huber forecast loss: median and IQR statistics as numpy computes them,
per key too, that a spike cannot move; a real tiny forecaster that a few huge training spikes
throw off with the MSE and not with the Huber loss; and the MSE path as it was, bit for bit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv
import pytest
import torch

from detector.contract.features import IQR_TO_SIGMA, robust_statistics
from trainer.config import TrainConfig, load_train_config
from trainer.data import TRAIN, VALIDATION, Events, load_events
from trainer.fit import Loss, fit, make_loss, predict, seed_everything
from trainer.network import NetOutput, SequenceNet

START = 1_700_000_000
PER_KEY = 200  # training: the first 70 % of each key's events

CONFIG = """
[data]
key = "sensor"
time = "ts"
features = [
  {{ name = "temperature", kind = "numeric", scale = "{scale}", missing = "mean" }},
  {{ name = "load", kind = "numeric", forecast = false, scale = "standard" }},
]

[model]
task = "forecast"
window = 16
min_history = 13
hidden = 16
per_key_normalisation = true

[training]
epochs = 8
batch_size = 128
learning_rate = 0.01
patience = 4
forecast_loss = "{loss}"

[threshold]
method = "quantile"
target = 0.99

[threshold.advanced]
"""


def sensor_rows(
    sensors: int = 8, spikes: dict[str, float] | None = None, every: int = 25, missing: int = 0
) -> list[dict]:
    """A 12-step cycle per sensor (σ about 3.5) with small noise; `spikes` adds its amount to
    every `every`-th training event of a sensor; every `missing`-th temperature is absent."""
    rng = np.random.default_rng(0)
    rows = []
    for sensor in (f"s{n}" for n in range(sensors)):
        phase, level = rng.uniform(0, 2 * np.pi), rng.uniform(10, 30)
        for i in range(PER_KEY):
            value = level + 5 * np.sin(2 * np.pi * i / 12 + phase) + rng.normal(0, 0.2)
            if i < 0.7 * PER_KEY and i % every == 7:
                value += (spikes or {}).get(sensor, 0.0)
            absent = missing and i % missing == 3
            rows.append(
                {
                    "sensor": sensor,
                    "ts": START + 3600 * i,
                    "temperature": None if absent else float(value),
                    "load": float(rng.normal(50, 5)),
                }
            )
    return rows


def load(folder: Path, rows: list[dict], scale: str = "robust", loss: str = "mse") -> Events:
    return load_events(write(folder, rows, scale, loss), [folder / "events.csv"])


def write(folder: Path, rows: list[dict], scale: str, loss: str) -> TrainConfig:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.toml").write_text(CONFIG.format(scale=scale, loss=loss))
    pyarrow.csv.write_csv(pa.Table.from_pylist(rows), folder / "events.csv")
    return load_train_config(folder / "train.toml")


def training_values(rows: list[dict], column: str, fill: float = np.nan) -> dict[str, np.ndarray]:
    """Each sensor's training values of `column`, `fill` where one is absent."""
    values: dict[str, list[float]] = {}
    for index, row in enumerate(rows):
        if index % PER_KEY < 0.7 * PER_KEY:
            value = fill if row[column] is None else row[column]
            values.setdefault(row["sensor"], []).append(value)
    return {sensor: np.array(found) for sensor, found in values.items()}


def numpy_robust(values: np.ndarray) -> tuple[float, float]:
    q1, median, q3 = np.quantile(values, (0.25, 0.5, 0.75))
    return float(median), float((q3 - q1) / IQR_TO_SIGMA)


def test_robust_statistics_are_numpys_median_and_iqr_in_every_group() -> None:
    rng = np.random.default_rng(1)
    sizes = [1, 2, 5, 8, 101]
    group = rng.permutation(np.repeat(np.arange(len(sizes)), sizes))
    values = np.column_stack([rng.normal(0, 3, group.size), rng.exponential(2, group.size)])
    # Mostly equal values: an IQR of 0, so σ is their std (a rare flag stays small).
    values[group == 3, 1] = [5, 5, 5, 5, 5, 5, 5, 8]

    median, sigma = robust_statistics(values, group, len(sizes))

    for g in range(len(sizes)):
        own = values[group == g]
        q1, q3 = np.quantile(own, (0.25, 0.75), axis=0)
        np.testing.assert_allclose(median[g], np.median(own, axis=0), rtol=1e-12)
        iqr = q3 > q1
        np.testing.assert_allclose(sigma[g, iqr], (q3 - q1)[iqr] / IQR_TO_SIGMA, rtol=1e-12)
    assert sigma[0].tolist() == [0.0, 0.0]  # one value: no spread (floored when fitted)
    assert sigma[3, 1] == pytest.approx(np.std([5, 5, 5, 5, 5, 5, 5, 8]))


def test_robust_scaling_fits_median_and_iqr_globally_and_per_key_on_training_data(
    tmp_path,
) -> None:
    rows = sensor_rows(missing=9)
    events = load(tmp_path, rows)

    temperature, load_feature = events.manifest.numeric_features
    present = np.concatenate(list(training_values(rows, "temperature").values()))
    # Absent values are filled with the median of the present ones, which leaves it in place.
    assert temperature.mean == np.nanmedian(present)
    filled = training_values(rows, "temperature", fill=temperature.mean)
    everything = np.concatenate(list(filled.values()))
    assert (temperature.mean, temperature.std) == pytest.approx(numpy_robust(everything))
    loads = training_values(rows, "load")
    every_load = np.concatenate(list(loads.values()))
    assert (load_feature.mean, load_feature.std) == (every_load.mean(), every_load.std())

    statistics = events.manifest.per_key_statistics
    assert sorted(statistics) == sorted(filled)
    for sensor, stats in statistics.items():
        expected = [*numpy_robust(filled[sensor]), loads[sensor].mean(), loads[sensor].std()]
        assert [stats.mean[0], stats.std[0], stats.mean[1], stats.std[1]] == pytest.approx(
            expected, rel=1e-12
        )


def test_a_1000_sigma_spike_moves_no_other_keys_statistics_and_its_own_little(tmp_path) -> None:
    clean = load(tmp_path / "clean", sensor_rows())
    sigma = clean.manifest.per_key_statistics["s2"].std[0]
    one_spike = sensor_rows(spikes={"s2": 1000 * sigma}, every=PER_KEY)
    spiked = load(tmp_path / "spiked", one_spike)
    spiked_standard = load(tmp_path / "standard", one_spike, scale="standard")

    before, after = clean.manifest.per_key_statistics, spiked.manifest.per_key_statistics
    assert {k: v for k, v in after.items() if k != "s2"} == {
        k: v for k, v in before.items() if k != "s2"
    }
    assert after["s2"].mean[0] == pytest.approx(before["s2"].mean[0], abs=0.1 * sigma)
    assert after["s2"].std[0] == pytest.approx(sigma, rel=0.1)
    assert spiked_standard.manifest.per_key_statistics["s2"].std[0] > 50 * sigma
    # Nothing is clipped: the spike reaches the model as the 1,000σ it is.
    assert _largest_encoded(spiked, "s2") > 900


def _largest_encoded(events: Events, key: str) -> float:
    """The largest encoded temperature of `key`'s training events."""
    return float(events.encoded[(events.keys == key) & (events.split == TRAIN), 0].max())


def _clean_forecast_error(folder: Path, rows: list[dict], loss: str) -> tuple[list[float], float]:
    """The validation losses of a forecaster trained with `loss`, and its mean squared
    forecast error on the validation windows of the keys without spikes."""
    config = write(folder, rows, "robust", loss)
    events = load_events(config, [folder / "events.csv"])
    seed_everything(config.training.seed)
    net = SequenceNet.from_manifest(events.manifest)
    validation = events.windows(VALIDATION)
    device = torch.device("cpu")
    history = fit(
        net, events.windows(TRAIN), validation, config.training, device=device, progress=False
    )
    out = predict(net, validation, device)
    error = (out.raw - out.target).square().mean(dim=1).numpy()
    clean = ~np.isin(validation.keys, ["s0", "s1"])
    return [epoch.validation_loss for epoch in history.epochs], float(error[clean].mean())


def test_huber_trains_a_forecaster_that_a_few_huge_spikes_cannot_throw_off(tmp_path) -> None:
    rows = sensor_rows(spikes={"s0": 3500.0, "s1": 3500.0})  # about 1,000σ, 6 times each

    huber_losses, huber_error = _clean_forecast_error(tmp_path / "huber", rows, "huber")
    _, mse_error = _clean_forecast_error(tmp_path / "mse", rows, "mse")

    assert np.isfinite(huber_losses).all()
    assert huber_error < 0.1 * mse_error


def _output(errors: list[list[float]]) -> NetOutput:
    target = torch.zeros(len(errors), len(errors[0]))
    return NetOutput(torch.zeros(len(errors)), torch.tensor(errors), target)


def test_huber_is_the_mse_within_delta_and_linear_beyond_it() -> None:
    huber = Loss("forecast", "bce", 2.0, 1.0, huber_delta=1.0)
    mse = Loss("forecast", "bce", 2.0, 1.0)
    small = _output([[0.5, -0.25], [0.1, 0.9]])
    assert torch.equal(huber.per_window(small, None), mse.per_window(small, None))

    spiked = _output([[1000.0, 0.0], [0.5, -0.5]])
    per_window = huber.per_window(spiked, None)
    assert per_window.tolist() == pytest.approx([(2 * 1000 - 1) / 2, 0.25])
    assert float(huber(spiked, None)) == pytest.approx(float(per_window.mean()))


def test_the_default_forecast_loss_is_the_fused_mse_and_classify_ignores_huber(
    tmp_path,
) -> None:
    config = write(tmp_path, sensor_rows(sensors=1), "standard", "mse").training
    out = _output([[0.3, -1.7], [2.5, 0.01]])
    fused = torch.nn.functional.mse_loss(out.raw, out.target)
    assert torch.equal(make_loss("forecast", config, None)(out, None), fused)

    huber = config.model_copy(update={"forecast_loss": "huber"})
    assert make_loss("forecast", huber, None).huber_delta == 1.0
    assert make_loss("classify", huber, np.array([0.0, 1.0])).huber_delta is None
