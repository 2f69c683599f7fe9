"""`/metrics` as the daemon renders it from the engine's counters."""

from __future__ import annotations

from pathlib import Path

import orjson
from model_factory import event, load_random, make_manifest
from prometheus_client.parser import text_string_to_metric_families

from detector.engine.core import Engine
from detector.engine.records import InputRecord
from detector.ops.metrics import Metrics

T0 = 1_700_000_000.0


def samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the rendered exposition, by name and sorted labels."""
    text = metrics.render().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_late_records_are_counted_in_metrics(tmp_path: Path) -> None:
    engine = Engine(load_random(tmp_path / "model.onnx", make_manifest(), seed=1))
    metrics = Metrics()
    late = ("seqsentinel_late_records_total", ())
    assert samples(metrics)[late] == 0  # shown before the first late record
    times = (T0, T0 + 60, T0 + 30, T0 + 90, T0 + 10)  # the third and the fifth are late
    batch = [InputRecord(orjson.dumps(event("a", time, 10.0))) for time in times]
    result = engine.process(batch)
    metrics.observe_batch(result.counters, len(batch), 0.01, engine.keys)
    shown = samples(metrics)
    assert shown[late] == 2
    assert shown[("seqsentinel_records_total", (("outcome", "dead_letter"),))] == 2
