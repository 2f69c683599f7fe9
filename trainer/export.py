"""From a trained `SequenceNet` to one verified, self-describing ONNX file.

The graph is checked against torch on real windows before anything is written: a model
that onnxruntime would score differently from the network that was validated is refused.
"""

from __future__ import annotations

import copy
import io
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import torch
from onnxruntime.quantization import QuantType, quantize_dynamic
from torch import Tensor, nn

from detector.manifest import (
    INPUT_C,
    INPUT_EVENTS,
    INPUT_H,
    INPUT_LENGTHS,
    OUTPUT_C,
    OUTPUT_CONTRIB,
    OUTPUT_H,
    OUTPUT_SCORE,
    Manifest,
    write_model,
)
from trainer.network import SequenceNet

OPSET = 17
#: Largest accepted difference between torch and onnxruntime, relative above magnitude 1: in
#: the score of a classify model, in the prediction errors behind the score of a forecast one.
PARITY_TOLERANCE = 1e-4
#: Windows per onnxruntime call when scoring many windows.
SCORING_BATCH = 4096


class ExportError(ValueError):
    """The graph cannot be written: it disagrees with torch or with the manifest."""


class _WindowGraph(nn.Module):
    def __init__(self, net: SequenceNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor, lengths: Tensor) -> tuple[Tensor, ...]:
        out = self.net(x, lengths)
        return (out.score,) if out.contrib is None else (out.score, out.contrib)


class _StatefulGraph(nn.Module):
    def __init__(self, net: SequenceNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor, h: Tensor, c: Tensor) -> tuple[Tensor, ...]:
        out, h_out, c_out = self.net.step(x, h, c)
        extra = () if out.contrib is None else (out.contrib,)
        return (out.score, h_out, c_out, *extra)


def build_onnx(net: SequenceNet, manifest: Manifest) -> onnx.ModelProto:
    """The graph of `net` in the manifest's export mode, with a dynamic batch axis."""
    _check_shape(net, manifest)
    net = copy.deepcopy(net).cpu().eval()
    width = len(manifest.features)
    forecast = manifest.task == "forecast"
    if manifest.export_mode == "window":
        graph: nn.Module = _WindowGraph(net)
        example: tuple[Tensor, ...] = (
            torch.zeros(2, manifest.window, width),
            torch.tensor([manifest.window, 1], dtype=torch.int64),
        )
        inputs = [INPUT_EVENTS, INPUT_LENGTHS]
        outputs = [OUTPUT_SCORE] + ([OUTPUT_CONTRIB] if forecast else [])
        axes = {INPUT_EVENTS: {0: "batch"}, INPUT_LENGTHS: {0: "batch"}}
    else:
        graph = _StatefulGraph(net)
        h, c = net.zero_state(2)
        example = (torch.zeros(2, width), h, c)
        inputs = [INPUT_EVENTS, INPUT_H, INPUT_C]
        outputs = [OUTPUT_SCORE, OUTPUT_H, OUTPUT_C] + ([OUTPUT_CONTRIB] if forecast else [])
        axes = {INPUT_EVENTS: {0: "batch"}, INPUT_H: {1: "batch"}, INPUT_C: {1: "batch"}}
        axes |= {OUTPUT_H: {1: "batch"}, OUTPUT_C: {1: "batch"}}
    axes |= {OUTPUT_SCORE: {0: "batch"}, OUTPUT_CONTRIB: {0: "batch"}}
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        # The legacy exporter warns about itself and about LSTM tracing; neither applies.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            graph,
            example,
            buffer,
            input_names=inputs,
            output_names=outputs,
            dynamic_axes={name: axis for name, axis in axes.items() if name in inputs + outputs},
            opset_version=OPSET,
            dynamo=False,
        )
    model = onnx.load_from_string(buffer.getvalue())
    onnx.checker.check_model(model)
    return model


def export_model(
    net: SequenceNet,
    manifest: Manifest,
    path: Path,
    *,
    parity_windows: np.ndarray | None = None,
    parity_lengths: np.ndarray | None = None,
) -> Manifest:
    """Export, verify against torch on the given windows, and write atomically.

    Returns the manifest as written (hash stamped). Nothing is written when the check fails.
    """
    model = build_onnx(net, manifest)
    if parity_windows is not None:
        if parity_lengths is None:
            raise ValueError("parity_windows needs parity_lengths")
        check_parity(model, net, manifest, parity_windows, parity_lengths, path)
    return write_model(model, manifest, Path(path))


