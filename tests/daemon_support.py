"""Helpers for the daemon tests: small trained models, `detector run` as a real subprocess,
and reading what it wrote to Kafka.

The models are trained for real by `trainer.pipeline.train` on a small synthetic sensor data
set (a few seconds), and cached per test session so that every test file shares them.
"""

from __future__ import annotations

import contextlib
import csv
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka_support import client_config, free_ports
from prometheus_client.parser import text_string_to_metric_families

from detector.contract.manifest import ExportMode
from detector.engine.scorer import Scorer
from detector.files.replay import replay_records

KEY, TIME = "device", "ts"
FEATURES = ("temperature", "vibration")
START = 1_704_067_200  # 2024-01-01T00:00:00Z
STEP_S = 60


def sensor_events(keys: int, per_key: int, seed: int, faults: int = 0) -> list[dict[str, Any]]:
    """Smooth periodic readings per device, interleaved in time order; `faults` devices get
    a burst of wild readings in their second half (what the model should alert on)."""
    rng = np.random.default_rng(seed)
    events = []
    for k in range(keys):
        phase = rng.uniform(0, 2 * np.pi)
        level = rng.uniform(20, 60)
        steps = np.arange(per_key)
        temperature = level + 3 * np.sin(steps / 6 + phase) + rng.normal(0, 0.2, per_key)
        vibration = 5 + np.cos(steps / 4 + phase) + rng.normal(0, 0.1, per_key)
        if k < faults:
            burst = slice(per_key // 2 + k * 3, per_key // 2 + k * 3 + 4)
            temperature[burst] += rng.choice([-1, 1], 4) * rng.uniform(15, 25, 4)
            vibration[burst] += rng.uniform(4, 8, 4)
        times = START + steps * STEP_S + k  # distinct times, keys interleaved
        events += [
            {KEY: f"dev-{seed}-{k:02d}", TIME: int(t), FEATURES[0]: round(float(a), 3)}
            | {FEATURES[1]: round(float(b), 3)}
            for t, a, b in zip(times, temperature, vibration, strict=True)
        ]
    events.sort(key=lambda event: event[TIME])
    return events


def write_csv(path: Path, events: list[dict[str, Any]]) -> Path:
    with path.open("w", newline="") as out:
        writer = csv.DictWriter(out, fieldnames=list(events[0]))
        writer.writeheader()
        writer.writerows(events)
    return path


def model_version(model: Path) -> str:
    """The version a model file carries on its alerts and metrics."""
    from detector.contract.model_file import load_model_file

    return load_model_file(model)[0].model_version


def train_model(
    folder: Path, seed: int = 0, *, export_mode: ExportMode = "window", int8: bool = False
) -> Path:
    """A small forecast model trained for real on clean sensor data; cached in `folder`."""
    # Imported here: only the tests that train need torch.
    from trainer.config import (
        AlertingConfig,
        DataConfig,
        ModelConfig,
        ThresholdConfig,
        TrainConfig,
    )
    from trainer.config import TrainingConfig as Training
    from trainer.pipeline import train

    variant = ("" if export_mode == "window" else f"-{export_mode}") + ("-int8" if int8 else "")
    model = folder / f"model-{seed}{variant}.onnx"
    if model.exists():
        return model
    folder.mkdir(parents=True, exist_ok=True)
    data = write_csv(folder / f"train-{seed}.csv", sensor_events(8, 150, seed=100 + seed))
    config = TrainConfig(
        data=DataConfig(
            key=KEY,
            time=TIME,
            features=[{"name": name, "kind": "numeric"} for name in FEATURES],
            time_delta=True,
        ),
        model=ModelConfig(
            task="forecast",
            window=8,
            min_history=4,
            hidden=8,
            dropout=0.0,
            export_mode=export_mode,
        ),
        training=Training(epochs=4, batch_size=64, learning_rate=0.01, seed=seed, device="cpu"),
        threshold=ThresholdConfig(method="quantile", target=0.995, advanced=AlertingConfig()),
    )
    train(config, [data], model, int8=int8, progress=False)
    return model


def replay_alert_ids(model: Path, records: list[bytes], max_batch: int = 4096) -> set[str]:
    """The alert ids `detector replay` gives for these JSON records."""
    from detector.engine.core import EngineOptions

    scorer = Scorer.load(model, providers=["CPUExecutionProvider"])
    result = replay_records(records, scorer, EngineOptions(max_batch=max_batch))
    return {alert.alert_id for alert in result.alerts}


def encoded(events: Iterable[dict[str, Any]]) -> list[bytes]:
    return [orjson.dumps(event) for event in events]


# -- Kafka ---------------------------------------------------------------------------------


def send(bootstrap: str, topic: str, values: list[bytes], keys: list[bytes | None]) -> None:
    producer = KafkaProducer(acks="all", linger_ms=5, **client_config(bootstrap))
    try:
        for key, value in zip(keys, values, strict=True):
            producer.send(topic, value=value, key=key)
        producer.flush(timeout=30)
    finally:
        producer.close()


def send_events(bootstrap: str, topic: str, values: list[bytes]) -> None:
    """JSON events keyed by their device, as an upstream producer would send them."""
    keys = []
    for value in values:
        try:
            keys.append(str(orjson.loads(value)[KEY]).encode())
        except (orjson.JSONDecodeError, KeyError, TypeError):
            keys.append(None)
    send(bootstrap, topic, values, keys)


@dataclass(frozen=True)
class Message:
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    headers: dict[str, bytes]

    def json(self) -> Any:
        return orjson.loads(self.value)


def read_topic(
    bootstrap: str,
    topic: str,
    at_least: int = 0,
    timeout: float = 30.0,
    isolation_level: str = "read_uncommitted",
) -> list[Message]:
    """Every message of `topic` from the beginning: once `at_least` are there and no more come
    for a moment, or when `timeout` passes. "read_committed" skips aborted transactions."""
    consumer = KafkaConsumer(
        **client_config(bootstrap), enable_auto_commit=False, isolation_level=isolation_level
    )
    try:
        partitions = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
        consumer.assign(partitions)
        consumer.seek_to_beginning(*partitions)
        messages: list[Message] = []
        deadline = time.monotonic() + timeout
        quiet_since = time.monotonic()
        while time.monotonic() < deadline:
            polled = consumer.poll(timeout_ms=200)
            for batch in polled.values():
                messages += [
                    Message(m.partition, m.offset, m.key, m.value, dict(m.headers)) for m in batch
                ]
            if polled:
                quiet_since = time.monotonic()
            elif len(messages) >= at_least and time.monotonic() - quiet_since > 0.5:
                break
        return messages
    finally:
        consumer.close()


def group_offsets(bootstrap: str, group: str, topic: str) -> tuple[dict[int, int | None], dict]:
    """(committed offset, end offset) of each partition of `topic` for consumer group `group`."""
    consumer = KafkaConsumer(**client_config(bootstrap), group_id=group, enable_auto_commit=False)
    try:
        partitions = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
        committed = {tp.partition: consumer.committed(tp) for tp in partitions}
        ends = {tp.partition: offset for tp, offset in consumer.end_offsets(partitions).items()}
        return committed, ends
    finally:
        consumer.close()


def wait_for(condition: Callable[[], Any], timeout: float, what: str, every: float = 0.2) -> Any:
    """Poll `condition` until it returns something truthy; fail with `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


def fully_committed(bootstrap: str, group: str, topic: str) -> bool:
    committed, ends = group_offsets(bootstrap, group, topic)
    return all(committed[p] == ends[p] for p in ends)


# -- the daemon as a subprocess --------------------------------------------------------------


@dataclass
class DaemonProcess:
    """`python -m detector run` configured through SEQSENTINEL_* variables, logging to a file."""

    bootstrap: str
    input_topic: str
    model: Path
    folder: Path
    settings: dict[str, str] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    #: `kafka.client`: the library the daemon consumes and produces with.
    client: str = "kafka-python"
    process: subprocess.Popen | None = None

    def __post_init__(self) -> None:
        self.port = free_ports(1)[0]
        self.group = f"group-{self.input_topic}"
        self.alerts_topic = f"{self.input_topic}-alerts"
        self.dead_letters_topic = f"{self.input_topic}-dead"
        self.log = self.folder / f"daemon-{self.port}.log"

    def environment(self) -> dict[str, str]:
        settings = {
            "KAFKA__BOOTSTRAP_SERVERS": self.bootstrap,
            "KAFKA__CLIENT": self.client,
            "KAFKA__GROUP_ID": self.group,
            "TOPICS__INPUT": self.input_topic,
            "TOPICS__ALERTS": self.alerts_topic,
            "TOPICS__DEAD_LETTERS": self.dead_letters_topic,
            "MODEL__PATH": str(self.model),
            "MODEL__PROVIDERS": '["CPUExecutionProvider"]',
            "MODEL__INTRA_OP_THREADS": "1",
            "HTTP__HOST": "127.0.0.1",
            "HTTP__PORT": str(self.port),
            "LOG__FORMAT": "json",
            "BATCHING__MAX_LATENCY_MS": "20",
            "PROCESSING__SHUTDOWN_TIMEOUT_S": "20",
        } | self.settings
        environment = {k: v for k, v in os.environ.items() if not k.startswith("SEQSENTINEL_")}
        return environment | {f"SEQSENTINEL_{k}": v for k, v in settings.items()} | self.env

    def start(self) -> DaemonProcess:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "detector", "run"],
                env=self.environment(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        return self

    def get(self, path: str) -> tuple[int, bytes]:
        """(status, body) of an ops endpoint; (0, b"") while nothing listens."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=2) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as error:
            return error.code, error.read()
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return 0, b""

    def ready(self) -> bool:
        return self.get("/readyz")[0] == 200

    def wait_ready(self, timeout: float = 60.0) -> DaemonProcess:
        def ready() -> bool:
            if self.process is not None and self.process.poll() is not None:
                raise AssertionError(
                    f"the daemon exited ({self.process.returncode}):\n{self.tail()}"
                )
            return self.ready()

        wait_for(ready, timeout, f"the daemon to be ready:\n{self.tail()}")
        return self

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """Samples of /metrics as {(name, sorted labels): value}."""
        status, body = self.get("/metrics")
        assert status == 200, status
        return {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(body.decode())
            for sample in family.samples
        }

    def records(self) -> float:
        """Records processed so far, of every outcome."""
        return sum(
            v for (name, _), v in self.metrics().items() if name == "seqsentinel_records_total"
        )

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def wait(self, timeout: float = 30.0) -> int:
        assert self.process is not None
        return self.process.wait(timeout=timeout)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait: the exit status."""
        self.signal(signal.SIGTERM)
        return self.wait(timeout)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)

    def tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def log_events(self) -> list[dict[str, Any]]:
        """The daemon's JSON log lines, parsed (others skipped)."""
        events = []
        for line in self.log.read_bytes().splitlines():
            with contextlib.suppress(orjson.JSONDecodeError):
                events.append(orjson.loads(line))
        return events


@contextlib.contextmanager
def running(daemon: DaemonProcess) -> Iterator[DaemonProcess]:
    """Start the daemon; kill it at the end if the test did not stop it."""
    daemon.start()
    try:
        yield daemon
    finally:
        daemon.kill()


def sigkill_cycles(
    start: Callable[[], DaemonProcess], kills: int, serve: Callable[[DaemonProcess], None]
) -> list[int]:
    """`kills` times: start a daemon, let `serve` decide how long it runs, SIGKILL it. The
    exit statuses (-9 each when every daemon was still running)."""
    statuses = []
    for _ in range(kills):
        with running(start()) as daemon:
            serve(daemon)
            daemon.kill()
            statuses.append(daemon.process.returncode)
    return statuses


def run_until_committed(daemon: DaemonProcess, timeout: float = 90.0) -> DaemonProcess:
    """Run `daemon` until its group committed every record of its input, then stop it; it
    must exit cleanly."""
    with running(daemon):
        daemon.wait_ready(timeout)
        committed = partial(fully_committed, daemon.bootstrap, daemon.group, daemon.input_topic)
        wait_for(committed, timeout, f"the daemon to commit everything:\n{daemon.tail()}")
        assert daemon.stop() == 0, daemon.tail()
    return daemon
