"""What the detection-quality benchmarks share: where the data is, caches named by their
input, worker processes, how a replayed key is judged (alert episodes as predicted
sequences, per-range and per-point counts), seed means, score dumps, tables and JSON.

The benchmarks themselves only prepare data files, call the trainer and replay through the
detector; nothing here thresholds: the engine's own alerts and thresholds are judged.

`--scores OUT.npz` (`score_dump`) holds, per training seed (the configuration's when
`--seeds` is not given) and key (a SMAP channel, a synthetic series), each scored event's
values in time order, for offline threshold studies:

    {seed}/{key}/test_scores        float64  the engine's smoothed score, test stream
    {seed}/{key}/test_thresholds    float64  the threshold the engine compared it with
    {seed}/{key}/test_labels        int8     0/1
    {seed}/{key}/train_scores       float64  the same for the training file, replayed
    {seed}/{key}/train_thresholds   float64    through the engine as the test stream is
    {seed}/{key}/train_labels       int8
    {seed}/{key}/train_split        int8     the trainer's split of the training file's
                                             events: 0 train, 1 validation, 2 test
    {seed}/{key}/smoothing          float64  0-d: the manifest's EWMA α of the scores
    {seed}/{key}/static_threshold   float64  0-d: the calibrated threshold (`Scoring.threshold`)
    {seed}/{key}/unit_score         float64  0-d: the score of a scaled error of 1 in every
                                             forecast feature (`min_scaled_error`'s unit);
                                             NaN when the configuration sets no such bound
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from detector.engine.core import Status
from trainer.config import TrainConfig
from trainer.data import _split as trainer_split
from trainer.evaluate import Evaluation
from trainer.metrics import Counts, RangeCounts, episode_flags, point_counts, range_counts, runs

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


def training_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the benchmarks that train forecast models and replay them: seeds, jobs,
    epochs, the engine's cooldown and score dumps."""
    parser.add_argument("--cooldown", type=int, default=100, help="engine cooldown_events")
    parser.add_argument("--epochs", type=int, help="override the configured epochs")
    parser.add_argument(
        "--seeds",
        type=seed_list,
        default=[None],
        help="comma-separated training seeds, each a full run; the first is the headline "
        "(default: the configuration's)",
    )
    parser.add_argument(
        "--jobs", type=int, default=1, help="models trained at once (one torch thread each)"
    )
    parser.add_argument(
        "--scores",
        type=Path,
        help="write every key's smoothed scores, thresholds and labels, of the test stream "
        "and of the training file, per seed, to this .npz (layout: quality_report's docstring)",
    )


def seed_list(text: str) -> list[int]:
    try:
        seeds = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a comma-separated list of integers: {text!r}"
        ) from None
    if len(set(seeds)) < len(seeds):
        raise argparse.ArgumentTypeError(f"a seed is repeated: {text!r}")
    return seeds


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


#: A key in an alert episode for more than this share of its normal events is mostly in
#: alert: whatever its episodes overlap is not detected but covered.
MOSTLY_IN_ALERT = 0.5


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


@dataclass(frozen=True)
class KeyStream:
    """One key's replayed events in time order, the unit alerts and scores are judged on."""

    key: str
    times: np.ndarray
    #: The smoothed score the engine compared with `thresholds` (NaN where not scored).
    scores: np.ndarray
    thresholds: np.ndarray
    labels: np.ndarray
    scored: np.ndarray

    @property
    def above(self) -> np.ndarray:
        return self.scored & (self.scores >= self.thresholds)


def key_stream(evaluation: Evaluation, key: str) -> KeyStream:
    replay = evaluation.replay
    rows = np.flatnonzero(replay.keys == key)
    rows = rows[np.argsort(replay.times[rows], kind="stable")]
    return KeyStream(
        key,
        replay.times[rows],
        replay.scores[rows],
        replay.thresholds[rows],
        evaluation.labels[rows],
        replay.statuses[rows] == Status.SCORED,
    )


@dataclass(frozen=True)
class Judged:
    """A key's predicted sequences and how they and its alerting events meet its labels."""

    #: Per event of the stream: inside a predicted sequence (an alert episode from its onset).
    predicted: np.ndarray
    ranges: RangeCounts
    points: Counts
    alerts: int
    #: Share of the key's normal events inside a predicted sequence.
    normal_in_episode: float


def judge(evaluation: Evaluation, stream: KeyStream, truth: np.ndarray, cooldown: int) -> Judged:
    """Sequence and point counts of one key against `truth` (per event of `stream`).

    A labeled sequence is caught when a predicted sequence overlaps it, and a predicted
    sequence overlapping no label is one false positive; point counts compare each scored
    event's alerting with its label. The episodes are checked against the engine's alerts.
    """
    above, scored = stream.above, stream.scored
    confirm = evaluation.manifest.scoring.confirm
    predicted = episode_flags(above, None, cooldown, confirm, from_onset=True)
    onsets = sorted(a.onset_time for a in evaluation.replay.alerts if a.key == stream.key)
    _check_episodes(evaluation, stream, runs(episode_flags(above, None, cooldown, confirm)), onsets)
    return Judged(
        predicted,
        range_counts(truth, predicted),
        point_counts(truth[scored], above[scored]),
        len(onsets),
        float(predicted[~truth].mean()) if (~truth).any() else 0.0,
    )


