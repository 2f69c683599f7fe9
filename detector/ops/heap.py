"""The garbage collector of a long-running process that allocates in bulk.

A round of the daemon (or a chunk of a replay) allocates tens of thousands of short-lived
objects: one record tuple and one decoded JSON object per event, their rows and lists.
Reference counting frees them; the cyclic collector finds nothing in them, yet with its
default thresholds it ran a young collection every 700 allocations and, every hundred of
those, walked the whole heap loaded at start (modules, pydantic models, onnxruntime's
bindings). On the stateful path through librdkafka that cost about a third of the CPU per
event (`bench/consume_path.py` measures the path; docs/benchmarks.md has the figures).
"""

from __future__ import annotations

import gc

__all__ = ["YOUNG_COLLECTION_EVERY", "settle"]

#: Allocations between two collections of the youngest generation (CPython's default: 700).
#: Cycles still get collected, a few thousand allocations later.
YOUNG_COLLECTION_EVERY = 10_000


def settle() -> None:
    """Once everything the process keeps is loaded: collect, exempt what survived from every
    later collection (`gc.freeze`), and collect the young generation less often."""
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG_COLLECTION_EVERY, middle, old)
