"""Writing records as JSON lines: alerts and dead letters of a replay, retraining's splits."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import orjson


def write_json_lines(path: Path, documents: Iterable[Mapping[str, Any]]) -> None:
    """One JSON document per line; values JSON has no type for (datetimes) as their text."""
    with path.open("wb") as out:
        for document in documents:
            out.write(orjson.dumps(document, default=str) + b"\n")
