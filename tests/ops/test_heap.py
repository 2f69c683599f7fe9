"""The daemon's and replay's collector settings, applied once the process has loaded."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from detector.ops.heap import YOUNG_COLLECTION_EVERY, settle


@pytest.fixture
def restored_collector() -> Iterator[None]:
    thresholds = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*thresholds)


@pytest.mark.usefixtures("restored_collector")
def test_what_is_loaded_is_exempt_and_young_collections_are_rarer() -> None:
    kept = [[index] for index in range(1_000)]  # tracked objects alive before settling
    _, middle, old = gc.get_threshold()
    settle()
    assert gc.get_freeze_count() >= len(kept)
    assert gc.get_threshold() == (YOUNG_COLLECTION_EVERY, middle, old)
    cycle: list[object] = []
    cycle.append(cycle)
    del cycle
    assert gc.collect() >= 1  # cycles made later are still collected
