"""Speed, latency and memory of `detector run` through a real Kafka broker, against the ceiling
of the Kafka client and a naive baseline, all measured in one run on one machine.

    python bench/throughput.py [--quick] [--json OUT] [--plot PNG] [--bootstrap-servers H:P]
                               [--events N] [--keys K] [--memory-keys M] [--threads T]
                               [--only PART[,PART]] [--latency-rate R] [--set NAME=VALUE]
                               [--load-generator java|python]

1. Pre-produces N JSON events (8 standard-normal features) over K keys to a topic of 4
   partitions, keyed by the device, on a broker started with deploy/kafka/local-kafka.
2. Reads the topic from the start with a fresh consumer group each time:
   `raw_consume_eps` (kafka-python polling and JSON-decoding only: the ceiling),
   `naive_eps` (per record: decode, the key's Python list, one onnxruntime call, an alert
   when over the threshold; on the first `--naive-events` records only, it is slow),
   `window_eps`, `stateful_eps` and `exactly_once_eps` (`detector run` as a subprocess,
   from its first to its last committed offset).
3. Latency: a fresh topic fed at half `stateful_eps` (or `--latency-rate`) and at a tenth,
   with a lowered threshold, by `bench/LoadGenerator.java` in a JVM of its own (or by
   kafka-python in this process: `--load-generator python`); each alert's broker append
   time (LogAppendTime) minus its event's produce time, and the detector's part, from the
   event's append.
4. Memory: `detector run` over M events of M distinct keys; peak RSS (VmHWM) minus the
   peak of the run over K keys, per extra key.

The models are seeded random networks (see `seeded_models`): speed does not depend on what
the weights learned.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

import kafka
import numpy as np
import onnxruntime
import orjson
from kafka import KafkaConsumer, TopicPartition
from kafka.errors import KafkaError
from kafka.partitioner.default import murmur2
from kafka_rig import (
    LOCAL_KAFKA,
    Cluster,
    Daemon,
    DaemonError,
    Rate,
    Stopwatch,
    local_broker,
    running,
)
from rich.console import Console
from rich.table import Table
from seeded_models import FEATURES, KEY, TIME, WINDOW, bench_model

from detector.config import load_settings
from detector.engine.core import Engine, EngineOptions
from detector.engine.records import InputRecord
from detector.engine.scorer import Scorer
from detector.stream.clients import make_consumer

PARTITIONS = 4
START_TIME = 1_704_067_200.0
#: Share of scored events over the threshold: throughput runs alert rarely, the latency run
#: often enough for a good p99.
THROUGHPUT_ALERT_SHARE = 0.001
LATENCY_ALERT_SHARE = 0.01
#: Events replayed in process to place the thresholds at those shares.
CALIBRATION_EVENTS = 50_000
#: How long reading a latency run's topics back may take.
READ_TIMEOUT_S = 120.0
#: The latency runs' Java load generator, and the JVM options that keep it small: one
#: garbage-collector thread, and the quick C1 compiler only (its start-up costs less).
GENERATOR = Path(__file__).with_name("LoadGenerator.java")
GENERATOR_JVM_OPTIONS = ("-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1", "-Xmx256m")
PATHS = ("raw_consume", "naive", "window", "stateful", "exactly_once")
PARTS = (*PATHS, "latency", "memory")
GOALS = {
    "stateful_vs_ceiling": (">=", 0.6),
    "stateful_vs_naive": (">=", 30.0),
    "window_vs_naive": (">=", 4.0),
    "exactly_once_vs_stateful": (">=", 0.7),
    "p99_latency_ms": ("<=", 50.0),
    "bytes_per_key_stateful": ("<=", 2048.0),
}


@dataclass(frozen=True)
class Events:
    """JSON payloads and their message keys."""

    values: list[bytes]
    keys: list[bytes]

    def records(self) -> list[InputRecord]:
        return [
            InputRecord(value, key.decode())
            for value, key in zip(self.values, self.keys, strict=True)
        ]


def make_events(count: int, keys: int, seed: int, distinct: bool = False) -> Events:
    """`count` events over `keys` devices (each device once if `distinct`), 10 ms apart."""
    rng = np.random.default_rng(seed)
    device = rng.permutation(count) if distinct else rng.integers(0, keys, count)
    values = rng.standard_normal((count, len(FEATURES))).round(4).tolist()
    names = [f"dev-{d}" for d in device.tolist()]
    payloads = [
        orjson.dumps(
            {KEY: name, TIME: START_TIME + i * 0.01} | dict(zip(FEATURES, row, strict=True))
        )
        for i, (name, row) in enumerate(zip(names, values, strict=True))
    ]
    return Events(payloads, [name.encode() for name in names])


def thresholds(model: Path, events: Events) -> tuple[float, float]:
    """Score quantiles where the throughput and the latency runs place their threshold."""
    scorer = Scorer.load(model, providers=["CPUExecutionProvider"])
    engine = Engine(scorer, EngineOptions(threshold=np.inf))
    scores = engine.process(events.records()[:CALIBRATION_EVENTS]).scores
    scores = scores[~np.isnan(scores)]
    return (
        float(np.quantile(scores, 1 - THROUGHPUT_ALERT_SHARE)),
        float(np.quantile(scores, 1 - LATENCY_ALERT_SHARE)),
    )


# -- in-process readers: the ceiling and the naive loop -----------------------------------


def consumer(cluster: Cluster, topic: str, group: str) -> KafkaConsumer:
    """A consumer configured exactly as the daemon's (fetch sizes, poll size)."""
    settings = load_settings(kafka={"bootstrap_servers": cluster.bootstrap, "group_id": group})
    reader = make_consumer(settings)
    reader.subscribe([topic])
    return reader


