"""The daemon's Prometheus metrics, in a registry of their own.

A dedicated `CollectorRegistry` (not prometheus-client's global one) keeps `/metrics` to what
the detector itself measures and lets tests build as many daemons' metrics as they like.
Everything is updated once per batch from the engine's counters, never once per event.
"""

from __future__ import annotations

from collections.abc import Iterable

from kafka import TopicPartition
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest

from detector.contract.manifest import Manifest
from detector.engine.core import Counters

__all__ = ["Metrics"]

#: Engine counters by the `outcome` label they are published under.
OUTCOMES = {
    "scored": "scored",
    "warming_up": "warming_up",
    "skipped_by_stride": "skipped",
    "dead_letters": "dead_letter",
}
BATCH_BUCKETS = (1, 4, 16, 64, 256, 1024, 2048, 4096, 8192, 16384, 65536)
SECONDS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
LATENCY_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 3600.0)


class Metrics:
    """Every metric `/metrics` shows; `render()` is the Prometheus text exposition."""

    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry()
        self.records = Counter(
            "seqsentinel_records",
            "Records consumed, by what became of them",
            ["outcome"],
            registry=registry,
        )
        for outcome in OUTCOMES.values():
            self.records.labels(outcome)  # every outcome shows, at 0 until it happens
        self.late_records = Counter(
            "seqsentinel_late_records",
            "Records older than their key's latest by more than scoring.late_grace_s: dead "
            "letters or scored as they came, as scoring.late_events says",
            registry=registry,
        )
        self.alerts = Counter("seqsentinel_alerts", "Alerts published", registry=registry)
        self.batch_records = Histogram(
            "seqsentinel_batch_records",
            "Records per scored micro-batch",
            buckets=BATCH_BUCKETS,
            registry=registry,
        )
        self.inference_seconds = Histogram(
            "seqsentinel_inference_seconds",
            "Engine time per batch: decoding, key state and onnxruntime scoring",
            buckets=SECONDS_BUCKETS,
            registry=registry,
        )
        self.alert_latency_seconds = Histogram(
            "seqsentinel_alert_latency_seconds",
            "From an alert's event time until the broker acknowledged the alert",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.consumer_lag = Gauge(
            "seqsentinel_consumer_lag",
            "Records in an assigned partition not consumed yet",
            ["topic", "partition"],
            registry=registry,
        )
        self.active_keys = Gauge(
            "seqsentinel_active_keys", "Keys with state in memory", registry=registry
        )
        self.evicted_keys = Counter(
            "seqsentinel_evicted_keys",
            "Keys whose state was dropped: lru (max_keys reached) or ttl (idle too long)",
            ["reason"],
            registry=registry,
        )
        self.model_reloads = Counter(
            "seqsentinel_model_reloads",
            "Attempts to load a changed model file, by result (loaded or refused)",
            ["result"],
            registry=registry,
        )
        self.commit_failures = Counter(
            "seqsentinel_commit_failures",
            "Offset commits that failed and were retried or given up",
            registry=registry,
        )
        self.publish_retries = Counter(
            "seqsentinel_publish_retries",
            "Alerts and dead letters sent again after the broker did not acknowledge them",
            registry=registry,
        )
        self.restoring_partitions = Gauge(
            "seqsentinel_restoring_partitions",
            "Assigned partitions whose key state is being restored (snapshot and replay)",
            registry=registry,
        )
        self.restore_replayed = Counter(
            "seqsentinel_restore_replayed_records",
            "Input records replayed, state only, to bring restored key state up to date",
            registry=registry,
        )
        self.restore_seconds = Histogram(
            "seqsentinel_restore_seconds",
            "Time to restore one partition's key state, by how it began",
            ["snapshot"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.snapshots = Counter(
            "seqsentinel_snapshots",
            "Per-partition key state snapshots written to the state topic",
            registry=registry,
        )
        self.lost_keys = Counter(
            "seqsentinel_key_state_lost",
            "Keys whose state did not continue what the last snapshot or restore recorded of "
            "them (a fault: their alerts differ from an uninterrupted run's), by where it was seen",
            ["at"],
            registry=registry,
        )
        for at in ("restore", "snapshot"):
            self.lost_keys.labels(at)  # shows at 0 until it happens
        self.model = Info("seqsentinel_model", "The model now serving", registry=registry)

    def observe_batch(self, counters: Counters, records: int, seconds: float, keys: int) -> None:
        """Record one processed batch from the engine's counters."""
        for name, outcome in OUTCOMES.items():
            if count := getattr(counters, name):
                self.records.labels(outcome).inc(count)
        self.batch_records.observe(records)
        self.inference_seconds.observe(seconds)
        self.active_keys.set(keys)
        if counters.evicted_lru:
            self.evicted_keys.labels("lru").inc(counters.evicted_lru)
        if counters.expired_ttl:
            self.evicted_keys.labels("ttl").inc(counters.expired_ttl)
        if counters.late:
            self.late_records.inc(counters.late)

    def observe_alerts(self, latencies: Iterable[float]) -> None:
        """Alerts acknowledged by the broker, with their seconds since event time."""
        for latency in latencies:
            self.alerts.inc()
            self.alert_latency_seconds.observe(max(latency, 0.0))

    def set_lag(self, lag: dict[TopicPartition, int]) -> None:
        for partition, value in lag.items():
            self.consumer_lag.labels(partition.topic, str(partition.partition)).set(value)

    def forget_partitions(self, partitions: Iterable[TopicPartition]) -> None:
        """Partitions no longer assigned have no lag of ours to show."""
        for partition in partitions:
            labels = (partition.topic, str(partition.partition))
            try:
                self.consumer_lag.remove(*labels)
            except KeyError:
                continue

    def set_model(self, manifest: Manifest, path: str) -> None:
        self.model.info(
            {
                "model_version": manifest.model_version,
                "task": manifest.task,
                "export_mode": manifest.export_mode,
                "path": path,
            }
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
