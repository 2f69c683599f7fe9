"""The streaming engine: records in, per-event scores, alerts and dead letters out.

Pure: no Kafka, no files, and no clock but the `now` it is passed (the process clock only
spaces out warnings), so that the daemon, file replay and the tests drive the very same code.
A batch goes through four steps:

1. decode each record (the only per-record Python loop; bad records become dead letters);
2. find or allocate each key's slot in the `KeyArena`, evicting and expiring in bulk, and find
   the late events, older than their key's latest (`EngineOptions.late_events`);
3. apply the events in rounds, round r holding the r-th event of every key in the batch, so
   that several events of one key are applied in order while each round is vectorised over
   keys: window models write the ring buffers and gather every scored event's window, then
   score all windows of the batch together; stateful models run one LSTM step per round;
4. smooth the scores, advance the alert episodes and explain the alerts (one extra call).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, Literal, get_args

import numpy as np
import structlog

from detector.contract.bulk_decode import BulkDecoder
from detector.contract.features import RecordError, parse_json_record
from detector.contract.manifest import Manifest
from detector.engine.alerts import (
    Alert,
    advance_episodes,
    alert_id,
    forecast_shares,
    occlusion_effects,
    occlusion_values,
    smooth,
)
from detector.engine.arena import ArenaShape, KeyArena
from detector.engine.identity import incompatibility
from detector.engine.records import DeadLetter, InputRecord
from detector.engine.scorer import Scorer, Scores
from detector.engine.thresholds import choose_levels

log = structlog.get_logger(__name__)

#: Rings of recent scores larger than this at `max_keys` are worth a warning at start.
ADAPTIVE_WARNING_BYTES = 2**30
#: What becomes of a late event: a dead letter (reason "late") or scored as it comes.
LatePolicy = Literal["dead_letter", "score"]
#: Seconds between two warnings about late events at most; `/metrics` counts every one.
LATE_WARNING_INTERVAL_S = 60.0


class Status(IntEnum):
    """What happened to each event of a batch."""

    SCORED = 0
    WARMING_UP = 1
    SKIPPED_BY_STRIDE = 2
    DEAD_LETTER = 3


@dataclass(frozen=True, slots=True)
class EngineOptions:
    """Engine settings; the daemon builds them from its configuration."""

    #: Most records processed (and rows sent to onnxruntime) at once.
    max_batch: int = 4096
    #: Most keys with state; beyond it the least recently seen are evicted.
    max_keys: int = 1_000_000
    #: Keys idle longer than this (by event time, or by `now` when passed) are forgotten; 0: never.
    key_ttl_s: float = 0.0
    #: Score every n-th event of a key after its warm-up; the others only update its state.
    stride: int = 1
    #: Alert threshold; None: the manifest's calibrated one.
    threshold: float | None = None
    #: Consecutive scored events below the threshold that close an episode.
    cooldown_events: int = 10
    #: Larger JSON payloads are dead letters.
    max_record_bytes: int = 65536
    #: What becomes of a late event, older than its key's latest one by more than
    #: `late_grace_s`: a dead letter that leaves its key's state as it was, or scored as it comes.
    late_events: LatePolicy = "dead_letter"
    #: Events at most this much older than their key's latest are scored as they come (Kafka
    #: Streams' grace period); an event as old as the latest is never late.
    late_grace_s: float = 0.0

    def __post_init__(self) -> None:
        if self.max_batch < 1 or self.stride < 1:
            raise ValueError("max_batch and stride must be at least 1")
        if self.max_keys < self.max_batch:
            raise ValueError("max_keys must be at least max_batch (a batch's keys must fit)")
        if self.key_ttl_s < 0 or self.cooldown_events < 0 or self.max_record_bytes < 1:
            raise ValueError("key_ttl_s and cooldown_events must be >= 0, max_record_bytes >= 1")
        if self.late_events not in get_args(LatePolicy) or not self.late_grace_s >= 0:
            raise ValueError(f"late_events must be one of {get_args(LatePolicy)}, grace >= 0")


@dataclass(slots=True)
class Counters:
    """Event and key counts; records == scored + warming_up + skipped_by_stride + dead_letters.
    `late` events are among the dead letters or the others, as `EngineOptions.late_events` says."""

    records: int = 0
    scored: int = 0
    warming_up: int = 0
    skipped_by_stride: int = 0
    dead_letters: int = 0
    late: int = 0
    alerts: int = 0
    evicted_lru: int = 0
    expired_ttl: int = 0

    def add(self, other: Counters) -> None:
        for name in self.__slots__:
            setattr(self, name, getattr(self, name) + getattr(other, name))


@dataclass(slots=True)
class BatchResult:
    """Per event, in input order: key (None for dead letters), event time, score (NaN when
    not known or not scored; the smoothed score that alerts compare with the threshold), the
    threshold it was compared with (NaN when not scored) and `Status` code; plus the batch's
    alerts, dead letters and counters."""

    keys: np.ndarray
    times: np.ndarray
    scores: np.ndarray
    thresholds: np.ndarray
    statuses: np.ndarray
    alerts: list[Alert] = field(default_factory=list)
    dead_letters: list[DeadLetter] = field(default_factory=list)
    counters: Counters = field(default_factory=Counters)

    @classmethod
    def concatenate(cls, parts: Sequence[BatchResult]) -> BatchResult:
        counters = Counters()
        for part in parts:
            counters.add(part.counters)
        return cls(
            keys=np.concatenate([part.keys for part in parts]),
            times=np.concatenate([part.times for part in parts]),
            scores=np.concatenate([part.scores for part in parts]),
            thresholds=np.concatenate([part.thresholds for part in parts]),
            statuses=np.concatenate([part.statuses for part in parts]),
            alerts=[alert for part in parts for alert in part.alerts],
            dead_letters=[letter for part in parts for letter in part.dead_letters],
            counters=counters,
        )


@dataclass(slots=True)
class _Decoded:
    """The good records of a batch, as arrays."""

    index: np.ndarray  # position in the batch
    key_ids: np.ndarray  # index into keys
    keys: list[str]  # distinct keys, in order of first appearance
    times: np.ndarray
    raw: np.ndarray  # [events, width]


class RateLimitedWarning:
    """A warning logged at most once per `interval_s` of `clock`, with how many times it
    happened since the last one: a stream of bad input must not flood the logs."""

    def __init__(
        self, event: str, interval_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.event = event
        self.interval_s = interval_s
        self.clock = clock
        self._next_at = -math.inf
        self._count = 0

    def __call__(self, count: int, **fields: Any) -> None:
        self._count += count
        now = self.clock()
        if now >= self._next_at:
            log.warning(self.event, count=self._count, **fields)
            self._count = 0
            self._next_at = now + self.interval_s


class Engine:
    """Scores a stream of records batch by batch, keeping each key's state between batches."""

    def __init__(self, model: Scorer, options: EngineOptions | None = None) -> None:
        self.options = options or EngineOptions()
        self.model = model
        self.bulk = BulkDecoder(model.codec)
        self.arena = self._arena_for(model.manifest)
        self.static_thresholds = self._static_thresholds()
        self.late_warning = RateLimitedWarning(
            "late events: a key's event time went backwards", LATE_WARNING_INTERVAL_S
        )
        self._tick = 0

    @property
    def manifest(self) -> Manifest:
        return self.model.manifest

    @property
    def threshold(self) -> float:
        override = self.options.threshold
        return self.manifest.scoring.threshold if override is None else override

    @property
    def min_score(self) -> float:
        """The bound below every key's threshold: the model's, unless an explicit
        `EngineOptions.threshold` replaces the model's thresholds."""
        return self.manifest.scoring.min_score if self.options.threshold is None else 0.0

    @property
    def keys(self) -> int:
        """Keys with state now."""
        return len(self.arena)

    def swap_model(self, model: Scorer) -> bool:
        """Serve `model` from the next batch on; True if the keys' state was kept.

        State is kept only when the new model reads it the same way: when the two models'
        `state_identity` is equal, as it must be for a snapshot to be restored.
        """
        reason = incompatibility(self.manifest, model.manifest)
        self.model = model
        self.bulk = BulkDecoder(model.codec)
        if reason is not None:
            self.arena = self._arena_for(model.manifest)
        self.static_thresholds = self._static_thresholds()
        log.info(
            "model swapped",
            model_version=model.manifest.model_version,
            state="reset" if reason else "kept",
            reason=reason,
        )
        return reason is None

    def _static_thresholds(self) -> np.ndarray:
        """The static threshold of each statistics row (`KeyArena.stats_row`): row 0 the
        model's, the others their key's own calibrated one where the manifest has it, none
        below `min_score`. An explicit `EngineOptions.threshold` holds for every key."""
        base = self.threshold
        own = self.manifest.key_thresholds if self.options.threshold is None else {}
        keys = self.manifest.per_key_statistics or {}
        static = np.array([base] + [own.get(key, base) for key in keys], np.float64)
        return np.fmax(static, self.min_score)

    def _arena_for(self, manifest: Manifest) -> KeyArena:
        """A fresh arena; says so when adaptive thresholds could fill memory at `max_keys`
        (the arena grows with the keys, so the cost would show only once they arrive)."""
        shape = ArenaShape.for_manifest(manifest)
        max_keys = self.options.max_keys
        if shape.history is not None and shape.history * 4 * max_keys > ADAPTIVE_WARNING_BYTES:
            log.warning(
                "adaptive thresholds keep a ring of scores per key",
                gib_at_max_keys=round(shape.history * 4 * max_keys / 2**30, 1),
                history=shape.history,
                max_keys=max_keys,
                hint="lower state.max_keys (SEQSENTINEL_STATE__MAX_KEYS) or the model's history",
            )
        return KeyArena(shape, max_keys)

    def process(
        self,
        records: Sequence[InputRecord],
        now: float | None = None,
        partitions: np.ndarray | None = None,
    ) -> BatchResult:
        """Score a batch; larger batches than `max_batch` are processed in slices of it.

        `partitions`: each record's input partition (-1 when not given), which its key
        remembers (`KeyArena.partition`, what a partition's snapshot holds) and whose own
        event time alone ages the partition's keys out of the TTL.
        """
        size = self.options.max_batch
        if partitions is None:
            partitions = np.full(len(records), -1, np.int32)
        if len(records) <= size:
            return self._process(records, now, partitions)
        return BatchResult.concatenate(
            [
                self._process(records[i : i + size], now, partitions[i : i + size])
                for i in range(0, len(records), size)
            ]
        )

    # -- one batch --------------------------------------------------------------------------

    def _process(
        self, records: Sequence[InputRecord], now: float | None, partitions: np.ndarray
    ) -> BatchResult:
        self._tick += 1
        n = len(records)
        decoded, dead_letters = self._decode(records)
        result = BatchResult(
            keys=np.full(n, None, object),
            times=np.full(n, np.nan),
            scores=np.full(n, np.nan),
            thresholds=np.full(n, np.nan),
            statuses=np.full(n, Status.DEAD_LETTER, np.int8),
            dead_letters=dead_letters,
            counters=Counters(records=n, dead_letters=len(dead_letters)),
        )
        if decoded.index.size:
            _Batch(self, self._tick, decoded, records, now, partitions, result).run()
        return result

    def _decode(self, records: Sequence[InputRecord]) -> tuple[_Decoded, list[DeadLetter]]:
        limit = self.options.max_record_bytes
        plain = self.bulk.decode(records, limit)
        if plain is not None:
            index = np.arange(len(records), dtype=np.intp)
            return _Decoded(index, plain.key_ids, plain.keys, plain.times, plain.raw), []
        decode = self.model.codec.decode
        ids: dict[str, int] = {}
        index: list[int] = []
        key_ids: list[int] = []
        times: list[float] = []
        values: list[list[float]] = []
        dead: list[DeadLetter] = []
        # The one per-record loop of the engine: methods bound once, nothing but decoding.
        key_id, add_index, add_key = ids.setdefault, index.append, key_ids.append
        add_time, add_values = times.append, values.append
        for position, record in enumerate(records):
            payload = record.payload
            try:
                if type(payload) is bytes or isinstance(payload, str):
                    payload = parse_json_record(payload, limit)
                event = decode(payload, record.key)
            except RecordError as error:
                dead.append(DeadLetter.of(record, error.reason, error.detail))
                continue
            add_index(position)
            add_key(key_id(event.key, len(ids)))
            add_time(event.time)
            add_values(event.values)
        width = len(self.manifest.features)
        decoded = _Decoded(
            np.array(index, np.intp),
            np.array(key_ids, np.intp),
            list(ids),
            np.array(times, np.float64),
            np.array(values, np.float64).reshape(len(values), width),
        )
        return decoded, dead


