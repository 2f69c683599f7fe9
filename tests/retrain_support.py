"""What the `trainer retrain` tests share: a tiny training configuration and running the job."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import orjson

from trainer.cli import main

KEY, LABEL = "customer_id", "is_fraud"
#: Small enough to train in a few seconds on two cores, good enough to beat a network that
#: barely moved from its random start.
TINY = {
    "hidden = 32": "hidden = 8",
    "epochs = 20": "epochs = 4",
    "max_windows = 60000": 'device = "cpu"',
    "learning_rate = 0.005": "learning_rate = 0.02",
}


def write_config(folder: Path, text: str, changes: dict[str, str], name: str) -> Path:
    for old, new in (TINY | changes).items():
        assert old in text
        text = text.replace(old, new)
    path = folder / name
    path.write_text(text)
    return path


def retrain(config: Path, champion: Path, report: Path, *source: str) -> tuple[int, dict]:
    argv = ["retrain", "--config", str(config), *source, "--champion", str(champion)]
    argv += ["--promote-to", str(champion), "--report", str(report), "--no-progress"]
    status = main(argv)
    path = report / "report.json"
    return status, json.loads(path.read_text()) if path.exists() else {}


def lines(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]
