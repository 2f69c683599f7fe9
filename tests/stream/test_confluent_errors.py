"""librdkafka's errors as the daemon's loop handles them: a fenced or otherwise fatal producer
stops it, a commit the group refused is given up, anything else is retried."""

from __future__ import annotations

import confluent_kafka
import pytest
from kafka.errors import CommitFailedError, KafkaError, ProducerFencedError

from detector.stream.confluent import _translating, translated

Error = confluent_kafka.KafkaError


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (Error(Error._FENCED), ProducerFencedError),
        (Error(Error.PRODUCER_FENCED), ProducerFencedError),
        (Error(Error._TRANSPORT, fatal=True), ProducerFencedError),
        (Error(Error.REBALANCE_IN_PROGRESS), CommitFailedError),
        (Error(Error.UNKNOWN_MEMBER_ID), CommitFailedError),
        (Error(Error._TRANSPORT), KafkaError),
        (Error(Error._MSG_TIMED_OUT), KafkaError),
    ],
)
def test_errors_map_to_what_the_delivery_and_the_source_handle(error, expected) -> None:
    mapped = translated(error)
    assert type(mapped) is expected
    assert str(error) in str(mapped)


def test_a_fatal_error_pending_under_a_delivery_report_is_read_from_its_cause() -> None:
    fenced = Error(Error._FENCED, fatal=True)
    failure = SystemError("<method 'code'> returned a result with an exception set")
    failure.__cause__ = confluent_kafka.KafkaException(fenced)
    with pytest.raises(ProducerFencedError), _translating():
        raise failure
    with pytest.raises(SystemError), _translating():
        raise SystemError("not librdkafka's")
