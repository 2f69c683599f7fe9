"""`trainer retrain` end to end: tiny classifiers trained for real on synthetic card payments,
judged through the detector's engine, promoted or kept (from a topic:
tests/integration/test_retrain_on_kafka.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.csv as pa_csv
import pytest
from retrain_support import LABEL, lines, retrain, write_config

from trainer.cli import main

HOPELESS = {"learning_rate = 0.005": "learning_rate = 0.000001"}


def test_first_run_promotes_then_a_worse_challenger_is_kept(payments, tmp_path):
    table, text = payments
    data = tmp_path / "events.csv"
    pa_csv.write_csv(table, data)
    served = tmp_path / "models" / "model.onnx"
    first, second = tmp_path / "run-1", tmp_path / "run-2"

    status, report = retrain(
        write_config(tmp_path, text, {}, "good.toml"), served, first, "--data", str(data)
    )

    assert status == 0
    assert (report["decision"], report["champion"]) == ("promoted", None)
    assert served.read_bytes() == (first / "challenger.onnx").read_bytes()
    parts = report["data"]
    train, holdout = parts["train_part"], parts["holdout_part"]
    assert train["events"] + holdout["events"] == parts["records"] == table.num_rows
    assert holdout["events"] == pytest.approx(0.2 * table.num_rows, abs=2)
    assert train["to"] < parts["cutoff"] <= holdout["from"]
    held = lines(first / "holdout.jsonl")
    assert len(lines(first / "train.jsonl")) == train["events"]
    assert len(held) == parts["context_events"] + holdout["events"]
    assert all(LABEL not in record for record in held[: parts["context_events"]])
    assert sum(record[LABEL] for record in held[parts["context_events"] :]) == holdout["positives"]
    assert (first / "report.md").read_text().startswith("# Retraining: promoted")

    hopeless = write_config(tmp_path, text, HOPELESS, "hopeless.toml")
    status, report = retrain(hopeless, served, second, "--data", str(data), "--epochs", "1")

    assert status == 3
    assert report["decision"] == "kept"
    champion, challenger = report["champion"], report["challenger"]
    assert champion["model_version"] == report_version(first)
    assert challenger["value"] < champion["value"] - 0.1
    assert report["data"]["cutoff"] == parts["cutoff"]  # both judged on the same slice
    assert served.read_bytes() == (first / "challenger.onnx").read_bytes()
    assert not served.with_name("model.onnx.previous").exists()


def report_version(folder: Path) -> str:
    return json.loads((folder / "report.json").read_text())["challenger"]["model_version"]


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--holdout", "1000d"], "leaves nothing to train on"),
        (["--holdout", "0.001"], "need positive and negative labels"),
        (["--labels", "labels.csv"], "--labels needs --label-id-column"),
        (["--champion", "corrupt.onnx"], "the champion is refused"),
    ],
)
def test_bad_input_exits_2_before_training(payments, tmp_path, capsys, arguments, message):
    table, text = payments
    data = tmp_path / "events.csv"
    pa_csv.write_csv(table, data)
    (tmp_path / "corrupt.onnx").write_bytes(b"not a model")
    config = write_config(tmp_path, text, {}, "retrain.toml")
    argv = ["retrain", "--config", str(config), "--data", str(data)]
    argv += ["--champion", str(tmp_path / "none.onnx"), "--promote-to", str(tmp_path / "m.onnx")]
    argv += [str(tmp_path / a) if a.endswith((".onnx", ".csv")) else a for a in arguments]

    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "m.onnx").exists()
