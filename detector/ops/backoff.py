"""Exponential delays between retries, shared by the Kafka edge and the key-state restore."""

from __future__ import annotations

__all__ = ["Backoff"]


class Backoff:
    """Exponential delays between retries, reset after a success."""

    def __init__(self, first: float = 0.2, most: float = 5.0) -> None:
        self.first, self.most = first, most
        self.delay = first

    def next(self) -> float:
        delay, self.delay = self.delay, min(self.delay * 2, self.most)
        return delay

    def reset(self) -> None:
        self.delay = self.first
