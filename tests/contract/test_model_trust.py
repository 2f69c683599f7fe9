"""Model files are a trust boundary: anything but a model that keeps the contract is refused
at load with a message naming the file and the problem, never an onnxruntime crash later."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from daemon_support import DaemonProcess, running, train_model
from model_factory import export_random, make_manifest

from detector.contract.model_file import (
    MAX_MODEL_BYTES,
    METADATA_KEY,
    ModelContractError,
    attach_manifest,
    load_model_file,
    parse_manifest,
)
from detector.engine.scorer import Scorer
from trainer.export import INT8_TOLERANCE


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("trust") / "good.onnx"
    return export_random(path, make_manifest("forecast", "window", window=5))


def refused(path: Path | str, match: str) -> None:
    with pytest.raises(ModelContractError, match=match) as caught:
        Scorer.load(path, providers=["CPUExecutionProvider"])
    assert str(path) in str(caught.value)


def test_the_good_model_loads(good: Path) -> None:
    assert Scorer.load(good, providers=["CPUExecutionProvider"]).manifest.window == 5


def test_paths_to_something_other_than_a_model_file_are_refused(good: Path, tmp_path: Path) -> None:
    (tmp_path / "folder").mkdir()
    refused(tmp_path / "folder", "not a regular file")
    refused("/dev/zero", "not a regular file")
    os.mkfifo(tmp_path / "fifo")
    refused(tmp_path / "fifo", "not a regular file")  # and not a blocked read
    refused(tmp_path / "missing.onnx", r"cannot read the model file \(No such file")
    huge = tmp_path / "huge.onnx"
    with huge.open("wb") as file:
        file.truncate(MAX_MODEL_BYTES + 1)  # sparse: no disk used
    refused(huge, f"larger than {MAX_MODEL_BYTES}")
    (tmp_path / "to-passwd").symlink_to("/etc/passwd")
    refused(tmp_path / "to-passwd", "not an ONNX model")
    (tmp_path / "to-folder").symlink_to(tmp_path / "folder")
    refused(tmp_path / "to-folder", "not a regular file")
    (tmp_path / "empty.onnx").write_bytes(b"")
    refused(tmp_path / "empty.onnx", "no seqsentinel manifest")
    (tmp_path / "to-good").symlink_to(good)  # a link to a real model is fine
    assert load_model_file(tmp_path / "to-good")[0].window == 5


def with_manifest(good: Path, path: Path, **changes: object) -> Path:
    """The good graph with its manifest document changed, the hash kept."""
    model = onnx.load(good)
    prop = next(p for p in model.metadata_props if p.key == METADATA_KEY)
    prop.value = json.dumps(json.loads(prop.value) | changes)
    onnx.save(model, path)
    return path


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"window": 10**9}, "window: Input should be less than or equal to 4096"),
        ({"min_history": 10**9}, "min_history: Input should be less than or equal to 4096"),
        ({"network": {"hidden": 10**9, "layers": 1}}, "network.hidden"),
        ({"features": []}, "features: List should have at least 1 item"),
        ({"schema_version": 99}, "schema_version 99 is not supported"),
        ({"graph_sha256": "0" * 64}, "graph_sha256 mismatch"),
    ],
)
def test_absurd_or_inconsistent_manifests_are_refused(
    good: Path, tmp_path: Path, changes: dict, match: str
) -> None:
    refused(with_manifest(good, tmp_path / "absurd.onnx", **changes), match)


def test_a_retired_setting_is_dropped_where_unset_and_refused_where_set(
    good: Path, tmp_path: Path
) -> None:
    """Earlier trainers wrote `young_prune` into every adaptive manifest, mostly unset."""
    document = json.loads(
        next(p.value for p in onnx.load(good).metadata_props if p.key == METADATA_KEY)
    )
    adaptive = {"history": 40, "refresh": 8, "prune": 0.13, "floor": "calibrated", "warm_up": 20}
    scoring = document["scoring"] | {"adaptive": adaptive | {"young_prune": None}}
    loaded = load_model_file(with_manifest(good, tmp_path / "unset.onnx", scoring=scoring))[0]
    assert loaded.scoring.adaptive is not None and loaded.scoring.adaptive.warm_up == 20
    scoring["adaptive"]["young_prune"] = 1.0
    refused(
        with_manifest(good, tmp_path / "set.onnx", scoring=scoring),
        "scoring.adaptive.young_prune is retired .*train the model again",
    )


def restamped(good: Path, path: Path, edit, **manifest_changes: object) -> Path:
    """The good model with its graph edited by `edit` and the manifest stamped again, as a
    careless or hostile exporter would write it: the hash matches, the contract does not."""
    model = onnx.load(good)
    manifest = parse_manifest(good, model).model_copy(update=manifest_changes)
    edit(model.graph)
    attach_manifest(model, manifest)
    onnx.save(model, path)
    return path


def _rename_lengths(graph: onnx.GraphProto) -> None:
    graph.input[1].name = "sizes"


def _int32_lengths(graph: onnx.GraphProto) -> None:
    graph.input[1].type.tensor_type.elem_type = onnx.TensorProto.INT32


def _unchanged(graph: onnx.GraphProto) -> None:
    return None


@pytest.mark.parametrize(
    ("edit", "changes", "match"),
    [
        (_unchanged, {"window": 6}, r"graph input 'x' has shape \[None, 5, 4\], .* \[None, 6, 4\]"),
        (_unchanged, {"task": "classify"}, "graph outputs .* do not match"),
        (_unchanged, {"export_mode": "stateful"}, "graph inputs .* do not match"),
        (_rename_lengths, {}, r"graph inputs \['sizes', 'x'\]"),
        (_int32_lengths, {}, "'lengths' has element type INT32; the contract: INT64"),
    ],
)
def test_graphs_whose_inputs_do_not_match_the_manifest_are_refused(
    good: Path, tmp_path: Path, edit, changes: dict, match: str
) -> None:
    refused(restamped(good, tmp_path / "mismatch.onnx", edit, **changes), match)


def test_the_daemon_refuses_to_start_on_a_refused_model(tmp_path: Path) -> None:
    """Before any connection: the broker address is never used."""
    (tmp_path / "folder").mkdir()
    daemon = DaemonProcess("127.0.0.1:9", "events", tmp_path / "folder", tmp_path)
    with running(daemon):
        assert daemon.wait(60) == 1, daemon.tail()
    refusal = [e for e in daemon.log_events() if e["event"] == "cannot serve the model"]
    assert refusal and "not a regular file" in refusal[0]["error"]


@pytest.fixture(scope="module")
def int8(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A stateful forecast model trained for real and exported as int8 with its probes."""
    path = train_model(tmp_path_factory.mktemp("int8"), export_mode="stateful", int8=True)
    report = json.loads(path.with_name("metrics.json").read_text())
    assert 0 < report["int8"]["parity_max_difference"] < INT8_TOLERANCE
    return path


