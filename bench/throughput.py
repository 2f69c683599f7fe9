"""Speed, latency and memory of `detector run` through a real Kafka broker, against the ceiling
of each Kafka client and a naive baseline, all measured in one run on one machine.

    python bench/throughput.py [--quick] [--json OUT] [--plot PNG] [--bootstrap-servers H:P]
                               [--clients kafka-python,confluent] [--events N] [--keys K]
                               [--memory-keys M] [--threads T] [--only PART[,PART]]
                               [--latency-rate R] [--set NAME=VALUE]
                               [--load-generator java|python]

1. Pre-produces N JSON events (8 standard-normal features) over K keys to a topic of 4
   partitions, keyed by the device, on a broker started with deploy/kafka/local-kafka.
2. For each client of `--clients` (`kafka.client`: kafka-python, confluent), reads the topic
   from the start with a fresh consumer group each time:
   `raw_consume` (the client polling and JSON-decoding only: the ceiling),
   `naive_stateful` and `naive_window` (per record: decode, the key's state or window in
   Python, one onnxruntime call of the stateful or the window model, an alert when over the
   threshold; on the first `--naive-events` records only, they are slow),
   `window`, `stateful` and `exactly_once` (`detector run` as a subprocess, from its first
   to its last committed offset). Figures of the confluent client are prefixed `confluent_`.
3. Latency, per client: a fresh topic fed at half that client's `stateful_eps` (or
   `--latency-rate`) and at a tenth, with a threshold that 1% of the events' scores reach,
   by `bench/LoadGenerator.java` in a JVM of its own (or by kafka-python in this process:
   `--load-generator python`); each alert's broker append time (LogAppendTime) minus its
   event's produce time, and the detector's part, from the event's append.
4. Memory (the first client): `detector run` over M events of M distinct keys; peak RSS
   (VmHWM) minus the peak of the run over K keys, per extra key.

The models are seeded random networks (see `seeded_models`): speed does not depend on what
the weights learned. Each model's threshold is fitted on a calibration stream in which every
key has a full window, as keys of a long-running stream do; the alert rate each run had is
reported beside its rate.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import importlib.util
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from importlib.metadata import PackageNotFoundError, version
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
    ROOT,
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

import detector
from detector.config import Settings, load_settings
from detector.contract.model_file import (
    INPUT_C,
    INPUT_EVENTS,
    INPUT_H,
    INPUT_LENGTHS,
    OUTPUT_C,
    OUTPUT_H,
    OUTPUT_SCORE,
)
from detector.engine.core import Engine, EngineOptions
from detector.engine.records import InputRecord
from detector.engine.scorer import Scorer
from detector.stream.clients import make_consumer

PARTITIONS = 4
START_TIME = 1_704_067_200.0
CPU = ["CPUExecutionProvider"]
#: Share of scores over the threshold: of full-window scores in the throughput runs, which
#: alert rarely; of the very events sent in the latency runs, which alert often enough for a
#: good p99 at either rate (their keys are young: a full-window threshold would leave a run
#: at a tenth of the rate a handful of alerts).
THROUGHPUT_ALERT_SHARE = 0.001
LATENCY_ALERT_SHARE = 0.01
#: The calibration stream that places the thresholds at those shares: this many keys with
#: about this many events each, of which those after the key's first `WINDOW - 1` count.
CALIBRATION_KEYS = 1_000
CALIBRATION_EVENTS_PER_KEY = 100
#: How long reading a latency run's topics back may take.
READ_TIMEOUT_S = 120.0
#: The latency runs' Java load generator, and the JVM options that keep it small: one
#: garbage-collector thread, and the quick C1 compiler only (its start-up costs less). It
#: holds every event in memory: 30 s at 60,000 events/s is 1.8 million lines.
GENERATOR = Path(__file__).with_name("LoadGenerator.java")
GENERATOR_JVM_OPTIONS = ("-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1", "-Xmx1g")
CLIENTS = ("kafka-python", "confluent")
MODES = ("window", "stateful")
#: Per client: the rates measured, in the order they are measured.
PATHS = ("raw_consume", "naive_stateful", "naive_window", "window", "stateful", "exactly_once")
DAEMON_PATHS = ("window", "stateful", "exactly_once")
PARTS = ("raw_consume", "naive", *DAEMON_PATHS, "latency", "memory")
#: Ratios of two rates of one client, measured in the same run: (numerator, denominator).
CLIENT_RATIOS = {
    "stateful_vs_ceiling": ("stateful", "raw_consume"),
    "stateful_vs_naive": ("stateful", "naive_stateful"),
    "window_vs_naive": ("window", "naive_window"),
    "exactly_once_vs_stateful": ("exactly_once", "stateful"),
}
GOALS = {
    "stateful_vs_ceiling": (">=", 0.6),
    "confluent_stateful_vs_ceiling": (">=", 0.5),
    "confluent_vs_kafka_python_stateful": (">=", 2.0),
    "stateful_vs_naive": (">=", 30.0),
    "window_vs_naive": (">=", 4.0),
    "exactly_once_vs_stateful": (">=", 0.8),
    "confluent_exactly_once_vs_stateful": (">=", 0.8),
    "p99_latency_ms": ("<=", 50.0),
    "confluent_p99_latency_ms": ("<=", 50.0),
    "bytes_per_key_stateful": ("<=", 2048.0),
}


def prefix(client: str) -> str:
    """What the figures of `client` are named with: nothing for kafka-python (the default
    client, as the figures were named before there were two), `confluent_` for confluent."""
    return "" if client == "kafka-python" else f"{client}_"


def default_clients() -> tuple[str, ...]:
    """Both clients where confluent-kafka is installed, else kafka-python alone."""
    return CLIENTS if importlib.util.find_spec("confluent_kafka") else CLIENTS[:1]


def default_cache() -> Path:
    """Where the exported models are kept: the user's cache folder, or the temporary folder
    when that cannot be written; never the checkout, which may be read-only."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    temporary = Path(tempfile.gettempdir()) / f"seqsentinel-bench-{os.getuid()}"
    for folder in (Path(base) / "seqsentinel-bench", temporary):
        with contextlib.suppress(OSError):
            folder.mkdir(parents=True, exist_ok=True)
            if os.access(folder, os.W_OK):
                return folder
    raise OSError("no writable cache folder for the benchmark's models (use --cache)")


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


