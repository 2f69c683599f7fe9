"""What the daemon publishes, as producer messages: alerts, dead letters and state records."""

from __future__ import annotations

from typing import NamedTuple

import orjson

from detector.engine.alerts import Alert
from detector.engine.records import DeadLetter, Source
from detector.state.snapshots import StateRecord

__all__ = [
    "MAX_DEAD_LETTER_BYTES",
    "Outgoing",
    "alert_message",
    "dead_letter_message",
    "state_messages",
]

#: Dead letters are cut to this: an input record near the broker's 1 MB limit, plus headers,
#: would exceed the producer's request size and be retried forever.
MAX_DEAD_LETTER_BYTES = 900 * 1024


class Outgoing(NamedTuple):
    """One message to publish: an alert, a dead letter or a piece of a state snapshot."""

    topic: str
    key: bytes | None
    value: bytes
    headers: list[tuple[str, bytes]]
    alert: Alert | None = None
    partition: int | None = None


def alert_message(topic: str, alert: Alert) -> Outgoing:
    return Outgoing(topic, alert.key.encode(), orjson.dumps(alert.to_dict()), [], alert)


def dead_letter_message(topic: str, letter: DeadLetter) -> Outgoing:
    """The original bytes, untouched, with why and where from in the headers; only a payload
    too large to publish is cut, with its size in a `truncated_from` header."""
    source = letter.source or Source()
    headers = [("reason", letter.reason.encode()), ("detail", letter.detail.encode())]
    payload = letter.payload
    if len(payload) > MAX_DEAD_LETTER_BYTES:
        headers.append(("truncated_from", str(len(payload)).encode()))
        payload = payload[:MAX_DEAD_LETTER_BYTES]
    headers += [
        (f"source_{name}", str(value).encode())
        for name, value in (
            ("topic", source.topic),
            ("partition", source.partition),
            ("offset", source.offset),
        )
        if value is not None
    ]
    return Outgoing(topic, None, payload, headers)


def state_messages(records: list[StateRecord]) -> list[Outgoing]:
    """Snapshot records, each to the state topic partition of its input partition."""
    return [Outgoing(r.topic, r.key, r.value, [], partition=r.partition) for r in records]