def _check_episodes(
    evaluation: Evaluation, stream: KeyStream, episodes: np.ndarray, onsets: list[float]
) -> None:
    """Say so when the episodes counted here are not the engine's alerts (one each, at the
    onset of its first confirming score): the benchmark would not judge the product."""
    expected = stream.times[episodes[:, 0] - (evaluation.manifest.scoring.confirm - 1)]
    if not np.array_equal(onsets, expected):
        console.print(
            f"[red]{stream.key}: {len(onsets)} engine alerts, {len(expected)} episodes, "
            "or their onsets differ"
        )


def sequence_rates(ranges: RangeCounts, points: Counts) -> dict[str, float | int]:
    """The figures every quality benchmark reports of pooled or per-key counts."""
    return {
        "precision": ranges.precision,
        "recall": ranges.recall,
        "f1": ranges.f1,
        "pointwise_precision": points.precision,
        "pointwise_recall": points.recall,
        "pointwise_f1": points.f1,
        "labeled_sequences": ranges.labeled,
        "detected_sequences": ranges.detected,
        "predicted_sequences": ranges.predicted,
        "false_positive_sequences": ranges.predicted - ranges.predicted_on_label,
    }


#: Figures averaged over seeds or data sets (the sequence counts too, so that the mean of 56
#: and 57 reads 56.5).
MEAN_FIELDS = (
    "precision",
    "recall",
    "f1",
    "pointwise_f1",
    "detected_sequences",
    "false_positive_sequences",
)


def field_means(rows: Sequence[dict]) -> dict[str, float]:
    """The mean of each of `MEAN_FIELDS` over `rows` (seeds' totals, kinds, data sets)."""
    return {field: float(np.mean([row[field] for row in rows])) for field in MEAN_FIELDS}


def rates_table(title: str, first: str, rows: dict[str, dict]) -> Table:
    """Sequence and point figures of named rows (keys, kinds, data sets, seeds)."""
    rates, counts = MEAN_FIELDS[:4], MEAN_FIELDS[4:]
    return table(
        title,
        [first, "precision", "recall", "F1", "point F1", "caught", "FP"],
        [
            (
                name,
                *(float(row[field]) for field in rates),
                *(f"{round(row[field], 1):g}" for field in counts),
            )
            for name, row in rows.items()
        ],
    )


def seeds_table(title: str, seeds: dict[str, dict], mean: dict) -> Table:
    """Each seed's totals and their mean, the fair estimate."""
    rows = {f"seed {seed}": total for seed, total in seeds.items()} | {"mean": mean}
    return rates_table(f"{title}: by training seed", "", rows)


def score_dump(
    seed: int, keys: Sequence[str], test: Evaluation, training: Evaluation, config: TrainConfig
) -> dict[str, np.ndarray]:
    """The arrays of `--scores` for `keys` of one model and seed (layout: the module's
    docstring): per part, each scored event's smoothed score, threshold and label in time
    order; the trainer's split of the training file's scored events; the smoothing α."""
    arrays: dict[str, np.ndarray] = {}
    for key in keys:
        prefix = f"{seed}/{key}"
        streams = {"test": key_stream(test, key), "train": key_stream(training, key)}
        for part, stream in streams.items():
            scored = stream.scored
            arrays[f"{prefix}/{part}_scores"] = stream.scores[scored]
            arrays[f"{prefix}/{part}_thresholds"] = stream.thresholds[scored]
            arrays[f"{prefix}/{part}_labels"] = stream.labels[scored].astype(np.int8)
        arrays[f"{prefix}/train_split"] = split_codes(config, streams["train"])
        scoring = test.manifest.scoring
        arrays[f"{prefix}/smoothing"] = np.float64(scoring.smoothing)
        arrays[f"{prefix}/static_threshold"] = np.float64(scoring.threshold)
        bound = config.threshold.advanced.min_scaled_error
        arrays[f"{prefix}/unit_score"] = np.float64(
            scoring.min_score / bound**2 if bound else np.nan
        )
    return arrays


def split_codes(config: TrainConfig, stream: KeyStream) -> np.ndarray:
    """The trainer's split (0 train, 1 validation, 2 test: `trainer.data.SPLIT_NAMES`) of each
    scored event of a key's training file: the trainer's own rule, not a copy of it."""
    events = stream.times.size
    codes = trainer_split(config, np.zeros(events), stream.times, np.arange(events))
    return codes[stream.scored].astype(np.int8)


def write_scores(path: Path | None, dumps: Sequence[dict[str, np.ndarray]]) -> None:
    """One .npz of the `score_dump`s of all tasks (their keys never collide)."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **{name: array for dump in dumps for name, array in dump.items()})
    console.print(f"scores written to {path}")
