"""Model files for the fast tier, built with `onnx.helper`: the runtime's tests without torch.

Each fixture is a tiny one-layer LSTM with seeded random weights, written with its manifest
by `detector.contract.model_file.write_model`, so it passes every check the detector makes at
load. It honours the model contract (`detector.contract.model_file.expected_signature`) in
both export modes:

- forecast: the LSTM reads a key's events before the last one, a linear head predicts the
  forecast features of the last one, and the graph returns their squared errors divided by
  a residual variance (`contrib`) and the mean of those (`score`);
- classify: the LSTM reads every event, and the score is a sigmoid of a linear head.

The window graph and the stateful graph of one seed compute the same function, as the
exporter guarantees for trained models. `reference_scores` computes it in numpy, so a test
can check that the engine feeds the graph exactly the windows the contract describes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from detector.contract import model_file as contract
from detector.contract.manifest import (
    Columns,
    ExportMode,
    Manifest,
    Network,
    NumericFeature,
    Scoring,
    Task,
    TimeDeltaFeature,
    TrainingSummary,
)
from detector.contract.model_file import write_model

KEY, TIME = "device", "time"
#: The opset of the fixtures' graphs: ReduceMean still takes its axes as an attribute.
OPSET = 17
BATCH = "batch"


def sensor_manifest(
    task: Task = "forecast", export_mode: ExportMode = "window", **changes: Any
) -> Manifest:
    """A manifest over two z-scored sensors and the time since the key's previous event, with
    a window of 5 and 4 hidden units; `changes` replace any of its fields."""
    fields: dict[str, Any] = {
        "task": task,
        "export_mode": export_mode,
        "columns": Columns(key=KEY, time=TIME),
        "features": [
            NumericFeature(name="temperature", mean=20.0, std=5.0),
            NumericFeature(name="pressure", mean=1.0, std=0.25, missing="mean"),
            TimeDeltaFeature(mean=0.7, std=0.3),
        ],
        "window": 5,
        "min_history": 2 if task == "forecast" else 1,
        "network": Network(hidden=4, layers=1),
        "scoring": Scoring(
            semantics="forecast_error" if task == "forecast" else "probability",
            threshold=2.0,
            calibration="fixed",
        ),
        "training": TrainingSummary(rows=0, keys=0),
        "trainer_version": "onnx-fixture",
    }
    return Manifest(**(fields | changes))


class Weights:
    """The seeded parameters of one fixture; both export modes of a seed share them."""

    def __init__(self, manifest: Manifest, seed: int) -> None:
        if manifest.network.layers != 1 or manifest.network.bidirectional:
            raise ValueError("the fixtures are one-layer unidirectional LSTMs")
        rng = np.random.default_rng(seed)
        width, hidden = len(manifest.features), manifest.network.hidden
        outputs = len(manifest.forecast_features) if manifest.task == "forecast" else 1

        def normal(*shape: int) -> np.ndarray:
            return (rng.standard_normal(shape) * 0.5).astype(np.float32)

        self.hidden = hidden
        self.w, self.r = normal(1, 4 * hidden, width), normal(1, 4 * hidden, hidden)
        self.b = normal(1, 8 * hidden)
        self.head, self.head_bias = normal(hidden, outputs), normal(outputs)
        # Columns of the forecast features in the graph's input, and their residual variance.
        forecast = {feature.name for feature in manifest.forecast_features}
        columns = [i for i, f in enumerate(manifest.features) if f.name in forecast]
        self.select = np.eye(width, dtype=np.float32)[:, columns]
        self.inverse_variance = (1.0 / (rng.random(len(columns)) + 0.5)).astype(np.float32)


def build_graph(manifest: Manifest, seed: int = 0) -> onnx.ModelProto:
    """The ONNX graph of `manifest`'s task and export mode, with seeded random weights."""
    weights = Weights(manifest, seed)
    graph = _window_graph if manifest.export_mode == "window" else _stateful_graph
    nodes, inputs, outputs, constants = graph(manifest, weights)
    initializers = [numpy_helper.from_array(np.asarray(v), name) for name, v in constants.items()]
    model = helper.make_model(
        helper.make_graph(nodes, "seqsentinel_fixture", inputs, outputs, initializers),
        opset_imports=[helper.make_opsetid("", OPSET)],
    )
    onnx.checker.check_model(model, full_check=True)
    return model


