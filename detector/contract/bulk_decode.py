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
from operator import itemgetter
from typing import Any, Protocol

import numpy as np
import orjson

from detector.contract.features import FLOAT32_MAX, MAX_EVENT_TIME, UNKNOWN_CODE, FeatureCodec
from detector.contract.manifest import CategoricalFeature, NumericFeature

#: JSON numbers as orjson returns them (bool is a type of its own, and is refused).
_NUMBERS = frozenset({float, int})
#: What a categorical feature accepts: a label, or an integer standing for one.
_LABELS = frozenset({str, int})


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
    values = itemgetter(columns.time, *numeric, *(f.name for _, f in categorical))
    key_column = columns.key
    ids: dict[str, int] = {}
    key_ids: list[int] = []
    rows: list[tuple] = []
    key_id, add_key, add_row, loads = ids.setdefault, key_ids.append, rows.append, orjson.loads
    try:
        for record in records:
            payload = record.payload
            if type(payload) is bytes or type(payload) is str:
                if len(payload) > max_bytes:
                    return None
                payload = loads(payload)
            key = record.key
            if key is None:
                key = payload[key_column]
                if type(key) is not str or not key:
                    return None
            add_key(key_id(key, len(ids)))
            add_row(values(payload))
    except (orjson.JSONDecodeError, LookupError, TypeError):  # not JSON, a field missing, no object
        return None
    numbers = len(numeric) + 1  # the time, then the numeric features, then the categorical
    fields = list(zip(*rows, strict=True))  # one column per field
    if not set(map(type, chain.from_iterable(fields[:numbers]))) <= _NUMBERS:
        return None
    if not set(map(type, chain.from_iterable(fields[numbers:]))) <= _LABELS:
        return None
    try:
        table = np.array(fields[:numbers], np.float64).T
    except OverflowError:  # an integer beyond the range of floats
        return None
    times = table[:, 0] / 1000.0 if columns.time_unit == "ms" else table[:, 0]
    finite = (np.abs(table[:, 1:]) <= FLOAT32_MAX).all()  # as `decode`: False for NaN too
    if not (finite and ((times >= 0) & (times < MAX_EVENT_TIME)).all()):
        return None
    raw = np.zeros((len(rows), codec.width), np.float64)
    raw[:, codec.numeric_index] = table[:, 1:]
    for (index, feature), column in zip(categorical, fields[numbers:], strict=True):
        code = codec.vocabulary(feature.name).get
        raw[:, index] = [
            code(label if type(label) is str else str(label), UNKNOWN_CODE) for label in column
        ]
    return PlainBatch(list(ids), np.array(key_ids, np.intp), times, raw)
