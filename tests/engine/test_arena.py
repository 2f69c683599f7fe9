"""KeyArena: slots, growth, least-recently-seen eviction, expiry and resets."""

from __future__ import annotations

import numpy as np
import pytest

from detector.engine.arena import INITIAL_CAPACITY, ArenaShape, KeyArena

WINDOW_SHAPE = ArenaShape(ring=(4, 3))
STATE_SHAPE = ArenaShape(state=(2, 5))


def no_statistics(keys: list[str]) -> np.ndarray:
    return np.zeros(len(keys), np.intp)


def add(arena: KeyArena, keys: list[str], tick: int) -> tuple[np.ndarray, int]:
    return arena.allocate(keys, tick, no_statistics)


def test_keys_get_distinct_slots_and_are_found_again() -> None:
    arena = KeyArena(WINDOW_SHAPE, max_keys=10)
    slots, evicted = arena.allocate(["a", "b", "c"], 1, lambda keys: np.arange(len(keys)) + 5)
    assert evicted == 0 and len(set(slots.tolist())) == 3
    np.testing.assert_array_equal(arena.lookup(["c", "x", "a"]), [slots[2], -1, slots[0]])
    np.testing.assert_array_equal(arena.stats_row[slots], [5, 6, 7])
    assert len(arena) == 3


def test_growth_keeps_state_and_stops_at_max_keys() -> None:
    arena = KeyArena(STATE_SHAPE, max_keys=3000)
    assert arena.capacity == INITIAL_CAPACITY
    first, _ = add(arena, ["k0"], 1)
    arena.count[first] = 7
    arena.h[:, first] = 1.5
    add(arena, [f"k{i}" for i in range(1, 1500)], 2)
    assert arena.capacity == 2 * INITIAL_CAPACITY
    add(arena, [f"k{i}" for i in range(1500, 3000)], 3)
    assert arena.capacity == 3000 and arena.h.shape == (2, 3000, 5)
    slot = arena.lookup(["k0"])
    assert arena.count[slot][0] == 7 and (arena.h[:, slot] == 1.5).all()


def test_the_least_recently_seen_keys_are_evicted_and_their_slots_reset() -> None:
    arena = KeyArena(WINDOW_SHAPE, max_keys=4)
    for tick, key in enumerate("abcd", start=1):
        slot, _ = add(arena, [key], tick)
        arena.count[slot] = 3
        arena.ring[slot] = 9.0
        arena.in_episode[slot] = True
    arena.last_seen[arena.lookup(["a"])] = 5  # a seen again
    slots, evicted = add(arena, ["e", "f"], 6)
    assert evicted == 2
    np.testing.assert_array_equal(arena.lookup(["b", "c"]), [-1, -1])
    assert (arena.lookup(["a", "d"]) >= 0).all()
    assert (arena.count[slots] == 0).all() and (arena.ring[slots] == 0).all()
    assert not arena.in_episode[slots].any()


def test_keys_seen_in_the_current_batch_are_never_evicted() -> None:
    arena = KeyArena(WINDOW_SHAPE, max_keys=2)
    add(arena, ["a", "b"], 1)
    arena.last_seen[:] = 2
    with pytest.raises(ValueError, match="max_keys=2"):
        add(arena, ["c"], 2)


def test_expire_releases_idle_keys_but_spares_the_current_tick() -> None:
    arena = KeyArena(WINDOW_SHAPE, max_keys=8)
    slots, _ = add(arena, ["old", "seen", "fresh"], 1)
    arena.touched[slots] = [10.0, 10.0, 95.0]
    arena.last_seen[slots[1]] = 2
    assert arena.expire(cutoff=50.0, tick=2) == 1
    np.testing.assert_array_equal(arena.lookup(["old", "seen", "fresh"]) >= 0, [False, True, True])
    arena.clear()
    assert len(arena) == 0 and not arena.used.any()


def test_sequence_and_score_state_reset_separately() -> None:
    arena = KeyArena(STATE_SHAPE, max_keys=4)
    slots, _ = add(arena, ["a"], 1)
    arena.count[slots], arena.h[:, slots], arena.smoothed[slots] = 4, 2.0, 0.7
    arena.reset_sequence(slots)
    assert arena.count[slots][0] == 0 and (arena.h[:, slots] == 0).all()
    assert arena.smoothed[slots][0] == 0.7
    arena.reset_scores(slots)
    assert np.isnan(arena.smoothed[slots][0])


def test_state_per_key_is_small() -> None:
    stateful = KeyArena(ArenaShape(state=(2, 64)), max_keys=10)
    window = KeyArena(ArenaShape(ring=(32, 8)), max_keys=10)
    assert stateful.nbytes_per_slot() == 2 * 2 * 64 * 4 + 74
    assert window.nbytes_per_slot() == 32 * 8 * 4 + 74


def test_ring_windows_are_the_last_events_oldest_first_right_padded() -> None:
    arena = KeyArena(WINDOW_SHAPE, max_keys=4)
    slots, _ = add(arena, ["long", "short"], 1)
    for step in range(6):
        members = slots if step < 2 else slots[:1]
        arena.count[members] += 1
        arena.append(members, np.full((members.size, 3), step + 1.0, np.float32))
    windows, lengths = arena.windows(slots)
    np.testing.assert_array_equal(lengths, [4, 2])
    np.testing.assert_array_equal(windows[:, :, 0], [[3, 4, 5, 6], [1, 2, 0, 0]])


def test_lstm_state_is_gathered_and_scattered_per_slot() -> None:
    arena = KeyArena(STATE_SHAPE, max_keys=4)
    slots, _ = add(arena, ["a", "b", "c"], 1)
    h = np.arange(2 * 2 * 5, dtype=np.float32).reshape(2, 2, 5)
    arena.set_state(slots[[2, 0]], h, -h)
    got_h, got_c = arena.state(slots[[0, 1, 2]])
    np.testing.assert_array_equal(got_h, np.stack([h[:, 1], np.zeros((2, 5)), h[:, 0]], axis=1))
    np.testing.assert_array_equal(got_c, -got_h)