def write_fixture(path: Path, manifest: Manifest, seed: int = 0) -> Path:
    """Write the fixture for `manifest` to `path`, manifest attached; returns the path."""
    write_model(build_graph(manifest, seed), manifest, path)
    return path


def reference_scores(
    manifest: Manifest, x: np.ndarray, lengths: np.ndarray, seed: int = 0
) -> tuple[np.ndarray, np.ndarray | None]:
    """Numpy scores (and contributions, for forecast) of encoded windows x [n, window, width]
    with `lengths` real events each: what the fixture's graphs return for them."""
    weights = Weights(manifest, seed)
    h = np.zeros((len(x), weights.hidden), np.float32)
    c = np.zeros_like(h)
    forecast = manifest.task == "forecast"
    rows = np.arange(len(x))
    read = lengths - 1 if forecast else lengths
    state = h.copy()
    for step in range(x.shape[1]):
        h, c = _lstm_step(weights, x[:, step], h, c)
        done = read == step + 1
        state[done] = h[done]
    if not forecast:
        return _sigmoid(state @ weights.head + weights.head_bias)[:, 0], None
    target = x[rows, lengths - 1] @ weights.select
    contrib = (state @ weights.head + weights.head_bias - target) ** 2 * weights.inverse_variance
    return contrib.mean(axis=1), contrib