def raw_consume(cluster: Cluster, topic: str, total: int) -> Rate:
    """kafka-python polling and JSON-decoding, nothing else."""
    reader = consumer(cluster, topic, f"raw-{topic}")
    loads, seen, clock = orjson.loads, 0, Stopwatch()
    try:
        while seen < total:
            for batch in reader.poll(timeout_ms=500).values():
                clock.start()
                for message in batch:
                    loads(message.value)
                seen += len(batch)
        return clock.rate(seen)
    finally:
        reader.close(autocommit=False)


def naive(cluster: Cluster, topic: str, model: Path, threshold: float, total: int) -> Rate:
    """The textbook loop, one record at a time, over the first `total` records."""
    scorer = Scorer.load(model, providers=["CPUExecutionProvider"], intra_op_threads=1)
    run, width = scorer.session.run, len(FEATURES)
    history: dict[bytes, collections.deque] = collections.defaultdict(
        lambda: collections.deque(maxlen=WINDOW)
    )
    alerts = cluster.create_topic(f"{topic}-naive-alerts", PARTITIONS)
    reader = consumer(cluster, topic, f"naive-{topic}")
    producer = cluster.producer(acks="all", linger_ms=5)
    seen, clock = 0, Stopwatch()
    try:
        while seen < total:
            for batch in reader.poll(timeout_ms=500, max_records=total - seen).values():
                clock.start()
                for message in batch:
                    record = orjson.loads(message.value)
                    events = history[message.key]
                    events.append([float(record[name]) for name in FEATURES])
                    window = np.zeros((1, WINDOW, width), np.float32)
                    window[0, : len(events)] = events
                    lengths = np.array([len(events)], np.int64)
                    score = float(run(None, {"x": window, "lengths": lengths})[0][0])
                    if score >= threshold:
                        alert = {"key": message.key.decode(), "score": score, TIME: record[TIME]}
                        producer.send(alerts, orjson.dumps(alert))
                seen += len(batch)
        producer.flush()
        return clock.rate(seen)
    finally:
        producer.close()
        reader.close(autocommit=False)


# -- the daemon ---------------------------------------------------------------------------


@dataclass(frozen=True)
class DaemonResult:
    rate: Rate
    peak_rss: int


