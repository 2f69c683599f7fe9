"""Shared fixtures. Kafka: one real local broker per test session (deploy/kafka/local-kafka).

A test that needs Kafka asks for `kafka_bootstrap` (and `kafka_topic_factory` for topics) and
carries `@pytest.mark.kafka`. When the broker cannot start, those tests skip with the reason,
or fail with it when SEQSENTINEL_REQUIRE_KAFKA=1 (as `make test` and CI set it).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pytest
from daemon_support import train_model
from kafka_support import BrokerUnavailableError, LocalBroker, TopicFactory

KAFKA_FIXTURES = {"kafka_broker", "kafka_bootstrap", "kafka_topic_factory"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests using the Kafka fixtures get the `kafka` marker even when it was forgotten."""
    for item in items:
        if KAFKA_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.kafka)


@pytest.fixture(scope="session")
def kafka_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalBroker]:
    broker = LocalBroker(tmp_path_factory.mktemp("kafka"))
    failure = None
    try:
        broker.start()
    except BrokerUnavailableError as error:
        failure = f"the local Kafka broker did not start: {error}"
    if failure:  # reported outside the except block: no chained traceback noise
        broker.stop()
        if os.environ.get("SEQSENTINEL_REQUIRE_KAFKA") == "1":
            pytest.fail(failure, pytrace=False)
        pytest.skip(failure)
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture(scope="session")
def kafka_bootstrap(kafka_broker: LocalBroker) -> str:
    """Bootstrap address ("127.0.0.1:PORT") of the session's local Kafka broker."""
    return kafka_broker.bootstrap


@pytest.fixture(scope="session")
def kafka_topic_factory(kafka_bootstrap: str) -> Iterator[TopicFactory]:
    """`kafka_topic_factory(partitions=N)` creates a uniquely named topic and returns its name."""
    factory = TopicFactory(kafka_bootstrap)
    try:
        yield factory
    finally:
        factory.close()


#: The Kafka client libraries of `kafka.client`: the tests that claim Kafka behaviour run with
#: each, through `kafka_client`.
KAFKA_CLIENTS = ("kafka-python", "confluent")


@pytest.fixture(scope="module", params=KAFKA_CLIENTS)
def kafka_client(request: pytest.FixtureRequest) -> str:
    """The value of `kafka.client` a test's daemons run with, one run per library."""
    return request.param


@pytest.fixture(scope="session")
def sensor_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small forecast model trained for real on sensor data, shared by the daemon tests."""
    return train_model(tmp_path_factory.getbasetemp() / "daemon-models")


@pytest.fixture(scope="session")
def other_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Trained like `sensor_model` with another seed: the same contract, another version."""
    return train_model(tmp_path_factory.getbasetemp() / "daemon-models", seed=1)


@pytest.fixture(scope="session")
def payments() -> tuple[pa.Table, str]:
    """Synthetic card payments and their training configuration, for the `trainer retrain`
    tests; the trainer is imported only here, so that the fast tier never loads it."""
    from trainer.synth import transactions

    dataset = transactions(keys=40, days=20, seed=0)
    return pa.concat_tables([dataset.train, dataset.test]), dataset.config