def _lstm_step(
    weights: Weights, x: np.ndarray, h: np.ndarray, c: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """ONNX's LSTM cell (gates in i, o, f, c order, no peepholes)."""
    n = weights.hidden
    gates = x @ weights.w[0].T + h @ weights.r[0].T + weights.b[0, : 4 * n] + weights.b[0, 4 * n :]
    i, o, f = (_sigmoid(gates[:, k * n : (k + 1) * n]) for k in range(3))
    c = f * c + i * np.tanh(gates[:, 3 * n :])
    return o * np.tanh(c), c


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


Graph = tuple[list[onnx.NodeProto], list[onnx.ValueInfoProto], list[onnx.ValueInfoProto], dict]


def _window_graph(manifest: Manifest, weights: Weights) -> Graph:
    """x [batch, window, width] and lengths [batch] in; the score (and contrib) out."""
    width, window, forecast = len(manifest.features), manifest.window, manifest.task == "forecast"
    inputs = [
        helper.make_tensor_value_info(
            contract.INPUT_EVENTS, TensorProto.FLOAT, [BATCH, window, width]
        ),
        helper.make_tensor_value_info(contract.INPUT_LENGTHS, TensorProto.INT64, [BATCH]),
    ]
    constants = _lstm_constants(weights) | {
        "one": np.array([1], np.int64),
        "axis0": np.array([0], np.int64),
        "axis1": np.array([1], np.int64),
        "axis2": np.array([2], np.int64),
        "positions": np.arange(window, dtype=np.int64)[None, :],
    }
    # A forecast LSTM reads the events before the last one; a classifier reads them all.
    read = "lengths_before_last" if forecast else contract.INPUT_LENGTHS
    nodes = [
        helper.make_node("Sub", [contract.INPUT_LENGTHS, "one"], ["lengths_before_last"]),
        helper.make_node("Cast", [read], ["sequence_lens"], to=TensorProto.INT32),
        helper.make_node("Transpose", [contract.INPUT_EVENTS], ["time_major"], perm=[1, 0, 2]),
        helper.make_node(
            "LSTM",
            ["time_major", "W", "R", "B", "sequence_lens"],
            ["", "h_last", ""],
            hidden_size=weights.hidden,
        ),
        helper.make_node("Squeeze", ["h_last", "axis0"], ["state"]),
    ]
    if forecast:
        # The last real event of each window: a one-hot mask over the window's positions.
        nodes += [
            helper.make_node("Unsqueeze", ["lengths_before_last", "axis1"], ["last_column"]),
            helper.make_node("Equal", ["positions", "last_column"], ["is_last"]),
            helper.make_node("Cast", ["is_last"], ["last_mask"], to=TensorProto.FLOAT),
            helper.make_node("Unsqueeze", ["last_mask", "axis2"], ["last_mask_3d"]),
            helper.make_node("Mul", [contract.INPUT_EVENTS, "last_mask_3d"], ["masked"]),
            helper.make_node("ReduceSum", ["masked", "axis1"], ["event"], keepdims=0),
        ]
    head_nodes, outputs, head_constants = _head(manifest, weights, "state", "event")
    return nodes + head_nodes, inputs, outputs, constants | head_constants


def _stateful_graph(manifest: Manifest, weights: Weights) -> Graph:
    """x [batch, width], h and c [1, batch, hidden] in; the score (and contrib), h and c out."""
    width, hidden = len(manifest.features), weights.hidden
    state = [1, BATCH, hidden]
    inputs = [
        helper.make_tensor_value_info(contract.INPUT_EVENTS, TensorProto.FLOAT, [BATCH, width]),
        helper.make_tensor_value_info(contract.INPUT_H, TensorProto.FLOAT, state),
        helper.make_tensor_value_info(contract.INPUT_C, TensorProto.FLOAT, state),
    ]
    constants = _lstm_constants(weights) | {"axis0": np.array([0], np.int64)}
    nodes = [
        helper.make_node("Unsqueeze", [contract.INPUT_EVENTS, "axis0"], ["one_step"]),
        helper.make_node(
            "LSTM",
            ["one_step", "W", "R", "B", "", contract.INPUT_H, contract.INPUT_C],
            ["", contract.OUTPUT_H, contract.OUTPUT_C],
            hidden_size=hidden,
        ),
    ]
    # A forecast predicts this event from the state before it; a classifier scores after it.
    read = contract.INPUT_H if manifest.task == "forecast" else contract.OUTPUT_H
    nodes.append(helper.make_node("Squeeze", [read, "axis0"], ["state"]))
    head_nodes, outputs, head_constants = _head(manifest, weights, "state", contract.INPUT_EVENTS)
    outputs += [
        helper.make_tensor_value_info(contract.OUTPUT_H, TensorProto.FLOAT, state),
        helper.make_tensor_value_info(contract.OUTPUT_C, TensorProto.FLOAT, state),
    ]
    return nodes + head_nodes, inputs, outputs, constants | head_constants


def _lstm_constants(weights: Weights) -> dict[str, np.ndarray]:
    return {"W": weights.w, "R": weights.r, "B": weights.b}


def _head(manifest: Manifest, weights: Weights, state: str, event: str) -> Graph:
    """From the LSTM's state [batch, hidden] (and the event forecast, [batch, width])."""
    constants = {"head": weights.head, "head_bias": weights.head_bias}
    nodes = [
        helper.make_node("MatMul", [state, "head"], ["projected"]),
        helper.make_node("Add", ["projected", "head_bias"], ["prediction"]),
    ]
    if manifest.task == "classify":
        constants["flatten"] = np.array([-1], np.int64)
        nodes += [
            helper.make_node("Reshape", ["prediction", "flatten"], ["logit"]),
            helper.make_node("Sigmoid", ["logit"], [contract.OUTPUT_SCORE]),
        ]
        return nodes, [_score()], constants
    constants |= {"select": weights.select, "inverse_variance": weights.inverse_variance}
    nodes += [
        helper.make_node("MatMul", [event, "select"], ["target"]),
        helper.make_node("Sub", ["prediction", "target"], ["error"]),
        helper.make_node("Mul", ["error", "error"], ["squared"]),
        helper.make_node("Mul", ["squared", "inverse_variance"], [contract.OUTPUT_CONTRIB]),
        helper.make_node(
            "ReduceMean", [contract.OUTPUT_CONTRIB], [contract.OUTPUT_SCORE], axes=[1], keepdims=0
        ),
    ]
    contrib = helper.make_tensor_value_info(
        contract.OUTPUT_CONTRIB, TensorProto.FLOAT, [BATCH, len(manifest.forecast_features)]
    )
    return nodes, [_score(), contrib], constants


def _score() -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(contract.OUTPUT_SCORE, TensorProto.FLOAT, [BATCH])
