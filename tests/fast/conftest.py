"""The fast tier: the runtime's tests on ONNX models built with `onnx.helper` (`onnx_fixtures`).

Every test below this folder runs without torch and without a Kafka broker:

- run alone (`make test-fast`, or pytest given only paths below this folder), the tier makes
  `import torch` fail before anything is collected, so a test that needs torch fails here
  rather than passing on a machine that happens to have it;
- a test that asks for the broker fails, whichever way the tier runs.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from onnx_fixtures import sensor_manifest, write_fixture

from detector.contract.manifest import ExportMode, Task
from detector.engine.scorer import Scorer

FAST = Path(__file__).resolve().parent


def runs_alone(config: pytest.Config) -> bool:
    """Whether every path pytest was given lies in the fast tier."""
    start = config.invocation_params.dir
    paths = [(start / arg.split("::")[0]).resolve() for arg in config.args]
    return bool(paths) and all(path.is_relative_to(FAST) for path in paths)


def pytest_configure(config: pytest.Config) -> None:
    if not runs_alone(config):
        return  # the whole suite: other tests need torch
    if sys.modules.get("torch") is not None:
        raise pytest.UsageError("torch was imported before the fast tier started")
    sys.modules["torch"] = None  # type: ignore[assignment]  # `import torch` raises ImportError


@pytest.fixture(scope="session")
def kafka_broker() -> Iterator[None]:
    pytest.fail("the fast tier runs without a broker: a Kafka test belongs outside tests/fast")
    yield


@pytest.fixture(scope="session")
def fixture_models(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[Task, ExportMode], Path]:
    """One fixture model file per task and export mode, all from seed 0."""
    folder = tmp_path_factory.mktemp("onnx-fixtures")
    return {
        (task, mode): write_fixture(folder / f"{task}-{mode}.onnx", sensor_manifest(task, mode))
        for task in ("forecast", "classify")
        for mode in ("window", "stateful")
    }


@pytest.fixture(scope="session")
def load(fixture_models: dict[tuple[Task, ExportMode], Path]):
    """`load(task, mode)`: a CPU `Scorer` of that fixture model."""

    def load(task: Task = "forecast", mode: ExportMode = "window") -> Scorer:
        return Scorer.load(fixture_models[task, mode], providers=["CPUExecutionProvider"])

    return load