def daemon_eps(
    cluster: Cluster, topic: str, model: Path, folder: Path, total: int, settings: dict[str, str]
) -> DaemonResult:
    """`detector run` from the start of `topic` until every record is committed."""
    with running(Daemon(cluster, topic, model, folder, settings)) as daemon:
        progress = daemon.wait_committed(total, timeout=max(120.0, total / 2000))
        return DaemonResult(progress.rate(), daemon.peak_rss())


@dataclass(frozen=True)
class Latency:
    """Milliseconds from an event's produce timestamp (the load generator's clock at `send()`,
    carried in the event's time field) to its alert's append to the alerts topic (broker
    LogAppendTime; with one in-sync replica the acknowledgement follows the append at once),
    and its two parts: `send()` to the event's append (the load generator's producer) and the
    event's append to its alert's append (the detector, broker to broker). `achieved_eps` and
    `late_p99_ms` (how late `send()` came after its scheduled time) say whether the load
    generator kept its rate. `detector_cpu_us_per_event` and `detector_core_share` (its CPU
    seconds per second of sending) say how close the detector came to filling its core."""

    rate_eps: float
    achieved_eps: float
    late_p99_ms: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    append_p50_ms: float
    append_p99_ms: float
    send_p50_ms: float
    send_p99_ms: float
    produced: int
    alerts_expected: int
    alerts_received: int
    detector_cpu_us_per_event: float
    detector_core_share: float


@dataclass(frozen=True)
class Generated:
    """How well the load generator kept its schedule."""

    seconds: float
    late_p99_ms: float


#: The events of a latency run: (key, the JSON object's text after its key and time fields).
Schedule = list[tuple[bytes, bytes]]


def generate_python(cluster: Cluster, topic: str, events: Schedule, rate: float) -> Generated:
    """Send the events at `rate` from this process with kafka-python, each at its scheduled
    time or at once when late, with `time.time()` at the send as its event time (the produce
    timestamp). Each key's partition is the default partitioner's (murmur2), found once per
    key rather than at every send."""
    producer = cluster.producer(acks="all", linger_ms=1)
    partition_of = {name: (murmur2(name) & 0x7FFFFFFF) % PARTITIONS for name, _ in events}
    send, key_field, time_field = producer.send, KEY.encode(), TIME.encode()
    late = np.empty(len(events))
    started = time.perf_counter()
    for i, (name, tail) in enumerate(events):
        due = started + i / rate
        if (wait := due - time.perf_counter()) > 0:
            time.sleep(wait)
        late[i] = time.perf_counter() - due
        value = b'{"%s":"%s","%s":%.6f%s' % (key_field, name, time_field, time.time(), tail)
        send(topic, value=value, key=name, partition=partition_of[name])
    seconds = time.perf_counter() - started
    producer.flush()
    producer.close()
    return Generated(seconds, _percentile(late * 1000, 99))


def generate_java(
    cluster: Cluster, topic: str, events: Schedule, rate: float, folder: Path
) -> Generated:
    """The same from `bench/LoadGenerator.java` in a JVM of its own, which costs a fraction
    of the CPU that kafka-python takes for each send."""
    lines = folder / f"{topic}.events"
    lines.write_bytes(b"".join(b"%s\t%s\n" % event for event in events))
    command = [sys.executable, str(LOCAL_KAFKA), "java", "--", *GENERATOR_JVM_OPTIONS]
    command += [str(GENERATOR), cluster.bootstrap, topic, str(lines), repr(rate), KEY, TIME]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    lines.unlink()
    if done.returncode != 0:
        raise DaemonError("the Java load generator failed", done.stderr.splitlines())
    report = orjson.loads(done.stdout.splitlines()[-1])
    return Generated(report["seconds"], report["late_p99_ms"])