class _Batch:
    """The work on one batch's decoded events; lives for one `Engine._process` call."""

    # Set by `run`, per decoded event: its slot, whether it restarts its key (TTL), its key's
    # latest time once it is applied, its inputs.
    slots: np.ndarray
    restart: np.ndarray
    latest: np.ndarray
    x: np.ndarray
    rounds: _Rounds

    def __init__(
        self,
        engine: Engine,
        tick: int,
        decoded: _Decoded,
        records: Sequence[InputRecord],
        now: float | None,
        partitions: np.ndarray,
        result: BatchResult,
    ) -> None:
        self.engine = engine
        self.tick = tick
        self.options = engine.options
        self.model = engine.model
        self.manifest = engine.manifest
        self.arena = engine.arena
        self.decoded = decoded
        self.records = records
        self.now = now
        self.partitions = partitions[decoded.index]  # per decoded event
        self.result = result
        m = decoded.index.size
        self.raw_scores = np.full(m, np.nan, np.float32)
        forecasts = len(self.manifest.forecast_features) if self.manifest.task == "forecast" else 0
        self.contrib = np.zeros((m, forecasts), np.float32)
        self.sequence = np.zeros(m, np.int64)
        self.status = np.zeros(m, np.int8)
        # What the classify explanation re-scores: each scored event's window (window models)
        # or incoming state (stateful models), as a row of `inputs`.
        self.input_row = np.full(m, -1, np.intp)
        self.inputs: list[tuple[np.ndarray, ...]] = []
        self.late_dead = np.empty(0, np.intp)  # late events made dead letters

    def run(self) -> None:
        decoded, counters = self.decoded, self.result.counters
        self.slots = self._assign_slots()
        self.rounds = _rounds(decoded.key_ids)
        gaps, self.restart = self._gaps()
        counters.expired_ttl += int(self.restart.sum())
        self.x = self.model.codec.encode(decoded.raw, self.arena.stats_row[self.slots], gaps)
        if self.manifest.export_mode == "window":
            self._apply_windows()
        else:
            self._apply_steps()
        smoothed, thresholds, opened, onsets, peaks = self._alerting()

        index = decoded.index
        result = self.result
        result.keys[index] = np.array(decoded.keys, object)[decoded.key_ids]
        result.keys[index[self.late_dead]] = None
        result.times[index] = decoded.times
        result.statuses[index] = self.status
        result.scores[index] = smoothed
        result.thresholds[index] = thresholds
        counters.scored += int((self.status == Status.SCORED).sum())
        counters.warming_up += int((self.status == Status.WARMING_UP).sum())
        counters.skipped_by_stride += int((self.status == Status.SKIPPED_BY_STRIDE).sum())
        result.alerts = self._alerts(np.flatnonzero(opened), smoothed, thresholds, onsets, peaks)
        counters.alerts += len(result.alerts)

    def _assign_slots(self) -> np.ndarray:
        """Each event's slot: expire idle keys, look keys up, allocate (evicting) new ones, and
        tag each key with its event's partition."""
        arena, decoded, tick = self.arena, self.decoded, self.tick
        counters = self.result.counters
        ttl = self.options.key_ttl_s
        if ttl and self.now is not None:
            counters.expired_ttl += arena.expire(self.now - ttl, tick)
        slots = arena.lookup(decoded.keys)
        arena.last_seen[slots[slots >= 0]] = tick
        if ttl and self.now is None:
            # Keys of this batch are spared: their events restart them one by one (`_gaps`).
            partitions, latest = _latest_per_partition(self.partitions, decoded.times)
            counters.expired_ttl += arena.expire_partitions(partitions, latest - ttl, tick)
        new = np.flatnonzero(slots < 0)
        slots[new], evicted = arena.allocate(
            [decoded.keys[i] for i in new.tolist()], tick, self.model.codec.statistics_rows
        )
        counters.evicted_lru += evicted
        slots = slots[decoded.key_ids]
        arena.partition[slots] = self.partitions
        return slots

    def _gaps(self) -> tuple[np.ndarray, np.ndarray]:
        """Seconds since each event's previous one of its key (0 for a first event, and for
        one older than its key's latest), and whether the event restarts its key's history
        because the key was idle past the TTL. Late events are handled here, before any
        slot advances."""
        times, slots = self.decoded.times, self.slots
        first = self.rounds.first
        previous = np.empty_like(times)
        ordered = self.rounds.by_key
        previous[ordered[1:]] = times[ordered[:-1]]  # wrong for first events, fixed next
        previous[first] = self.arena.last_time[slots[first]]
        has_previous = np.ones(times.size, bool)
        has_previous[first] = self.arena.count[slots[first]] > 0
        self.latest = times
        if (has_previous & (times < previous)).any():  # out of order: the rare, slower path
            previous = self._latest_before(previous, has_previous)
            self._late(has_previous & (times < previous - self.options.late_grace_s), previous)
        gaps = np.where(has_previous & (times > previous), times - previous, 0.0)
        ttl = self.options.key_ttl_s
        restart = np.zeros(times.size, bool)
        if ttl and self.now is None:
            restart = has_previous & (gaps > ttl)
        return np.where(restart, 0.0, gaps), restart

    def _latest_before(self, previous: np.ndarray, has_previous: np.ndarray) -> np.ndarray:
        """The latest time of each event's key before the event: the running maximum from
        the key's `previous` (the arena's latest for its first event in the batch) on; also
        sets `latest`, the maximum with the event's own time."""
        times, ordered, first = self.decoded.times, self.rounds.by_key, self.rounds.first
        seeded = times.copy()
        seeded[first] = np.where(
            has_previous[first], np.fmax(times[first], previous[first]), times[first]
        )
        starts = np.zeros(times.size, bool)
        starts[first] = True
        self.latest = np.empty_like(times)
        self.latest[ordered] = _running_max(seeded[ordered], starts[ordered])
        before = np.empty_like(times)
        before[ordered[1:]] = self.latest[ordered[:-1]]  # wrong for first events, fixed next
        before[first] = previous[first]
        return before

    def _late(self, late: np.ndarray, latest: np.ndarray) -> None:
        """Count the `late` events, warn (rate-limited) and, by the policy, make them dead
        letters that no round applies: their keys' state stays as it was."""
        events = np.flatnonzero(late)
        if not events.size:
            return
        options, decoded, counters = self.options, self.decoded, self.result.counters
        behind = latest[events] - decoded.times[events]
        counters.late += events.size
        worst = int(np.argmax(behind))
        self.engine.late_warning(
            events.size,
            policy=options.late_events,
            grace_s=options.late_grace_s,
            key=decoded.keys[decoded.key_ids[events[worst]]],
            seconds_behind=float(behind[worst]),
        )
        if options.late_events != "dead_letter":
            return
        self.rounds = self.rounds.without(late)
        self.status[events] = Status.DEAD_LETTER
        self.late_dead = events
        counters.dead_letters += events.size
        self.result.dead_letters += [
            DeadLetter.of(
                self.records[position],
                "late",
                f"{seconds:g} s older than its key's latest event "
                f"(beyond the {options.late_grace_s:g} s grace)",
            )
            for position, seconds in zip(
                decoded.index[events].tolist(), behind.tolist(), strict=True
            )
        ]

    def _advance(self, events: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Append one event per key to the arena; the events' slots and which are scored."""
        arena, decoded = self.arena, self.decoded
        slots = self.slots[events]
        restart = self.restart[events]
        if restart.any():
            arena.reset_sequence(slots[restart])
        count = arena.count[slots] + 1
        arena.count[slots] = count
        arena.last_time[slots] = self.latest[events]
        arena.touched[slots] = decoded.times[events] if self.now is None else self.now
        self.sequence[events] = count
        history = count - self.manifest.min_history
        status = np.where(
            history < 0,
            Status.WARMING_UP,
            np.where(history % self.options.stride == 0, Status.SCORED, Status.SKIPPED_BY_STRIDE),
        )
        self.status[events] = status
        return slots, status == Status.SCORED

    def _apply_windows(self) -> None:
        arena = self.arena
        scored_events, windows, lengths = [], [], []
        for events in self.rounds:
            slots, scored = self._advance(events)
            arena.append(slots, self.x[events])
            if scored.any():
                gathered, length = arena.windows(slots[scored])
                scored_events.append(events[scored])
                windows.append(gathered)
                lengths.append(length)
        if not scored_events:
            return
        events = np.concatenate(scored_events)
        inputs = (np.concatenate(windows), np.concatenate(lengths))
        self._store(events, self.model.score_windows(*inputs, self.options.max_batch))
        self.input_row[events] = np.arange(events.size)
        self.inputs = [inputs]

    def _apply_steps(self) -> None:
        arena = self.arena
        offset = 0
        for events in self.rounds:
            slots, scored = self._advance(events)
            h, c = arena.state(slots)
            out = self.model.step(self.x[events], h, c, self.options.max_batch)
            arena.set_state(slots, out.h, out.c)
            self._store(events[scored], out, scored)
            if self.manifest.task == "classify":
                self.input_row[events] = offset + np.arange(events.size)
                self.inputs.append((self.x[events], h, c))
                offset += events.size

    def _store(
        self, events: np.ndarray, out: Scores, rows: np.ndarray | slice = slice(None)
    ) -> None:
        self.raw_scores[events] = out.score[rows]
        if out.contrib is not None:
            self.contrib[events] = out.contrib[rows]

    def _alerting(self) -> tuple[np.ndarray, ...]:
        """Smoothed scores, thresholds, episode openings, onsets and episode peaks, per event."""
        arena, options = self.arena, self.options
        m = self.decoded.index.size
        smoothed = np.full(m, np.nan)
        thresholds = np.full(m, np.nan)
        opened = np.zeros(m, bool)
        onsets = np.full(m, np.nan)
        peaks = np.full(m, np.nan)
        alpha = self.manifest.scoring.smoothing
        for events in self.rounds:
            restart = self.restart[events]
            if restart.any():
                arena.reset_scores(self.slots[events[restart]])
            events = events[self.status[events] == Status.SCORED]
            slots = self.slots[events]
            scores = smooth(arena, slots, self.raw_scores[events].astype(np.float64), alpha)
            smoothed[events] = scores
            thresholds[events] = threshold = self._thresholds(slots, scores)
            opened[events], onsets[events] = advance_episodes(
                arena,
                slots,
                scores,
                self.decoded.times[events],
                threshold,
                options.cooldown_events,
                self.manifest.scoring.confirm,
            )
            peaks[events] = arena.peak[slots]
        return (
            smoothed,
            thresholds,
            opened,
            onsets,
            _episode_peaks(self.rounds.by_key, self.decoded.key_ids, opened, peaks),
        )

    def _thresholds(self, slots: np.ndarray, scores: np.ndarray) -> np.ndarray:
        """Each slot's threshold for its new smoothed score: the static one (its key's own
        calibrated one, or the model's), or with adaptive thresholds the key's latest
        re-chosen one (at least the static one unless the floor is "none"; the static one
        before the first choice; while the key warms up, at least `warm_up_floor` times the
        static one, or infinite); never below `Engine.min_score`, which the static ones
        already respect."""
        arena = self.arena
        static = self.engine.static_thresholds[arena.stats_row[slots]]
        adaptive = self.manifest.scoring.adaptive
        if adaptive is None:
            return static
        scored = arena.remember_scores(slots, scores)
        refreshed = scored % adaptive.refresh == 0
        if refreshed.any():
            due = slots[refreshed]
            recent, valid = arena.recent_scores(due)
            arena.level[due] = choose_levels(
                recent, valid, prune=adaptive.prune, buffer=adaptive.buffer
            )[0]
        level = arena.level[slots]
        bound = static if adaptive.floor == "calibrated" else self.engine.min_score
        threshold = np.where(np.isnan(level), static, np.fmax(level, bound))
        if adaptive.warm_up_floor is None:
            warming = np.inf
        else:
            warming = np.fmax(threshold, adaptive.warm_up_floor * static)
        return np.where(scored < adaptive.warm_up, warming, threshold)

    def _alerts(
        self,
        events: np.ndarray,
        smoothed: np.ndarray,
        thresholds: np.ndarray,
        onsets: np.ndarray,
        peaks: np.ndarray,
    ) -> list[Alert]:
        if not events.size:
            return []
        manifest, decoded = self.manifest, self.decoded
        if manifest.task == "forecast":
            kind = "forecast_error_share"
            explanations = forecast_shares(
                self.contrib[events], [f.name for f in manifest.forecast_features]
            )
        else:
            kind = "occlusion"
            explanations = occlusion_effects(
                self.raw_scores[events], self._occluded(events), [f.name for f in manifest.features]
            )
        alerts = []
        for event, explanation in zip(events.tolist(), explanations, strict=True):
            key = decoded.keys[decoded.key_ids[event]]
            time = float(decoded.times[event])
            sequence = int(self.sequence[event])
            alerts.append(
                Alert(
                    alert_id=alert_id(manifest.model_version, key, time, sequence),
                    key=key,
                    event_time=time,
                    onset_time=float(onsets[event]),
                    sequence=sequence,
                    score=float(smoothed[event]),
                    peak_score=float(peaks[event]),
                    threshold=float(thresholds[event]),
                    model_version=manifest.model_version,
                    task=manifest.task,
                    source=self.records[decoded.index[event]].source,
                    explanation_kind=kind,
                    explanation=explanation,
                )
            )
        return alerts

    def _occluded(self, events: np.ndarray) -> np.ndarray:
        """Scores [alerts, features] with each feature of the alert event occluded in turn."""
        values = occlusion_values(self.manifest)
        width = values.size
        rows = self.input_row[events]
        feature = np.tile(np.arange(width), rows.size)
        max_batch = self.options.max_batch
        if self.manifest.export_mode == "window":
            windows, lengths = (part[rows].repeat(width, axis=0) for part in self.inputs[0])
            windows[np.arange(windows.shape[0]), lengths - 1, feature] = values[feature]
            score = self.model.score_windows(windows, lengths, max_batch).score
        else:
            x, h, c = (
                np.concatenate([part[i] for part in self.inputs], axis=0 if i == 0 else 1)
                for i in range(3)
            )
            x = x[rows].repeat(width, axis=0)
            x[np.arange(x.shape[0]), feature] = values[feature]
            h, c = (state[:, rows].repeat(width, axis=1) for state in (h, c))
            score = self.model.step(x, h, c, max_batch).score
        return score.reshape(rows.size, width)


@dataclass(frozen=True, slots=True)
class _Rounds:
    """Events grouped by their rank within their key: round r holds the r-th event of each key."""

    by_key: np.ndarray  # events ordered by key, then by position in the batch
    first: np.ndarray  # each key's first event in the batch
    order: np.ndarray  # events ordered by rank
    bounds: np.ndarray  # round r is order[bounds[r]:bounds[r + 1]]

    def __iter__(self) -> Iterator[np.ndarray]:
        for start, stop in zip(self.bounds[:-1].tolist(), self.bounds[1:].tolist(), strict=True):
            yield self.order[start:stop]

    def without(self, dropped: np.ndarray) -> _Rounds:
        """These rounds without the `dropped` events (a mask over events); rounds left empty
        are left out, and a key whose first event is dropped has none in `first`."""
        kept = ~dropped
        before = np.r_[0, np.cumsum(kept[self.order])]
        return _Rounds(
            self.by_key[kept[self.by_key]],
            self.first[kept[self.first]],
            self.order[kept[self.order]],
            np.unique(before[self.bounds]),
        )


def _rounds(key_ids: np.ndarray) -> _Rounds:
    by_key = np.argsort(key_ids, kind="stable")
    sorted_ids = key_ids[by_key]
    starts = np.flatnonzero(np.r_[True, sorted_ids[1:] != sorted_ids[:-1]])
    sizes = np.diff(np.r_[starts, key_ids.size])
    rank = np.empty(key_ids.size, np.intp)
    rank[by_key] = np.arange(key_ids.size) - np.repeat(starts, sizes)
    order = np.argsort(rank, kind="stable")
    bounds = np.searchsorted(rank[order], np.arange(int(sizes.max()) + 1))
    return _Rounds(by_key, by_key[starts], order, np.r_[bounds, key_ids.size])


def _running_max(values: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """The running maximum of `values`, restarting at each of `starts` (a mask): one cumulative
    maximum of the values' ranks, each run lifted above the ones before it."""
    order = np.argsort(values, kind="stable")
    rank = np.empty(values.size, np.int64)
    rank[order] = np.arange(values.size)
    lift = (np.cumsum(starts) - 1) * values.size
    return values[order[np.maximum.accumulate(rank + lift) - lift]]


def _latest_per_partition(partitions: np.ndarray, times: np.ndarray) -> tuple[np.ndarray, ...]:
    """The distinct `partitions` of a batch's events (sorted) and the latest event time of each."""
    numbers, inverse = np.unique(partitions, return_inverse=True)
    latest = np.full(numbers.size, -np.inf)
    np.maximum.at(latest, inverse, times)
    return numbers, latest


def _episode_peaks(
    by_key: np.ndarray, key_ids: np.ndarray, opened: np.ndarray, peaks: np.ndarray
) -> np.ndarray:
    """For each event that opened an episode, the episode's peak at its last event in the batch.

    A key's events from one opening up to its next opening (or the end of the batch) form
    the episode's segment; the peak stored after the segment's last scored event is the
    episode's peak within the batch (it is not changed once the episode closed).
    """
    if not opened.any():  # also when late dead letters left no event at all
        return np.full(peaks.size, np.nan)
    ids = key_ids[by_key]
    scored = ~np.isnan(peaks[by_key])
    breaks = opened[by_key] | np.r_[True, ids[1:] != ids[:-1]]
    segment = np.cumsum(breaks) - 1
    last = np.full(int(segment[-1]) + 1, -1, np.intp)
    np.maximum.at(last, segment[scored], np.flatnonzero(scored))
    starts = opened[by_key]
    result = np.full(peaks.size, np.nan)
    result[by_key[starts]] = peaks[by_key[last[segment[starts]]]]
    return result
