"""Decoding a whole batch of plain records at once: the engine's fast path.

`FeatureCodec.decode` validates one record at a time, one Python call per feature; through
Kafka that is a third of the daemon's time per event. Most batches are plain, though: every
record is a JSON object whose event time and numeric features are JSON numbers. Such a batch
is read in one of two ways, the first that takes all of it:

- **Typed rows.** A payload that holds the model's columns and nothing else (key, event time,
  features, label) is parsed by msgspec straight into a row of typed fields: parsing and type
  checks are one C call per record, half the cost of orjson building a dict. Since every byte
  of such a payload lands in a typed field, it accepts what orjson accepts (UTF-8, number
  ranges), so a batch never scores a record that the codec would make a dead letter.
- **Documents.** Any other JSON objects (more fields, parsed mappings) are parsed by orjson;
  one C-level `itemgetter` per record collects the values, and their types are checked once
  per batch.

Ranges and finiteness are then checked once per batch with numpy, and each categorical column
is mapped to its codes in one pass. The result is exactly what `FeatureCodec.decode` gives,
value for value; a batch with anything else in it (a missing or null field, a string number,
an ISO time, a malformed record) is not decoded here at all, and the engine decodes it record
by record as before, dead letters included.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import chain
from operator import attrgetter, itemgetter
from typing import Annotated, Any, Protocol

import msgspec
import numpy as np
import orjson

from detector.contract.features import FLOAT32_MAX, MAX_EVENT_TIME, UNKNOWN_CODE, FeatureCodec
from detector.contract.manifest import CategoricalFeature, Columns, NumericFeature

#: JSON numbers as orjson returns them (bool is a type of its own, and is refused).
_NUMBERS = frozenset({float, int})
#: What a categorical feature accepts: a label, or an integer standing for one.
_LABELS = frozenset({str, int})
#: Payloads still to decode as JSON.
_TEXTS = frozenset({bytes, str})
_PAYLOAD, _KEY = attrgetter("payload"), attrgetter("key")
#: An integer label of a typed row: within int64, where orjson too returns an int (and not a
#: float, which the codec refuses as a label).
_LABEL_INTEGER = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]
#: What a typed row's label column may hold; it is not read, only accepted.
_TARGET = float | str | bool | None


class Record(Protocol):
    """What `BulkDecoder` reads of a record: the engine's `InputRecord` or `PolledRecord`."""

    @property
    def payload(self) -> bytes | str | Mapping[str, Any]: ...

    @property
    def key(self) -> str | None: ...


@dataclass(frozen=True, slots=True)
class PlainBatch:
    """Every record of the batch, decoded: key ids into `keys` (distinct, in order of first
    appearance), event times in seconds and raw values [records, width]."""

    keys: list[str]
    key_ids: np.ndarray
    times: np.ndarray
    raw: np.ndarray


@dataclass(frozen=True, slots=True)
class _Columns:
    """A batch's values before the checks on their ranges: each record's key, its event time
    and numeric features [records, 1 + numeric], and each categorical feature's labels."""

    keys: list[str]
    numbers: np.ndarray
    labels: list[list[Any]]


