"""Records going into the engine, where they came from, and the ones it could not score.

Reading them from files is `detector.files.readers`'s part.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import orjson


@dataclass(frozen=True, slots=True)
class Source:
    """Where a record came from: a Kafka topic, partition and offset, or a file and row."""

    topic: str | None = None
    partition: int | None = None
    offset: int | None = None
    file: str | None = None
    row: int | None = None

    def to_dict(self) -> dict[str, str | int]:
        return {
            name: value
            for name in ("topic", "partition", "offset", "file", "row")
            if (value := getattr(self, name)) is not None
        }


@dataclass(frozen=True, slots=True)
class InputRecord:
    """One record for the engine: JSON bytes (as read from Kafka) or an already parsed mapping.

    `key` overrides the record's key column, e.g. with the Kafka message key.
    """

    payload: bytes | str | Mapping[str, Any]
    key: str | None = None
    source: Source | None = None


class PolledRecord(NamedTuple):
    """A Kafka message as the engine reads it: what an `InputRecord` offers (payload, key,
    source), as a tuple that `detector.restore.input_records` makes for a whole poll without
    a Python call per record. The `Source` is made only when asked for: by an alert or a
    dead letter, a few records of a batch."""

    payload: bytes
    key: str | None
    topic: str
    partition: int
    offset: int

    @property
    def source(self) -> Source:
        return Source(self.topic, self.partition, self.offset)


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A record that could not be scored: its original bytes and a machine-readable reason."""

    payload: bytes
    reason: str
    detail: str
    source: Source | None = None

    @classmethod
    def of(cls, record: InputRecord | PolledRecord, reason: str, detail: str) -> DeadLetter:
        return cls(payload_bytes(record.payload), reason, detail, record.source)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form: the payload as text when it is UTF-8, else as base64."""
        document: dict[str, Any] = {"reason": self.reason, "detail": self.detail}
        try:
            document["payload"] = self.payload.decode()
        except UnicodeDecodeError:
            document["payload_base64"] = base64.b64encode(self.payload).decode()
        if self.source is not None:
            document["source"] = self.source.to_dict()
        return document


def payload_bytes(payload: bytes | str | Mapping[str, Any]) -> bytes:
    """The payload as bytes; a mapping is serialised as JSON (anything odd as its str)."""
    if isinstance(payload, bytes):
        return payload
    if isinstance(payload, str):
        return payload.encode()
    try:
        return orjson.dumps(payload, default=str, option=orjson.OPT_NON_STR_KEYS)
    except TypeError:
        return repr(payload).encode()
