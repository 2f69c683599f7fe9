"""Replay a file of events through the engine, as if it arrived from Kafka in event-time order.

`replay_records` is the one way to score recorded data with the detector's own code: the
`detector replay` command uses it, and so does `trainer evaluate`, so that offline numbers
are the numbers the daemon would produce.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from detector.contract.features import RecordError, parse_event_time, parse_json_record
from detector.engine.alerts import Alert
from detector.engine.core import BatchResult, Engine, EngineOptions, Status
from detector.engine.records import DeadLetter, InputRecord, Source
from detector.engine.scorer import Scorer

#: Called after each batch with (events done, events in all).
Progress = Callable[[int, int], None]


@dataclass(frozen=True, slots=True)
class ReplaySummary:
    events: int
    keys: int
    scored: int
    warming_up: int
    skipped_by_stride: int
    alerts: int
    dead_letters: int
    evicted_lru: int
    expired_ttl: int
    seconds: float

    @property
    def events_per_s(self) -> float:
        return self.events / self.seconds if self.seconds > 0 else math.inf


@dataclass(frozen=True, slots=True)
class ReplayResult:
    """Per event, in INPUT order (index i is records[i]): `rows` (= i), `keys` (None for dead
    letters), `times` (NaN when unreadable), `scores` and the `thresholds` they were compared
    with (NaN when not scored) and `statuses` (`Status` codes); the alerts and dead letters
    in processing order; and a summary."""

    rows: np.ndarray
    keys: np.ndarray
    times: np.ndarray
    scores: np.ndarray
    thresholds: np.ndarray
    statuses: np.ndarray
    alerts: list[Alert]
    dead_letters: list[DeadLetter]
    summary: ReplaySummary


def replay_records(
    records: Sequence[Mapping[str, Any] | bytes],
    scorer: Scorer,
    options: EngineOptions | None = None,
    progress: Progress | None = None,
    source_name: str | None = None,
) -> ReplayResult:
    """Score `records` (dicts, or JSON bytes) with a fresh engine, in event-time order.

    Records are stably sorted by event time, parsed by the codec's own parser; records whose
    time cannot be read keep their place at the end and become dead letters in the engine.
    Batches hold `options.max_batch` records. `source_name` is the file named in alert and
    dead letter sources (with the input row).
    """
    options = options or EngineOptions()
    engine = Engine(scorer, options)
    started = time.perf_counter()
    order = np.argsort(_event_times(records, scorer, options), kind="stable")
    total = len(records)
    parts: list[BatchResult] = []
    for start in range(0, total, options.max_batch):
        rows = order[start : start + options.max_batch].tolist()
        parts.append(
            engine.process(
                [
                    InputRecord(records[row], source=Source(file=source_name, row=row))
                    for row in rows
                ]
            )
        )
        if progress is not None:
            progress(min(start + options.max_batch, total), total)
    result = BatchResult.concatenate(parts) if parts else engine.process([])
    inverse = np.empty(total, np.intp)
    inverse[order] = np.arange(total)
    counters = result.counters
    summary = ReplaySummary(
        events=total,
        keys=len(set(result.keys[result.statuses != Status.DEAD_LETTER].tolist())),
        scored=counters.scored,
        warming_up=counters.warming_up,
        skipped_by_stride=counters.skipped_by_stride,
        alerts=counters.alerts,
        dead_letters=counters.dead_letters,
        evicted_lru=counters.evicted_lru,
        expired_ttl=counters.expired_ttl,
        seconds=time.perf_counter() - started,
    )
    return ReplayResult(
        rows=np.arange(total),
        keys=result.keys[inverse],
        times=result.times[inverse],
        scores=result.scores[inverse],
        thresholds=result.thresholds[inverse],
        statuses=result.statuses[inverse],
        alerts=result.alerts,
        dead_letters=result.dead_letters,
        summary=summary,
    )


def _event_times(
    records: Sequence[Mapping[str, Any] | bytes], scorer: Scorer, options: EngineOptions
) -> np.ndarray:
    """Each record's event time, +inf where it cannot be read."""
    columns = scorer.manifest.columns
    times = np.full(len(records), np.inf)
    for row, record in enumerate(records):
        try:
            document = (
                record
                if isinstance(record, Mapping)
                else parse_json_record(record, options.max_record_bytes)
            )
            times[row] = parse_event_time(
                document.get(columns.time), columns.time_unit, columns.time
            )
        except RecordError:
            continue
    return times
