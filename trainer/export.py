"""From a trained `SequenceNet` to one verified, self-describing ONNX file.

The graph is checked against torch on real windows before anything is written: a model
that onnxruntime would score differently from the network that was validated is refused.
An int8 graph is checked the same way, within a wider tolerance, and carries probes that
the detector checks it against on the CPU it runs on.
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

from detector.contract.manifest import Manifest, Probes
from detector.contract.model_file import (
    INPUT_C,
    INPUT_EVENTS,
    INPUT_H,
    INPUT_LENGTHS,
    OUTPUT_C,
    OUTPUT_CONTRIB,
    OUTPUT_H,
    OUTPUT_SCORE,
    relative_difference,
    write_model,
)
from detector.engine.scorer import CPU, Scorer
from trainer.network import SequenceNet

OPSET = 17
#: Largest accepted difference between torch and onnxruntime, relative above magnitude 1: in
#: the score of a classify model, in the prediction errors behind the score of a forecast one.
PARITY_TOLERANCE = 1e-4
#: The same for an int8 graph against torch. 7-bit weights moved the scores of small random
#: classify networks by up to 0.035 and the errors of random forecast ones by up to 0.125
#: (of a trained one: 0.015); saturating int8 kernels moved classify scores by 0.19.
INT8_TOLERANCE = 0.15
#: Windows stored with an int8 model to check it at load.
PROBES = 8
#: Their values are rounded to this many decimals: short in the manifest's JSON, and read
#: back as the very float32 inputs that their expected scores were computed from.
PROBE_DECIMALS = 4
#: Added to an int8 graph's own difference from the float graph on the probes at export to
#: give the tolerance of the check at load: another CPU's correct kernels differ from the
#: exporting one's by summation order alone, far below this.
PROBE_SLACK = 0.01
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
    *,
    tolerance: float = PARITY_TOLERANCE,
    graph: str = "onnxruntime",
) -> float:
    """Largest difference between the `graph` run by onnxruntime and torch; `ExportError` if
    above `tolerance`.

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
        worst = relative_difference(got_score, expected.score.numpy())
    else:
        compared = "forecast errors"
        variance = net.residual_variance.numpy()
        got_errors = np.sqrt(got_contrib * variance)
        want_errors = np.sqrt(expected.contrib.numpy() * variance)
        worst = float(  # np.max, unlike max, keeps a NaN
            np.max(
                [
                    relative_difference(got_errors, want_errors),
                    relative_difference(got_score, got_contrib.mean(axis=1)),
                ]
            )
        )
    if not worst <= tolerance:  # also refuses NaN
        raise ExportError(
            f"{path}: {graph} and torch {compared} disagree by {worst:.3g} (tolerance "
            f"{tolerance:g}) on {len(windows)} windows; the model was not written"
        )
    return worst


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
    scorer = Scorer(manifest, onnxruntime.InferenceSession(data, providers=[CPU]))
    windows = np.asarray(windows, dtype=np.float32)
    lengths = np.asarray(lengths, dtype=np.int64)
    chunks = [
        scorer.score_sequences(
            windows[start : start + SCORING_BATCH], lengths[start : start + SCORING_BATCH]
        )
        for start in range(0, max(len(windows), 1), SCORING_BATCH)
    ]
    score = np.concatenate([chunk.score for chunk in chunks])
    if manifest.task != "forecast":
        return score, None
    return score, np.concatenate([chunk.contrib for chunk in chunks])


def quantize_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """Dynamic int8 quantisation of the weights (LSTM and MatMul), activations stay float.

    Weights use 7 bits (`reduce_range`): on x86 without VNNI onnxruntime's U8S8 kernels add
    pairs of uint8 x int8 products in int16, which full-range weights overflow.
    """
    with tempfile.TemporaryDirectory() as folder:
        source, target = Path(folder, "float.onnx"), Path(folder, "int8.onnx")
        onnx.save(model, source)
        quantize_dynamic(source, target, weight_type=QuantType.QInt8, reduce_range=True)
        quantized = onnx.load(target)
    del quantized.metadata_props[:]
    return quantized


def quantize_checked(
    model: onnx.ModelProto,
    net: SequenceNet,
    manifest: Manifest,
    windows: np.ndarray,
    lengths: np.ndarray,
    path: Path | str = "model",
) -> tuple[onnx.ModelProto, Manifest, float]:
    """The int8 graph of the float `model`, checked against torch on the windows, and the
    manifest with probes from the first of them; also the largest difference found.

    `ExportError` when the int8 graph is beyond `INT8_TOLERANCE`.
    """
    quantized = quantize_model(model)
    worst = check_parity(
        quantized, net, manifest, windows, lengths, path, tolerance=INT8_TOLERANCE, graph="int8"
    )
    rounded = np.round(np.asarray(windows[:PROBES], np.float64), PROBE_DECIMALS)
    probe_lengths = lengths[:PROBES]
    want, _ = onnx_scores(model, manifest, rounded, probe_lengths)
    got, _ = onnx_scores(quantized, manifest, rounded, probe_lengths)
    probes = Probes(
        windows=[
            events[:length].tolist() for events, length in zip(rounded, probe_lengths, strict=True)
        ],
        scores=want.tolist(),
        tolerance=relative_difference(got, want) + PROBE_SLACK,
    )
    return quantized, manifest.model_copy(update={"probes": probes}), worst


def _check_shape(net: SequenceNet, manifest: Manifest) -> None:
    spec = manifest.network
    built = (net.task, net.layers, net.hidden, net.bidirectional)
    promised = (manifest.task, spec.layers, spec.hidden, spec.bidirectional)
    if built != promised:
        raise ExportError(
            f"the network (task, layers, hidden, bidirectional) = {built} does not match "
            f"the manifest's {promised}"
        )
