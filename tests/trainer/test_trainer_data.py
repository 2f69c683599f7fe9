"""Training data is read, split, fitted and windowed exactly as the detector will see events."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv
import pyarrow.parquet
import pytest

from detector.contract.features import FeatureCodec, key_gaps
from detector.contract.manifest import CategoricalFeature, NumericFeature
from trainer.config import ConfigError, TrainConfig, load_train_config
from trainer.data import TEST, TRAIN, VALIDATION, DataError, load_events

CONFIG = """
[data]
key = "device"
time = "ts"
label = "label"
features = [
  { name = "amount", kind = "numeric", missing = "mean" },
  { name = "channel", kind = "categorical", missing = "unknown", max_vocabulary = 2 },
]

[split]
train = 0.6
validation = 0.2
test = 0.2

[model]
window = 4
min_history = 2
"""


def write_config(folder: Path, text: str = CONFIG) -> TrainConfig:
    path = folder / "train.toml"
    path.write_text(text)
    return load_train_config(path)


def make_rows(keys: int = 3, per_key: int = 10, seed: int = 0) -> list[dict]:
    """Events of several keys, interleaved in time and written out of order."""
    rng = np.random.default_rng(seed)
    rows = []
    for k in range(keys):
        for i in range(per_key):
            rows.append(
                {
                    "device": f"dev{k}",
                    "ts": 1_700_000_000 + 60 * i + 7 * k + int(rng.integers(0, 5)),
                    "amount": float(np.round(rng.normal(100 * (k + 1), 10), 3)),
                    "channel": ["web", "web", "app", "pos"][i % 4],
                    "label": int(i % 5 == 4),
                }
            )
    order = rng.permutation(len(rows))
    return [rows[i] for i in order]


def write_csv(path: Path, rows: list[dict]) -> Path:
    pyarrow.csv.write_csv(pa.Table.from_pylist(rows), path)
    return path


def test_csv_parquet_and_json_lines_give_the_same_events(tmp_path) -> None:
    config = write_config(tmp_path)
    rows = make_rows()
    csv_events = load_events(config, [write_csv(tmp_path / "e.csv", rows)])
    pyarrow.parquet.write_table(pa.Table.from_pylist(rows), tmp_path / "e.parquet")
    (tmp_path / "e.jsonl").write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    for name in ("e.parquet", "e.jsonl"):
        other = load_events(config, [tmp_path / name])
        np.testing.assert_array_equal(other.keys, csv_events.keys)
        np.testing.assert_array_equal(other.times, csv_events.times)
        np.testing.assert_array_equal(other.encoded, csv_events.encoded)
        assert other.manifest.features == csv_events.manifest.features


def test_events_are_sorted_and_split_per_key_in_time_order(tmp_path) -> None:
    config = write_config(tmp_path)
    events = load_events(config, [write_csv(tmp_path / "e.csv", make_rows(per_key=10))])
    assert list(np.unique(events.keys)) == ["dev0", "dev1", "dev2"]
    for key in np.unique(events.keys):
        mine = events.keys == key
        times, split = events.times[mine], events.split[mine]
        assert np.all(np.diff(times) >= 0)
        # 10 events: 6 train, then 2 validation, then 2 test, never interleaved.
        assert split.tolist() == [TRAIN] * 6 + [VALIDATION] * 2 + [TEST] * 2
        assert events.position[mine].tolist() == list(range(10))


def test_time_cutoffs_split_every_key_at_the_same_instant(tmp_path) -> None:
    text = CONFIG.replace(
        "train = 0.6\nvalidation = 0.2\ntest = 0.2",
        'validation_from = 2023-11-14T22:19:00Z\ntest_from = "2023-11-14T22:22:00Z"',
    )
    events = load_events(write_config(tmp_path, text), [write_csv(tmp_path / "e.csv", make_rows())])
    validation_from, test_from = 1_700_000_340.0, 1_700_000_520.0
    assert np.all(events.times[events.split == TRAIN] < validation_from)
    validation = events.times[events.split == VALIDATION]
    assert validation.size and np.all((validation >= validation_from) & (validation < test_from))
    assert np.all(events.times[events.split == TEST] >= test_from)


def test_vocabulary_and_statistics_come_from_the_training_split_only(tmp_path) -> None:
    rows = make_rows(keys=2, per_key=10)
    # Late events carry a category and amounts training never sees.
    for row in rows:
        if row["ts"] >= 1_700_000_000 + 60 * 8:
            row["channel"], row["amount"] = "atm", 1e6
    events = load_events(write_config(tmp_path), [write_csv(tmp_path / "e.csv", rows)])
    channel = next(f for f in events.manifest.features if isinstance(f, CategoricalFeature))
    # max_vocabulary = 2: the two most frequent training values ("web" twice as often).
    assert channel.vocabulary == ["web", "app"]
    amount = next(f for f in events.manifest.features if isinstance(f, NumericFeature))
    training = [r["amount"] for r in rows if r["ts"] < 1_700_000_000 + 60 * 6]
    assert amount.mean == pytest.approx(np.mean(training))
    assert amount.std == pytest.approx(np.std(training))
    codes = events.encoded[:, 1]
    atm = events.times >= 1_700_000_000 + 60 * 8
    assert set(codes[atm].tolist()) == {1.0}  # unknown
    assert set(codes[~atm].tolist()) <= {1.0, 2.0, 3.0}


def test_missing_values_are_imputed_with_the_training_mean(tmp_path) -> None:
    rows = make_rows(keys=1, per_key=10)
    rows.sort(key=lambda row: row["ts"])
    rows[2]["amount"] = None
    rows[8]["amount"] = None
    events = load_events(write_config(tmp_path), [write_csv(tmp_path / "e.csv", rows)])
    amount = events.manifest.features[0]
    present = [r["amount"] for r in rows[:6] if r["amount"] is not None]
    assert amount.mean == pytest.approx(np.mean(present))
    # The detector's codec fills a missing amount with the same mean: z-score exactly 0.
    assert events.encoded[2, 0] == 0.0
    assert events.encoded[8, 0] == 0.0


def test_unscaled_features_reach_the_model_as_they_are(tmp_path) -> None:
    """scale = "none" passes a feature unchanged, with global and with per-key statistics,
    and its training mean still fills a missing value; the z-scored feature beside it is
    z-scored as before."""
    text = CONFIG.replace(
        '{ name = "amount", kind = "numeric", missing = "mean" },',
        '{ name = "amount", kind = "numeric", missing = "mean", scale = "none" },\n'
        '  { name = "level", kind = "numeric" },',
    )
    rows = make_rows(keys=2, per_key=10)
    for row in rows:
        row["level"] = 3 * row["amount"] + 5
    rows[4]["amount"] = None
    for per_key in (False, True):
        config = text.replace("[model]", f"[model]\nper_key_normalisation = {str(per_key).lower()}")
        events = load_events(write_config(tmp_path, config), [write_csv(tmp_path / "e.csv", rows)])
        amount, level = events.manifest.features[:2]
        assert (amount.scale, level.scale) == ("none", "standard")
        given = {(r["device"], r["ts"]): r["amount"] for r in rows}
        expected = [given[key, int(t)] for key, t in zip(events.keys, events.times, strict=True)]
        missing = np.array([value is None for value in expected])
        present = np.array([value for value in expected if value is not None], np.float32)
        np.testing.assert_array_equal(events.encoded[~missing, 0], present)
        assert events.encoded[missing, 0] == pytest.approx([amount.mean])
        train = events.split == TRAIN
        for key in np.unique(events.keys) if per_key else [None]:
            mine = train & (events.keys == key) if per_key else train
            assert events.encoded[mine, 1].mean() == pytest.approx(0.0, abs=1e-5)
            assert events.encoded[mine, 1].std() == pytest.approx(1.0, abs=1e-4)


def test_windows_are_cut_as_the_engine_cuts_them(tmp_path) -> None:
    config = write_config(tmp_path)
    events = load_events(config, [write_csv(tmp_path / "e.csv", make_rows(per_key=10))])
    codec = FeatureCodec(events.manifest)
    for split in (TRAIN, VALIDATION, TEST):
        windows = events.windows(split)
        x, lengths = windows.arrays()
        expected_ends = [
            i
            for i in range(len(events.keys))
            if events.split[i] == split and events.position[i] + 1 >= 2
        ]
        assert windows.ends.tolist() == expected_ends
        for row, end in enumerate(windows.ends):
            key = events.keys[end]
            history = [i for i in range(end + 1) if events.keys[i] == key]
            context = history[-4:]
            assert lengths[row] == len(context)
            np.testing.assert_array_equal(x[row, : len(context)], events.encoded[context])
            assert not x[row, len(context) :].any()
        assert windows.labels.tolist() == events.labels[windows.ends].tolist()
    # Validation windows reach back into training events for context.
    first = events.windows(VALIDATION).ends[0]
    assert events.split[first - 1] == TRAIN
    # The time-delta column is the codec's encoding of each key's gaps.
    raw_gaps = key_gaps(events.keys.tolist(), events.times)
    z = (np.log1p(raw_gaps) - codec.manifest.features[2].mean) / codec.manifest.features[2].std
    np.testing.assert_allclose(events.encoded[:, 2], z, rtol=1e-5, atol=1e-5)


def test_a_bad_row_is_named_by_file_and_row(tmp_path) -> None:
    config = write_config(tmp_path, CONFIG.replace('missing = "mean"', 'missing = "reject"'))
    rows = make_rows()
    rows[4]["amount"] = None
    path = write_csv(tmp_path / "bad.csv", rows)
    with pytest.raises(DataError, match=r"bad\.csv: row 5: missing_feature: 'amount' is missing"):
        load_events(config, [path])

    lines = [json.dumps(row) for row in make_rows()]
    lines[2] = lines[2].replace('"ts": ', '"ts": "yesterday", "was": ')
    (tmp_path / "bad.jsonl").write_text("\n".join(lines))
    with pytest.raises(DataError, match=r"bad\.jsonl: row 3: bad_timestamp"):
        load_events(config, [tmp_path / "bad.jsonl"])

    rows = make_rows()
    rows[0]["label"] = 7
    with pytest.raises(DataError, match=r"row 1: bad_label"):
        load_events(config, [write_csv(tmp_path / "label.csv", rows)])


def test_loading_tens_of_thousands_of_events(tmp_path) -> None:
    config = write_config(tmp_path)
    path = write_csv(tmp_path / "big.csv", make_rows(keys=40, per_key=1000))
    events = load_events(config, [path])
    windows = events.windows(TRAIN)
    x, _ = windows.arrays()
    assert len(events.keys) == 40_000 and x.shape == (len(windows), 4, 3)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (("window = 4", "window = 0"), "model.window"),
        (('missing = "mean" }', 'missing = "mean", scale = "minmax" }'), "scale"),
        (('kind = "numeric"', 'kind = "number"'), "data.features.0"),
        (("[model]", "[model]\nlayers = 5"), "model.layers"),
        (("min_history = 2", "min_history = 9"), "min_history must not exceed window"),
        (("[split]", "[split]\nshuffle = true"), "split.shuffle"),
        (('label = "label"\n', ""), "a classify model needs data.label"),
        (("train = 0.6", "train = 0.7"), "train + validation + test must equal 1"),
    ],
)
def test_config_errors_name_the_field(tmp_path, change: tuple[str, str], field: str) -> None:
    with pytest.raises(ConfigError, match="invalid training configuration") as error:
        write_config(tmp_path, CONFIG.replace(*change))
    assert field in str(error.value)
    assert str(tmp_path / "train.toml") in str(error.value)


def test_config_defaults_and_toml_errors(tmp_path) -> None:
    config = write_config(tmp_path)
    assert config.model.task == "classify"
    assert config.threshold.method == "max_f1"
    assert config.training.pos_weight == "auto"
    assert config.threshold.resolved_target is None
    manifest = config.draft_manifest({"channel": ["web"]})
    assert [f.name for f in manifest.features] == ["amount", "channel", "time_delta"]
    with pytest.raises(ConfigError, match="not valid TOML"):
        write_config(tmp_path, "[data\n")