def test_an_int8_model_that_scores_its_probes_like_the_float_graph_loads(int8: Path) -> None:
    scorer = Scorer.load(int8, providers=["CPUExecutionProvider"])
    probes = scorer.manifest.probes
    assert len(probes.windows) == 8
    assert np.std(probes.scores) > 1e-3  # probes that tell models apart
    got = scorer.score_sequences(*probes.arrays(scorer.manifest.window)).score
    difference = np.abs(got - probes.scores) / np.maximum(np.abs(probes.scores), 1.0)
    assert 0 < difference.max() <= probes.tolerance < 0.2


def _negate_int8_weights(graph: onnx.GraphProto) -> None:
    for tensor in graph.initializer:
        if tensor.data_type == onnx.TensorProto.INT8:
            weights = onnx.numpy_helper.to_array(tensor)
            tensor.CopyFrom(onnx.numpy_helper.from_array(-weights, tensor.name))


def test_an_int8_model_that_scores_its_probes_wrongly_is_refused(
    int8: Path, tmp_path: Path
) -> None:
    corrupted = restamped(int8, tmp_path / "corrupted.onnx", _negate_int8_weights)
    assert load_model_file(corrupted)[0].probes is not None  # the contract holds otherwise
    refused(
        corrupted,
        r"the graph scores the manifest's 8 probe windows up to \S+ away from the float graph "
        r"\(tolerance 0\.0\d+\) with CPUExecutionProvider on this machine, whose int8 kernels "
        "do not reproduce the exported model's scores; deploy the float model instead",
    )


def test_an_int8_model_without_probes_is_refused(int8: Path, tmp_path: Path) -> None:
    bare = restamped(int8, tmp_path / "bare.onnx", _unchanged, probes=None)
    refused(bare, "int8 graph without probes: .* cannot be checked; export it again")


@pytest.mark.parametrize(
    ("probes", "match"),
    [
        ({"windows": [[[0.0, 0.0, 0.0]]], "scores": [], "tolerance": 0.1}, "one score per"),
        ({"windows": [[[0.0, 0.0]]], "scores": [1.0], "tolerance": 0.1}, "needs 3 values"),
        ({"windows": [[[0.0] * 3] * 9], "scores": [1.0], "tolerance": 0.1}, "1 to 8 events"),
        ({"windows": [[[0.0] * 3]], "scores": [1.0], "tolerance": 0}, "greater than 0"),
    ],
)
def test_inconsistent_probes_are_refused(
    int8: Path, tmp_path: Path, probes: dict, match: str
) -> None:
    refused(with_manifest(int8, tmp_path / "probes.onnx", probes=probes), match)
