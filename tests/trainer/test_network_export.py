"""The exported graphs keep the contract: window and stateful forms agree, padding is inert,
onnxruntime matches torch, and only verified, hash-stamped files load."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from detector.contract.manifest import (
    CategoricalFeature,
    Columns,
    Manifest,
    Network,
    NumericFeature,
    Scoring,
    TimeDeltaFeature,
    TrainingSummary,
)
from detector.contract.model_file import (
    METADATA_KEY,
    ModelContractError,
    load_model_file,
    write_model,
)
from trainer import export
from trainer.export import (
    INT8_TOLERANCE,
    PROBE_SLACK,
    ExportError,
    build_onnx,
    export_model,
    onnx_scores,
    quantize_checked,
)
from trainer.network import SequenceNet

WINDOW = 6


def make_manifest(
    task: str = "classify",
    export_mode: str = "window",
    *,
    bidirectional: bool = False,
    layers: int = 2,
) -> Manifest:
    return Manifest(
        task=task,
        export_mode=export_mode,
        columns=Columns(key="device", time="ts"),
        features=[
            NumericFeature(name="amount"),
            NumericFeature(name="balance", forecast=False),
            CategoricalFeature(name="channel", vocabulary=["web", "app", "pos"], embedding_dim=3),
            NumericFeature(name="latency"),
            TimeDeltaFeature(),
        ],
        window=WINDOW,
        min_history=2,
        network=Network(hidden=8, layers=layers, bidirectional=bidirectional, layer_norm=True),
        scoring=Scoring(
            semantics="probability" if task == "classify" else "forecast_error",
            threshold=0.5,
            calibration="test",
        ),
        training=TrainingSummary(rows=0, keys=0),
        trainer_version="test",
    )


def make_net(manifest: Manifest, seed: int = 0) -> SequenceNet:
    torch.manual_seed(seed)
    net = SequenceNet.from_manifest(manifest).eval()
    if manifest.task == "forecast":
        net.set_residual_variance(torch.tensor([0.5, 2.0]))
    return net


def random_events(rng: np.random.Generator, batch: int, steps: int) -> np.ndarray:
    """Encoded events: z-scored numbers, category codes 0..4 (padding, unknown, vocabulary)."""
    events = rng.normal(size=(batch, steps, 5)).astype(np.float32)
    events[:, :, 2] = rng.integers(0, 5, size=(batch, steps))
    return events


@pytest.mark.parametrize("task", ["classify", "forecast"])
def test_stateful_steps_equal_window_scores_at_every_position(task: str) -> None:
    rng = np.random.default_rng(1)
    events = random_events(rng, batch=7, steps=WINDOW)
    window_manifest = make_manifest(task, "window")
    stateful_manifest = make_manifest(task, "stateful")
    net = make_net(window_manifest)
    window_model = build_onnx(net, window_manifest)
    stateful_model = build_onnx(net, stateful_manifest)

    for length in range(1, WINDOW + 1):
        windows = np.zeros_like(events)
        windows[:, :length] = events[:, :length]
        lengths = np.full(len(events), length, np.int64)
        window_score, window_contrib = onnx_scores(window_model, window_manifest, windows, lengths)
        stepped_score, stepped_contrib = onnx_scores(
            stateful_model, stateful_manifest, windows, lengths
        )
        np.testing.assert_allclose(stepped_score, window_score, rtol=1e-5, atol=1e-5)
        if task == "forecast":
            assert window_contrib.shape == (7, 2)
            np.testing.assert_allclose(stepped_contrib, window_contrib, rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(window_score, window_contrib.mean(axis=1), rtol=1e-6)
    # Scores must depend on the events, or the comparison above proves nothing.
    assert np.std(window_score) > 1e-3


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("task", ["classify", "forecast"])
def test_right_padding_does_not_change_scores(task: str, bidirectional: bool) -> None:
    rng = np.random.default_rng(2)
    manifest = make_manifest(task, bidirectional=bidirectional)
    net = make_net(manifest)
    model = build_onnx(net, manifest)
    events = random_events(rng, batch=9, steps=WINDOW)
    lengths = rng.integers(2, WINDOW + 1, size=9).astype(np.int64)
    clean = events.copy()
    garbage = random_events(rng, batch=9, steps=WINDOW) * 50
    for row, length in enumerate(lengths):
        clean[row, length:] = 0.0
        events[row, length:] = garbage[row, length:]

    clean_score, _ = onnx_scores(model, manifest, clean, lengths)
    noisy_score, _ = onnx_scores(model, manifest, events, lengths)
    np.testing.assert_allclose(noisy_score, clean_score, rtol=1e-5, atol=1e-6)
    # And each equals the network run on the unpadded sequence alone.
    with torch.no_grad():
        for row, length in enumerate(lengths):
            alone = net(torch.from_numpy(clean[row : row + 1, :length]), torch.tensor([length]))
            assert alone.score.item() == pytest.approx(float(clean_score[row]), abs=1e-5)


def test_every_step_forecasts_are_the_window_forecasts_of_each_prefix() -> None:
    manifest = make_manifest("forecast")
    net = make_net(manifest)
    rng = np.random.default_rng(7)
    windows = random_events(rng, batch=5, steps=WINDOW)
    lengths = np.array([WINDOW, 2, 5, WINDOW, 3], np.int64)
    with torch.no_grad():
        every = net(torch.from_numpy(windows), torch.from_numpy(lengths), every_step=True)
        prefixes = [
            net(torch.from_numpy(windows[row : row + 1, :end]), torch.tensor([end]))
            for row, length in enumerate(lengths)
            for end in range(1, length + 1)
        ]
    assert len(every.score) == lengths.sum()
    for field in ("score", "raw", "target", "contrib"):
        expected = torch.cat([getattr(out, field) for out in prefixes])
        torch.testing.assert_close(getattr(every, field), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("task", "bidirectional"), [("classify", False), ("forecast", True)])
def test_every_step_needs_a_unidirectional_forecast_model(task: str, bidirectional: bool) -> None:
    net = make_net(make_manifest(task, bidirectional=bidirectional))
    windows = torch.from_numpy(random_events(np.random.default_rng(8), batch=2, steps=WINDOW))
    with pytest.raises(ValueError, match="unidirectional forecast model"):
        net(windows, torch.tensor([WINDOW, WINDOW]), every_step=True)


@pytest.mark.parametrize("task", ["classify", "forecast"])
def test_bidirectional_window_export_matches_torch(task: str, tmp_path) -> None:
    rng = np.random.default_rng(3)
    manifest = make_manifest(task, bidirectional=True, layers=3)
    net = make_net(manifest)
    windows = random_events(rng, batch=33, steps=WINDOW)
    lengths = rng.integers(2, WINDOW + 1, size=33).astype(np.int64)
    model = build_onnx(net, manifest)
    worst = export.check_parity(model, net, manifest, windows, lengths)
    assert worst < 1e-5
    with torch.no_grad():
        expected = net(torch.from_numpy(windows), torch.from_numpy(lengths)).score.numpy()
    got, _ = onnx_scores(model, manifest, windows, lengths)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    # The ONNX LSTM op is used, not an unrolled loop.
    assert sum(node.op_type == "LSTM" for node in model.graph.node) == 6


def test_export_refuses_when_onnxruntime_disagrees(tmp_path, monkeypatch) -> None:
    manifest = make_manifest("classify")
    net = make_net(manifest)
    windows = random_events(np.random.default_rng(4), batch=8, steps=WINDOW)
    lengths = np.full(8, WINDOW, np.int64)
    genuine = onnx_scores

    def corrupted(*args, **kwargs):
        score, contrib = genuine(*args, **kwargs)
        return score + np.float32(1e-3), contrib

    monkeypatch.setattr(export, "onnx_scores", corrupted)
    target = tmp_path / "model.onnx"
    with pytest.raises(ExportError, match=r"scores disagree by 0\.001"):
        export_model(net, manifest, target, parity_windows=windows, parity_lengths=lengths)
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def _shift_errors(shift: float, genuine=onnx_scores):
    """onnx_scores with each forecast error |target - prediction| moved by `shift` (encoded
    units), the score kept the mean of the moved contributions, as a graph computes it."""

    def shifted(model, manifest, windows, lengths):
        _, contrib = genuine(model, manifest, windows, lengths)
        variance = np.array([1e-6, 2.0])
        errors = np.sqrt(contrib.astype(np.float64) * variance) + shift
        moved = (errors**2 / variance).astype(np.float32)
        return moved.mean(axis=1), moved

    return shifted


@pytest.mark.parametrize(("shift", "accepted"), [(1e-6, True), (1e-3, False), (np.nan, False)])
def test_forecast_parity_is_judged_on_the_errors_not_the_magnified_score(
    shift: float, accepted: bool, monkeypatch
) -> None:
    # A near-constant feature: its residual variance divides errors of float32 rounding size
    # into score differences far above the tolerance; the errors themselves stay within it.
    manifest = make_manifest("forecast")
    net = make_net(manifest)
    net.residual_variance.copy_(torch.tensor([1e-6, 2.0]))
    rng = np.random.default_rng(6)
    windows = random_events(rng, batch=16, steps=WINDOW)
    lengths = np.full(16, WINDOW, np.int64)
    with torch.no_grad():  # the last events as well predicted as that variance says
        prediction = net(torch.from_numpy(windows), torch.from_numpy(lengths)).raw.numpy()
    windows[:, -1, [0, 3]] = prediction + rng.normal(size=prediction.shape) * [1e-3, 1.4]
    model = build_onnx(net, manifest)
    exact, _ = onnx_scores(model, manifest, windows, lengths)
    monkeypatch.setattr(export, "onnx_scores", _shift_errors(shift))
    if accepted:
        moved, _ = export.onnx_scores(model, manifest, windows, lengths)
        assert np.max(np.abs(moved - exact) / np.maximum(exact, 1.0)) > 1e-3
        assert export.check_parity(model, net, manifest, windows, lengths) < 2e-6
    else:
        with pytest.raises(ExportError, match=r"forecast errors disagree by (0\.001|nan)"):
            export.check_parity(model, net, manifest, windows, lengths)


@pytest.mark.parametrize("export_mode", ["window", "stateful"])
def test_written_file_round_trips_through_the_loader(export_mode: str, tmp_path) -> None:
    manifest = make_manifest("forecast", export_mode)
    net = make_net(manifest)
    windows = random_events(np.random.default_rng(5), batch=16, steps=WINDOW)
    lengths = np.arange(16, dtype=np.int64) % WINDOW + 1
    path = tmp_path / "model.onnx"
    written = export_model(net, manifest, path, parity_windows=windows, parity_lengths=lengths)

    loaded, data = load_model_file(path)
    assert loaded == written
    assert len(loaded.model_version) == 12
    assert loaded.model_version == written.model_version
    assert loaded.model_version != written.graph_sha256[:12]  # the manifest is part of it
    # The loaded bytes run and score like the network.
    score, contrib = onnx_scores(data, loaded, windows, lengths)
    with torch.no_grad():
        expected = net(torch.from_numpy(windows), torch.from_numpy(lengths))
    np.testing.assert_allclose(score, expected.score.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(contrib, expected.contrib.numpy(), rtol=1e-4, atol=1e-5)


def test_loader_refuses_tampered_manifestless_and_future_files(tmp_path) -> None:
    manifest = make_manifest("classify")
    path = tmp_path / "model.onnx"
    export_model(make_net(manifest), manifest, path)

    tampered = onnx.load(path)
    weight = next(t for t in tampered.graph.initializer if len(t.raw_data) >= 8)
    flipped = bytearray(weight.raw_data)
    flipped[3] ^= 0x40
    weight.raw_data = bytes(flipped)
    onnx.save(tampered, tmp_path / "tampered.onnx")
    with pytest.raises(ModelContractError, match="graph_sha256 mismatch"):
        load_model_file(tmp_path / "tampered.onnx")

    bare = build_onnx(make_net(manifest), manifest)
    onnx.save(bare, tmp_path / "bare.onnx")
    with pytest.raises(ModelContractError, match="no seqsentinel manifest"):
        load_model_file(tmp_path / "bare.onnx")

    future = onnx.load(path)
    prop = next(p for p in future.metadata_props if p.key == METADATA_KEY)
    document = json.loads(prop.value)
    document["schema_version"] = 99
    prop.value = json.dumps(document)
    onnx.save(future, tmp_path / "future.onnx")
    with pytest.raises(ModelContractError, match="schema_version 99 is not supported"):
        load_model_file(tmp_path / "future.onnx")


def test_export_refuses_a_manifest_that_does_not_describe_the_network() -> None:
    net = make_net(make_manifest("classify", layers=2))
    with pytest.raises(ExportError, match="does not match"):
        build_onnx(net, make_manifest("classify", layers=1))


def int8_weights(model: onnx.ModelProto) -> list[np.ndarray]:
    return [
        onnx.numpy_helper.to_array(tensor)
        for tensor in model.graph.initializer
        if tensor.data_type == onnx.TensorProto.INT8
    ]


@pytest.mark.parametrize("task", ["classify", "forecast"])
@pytest.mark.parametrize("export_mode", ["window", "stateful"])
def test_int8_weights_keep_to_seven_bits(task: str, export_mode: str) -> None:
    """Full-range int8 weights overflow the U8S8 kernels of x86 CPUs without VNNI."""
    manifest = make_manifest(task, export_mode)
    windows = random_events(np.random.default_rng(9), batch=16, steps=WINDOW)
    lengths = np.full(16, WINDOW, np.int64)
    net = make_net(manifest)
    quantized, _, _ = quantize_checked(build_onnx(net, manifest), net, manifest, windows, lengths)
    weights = int8_weights(quantized)
    assert len(weights) >= 2 * manifest.network.layers  # W and R of every LSTM layer
    assert min(int(w.min()) for w in weights) >= -64
    assert max(int(w.max()) for w in weights) <= 64
    assert max(int(np.abs(w).max()) for w in weights) == 64  # and the 7 bits are used


def test_int8_model_loads_and_scores_close_to_float(tmp_path) -> None:
    manifest = make_manifest("classify", "stateful")
    net = make_net(manifest)
    model = build_onnx(net, manifest)
    windows = random_events(np.random.default_rng(6), batch=32, steps=WINDOW)
    lengths = np.full(32, WINDOW, np.int64)
    quantized, probed, worst = quantize_checked(model, net, manifest, windows, lengths)
    assert any(node.op_type == "DynamicQuantizeLSTM" for node in quantized.graph.node)
    written = write_model(quantized, probed, tmp_path / "int8.onnx")
    loaded, data = load_model_file(tmp_path / "int8.onnx")
    assert loaded.graph_sha256 == written.graph_sha256
    exact, _ = onnx_scores(model, manifest, windows, lengths)
    approximate, _ = onnx_scores(data, loaded, windows, lengths)
    assert np.max(np.abs(approximate - exact)) < 0.05
    assert 0 < worst < 0.05
    # The probes: the first windows, rounded, with the float graph's scores of them.
    probes = loaded.probes
    assert len(probes.windows) == 8
    np.testing.assert_allclose(probes.arrays(WINDOW)[0], windows[:8], atol=5e-5)
    np.testing.assert_allclose(probes.scores, exact[:8], atol=1e-4)
    assert PROBE_SLACK < probes.tolerance < PROBE_SLACK + 0.05


def _negated(model: onnx.ModelProto) -> onnx.ModelProto:
    """The int8 graph with its int8 weights negated: it runs, and scores wrongly."""
    for tensor in model.graph.initializer:
        if tensor.data_type == onnx.TensorProto.INT8:
            tensor.CopyFrom(
                onnx.numpy_helper.from_array(-onnx.numpy_helper.to_array(tensor), tensor.name)
            )
    return model


@pytest.mark.parametrize("task", ["classify", "forecast"])
def test_int8_export_refuses_a_graph_beyond_tolerance(task: str, monkeypatch) -> None:
    manifest = make_manifest(task, "window")
    net = make_net(manifest)
    model = build_onnx(net, manifest)
    windows = random_events(np.random.default_rng(10), batch=64, steps=WINDOW)
    lengths = np.full(64, WINDOW, np.int64)
    assert quantize_checked(model, net, manifest, windows, lengths)[2] < INT8_TOLERANCE
    genuine = export.quantize_model
    monkeypatch.setattr(export, "quantize_model", lambda model: _negated(genuine(model)))
    compared = "scores" if task == "classify" else "forecast errors"
    with pytest.raises(ExportError, match=f"int8 and torch {compared} disagree by") as caught:
        quantize_checked(model, net, manifest, windows, lengths, "int8.onnx")
    assert str(caught.value).startswith("int8.onnx: ")
    assert float(str(caught.value).split("disagree by ")[1].split()[0]) > INT8_TOLERANCE