def latency(
    cluster: Cluster,
    model: Path,
    folder: Path,
    rate: float,
    seconds: float,
    keys: int,
    settings: dict[str, str],
    generator: str,
) -> Latency:
    """Produce at `rate` for `seconds` into a fresh topic; each alert's latency."""
    append_time = {"message.timestamp.type": "LogAppendTime"}
    topic = cluster.create_topic(f"latency-{os.getpid()}-{int(rate)}", PARTITIONS, **append_time)
    alerts = cluster.create_topic(f"{topic}-alerts", PARTITIONS, **append_time)
    rng = np.random.default_rng(7)
    count = int(rate * seconds)
    names = [f"dev-{d}".encode() for d in rng.integers(0, keys, count).tolist()]
    tails = [
        b"," + orjson.dumps(dict(zip(FEATURES, row, strict=True)))[1:]
        for row in rng.standard_normal((count, len(FEATURES))).tolist()
    ]
    events = list(zip(names, tails, strict=True))
    with running(Daemon(cluster, topic, model, folder, settings)) as daemon:
        daemon.wait_ready()
        cpu_before = daemon.cpu_seconds()
        if generator == "java":
            sent = generate_java(cluster, topic, events, rate, folder)
        else:
            sent = generate_python(cluster, topic, events, rate)
        daemon.wait_committed(count, timeout=120)
        cpu_seconds = daemon.cpu_seconds() - cpu_before
    appended = {(m.partition, m.offset): m for m in read_all(cluster, topic)}
    produced_ms = {at: orjson.loads(m.value)[TIME] * 1000 for at, m in appended.items()}
    received = read_all(cluster, alerts)
    sources = [orjson.loads(m.value)["source"] for m in received]
    at = [(source["partition"], source["offset"]) for source in sources]
    total = np.array([m.timestamp - produced_ms[a] for m, a in zip(received, at, strict=True)])
    detector = np.array(
        [m.timestamp - appended[a].timestamp for m, a in zip(received, at, strict=True)]
    )
    send = np.array([m.timestamp - produced_ms[a] for a, m in appended.items()])
    scorer = Scorer.load(model, providers=["CPUExecutionProvider"])
    threshold = float(settings["SCORING__THRESHOLD"])
    engine = Engine(scorer, EngineOptions(threshold=threshold, key_ttl_s=0.0))
    in_send_order = sorted(appended, key=produced_ms.__getitem__)
    records = [InputRecord(appended[a].value, appended[a].key.decode()) for a in in_send_order]
    return Latency(
        rate_eps=rate,
        achieved_eps=count / sent.seconds,
        late_p99_ms=sent.late_p99_ms,
        p50_ms=_percentile(total, 50),
        p99_ms=_percentile(total, 99),
        max_ms=float(total.max()) if total.size else float("nan"),
        append_p50_ms=_percentile(detector, 50),
        append_p99_ms=_percentile(detector, 99),
        send_p50_ms=_percentile(send, 50),
        send_p99_ms=_percentile(send, 99),
        produced=count,
        alerts_expected=engine.process(records).counters.alerts,
        alerts_received=len(received),
        detector_cpu_us_per_event=cpu_seconds * 1e6 / count,
        detector_core_share=cpu_seconds / sent.seconds,
    )


def _percentile(values: np.ndarray, q: float) -> float:
    return float(np.percentile(values, q)) if values.size else float("nan")


def read_all(cluster: Cluster, topic: str) -> list[Any]:
    """Every record of `topic` up to its end offsets now (LogAppendTime)."""
    reader = KafkaConsumer(bootstrap_servers=cluster.bootstrap, enable_auto_commit=False)
    messages: list[Any] = []
    try:
        partitions = [TopicPartition(topic, p) for p in reader.partitions_for_topic(topic)]
        reader.assign(partitions)
        reader.seek_to_beginning()
        ends = reader.end_offsets(partitions)
        deadline = time.monotonic() + READ_TIMEOUT_S
        while any(reader.position(tp) < ends[tp] for tp in partitions):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{topic}: read {len(messages)} records, not all of them")
            for batch in reader.poll(timeout_ms=1000).values():
                messages += batch
    finally:
        reader.close()
    if any(m.timestamp_type != 1 for m in messages):
        raise RuntimeError(f"{topic} does not carry LogAppendTime timestamps")
    return messages


