"""Per-key streaming state in preallocated numpy arrays indexed by slot.

A million keys cannot each own a Python object: the per-object overhead alone would be
several times the state itself, and every batch would walk them one by one. Instead a
`KeyArena` maps each key to a slot, and every piece of state is one array with a slot axis,
so a batch reads and writes the state of all its keys with fancy indexing. The arrays grow
in doubling chunks up to `max_keys`; beyond that the least recently seen keys are evicted
in bulk.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import repeat

import numpy as np

from detector.contract.manifest import Manifest

#: Slots allocated up front; the arena doubles from here as keys arrive, up to `max_keys`.
INITIAL_CAPACITY = 1024


@dataclass(frozen=True, slots=True)
class ArenaShape:
    """What a model needs to remember per key: a window of encoded events or an LSTM state."""

    #: window models: (window, width) of the ring buffer of encoded events.
    ring: tuple[int, int] | None = None
    #: stateful models: (layers, hidden) of h and c.
    state: tuple[int, int] | None = None
    #: adaptive thresholds: recent smoothed scores kept per key.
    history: int | None = None
    #: alert confirmation: consecutive scores at or above the threshold counted per key, and
    #: the time of the first of them.
    confirm: bool = False

    @classmethod
    def for_manifest(cls, manifest: Manifest) -> ArenaShape:
        adaptive = manifest.scoring.adaptive
        history = None if adaptive is None else adaptive.history
        confirm = manifest.scoring.confirm > 1
        if manifest.export_mode == "window":
            return cls(
                ring=(manifest.window, len(manifest.features)), history=history, confirm=confirm
            )
        return cls(
            state=(manifest.network.layers, manifest.network.hidden),
            history=history,
            confirm=confirm,
        )


# Per-slot fields: name -> (dtype, value of a fresh slot). The sequence group is what the
# model reads (reset when a key's history restarts); the score group is what alerting reads.
_SEQUENCE_FIELDS: dict[str, tuple[type, object]] = {
    "count": (np.int64, 0),
    "last_time": (np.float64, 0.0),
}
_SCORE_FIELDS: dict[str, tuple[type, object]] = {
    "smoothed": (np.float64, np.nan),
    "in_episode": (np.bool_, False),
    "below": (np.int32, 0),
    "peak": (np.float64, np.nan),
}
#: Score fields of adaptive thresholds: scored events since the key's scores restarted (the
#: write position in `recent`) and the key's current threshold (NaN: the static one).
_ADAPTIVE_FIELDS: dict[str, tuple[type, object]] = {
    "scored": (np.int64, 0),
    "level": (np.float64, np.nan),
}
#: Score fields of alert confirmation: consecutive scores at or above the threshold, and the
#: event time of the first of them (the onset of the episode they open).
_CONFIRM_FIELDS: dict[str, tuple[type, object]] = {
    "above": (np.int32, 0),
    "onset": (np.float64, np.nan),
}
_SLOT_FIELDS: dict[str, tuple[type, object]] = {
    "used": (np.bool_, False),
    "last_seen": (np.int64, -1),
    "touched": (np.float64, 0.0),
    "stats_row": (np.intp, 0),
    "partition": (np.int32, -1),
}
#: What a snapshot carries per key beside the key itself and the model's memory: everything
#: but the slot bookkeeping (`used`, and `last_seen`, which is a tick of this process).
_SNAPSHOT_FIELDS = (*_SEQUENCE_FIELDS, *_SCORE_FIELDS, "touched", "stats_row", "partition")


class KeyArena:
    """Slots for up to `max_keys` keys, with least-recently-seen eviction and idle expiry.

    Public arrays (all indexed by slot): `count` (events in the key's current history, which is
    also the sequence number of its latest event), `last_time` (event time of the latest
    event), `touched` (clock of the last update, for expiry), `last_seen` (batch tick, for
    eviction), `stats_row` (the key's row in the codec's statistics table), `partition` (the
    input partition the key's events come from, -1 when unknown), `smoothed`,
    `in_episode`, `below`, `peak` (alerting), and `ring` [slot, window, width] or
    `h`, `c` [layers, slot, hidden] (the model's memory). With adaptive thresholds also
    `scored`, `level` and `recent` [slot, history] (a ring of the latest smoothed scores);
    with alert confirmation `above` and `onset`.
    """

    count: np.ndarray
    last_time: np.ndarray
    smoothed: np.ndarray
    in_episode: np.ndarray
    below: np.ndarray
    peak: np.ndarray
    used: np.ndarray
    last_seen: np.ndarray
    touched: np.ndarray
    stats_row: np.ndarray
    partition: np.ndarray
    ring: np.ndarray
    h: np.ndarray
    c: np.ndarray
    scored: np.ndarray
    level: np.ndarray
    recent: np.ndarray
    above: np.ndarray
    onset: np.ndarray

    def __init__(self, shape: ArenaShape, max_keys: int) -> None:
        if max_keys < 1:
            raise ValueError("max_keys must be at least 1")
        self.shape = shape
        self.max_keys = max_keys
        self.capacity = 0
        #: Keys evicted so far (least recently seen, for room): their state is lost by design.
        self.evicted = 0
        self._slots: dict[str, int] = {}
        self._keys = np.empty(0, object)
        for name, (dtype, fill) in self._scalar_fields().items():
            setattr(self, name, np.full(0, fill, dtype))
        if shape.ring is not None:
            self.ring = np.zeros((0, *shape.ring), np.float32)
        if shape.state is not None:
            layers, hidden = shape.state
            self.h = np.zeros((layers, 0, hidden), np.float32)
            self.c = np.zeros((layers, 0, hidden), np.float32)
        if shape.history is not None:
            self.recent = np.zeros((0, shape.history), np.float32)
        self._grow(min(INITIAL_CAPACITY, max_keys))

    def __len__(self) -> int:
        return len(self._slots)

    def _score_fields(self) -> dict[str, tuple[type, object]]:
        fields = _SCORE_FIELDS if self.shape.history is None else _SCORE_FIELDS | _ADAPTIVE_FIELDS
        return fields | _CONFIRM_FIELDS if self.shape.confirm else fields

    def _scalar_fields(self) -> dict[str, tuple[type, object]]:
        return _SEQUENCE_FIELDS | self._score_fields() | _SLOT_FIELDS

    def _snapshot_fields(self) -> tuple[str, ...]:
        adaptive = () if self.shape.history is None else (*_ADAPTIVE_FIELDS, "recent")
        confirm = tuple(_CONFIRM_FIELDS) if self.shape.confirm else ()
        return (*_SNAPSHOT_FIELDS, *adaptive, *confirm)

    def nbytes_per_slot(self) -> int:
        """Bytes of array state per slot (the key strings and the key index come on top)."""
        size = self._keys.itemsize + sum(
            np.dtype(dtype).itemsize for dtype, _ in self._scalar_fields().values()
        )
        if self.shape.ring is not None:
            window, width = self.shape.ring
            size += window * width * 4
        if self.shape.state is not None:
            layers, hidden = self.shape.state
            size += 2 * layers * hidden * 4
        if self.shape.history is not None:
            size += self.shape.history * 4
        return size

    # -- slots ------------------------------------------------------------------------------

    def lookup(self, keys: Sequence[str]) -> np.ndarray:
        """The slot of each key, -1 for keys without one."""
        return np.fromiter(map(self._slots.get, keys, repeat(-1)), np.intp, len(keys))

    def allocate(
        self, keys: Sequence[str], tick: int, statistics_rows: Callable[[Sequence[str]], np.ndarray]
    ) -> tuple[np.ndarray, int]:
        """Fresh slots for `keys` (which have none), evicting the least recently seen if full.

        Keys seen at `tick` are never evicted. Returns the slots and how many keys were evicted.
        """
        needed = len(keys)
        if needed == 0:
            return np.zeros(0, np.intp), 0
        free = np.flatnonzero(~self.used)
        if free.size < needed and self.capacity < self.max_keys:
            self._grow(min(self.max_keys, max(2 * self.capacity, len(self) + needed)))
            free = np.flatnonzero(~self.used)
        evicted = 0
        if free.size < needed:
            evicted = needed - free.size
            candidates = np.flatnonzero(self.used & (self.last_seen != tick))
            if candidates.size < evicted:
                raise ValueError(
                    f"{needed + len(self) - candidates.size} keys at once do not fit in "
                    f"max_keys={self.max_keys}"
                )
            oldest = np.argpartition(self.last_seen[candidates], evicted - 1)[:evicted]
            self.release(candidates[oldest])
            self.evicted += evicted
            free = np.flatnonzero(~self.used)
        slots = free[:needed]
        self.reset(slots)
        self._slots.update(zip(keys, slots.tolist(), strict=True))
        self._keys[slots] = np.array(keys, object)
        self.used[slots] = True
        self.last_seen[slots] = tick
        self.partition[slots] = -1
        self.stats_row[slots] = statistics_rows(keys)
        return slots, evicted

    def expire(self, cutoff: float | np.ndarray, tick: int) -> int:
        """Release keys last touched before `cutoff` (one, or one per slot), except those seen
        at `tick`; how many."""
        idle = np.flatnonzero(self.used & (self.touched < cutoff) & (self.last_seen != tick))
        self.release(idle)
        return int(idle.size)

    def expire_partitions(self, partitions: np.ndarray, cutoffs: np.ndarray, tick: int) -> int:
        """`expire` with a cutoff per input partition (`partitions` sorted and distinct) for the
        keys tagged with it; keys of other partitions stay. Each partition's event time is
        the clock of its own keys only: partitions are consumed at their own pace (after a
        restart one may be a day of event time ahead of another), so a cutoff from another
        partition's events would expire keys whose next event is due within the TTL."""
        at = np.minimum(np.searchsorted(partitions, self.partition), partitions.size - 1)
        return self.expire(np.where(partitions[at] == self.partition, cutoffs[at], -np.inf), tick)

    def release(self, slots: np.ndarray) -> None:
        """Forget the keys of `slots`; the slots become free (and are reset when reused)."""
        for key in self._keys[slots].tolist():
            del self._slots[key]
        self._keys[slots] = None
        self.used[slots] = False

    def clear(self) -> None:
        """Forget every key."""
        self.release(np.flatnonzero(self.used))

    # -- partitions and snapshots -------------------------------------------------------------

    def slots_of(self, partitions: Sequence[int]) -> np.ndarray:
        """The slots of the keys whose events come from `partitions`."""
        return np.flatnonzero(self.used & np.isin(self.partition, partitions))

    def keys_of(self, slots: np.ndarray) -> np.ndarray:
        """The keys of `slots`."""
        return self._keys[slots]

    def export(self, slots: np.ndarray) -> dict[str, np.ndarray]:
        """Copies of everything a restarted process needs to continue `slots` exactly."""
        fields = {name: getattr(self, name)[slots] for name in self._snapshot_fields()}
        fields["keys"] = self.keys_of(slots)
        if self.shape.ring is not None:
            fields["ring"] = self.ring[slots]
        if self.shape.state is not None:
            fields["h"], fields["c"] = self.state(slots)
        return fields

    def restore(
        self, fields: dict[str, np.ndarray], statistics_rows: Callable[[Sequence[str]], np.ndarray]
    ) -> int:
        """Take in keys `export`ed elsewhere, replacing any state they have here; the most
        recently touched ones first when they do not all fit. Returns the keys evicted."""
        order = np.argsort(fields["touched"], kind="stable")[-self.max_keys :]
        self.evicted += len(fields["keys"]) - order.size
        keys = fields["keys"][order].tolist()
        if not keys:
            return 0
        present = self.lookup(keys)
        self.release(present[present >= 0])
        tick = int(self.last_seen.max(initial=0))
        slots, evicted = self.allocate(keys, tick, statistics_rows)
        for name in self._snapshot_fields():
            getattr(self, name)[slots] = fields[name][order]
        if self.shape.ring is not None:
            self.ring[slots] = fields["ring"][order]
        if self.shape.state is not None:
            self.set_state(slots, fields["h"][:, order], fields["c"][:, order])
        return evicted

    # -- state ------------------------------------------------------------------------------

    def reset(self, slots: np.ndarray) -> None:
        """Give `slots` the state of a key never seen before."""
        self.reset_sequence(slots)
        self.reset_scores(slots)

    def reset_sequence(self, slots: np.ndarray) -> None:
        """Restart the history the model sees (count, last time, ring or h and c)."""
        self._fill(slots, _SEQUENCE_FIELDS)
        if self.shape.ring is not None:
            self.ring[slots] = 0.0
        if self.shape.state is not None:
            self.h[:, slots] = 0.0
            self.c[:, slots] = 0.0

    def reset_scores(self, slots: np.ndarray) -> None:
        """Restart smoothing, the alert episode and the adaptive threshold (its ring of scores
        cleared too: only its first `scored` are read, but a slot's state should not depend on
        which key held it before, so that snapshots and restored state compare exactly)."""
        self._fill(slots, self._score_fields())
        if self.shape.history is not None:
            self.recent[slots] = 0.0

    # -- model memory (gathers with np.take and row copies: several times faster than
    # -- fancy indexing over a middle axis) ------------------------------------------------

    def state(self, slots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Copies of h and c [layers, n, hidden] of `slots`."""
        return np.take(self.h, slots, axis=1), np.take(self.c, slots, axis=1)

    def set_state(self, slots: np.ndarray, h: np.ndarray, c: np.ndarray) -> None:
        for layer in range(self.h.shape[0]):
            self.h[layer, slots] = h[layer]
            self.c[layer, slots] = c[layer]

    def append(self, slots: np.ndarray, x: np.ndarray) -> None:
        """Write each slot's newest encoded event [n, width] into its ring; `count` already
        includes it."""
        window, width = self.shape.ring
        rows = slots * window + (self.count[slots] - 1) % window
        self.ring.reshape(-1, width)[rows] = x

    def windows(self, slots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Each slot's last min(count, window) events, oldest first and right-padded with zeros
        [n, window, width], and their lengths [n]."""
        window, width = self.shape.ring
        rows, lengths, real = _oldest_first(slots, self.count[slots], window)
        gathered = np.take(self.ring.reshape(-1, width), rows, axis=0)
        gathered[~real] = 0.0
        return gathered, lengths

    # -- adaptive thresholds ---------------------------------------------------------------

    def remember_scores(self, slots: np.ndarray, scores: np.ndarray) -> np.ndarray:
        """Append one smoothed score per slot to its `recent` ring; the slots' new `scored`."""
        history = self.shape.history
        scored = self.scored[slots]
        self.recent.reshape(-1)[slots * history + scored % history] = scores
        scored += 1
        self.scored[slots] = scored
        return scored

    def recent_scores(self, slots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Each slot's remembered scores, oldest first [n, history], and which are real (a key
        with fewer scores than `history` has them at the front)."""
        positions, _, real = _oldest_first(slots, self.scored[slots], self.shape.history)
        return np.take(self.recent.reshape(-1), positions), real

    def _fill(self, slots: np.ndarray, fields: dict[str, tuple[type, object]]) -> None:
        for name, (_, fill) in fields.items():
            getattr(self, name)[slots] = fill

    def _grow(self, capacity: int) -> None:
        extra = capacity - self.capacity
        for name, (dtype, fill) in self._scalar_fields().items():
            setattr(self, name, np.concatenate([getattr(self, name), np.full(extra, fill, dtype)]))
        self._keys = np.concatenate([self._keys, np.full(extra, None, object)])
        if self.shape.ring is not None:
            self.ring = np.concatenate([self.ring, np.zeros((extra, *self.shape.ring), np.float32)])
        if self.shape.state is not None:
            layers, hidden = self.shape.state
            zeros = np.zeros((layers, extra, hidden), np.float32)
            self.h = np.concatenate([self.h, zeros], axis=1)
            self.c = np.concatenate([self.c, zeros], axis=1)
        if self.shape.history is not None:
            extra_recent = np.zeros((extra, self.shape.history), np.float32)
            self.recent = np.concatenate([self.recent, extra_recent])
        self.capacity = capacity


def _oldest_first(
    slots: np.ndarray, count: np.ndarray, length: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each slot's last min(count, length) entries in rings of `length` per slot: their flat
    positions [n, length], oldest first; how many there are [n]; and which positions are real
    [n, length] (the rest, at the end, are filler for slots with fewer than `length`)."""
    kept = np.minimum(count, length)
    steps = np.arange(length)
    positions = slots[:, None] * length + ((count - kept)[:, None] + steps) % length
    return positions, kept, steps < kept[:, None]