# -- thresholds ---------------------------------------------------------------------------


def key_ordinals(keys: Sequence[bytes]) -> np.ndarray:
    """Each event's place in its key's history: 0 for the key's first event."""
    seen: collections.Counter[bytes] = collections.Counter()
    ordinals = np.empty(len(keys), np.int64)
    for i, key in enumerate(keys):
        ordinals[i] = seen[key]
        seen[key] += 1
    return ordinals


def full_window_scores(scores: np.ndarray, ordinals: np.ndarray, window: int) -> np.ndarray:
    """The scores of events whose key has a full window (the event and `window - 1` before
    it), NaN left out: a young key's scores differ from those of the keys of a long-running
    stream, which a threshold is meant for."""
    kept = scores[ordinals >= window - 1]
    return kept[~np.isnan(kept)]


def fit_threshold(scores: np.ndarray, share: float) -> float:
    """The threshold that `share` of `scores` reach."""
    if scores.size * share < 1:
        raise ValueError(f"{scores.size} scores are too few to place {share:g} of them")
    return float(np.quantile(scores, 1 - share))


def scores(model: Path, records: list[InputRecord]) -> np.ndarray:
    """The engine's score of each record (NaN where none), alerting on nothing."""
    engine = Engine(Scorer.load(model, providers=CPU), EngineOptions(threshold=np.inf))
    return engine.process(records).scores


def throughput_threshold(model: Path) -> float:
    """The model's threshold for the throughput runs, from a calibration stream."""
    keys = CALIBRATION_KEYS
    events = make_events(keys * CALIBRATION_EVENTS_PER_KEY, keys, seed=3)
    full = full_window_scores(scores(model, events.records()), key_ordinals(events.keys), WINDOW)
    return fit_threshold(full, THROUGHPUT_ALERT_SHARE)


# -- in-process readers: the ceilings and the naive loops ---------------------------------