# -- report -------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    memory = next(
        int(line.split()[1]) * 1024
        for line in Path("/proc/meminfo").read_text().splitlines()
        if line.startswith("MemTotal:")
    )
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_bytes": memory,
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
        "kafka_python": kafka.__version__,
        "numpy": np.__version__,
        "orjson": version("orjson"),
        "platform": platform.platform(),
    }


def ratios(results: dict[str, Any]) -> dict[str, float | None]:
    def ratio(top: str, bottom: str) -> float | None:
        a, b = results.get(top), results.get(bottom)
        return None if a is None or not b else a / b

    return {
        "stateful_vs_ceiling": ratio("stateful_eps", "raw_consume_eps"),
        "stateful_vs_naive": ratio("stateful_eps", "naive_eps"),
        "window_vs_naive": ratio("window_eps", "naive_eps"),
        "exactly_once_vs_stateful": ratio("exactly_once_eps", "stateful_eps"),
    }


def cpu_ratios(cpu: dict[str, float | None]) -> dict[str, float | None]:
    """The ratios again from CPU time per event (events per CPU second), which other load on
    the machine disturbs far less than wall time."""

    def ratio(top: str, bottom: str) -> float | None:
        a, b = cpu.get(top), cpu.get(bottom)
        return None if a is None or b is None else b / a

    return {
        "stateful_vs_ceiling": ratio("stateful", "raw_consume"),
        "stateful_vs_naive": ratio("stateful", "naive"),
        "window_vs_naive": ratio("window", "naive"),
        "exactly_once_vs_stateful": ratio("exactly_once", "stateful"),
    }


def goal_rows(results: dict[str, Any]) -> list[tuple[str, ...]]:
    """Per goal: the figure (wall time), the same ratio from CPU time, the goal, whether met."""
    rows = []
    for name, (sense, goal) in GOALS.items():
        value = results.get(name)
        by_cpu = results["cpu_ratios"].get(name)
        met = "n/a" if value is None else ("yes" if _meets(value, sense, goal) else "NO")
        rows.append((name, _shown(value), _shown(by_cpu), f"{sense} {goal:g}", met))
    return rows


def _shown(value: float | None, digits: int = 2) -> str:
    return "null" if value is None else f"{value:,.{digits}f}"


def _meets(value: float, sense: str, goal: float) -> bool:
    return value >= goal if sense == ">=" else value <= goal


def print_report(results: dict[str, Any]) -> None:
    console = Console()
    if results["cpu_us_per_event"]:
        print_rates(console, results)
    if "latency" in results["setup"]:
        print_latencies(console, results["setup"]["latency"])
    for name, reason in results["failures"].items():
        console.print(f"{name} is null: {reason}")


def print_latencies(console: Console, measured: dict[str, dict[str, Any] | None]) -> None:
    lats = Table(title="latency (ms): produce timestamp to the alert's append")
    columns = ("rate", "sent events/s", "late p99", "p50", "p99", "max", "detector p99")
    for column in (*columns, "detector CPU µs/event", "detector core share"):
        lats.add_column(column, justify="right")
    for name, lat in measured.items():
        fields = ("achieved_eps", "late_p99_ms", "p50_ms", "p99_ms", "max_ms", "append_p99_ms")
        shown = [_shown(lat and lat[field], 0) for field in fields]
        shown += [_shown(lat and lat["detector_cpu_us_per_event"], 1)]
        shown += [_shown(lat and lat["detector_core_share"], 2)]
        lats.add_row(f"{name}: {lat['rate_eps']:,.0f}/s" if lat else name, *shown)
    console.print(lats)


