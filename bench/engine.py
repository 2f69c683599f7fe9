"""Engine throughput and memory against a naive per-event baseline.

    python bench/engine.py [--events 200000] [--keys 10000] [--baseline-events 5000]
                           [--batch 4096] [--threads N] [--cpu-time] [--providers cpu|auto]

The model: 8 features (6 numeric, 1 categorical, time delta), LSTM hidden 64 x 2 layers,
window 32, every event scored (min_history 1, stride 1); the stateful model also runs with
adaptive per-key thresholds (history 512, re-chosen every 16 events), and with alerts
confirmed over 10 events on top. Last, the time a key-state
snapshot of the stateful model's keys takes to copy and to encode. Events are JSON bytes,
as from Kafka, spread uniformly over the keys. The baseline is what one would write first: a
Python list per key holding its encoded events and one onnxruntime call per event on the
window graph. Memory per key is measured with tracemalloc over the engine's own state.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import tracemalloc
from collections import defaultdict
from pathlib import Path

import numpy as np
import orjson
import torch
from rich.console import Console
from rich.table import Table

from detector.contract.features import parse_json_record
from detector.contract.manifest import (
    AdaptiveThreshold,
    CategoricalFeature,
    Columns,
    Manifest,
    Network,
    NumericFeature,
    Scoring,
    TimeDeltaFeature,
    TrainingSummary,
)
from detector.engine.core import Engine, EngineOptions
from detector.engine.records import InputRecord
from detector.engine.scorer import CPU, Scorer
from detector.state.snapshots import encode_fields
from trainer.export import export_model
from trainer.network import SequenceNet

NUMERIC = [f"x{i}" for i in range(6)]
#: Wall-clock by default; `--cpu-time` measures this process's CPU time instead, which other
#: load on the machine disturbs far less (with `--threads 1` it is one core's time).
clock = time.perf_counter
CHANNELS = ["web", "app", "pos", "atm"]
#: Short enough for the default 20 events per key to re-choose each key's threshold once.
ADAPTIVE = AdaptiveThreshold(history=512, refresh=16, warm_up=0)
PROVIDERS = {"cpu": CPU, "auto": "auto"}


def manifest(
    export_mode: str, adaptive: AdaptiveThreshold | None = None, confirm: int = 1
) -> Manifest:
    features = [NumericFeature(name=name) for name in NUMERIC]
    features += [CategoricalFeature(name="channel", vocabulary=CHANNELS), TimeDeltaFeature()]
    return Manifest(
        task="classify",
        export_mode=export_mode,
        columns=Columns(key="device", time="ts"),
        features=features,
        window=32,
        min_history=1,
        network=Network(hidden=64, layers=2),
        scoring=Scoring(
            semantics="probability",
            threshold=0.99,
            calibration="bench",
            adaptive=adaptive,
            confirm=confirm,
        ),
        training=TrainingSummary(rows=0, keys=0),
        trainer_version="bench",
    )


def export(
    folder: Path, export_mode: str, adaptive: AdaptiveThreshold | None = None, confirm: int = 1
) -> Path:
    """The benchmark network, seeded, exported in `export_mode`."""
    torch.manual_seed(0)
    spec = manifest(export_mode, adaptive, confirm)
    path = folder / f"{export_mode}{'-adaptive' if adaptive else ''}-{confirm}.onnx"
    export_model(SequenceNet.from_manifest(spec), spec, path)
    return path


def make_events(count: int, keys: int, seed: int = 0) -> list[InputRecord]:
    rng = np.random.default_rng(seed)
    key = rng.integers(0, keys, count)
    values = rng.normal(0.0, 1.0, (count, len(NUMERIC))).round(4)
    channel = rng.integers(0, len(CHANNELS), count)
    records = []
    for i in range(count):
        document = {"device": f"dev-{key[i]}", "ts": 1_700_000_000.0 + i * 0.01}
        document |= dict(zip(NUMERIC, values[i].tolist(), strict=True))
        document["channel"] = CHANNELS[channel[i]]
        records.append(InputRecord(orjson.dumps(document)))
    return records


def decode_rate(scorer: Scorer, records: list[InputRecord]) -> float:
    """Events/s of decoding alone (JSON and codec): the ceiling of any per-record pipeline."""
    decode = scorer.codec.decode
    started = clock()
    for record in records:
        decode(parse_json_record(record.payload, 65536))
    return len(records) / (clock() - started)


def baseline(scorer: Scorer, records: list[InputRecord]) -> float:
    """Events/s of the naive loop: decode, encode, per-key list, one call per event."""
    codec, spec = scorer.codec, scorer.manifest
    history: dict[str, list[np.ndarray]] = defaultdict(list)
    last: dict[str, float] = {}
    started = clock()
    for record in records:
        event = codec.decode(parse_json_record(record.payload, 65536))
        gap = event.time - last.get(event.key, event.time)
        last[event.key] = event.time
        row = codec.encode(np.array([event.values]), codec.statistics_rows([event.key]), [gap])
        events = history[event.key]
        events.append(row[0])
        del events[: -spec.window]
        window = np.zeros((1, spec.window, codec.width), np.float32)
        window[0, : len(events)] = events
        scorer.score_windows(window, np.array([len(events)]))
    return len(records) / (clock() - started)


def run(scorer: Scorer, records: list[InputRecord], batch: int) -> Engine:
    engine = Engine(scorer, EngineOptions(max_batch=batch))
    for start in range(0, len(records), batch):
        engine.process(records[start : start + batch])
    return engine


def engine_rate(scorer: Scorer, records: list[InputRecord], batch: int) -> float:
    """Events/s of the engine."""
    started = clock()
    run(scorer, records, batch)
    return len(records) / (clock() - started)


def bytes_per_key(scorer: Scorer, records: list[InputRecord], batch: int) -> int:
    """Memory the engine holds per key after the run (tracemalloc, in a run of its own)."""
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    engine = run(scorer, records, batch)
    # Only the engine's state is still allocated: all else of the run has been freed.
    per_key = (tracemalloc.get_traced_memory()[0] - before) // engine.keys
    tracemalloc.stop()
    return per_key


def snapshot_seconds(engine: Engine) -> tuple[float, float]:
    """Seconds to copy every key's state (what the daemon's loop does for a snapshot) and to
    encode the copies into a compressed blob (what its encoder thread does)."""
    arena = engine.arena
    started = clock()
    fields = arena.export(np.flatnonzero(arena.used))
    copied = clock()
    encode_fields(fields)
    return copied - started, clock() - copied


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--keys", type=int, default=10_000)
    parser.add_argument("--baseline-events", type=int, default=5_000)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads")
    parser.add_argument("--cpu-time", action="store_true", help="measure CPU, not wall time")
    parser.add_argument(
        "--providers",
        choices=tuple(PROVIDERS),
        default="cpu",
        help="where the engine scores: cpu, or auto (CUDA when onnxruntime-gpu sees a GPU); "
        "the baseline always runs on the CPU",
    )
    args = parser.parse_args()
    if args.cpu_time:
        global clock
        clock = time.process_time
    records = make_events(args.events, args.keys)
    providers = [PROVIDERS[args.providers]]
    with tempfile.TemporaryDirectory() as folder:
        models = {
            "window": export(Path(folder), "window"),
            "stateful": export(Path(folder), "stateful"),
            "stateful, adaptive": export(Path(folder), "stateful", ADAPTIVE),
            "stateful, adaptive, confirm 10": export(Path(folder), "stateful", ADAPTIVE, 10),
        }
        # The baseline is the textbook loop: one call per event, on the CPU, where such small
        # calls are fastest.
        on_cpu = Scorer.load(models["window"], [CPU], intra_op_threads=args.threads)
        base = baseline(on_cpu, records[: args.baseline_events])
        rows = [
            ("decoding only (ceiling)", decode_rate(on_cpu, records), None),
            ("baseline (per-event call)", base, None),
        ]
        for name, path in models.items():
            scorer = Scorer.load(path, providers, intra_op_threads=args.threads)
            rate = engine_rate(scorer, records, args.batch)
            rows.append((name, rate, bytes_per_key(scorer, records, args.batch)))
        stateful = Scorer.load(models["stateful"], providers, intra_op_threads=args.threads)
        copy_s, encode_s = snapshot_seconds(run(stateful, records, args.batch))
    # Decoding is the same Python loop in every path: what is left is the cost of scoring.
    decoding = 1e6 / rows[0][1]
    table = Table(
        title=f"{args.events:,} events, {args.keys:,} keys, batch {args.batch}, "
        f"engine on {scorer.providers[0]}"
    )
    for column in ("path", "events/s", "x baseline", "µs/event beyond decoding", "bytes/key"):
        table.add_column(column, justify="right")
    for name, rate, per_key in rows:
        table.add_row(
            name,
            f"{rate:,.0f}",
            f"{rate / base:.1f}",
            f"{1e6 / rate - decoding:.1f}",
            f"{per_key:,}" if per_key else "-",
        )
    Console().print(table)
    Console().print(
        f"snapshot of {args.keys:,} stateful keys: copy {copy_s * 1000:,.1f} ms in the "
        f"daemon's loop, encoding {encode_s * 1000:,.1f} ms on its encoder thread"
    )


if __name__ == "__main__":
    main()
