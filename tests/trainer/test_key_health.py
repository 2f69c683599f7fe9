"""The training report names the keys that dominate validation loss or look broken, and only
those: a real tiny forecaster with a spike in one key's validation part and another's training
part, a clean one, and the pure functions on hand-computed numbers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_training import FORECAST, START, write

from trainer.cli import main as trainer_main
from trainer.fit import Loss
from trainer.key_health import (
    DominantKey,
    KeyHealth,
    SuspiciousKey,
    dominant_keys,
    loss_shares,
    robust_z_extremes,
)
from trainer.network import NetOutput
from trainer.pipeline import train
from trainer.report import model_card

PER_SENSOR = 120  # training 0-83, validation 84-101, test 102-119


def rows(spikes: dict[tuple[str, int], float] | None = None, flat: str | None = None) -> list[dict]:
    """Eight sensors on a 12-step cycle (σ about 3.5) with small noise; `spikes` adds to
    (sensor, index); `flat` reads 20 at every event."""
    rng = np.random.default_rng(0)
    out = []
    for sensor in (f"s{n}" for n in range(8)):
        phase = rng.uniform(0, 2 * np.pi)
        for i in range(PER_SENSOR):
            value = 20 + 5 * np.sin(2 * np.pi * i / 12 + phase) + rng.normal(0, 0.2)
            value = 20.0 if sensor == flat else value + (spikes or {}).get((sensor, i), 0.0)
            out.append({"sensor": sensor, "ts": START + 3600 * i, "temperature": value, "fault": 0})
    return out


def test_a_validation_spike_dominates_and_training_spikes_or_flat_keys_look_broken(
    tmp_path, capsys
) -> None:
    data_rows = rows({("s3", 90): 3500.0, ("s5", 40): 3500.0}, flat="s6")
    _, data = write(tmp_path, FORECAST, data_rows)
    out = tmp_path / "model" / "sensors.onnx"
    command = ["train", "--config", str(tmp_path / "train.toml"), "--data", str(data)]

    assert trainer_main([*command, "--out", str(out), "--epochs", "2", "--no-progress"]) == 0

    keys = json.loads((tmp_path / "model" / "metrics.json").read_text())["keys"]
    assert [key["key"] for key in keys["dominant"]] == ["s3"]
    assert keys["dominant"][0]["loss_share"] > 0.9
    assert keys["dominant"][0]["window_share"] == pytest.approx(1 / 8)
    assert [(k["key"], k["feature"], k["constant"]) for k in keys["suspicious"]] == [
        ("s5", "temperature", []),
        ("s6", None, ["temperature"]),
    ]
    # 3500 above a cycle whose quartiles lie about ±3.5 apart: robust z near 3500 / 5.2.
    assert 500 < keys["suspicious"][0]["robust_z"] < 800
    card = (tmp_path / "model" / "MODEL_CARD.md").read_text()
    section = card.split("## Keys to look at\n")[1].split("\n## ")[0]
    named = [line.split("`")[1] for line in section.splitlines() if line.startswith("- `")]
    assert named == ["s3", "s5", "s6"]
    assert "of the validation loss from 12.5% of its windows" in section
    assert "`temperature` constant in training" in section
    printed = capsys.readouterr()
    assert "alerting: the configuration's [threshold.advanced], not" in printed.out
    warning = printed.err
    assert (
        "warning: keys dominating the validation loss or looking broken (3): s3, s5, s6 (see"
        in warning
    )


def test_a_clean_data_set_names_no_key(tmp_path) -> None:
    config, data = write(tmp_path, FORECAST, rows())
    result = train(config, [data], tmp_path / "sensors.onnx", epochs=2, progress=False)

    assert result.metrics["keys"] == {"dominant": [], "suspicious": []}
    assert "## Keys to look at\n- none\n" in model_card(result)
    assert result.keys.warning() is None


def test_loss_shares_are_each_keys_part_of_the_summed_loss_and_of_the_windows() -> None:
    names, share, windows = loss_shares(np.array(["b", "a", "b", "c"]), np.array([1, 2, 3, 4.0]))

    assert names.tolist() == ["a", "b", "c"]
    np.testing.assert_allclose(share, [0.2, 0.4, 0.4])
    np.testing.assert_allclose(windows, [0.25, 0.5, 0.25])


def test_a_key_dominates_with_a_large_share_far_above_its_share_of_windows() -> None:
    # "a": 9 of 10 loss from 1 of 10 windows; "b": the rest.
    keys = np.array(["a"] + ["b"] * 9)
    assert dominant_keys(keys, np.array([9.0] + [1 / 9] * 9)) == (DominantKey("a", 0.9, 0.1),)
    # Two keys alike: each holds half the loss from half the windows.
    assert dominant_keys(np.array(["a", "b"]), np.array([1.0, 1.0])) == ()
    # 25 % of the loss from 10 % of the windows is only 2.5x the fair share.
    assert dominant_keys(keys, np.array([2.5] + [7.5 / 9] * 9)) == ()


def test_robust_z_uses_the_iqr_or_the_mean_deviation_where_the_iqr_is_zero() -> None:
    groups = {
        0: [4.0, 1, 100, 3, 2],  # quartiles 2, 3, 4: z = 97 / (2 / 1.349)
        1: [5.0, 5, 5],  # constant
        2: [0.0] * 9 + [10],  # IQR 0, mean |x - 0| = 1: z = 10 / 1.2533
    }
    group = np.array([g for g, values in groups.items() for _ in values])
    values = np.array([v for values in groups.values() for v in values])
    shuffle = np.random.default_rng(0).permutation(len(values))

    z, spread = robust_z_extremes(values[shuffle], group[shuffle], 3)

    np.testing.assert_allclose(z, [97 * 1.349 / 2, 0.0, 10 / 1.2533])
    np.testing.assert_allclose(spread, [99.0, 0.0, 10.0])


def test_the_warning_names_five_keys_and_counts_the_rest() -> None:
    suspicious = tuple(SuspiciousKey(f"k{n}", ("a",), None, None) for n in range(7))
    health = KeyHealth((DominantKey("k0", 0.5, 0.1),), suspicious)

    assert health.warning() == (
        "keys dominating the validation loss or looking broken (7): k0, k1, k2, k3, k4 and 2 more "
        "(see MODEL_CARD.md, metrics.json `keys`)"
    )
    assert health.reasons()["k0"] == [
        "50.0% of the validation loss from 10.0% of its windows",
        "`a` constant in training",
    ]
    assert SuspiciousKey("k", ("a", "b"), "c", 61.25).reason == (
        "`c` 61.25 robust σ from its median, `a`, `b` constant in training"
    )


@pytest.mark.parametrize("task", ["forecast", "classify"])
def test_the_per_window_losses_average_to_the_training_loss(task: str) -> None:
    rng = torch.Generator().manual_seed(0)
    loss = Loss(task, "focal", 2.0, 3.0)
    raw = torch.randn(6, 2, generator=rng) if task == "forecast" else torch.randn(6, generator=rng)
    target = torch.randn(6, 2, generator=rng) if task == "forecast" else None
    labels = None if task == "forecast" else torch.tensor([0, 1, 0, 0, 1, 0.0])
    out = NetOutput(torch.zeros(6), raw, target)

    per_window = loss.per_window(out, labels)

    assert per_window.shape == (6,)
    assert float(per_window.mean()) == pytest.approx(float(loss(out, labels)))