def print_rates(console: Console, results: dict[str, Any]) -> None:
    rates = Table(title="through Kafka")
    for column in ("path", "events/s", "CPU µs/event"):
        rates.add_column(column, justify="right")
    for name in PATHS:
        value, cpu = results.get(f"{name}_eps"), results["cpu_us_per_event"].get(name)
        rates.add_row(name, _shown(value, 0), _shown(cpu, 1))
    goals = Table(title="goals")
    for column in ("figure", "measured", "by CPU time", "goal", "met"):
        goals.add_column(column, justify="right")
    for row in goal_rows(results):
        goals.add_row(*row)
    console.print(rates, goals)
    for name in ("p50_latency_ms", "max_latency_ms", "bytes_per_key_window"):
        console.print(f"{name}: {_shown(results.get(name))}")


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    names = list(PATHS)
    values = [results.get(f"{name}_eps") or 0.0 for name in names]
    figure, axes = pyplot.subplots(figsize=(7, 3.6), layout="constrained")
    bars = axes.bar(names, values, color=["#888", "#c44", "#48c", "#26a", "#6a4"])
    axes.bar_label(bars, [f"{v:,.0f}" if v else "n/a" for v in values], fontsize=8)
    axes.set_ylabel("events/s")
    cores = results["machine"]["cores"]
    axes.set_title(f"detector run through Kafka, {cores} cores ({results['events']:,} events)")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)


# -- main ---------------------------------------------------------------------------------


@dataclass
class Run:
    """One benchmark run: its options, the broker, and the figures as they are measured."""

    args: argparse.Namespace
    cluster: Cluster
    folder: Path
    models: dict[str, Path]
    settings: dict[str, str]
    results: dict[str, Any] = field(default_factory=dict)
    cpu: dict[str, float | None] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)
    setup: dict[str, Any] = field(default_factory=dict)
    say: Callable[..., None] = field(default_factory=lambda: Console(stderr=True).log)

    def attempt(self, name: str, measurement: Callable[[], Any]) -> Any:
        """Run one measurement; a failure is recorded with its reason and the run goes on."""
        try:
            return measurement()
        except (DaemonError, KafkaError) as error:
            self.failures[name] = getattr(error, "reason", str(error))
            self.say(f"[red]{name} failed:[/red] {self.failures[name]}")
            return None

    def daemon(self, name: str, topic: str, mode: str, total: int, **extra: str) -> Any:
        """`detector run` over `topic`; None if it failed (the reason kept under `name`)."""
        return self.attempt(
            name,
            lambda: daemon_eps(
                self.cluster, topic, self.models[mode], self.folder, total, self.settings | extra
            ),
        )


def throughput(run: Run, topic: str, paths: tuple[str, ...]) -> dict[str, DaemonResult | None]:
    """The rates of `paths` over `topic`; the daemons' results (for their peak RSS)."""
    args, results, cpu = run.args, run.results, run.cpu
    if "raw_consume" in paths:
        run.say("ceiling: kafka-python poll + JSON decode")
        raw = raw_consume(run.cluster, topic, args.events)
        results["raw_consume_eps"], cpu["raw_consume"] = raw.eps, raw.cpu_us_per_event
    if "naive" in paths:
        run.say(f"naive loop on the first {args.naive_events:,} records")
        threshold = float(run.settings["SCORING__THRESHOLD"])
        slow = naive(run.cluster, topic, run.models["window"], threshold, args.naive_events)
        results["naive_eps"], cpu["naive"] = slow.eps, slow.cpu_us_per_event
    daemons: dict[str, DaemonResult | None] = {}
    for name, mode, extra in (
        ("window", "window", {}),
        ("stateful", "stateful", {}),
        ("exactly_once", "stateful", {"PROCESSING__GUARANTEE": "exactly_once"}),
    ):
        if name not in paths:
            continue
        run.say(f"detector run: {name}")
        daemons[name] = done = run.daemon(f"{name}_eps", topic, mode, args.events, **extra)
        results[f"{name}_eps"] = done.rate.eps if done else None
        cpu[name] = done.rate.cpu_us_per_event if done else None
    return daemons


