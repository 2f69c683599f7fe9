"""Connecting the daemon to Kafka with the client library `kafka.client` names, retrying
while the broker cannot be reached."""

from __future__ import annotations

import threading

import structlog
from kafka.errors import KafkaError

from detector.config import Settings
from detector.ops.backoff import Backoff
from detector.ops.supervisor import Supervisor
from detector.stream.clients import ensure_topics, make_admin
from detector.stream.delivery import Outputs
from detector.stream.source import GroupConsumer

__all__ = ["connect"]

log = structlog.get_logger(__name__)


def connect(
    settings: Settings, stopping: threading.Event, supervisor: Supervisor
) -> tuple[Outputs, GroupConsumer] | None:
    """Check the topics (creating the missing outputs if allowed: `TopicError` otherwise),
    then open the producer and the consumer; None when a stop is requested first."""
    backoff = Backoff(0.5, 10.0)
    while not stopping.is_set():
        supervisor.beat()
        try:
            admin = make_admin(settings)
            try:
                created = ensure_topics(admin, settings)
            finally:
                admin.close()
            if created:
                log.info("created topics", topics=created)
            clients = _open_clients(settings)
        except KafkaError as error:
            delay = backoff.next()
            supervisor.broker(reachable=False)
            log.warning("Kafka is not reachable; retrying", error=str(error), retry_in_s=delay)
            stopping.wait(delay)
            continue
        supervisor.broker(reachable=True)
        return clients
    return None


def _open_clients(settings: Settings) -> tuple[Outputs, GroupConsumer]:
    """The library is imported only when chosen: confluent-kafka is an optional extra."""
    if settings.kafka.client == "confluent":
        from detector.stream import confluent

        return confluent.open_clients(settings)
    from detector.stream import kafka_python

    return kafka_python.open_clients(settings)