def client_settings(cluster: Cluster, group: str) -> Settings:
    """The daemon's settings, as far as its consumer goes, for a group of the benchmark."""
    return load_settings(kafka={"bootstrap_servers": cluster.bootstrap, "group_id": group})


def consumer(cluster: Cluster, topic: str, group: str) -> KafkaConsumer:
    """A kafka-python consumer configured exactly as the daemon's (fetch sizes, poll size)."""
    reader = make_consumer(client_settings(cluster, group))
    reader.subscribe([topic])
    return reader


def confluent_consumer(cluster: Cluster, topic: str, group: str) -> Any:
    """A confluent-kafka consumer configured exactly as the daemon's (`consumer_config`)."""
    from confluent_kafka import Consumer

    from detector.stream.confluent import consumer_config

    reader = Consumer(consumer_config(client_settings(cluster, group)))
    reader.subscribe([topic])
    return reader


def raw_consume(cluster: Cluster, topic: str, total: int) -> Rate:
    """kafka-python polling and JSON-decoding, nothing else."""
    reader = consumer(cluster, topic, f"{topic}-raw")
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


def confluent_raw_consume(cluster: Cluster, topic: str, total: int) -> Rate:
    """confluent-kafka (librdkafka) `consume()` in batches of the daemon's poll size and
    JSON-decoding, nothing else."""
    reader = confluent_consumer(cluster, topic, f"{topic}-confluent-raw")
    size = client_settings(cluster, "-").kafka.max_poll_records
    loads, seen, clock = orjson.loads, 0, Stopwatch()
    try:
        while seen < total:
            batch = reader.consume(num_messages=size, timeout=0.5)
            if batch:
                clock.start()
            for message in batch:
                if message.error() is None:
                    loads(message.value())
                    seen += 1
        return clock.rate(seen)
    finally:
        reader.close()


#: A batch of records as (key, value).
Batch = list[tuple[bytes, bytes]]


def batches(client: str, cluster: Cluster, topic: str, group: str, total: int) -> Iterator[Batch]:
    """The first `total` records of `topic`, in the batches `client` returns them."""
    if client == "confluent":
        reader = confluent_consumer(cluster, topic, group)
        size = client_settings(cluster, group).kafka.max_poll_records
        try:
            while total > 0:
                got = reader.consume(num_messages=min(total, size), timeout=0.5)
                if batch := [(m.key(), m.value()) for m in got if m.error() is None]:
                    total -= len(batch)
                    yield batch
        finally:
            reader.close()
        return
    reader = consumer(cluster, topic, group)
    try:
        while total > 0:
            for part in reader.poll(timeout_ms=500, max_records=total).values():
                total -= len(part)
                yield [(m.key, m.value) for m in part]
    finally:
        reader.close(autocommit=False)


@contextlib.contextmanager
def alert_sender(client: str, cluster: Cluster) -> Iterator[Callable[[str, bytes], None]]:
    """`send(topic, value)` of `client`'s producer (acks=all, linger 5 ms), flushed at the end."""
    if client == "confluent":
        from confluent_kafka import Producer

        producer = Producer({"bootstrap.servers": cluster.bootstrap, "acks": "all", "linger.ms": 5})

        def send(topic: str, value: bytes) -> None:
            producer.produce(topic, value)
            producer.poll(0)

        yield send
        producer.flush(30)
        return
    kafka_producer = cluster.producer(acks="all", linger_ms=5)
    try:
        yield lambda topic, value: kafka_producer.send(topic, value)
        kafka_producer.flush()
    finally:
        kafka_producer.close()


#: Scores one event of a key, from its features, keeping the key's history as it goes.
NaiveScorer = Callable[[bytes, list[float]], float]


def naive_window_scorer(scorer: Scorer) -> NaiveScorer:
    """The textbook window: the key's last `WINDOW` events in a deque, padded and scored
    alone (32 LSTM steps per event)."""
    run, width = scorer.session.run, len(FEATURES)
    history: dict[bytes, collections.deque] = collections.defaultdict(
        lambda: collections.deque(maxlen=WINDOW)
    )

    def score(key: bytes, features: list[float]) -> float:
        events = history[key]
        events.append(features)
        window = np.zeros((1, WINDOW, width), np.float32)
        window[0, : len(events)] = events
        lengths = np.array([len(events)], np.int64)
        return float(run(None, {INPUT_EVENTS: window, INPUT_LENGTHS: lengths})[0][0])

    return score


