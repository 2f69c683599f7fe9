"""One owner of health and readiness: what the probes, systemd and the status line report.

The loop and its parts tell the `Supervisor` what they see (the broker answered or not, how
many partitions are assigned or restoring, which model serves); only the supervisor writes
`Health`, so readiness has one source of truth. Its `tick()` runs every round and at every
wait: the liveness beat, systemd's watchdog and status line, and READY once ready.
"""

from __future__ import annotations

import time
from typing import Any

import structlog

from detector.engine.core import Counters
from detector.engine.scorer import Scorer
from detector.ops.http import Health
from detector.ops.logs import bind_model_version
from detector.ops.metrics import Metrics
from detector.ops.systemd import SystemdNotifier

__all__ = ["Supervisor"]

log = structlog.get_logger(__name__)

STATUS_INTERVAL_S = 10.0


class Supervisor:
    """Writes `health`, tells `notifier` (systemd), and sums the processed batches."""

    def __init__(self, health: Health, notifier: SystemdNotifier, metrics: Metrics) -> None:
        self.health, self.notifier, self.metrics = health, notifier, metrics
        self.totals = Counters()
        self._watchdog_interval = notifier.watchdog_interval()
        self._next_watchdog = 0.0
        self._next_status = 0.0
        self._announced_ready = False

    def beat(self) -> None:
        """The loop came round: alive."""
        self.health.beat()

    def broker(self, reachable: bool) -> None:
        """Whether the broker answered the latest request made of it."""
        self.health.broker_reachable = reachable

    def partitions(self, assigned: int) -> None:
        self.health.partitions = assigned

    def restoring(self, partitions: int) -> None:
        """Not ready while the key state of some assigned partition is being restored."""
        self.health.restoring = partitions
        self.metrics.restoring_partitions.set(partitions)

    def serving(self, scorer: Scorer) -> None:
        """A model is loaded (at start or by a reload) and serves from now on."""
        manifest = scorer.manifest
        bind_model_version(manifest.model_version)
        self.metrics.set_model(manifest, scorer.source)
        self.health.model_version = manifest.model_version
        self.health.model_loaded = True

    def tick(self) -> None:
        """Feed the liveness probe and systemd's watchdog, update STATUS, announce READY."""
        self.health.beat()
        now = time.monotonic()
        if self._watchdog_interval and now >= self._next_watchdog:
            self.notifier.watchdog()
            self._next_watchdog = now + self._watchdog_interval
        if now >= self._next_status:
            self._next_status = now + STATUS_INTERVAL_S
            summary = self.summary()
            self.notifier.status(
                f"model {summary['model_version']}: {summary['partitions']} partitions, "
                f"{summary['records']} records, {summary['alerts']} alerts, "
                f"{summary['dead_letters']} dead letters"
            )
        if not self._announced_ready and self.health.not_ready_reason() is None:
            self._announced_ready = True
            self.notifier.ready()
            log.info("ready", partitions=self.health.partitions)

    def summary(self) -> dict[str, Any]:
        totals = self.totals
        return {
            "model_version": self.health.model_version,
            "partitions": self.health.partitions,
            "records": totals.records,
            "alerts": totals.alerts,
            "dead_letters": totals.dead_letters,
        }
