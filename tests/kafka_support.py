"""Helpers for tests against the real local Kafka broker of deploy/kafka/local-kafka.

The broker is started through the script itself (a subprocess), so tests exercise the same
code path as `deploy/kafka/local-kafka start` on a developer's machine.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from kafka import KafkaAdminClient
from kafka.admin import NewTopic

LOCAL_KAFKA = Path(__file__).resolve().parents[1] / "deploy" / "kafka" / "local-kafka"

# kafka-python 3.x detects Kafka 4.1 correctly as (4, 1) when api_version is left out, and then
# speaks only request versions the broker serves. Pinning also works for any value from (0, 11)
# up; (4, 0) is the value to pin for Kafka 4.x brokers. Older pins such as (0, 10, 2) make
# kafka-python send request versions that Kafka 4 removed (the broker closes the connection).
PINNED_API_VERSION = (4, 0)


class BrokerUnavailableError(RuntimeError):
    """The local broker could not be started; the message says why."""


def free_ports(count: int) -> list[int]:
    """`count` distinct ports that are free on 127.0.0.1 right now (bound to port 0 together)."""
    with contextlib.ExitStack() as stack:
        sockets = [
            stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            for _ in range(count)
        ]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]


@dataclass
class LocalBroker:
    """One local-kafka broker in its own folder on free ports."""

    directory: Path
    port: int = 0
    controller_port: int = 0
    log: Path = field(init=False)

    def __post_init__(self) -> None:
        if not (self.port and self.controller_port):
            self.port, self.controller_port = free_ports(2)
        self.log = self.directory / "kafka.log"

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _run(self, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, str(LOCAL_KAFKA), *args, "--dir", str(self.directory)],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def start(self, timeout: float = 90.0, attempts: int = 3) -> str:
        """Start the broker (stopped again if this process dies); return the bootstrap address.

        Another process may grab a free port before the broker binds it: then retry on new ones.
        """
        for _ in range(attempts - 1):
            try:
                return self._start(timeout)
            except BrokerUnavailableError as error:
                if "already in use" not in str(error):
                    raise
                self.port, self.controller_port = free_ports(2)
        return self._start(timeout)

    def _start(self, timeout: float) -> str:
        command = ["start", f"--port={self.port}", f"--controller-port={self.controller_port}"]
        command += [f"--timeout={timeout}", f"--exit-with={os.getpid()}"]
        try:
            result = self._run(*command, timeout=timeout + 120)
        except (OSError, subprocess.TimeoutExpired) as error:
            raise BrokerUnavailableError(f"local-kafka start did not finish: {error}") from error
        lines = result.stdout.strip().splitlines()
        if result.returncode != 0 or not lines or lines[-1] != self.bootstrap:
            raise BrokerUnavailableError(
                f"local-kafka start failed (exit {result.returncode}):\n"
                f"{result.stderr.strip()}\n{result.stdout.strip()}"
            )
        return self.bootstrap

    def stop(self) -> None:
        self._run("stop", timeout=60)


def client_config(bootstrap: str, **overrides: object) -> dict[str, object]:
    """kafka-python settings for the local broker; api_version is auto-detected unless given."""
    return {"bootstrap_servers": bootstrap, "client_id": "seqsentinel-tests", **overrides}


class TopicFactory:
    """Creates uniquely named topics: `factory(partitions=3)` returns the new topic's name."""

    def __init__(self, bootstrap: str) -> None:
        self.admin = KafkaAdminClient(**client_config(bootstrap))
        self.created: list[str] = []

    def __call__(
        self, partitions: int = 1, prefix: str = "test", configs: dict[str, str] | None = None
    ) -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:12]}"
        topic = NewTopic(name, partitions, replication_factor=1, topic_configs=configs or {})
        self.admin.create_topics(
            [topic],
            timeout_ms=30_000,
            wait_for_metadata=True,
        )
        self.created.append(name)
        return name

    def close(self) -> None:
        with contextlib.suppress(Exception):  # the broker may already be gone
            if self.created:
                self.admin.delete_topics(self.created, timeout_ms=10_000)
        self.admin.close()