def latencies(run: Run, half: float, threshold: float) -> None:
    """At half the stateful rate (the goal's load), and at a tenth: the detector's own latency
    when the load generator and the broker leave it a core."""
    args = run.args
    settings = run.settings | {"SCORING__THRESHOLD": repr(threshold)}
    if args.latency_batch_ms is not None:
        settings["BATCHING__MAX_LATENCY_MS"] = str(args.latency_batch_ms)
    measured: dict[str, Latency | None] = {}
    for name, rate in (("half", half), ("tenth", half / 5)):
        run.say(f"latency at {rate:,.0f} events/s for {args.latency_seconds:.0f} s")
        measured[name] = lat = run.attempt(
            f"latency_{name}",
            lambda rate=rate: latency(
                run.cluster,
                run.models["stateful"],
                run.folder,
                rate,
                args.latency_seconds,
                args.keys,
                settings,
                args.load_generator,
            ),
        )
        if lat is not None:
            run.say(
                f"p50 {lat.p50_ms:,.0f} ms, p99 {lat.p99_ms:,.0f} ms (detector alone: p99 "
                f"{lat.append_p99_ms:,.0f} ms), load generator {lat.achieved_eps:,.0f} events/s"
            )
    lat = measured["half"]
    run.results |= {
        "p50_latency_ms": lat.p50_ms if lat else None,
        "p99_latency_ms": lat.p99_ms if lat else None,
        "max_latency_ms": lat.max_ms if lat else None,
    }
    run.setup |= {
        "latency_threshold": threshold,
        "latency_batching_max_latency_ms": args.latency_batch_ms,
        "latency_load_generator": args.load_generator,
        "latency": {name: lat and asdict(lat) for name, lat in measured.items()},
    }


def memory(run: Run, daemons: dict[str, DaemonResult | None]) -> None:
    """Peak RSS over `--memory-keys` distinct keys against the runs over `--keys`, per key."""
    args = run.args
    run.say(f"memory: {args.memory_keys:,} events of as many keys")
    many = make_events(args.memory_keys, args.memory_keys, seed=2, distinct=True)
    topic = run.cluster.create_topic(f"bench-keys-{os.getpid()}", PARTITIONS)
    run.cluster.produce(topic, many.values, many.keys)
    del many
    extra_keys = args.memory_keys - args.keys
    for mode in ("window", "stateful"):
        big = run.daemon(f"bytes_per_key_{mode}", topic, mode, args.memory_keys)
        small = daemons.get(mode)
        run.results[f"bytes_per_key_{mode}"] = (
            (big.peak_rss - small.peak_rss) / extra_keys if big and small else None
        )
        run.results[f"peak_rss_{mode}_bytes"] = big.peak_rss if big else None
    run.setup["peak_rss_few_keys"] = {
        mode: daemon.peak_rss if daemon else None for mode, daemon in daemons.items()
    }


