"""Decoding a whole batch of plain records at once: the engine's fast path.

`FeatureCodec.decode` validates one record at a time, one Python call per feature; through
Kafka that is a third of the daemon's time per event. Most batches are plain, though: every
record is a JSON object whose event time and numeric features are JSON numbers. For those,
one C-level `itemgetter` per record collects the values, and their types, ranges and
finiteness are checked once per batch with numpy. The result is exactly what
`FeatureCodec.decode` gives, value for value; a batch with anything else in it (a missing or
null field, a string, an ISO time, a malformed record, a categorical feature) is not decoded
here at all, and the engine decodes it record by record as before, dead letters included.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain
from operator import itemgetter

import numpy as np
import orjson

from detector.features import FLOAT32_MAX, MAX_EVENT_TIME, FeatureCodec
from detector.manifest import NumericFeature, TimeDeltaFeature
from detector.records import InputRecord

#: JSON numbers as orjson returns them (bool is a type of its own, and is refused).
_NUMBERS = frozenset({float, int})


@dataclass(frozen=True, slots=True)
class PlainBatch:
    """Every record of the batch, decoded: key ids into `keys` (distinct, in order of first
    appearance), event times in seconds and raw values [records, width]."""

    keys: list[str]
    key_ids: np.ndarray
    times: np.ndarray
    raw: np.ndarray


def decode_plain(
    codec: FeatureCodec, records: Sequence[InputRecord], max_bytes: int
) -> PlainBatch | None:
    """The batch decoded in bulk, or None when any record is not plain."""
    features = codec.features
    if not records or not all(isinstance(f, NumericFeature | TimeDeltaFeature) for f in features):
        return None
    numeric = [f.name for f in features if isinstance(f, NumericFeature)]
    if not numeric:
        return None
    columns = codec.columns
    values = itemgetter(columns.time, *numeric)
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
    if not set(map(type, chain.from_iterable(rows))) <= _NUMBERS:
        return None
    try:
        table = np.array(rows, np.float64)
    except OverflowError:  # an integer beyond the range of floats
        return None
    times = table[:, 0] / 1000.0 if columns.time_unit == "ms" else table[:, 0]
    finite = (np.abs(table[:, 1:]) <= FLOAT32_MAX).all()  # as `decode`: False for NaN too
    if not (finite and ((times >= 0) & (times < MAX_EVENT_TIME)).all()):
        return None
    raw = np.zeros((len(rows), codec.width), np.float64)
    raw[:, codec.numeric_index] = table[:, 1:]
    return PlainBatch(list(ids), np.array(key_ids, np.intp), times, raw)
