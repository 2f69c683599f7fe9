"""The model file: one ONNX graph whose metadata carries the manifest (`manifest`).

The trainer writes it with `write_model`; the detector reads it with `load_model_file`. The
graph's sha256 is part of the manifest and checked at load, so a tampered graph is refused;
the graph's inputs and outputs are checked against what the manifest implies.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from pydantic import ValidationError

from detector.contract.manifest import SCHEMA_VERSION, Manifest, input_width

METADATA_KEY = "seqsentinel.manifest"
#: A model file larger than this is refused before it is parsed.
MAX_MODEL_BYTES = 512 * 1024 * 1024

# Graph input and output names, shared by the exporter and the scorer.
INPUT_EVENTS = "x"  # window: [batch, window, inputs]; stateful: [batch, inputs]
INPUT_LENGTHS = "lengths"  # window only: [batch] int64, real steps at the front of each window
INPUT_H = "h"  # stateful only: [layers, batch, hidden]
INPUT_C = "c"
OUTPUT_SCORE = "score"  # [batch]
OUTPUT_CONTRIB = "contrib"  # forecast only: [batch, forecast features], squared scaled errors
OUTPUT_H = "h_out"
OUTPUT_C = "c_out"


class ModelContractError(ValueError):
    """A model file that the detector must not run; the message says what is wrong and where."""

    def __init__(self, path: Path | str, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = str(path)


def file_sha256(path: Path) -> str:
    """The sha256 of a whole file, read a MiB at a time (the model allow-list, promotion)."""
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def relative_difference(got: np.ndarray, want: np.ndarray) -> float:
    """Largest |got - want|, relative where |want| is above 1; NaN if either holds one."""
    scale = np.maximum(np.abs(want), 1.0)
    return float(np.max(np.abs(got - want) / scale, initial=0.0))


def has_int8_weights(model: onnx.ModelProto) -> bool:
    """Whether the graph holds quantised (8-bit integer) weights."""
    int8 = (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)
    return any(tensor.data_type in int8 for tensor in model.graph.initializer)


def graph_sha256(model: onnx.ModelProto) -> str:
    """Hash of the graph alone: metadata (where the manifest lives) does not change it."""
    return hashlib.sha256(model.graph.SerializeToString(deterministic=True)).hexdigest()


def attach_manifest(model: onnx.ModelProto, manifest: Manifest) -> Manifest:
    """Stamp the graph's hash into the manifest and store it in the model's metadata."""
    stamped = manifest.model_copy(update={"graph_sha256": graph_sha256(model)})
    stamped = Manifest.model_validate_json(stamped.to_json())
    kept = [prop for prop in model.metadata_props if prop.key != METADATA_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    model.metadata_props.add(key=METADATA_KEY, value=stamped.to_json())
    return stamped


def write_model(model: onnx.ModelProto, manifest: Manifest, path: Path) -> Manifest:
    """Write the model with its manifest atomically (`write_atomically`)."""
    stamped = attach_manifest(model, manifest)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, model.SerializeToString())
    return stamped


def write_atomically(path: Path, data: bytes, mode: int | None = None) -> None:
    """Replace `path` with `data`: write beside it, fsync, rename, fsync the folder, so that a
    reader (the daemon's model watch) sees the old file or the new one, never a torn one, and
    a crash right after leaves the new one.

    `mode` keeps the permissions of the file replaced, so readers that could read it still can.
    """
    partial = path.with_name(f".{path.name}.partial")
    try:
        with partial.open("wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        if mode is not None:
            partial.chmod(mode)
        partial.replace(path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def _fsync_directory(folder: Path) -> None:
    """Make a rename durable: the folder's entry is what changed."""
    descriptor = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def load_model_file(path: Path | str) -> tuple[Manifest, bytes]:
    """Read and verify a model file: its manifest, its hash, and its graph's inputs and outputs.

    Returns the manifest and the serialized model, ready for an onnxruntime session.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as error:
        raise ModelContractError(path, f"cannot read the model file ({error.strerror})") from None
    if not path.is_file():
        raise ModelContractError(path, "not a regular file")
    if size > MAX_MODEL_BYTES:
        raise ModelContractError(path, f"{size} bytes is larger than {MAX_MODEL_BYTES} allowed")
    with path.open("rb") as file:  # bounded: the file may have grown since stat()
        data = file.read(MAX_MODEL_BYTES + 1)
    if len(data) > MAX_MODEL_BYTES:
        raise ModelContractError(path, f"larger than {MAX_MODEL_BYTES} bytes allowed")
    try:
        model = onnx.load_from_string(data)
    except Exception as error:  # protobuf raises several unrelated types
        raise ModelContractError(path, f"not an ONNX model ({type(error).__name__})") from None
    manifest = parse_manifest(path, model)
    actual = graph_sha256(model)
    if actual != manifest.graph_sha256:
        raise ModelContractError(
            path,
            f"graph_sha256 mismatch: manifest says {manifest.graph_sha256[:16]}…, "
            f"graph hashes to {actual[:16]}… (the file was modified after export)",
        )
    check_graph_signature(path, model, manifest)
    if manifest.probes is None and has_int8_weights(model):
        raise ModelContractError(
            path,
            "int8 graph without probes: whether this CPU's int8 kernels score it like the "
            "float graph cannot be checked; export it again with this trainer",
        )
    return manifest, data


def parse_manifest(path: Path | str, model: onnx.ModelProto) -> Manifest:
    """The manifest stored in `model`'s metadata, validated, or a `ModelContractError`."""
    raw = next((p.value for p in model.metadata_props if p.key == METADATA_KEY), None)
    if raw is None:
        raise ModelContractError(path, f"no seqsentinel manifest (metadata key {METADATA_KEY!r})")
    try:
        document = json.loads(raw)
    except ValueError:
        raise ModelContractError(path, "the manifest is not valid JSON") from None
    if not isinstance(document, dict):
        raise ModelContractError(path, "the manifest is not a JSON object")
    version = document.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ModelContractError(
            path,
            f"manifest schema_version {version!r} is not supported "
            f"(this detector reads version {SCHEMA_VERSION})",
        )
    _drop_retired(path, document)
    try:
        return Manifest.model_validate(document)
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in item['loc']) or 'manifest'}: {item['msg']}"
            for item in error.errors()
        )
        raise ModelContractError(path, f"invalid manifest: {problems}") from None


