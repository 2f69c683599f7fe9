"""The Kafka side of the throughput benchmark: a local broker, topics, bulk producing, and
`detector run` as a real subprocess watched through its group's committed offsets.

Everything goes through the same script and the same settings an operator uses
(`deploy/kafka/local-kafka`, `SEQSENTINEL_*` variables), so that what is measured is the
product as deployed, not a harness around its internals.

Importing this module puts the checkout it belongs to first on `sys.path`, and every daemon
runs with the same interpreter and that checkout as its `PYTHONPATH`: the benchmark and the
daemons it starts measure the same code, whichever checkout is installed in the venv.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
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
from kafka.errors import KafkaError

ROOT = Path(__file__).resolve().parents[1]
if sys.path[:1] != [str(ROOT)]:
    sys.path.insert(0, str(ROOT))
LOCAL_KAFKA = ROOT / "deploy" / "kafka" / "local-kafka"
#: How often the committed offsets of a daemon's group are read while it works.
COMMIT_POLL_S = 0.1
#: A daemon that has committed nothing this long after its start has failed...
START_TIMEOUT_S = 120.0
#: ...and so has one whose committed offsets have not moved for this long: a slow daemon
#: still advances, and is measured as slow rather than recorded as a failure.
STALL_TIMEOUT_S = 60.0


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
    """Admin work against one bootstrap address. Every topic and group of the run has the run's
    tag in its name, so that `close()` can delete them all from a broker that outlives it."""

    def __init__(self, bootstrap: str) -> None:
        self.bootstrap = bootstrap
        self.admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="seqsentinel-bench")
        self.tag = f"{os.getpid()}-{secrets.token_hex(3)}"

    def name(self, kind: str) -> str:
        """A topic name of this run."""
        return f"bench-{self.tag}-{kind}"

    def create_topic(self, name: str, partitions: int, **configs: str) -> str:
        topic = NewTopic(name, partitions, 1, topic_configs=configs)
        self.admin.create_topics([topic], timeout_ms=30_000, wait_for_metadata=True)
        return name

    def delete_run_topics(self) -> list[str]:
        """Delete the topics and consumer groups of this run (those the daemons created too)."""
        topics = [name for name in self.admin.list_topics() if self.tag in name]
        if topics:
            self.admin.delete_topics(topics, timeout_ms=30_000)
        listed = self.admin.list_groups()
        names = [g["group_id"] if isinstance(g, dict) else g[0] for g in listed]
        if groups := [name for name in names if self.tag in name]:
            with contextlib.suppress(KafkaError):  # a group still closing is left to expire
                self.admin.delete_groups(groups)
        return topics

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
        """Delete the run's topics and groups (a failure to is reported, not raised: the
        figures are measured by then) and close the admin client."""
        try:
            self.delete_run_topics()
        except KafkaError as error:
            print(f"the run's topics were not all deleted: {error}", file=sys.stderr)
        finally:
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

    def stuck(self, start_timeout: float, stall_timeout: float) -> str | None:
        """Why the daemon should be given up on, or None while it still makes progress: no
        commit within `start_timeout` of the first sample, or committed offsets that have not
        moved for `stall_timeout`. How long the whole run takes does not matter."""
        if not self.samples:
            return None
        now, committed, _ = self.samples[-1]
        since = now  # when the committed total became what it is now
        for at, count, _ in reversed(self.samples):
            if count != committed:
                break
            since = at
        if now - since <= (start_timeout if committed == 0 else stall_timeout):
            return None
        if committed == 0:
            return f"committed nothing in {now - since:.0f} s"
        return f"committed offsets stayed at {committed:,} for {now - since:.0f} s"

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
        self.group = f"{self.input_topic}-{self.port}"  # the input's name carries the run's tag
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
        checkout = {
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.getenv("PYTHONPATH")]))
        }
        return inherited | checkout | {f"SEQSENTINEL_{k}": v for k, v in settings.items()}

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

    def wait_committed(
        self,
        total: int,
        start_timeout: float = START_TIMEOUT_S,
        stall_timeout: float = STALL_TIMEOUT_S,
    ) -> Progress:
        """Watch the group's committed offsets until they reach `total`, for as long as they
        keep advancing (`Progress.stuck`)."""
        progress = Progress()
        started = time.perf_counter()

        def done() -> bool:
            committed = self.cluster.committed(self.group)
            progress.samples.append((time.perf_counter() - started, committed, self.cpu_seconds()))
            if committed >= total:
                return True
            if reason := progress.stuck(start_timeout, stall_timeout):
                raise DaemonError(f"the daemon {reason} of {total:,} records", self.tail())
            return False

        self._wait(done, float("inf"), f"to commit {total} records", every=COMMIT_POLL_S)
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

    def metric(self, name: str) -> float:
        """A metric of the daemon's `/metrics`, summed over its labels."""
        url = f"http://127.0.0.1:{self.port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            return metric_value(response.read().decode(), name)

    def cpu_seconds(self) -> float:
        """User and system CPU time of the process so far (/proc/<pid>/stat)."""
        assert self.process is not None
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def runs_librdkafka(self) -> bool:
        """Whether the process has librdkafka's threads (named `rdk:...`): the proof that
        `kafka.client = "confluent"` is in effect, rather than only asked for."""
        assert self.process is not None
        tasks = Path(f"/proc/{self.process.pid}/task").glob("*/comm")
        return any(task.read_text().startswith("rdk:") for task in tasks)

    def check_client(self) -> None:
        """Fail unless the daemon runs the Kafka client its settings name."""
        asked = self.settings.get("KAFKA__CLIENT", "kafka-python")
        if self.runs_librdkafka() != (asked == "confluent"):
            raise DaemonError(f"the daemon does not run the {asked} client it was given", [])

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


def metric_value(exposition: str, name: str) -> float:
    """The sum of the samples named `name` (any labels) in a Prometheus text exposition."""
    total = 0.0
    for line in exposition.splitlines():
        if line.startswith(name) and line[len(name) : len(name) + 1] in (" ", "{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


@contextlib.contextmanager
def running(daemon: Daemon) -> Iterator[Daemon]:
    daemon.start()
    try:
        yield daemon
    finally:
        daemon.stop()
