"""Outputs sent but not yet acknowledged, round by round, and the input offsets they hold back.

Under `at_least_once` the daemon does not wait for a round's acknowledgements before it polls
and scores the next round: the wait (`acks=all`, 10 to 15 ms on a local broker) would leave
the consumer idle. Each round's alerts and dead letters are sent and kept here with the
offsets the round covers. Rounds are released oldest first and only once every output of the
round is acknowledged, so an offset becomes committable only when everything caused by the
records before it is acknowledged: one failed send holds back its round and every later one.
Failed messages are sent again (same alert ids) until they are acknowledged. A key-state
snapshot valid at some offsets may be written only once every output of the records before
them is acknowledged: it is held in line and sent when the rounds before it are; its
messages are made only then, so that their encoding can go on elsewhere meanwhile.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from kafka import TopicPartition
from kafka.future import Future

from detector.stream.messages import Outgoing

__all__ = ["InFlight", "Round"]


@dataclass(slots=True)
class Round:
    """The outputs of one round, their sends, and the offsets that become committable (the
    next offset of each partition the round read) once all of them are acknowledged;
    `records`: how many input records the round read."""

    messages: list[Outgoing]
    futures: list[Future]
    offsets: dict[TopicPartition, int]
    records: int = 0
    #: Not sent until every round before it is acknowledged (a key-state snapshot); then
    #: `make` makes its messages.
    held: bool = False
    make: Callable[[], list[Outgoing]] | None = None

    def done(self) -> bool:
        return not self.held and all(future.is_done for future in self.futures)

    def acknowledged(self) -> bool:
        return not self.held and all(f.is_done and f.succeeded() for f in self.futures)

    def failed(self) -> list[int]:
        """Positions of the messages whose send failed, once every send has an outcome."""
        if not self.done():
            return []
        return [i for i, future in enumerate(self.futures) if future.failed()]


class InFlight:
    """The rounds whose outputs are not all acknowledged yet, oldest first."""

    def __init__(self, send: Callable[[Outgoing], Future]) -> None:
        self._send = send
        self._rounds: deque[Round] = deque()
        #: Input records read by the rounds in flight: how far the commit lags behind.
        self.records = 0

    def __len__(self) -> int:
        return len(self._rounds)

    def add(
        self, messages: list[Outgoing], offsets: dict[TopicPartition, int], records: int = 0
    ) -> None:
        """Send the outputs of a round that read `records` input records; its offsets wait for
        their acknowledgement."""
        futures = [self._send(m) for m in messages]
        self._rounds.append(Round(messages, futures, dict(offsets), records))
        self.records += records

    def hold(self, make: Callable[[], list[Outgoing]]) -> None:
        """Send the messages `make` returns only once every round added before them is
        acknowledged, without waiting for that here; `make` is called then."""
        self._rounds.append(Round([], [], {}, held=True, make=make))

    def pending(self) -> bool:
        """Whether some send still waits for the broker's answer."""
        return any(not future.is_done for r in self._rounds for future in r.futures)

    def release(self) -> tuple[dict[TopicPartition, int], list[Outgoing]]:
        """Take the acknowledged rounds off the front: the offsets they make committable and
        the messages acknowledged. A round not acknowledged stops it, whatever follows; a held
        round that reaches the front is sent."""
        offsets: dict[TopicPartition, int] = {}
        acknowledged: list[Outgoing] = []
        while self._rounds:
            if (front := self._rounds[0]).held:
                assert front.make is not None
                front.messages, front.held = front.make(), False
                front.futures = [self._send(m) for m in front.messages]
            if not front.acknowledged():
                break
            done = self._rounds.popleft()
            self.records -= done.records
            offsets.update(done.offsets)
            acknowledged += done.messages
        return offsets, acknowledged

    def failures(self) -> list[Exception]:
        """The errors of the sends that failed (in rounds whose every send has an outcome)."""
        return [r.futures[i].exception for r in self._rounds for i in r.failed()]

    def resend(self) -> int:
        """Send the failed messages again; how many."""
        count = 0
        for waiting in self._rounds:
            for i in waiting.failed():
                waiting.futures[i] = self._send(waiting.messages[i])
                count += 1
        return count

    def drop(self, partitions: Iterable[TopicPartition]) -> None:
        """Offsets of lost partitions are not ours to commit; their outputs still go out."""
        lost = set(partitions)
        for waiting in self._rounds:
            for partition in lost & waiting.offsets.keys():
                del waiting.offsets[partition]
