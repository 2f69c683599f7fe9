"""The recipe's selection replays alerting offline: its thresholds must be the engine's, to the
event, or the settings it chooses would be judged on something the product never does."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import orjson
import pytest
from model_factory import event, load_random, make_manifest

from detector.contract.manifest import AdaptiveThreshold
from detector.engine.core import Engine, EngineOptions, Status
from detector.engine.records import InputRecord

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import select_recipe

HISTORY, REFRESH = 12, 4
T0 = 1_700_000_000.0


@pytest.mark.parametrize(
    ("warm_up", "warm_up_floor"), [(0, None), (6, None), (10, None), (10, 3.0)]
)
def test_the_replayed_thresholds_are_the_engines(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    warm_up: int,
    warm_up_floor: float | None,
) -> None:
    alpha, prune, floor = 0.3, 0.1, 0.02
    manifest = make_manifest("forecast", "stateful", window=4, threshold=0.05)
    scoring = manifest.scoring.model_copy(
        update={
            "smoothing": alpha,
            "min_score": floor,
            "adaptive": AdaptiveThreshold(
                history=HISTORY,
                refresh=REFRESH,
                prune=prune,
                warm_up=warm_up,
                warm_up_floor=warm_up_floor,
                floor="none",
            ),
        }
    )
    scorer = load_random(tmp_path / "m.onnx", manifest.model_copy(update={"scoring": scoring}), 3)
    rng = np.random.default_rng(0)
    amounts = 50 + 5 * rng.normal(size=60) + 150 * (rng.random(60) < 0.05)
    records = [
        InputRecord(orjson.dumps(event("k", T0 + 60 * i, float(a), items=1)))
        for i, a in enumerate(amounts)
    ]
    result = Engine(scorer, EngineOptions(max_batch=16)).process(records)
    scored = result.statuses == Status.SCORED

    monkeypatch.setattr(select_recipe, "HISTORY", HISTORY)
    monkeypatch.setattr(select_recipe, "REFRESH", REFRESH)
    monkeypatch.setattr(
        select_recipe,
        "GRID",
        {**select_recipe.GRID, "smoothing": (alpha,), "prune": (prune,)},
    )
    raw = select_recipe._unsmoothed(result.scores[scored], alpha)
    stream = select_recipe.Stream(
        "SMAP", "k", "0", raw, np.zeros(raw.size, bool), 0.05, floor / 0.1**2
    )
    select_recipe._prepare_levels([stream])
    setting = select_recipe.Setting(alpha, prune, warm_up, warm_up_floor, 1, 0.1)

    np.testing.assert_allclose(stream.smoothed[alpha], result.scores[scored], rtol=1e-12)
    np.testing.assert_allclose(
        select_recipe._thresholds(stream, setting), result.thresholds[scored], rtol=1e-9
    )
    warming = result.thresholds[scored][: max(warm_up - 1, 0)]
    if warm_up_floor is None:
        assert np.isinf(warming).all()
    else:
        assert (warming >= warm_up_floor * 0.05).all() and np.isfinite(warming).all()
