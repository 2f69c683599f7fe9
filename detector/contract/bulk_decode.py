"""Decoding a whole batch of plain records at once: the engine's fast path.

`FeatureCodec.decode` validates one record at a time, one Python call per feature; through
Kafka that is a third of the daemon's time per event. Most batches are plain, though: every
record is a JSON object whose event time and numeric features are JSON numbers. For those,
one C-level `itemgetter` per record collects the values, their types, ranges and finiteness
are checked once per batch with numpy, and each categorical column is mapped to its codes in
one pass. The result is exactly what `FeatureCodec.decode` gives, value for value; a batch
with anything else in it (a missing or null field, a string number, an ISO time, a malformed
record) is not decoded here at all, and the engine decodes it record by record as before,
dead letters included.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import chain
from operator import attrgetter, itemgetter
from typing import Any, Protocol

import numpy as np
import orjson

from detector.contract.features import FLOAT32_MAX, MAX_EVENT_TIME, UNKNOWN_CODE, FeatureCodec
from detector.contract.manifest import CategoricalFeature, NumericFeature

#: JSON numbers as orjson returns them (bool is a type of its own, and is refused).
_NUMBERS = frozenset({float, int})
#: What a categorical feature accepts: a label, or an integer standing for one.
_LABELS = frozenset({str, int})
#: Payloads still to decode as JSON.
_TEXTS = frozenset({bytes, str})
_PAYLOAD, _KEY = attrgetter("payload"), attrgetter("key")


class Record(Protocol):
    """What `decode_plain` reads of a record: the engine's `InputRecord` or `PolledRecord`."""

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


def decode_plain(
    codec: FeatureCodec, records: Sequence[Record], max_bytes: int
) -> PlainBatch | None:
    """The batch decoded in bulk, or None when any record is not plain."""
    features = codec.features
    numeric = [f.name for f in features if isinstance(f, NumericFeature)]
    categorical = [(i, f) for i, f in enumerate(features) if isinstance(f, CategoricalFeature)]
    if not records or not numeric:
        return None
    columns = codec.columns
    numbers = itemgetter(columns.time, *numeric)
    try:
        objects = _objects(records, max_bytes)
        if objects is None:
            return None
        keys = _keys(records, objects, columns.key)
        if keys is None:
            return None
        flat = list(chain.from_iterable(map(numbers, objects)))
        labels = [list(map(itemgetter(f.name), objects)) for _, f in categorical]
    except (orjson.JSONDecodeError, LookupError, TypeError):  # not JSON, a field missing, no object
        return None
    if not set(map(type, flat)) <= _NUMBERS:
        return None
    if not set(map(type, chain.from_iterable(labels))) <= _LABELS:
        return None
    try:
        table = np.array(flat, np.float64).reshape(len(objects), len(numeric) + 1)
    except OverflowError:  # an integer beyond the range of floats
        return None
    ids = dict.fromkeys(keys)  # in order of first appearance
    index = dict(zip(ids, range(len(ids)), strict=True))
    key_ids = np.fromiter(map(index.__getitem__, keys), np.intp, len(keys))
    times = table[:, 0] / 1000.0 if columns.time_unit == "ms" else table[:, 0]
    finite = (np.abs(table[:, 1:]) <= FLOAT32_MAX).all()  # as `decode`: False for NaN too
    if not (finite and ((times >= 0) & (times < MAX_EVENT_TIME)).all()):
        return None
    raw = np.zeros((len(objects), codec.width), np.float64)
    raw[:, codec.numeric_index] = table[:, 1:]
    for (column, feature), values in zip(categorical, labels, strict=True):
        code = codec.vocabulary(feature.name).get
        raw[:, column] = [
            code(label if type(label) is str else str(label), UNKNOWN_CODE) for label in values
        ]
    return PlainBatch(list(ids), key_ids, times, raw)


def _objects(records: Sequence[Record], max_bytes: int) -> list[Any] | None:
    """Each record's payload as decoded JSON (None when one is longer than `max_bytes`); a
    payload that is already a mapping is taken as it is. `orjson.JSONDecodeError` when one
    is not JSON."""
    payloads = list(map(_PAYLOAD, records))
    kinds = set(map(type, payloads))
    if kinds <= _TEXTS:
        if max(map(len, payloads)) > max_bytes:
            return None
        return list(map(orjson.loads, payloads))
    if kinds & _TEXTS:  # some parsed, some not
        texts = [payload for payload in payloads if type(payload) in _TEXTS]
        if max(map(len, texts)) > max_bytes:
            return None
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