class BulkDecoder:
    """Decodes plain batches for one codec; its typed row is built once, here."""

    def __init__(self, codec: FeatureCodec) -> None:
        self.codec = codec
        features = codec.features
        numeric = [f.name for f in features if isinstance(f, NumericFeature)]
        self._numeric = numeric
        self._categorical = [
            (i, f) for i, f in enumerate(features) if isinstance(f, CategoricalFeature)
        ]
        labels = [f.name for _, f in self._categorical]
        self._numbers = itemgetter(codec.columns.time, *numeric)
        self._rows = _row_decoder(codec.columns, numeric, labels)
        self._row_numbers = attrgetter("time", *(f"number{i}" for i in range(len(numeric))))
        self._row_labels = [attrgetter(f"label{i}") for i in range(len(labels))]

    def decode(self, records: Sequence[Record], max_bytes: int) -> PlainBatch | None:
        """The batch decoded in bulk, or None when any record is not plain."""
        if not records or not self._numeric:
            return None
        payloads = list(map(_PAYLOAD, records))
        kinds = set(map(type, payloads))
        if kinds & _TEXTS:
            texts = payloads if kinds <= _TEXTS else [p for p in payloads if type(p) in _TEXTS]
            if max(map(len, texts)) > max_bytes:
                return None
        columns = None
        if kinds <= _TEXTS and self._rows is not None:
            columns = self._typed(self._rows, records, payloads)
        if columns is None:
            columns = self._documents(records, payloads, kinds)
        return None if columns is None else self._checked(columns)

    def _typed(
        self, decoder: msgspec.json.Decoder, records: Sequence[Record], payloads: list[Any]
    ) -> _Columns | None:
        """Every payload as a typed row, or None when one is not such a row."""
        try:
            rows = list(map(decoder.decode, payloads))
        except (msgspec.DecodeError, RecursionError, UnicodeEncodeError):
            return None  # not JSON, a field of another type, missing or unknown; a surrogate
        keys = list(map(_KEY, records))
        if None in keys:
            keys = [
                key if key is not None else row.key for key, row in zip(keys, rows, strict=True)
            ]
            if None in keys or "" in keys:
                return None
        count = len(rows) * (1 + len(self._numeric))  # floats all: msgspec converted the ints
        flat = np.fromiter(chain.from_iterable(map(self._row_numbers, rows)), np.float64, count)
        labels = [list(map(label, rows)) for label in self._row_labels]
        return _Columns(keys, flat.reshape(len(rows), -1), labels)

    def _documents(
        self, records: Sequence[Record], payloads: list[Any], kinds: set[type]
    ) -> _Columns | None:
        """Every payload as a JSON object (parsed here unless already a mapping), or None;
        `kinds` are the payloads' types."""
        try:
            objects = _objects(payloads, kinds)
            keys = _keys(records, objects, self.codec.columns.key)
            if keys is None:
                return None
            numbers = list(chain.from_iterable(map(self._numbers, objects)))
            labels = [list(map(itemgetter(f.name), objects)) for _, f in self._categorical]
        except (orjson.JSONDecodeError, LookupError, TypeError):  # a field missing, no object
            return None
        if not set(map(type, numbers)) <= _NUMBERS:
            return None
        if not set(map(type, chain.from_iterable(labels))) <= _LABELS:
            return None
        try:
            table = np.array(numbers, np.float64).reshape(len(keys), -1)
        except OverflowError:  # an integer beyond the range of floats
            return None
        return _Columns(keys, table, labels)

    def _checked(self, columns: _Columns) -> PlainBatch | None:
        """The batch, once its times and values are in range; None otherwise."""
        codec, keys, table = self.codec, columns.keys, columns.numbers
        ids = dict.fromkeys(keys)  # in order of first appearance
        index = dict(zip(ids, range(len(ids)), strict=True))
        key_ids = np.fromiter(map(index.__getitem__, keys), np.intp, len(keys))
        times = table[:, 0] / 1000.0 if codec.columns.time_unit == "ms" else table[:, 0]
        finite = (np.abs(table[:, 1:]) <= FLOAT32_MAX).all()  # as `decode`: False for NaN too
        if not (finite and ((times >= 0) & (times < MAX_EVENT_TIME)).all()):
            return None
        raw = np.zeros((len(keys), codec.width), np.float64)
        raw[:, codec.numeric_index] = table[:, 1:]
        for (column, feature), values in zip(self._categorical, columns.labels, strict=True):
            code = codec.vocabulary(feature.name).get
            raw[:, column] = [
                code(label if type(label) is str else str(label), UNKNOWN_CODE) for label in values
            ]
        return PlainBatch(list(ids), key_ids, times, raw)


def _row_decoder(
    columns: Columns, numeric: list[str], categorical: list[str]
) -> msgspec.json.Decoder | None:
    """msgspec's decoder of a payload that holds the model's columns and nothing else; None
    when two of those columns share a name."""
    label = [columns.label] if columns.label else []
    names = [columns.key, columns.time, *numeric, *categorical, *label]
    if len(set(names)) < len(names):
        return None
    fields: list[tuple[str, Any, Any]] = [
        ("key", str | None, msgspec.field(default=None, name=columns.key)),
        ("time", float, msgspec.field(name=columns.time)),
        *((f"number{i}", float, msgspec.field(name=n)) for i, n in enumerate(numeric)),
        *(
            (f"label{i}", str | _LABEL_INTEGER, msgspec.field(name=n))
            for i, n in enumerate(categorical)
        ),
        *(("target", _TARGET, msgspec.field(default=None, name=n)) for n in label),
    ]
    row = msgspec.defstruct("PlainRow", fields, kw_only=True, forbid_unknown_fields=True, gc=False)
    return msgspec.json.Decoder(row)


def _objects(payloads: list[Any], kinds: set[type]) -> list[Any]:
    """Each payload as decoded JSON; one that is already a mapping is taken as it is.
    `orjson.JSONDecodeError` when one is not JSON."""
    if kinds <= _TEXTS:
        return list(map(orjson.loads, payloads))
    if kinds & _TEXTS:  # some parsed, some not
        return [orjson.loads(p) if type(p) in _TEXTS else p for p in payloads]
    return payloads


def _keys(records: Sequence[Record], objects: list[Any], column: str) -> list[str] | None:
    """Each record's key: its own, or else its payload's `column`, which must be a non-empty
    string (None otherwise). `LookupError` or `TypeError` when a payload lacks it."""
    keys = list(map(_KEY, records))
    if None not in keys:
        return keys
    pairs = zip(keys, objects, strict=True)
    keys = [key if key is not None else payload[column] for key, payload in pairs]
    if set(map(type, keys)) != {str} or "" in keys:
        return None
    return keys
