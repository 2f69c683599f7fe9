"""The model contract and the scorer, on fixture models: what load accepts, refuses and runs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from onnx_fixtures import build_graph, reference_scores, sensor_manifest, write_fixture

from detector.contract.manifest import ExportMode, Task
from detector.contract.model_file import ModelContractError, load_model_file, write_model
from detector.engine.scorer import Scorer

CASES = [(task, mode) for task in ("forecast", "classify") for mode in ("window", "stateful")]


def padded_windows(manifest, rows: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Random encoded windows, right-padded with zeros as the engine pads them."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(2, manifest.window + 1, rows)
    x = rng.standard_normal((rows, manifest.window, len(manifest.features))).astype(np.float32)
    x[np.arange(manifest.window)[None, :] >= lengths[:, None]] = 0.0
    return x, lengths


@pytest.mark.parametrize(("task", "mode"), CASES)
def test_a_fixture_loads_verified_and_scores_as_its_numpy_reference(
    load, task: Task, mode: ExportMode
) -> None:
    scorer = load(task, mode)
    x, lengths = padded_windows(scorer.manifest, 50)
    want, want_contrib = reference_scores(scorer.manifest, x, lengths)

    got = scorer.score_sequences(x, lengths)

    assert got.score.dtype == np.float32 and got.score.shape == (50,)
    np.testing.assert_allclose(got.score, want, rtol=1e-5, atol=1e-6)
    if task == "forecast":
        np.testing.assert_allclose(got.contrib, want_contrib, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got.contrib.mean(axis=1), got.score, rtol=1e-5)
    else:
        assert got.contrib is None and ((got.score > 0) & (got.score < 1)).all()


def test_chunked_calls_score_like_one_call(load) -> None:
    window, stateful = load("forecast", "window"), load("forecast", "stateful")
    x, lengths = padded_windows(window.manifest, 37)
    whole = window.score_windows(x, lengths)
    np.testing.assert_array_equal(window.score_windows(x, lengths, max_batch=5).score, whole.score)
    h, c = stateful.zero_state(37)
    one = stateful.step(x[:, 0], h, c)
    chunked = stateful.step(x[:, 0], h, c, max_batch=8)
    for name in ("score", "contrib", "h", "c"):
        np.testing.assert_array_equal(getattr(chunked, name), getattr(one, name))
    assert one.h.shape == (1, 37, window.manifest.network.hidden)


def test_an_empty_batch_gives_empty_outputs(load) -> None:
    scorer = load("forecast", "stateful")
    width = len(scorer.manifest.features)
    h, c = scorer.zero_state(0)
    out = scorer.step(np.zeros((0, width), np.float32), h, c)
    assert out.score.shape == (0,) and out.contrib.shape == (0, 2) and out.h.shape[1] == 0


def test_a_graph_changed_after_export_is_refused(tmp_path: Path) -> None:
    path = write_fixture(tmp_path / "model.onnx", sensor_manifest())
    model = onnx.load(path)
    head = next(t for t in model.graph.initializer if t.name == "head")
    head.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(head) * 2, "head"))
    onnx.save(model, path)  # the manifest, and the hash in it, stay as exported

    with pytest.raises(ModelContractError, match="graph_sha256 mismatch"):
        Scorer.load(path)


def test_a_graph_that_does_not_match_its_manifest_is_refused(tmp_path: Path) -> None:
    classifier = build_graph(sensor_manifest("classify"))
    write_model(classifier, sensor_manifest("forecast"), tmp_path / "model.onnx")

    with pytest.raises(ModelContractError, match="graph outputs"):
        load_model_file(tmp_path / "model.onnx")


def test_a_file_without_a_manifest_is_refused(tmp_path: Path) -> None:
    onnx.save(build_graph(sensor_manifest()), tmp_path / "bare.onnx")

    with pytest.raises(ModelContractError, match="no seqsentinel manifest"):
        load_model_file(tmp_path / "bare.onnx")