def naive_stateful_scorer(scorer: Scorer) -> NaiveScorer:
    """The textbook stateful loop: the key's LSTM state (h, c) in a dict, one step per event."""
    run = scorer.session.run
    outputs = [OUTPUT_SCORE, OUTPUT_H, OUTPUT_C]
    fresh = scorer.zero_state(1)
    state: dict[bytes, tuple[np.ndarray, np.ndarray]] = {}

    def score(key: bytes, features: list[float]) -> float:
        h, c = state.get(key, fresh)
        x = np.array([features], np.float32)
        out, h, c = run(outputs, {INPUT_EVENTS: x, INPUT_H: h, INPUT_C: c})
        state[key] = (h, c)
        return float(out[0])

    return score


def naive(
    client: str, cluster: Cluster, topic: str, model: Path, threshold: float, total: int
) -> Rate:
    """The textbook loop, one record at a time, over the first `total` records, with the
    model's export mode (window or stateful) as the daemon it is compared with runs it."""
    scorer = Scorer.load(model, providers=CPU, intra_op_threads=1)
    mode = scorer.manifest.export_mode
    score = naive_window_scorer(scorer) if mode == "window" else naive_stateful_scorer(scorer)
    alerts = cluster.create_topic(f"{topic}-naive-{mode}-{client}-alerts", PARTITIONS)
    seen, clock = 0, Stopwatch()
    with alert_sender(client, cluster) as send:
        for batch in batches(client, cluster, topic, f"{topic}-naive-{mode}-{client}", total):
            clock.start()
            for key, value in batch:
                record = orjson.loads(value)
                got = score(key, [float(record[name]) for name in FEATURES])
                if got >= threshold:
                    alert = {"key": key.decode(), "score": got, TIME: record[TIME]}
                    send(alerts, orjson.dumps(alert))
            seen += len(batch)
        return clock.rate(seen)


# -- the daemon ---------------------------------------------------------------------------


@dataclass(frozen=True)
class DaemonResult:
    rate: Rate
    peak_rss: int
    alerts: int


def daemon_eps(
    cluster: Cluster, topic: str, model: Path, folder: Path, total: int, settings: dict[str, str]
) -> DaemonResult:
    """`detector run` from the start of `topic` until every record is committed, however
    long that takes while its commits advance."""
    with running(Daemon(cluster, topic, model, folder, settings)) as daemon:
        progress = daemon.wait_committed(total)
        daemon.check_client()
        alerts = int(daemon.metric("seqsentinel_alerts_total"))
        return DaemonResult(progress.rate(), daemon.peak_rss(), alerts)


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
    threshold: float
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
        said = done.stderr.strip().splitlines() or [f"exit status {done.returncode}"]
        raise DaemonError(f"the Java load generator failed: {said[-1]}", said)
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
    name = cluster.name(f"latency-{settings.get('KAFKA__CLIENT', 'kafka-python')}-{int(rate)}")
    topic = cluster.create_topic(name, PARTITIONS, **append_time)
    alerts = cluster.create_topic(f"{topic}-alerts", PARTITIONS, **append_time)
    rng = np.random.default_rng(7)
    count = int(rate * seconds)
    names = [f"dev-{d}".encode() for d in rng.integers(0, keys, count).tolist()]
    tails = [
        b"," + orjson.dumps(dict(zip(FEATURES, row, strict=True)))[1:]
        for row in rng.standard_normal((count, len(FEATURES))).tolist()
    ]
    events = list(zip(names, tails, strict=True))
    head, at = b'{"%s":"%s","%s":%.2f', START_TIME
    replayed = [
        InputRecord(head % (KEY.encode(), name, TIME.encode(), at + i * 0.01) + tail, name.decode())
        for i, (name, tail) in enumerate(events)
    ]
    scored = scores(model, replayed)
    threshold = fit_threshold(scored[~np.isnan(scored)], LATENCY_ALERT_SHARE)
    settings = settings | {"SCORING__THRESHOLD": repr(threshold)}
    del replayed, scored
    with running(Daemon(cluster, topic, model, folder, settings)) as daemon:
        daemon.wait_ready()
        daemon.check_client()
        cpu_before = daemon.cpu_seconds()
        if generator == "java":
            sent = generate_java(cluster, topic, events, rate, folder)
        else:
            sent = generate_python(cluster, topic, events, rate)
        daemon.wait_committed(count)
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
    scorer = Scorer.load(model, providers=CPU)
    engine = Engine(scorer, EngineOptions(threshold=threshold, key_ttl_s=0.0))
    in_send_order = sorted(appended, key=produced_ms.__getitem__)
    records = [InputRecord(appended[a].value, appended[a].key.decode()) for a in in_send_order]
    return Latency(
        rate_eps=rate,
        threshold=threshold,
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
        "confluent_kafka": _version("confluent-kafka"),
        "librdkafka": _librdkafka(),
        "numpy": np.__version__,
        "orjson": version("orjson"),
        "msgspec": version("msgspec"),
        "platform": platform.platform(),
    }


