"""The two deliveries behind one interface, driven through fakes of the producer and the
consumer as the delivery sees them (`Outputs`, `Committer`): no broker, no Kafka client."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from kafka import TopicPartition
from kafka.errors import CommitFailedError, KafkaTimeoutError, ProducerFencedError
from kafka.future import Future

from detector.config import Settings
from detector.ops.http import Health
from detector.ops.metrics import Metrics
from detector.ops.supervisor import Supervisor
from detector.ops.systemd import SystemdNotifier
from detector.stream.delivery import AtLeastOnce, ExactlyOnce, Offsets, make_delivery
from detector.stream.messages import Outgoing

P0, P1 = TopicPartition("events", 0), TopicPartition("events", 1)


def message(value: bytes) -> Outgoing:
    return Outgoing("alerts", None, value, [])


@dataclass
class FakeOutputs:
    """Sends wait for the test's answer; `flush` acknowledges them unless told to fail."""

    sent: list[tuple[Outgoing, Future]] = field(default_factory=list)
    calls: list[str] = field(default_factory=list)
    flush_fails: Exception | None = None
    flush_answers: bool = True
    commit_fails: Exception | None = None

    def send(self, outgoing: Outgoing) -> Future:
        future = Future()
        self.sent.append((outgoing, future))
        return future

    def values(self) -> list[bytes]:
        return [outgoing.value for outgoing, _ in self.sent]

    def answer(self, error: Exception | None = None) -> None:
        """Answer every send still waiting: acknowledged, or failed with `error`."""
        for _, future in self.sent:
            if not future.is_done:
                future.failure(error) if error else future.success(None)

    def flush(self, timeout: float | None = None) -> None:
        if self.flush_answers:
            self.answer(self.flush_fails)

    def begin_transaction(self) -> None:
        self.calls.append("begin")

    def commit_transaction(self, offsets: Offsets, group: object) -> None:
        if self.commit_fails is not None:
            raise self.commit_fails
        self.calls.append(f"commit {sorted(offsets.items())} for {group}")

    def abort_transaction(self) -> None:
        self.calls.append("abort")

    def close(self, timeout: float) -> None:
        self.calls.append("close")


@dataclass
class FakeCommitter:
    """Asynchronous commits wait for the test's `answer`; synchronous ones fail as told."""

    asked: list[Offsets] = field(default_factory=list)
    callbacks: list = field(default_factory=list)
    committed: list[Offsets] = field(default_factory=list)
    failures: list[Exception] = field(default_factory=list)

    def commit_async(self, offsets: Offsets, callback) -> None:
        self.asked.append(dict(offsets))
        self.callbacks.append(callback)

    def answer(self, outcome: Exception | None = None) -> None:
        self.callbacks.pop(0)({}, outcome)

    def commit(self, offsets: Offsets) -> None:
        if self.failures:
            raise self.failures.pop(0)
        self.committed.append(dict(offsets))

    def group_metadata(self) -> object:
        return "group"


@pytest.fixture
def supervisor() -> Supervisor:
    return Supervisor(Health(), SystemdNotifier(None), Metrics())


def at_least_once(
    supervisor: Supervisor, out_of_time=lambda: False, **kafka
) -> tuple[AtLeastOnce, FakeOutputs, FakeCommitter]:
    outputs, committer = FakeOutputs(), FakeCommitter()
    settings = Settings(kafka={"commit_interval_ms": 0, **kafka}, batching={"max_batch": 10})
    delivery = AtLeastOnce(settings, outputs, committer, supervisor, out_of_time)
    return delivery, outputs, committer


def exactly_once(supervisor: Supervisor) -> tuple[ExactlyOnce, FakeOutputs, list[str]]:
    outputs, events = FakeOutputs(), []
    delivery = ExactlyOnce(
        outputs,
        FakeCommitter(),
        supervisor,
        on_fenced=lambda: events.append("fenced"),
        on_aborted=lambda: events.append("aborted"),
    )
    return delivery, outputs, events


def sample(supervisor: Supervisor, name: str) -> float:
    return supervisor.metrics.registry.get_sample_value(name) or 0.0


class Idle:
    """A daemon that is never out of time and never asked to stop or rewind."""

    def out_of_time(self) -> bool:
        return False

    def request_stop(self) -> None:
        raise AssertionError("not expected")

    def rewind(self) -> None:
        raise AssertionError("not expected")


def test_make_delivery_follows_the_configured_guarantee(supervisor):
    for guarantee, kind in (("at_least_once", AtLeastOnce), ("exactly_once", ExactlyOnce)):
        settings = Settings(processing={"guarantee": guarantee})
        delivery = make_delivery(settings, FakeOutputs(), FakeCommitter(), supervisor, Idle())
        assert type(delivery) is kind


# -- at least once -------------------------------------------------------------------------


def test_offsets_are_committed_once_every_output_before_them_is_acknowledged(supervisor):
    delivery, outputs, committer = at_least_once(supervisor)
    delivery.publish([message(b"a")], {P0: 10}, records=10)
    delivery.publish([], {P1: 5}, records=5)  # no output: waits for the round before it
    assert delivery.settle() and committer.asked == []
    outputs.answer()
    delivery.settle()
    assert committer.asked == [{P0: 10, P1: 5}]
    delivery.settle()
    assert len(committer.asked) == 1  # one commit at a time
    committer.answer()
    assert delivery.take_committable() == {} and supervisor.health.broker_reachable


