"""Helpers for the tests of the command-line tools."""

from __future__ import annotations

from typing import Any

import pytest

from detector.engine.scorer import Scorer


def spy_on_scorer_loads(monkeypatch: pytest.MonkeyPatch) -> list[Scorer]:
    """The scorers `Scorer.load` returns from now on, in order, for tests to look into."""
    loaded: list[Scorer] = []
    load = Scorer.load

    def spy(*args: Any, **kwargs: Any) -> Scorer:
        loaded.append(load(*args, **kwargs))
        return loaded[-1]

    monkeypatch.setattr(Scorer, "load", spy)
    return loaded


def intra_op_threads(scorer: Scorer) -> int:
    return scorer.session.get_session_options().intra_op_num_threads
