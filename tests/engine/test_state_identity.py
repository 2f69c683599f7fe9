"""`incompatibility`: which model swaps keep the keys' state, by their `state_identity`."""

from __future__ import annotations

import pytest
from onnx_fixtures import sensor_manifest

from detector.contract.manifest import AdaptiveThreshold, KeyStatistics, Manifest, Network
from detector.engine.identity import incompatibility, state_identity

BASE = sensor_manifest()


def scoring(**changes: object) -> dict:
    return {"scoring": BASE.scoring.model_copy(update=changes)}


def key_statistics(threshold: float | None = None) -> dict:
    stats = KeyStatistics(mean=[20.0, 1.0], std=[5.0, 0.25], threshold=threshold)
    return {"per_key_statistics": {"k": stats}}


def unscaled() -> dict:
    return {"features": [BASE.features[0].model_copy(update={"scale": "none"}), *BASE.features[1:]]}


@pytest.mark.parametrize(
    ("new", "reason"),
    [
        (sensor_manifest("classify"), "task changed"),
        (sensor_manifest(window=6), "window, ring buffer shape changed"),
        (sensor_manifest(**unscaled()), "features changed"),
        (sensor_manifest(**key_statistics()), "per-key statistics changed"),
        (sensor_manifest(network=Network(hidden=8, layers=1)), "network shape changed"),
        (
            sensor_manifest(network=Network(hidden=4, layers=1, bidirectional=True)),
            "network shape changed",
        ),
        (
            sensor_manifest(export_mode="stateful"),
            "export mode, network shape, ring buffer shape changed",
        ),
        (
            sensor_manifest(**scoring(adaptive=AdaptiveThreshold())),
            "adaptive threshold history changed",
        ),
        (sensor_manifest(**scoring(confirm=3)), "alert confirmation changed"),
    ],
)
def test_a_change_of_what_the_state_means_is_named(new: Manifest, reason: str) -> None:
    assert incompatibility(BASE, new) == reason
    assert incompatibility(new, BASE) == reason


@pytest.mark.parametrize(
    ("old", "new"),
    [
        (BASE, BASE.model_copy(update={"graph_sha256": "ab" * 32})),
        (BASE, sensor_manifest(**scoring(threshold=3.0, smoothing=0.5))),
        (sensor_manifest(**key_statistics()), sensor_manifest(**key_statistics(threshold=4.0))),
        (sensor_manifest(**scoring(confirm=2)), sensor_manifest(**scoring(confirm=5))),
        (
            sensor_manifest(**scoring(adaptive=AdaptiveThreshold(refresh=10))),
            sensor_manifest(**scoring(adaptive=AdaptiveThreshold(refresh=20))),
        ),
    ],
)
def test_weights_and_thresholds_leave_the_state_as_it_is(old: Manifest, new: Manifest) -> None:
    assert state_identity(old) == state_identity(new)
    assert incompatibility(old, new) is None


def test_entries_added_later_appear_only_when_set() -> None:
    """So that the identities, and the snapshot fingerprints, of earlier models stay as they
    were."""
    assert {"history", "confirm"}.isdisjoint(state_identity(BASE))
    assert all("scale" not in feature for feature in state_identity(BASE)["features"])
    assert state_identity(sensor_manifest(**scoring(confirm=2)))["confirm"] == "onset"