def test_commits_come_at_most_once_per_interval_and_all_at_shutdown(supervisor):
    delivery, _, committer = at_least_once(supervisor, commit_interval_ms=60_000)
    delivery.publish([], {P0: 10}, records=1)
    delivery.settle()
    committer.answer()
    delivery.publish([], {P0: 20}, records=1)
    delivery.settle()
    assert committer.asked == [{P0: 10}]  # the next one a minute later
    assert delivery.commit() and committer.committed == [{P0: 20}]


def test_a_failed_send_is_sent_again_and_holds_back_the_commit(supervisor):
    delivery, outputs, committer = at_least_once(supervisor)
    delivery.publish([message(b"a")], {P0: 10}, records=1)
    outputs.answer(KafkaTimeoutError("no broker"))
    delivery.settle()
    assert outputs.values() == [b"a", b"a"] and committer.asked == []
    assert sample(supervisor, "seqsentinel_publish_retries_total") == 1
    assert not supervisor.health.broker_reachable
    outputs.answer()
    delivery.settle()
    assert committer.asked == [{P0: 10}]


def test_a_failed_commit_keeps_its_offsets_for_the_next_one(supervisor):
    delivery, _, committer = at_least_once(supervisor)
    delivery.publish([], {P0: 10}, records=1)
    delivery.settle()
    committer.answer(KafkaTimeoutError("no coordinator"))
    assert sample(supervisor, "seqsentinel_commit_failures_total") == 1
    assert delivery.take_committable() == {P0: 10}  # what a revocation commits


def test_a_held_snapshot_is_sent_after_the_rounds_before_it(supervisor):
    delivery, outputs, committer = at_least_once(supervisor)
    delivery.publish([message(b"a")], {P0: 10}, records=1)
    delivery.hold(lambda: [message(b"snapshot")])
    delivery.publish([message(b"b")], {P0: 20}, records=1)
    assert outputs.values() == [b"a", b"b"]
    outputs.answer()
    assert delivery.drain()
    assert outputs.values() == [b"a", b"b", b"snapshot"]
    delivery.settle()
    assert committer.asked == [{P0: 20}]
    delivery.close(timeout=1)


def test_too_many_records_in_flight_make_the_loop_wait(supervisor):
    delivery, outputs, _ = at_least_once(supervisor)
    for offset in range(1, 6):  # 50 records: more than 4 batches of 10
        delivery.publish([message(b"%d" % offset)], {P0: offset}, records=10)
    delivery.settle()  # flushes until at most 40 records are in flight
    assert all(future.is_done for _, future in outputs.sent)


def test_drain_gives_up_when_the_shutdown_budget_is_spent(supervisor):
    delivery, outputs, _ = at_least_once(supervisor, out_of_time=lambda: True)
    outputs.flush_answers = False
    delivery.publish([message(b"a")], {P0: 10}, records=1)
    assert not delivery.drain()


def test_the_shutdown_commit_retries_and_a_rebalance_ends_it(supervisor):
    delivery, _, committer = at_least_once(supervisor)
    delivery.publish([], {P0: 10}, records=1)
    delivery.drain()
    committer.failures = [KafkaTimeoutError("slow")]
    assert delivery.commit() and committer.committed == [{P0: 10}]
    delivery.publish([], {P0: 20}, records=1)
    delivery.drain()
    committer.failures = [CommitFailedError("rebalanced")]
    assert not delivery.commit()
    assert delivery.take_committable() == {}  # the new owner processes them again


def test_lost_partitions_are_not_committed(supervisor):
    delivery, outputs, committer = at_least_once(supervisor)
    delivery.publish([message(b"a")], {P0: 10, P1: 3}, records=2)
    delivery.drop([P0])
    outputs.answer()
    delivery.settle()
    assert committer.asked == [{P1: 3}]


# -- exactly once --------------------------------------------------------------------------


def test_a_round_and_its_snapshot_are_one_transaction_with_the_offsets(supervisor):
    delivery, outputs, events = exactly_once(supervisor)
    assert delivery.settle() and outputs.calls == []  # nothing to commit
    delivery.publish([message(b"a")], {P0: 10}, records=1)
    delivery.hold(lambda: [message(b"snapshot")])
    assert outputs.sent == []
    assert delivery.settle()
    assert outputs.values() == [b"a", b"snapshot"]
    assert outputs.calls == ["begin", f"commit {[(P0, 10)]} for group"]
    assert delivery.commit() and delivery.take_committable() == {} and events == []


def test_a_failed_transaction_is_aborted_and_the_state_rewound(supervisor):
    delivery, outputs, events = exactly_once(supervisor)
    outputs.flush_fails = KafkaTimeoutError("no broker")
    delivery.publish([message(b"a")], {P0: 10}, records=1)
    assert not delivery.drain()
    assert outputs.calls == ["begin", "abort"] and events == ["aborted"]
    assert not delivery.fenced and not supervisor.health.broker_reachable
    outputs.flush_fails = None
    assert delivery.settle() and outputs.calls[-1] == "abort"  # the aborted round is gone


def test_a_fenced_producer_stops_the_daemon_without_an_abort(supervisor):
    delivery, outputs, events = exactly_once(supervisor)
    outputs.commit_fails = ProducerFencedError("another instance")
    delivery.publish([message(b"a")], {P0: 10}, records=1)
    assert not delivery.settle()
    assert delivery.fenced and events == ["fenced"] and "abort" not in outputs.calls