def _version(package: str) -> str | None:
    with contextlib.suppress(PackageNotFoundError):
        return version(package)
    return None


def _librdkafka() -> str | None:
    if importlib.util.find_spec("confluent_kafka") is None:
        return None
    import confluent_kafka

    return confluent_kafka.libversion()[0]


def checkout() -> dict[str, Any]:
    """The code measured: the commit of the checkout this file belongs to (None outside a git
    checkout), and whether the `detector` imported here is that checkout's."""
    done = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, check=False
    )
    imported = Path(detector.__file__).resolve().parent
    return {
        "commit": done.stdout.strip() if done.returncode == 0 else None,
        "detector_from_checkout": imported == ROOT / "detector",
    }


def ratio_pairs(clients: Sequence[str]) -> dict[str, tuple[str, str]]:
    """Each ratio of the run: its name and the two figures (numerator, denominator), without
    their `_eps`."""
    pairs = {
        prefix(client) + name: (prefix(client) + top, prefix(client) + bottom)
        for client in clients
        for name, (top, bottom) in CLIENT_RATIOS.items()
    }
    if set(CLIENTS) <= set(clients):
        pairs["confluent_vs_kafka_python_stateful"] = ("confluent_stateful", "stateful")
    return pairs


def ratios(results: dict[str, Any], clients: Sequence[str]) -> dict[str, float | None]:
    """The ratios from events per second of wall time."""

    def ratio(top: str, bottom: str) -> float | None:
        a, b = results.get(f"{top}_eps"), results.get(f"{bottom}_eps")
        return None if a is None or not b else a / b

    return {name: ratio(*pair) for name, pair in ratio_pairs(clients).items()}


def cpu_ratios(cpu: dict[str, float | None], clients: Sequence[str]) -> dict[str, float | None]:
    """The ratios again from CPU time per event (events per CPU second), which other load on
    the machine disturbs far less than wall time."""

    def ratio(top: str, bottom: str) -> float | None:
        a, b = cpu.get(top), cpu.get(bottom)
        return None if a is None or b is None else b / a

    return {name: ratio(*pair) for name, pair in ratio_pairs(clients).items()}


def goal_rows(results: dict[str, Any]) -> list[tuple[str, ...]]:
    """Per goal of the figures measured: the figure (wall time), the same ratio from CPU time,
    the goal, whether met."""
    rows = []
    for name, (sense, goal) in GOALS.items():
        if name not in results:
            continue
        value = results[name]
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
    for client, measured in results["setup"].get("latency", {}).items():
        print_latencies(console, client, measured)
    for name, reason in results["failures"].items():
        console.print(f"{name} is null: {reason}")