def check_parity(
    model: onnx.ModelProto,
    net: SequenceNet,
    manifest: Manifest,
    windows: np.ndarray,
    lengths: np.ndarray,
    path: Path | str = "model",
) -> float:
    """Largest difference between onnxruntime and torch; `ExportError` if too big.

    A forecast score divides squared errors by the residual variance, so on a near-constant
    feature float32 rounding of a prediction becomes a large score difference. Forecast graphs
    are therefore compared on the errors behind their scores, |target - prediction| recovered
    from each feature's contribution, and their score is checked to be the mean of those
    contributions.

    A stateful graph is fed each window's events one at a time and compared, at each
    window's last real event, with the torch window form: the contract that both forms
    score alike is checked along with the export itself.
    """
    net = copy.deepcopy(net).cpu().eval()
    with torch.no_grad():
        expected = net(torch.from_numpy(windows), torch.from_numpy(lengths))
    got_score, got_contrib = onnx_scores(model, manifest, windows, lengths)
    if expected.contrib is None or got_contrib is None:
        compared = "scores"
        worst = _relative_difference(got_score, expected.score.numpy())
    else:
        compared = "forecast errors"
        variance = net.residual_variance.numpy()
        got_errors = np.sqrt(got_contrib * variance)
        want_errors = np.sqrt(expected.contrib.numpy() * variance)
        worst = float(  # np.max, unlike max, keeps a NaN
            np.max(
                [
                    _relative_difference(got_errors, want_errors),
                    _relative_difference(got_score, got_contrib.mean(axis=1)),
                ]
            )
        )
    if not worst <= PARITY_TOLERANCE:  # also refuses NaN
        raise ExportError(
            f"{path}: onnxruntime and torch {compared} disagree by {worst:.3g} (tolerance "
            f"{PARITY_TOLERANCE:g}) on {len(windows)} windows; the model was not written"
        )
    return worst


def _relative_difference(got: np.ndarray, want: np.ndarray) -> float:
    """Largest |got - want|, relative where |want| is above 1; NaN if either holds one."""
    scale = np.maximum(np.abs(want), 1.0)
    return float(np.max(np.abs(got - want) / scale, initial=0.0))


def onnx_scores(
    model: onnx.ModelProto | bytes,
    manifest: Manifest,
    windows: np.ndarray,
    lengths: np.ndarray,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Scores [N] (and contrib [N, n_forecast] for forecast) of windows through onnxruntime.

    Works for either export mode; a stateful graph is stepped through each window.
    """
    data = model if isinstance(model, bytes) else model.SerializeToString()
    session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
    windows = np.ascontiguousarray(windows, dtype=np.float32)
    lengths = np.asarray(lengths, dtype=np.int64)
    run = _run_window if manifest.export_mode == "window" else _run_stateful
    chunks = [
        run(
            session,
            manifest,
            windows[start : start + SCORING_BATCH],
            lengths[start : start + SCORING_BATCH],
        )
        for start in range(0, len(windows), SCORING_BATCH)
    ]
    score = np.concatenate([chunk[0] for chunk in chunks]) if chunks else np.zeros(0, np.float32)
    if manifest.task != "forecast":
        return score, None
    contrib = (
        np.concatenate([chunk[1] for chunk in chunks])
        if chunks
        else np.zeros((0, len(manifest.forecast_features)), np.float32)
    )
    return score, contrib


def _run_window(
    session: onnxruntime.InferenceSession,
    manifest: Manifest,
    windows: np.ndarray,
    lengths: np.ndarray,
) -> list[np.ndarray]:
    return session.run(None, {INPUT_EVENTS: windows, INPUT_LENGTHS: lengths})


def _run_stateful(
    session: onnxruntime.InferenceSession,
    manifest: Manifest,
    windows: np.ndarray,
    lengths: np.ndarray,
) -> list[np.ndarray]:
    batch = len(windows)
    state = np.zeros((manifest.network.layers, batch, manifest.network.hidden), np.float32)
    h, c = state, state.copy()
    names = [output.name for output in session.get_outputs()]
    kept: list[np.ndarray] = []
    for step in range(int(lengths.max(initial=0))):
        values = dict(
            zip(
                names,
                session.run(None, {INPUT_EVENTS: windows[:, step], INPUT_H: h, INPUT_C: c}),
                strict=True,
            )
        )
        h, c = values[OUTPUT_H], values[OUTPUT_C]
        outputs = [values[OUTPUT_SCORE]] + (
            [values[OUTPUT_CONTRIB]] if OUTPUT_CONTRIB in values else []
        )
        if not kept:
            kept = [np.zeros_like(output) for output in outputs]
        last = lengths - 1 == step
        for store, output in zip(kept, outputs, strict=True):
            store[last] = output[last]
    return kept or [np.zeros(batch, np.float32)]


def quantize_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """Dynamic int8 quantisation of the weights (LSTM and MatMul), activations stay float."""
    with tempfile.TemporaryDirectory() as folder:
        source, target = Path(folder, "float.onnx"), Path(folder, "int8.onnx")
        onnx.save(model, source)
        quantize_dynamic(source, target, weight_type=QuantType.QInt8)
        quantized = onnx.load(target)
    del quantized.metadata_props[:]
    return quantized


def _check_shape(net: SequenceNet, manifest: Manifest) -> None:
    spec = manifest.network
    built = (net.task, net.layers, net.hidden, net.bidirectional)
    promised = (manifest.task, spec.layers, spec.hidden, spec.bidirectional)
    if built != promised:
        raise ExportError(
            f"the network (task, layers, hidden, bidirectional) = {built} does not match "
            f"the manifest's {promised}"
        )
