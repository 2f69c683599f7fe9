"""The Kafka side of the throughput benchmark: a local broker, topics, bulk producing, and
`detector run` as a real subprocess watched through its group's committed offsets.

Everything goes through the same script and the same settings an operator uses
(`deploy/kafka/local-kafka`, `SEQSENTINEL_*` variables), so that what is measured is the
product as deployed, not a harness around its internals.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from kafka import KafkaAdminClient, KafkaProducer
from kafka.admin import NewTopic

ROOT = Path(__file__).resolve().parents[1]
LOCAL_KAFKA = ROOT / "deploy" / "kafka" / "local-kafka"
#: How often the committed offsets of a daemon's group are read while it works.
COMMIT_POLL_S = 0.1


def free_ports(count: int) -> list[int]:
    """`count` distinct ports free on 127.0.0.1 right now."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]


@contextlib.contextmanager
def local_broker(folder: Path) -> Iterator[str]:
    """A broker of `deploy/kafka/local-kafka` in `folder`, stopped at the end (or if we die)."""
    port, controller = free_ports(2)
    command = [sys.executable, str(LOCAL_KAFKA)]
    where = ["--dir", str(folder)]
    options = [f"--port={port}", f"--controller-port={controller}", "--timeout=120"]
    started = subprocess.run(
        [*command, "start", *options, *where, f"--exit-with={os.getpid()}"],
        capture_output=True,
        text=True,
        check=False,
    )
    if started.returncode != 0:
        raise RuntimeError(f"local-kafka start failed:\n{started.stderr}")
    try:
        yield started.stdout.strip().splitlines()[-1]
    finally:
        subprocess.run([*command, "stop", *where], capture_output=True, check=False)


class Cluster:
    """Admin work against one bootstrap address."""

    def __init__(self, bootstrap: str) -> None:
        self.bootstrap = bootstrap
        self.admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="seqsentinel-bench")

    def create_topic(self, name: str, partitions: int, **configs: str) -> str:
        topic = NewTopic(name, partitions, 1, topic_configs=configs)
        self.admin.create_topics([topic], timeout_ms=30_000, wait_for_metadata=True)
        return name

    def committed(self, group: str) -> int:
        """Sum of the group's committed offsets (0 before its first commit)."""
        with contextlib.suppress(Exception):  # the group may not exist yet
            offsets = self.admin.list_group_offsets(group).get(group, {})
            return sum(max(o.offset, 0) for o in offsets.values())
        return 0

    def producer(self, **options: object) -> KafkaProducer:
        """A producer for bulk loads: large batches, leader acknowledgement only."""
        defaults: dict[str, object] = {"acks": 1, "linger_ms": 50, "batch_size": 1 << 20}
        return KafkaProducer(bootstrap_servers=self.bootstrap, **(defaults | options))

    def produce(self, topic: str, values: Sequence[bytes], keys: Sequence[bytes]) -> float:
        """Send everything as fast as the client goes; the records per second."""
        producer = self.producer()
        started = time.perf_counter()
        send = producer.send
        for key, value in zip(keys, values, strict=True):
            send(topic, value=value, key=key)
        producer.flush(timeout=300)
        seconds = time.perf_counter() - started
        producer.close()
        return len(values) / seconds

    def close(self) -> None:
        self.admin.close()


class DaemonError(RuntimeError):
    """The daemon exited or took too long; `reason` is its last error log line, if any."""

    def __init__(self, message: str, log_lines: list[str]) -> None:
        super().__init__(message + "\n" + "\n".join(log_lines))
        errors = []
        for line in log_lines:
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                if event.get("level") == "error":
                    errors.append(event["event"])
        self.reason = errors[-1] if errors else message


@dataclass(frozen=True)
class Rate:
    """Events per second of wall time, and CPU time per event of the process doing the work:
    the CPU figure is what other load on a shared machine disturbs least."""

    eps: float
    cpu_us_per_event: float


class Stopwatch:
    """Wall and CPU time of this process from the first event on."""

    def __init__(self) -> None:
        self.started: tuple[float, float] | None = None

    def start(self) -> None:
        self.started = self.started or (time.perf_counter(), time.process_time())

    def rate(self, events: int) -> Rate:
        assert self.started is not None
        wall, cpu = time.perf_counter() - self.started[0], time.process_time() - self.started[1]
        return Rate(events / wall, cpu * 1e6 / events)