def _drop_retired(path: Path | str, document: dict[str, Any]) -> None:
    """Remove what earlier trainers wrote of a retired setting where it changed nothing, and
    refuse a model whose scoring depended on it: an adaptive threshold's `young_prune`, whose
    work `warm_up_floor` does."""
    scoring = document.get("scoring")
    adaptive = scoring.get("adaptive") if isinstance(scoring, dict) else None
    if not isinstance(adaptive, dict) or "young_prune" not in adaptive:
        return
    if adaptive["young_prune"] is not None:
        raise ModelContractError(
            path,
            "scoring.adaptive.young_prune is retired (warm_up_floor does its work): "
            "train the model again",
        )
    del adaptive["young_prune"]


def expected_signature(manifest: Manifest) -> tuple[dict[str, list], dict[str, list]]:
    """The graph's inputs and outputs as name -> shape (None for a dynamic dimension)."""
    width = input_width(manifest)
    layers = manifest.network.layers
    hidden = manifest.network.hidden
    if manifest.export_mode == "window":
        inputs = {INPUT_EVENTS: [None, manifest.window, width], INPUT_LENGTHS: [None]}
        outputs = {OUTPUT_SCORE: [None]}
    else:
        inputs = {
            INPUT_EVENTS: [None, width],
            INPUT_H: [layers, None, hidden],
            INPUT_C: [layers, None, hidden],
        }
        outputs = {
            OUTPUT_SCORE: [None],
            OUTPUT_H: [layers, None, hidden],
            OUTPUT_C: [layers, None, hidden],
        }
    if manifest.task == "forecast":
        outputs[OUTPUT_CONTRIB] = [None, len(manifest.forecast_features)]
    return inputs, outputs


def check_graph_signature(path: Path | str, model: onnx.ModelProto, manifest: Manifest) -> None:
    """Refuse a graph whose inputs or outputs do not match what the manifest promises."""
    expected_inputs, expected_outputs = expected_signature(manifest)
    for kind, values, expected in (
        ("input", model.graph.input, expected_inputs),
        ("output", model.graph.output, expected_outputs),
    ):
        actual = {value.name: _static_shape(value) for value in values}
        types = {value.name: value.type.tensor_type.elem_type for value in values}
        if set(actual) != set(expected):
            raise ModelContractError(
                path,
                f"graph {kind}s {sorted(actual)} do not match the manifest's {sorted(expected)}",
            )
        for name, shape in expected.items():
            if len(actual[name]) != len(shape) or any(
                want is not None and have is not None and want != have
                for want, have in zip(shape, actual[name], strict=True)
            ):
                raise ModelContractError(
                    path,
                    f"graph {kind} {name!r} has shape {actual[name]}, the manifest implies {shape}",
                )
            # The detector feeds float32 (int64 lengths): another type fails only at run time.
            want = onnx.TensorProto.INT64 if name == INPUT_LENGTHS else onnx.TensorProto.FLOAT
            if types[name] != want:
                have, need = (onnx.TensorProto.DataType.Name(t) for t in (types[name], want))
                raise ModelContractError(
                    path, f"graph {kind} {name!r} has element type {have}; the contract: {need}"
                )


def _static_shape(value: onnx.ValueInfoProto) -> list[int | None]:
    dims = value.type.tensor_type.shape.dim
    return [dim.dim_value if dim.HasField("dim_value") else None for dim in dims]