def print_latencies(
    console: Console, client: str, measured: dict[str, dict[str, Any] | None]
) -> None:
    lats = Table(title=f"{client}: latency (ms), produce timestamp to the alert's append")
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
    for column in ("client", "path", "events/s", "CPU µs/event", "alerts/event"):
        rates.add_column(column, justify="right")
    for client in results["clients"]:
        for name in PATHS:
            figure = prefix(client) + name
            alert_rate = results["alert_rate"].get(figure)
            rates.add_row(
                client,
                name,
                _shown(results.get(f"{figure}_eps"), 0),
                _shown(results["cpu_us_per_event"].get(figure), 1),
                "" if alert_rate is None else f"{alert_rate:.3%}",
            )
    goals = Table(title="goals")
    for column in ("figure", "measured", "by CPU time", "goal", "met"):
        goals.add_column(column, justify="right")
    for row in goal_rows(results):
        goals.add_row(*row)
    console.print(rates, goals)
    for name, by_cpu in results["cpu_ratios"].items():
        if name not in GOALS:
            console.print(f"{name}: {_shown(results[name])} (by CPU time {_shown(by_cpu)})")
    if "bytes_per_key_window" in results:
        console.print(f"bytes_per_key_window: {_shown(results['bytes_per_key_window'])}")


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    clients = results["clients"]
    figure, axes = pyplot.subplots(figsize=(8, 3.8), layout="constrained")
    width = 0.8 / len(clients)
    for i, client in enumerate(clients):
        values = [results.get(f"{prefix(client)}{name}_eps") or 0.0 for name in PATHS]
        spots = [j + (i - (len(clients) - 1) / 2) * width for j in range(len(PATHS))]
        bars = axes.bar(spots, values, width, label=client)
        axes.bar_label(bars, [f"{v / 1000:,.0f}k" if v else "n/a" for v in values], fontsize=7)
    axes.set_xticks(range(len(PATHS)), PATHS, fontsize=8)
    axes.set_ylabel("events/s")
    axes.legend()
    cores = results["machine"]["cores"]
    axes.set_title(f"detector run through Kafka, {cores} cores ({results['events']:,} events)")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)


# -- main ---------------------------------------------------------------------------------


def measurement_errors() -> tuple[type[BaseException], ...]:
    """What a failed measurement raises: the daemon's failure, or either client's error."""
    errors: tuple[type[BaseException], ...] = (DaemonError, KafkaError)
    if importlib.util.find_spec("confluent_kafka") is not None:
        from confluent_kafka import KafkaException

        errors += (KafkaException,)
    return errors


@dataclass
class Run:
    """One benchmark run: its options, the broker, and the figures as they are measured."""

    args: argparse.Namespace
    cluster: Cluster
    folder: Path
    models: dict[str, Path]
    thresholds: dict[str, float]
    settings: dict[str, str]
    results: dict[str, Any] = field(default_factory=dict)
    cpu: dict[str, float | None] = field(default_factory=dict)
    alert_rate: dict[str, float | None] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)
    setup: dict[str, Any] = field(default_factory=dict)
    say: Callable[..., None] = field(default_factory=lambda: Console(stderr=True).log)

    def attempt(self, name: str, measurement: Callable[[], Any]) -> Any:
        """Run one measurement; a failure is recorded with its reason and the run goes on."""
        try:
            return measurement()
        except measurement_errors() as error:
            self.failures[name] = getattr(error, "reason", str(error))
            self.say(f"[red]{name} failed:[/red] {self.failures[name]}")
            return None

    def rate(self, figure: str, measurement: Callable[[], Rate | None]) -> None:
        """Measure and keep `figure`'s events/s and CPU µs/event (null when it failed)."""
        got = self.attempt(f"{figure}_eps", measurement)
        self.results[f"{figure}_eps"] = got and got.eps
        self.cpu[figure] = got and got.cpu_us_per_event

    def daemon(
        self, client: str, name: str, topic: str, mode: str, total: int, **extra: str
    ) -> Any:
        """`detector run` of `client` over `topic`; None if it failed (the reason kept under
        `name`). Its threshold is its model's."""
        settings = self.settings | {
            "KAFKA__CLIENT": client,
            "SCORING__THRESHOLD": repr(self.thresholds[mode]),
        }
        return self.attempt(
            name,
            lambda: daemon_eps(
                self.cluster, topic, self.models[mode], self.folder, total, settings | extra
            ),
        )


