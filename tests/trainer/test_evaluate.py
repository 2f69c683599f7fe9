"""`trainer evaluate` and the reports, on a real (tiny, briefly trained) forecast model."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import orjson
import pyarrow.csv as pa_csv
import pytest
from cli_support import intra_op_threads, spy_on_scorer_loads

from detector.engine.core import EngineOptions, Status
from detector.engine.scorer import Scorer
from detector.files.readers import read_records
from detector.files.replay import replay_records
from trainer.cli import main
from trainer.config import load_train_config
from trainer.evaluate import evaluate, read_labels
from trainer.metrics import at_threshold, average_precision
from trainer.pipeline import TrainResult, train
from trainer.report import write_training_report
from trainer.synth import sensors


@dataclass(frozen=True)
class Trained:
    folder: Path
    result: TrainResult

    @property
    def model(self) -> Path:
        return self.result.model_path

    @property
    def test(self) -> Path:
        return self.folder / "test.csv"


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Trained:
    folder = tmp_path_factory.mktemp("sensors")
    sensors(keys=4, days=2, seed=0).write(folder)
    config = load_train_config(folder / "train.toml")
    result = train(config, [folder / "train.csv"], folder / "model.onnx", epochs=2, progress=False)
    assert result is not None
    return Trained(folder, result)


def test_metrics_are_those_of_the_engines_scores_joined_by_row(trained: Trained) -> None:
    evaluation = evaluate(trained.model, trained.test)
    records = read_records(trained.test)
    replay = replay_records(records, Scorer.load(trained.model))
    np.testing.assert_array_equal(evaluation.replay.scores, replay.scores)
    labels = np.array([record["label"] for record in records], float)
    np.testing.assert_array_equal(evaluation.labels, labels)
    scored = replay.statuses == Status.SCORED
    metrics = evaluation.metrics
    expected = at_threshold(labels[scored] > 0, replay.scores[scored], evaluation.threshold)
    assert metrics["point"] == expected.to_dict()
    assert metrics["auprc"] == pytest.approx(
        average_precision(labels[scored] > 0, replay.scores[scored])
    )
    counts = metrics["counts"]
    manifest = evaluation.manifest
    assert counts["events"] == len(records) == counts["scored"] + counts["warming_up"]
    assert counts["warming_up"] == 4 * (manifest.min_history - 1)
    assert counts["positives"] == int(labels.sum()) > 0
    assert metrics["model"]["model_version"] == manifest.model_version
    ranges = metrics["ranges"]
    assert ranges["labeled"] > 0 and ranges["detected"] <= ranges["labeled"]


def test_row_order_of_the_file_does_not_change_the_metrics(
    trained: Trained, tmp_path: Path
) -> None:
    table = pa_csv.read_csv(trained.test)
    shuffled = table.take(np.random.default_rng(0).permutation(table.num_rows))
    pa_csv.write_csv(shuffled, tmp_path / "shuffled.csv")
    original = evaluate(trained.model, trained.test).metrics
    again = evaluate(trained.model, tmp_path / "shuffled.csv").metrics
    for name in ("point", "ranges", "point_adjusted", "auprc", "auroc"):
        assert again[name] == original[name]


def test_bad_records_are_dead_letters_and_left_out(trained: Trained, tmp_path: Path) -> None:
    records = read_records(trained.test)
    lines = [orjson.dumps(record) for record in records]
    lines[10] = b'{"device_id": "dev-000", "ts": "yesterday", "label": 0}'
    lines[20] = b"not json"
    (tmp_path / "test.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    evaluation = evaluate(trained.model, tmp_path / "test.jsonl")
    counts = evaluation.metrics["counts"]
    assert counts["dead_letters"] == 2
    assert counts["events"] == len(records)
    assert counts["labeled"] == len(records) - 1  # the unparseable line has no label
    assert not evaluation.scored[[10, 20]].any()


def test_providers_are_those_asked_for(trained: Trained) -> None:
    on_cpu = evaluate(trained.model, trained.test, providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(
        on_cpu.replay.scores, evaluate(trained.model, trained.test).replay.scores
    )
    with pytest.raises(ValueError, match="NoSuchExecutionProvider"):
        evaluate(trained.model, trained.test, providers=["NoSuchExecutionProvider"])


def test_threshold_override_moves_point_metrics(trained: Trained) -> None:
    calibrated = evaluate(trained.model, trained.test)
    everything = evaluate(trained.model, trained.test, options=EngineOptions(threshold=0.0))
    assert everything.threshold == 0.0
    assert everything.metrics["point"]["recall"] == 1.0
    assert (
        everything.metrics["point"]["false_positives"]
        > calibrated.metrics["point"]["false_positives"]
    )
    assert everything.metrics["auprc"] == calibrated.metrics["auprc"]


def test_read_labels_accepts_numbers_and_booleans_only() -> None:
    records = [{"y": 1}, {"y": 0}, {"y": True}, {"y": None}, {"y": "1"}, {}, b'{"y": 2}', b"{"]
    np.testing.assert_array_equal(
        read_labels(records, "y"), [1, 0, 1, np.nan, np.nan, np.nan, 1, np.nan]
    )


def test_command_writes_metrics_and_plots(trained: Trained, tmp_path: Path) -> None:
    out = tmp_path / "eval"
    argv = ["evaluate", "--model", str(trained.model), "--data", str(trained.test)]
    assert main([*argv, "--out", str(out), "--no-progress"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["counts"]["events"] == pa_csv.read_csv(trained.test).num_rows
    assert set(metrics) >= {"point", "auprc", "auroc", "ranges", "point_adjusted", "counts"}
    for name in ("scores.png", "precision_recall.png", "roc.png", "timeline.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_command_takes_onnxruntime_threads(
    trained: Trained, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    loaded = spy_on_scorer_loads(monkeypatch)
    argv = ["evaluate", "--model", str(trained.model), "--data", str(trained.test)]

    assert main([*argv, "--threads", "1", "--out", str(tmp_path / "eval"), "--no-progress"]) == 0
    assert [intra_op_threads(scorer) for scorer in loaded] == [1]


def test_command_refuses_a_tampered_model(
    trained: Trained, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    data = bytearray(trained.model.read_bytes())
    data[len(data) // 2] ^= 0xFF
    (tmp_path / "bad.onnx").write_bytes(bytes(data))
    argv = ["evaluate", "--model", str(tmp_path / "bad.onnx"), "--data", str(trained.test)]
    assert main([*argv, "--out", str(tmp_path / "eval"), "--no-progress"]) == 2
    assert "refused model" in capsys.readouterr().err


def test_training_report_has_plots_and_a_model_card(trained: Trained, tmp_path: Path) -> None:
    paths = write_training_report(trained.result, tmp_path)
    assert {path.name for path in paths} >= {"loss.png", "scores.png", "MODEL_CARD.md"}
    card = (tmp_path / "MODEL_CARD.md").read_text()
    manifest = trained.result.manifest
    assert manifest.model_version in card
    assert f"{manifest.scoring.threshold:.6g}" in card
    assert manifest.scoring.calibration in card
    for name in ("temperature", "vibration", "pressure", "time_delta"):
        assert f"`{name}`" in card
