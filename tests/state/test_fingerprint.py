"""Snapshot fingerprints: a snapshot is restored exactly where a model swap keeps the state."""

from __future__ import annotations

from itertools import product

from onnx_fixtures import sensor_manifest

from detector.contract.manifest import AdaptiveThreshold, Network
from detector.engine.identity import incompatibility
from detector.state.snapshots import fingerprint

BASE = sensor_manifest()
MODELS = [
    BASE,
    BASE.model_copy(update={"graph_sha256": "ab" * 32}),
    sensor_manifest(scoring=BASE.scoring.model_copy(update={"threshold": 3.0})),
    sensor_manifest(scoring=BASE.scoring.model_copy(update={"confirm": 2})),
    sensor_manifest(scoring=BASE.scoring.model_copy(update={"confirm": 4})),
    sensor_manifest(scoring=BASE.scoring.model_copy(update={"adaptive": AdaptiveThreshold()})),
    sensor_manifest(window=6),
    sensor_manifest("classify"),
    sensor_manifest(export_mode="stateful"),
    sensor_manifest(export_mode="stateful", network=Network(hidden=4, layers=2)),
]


def test_fingerprints_match_exactly_where_a_swap_keeps_the_state() -> None:
    for old, new in product(MODELS, repeat=2):
        assert (fingerprint(old) == fingerprint(new)) == (incompatibility(old, new) is None)
    assert len({fingerprint(model) for model in MODELS}) == 7  # three pairs share theirs