def throughput(
    run: Run, client: str, topic: str, parts: set[str]
) -> dict[str, DaemonResult | None]:
    """The rates of `client` over `topic`; the daemons' results (for their peak RSS)."""
    args, cluster, p = run.args, run.cluster, prefix(client)
    if "raw_consume" in parts:
        run.say(f"{client} ceiling: poll + JSON decode")
        reader = confluent_raw_consume if client == "confluent" else raw_consume
        run.rate(f"{p}raw_consume", lambda: reader(cluster, topic, args.events))
    if "naive" in parts:
        for mode in ("stateful", "window"):
            run.say(f"{client} naive {mode} loop on the first {args.naive_events:,} records")
            model, threshold = run.models[mode], run.thresholds[mode]
            run.rate(
                f"{p}naive_{mode}",
                lambda model=model, threshold=threshold: naive(
                    client, cluster, topic, model, threshold, args.naive_events
                ),
            )
    daemons: dict[str, DaemonResult | None] = {}
    for name, mode, extra in (
        ("window", "window", {}),
        ("stateful", "stateful", {}),
        ("exactly_once", "stateful", {"PROCESSING__GUARANTEE": "exactly_once"}),
    ):
        if name not in parts:
            continue
        run.say(f"{client} detector run: {name}")
        done = run.daemon(client, f"{p}{name}_eps", topic, mode, args.events, **extra)
        daemons[name] = done
        run.results[f"{p}{name}_eps"] = done and done.rate.eps
        run.cpu[p + name] = done and done.rate.cpu_us_per_event
        run.alert_rate[p + name] = done and done.alerts / args.events
    return daemons


def latencies(run: Run, client: str, half: float) -> None:
    """At half the stateful rate (the goal's load), and at a tenth: the detector's own latency
    when the load generator and the broker leave it a core."""
    args, p = run.args, prefix(client)
    settings = run.settings | {"KAFKA__CLIENT": client}
    if args.latency_batch_ms is not None:
        settings["BATCHING__MAX_LATENCY_MS"] = str(args.latency_batch_ms)
    measured: dict[str, Latency | None] = {}
    for name, rate in (("half", half), ("tenth", half / 5)):
        run.say(f"{client} latency at {rate:,.0f} events/s for {args.latency_seconds:.0f} s")
        measured[name] = lat = run.attempt(
            f"{p}latency_{name}",
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
        f"{p}p50_latency_ms": lat and lat.p50_ms,
        f"{p}p99_latency_ms": lat and lat.p99_ms,
        f"{p}max_latency_ms": lat and lat.max_ms,
    }
    run.setup.setdefault("latency", {})[client] = {
        name: lat and asdict(lat) for name, lat in measured.items()
    }


def memory(run: Run, client: str, daemons: dict[str, DaemonResult | None]) -> None:
    """Peak RSS over `--memory-keys` distinct keys against the runs over `--keys`, per key."""
    args = run.args
    run.say(f"memory: {args.memory_keys:,} events of as many keys ({client})")
    many = make_events(args.memory_keys, args.memory_keys, seed=2, distinct=True)
    topic = run.cluster.create_topic(run.cluster.name("keys"), PARTITIONS)
    run.cluster.produce(topic, many.values, many.keys)
    del many
    extra_keys = args.memory_keys - args.keys
    for mode in MODES:
        big = run.daemon(client, f"bytes_per_key_{mode}", topic, mode, args.memory_keys)
        small = daemons.get(mode)
        run.results[f"bytes_per_key_{mode}"] = (
            (big.peak_rss - small.peak_rss) / extra_keys if big and small else None
        )
        run.results[f"peak_rss_{mode}_bytes"] = big and big.peak_rss
    run.setup["memory_client"] = client
    run.setup["peak_rss_few_keys"] = {
        mode: daemon and daemon.peak_rss for mode, daemon in daemons.items()
    }


