"""A model's version identifies the whole model, graph and manifest: models that share a graph
but not a threshold report different versions and never share alert ids."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import onnx
import pytest
from daemon_support import encoded, sensor_events

from detector.config import ModelSettings
from detector.contract.manifest import Manifest
from detector.contract.model_file import load_model_file, parse_manifest, write_model
from detector.engine.core import EngineOptions
from detector.engine.scorer import Scorer
from detector.files.replay import replay_records
from detector.ops.model_watch import ModelWatcher
from detector.state.snapshots import fingerprint


def rewritten(model: Path, path: Path, **changes: object) -> Path:
    """`model`'s graph written again to `path` with its manifest changed."""
    graph = onnx.load(model)
    manifest = parse_manifest(model, graph)
    write_model(graph, manifest.model_copy(update=changes), path)
    return path


def alert_ids(model: Path, records: list[bytes]) -> dict[tuple, str]:
    """The id of each alert `model` raises on `records`, by the event it opened on."""
    scorer = Scorer.load(model, providers=["CPUExecutionProvider"])
    alerts = replay_records(records, scorer, EngineOptions()).alerts
    return {(alert.key, alert.event_time, alert.sequence): alert.alert_id for alert in alerts}


def with_threshold(manifest: Manifest, threshold: float) -> dict:
    return {"scoring": manifest.scoring.model_copy(update={"threshold": threshold})}


def test_one_graph_with_two_thresholds_is_two_versions_with_distinct_alert_ids(
    sensor_model: Path, tmp_path: Path
) -> None:
    manifest = load_model_file(sensor_model)[0]
    lower = manifest.scoring.threshold * 0.8
    other = rewritten(sensor_model, tmp_path / "lower.onnx", **with_threshold(manifest, lower))
    relaxed = load_model_file(other)[0]
    assert relaxed.graph_sha256 == manifest.graph_sha256
    assert relaxed.model_version != manifest.model_version
    # The key state's layout is the same: snapshots still pass between the two.
    assert fingerprint(relaxed) == fingerprint(manifest)

    records = encoded(sensor_events(4, 150, seed=300, faults=2))
    ids, relaxed_ids = alert_ids(sensor_model, records), alert_ids(other, records)
    shared = ids.keys() & relaxed_ids.keys()
    assert shared  # both models alert on these events...
    assert not set(ids.values()) & set(relaxed_ids.values())  # ...under ids of their own


def test_the_version_follows_the_content_not_the_time_it_was_written(
    sensor_model: Path, tmp_path: Path
) -> None:
    version = load_model_file(sensor_model)[0].model_version
    later = datetime(2030, 1, 1, tzinfo=UTC)
    again = rewritten(sensor_model, tmp_path / "again.onnx", created_at=later)
    assert load_model_file(again)[0].model_version == version
    renamed = rewritten(sensor_model, tmp_path / "renamed.onnx", trainer_version="other")
    assert load_model_file(renamed)[0].model_version != version


def test_a_copy_with_changes_has_its_own_version(sensor_model: Path) -> None:
    manifest = load_model_file(sensor_model)[0]
    version = manifest.model_version  # cached on the original
    assert manifest.model_copy().model_version == version
    changed = manifest.model_copy(update=with_threshold(manifest, 1.0))
    assert changed.model_version != version
    assert changed.model_version == Manifest.model_validate_json(changed.to_json()).model_version


@pytest.mark.parametrize("threshold_factor", [0.5, 2.0])
def test_the_watcher_serves_a_model_whose_threshold_alone_changed(
    sensor_model: Path, tmp_path: Path, threshold_factor: float
) -> None:
    manifest = load_model_file(sensor_model)[0]
    served = tmp_path / "model.onnx"
    served.write_bytes(sensor_model.read_bytes())
    settings = ModelSettings(path=served, providers=["CPUExecutionProvider"])
    watcher = ModelWatcher(settings, manifest.model_version, lambda error: None)
    threshold = manifest.scoring.threshold * threshold_factor
    rewritten(sensor_model, served, **with_threshold(manifest, threshold))
    watcher.check()
    scorer = watcher.take()
    assert scorer is not None, "a recalibrated threshold was taken for the serving model"
    assert scorer.manifest.scoring.threshold == pytest.approx(threshold)
