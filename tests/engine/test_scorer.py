"""Scorer: contract checks at load, providers, chunked runs equal to one run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import structlog
from model_factory import export_random, make_manifest

from detector.contract.model_file import ModelContractError
from detector.engine import scorer as scorer_module
from detector.engine.scorer import CPU, Scorer, load_cuda_libraries, resolve_providers


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("scorer")


def random_inputs(rows: int, window: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, window, 4)).astype(np.float32)
    x[:, :, 2] = rng.integers(0, 5, (rows, window))  # merchant codes
    return x, rng.integers(min(2, window), window + 1, rows)


def test_auto_providers_fall_back_to_cpu_and_unknown_ones_are_refused() -> None:
    resolved = resolve_providers()
    assert resolved[-1] == CPU
    assert resolve_providers([CPU, CPU]) == [CPU]
    with pytest.raises(ValueError, match="NoSuchExecutionProvider"):
        resolve_providers(["NoSuchExecutionProvider"])


def test_missing_cuda_libraries_are_logged_not_printed(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """onnxruntime-gpu's preload prints what it cannot load; stdout may carry a summary."""

    def preload() -> None:
        print("Failed to load libcudnn.so.9: cannot open shared object file")

    monkeypatch.setattr(scorer_module.onnxruntime, "preload_dlls", preload, raising=False)
    with structlog.testing.capture_logs() as logs:
        load_cuda_libraries.__wrapped__()
    assert capsys.readouterr().out == ""
    assert logs == [
        {
            "event": "cuda libraries incomplete",
            "log_level": "warning",
            "detail": "Failed to load libcudnn.so.9: cannot open shared object file",
        }
    ]


def test_windows_scored_in_chunks_equal_one_call(folder: Path) -> None:
    manifest = make_manifest("forecast", window=5)
    scorer = Scorer.load(export_random(folder / "forecast.onnx", manifest))
    assert scorer.providers == resolve_providers()
    x, lengths = random_inputs(10, 5)
    whole = scorer.score_windows(x, lengths)
    chunked = scorer.score_windows(x, lengths, max_batch=3)
    assert whole.score.shape == (10,) and whole.contrib.shape == (10, 2)
    np.testing.assert_allclose(chunked.score, whole.score, rtol=1e-6)
    np.testing.assert_allclose(chunked.contrib, whole.contrib, rtol=1e-6)
    np.testing.assert_allclose(whole.score, whole.contrib.mean(axis=1), rtol=1e-5)
    assert len(set(np.round(whole.score, 6))) == 10
    empty = scorer.score_windows(x[:0], lengths[:0])
    assert empty.score.shape == (0,) and empty.contrib.shape == (0, 2)


def test_steps_in_chunks_equal_one_call_and_return_the_new_state(folder: Path) -> None:
    manifest = make_manifest(export_mode="stateful", layers=2, hidden=6)
    scorer = Scorer.load(export_random(folder / "stateful.onnx", manifest))
    x, _ = random_inputs(7, 1)
    h, c = scorer.zero_state(7)
    whole = scorer.step(x[:, 0], h, c)
    chunked = scorer.step(x[:, 0], h, c, max_batch=2)
    assert whole.h.shape == (2, 7, 6) and whole.contrib is None
    for name in ("score", "h", "c"):
        np.testing.assert_allclose(getattr(chunked, name), getattr(whole, name), rtol=1e-6)
    again = scorer.step(x[:, 0], whole.h, whole.c)
    assert not np.allclose(again.score, whole.score)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda data: b"not a model at all", "not an ONNX model"),
        (lambda data: data[: len(data) // 2], "not an ONNX model|graph_sha256"),
    ],
)
def test_refused_files_raise_a_contract_error(folder: Path, damage, message: str) -> None:
    path = export_random(folder / "good.onnx", make_manifest())
    broken = folder / "broken.onnx"
    broken.write_bytes(damage(path.read_bytes()))
    with pytest.raises(ModelContractError, match=message):
        Scorer.load(broken)


def test_a_graph_changed_after_export_is_refused(folder: Path) -> None:
    path = export_random(folder / "tampered.onnx", make_manifest())
    model = onnx.load(path)
    weights = model.graph.initializer[0]
    weights.raw_data = bytes(len(weights.raw_data))
    onnx.save(model, path)
    with pytest.raises(ModelContractError, match="graph_sha256 mismatch"):
        Scorer.load(path)