def measure(args: argparse.Namespace, cluster: Cluster, folder: Path) -> dict[str, Any]:
    """Every figure of the run, or those of the parts named by `--only`."""
    models = {mode: bench_model(args.cache, mode) for mode in MODES}
    run = Run(
        args,
        cluster,
        folder,
        models,
        {mode: throughput_threshold(model) for mode, model in models.items()},
        {"MODEL__INTRA_OP_THREADS": str(args.threads), "STATE__KEY_TTL_S": "0"}
        | dict(setting.split("=", 1) for setting in args.set),
    )
    run.results |= {"events": args.events, "keys": args.keys, "clients": args.clients}
    parts = set(args.only or PARTS)
    if "latency" in parts and not args.latency_rate:
        parts.add("stateful")  # it sets the latency run's rate
    if "memory" in parts:
        parts |= set(MODES)  # their peak RSS is the memory run's baseline
    daemons: dict[str, dict[str, DaemonResult | None]] = {}
    if parts & {"raw_consume", "naive", *DAEMON_PATHS}:
        events = make_events(args.events, args.keys, seed=1)
        topic = cluster.create_topic(cluster.name("input"), PARTITIONS)
        run.say(f"producing {args.events:,} events over {args.keys:,} keys to {topic}")
        run.setup["produce_eps"] = cluster.produce(topic, events.values, events.keys)
        del events
        for client in args.clients:
            daemons[client] = throughput(run, client, topic, parts)
    if "latency" in parts:
        for client in args.clients:
            stateful = run.results.get(f"{prefix(client)}stateful_eps")
            latencies(run, client, args.latency_rate or (stateful or 40_000.0) / 2)
    if "memory" in parts:
        client = args.clients[0]
        memory(run, client, daemons.get(client, {}))
    run.results |= ratios(run.results, args.clients)
    run.results["cpu_ratios"] = cpu_ratios(run.cpu, args.clients)
    run.results["cpu_us_per_event"] = run.cpu
    run.results["alert_rate"] = run.alert_rate
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
        "thresholds": run.thresholds,
        "threshold_fit": {
            "keys": CALIBRATION_KEYS,
            "events": CALIBRATION_KEYS * CALIBRATION_EVENTS_PER_KEY,
            "scores": "events whose key has a full window",
            "alert_share": THROUGHPUT_ALERT_SHARE,
            "latency_alert_share": LATENCY_ALERT_SHARE,
            "latency_scores": "every event the latency run sends",
        },
        "latency_batching_max_latency_ms": args.latency_batch_ms,
        "latency_load_generator": args.load_generator,
        "checkout": checkout(),
    }
    run.results["failures"] = run.failures
    run.results["machine"] = machine()
    return run.results


def client_list(text: str) -> tuple[str, ...]:
    """`--clients`: names separated by commas, each once, in the order given."""
    names = tuple(dict.fromkeys(name.strip() for name in text.split(",") if name.strip()))
    if not names or set(names) - set(CLIENTS):
        raise argparse.ArgumentTypeError(f"choose among {', '.join(CLIENTS)}")
    return names


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="200,000 events (over --keys keys) instead of 1,000,000, 200,000 keys in the "
        "memory run, 10,000 naive records, latency runs of 15 s",
    )
    parser.add_argument("--events", type=int, help="events of the throughput runs")
    parser.add_argument("--keys", type=int, default=10_000)
    parser.add_argument(
        "--clients",
        type=client_list,
        default=default_clients(),
        metavar="CLIENT[,CLIENT]",
        help=f"the Kafka clients (kafka.client) to measure; default: {','.join(default_clients())}",
    )
    parser.add_argument("--memory-keys", type=int, help="distinct keys of the memory run")
    parser.add_argument("--naive-events", type=int, help="records each naive loop reads")
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
        "fifth of it); default: half the measured stateful_eps of each client",
    )
    parser.add_argument("--bootstrap-servers", help="use this broker instead of starting one")
    parser.add_argument(
        "--cache", type=Path, help="folder of the exported models (default: the user's cache)"
    )
    parser.add_argument("--json", type=Path, help="write every figure to this JSON file")
    parser.add_argument("--plot", type=Path, help="write a bar chart of events/s (PNG)")
    args = parser.parse_args()
    if unknown := set(args.only or ()) - set(PARTS):
        parser.error(f"--only: unknown part(s) {', '.join(sorted(unknown))}")
    if not checkout()["detector_from_checkout"]:
        parser.error(f"detector is imported from {detector.__file__}, not from {ROOT}")
    scale = 200_000 if args.quick else 1_000_000
    args.cache = args.cache or default_cache()
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
