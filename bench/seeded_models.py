"""The benchmark model: 8 numeric features, LSTM hidden 64 x 2 layers, window 32, every event
scored. Seeded random networks exported by the trainer, in window and stateful mode.

Speed does not depend on what the weights learned, so the benchmarks do not train: a seeded
`SequenceNet` run through onnxruntime does exactly the work of a trained one. Files are
cached under a digest of all that makes them (manifest, seed, the network and export code),
so a cached model is reused only while none of it changes.
"""

from __future__ import annotations

import hashlib
import inspect
from pathlib import Path

import torch

from detector.contract.manifest import (
    Columns,
    ExportMode,
    Manifest,
    Network,
    NumericFeature,
    Scoring,
    TrainingSummary,
)
from trainer import export, network
from trainer.export import export_model
from trainer.network import SequenceNet

KEY, TIME = "device", "ts"
FEATURES = tuple(f"f{i}" for i in range(8))
WINDOW, HIDDEN, LAYERS = 32, 64, 2
SEED = 0


def bench_manifest(export_mode: ExportMode) -> Manifest:
    """Standard-normal features (the generated events are), so the statistics are 0 and 1."""
    return Manifest(
        task="classify",
        export_mode=export_mode,
        columns=Columns(key=KEY, time=TIME),
        features=[NumericFeature(name=name) for name in FEATURES],
        window=WINDOW,
        min_history=1,
        network=Network(hidden=HIDDEN, layers=LAYERS),
        scoring=Scoring(semantics="probability", threshold=0.5, calibration="bench"),
        training=TrainingSummary(rows=0, keys=0),
        trainer_version="bench",
    )


def seeded_net(export_mode: ExportMode = "window") -> SequenceNet:
    torch.manual_seed(SEED)
    return SequenceNet.from_manifest(bench_manifest(export_mode))


def bench_model(folder: Path, export_mode: ExportMode) -> Path:
    """The exported model file for `export_mode` in `folder`, exported unless already there."""
    manifest = bench_manifest(export_mode)
    path = folder / f"bench-{export_mode}-{_digest(manifest)}.onnx"
    if not path.exists():
        export_model(seeded_net(export_mode), manifest, path)
    return path


def _digest(manifest: Manifest) -> str:
    """What the exported file depends on: the manifest, the seed and the trainer's code."""
    sources = (inspect.getsource(module) for module in (network, export))
    described = manifest.model_dump_json(exclude={"created_at"})
    made_of = "\0".join([described, str(SEED), *sources])
    return hashlib.sha256(made_of.encode()).hexdigest()[:16]
