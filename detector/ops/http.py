"""The operations endpoints: `/healthz`, `/readyz` and `/metrics`, on a thread of their own.

The processing loop never waits for HTTP and the server never touches Kafka: the loop writes
what it knows into a `Health` and the server reads it. Attribute writes are atomic under the
GIL, so no lock is needed for these few flags and timestamps.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import orjson
from prometheus_client import CONTENT_TYPE_LATEST

from detector.ops.metrics import Metrics

__all__ = ["Health", "OpsServer"]

#: The loop counts as stuck when it has not come round for this long (it polls every 0.5 s or
#: less, and its slowest steps, a commit or a lag probe, give up after a few seconds).
LIVENESS_TIMEOUT_S = 30.0


@dataclass
class Health:
    """What the probes report; written by the processing loop, read by the HTTP server."""

    model_loaded: bool = False
    partitions: int = 0
    broker_reachable: bool = False
    model_version: str = ""
    restoring: int = 0  # partitions whose key state is being restored
    last_loop: float = 0.0  # time.monotonic() of the loop's last round

    def beat(self) -> None:
        self.last_loop = time.monotonic()

    def alive(self) -> bool:
        return time.monotonic() - self.last_loop < LIVENESS_TIMEOUT_S

    def not_ready_reason(self) -> str | None:
        """Why the daemon must not receive traffic yet, or None when it is ready."""
        if not self.model_loaded:
            return "the model is not loaded yet"
        if not self.broker_reachable:
            return "the Kafka broker is not reachable"
        if not self.partitions:
            return "no partitions are assigned to this consumer"
        if self.restoring:
            return f"restoring the key state of {self.restoring} partition(s)"
        return None


class OpsServer:
    """A `ThreadingHTTPServer` in a daemon thread, serving `health` and `metrics`."""

    def __init__(self, host: str, port: int, health: Health, metrics: Metrics) -> None:
        handler = type("Handler", (_Handler,), {"health": health, "metrics": metrics})
        self.server = ThreadingHTTPServer((host, port), handler)
        self.server.daemon_threads = True
        self._thread = threading.Thread(
            target=self.server.serve_forever, name="ops-http", daemon=True
        )

    @property
    def port(self) -> int:
        return self.server.server_address[1]

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        if self._thread.is_alive():
            self.server.shutdown()
        self.server.server_close()


class _Handler(BaseHTTPRequestHandler):
    health: Health
    metrics: Metrics
    server_version = "seqsentinel"

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            self._send(HTTPStatus.OK, self.metrics.render(), CONTENT_TYPE_LATEST)
        elif path == "/healthz":
            alive = self.health.alive()
            since = round(time.monotonic() - self.health.last_loop, 3)
            self._json(
                HTTPStatus.OK if alive else HTTPStatus.SERVICE_UNAVAILABLE,
                {"alive": alive, "seconds_since_loop": since},
            )
        elif path == "/readyz":
            reason = self.health.not_ready_reason()
            document = {
                "ready": reason is None,
                "model_version": self.health.model_version or None,
                "partitions": self.health.partitions,
            }
            if reason is not None:
                document["reason"] = reason
            status = HTTPStatus.OK if reason is None else HTTPStatus.SERVICE_UNAVAILABLE
            self._json(status, document)
        else:
            self._json(HTTPStatus.NOT_FOUND, {"error": f"no such endpoint: {path}"})

    def _json(self, status: HTTPStatus, document: dict) -> None:
        self._send(status, orjson.dumps(document), "application/json")

    def _send(self, status: HTTPStatus, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        """Probes come every few seconds: logging each would drown the daemon's own log."""