def measure(args: argparse.Namespace, cluster: Cluster, folder: Path) -> dict[str, Any]:
    """Every figure of the run, or those of the parts named by `--only`."""
    models = {mode: bench_model(args.cache, mode) for mode in ("window", "stateful")}
    events = make_events(args.events, args.keys, seed=1)
    alert_threshold, latency_threshold = thresholds(models["window"], events)
    settings = {
        "MODEL__INTRA_OP_THREADS": str(args.threads),
        "SCORING__THRESHOLD": repr(alert_threshold),
        "STATE__KEY_TTL_S": "0",
    } | dict(setting.split("=", 1) for setting in args.set)
    run = Run(args, cluster, folder, models, settings)
    run.results |= {"events": args.events, "keys": args.keys}
    parts = set(args.only or PARTS)
    if "latency" in parts and not args.latency_rate:
        parts.add("stateful")  # it sets the latency run's rate
    if "memory" in parts:
        parts |= {"window", "stateful"}  # their peak RSS is the memory run's baseline
    paths = tuple(path for path in PATHS if path in parts)
    daemons: dict[str, DaemonResult | None] = {}
    if paths:
        topic = cluster.create_topic(f"bench-{os.getpid()}", PARTITIONS)
        run.say(f"producing {args.events:,} events over {args.keys:,} keys to {topic}")
        run.setup["produce_eps"] = cluster.produce(topic, events.values, events.keys)
        daemons = throughput(run, topic, paths)
    del events
    if "latency" in parts:
        half = args.latency_rate or (run.results.get("stateful_eps") or 40_000.0) / 2
        latencies(run, half, latency_threshold)
    if "memory" in parts:
        memory(run, daemons)
    run.results |= ratios(run.results)
    run.results["cpu_ratios"] = cpu_ratios(run.cpu)
    run.results["cpu_us_per_event"] = run.cpu
    run.results["setup"] = run.setup | {
        "only": args.only,
        "daemon_settings": args.set,
        "partitions": PARTITIONS,
        "features": len(FEATURES),
        "window": WINDOW,
        "model": "seeded random SequenceNet, hidden 64 x 2 layers, classify",
        "onnxruntime_threads": args.threads,
        "naive_events": args.naive_events,
        "memory_keys": args.memory_keys,
        "alert_threshold": alert_threshold,
    }
    run.results["failures"] = run.failures
    run.results["machine"] = machine()
    return run.results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="200,000 events, 200,000 keys")
    parser.add_argument("--events", type=int, help="events of the throughput runs")
    parser.add_argument("--keys", type=int, default=10_000)
    parser.add_argument("--memory-keys", type=int, help="distinct keys of the memory run")
    parser.add_argument("--naive-events", type=int, help="records the naive loop reads")
    parser.add_argument("--latency-seconds", type=float, help="duration of the latency run")
    parser.add_argument(
        "--latency-batch-ms",
        type=int,
        help="batching.max_latency_ms of the latency run (default: the daemon's default)",
    )
    parser.add_argument(
        "--load-generator",
        choices=("java", "python"),
        default="java",
        help="what sends the latency runs' events: bench/LoadGenerator.java in a JVM (a small "
        "fraction of a core), or kafka-python in this process (about 16 us of CPU per event)",
    )
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a setting of every daemon run, named as its SEQSENTINEL_ variable without the "
        "prefix (e.g. KAFKA__LINGER_MS=0); repeatable",
    )
    parser.add_argument(
        "--only",
        type=lambda text: text.split(","),
        metavar="PART[,PART]",
        help=f"measure only these parts ({', '.join(PARTS)}); latency runs stateful first "
        "for its rate unless --latency-rate is given, memory runs window and stateful",
    )
    parser.add_argument(
        "--latency-rate",
        type=float,
        help="events/s of the latency run at half the stateful rate (the other runs at a "
        "fifth of it); default: half the measured stateful_eps",
    )
    parser.add_argument("--bootstrap-servers", help="use this broker instead of starting one")
    parser.add_argument("--cache", type=Path, default=Path(__file__).parent / ".cache")
    parser.add_argument("--json", type=Path, help="write every figure to this JSON file")
    parser.add_argument("--plot", type=Path, help="write a bar chart of events/s (PNG)")
    args = parser.parse_args()
    if unknown := set(args.only or ()) - set(PARTS):
        parser.error(f"--only: unknown part(s) {', '.join(sorted(unknown))}")
    scale = 200_000 if args.quick else 1_000_000
    args.events = args.events or scale
    args.memory_keys = args.memory_keys or scale
    args.naive_events = args.naive_events or (10_000 if args.quick else 30_000)
    args.latency_seconds = args.latency_seconds or (15.0 if args.quick else 30.0)
    with tempfile.TemporaryDirectory(prefix="seqsentinel-bench-") as scratch:
        folder = Path(scratch)
        with contextlib.ExitStack() as stack:
            bootstrap = args.bootstrap_servers or stack.enter_context(
                local_broker(folder / "kafka")
            )
            cluster = Cluster(bootstrap)
            stack.callback(cluster.close)
            results = measure(args, cluster, folder)
    print_report(results)
    if args.json:
        args.json.write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2))
    if args.plot:
        plot(results, args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