@dataclass
class Progress:
    """A daemon's work over time: (seconds, total committed, CPU seconds of the daemon)."""

    samples: list[tuple[float, int, float]] = field(default_factory=list)

    def rate(self) -> Rate:
        """From the first to the last commit."""
        first = next(sample for sample in self.samples if sample[1] > 0)
        last = self.samples[-1]
        events = last[1] - first[1]
        return Rate(events / max(last[0] - first[0], 1e-9), (last[2] - first[2]) * 1e6 / events)


@dataclass
class Daemon:
    """`python -m detector run` with settings given as `SEQSENTINEL_*` variables."""

    cluster: Cluster
    input_topic: str
    model: Path
    folder: Path
    settings: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen | None = None

    def __post_init__(self) -> None:
        self.port = free_ports(1)[0]
        self.group = f"bench-{self.input_topic}-{self.port}"
        self.log = self.folder / f"daemon-{self.group}.log"

    def environment(self) -> dict[str, str]:
        settings = {
            "KAFKA__BOOTSTRAP_SERVERS": self.cluster.bootstrap,
            "KAFKA__GROUP_ID": self.group,
            "TOPICS__INPUT": self.input_topic,
            "TOPICS__ALERTS": f"{self.input_topic}-alerts",
            "TOPICS__DEAD_LETTERS": f"{self.input_topic}-dead",
            "MODEL__PATH": str(self.model),
            "MODEL__PROVIDERS": '["CPUExecutionProvider"]',
            "MODEL__RELOAD_INTERVAL_S": "0",
            "HTTP__HOST": "127.0.0.1",
            "HTTP__PORT": str(self.port),
            "LOG__FORMAT": "json",
        } | self.settings
        inherited = {k: v for k, v in os.environ.items() if not k.startswith("SEQSENTINEL_")}
        return inherited | {f"SEQSENTINEL_{k}": v for k, v in settings.items()}

    def start(self) -> Daemon:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "detector", "run"],
                env=self.environment(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
            )
        return self

    def exited(self) -> int | None:
        assert self.process is not None
        return self.process.poll()

    def wait_ready(self, timeout: float = 60.0) -> None:
        def ready() -> bool:
            with contextlib.suppress(urllib.error.URLError, ConnectionError, TimeoutError):
                url = f"http://127.0.0.1:{self.port}/readyz"
                with urllib.request.urlopen(url, timeout=1) as response:
                    return response.status == 200
            return False

        self._wait(ready, timeout, "to be ready")

    def wait_committed(self, total: int, timeout: float) -> Progress:
        """Watch the group's committed offsets until they reach `total`."""
        progress = Progress()
        started = time.perf_counter()

        def done() -> bool:
            committed = self.cluster.committed(self.group)
            progress.samples.append((time.perf_counter() - started, committed, self.cpu_seconds()))
            return committed >= total

        self._wait(done, timeout, f"to commit {total} records", every=COMMIT_POLL_S)
        return progress

    def _wait(
        self, condition: Callable[[], bool], timeout: float, what: str, every: float = 0.2
    ) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if self.exited() is not None:
                raise DaemonError(f"the daemon exited ({self.exited()})", self.tail())
            if time.monotonic() > deadline:
                raise DaemonError(f"the daemon took over {timeout:.0f} s {what}", self.tail())
            time.sleep(every)

    def cpu_seconds(self) -> float:
        """User and system CPU time of the process so far (/proc/<pid>/stat)."""
        assert self.process is not None
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def peak_rss(self) -> int:
        """Bytes of the process's peak resident set (VmHWM)."""
        assert self.process is not None
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        line = next(line for line in status.splitlines() if line.startswith("VmHWM:"))
        return int(line.split()[1]) * 1024

    def stop(self, timeout: float = 30.0) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.terminate()
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()

    def tail(self, lines: int = 20) -> list[str]:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return text.splitlines()[-lines:]


@contextlib.contextmanager
def running(daemon: Daemon) -> Iterator[Daemon]:
    daemon.start()
    try:
        yield daemon
    finally:
        daemon.stop()
