"""What a key's state depends on: whether it can survive a model swap, defined once.

The engine keeps its arena across a swap when the two models' identities are equal
(`incompatibility`), and a snapshot carries a hash of the identity of the model that wrote it
(`detector.state.snapshots.fingerprint`), so both answer the same question the same way.
"""

from __future__ import annotations

from detector.contract.manifest import Feature, Manifest
from detector.engine.arena import ArenaShape

#: How `incompatibility` names each entry of a `state_identity`.
_NAMES = {
    "task": "task",
    "export_mode": "export mode",
    "window": "window",
    "features": "features",
    "per_key_statistics": "per-key statistics",
    "network": "network shape",
    "bidirectional": "network shape",
    "ring": "ring buffer shape",
    "state": "network shape",
    "history": "adaptive threshold history",
    "confirm": "alert confirmation",
}


def state_identity(manifest: Manifest) -> dict[str, object]:
    """The parts of `manifest` that shape or interpret its key state, as JSON values: not the
    weights, thresholds or anything else a model may change while reading the state as before.
    Entries added after snapshots existed ("history", "confirm", a feature's non-default
    "scale") appear only when set, so that the fingerprints of earlier models stay as they were.
    """
    shape = ArenaShape.for_manifest(manifest)
    identity: dict[str, object] = {
        "task": manifest.task,
        "export_mode": manifest.export_mode,
        "window": manifest.window,
        "features": [_layout(feature) for feature in manifest.features],
        "per_key_statistics": manifest.per_key_normalisation,
        "network": [manifest.network.layers, manifest.network.hidden],
        "bidirectional": manifest.network.bidirectional,
        "ring": shape.ring,
        "state": shape.state,
    }
    if shape.history is not None:
        identity["history"] = shape.history
    if shape.confirm:  # "onset": the run's first time is kept beside its length
        identity["confirm"] = "onset"
    return identity


def incompatibility(old: Manifest, new: Manifest) -> str | None:
    """Why key state kept for `old` cannot serve `new`, or None when it can."""
    before, after = state_identity(old), state_identity(new)
    changed = {_NAMES[name] for name in before | after if before.get(name) != after.get(name)}
    ordered = [name for name in dict.fromkeys(_NAMES.values()) if name in changed]
    return f"{', '.join(ordered)} changed" if ordered else None


def _layout(feature: Feature) -> dict:
    """A feature as it shapes key state, its `scale` only when not the default."""
    dumped = feature.model_dump(mode="json")
    if dumped.get("scale") == "standard":
        del dumped["scale"]
    return dumped
