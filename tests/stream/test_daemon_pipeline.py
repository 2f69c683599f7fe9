"""The pipelined round: outputs stay in flight while the next rounds are polled and scored,
and an offset is committed only once everything caused by the records before it is
acknowledged.

The ordering rules are checked on `InFlight` alone, with futures settled by hand; the
promise itself against a broker: tests/integration/test_daemon_pipeline_on_kafka.py.
"""

from __future__ import annotations

from kafka import TopicPartition
from kafka.errors import KafkaTimeoutError
from kafka.future import Future

from detector.stream.inflight import InFlight
from detector.stream.messages import Outgoing

P0, P1 = TopicPartition("events", 0), TopicPartition("events", 1)


def message(value: bytes) -> Outgoing:
    return Outgoing("alerts", None, value, [])


class Sends:
    """Records what `InFlight` sends; each send's future is settled by the test."""

    def __init__(self) -> None:
        self.futures: list[Future] = []

    def __call__(self, outgoing: Outgoing) -> Future:
        self.futures.append(Future())
        return self.futures[-1]


def test_rounds_are_released_in_order_and_a_failure_holds_back_every_later_round():
    sends = Sends()
    in_flight = InFlight(sends)
    in_flight.add([message(b"a")], {P0: 10})
    in_flight.add([message(b"b")], {P0: 20})
    in_flight.add([], {P1: 5})  # no output: committable as soon as the rounds before it
    sends.futures[1].success(None)
    assert in_flight.release() == ({}, [])  # the first round is not acknowledged yet
    sends.futures[0].failure(KafkaTimeoutError("no answer"))
    assert in_flight.release() == ({}, [])
    assert [type(error) for error in in_flight.failures()] == [KafkaTimeoutError]
    assert in_flight.resend() == 1 and not in_flight.failures() and in_flight.pending()
    assert len(sends.futures) == 3  # only the failed message went again
    sends.futures[2].success(None)
    offsets, acknowledged = in_flight.release()
    assert offsets == {P0: 20, P1: 5}
    assert [m.value for m in acknowledged] == [b"a", b"b"]
    assert len(in_flight) == 0


def test_the_records_of_the_rounds_in_flight_are_counted_until_they_are_released():
    sends = Sends()
    in_flight = InFlight(sends)
    in_flight.add([message(b"a")], {P0: 10}, records=10)
    in_flight.add([], {P0: 15}, records=5)
    assert in_flight.records == 15
    assert in_flight.release() == ({}, [])
    sends.futures[0].success(None)
    assert in_flight.release() == ({P0: 15}, [message(b"a")])
    assert in_flight.records == 0


def test_a_held_snapshot_is_made_and_sent_only_once_the_rounds_before_it_are_acknowledged():
    sends = Sends()
    in_flight = InFlight(sends)
    made: list[int] = []

    def snapshot() -> list[Outgoing]:
        made.append(len(sends.futures))
        return [message(b"snapshot")]

    in_flight.add([message(b"a")], {P0: 10}, records=10)
    in_flight.hold(snapshot)
    in_flight.add([], {P0: 20}, records=10)
    assert in_flight.release() == ({}, [])
    assert len(sends.futures) == 1 and made == []  # the snapshot waits for the round before it
    sends.futures[0].success(None)
    assert in_flight.release() == ({P0: 10}, [message(b"a")])
    assert len(sends.futures) == 2  # sent, and the round after it waits in turn
    assert made == [1]  # made once, when it reached the front
    sends.futures[1].success(None)
    assert in_flight.release() == ({P0: 20}, [message(b"snapshot")])
    assert len(in_flight) == 0 and made == [1]


def test_lost_partitions_leave_the_rounds_in_flight_without_their_offsets():
    sends = Sends()
    in_flight = InFlight(sends)
    in_flight.add([message(b"a")], {P0: 10, P1: 3})
    in_flight.drop([P0])
    sends.futures[0].success(None)
    assert in_flight.release() == ({P1: 3}, [message(b"a")])
