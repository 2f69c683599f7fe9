"""What the detection-quality benchmarks share: where the data is, caches named by their
input, worker processes, tables, JSON and plots.

The benchmarks themselves only prepare data files, call the trainer and replay through the
detector; nothing here scores or thresholds.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO.parent / "shared" / "data"

console = Console()
_Task = TypeVar("_Task")
_Result = TypeVar("_Result")


def common_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    """Options every quality benchmark takes: data, scratch folder, JSON and plot outputs."""
    parser.add_argument(
        "--data", type=Path, default=DEFAULT_DATA, help="reference data folder (../shared/data)"
    )
    parser.add_argument(
        "--work",
        type=Path,
        default=Path(tempfile.gettempdir()) / "seqsentinel-quality" / name,
        help="scratch folder for prepared event files and models (outside the repository)",
    )
    parser.add_argument("--json", type=Path, help="write the results as JSON here")
    parser.add_argument("--plots", type=Path, help="write PNG plots into this folder")


def require(path: Path, what: str) -> Path:
    """`path`, or exit with a message saying what is missing and how to point at it."""
    if not path.exists():
        sys.exit(f"{what} not found at {path}; pass --data with the reference data folder")
    return path


def input_key(path: Path) -> str:
    """A short key of an input file (where it is, its size and its modification time), for
    naming what is made from it: a cache of one file is never taken for another's, nor for
    the same file changed."""
    stat = path.stat()
    identity = f"{path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}"
    return hashlib.sha256(identity.encode()).hexdigest()[:16]


def cached(path: Path, make: Callable[[Path], object]) -> Path:
    """`path`, made by `make(partial)` unless already there: written under a name of this
    process and renamed when complete, so that an interrupted run leaves nothing to be taken
    as done and workers making the same file at once do not write into each other's."""
    if not path.exists():
        partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
        make(partial)
        partial.replace(path)
    return path


def run_jobs(
    function: Callable[[_Task], _Result], tasks: Sequence[_Task], jobs: int
) -> list[_Result]:
    """`function` of each task, in order, `jobs` at once in worker processes (one: in this
    one), each on one torch thread as `--jobs` promises, `--jobs 1` included."""
    if jobs <= 1:
        torch.set_num_threads(1)
        return [function(task) for task in tasks]
    with ProcessPoolExecutor(jobs, initializer=torch.set_num_threads, initargs=(1,)) as pool:
        return list(pool.map(function, tasks))


def rate(value: float) -> str:
    return "—" if value is None or not math.isfinite(value) else f"{value:.3f}"


def table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> Table:
    """A rich table; floats print with three decimals."""
    result = Table(title=title, title_justify="left")
    for index, column in enumerate(columns):
        result.add_column(column, justify="left" if index == 0 else "right")
    for row in rows:
        result.add_row(*(rate(v) if isinstance(v, float) else str(v) for v in row))
    return result


def write_json(path: Path | None, document: dict) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2, allow_nan=False, default=_plain) + "\n")
    console.print(f"results written to {path}")


def _plain(value: object) -> object:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def finite(value: float) -> float | None:
    """JSON has no NaN: undefined metrics become null."""
    return float(value) if math.isfinite(value) else None
